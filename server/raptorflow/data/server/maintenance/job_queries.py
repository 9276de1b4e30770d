"""SQL of the job history table and the schedule claims, and job rows as Job messages.

Every statement runs on the owner's job pool (`Database.job_pool`); the tables
and the NOTIFY trigger are created by migration 0004_jobs.sql. Times come from
the database's clock (`now()`), so replicas with skewed clocks agree on leases.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg
from raptorflow.data.v1 import job_pb2

# The NOTIFY channel of job changes; the payload is the job's id.
CHANNEL = "raptorflow_jobs"

STATE_NAMES: Mapping[int, str] = {
    job_pb2.JOB_STATE_QUEUED: "QUEUED",
    job_pb2.JOB_STATE_RUNNING: "RUNNING",
    job_pb2.JOB_STATE_SUCCEEDED: "SUCCEEDED",
    job_pb2.JOB_STATE_FAILED: "FAILED",
    job_pb2.JOB_STATE_CANCELLED: "CANCELLED",
}
STATES_BY_NAME: Mapping[str, job_pb2.JobState.ValueType] = {
    name: job_pb2.JobState.ValueType(number) for number, name in STATE_NAMES.items()
}
OPEN_STATES = frozenset({job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING})

_JOB_COLUMNS = """id, spec, state, schedule, phase, done, total, unit, result,
    error_code, error_reason, error_message, created_at, started_at, ended_at, replica,
    cancel_requested"""

INSERT_JOB = f"""
INSERT INTO raptorflow_data.jobs
    (id, kind, spec, state, schedule, period_start, replica, lease_expires_at)
VALUES ($1, $2, $3, 'QUEUED', $4, $5, $6, now() + make_interval(secs => $7))
RETURNING {_JOB_COLUMNS}
"""

# In the transaction of INSERT_JOB: no row back means another replica has the period.
CLAIM_PERIOD = """
INSERT INTO raptorflow_data.schedule_claims (schedule, period_start, job_id, replica)
VALUES ($1, $2, $3, $4)
ON CONFLICT (schedule, period_start) DO NOTHING
RETURNING job_id
"""

START_JOB = """
UPDATE raptorflow_data.jobs
SET state = 'RUNNING', started_at = now(), updated_at = now(),
    lease_expires_at = now() + make_interval(secs => $3)
WHERE id = $1 AND replica = $2 AND state = 'QUEUED'
RETURNING spec
"""

REPORT_PROGRESS = """
UPDATE raptorflow_data.jobs
SET phase = $2, done = $3, total = $4, unit = $5, updated_at = now()
WHERE id = $1 AND state = 'RUNNING'
"""

# Only while the job is still this replica's and open: a job whose lease another
# replica expired keeps the FAILED state it was given, a job cancelled while queued
# its CANCELLED. QUEUED rows are this replica's dispatched jobs whose START_JOB
# never committed (cancelled at shutdown, or it failed): they end here too rather
# than stay QUEUED, run by nobody, until their lease runs out.
FINISH_JOB = """
UPDATE raptorflow_data.jobs
SET state = $3, result = $4, error_code = $5, error_reason = $6, error_message = $7,
    phase = $8, done = $9, total = $10, unit = $11,
    ended_at = now(), updated_at = now(), lease_expires_at = NULL
WHERE id = $1 AND replica = $2 AND state IN ('QUEUED', 'RUNNING')
RETURNING kind, schedule
"""

# A replica renews the leases of the jobs it holds (queued or running), and
# learns in the same round trip which of them were cancelled or taken from it.
RENEW_LEASES = """
UPDATE raptorflow_data.jobs
SET lease_expires_at = now() + make_interval(secs => $3)
WHERE id = ANY($1::uuid[]) AND replica = $2 AND state IN ('QUEUED', 'RUNNING')
RETURNING id, state, replica, cancel_requested
"""

CONTROL_READ = """
SELECT id, state, replica, cancel_requested FROM raptorflow_data.jobs
WHERE id = ANY($1::uuid[])
"""

# In UPDATE ... SET, `state` and `replica` are the row's values before the update.
EXPIRE_LEASES = """
UPDATE raptorflow_data.jobs
SET state = 'FAILED', ended_at = now(), updated_at = now(), lease_expires_at = NULL,
    error_code = 'UNAVAILABLE', error_reason = 'LEASE_EXPIRED',
    error_message = format(
        'replica %s stopped renewing the lease of the job while it was %s'
        ' (the replica stopped or lost the database)',
        replica, lower(state))
WHERE state IN ('QUEUED', 'RUNNING') AND lease_expires_at < now()
RETURNING id, replica, kind, schedule
"""

# A replica that stops ends the jobs it still holds queued (or dispatched, when
# their START_JOB never committed).
FAIL_QUEUED = """
UPDATE raptorflow_data.jobs
SET state = 'FAILED', ended_at = now(), updated_at = now(), lease_expires_at = NULL,
    error_code = 'UNAVAILABLE', error_reason = 'SERVER_STOPPING',
    error_message = 'replica ' || replica || ' stopped before the job could start'
WHERE id = ANY($1::uuid[]) AND replica = $2 AND state = 'QUEUED'
RETURNING kind, schedule
"""

PRUNE_JOBS = """
DELETE FROM raptorflow_data.jobs
WHERE id IN (
    SELECT id FROM raptorflow_data.jobs
    WHERE ended_at < now() - make_interval(secs => $1)
    LIMIT $2
)
"""

# The latest claim of each schedule is kept whatever its age: it is what stops
# a replica from running that period again.
PRUNE_CLAIMS = """
DELETE FROM raptorflow_data.schedule_claims AS claim
WHERE claim.claimed_at < now() - make_interval(secs => $1)
  AND EXISTS (
    SELECT 1 FROM raptorflow_data.schedule_claims AS later
    WHERE later.schedule = claim.schedule AND later.period_start > claim.period_start
  )
"""

# A queued job ends at once; a running one is stopped by its replica, which
# sees cancel_requested through the NOTIFY (or its next lease renewal).
CANCEL_JOB = f"""
UPDATE raptorflow_data.jobs
SET cancel_requested = true,
    updated_at = now(),
    state = CASE WHEN state = 'QUEUED' THEN 'CANCELLED' ELSE state END,
    ended_at = CASE WHEN state = 'QUEUED' THEN now() ELSE ended_at END,
    lease_expires_at = CASE WHEN state = 'QUEUED' THEN NULL ELSE lease_expires_at END,
    error_code = CASE WHEN state = 'QUEUED' THEN 'CANCELLED' ELSE error_code END,
    error_reason = CASE WHEN state = 'QUEUED' THEN 'CANCELLED' ELSE error_reason END,
    error_message = CASE WHEN state = 'QUEUED' THEN 'cancelled by CancelJob before it started'
                         ELSE error_message END
WHERE id = $1 AND state IN ('QUEUED', 'RUNNING')
RETURNING {_JOB_COLUMNS}
"""

GET_JOB = f"SELECT {_JOB_COLUMNS} FROM raptorflow_data.jobs WHERE id = $1"

# $1: states (NULL for all), $2: schedule ('' for all), $3/$4: the keyset of the
# last job of the previous page (NULL on the first page), $5: the limit.
LIST_JOBS = f"""
SELECT {_JOB_COLUMNS} FROM raptorflow_data.jobs
WHERE ($1::text[] IS NULL OR state = ANY($1::text[]))
  AND ($2 = '' OR schedule = $2)
  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3::timestamptz, $4::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $5
"""

# A job in one of these states has ended: a finished run of its schedule.
_ENDED = "state IN ('SUCCEEDED', 'FAILED', 'CANCELLED')"

SCHEDULE_COUNTS = f"""
SELECT schedule,
       count(*) FILTER (WHERE {_ENDED}) AS runs,
       count(*) FILTER (WHERE state = 'SUCCEEDED') AS succeeded
FROM raptorflow_data.jobs
WHERE schedule = ANY($1::text[])
GROUP BY schedule
"""


def _latest_scheduled_jobs(condition: str) -> str:
    """The newest job of each schedule in $1 that meets `condition`."""
    return f"""
SELECT DISTINCT ON (schedule) {_JOB_COLUMNS} FROM raptorflow_data.jobs
WHERE schedule = ANY($1::text[]) AND {condition}
ORDER BY schedule, created_at DESC, id DESC
"""


LATEST_SCHEDULED_JOBS = _latest_scheduled_jobs("true")
LATEST_FINISHED_SCHEDULED_JOBS = _latest_scheduled_jobs(_ENDED)


def job_from_row(row: asyncpg.Record) -> job_pb2.Job:
    """The Job message of a row selected with the job columns."""
    job = job_pb2.Job(
        job_id=str(row["id"]),
        state=STATES_BY_NAME[row["state"]],
        schedule=row["schedule"],
        progress=job_pb2.JobProgress(
            phase=row["phase"],
            done=row["done"],
            total=row["total"],
            unit=job_pb2.ProgressUnit.ValueType(row["unit"]),
        ),
        replica=row["replica"],
        cancel_requested=row["cancel_requested"],
    )
    job.spec.ParseFromString(row["spec"])
    if row["result"] is not None:
        job.result.ParseFromString(row["result"])
    if row["error_code"] is not None:
        job.error.code = row["error_code"]
        job.error.reason = row["error_reason"] or ""
        job.error.message = row["error_message"] or ""
    job.create_time.FromDatetime(row["created_at"])
    if row["started_at"] is not None:
        job.start_time.FromDatetime(row["started_at"])
    if row["ended_at"] is not None:
        job.end_time.FromDatetime(row["ended_at"])
    return job
