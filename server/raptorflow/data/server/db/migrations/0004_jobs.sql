-- Maintenance jobs (MaintenanceService.StartJob and the scheduler): the job
-- history table and the claims of scheduled periods. Only the owner role reads
-- and writes them (migrations.provision_app_role revokes the app role's grants);
-- see maintenance/jobs.py for the life of a job and its lease.

CREATE TABLE raptorflow_data.jobs (
    id uuid PRIMARY KEY,
    -- The JobSpec's kind (its oneof field name), for people reading the table.
    kind text NOT NULL,
    -- The serialized raptorflow.data.v1.JobSpec.
    spec bytea NOT NULL,
    state text NOT NULL CONSTRAINT jobs_state
        CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    -- The schedule that started the job; '' for StartJob.
    schedule text NOT NULL DEFAULT '',
    -- The scheduled period the job runs for; NULL for StartJob.
    period_start timestamptz,
    phase text NOT NULL DEFAULT '',
    done bigint NOT NULL DEFAULT 0,
    total bigint NOT NULL DEFAULT 0,
    -- raptorflow.data.v1.ProgressUnit's number.
    unit smallint NOT NULL DEFAULT 0,
    -- The serialized raptorflow.data.v1.JobResult, once the job SUCCEEDED.
    result bytea,
    error_code text,
    error_reason text,
    error_message text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    ended_at timestamptz,
    -- The replica that accepted the job and runs it.
    replica text NOT NULL,
    -- While the job is QUEUED or RUNNING (on the database's clock): its replica
    -- renews it; once it is past, any replica marks the job FAILED (LEASE_EXPIRED).
    lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT jobs_open_has_lease CHECK (
        (state IN ('QUEUED', 'RUNNING')) = (lease_expires_at IS NOT NULL)
    )
);
-- ListJobs pages newest first on (created_at, id), all jobs or one schedule's.
CREATE INDEX jobs_created ON raptorflow_data.jobs (created_at DESC, id DESC);
CREATE INDEX jobs_schedule_created ON raptorflow_data.jobs (schedule, created_at DESC, id DESC)
    WHERE schedule <> '';
-- The sweeper's scan for expired leases, among open jobs only.
CREATE INDEX jobs_lease ON raptorflow_data.jobs (lease_expires_at)
    WHERE state IN ('QUEUED', 'RUNNING');
-- Pruning of the history.
CREATE INDEX jobs_ended ON raptorflow_data.jobs (ended_at) WHERE ended_at IS NOT NULL;

-- One row per scheduled period that some replica claimed, written in the same
-- transaction as the job it started, so each period runs once however many
-- replicas serve the database, and a claim never exists without its job. Not
-- a foreign key: the claim outlives the job's pruning, so a pruned period can
-- never be claimed again.
CREATE TABLE raptorflow_data.schedule_claims (
    schedule text NOT NULL,
    period_start timestamptz NOT NULL,
    job_id uuid NOT NULL,
    replica text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, period_start)
);

-- Every visible change of a job (state, progress, cancellation) wakes the
-- replicas' watchers and runners; the payload is the job's id. Sent by a
-- trigger, so it is always in the transaction of the change; lease renewals
-- change nothing a watcher sees and send nothing.
CREATE FUNCTION raptorflow_data.notify_job_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('raptorflow_jobs', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_insert AFTER INSERT ON raptorflow_data.jobs
    FOR EACH ROW EXECUTE FUNCTION raptorflow_data.notify_job_change();
CREATE TRIGGER jobs_notify_update AFTER UPDATE ON raptorflow_data.jobs
    FOR EACH ROW
    WHEN ((OLD.state, OLD.phase, OLD.done, OLD.total, OLD.unit, OLD.cancel_requested)
          IS DISTINCT FROM
          (NEW.state, NEW.phase, NEW.done, NEW.total, NEW.unit, NEW.cancel_requested))
    EXECUTE FUNCTION raptorflow_data.notify_job_change();
