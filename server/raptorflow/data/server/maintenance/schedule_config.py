"""Schedules as configured (`Settings.schedules`), checked whole, and their periods in time.

The setting is JSON, or `@path` naming a file that holds it:

    [{"name": "nightly-vacuum", "cron": "0 3 * * *", "job": {"vacuum": {"analyze": true}}},
     {"name": "analyze", "interval_seconds": 600, "job": {"analyze": {}}}]

A period is the time one run is for. A cron schedule's periods are its fire
times (five fields, UTC, as the `cronsim` library reads them); an interval
schedule's are the multiples of the interval since the Unix epoch, so every
replica computes the same periods without talking to the others.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from cronsim import CronSim, CronSimError
from google.protobuf import json_format
from raptorflow.data.server.config import setting_document
from raptorflow.data.v1 import job_pb2

UTC = datetime.UTC
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = datetime.timedelta(seconds=1)
_MICROSECOND = datetime.timedelta(microseconds=1)
MIN_INTERVAL_SECONDS = 1.0
MAX_INTERVAL_SECONDS = 36_525 * 86_400.0
"""100 years: far beyond any real schedule, and far enough from `datetime`'s year 9999 that
every period's next run can be computed (a longer interval used to overflow there)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_KEYS = frozenset({"name", "cron", "interval_seconds", "job"})


class ScheduleConfigError(ValueError):
    """The schedules setting cannot be used; the message says which entry and why."""


@dataclass(frozen=True)
class ScheduleConfig:
    """One configured schedule."""

    name: str
    spec: job_pb2.JobSpec
    cron: str = ""
    """Five-field cron expression in UTC; empty for an interval schedule."""
    interval_seconds: float = 0.0

    @property
    def _interval_micros(self) -> int:
        return round(self.interval_seconds * 1_000_000)

    def latest_period(self, now: datetime.datetime) -> datetime.datetime | None:
        """The start of the latest period that has begun at `now` (None: no fire time yet,
        or none `datetime` can hold)."""
        if not self.cron:
            # Integer microseconds, so every replica gets the very same instant.
            micros = (now - _EPOCH) // _MICROSECOND
            return _EPOCH + _MICROSECOND * (micros // self._interval_micros * self._interval_micros)
        # Iterating backwards from one second after `now` (whole seconds) yields
        # the latest fire time at or before `now` first.
        try:
            start = now.astimezone(UTC).replace(microsecond=0) + _SECOND
            return next(CronSim(self.cron, start, reverse=True))
        except (StopIteration, OverflowError):
            return None

    def next_run(self, now: datetime.datetime) -> datetime.datetime | None:
        """When the next period after `now` begins (None: never again, or not before the
        end of `datetime`'s range, year 9999)."""
        try:
            if not self.cron:
                latest = self.latest_period(now)
                assert latest is not None
                return latest + _MICROSECOND * self._interval_micros
            return next(CronSim(self.cron, now.astimezone(UTC).replace(microsecond=0)))
        except (StopIteration, OverflowError):
            return None


def load_schedules(setting: str) -> list[ScheduleConfig]:
    """The schedules of the setting (JSON, or @file); ScheduleConfigError if unusable."""
    if not setting.strip():
        return []
    try:
        text = setting_document(setting)
    except (OSError, UnicodeDecodeError) as exc:
        path = setting.strip()[1:]
        raise ScheduleConfigError(f"cannot read the schedules file {path}: {exc}") from exc
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScheduleConfigError(f"the schedules are not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise ScheduleConfigError("the schedules must be a JSON array of objects")
    schedules = [_parse_entry(i, entry) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for schedule in schedules:
        if schedule.name in seen:
            raise ScheduleConfigError(f"schedule name {schedule.name!r} is used twice")
        seen.add(schedule.name)
    return schedules


def _parse_entry(index: int, entry: Any) -> ScheduleConfig:
    where = f"schedule #{index + 1}"
    if not isinstance(entry, dict):
        raise ScheduleConfigError(f"{where}: must be a JSON object")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ScheduleConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScheduleConfigError(
            f"{where}: 'name' must be 1 to 100 letters, digits, '_', '.' or '-'"
            " (starting with a letter or digit)"
        )
    where = f"schedule {name!r}"
    has_cron, has_interval = "cron" in entry, "interval_seconds" in entry
    if has_cron == has_interval:
        raise ScheduleConfigError(f"{where}: give exactly one of 'cron' and 'interval_seconds'")
    spec = _parse_spec(where, entry.get("job"))
    if has_cron:
        schedule = ScheduleConfig(name, spec, cron=_parse_cron(where, entry["cron"]))
    else:
        interval = _parse_interval(where, entry["interval_seconds"])
        schedule = ScheduleConfig(name, spec, interval_seconds=interval)
    # What ListSchedules and the status view show for it must be computable, now.
    if schedule.next_run(datetime.datetime.now(UTC)) is None:
        raise ScheduleConfigError(f"{where}: has no next run time")
    return schedule


def _parse_cron(where: str, cron: Any) -> str:
    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise ScheduleConfigError(
            f"{where}: 'cron' must be five fields (minute hour day-of-month month day-of-week)"
        )
    expression = " ".join(cron.split())
    try:
        next(CronSim(expression, datetime.datetime.now(UTC)))
    except CronSimError as exc:
        raise ScheduleConfigError(f"{where}: bad cron expression {cron!r}: {exc}") from exc
    except StopIteration:
        raise ScheduleConfigError(f"{where}: cron expression {cron!r} never fires") from None
    return expression


def _parse_interval(where: str, interval: Any) -> float:
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not math.isfinite(interval)
        or not MIN_INTERVAL_SECONDS <= interval <= MAX_INTERVAL_SECONDS
    ):
        raise ScheduleConfigError(
            f"{where}: 'interval_seconds' must be a number from {MIN_INTERVAL_SECONDS:g}"
            f" to {MAX_INTERVAL_SECONDS:.0f} (100 years)"
        )
    return float(interval)


def _parse_spec(where: str, job: Any) -> job_pb2.JobSpec:
    if not isinstance(job, dict):
        raise ScheduleConfigError(f"{where}: 'job' must be a JobSpec as a JSON object")
    spec = job_pb2.JobSpec()
    try:
        json_format.ParseDict(job, spec)
    except json_format.ParseError as exc:
        raise ScheduleConfigError(f"{where}: 'job' is not a JobSpec: {exc}") from exc
    if spec.WhichOneof("kind") is None:
        raise ScheduleConfigError(
            f"{where}: 'job' must name one kind (vacuum, analyze, reindex, retention_cleanup,"
            " backup_to_file, restore_from_file)"
        )
    return spec
