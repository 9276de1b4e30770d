-- The row-level security net (db/row_security.py). Under FORCE ROW LEVEL SECURITY
-- the owner reaches every workspace's rows only where `raptorflow.all_workspaces`
-- is 'on', as it is on every owner-pool connection. The TRUNCATE capture reads the
-- truncated table's rows as the owner (SECURITY DEFINER) from whatever session
-- truncates, such as an owner's psql, so it turns the flag on for its own read and
-- back to what it was: it still logs a delete of every row, of every workspace.
-- (A function's SET clause would be neater, but PostgreSQL 15 lets only superusers
-- attach a placeholder setting such as this one to a function.)
CREATE OR REPLACE FUNCTION raptorflow_data.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    workspace text;
    all_workspaces text := current_setting('raptorflow.all_workspaces', true);
BEGIN
    PERFORM set_config('raptorflow.all_workspaces', 'on', true);
    FOR workspace IN EXECUTE format(
        'WITH logged AS ('
        '  INSERT INTO raptorflow_data.change_log'
        '    (seq, xid, workspace_id, table_name, operation, row_data)'
        '  SELECT nextval(''raptorflow_data.change_seq''), pg_current_xact_id(),'
        '         r.workspace_id::text, %L, ''D'', to_jsonb(r)'
        '  FROM %I.%I AS r WHERE r.workspace_id IS NOT NULL'
        '  RETURNING workspace_id)'
        ' SELECT DISTINCT workspace_id FROM logged',
        TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME)
    LOOP
        IF octet_length(workspace) < 8000 THEN
            PERFORM pg_notify('raptorflow_data_changes', workspace);
        END IF;
    END LOOP;
    PERFORM set_config('raptorflow.all_workspaces', coalesce(all_workspaces, ''), true);
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION raptorflow_data.capture_truncate() FROM PUBLIC;
