"""Allows `python -m raptorflow.data.server`."""

from raptorflow.data.server.cli import main

raise SystemExit(main())
