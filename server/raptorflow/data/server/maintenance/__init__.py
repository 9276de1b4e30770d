"""Maintenance: backups and restores, vacuum/analyze/reindex/retention, jobs and schedules."""
