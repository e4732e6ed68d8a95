"""Prefect plumbing: artifacts (visible in the UI) and per-shard progress, safe outside a flow run."""

from __future__ import annotations

import base64
import logging
from typing import Any

from infra.log import get_logger

log = get_logger(__name__)


_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient_error(exc: BaseException) -> bool:
    """The one rule for "a retry may help": timeouts, connection errors and other I/O errors, but
    not a missing file, a permission or a storage failure that is not of a passing kind."""
    transient = getattr(exc, "transient", None)  # infra.storage.StorageError says which it was
    if isinstance(transient, bool):
        return transient
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, (TimeoutError, ConnectionError, OSError))


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when it failed with a transient error."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - classified, not handled
        return is_transient_error(e)
    return False


def show_log_fields(logger_names: tuple[str, ...]) -> None:
    """Send these loggers' ``key=value`` fields to the UI with their messages (Prefect's API handler
    formats a record as its bare message). Call once Prefect is imported (its logging set up)."""
    from prefect.logging.handlers import APILogHandler

    from infra.log import FieldsFormatter

    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, APILogHandler):
                handler.setFormatter(FieldsFormatter())


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _key(key: str) -> str:
    # Artifact keys: lower-case letters, numbers and dashes only.
    return "".join(c if c.isalnum() else "-" for c in key.lower()).strip("-")


def publish_markdown(key: str, markdown: str, description: str | None = None) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key=_key(key), description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str | None = None) -> None:
    if not in_prefect_run() or not rows:
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(table=rows, key=_key(key), description=description)


def publish_image(key: str, png: bytes, description: str | None = None) -> None:
    """A PNG plot as a markdown artifact (inline, so it shows without a public image URL)."""
    if not in_prefect_run():
        return
    publish_markdown(key, image_markdown(key, png), description)


class ShardProgress:
    """A progress artifact in the Prefect UI, updated as shards finish (no-op outside a run)."""

    def __init__(self, description: str) -> None:
        self.artifact_id = None
        if in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(progress=0.0, description=description)

    def __call__(self, done: int, total: int) -> None:
        if self.artifact_id is None or total == 0:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(artifact_id=self.artifact_id, progress=100.0 * done / total)
        except Exception as e:  # noqa: BLE001 - progress is cosmetic; never fail a build over it
            log.debug("progress artifact update failed: %s", e)


def image_markdown(key: str, png: bytes) -> str:
    """A PNG inline in markdown (the UI shows it without a public image URL)."""
    return f"![{key}](data:image/png;base64,{base64.b64encode(png).decode()})"


class LiveMarkdown:
    """A markdown artifact created in a run and then rewritten in place (a plot that follows a
    training); create it where the run's context is, update it from any thread. No-op outside a run."""

    def __init__(self, key: str, markdown: str, description: str | None = None) -> None:
        self.artifact_id = None
        if in_prefect_run():
            from prefect.artifacts import create_markdown_artifact

            self.artifact_id = create_markdown_artifact(markdown=markdown, key=_key(key), description=description)

    def update(self, markdown: str) -> None:
        if self.artifact_id is None:
            return
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        try:
            get_client(sync_client=True).update_artifact(self.artifact_id, ArtifactUpdate(data=markdown))
        except Exception as e:  # noqa: BLE001 - cosmetic; never fail a run over it
            log.debug("artifact update failed: %s", e)
