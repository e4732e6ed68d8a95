"""Logging and progress bars.

Logs are structured (``key=value`` pairs after the message, or JSON lines with
``WITFLOW_LOG_FORMAT=json``); progress bars show on a terminal and stay quiet otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


# The project's loggers (get_logger(__name__) in each package, "witflow.*" elsewhere): the ones
# Prefect is asked to send to the UI (PREFECT_LOGGING_EXTRA_LOGGERS) and deployed runs log at INFO.
PROJECT_LOGGERS = ("witflow", "infra", "tasks", "trainer", "flows")


class _KeyValueFormatter(logging.Formatter):
    def __init__(self, tracebacks: bool = True) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info and self.tracebacks:
            base += "\n" + self.formatException(record.exc_info)
        return base


class FieldsFormatter(logging.Formatter):
    """The message and its ``key=value`` fields, nothing else: for handlers that add their own time
    and level (the Prefect UI's run logs)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        text = record.getMessage()
        return text + (" " + " ".join(f"{k}={v}" for k, v in fields.items()) if fields else "")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"time": record.created, "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), **(getattr(record, "fields", None) or {})}
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, not the stream that was
    there at set-up (a replaced and closed stream would turn every later log line into an error)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def setup_logging(level: str | int = "INFO", fmt: str | None = None, *, tracebacks: bool = True,
                  log_file: str | os.PathLike | None = None) -> None:
    """Configure the root logger once (entrypoints only).

    ``tracebacks=False`` keeps tracebacks off the terminal (the error's own line stays); ``log_file``
    gets every record at ``level`` with its full traceback.
    """
    fmt = fmt or os.environ.get("WITFLOW_LOG_FORMAT", "text")
    handler = _StderrHandler()
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _KeyValueFormatter(tracebacks))
    handlers: list[logging.Handler] = [handler]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8", delay=True)  # created by the first record
        to_file.setFormatter(_KeyValueFormatter())
        handlers.append(to_file)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "botocore", "urllib3", "asyncio", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def log_event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: object) -> None:
    """Log ``message`` with structured ``fields``."""
    logger.log(level, message, extra={"fields": fields})


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A progress bar that shows on a terminal and is silent otherwise (CI, logs, Ray workers)."""
    disable = None if os.environ.get("WITFLOW_PROGRESS", "auto") == "auto" else os.environ["WITFLOW_PROGRESS"] == "0"
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True))
