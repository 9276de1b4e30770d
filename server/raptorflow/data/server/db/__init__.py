"""The database edge: connections, migrations, catalog, SQL compiler and value conversion.

Nothing in this package imports grpc; errors leave it as `errors.ServiceError`
or asyncpg exceptions, and the servicer edge maps both.
"""
