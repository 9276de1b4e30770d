"""Sync streams: snapshots, the change log and its readers, resume tokens, consumers."""
