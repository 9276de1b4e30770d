"""Real infrastructure on loopback that the tests and the benchmarks share.

`tcp_proxy.TcpProxy` stands between a server and PostgreSQL and can be cut and
restored (a real network failure, not a mock); `pgbouncer.PgBouncer` runs a real
PgBouncer in transaction pooling mode with its own configuration and port. Both
are imported by `tests/` (pytest puts the repository root on `sys.path`) and by
`bench/` (run as `python -m bench...` from the root), so neither keeps a copy.
"""
