"""Log output: text lines for people, or one JSON object per line for log collectors.

With `log_format` "json" every record is one line holding `time` (UTC, ISO
8601 with milliseconds), `level`, `logger` and `message`, then any fields the
call passed in `extra` (the RPC log line's `method`, `workspace`, `caller` (the
token's subject), `status`, `duration_ms`; the leak watchdog's `holder`,
`held_seconds`, `backend_pid`), and `exception` with the traceback when there
is one. The service logs no row
values: the RPC line names the workspace and never another request field.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(
    (*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime", "taskName")
)


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object on one line."""

    def __init__(self) -> None:
        super().__init__()
        # One encoder for every record: json.dumps with options builds a new one per call.
        # default=str: an extra that JSON cannot hold is written as its text.
        self._encoder = json.JSONEncoder(ensure_ascii=False, default=str)
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        # The server logs a line per call: the time text is reused within a second.
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, Any] = {
            "time": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for key in sorted(fields.keys() - _RECORD_ATTRIBUTES):
            entry.setdefault(key, fields[key])
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return self._encoder.encode(entry)


def setup(level: str, log_format: str) -> None:
    """Sends every log record to stderr in `log_format` ("text" or "json") from `level` up."""
    if log_format not in FORMATS:
        raise SystemExit(
            f"invalid RAPTORFLOW_LOG_FORMAT {log_format!r}: expected one of {', '.join(FORMATS)}"
        )
    root = logging.getLogger()
    if root.handlers:
        # Configured already, by an embedding application (or by pytest when tests
        # call the CLI): left alone, as logging.basicConfig would.
        return
    # The server logs a line per call, and neither format shows the caller's source
    # line, thread or process: not collecting them saves a fifth of a record's cost
    # (see "Optimization" in the logging HOWTO).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root.addHandler(handler)
    root.setLevel(level.upper())
