"""A worker's log: readable text by default, or one JSON object per line
(``ARBITER_LOG_FORMAT=json``) for log pipelines.

Every record emitted while a proposal is being answered carries who it is about (run kind,
run id, proposal id) and its trace id (``worker/tracing.py``); the decision line adds the
status and the rules that acted. Text lines end with ``[trace <id>]`` when there is one.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Final, Literal

from arbiter.worker import tracing

__all__ = ["JsonFormatter", "ProposalFields", "TextFormatter", "configure_logging"]

# Record attributes a JSON line carries when they are set, in this order.
FIELDS: Final = ("run_kind", "run_id", "proposal_id", "trace_id", "status", "rules")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


class ProposalFields(logging.Filter):
    """Stamps each record with the identity and trace of the proposal being answered in the
    current task (fields passed with ``extra=`` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in tracing.attributes(tracing.current.get()).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{line} [trace {trace_id}]" if trace_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, RFC 3339), level, logger, process, message, the
    proposal's fields when known, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(
    level: str | int, log_format: Literal["text", "json"], stream: IO[str] | None = None
) -> logging.Handler:
    """The root logger's one handler (replacing any), writing to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ProposalFields())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
