"""Observability: the status view, Prometheus metrics, structured logs, the leak watchdog."""
