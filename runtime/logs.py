"""Logging for the runtime's entry points (`kubellm serve`, `kubellm generate`, a
tensor-parallel worker process); library code only creates loggers.

`text` is one line per record; `json` is one JSON object per line (time, level,
logger, message, and the record's `request_id` where it has one, as access lines do),
for cluster log pipelines.
"""

from __future__ import annotations

import json
import logging
import time

LEVELS = ("critical", "error", "warning", "info", "debug")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """One handler on the root logger: every record printed once, at `level` and above."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
