"""Prefect plumbing: artifacts (visible in the UI) and per-shard progress, safe outside a flow run;
the one transient-error rule; flow runs whose process died without telling the API."""

from __future__ import annotations

import base64
import logging
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from infra.log import get_logger, log_event

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


# ------------------------------------------------------------------------------------------------
# Flow runs whose process died without telling the API
# ------------------------------------------------------------------------------------------------
#
# A flow run's final state is sent by the process running it. When that process is killed, or the
# API goes away under it (the run then fails on a refused connection and cannot report it), the API
# keeps the run Running for ever: Prefect marks runs crashed only for runs a worker's runner
# watches, by their heartbeats. So each witflow flow records its run and its process here
# (``track_flow_run``), and once the API answers again (a server (re)start, the next build) every
# recorded run whose process is gone and whose state is not final is set Crashed.

RUN_RECORDS = "witflow-runs"  # under PREFECT_HOME


def _run_records_dir() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / RUN_RECORDS


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def track_flow_run() -> None:
    """Record the current flow run and this process (no-op outside a flow run)."""
    from prefect.context import FlowRunContext

    from infra.lease import Holder

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    records = _run_records_dir()
    records.mkdir(parents=True, exist_ok=True)
    record = {"flow_run_id": str(ctx.flow_run.id), "name": ctx.flow_run.name, "api": _api_url(),
              "holder": asdict(Holder.me())}
    tmp = records / f".{ctx.flow_run.id}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, records / f"{ctx.flow_run.id}.json")


def crash_orphaned_runs_quietly() -> None:
    """:func:`crash_orphaned_runs` for a flow's start: a problem is logged, never raised."""
    try:
        crash_orphaned_runs()
    except Exception as e:  # noqa: BLE001 - bookkeeping of earlier runs must not stop this one
        log_event(log, "could not check for orphaned flow runs", 30, error=str(e))


def crash_orphaned_runs() -> list[str]:
    """Set Crashed every recorded flow run whose process is gone and whose state is not final; drop
    the records of processes that are gone. Returns the ids of the runs marked crashed."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    from infra.lease import Holder

    crashed: list[str] = []
    api = _api_url()
    paths = sorted(_run_records_dir().glob("*.json"))
    if not paths:
        return crashed
    with get_client(sync_client=True) as client:
        for path in paths:
            try:
                record = json.loads(path.read_text())
                holder = Holder(**record["holder"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # unreadable: nothing can be checked against it
                continue
            if record.get("api") != api or holder.alive() is not False:
                continue  # another server's run, or still running (or another machine's: not ours to judge)
            try:
                run = client.read_flow_run(record["flow_run_id"])
            except ObjectNotFound:  # deleted since
                run = None
            if run is not None and run.state is not None and not run.state.is_final():
                message = (f"the process running it (pid {holder.pid}) is gone without reporting an end: it was "
                           "killed, or lost the Prefect API")
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                crashed.append(str(run.id))
                log_event(log, "marked an orphaned flow run crashed", 30, run=str(run.id), name=record.get("name"),
                          pid=holder.pid)
            path.unlink(missing_ok=True)
    return crashed


if __name__ == "__main__":  # infra/prefect/server.sh, once the API answers
    import sys

    if sys.argv[1:] != ["crash-orphaned-runs"]:
        sys.exit("usage: python -m infra.prefect_utils crash-orphaned-runs")
    ids = crash_orphaned_runs()
    print(f"marked {len(ids)} orphaned flow run(s) crashed" + (f": {', '.join(ids)}" if ids else ""))
