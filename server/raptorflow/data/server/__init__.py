"""RaptorFlow Data server: the gRPC service that owns the PostgreSQL pool."""
