-- Change capture for sync streams: the change log, its consumers and pruning marks,
-- and the trigger functions `raptorflow-data migrate --sync-tables` attaches to
-- exposed tables (see sync/capture.py). Readers work in epochs of
-- pg_current_snapshot(); see sync/streams.py for why each column is here.

-- Taken in the row trigger, after the row lock: a row's changes get increasing
-- values in the order they happened, whatever order their transactions commit in.
-- Keep CACHE 1: with per-session caches, values would no longer follow time.
CREATE SEQUENCE raptorflow_data.change_seq AS bigint CACHE 1;

CREATE TABLE raptorflow_data.change_log (
    seq bigint PRIMARY KEY,
    -- The writing transaction (top level), compared with snapshots by readers.
    xid xid8 NOT NULL,
    workspace_id text NOT NULL,
    table_name text NOT NULL,
    operation "char" NOT NULL CHECK (operation IN ('I', 'U', 'D')),
    -- The row as written (insert, update) or as it was (delete).
    row_data jsonb NOT NULL,
    logged_at timestamptz NOT NULL DEFAULT now()
);
-- Every reader asks for one workspace's entries from a snapshot's xmin on...
CREATE INDEX change_log_workspace_xid ON raptorflow_data.change_log (workspace_id, xid);
-- ...and pages through them in sequence order: without this index each page of a
-- large epoch would sort the whole epoch again.
CREATE INDEX change_log_workspace_seq ON raptorflow_data.change_log (workspace_id, seq);
-- Retention pruning.
CREATE INDEX change_log_logged_at ON raptorflow_data.change_log (logged_at);

-- Named consumers and what they acknowledged: live ones hold back pruning.
CREATE TABLE raptorflow_data.sync_consumers (
    workspace_id text NOT NULL,
    consumer_id text NOT NULL,
    tables text[],
    -- The oldest snapshot the consumer's last token still reads from.
    position text NOT NULL,
    position_xmin xid8 NOT NULL,
    acknowledged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, consumer_id)
);

-- The highest transaction id of any pruned entry, per workspace: a token whose
-- snapshot's xmin is not above it may need a pruned entry and must resnapshot.
CREATE TABLE raptorflow_data.change_log_pruned (
    workspace_id text PRIMARY KEY,
    max_xid xid8 NOT NULL
);

-- The row trigger. Arguments: the exposed table's name (partitions report their
-- own name in TG_TABLE_NAME), then its primary-key columns. An update that moves
-- a row to another workspace or changes its key is logged as a delete of the old
-- row and an insert of the new one, so consumers keyed by (table, key) stay right.
-- SECURITY DEFINER: writers need no privileges on the change log.
CREATE FUNCTION raptorflow_data.capture_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    old_row jsonb;
    new_row jsonb;
    old_workspace text;
    new_workspace text;
    split boolean;
    key_column text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_row := to_jsonb(OLD);
        old_workspace := old_row ->> 'workspace_id';
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_row := to_jsonb(NEW);
        new_workspace := new_row ->> 'workspace_id';
    END IF;
    split := TG_OP = 'UPDATE' AND old_workspace IS DISTINCT FROM new_workspace;
    IF TG_OP = 'UPDATE' AND NOT split THEN
        FOREACH key_column IN ARRAY TG_ARGV[1:] LOOP
            IF old_row -> key_column IS DISTINCT FROM new_row -> key_column THEN
                split := true;
                EXIT;
            END IF;
        END LOOP;
    END IF;
    -- Rows without a workspace belong to no stream.
    IF old_workspace IS NOT NULL AND (TG_OP = 'DELETE' OR split) THEN
        INSERT INTO raptorflow_data.change_log
            (seq, xid, workspace_id, table_name, operation, row_data)
        VALUES (nextval('raptorflow_data.change_seq'), pg_current_xact_id(), old_workspace,
                TG_ARGV[0], 'D', old_row);
        IF octet_length(old_workspace) < 8000 THEN  -- NOTIFY's payload limit; polls cover the rest
            PERFORM pg_notify('raptorflow_data_changes', old_workspace);
        END IF;
    END IF;
    IF new_workspace IS NOT NULL AND TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO raptorflow_data.change_log
            (seq, xid, workspace_id, table_name, operation, row_data)
        VALUES (nextval('raptorflow_data.change_seq'), pg_current_xact_id(), new_workspace,
                TG_ARGV[0], CASE WHEN TG_OP = 'INSERT' OR split THEN 'I' ELSE 'U' END, new_row);
        -- NOTIFY folds identical payloads of one transaction into one.
        IF octet_length(new_workspace) < 8000 THEN
            PERFORM pg_notify('raptorflow_data_changes', new_workspace);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- The statement trigger before TRUNCATE: logs a delete of every row, so a
-- truncate reaches consumers like the deletes it stands for. TRUNCATE holds an
-- ACCESS EXCLUSIVE lock, so every earlier change of these rows is already logged.
CREATE FUNCTION raptorflow_data.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    workspace text;
BEGIN
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
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION raptorflow_data.capture_change() FROM PUBLIC;
REVOKE ALL ON FUNCTION raptorflow_data.capture_truncate() FROM PUBLIC;
