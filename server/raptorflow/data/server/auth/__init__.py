"""Who may call what: bearer tokens (tokens.py), the per-method rules (policy.py), the
interceptor that applies them to every call (interceptor.py) and TLS for the port (tls.py)."""
