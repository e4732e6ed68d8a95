"""One Prefect server for everything: which API a command talks to.

1. ``PREFECT_API_URL`` when it is set in the environment (it must answer);
2. else the server ``make server`` runs (``infra/prefect/server.sh``: 127.0.0.1 on
   ``$WITFLOW_PREFECT_PORT``, 4200 by default), when it answers, so CLI runs appear in its UI;
3. else a temporary server started once for the command and stopped at its end (Prefect's
   ephemeral server, with its database under ``~/.prefect`` as before).

The choice is exported as ``PREFECT_API_URL`` before Prefect is imported, so the command's
subprocesses (torchrun ranks, Ray workers) use the same server. ``prefect.toml`` in the checkout
points the venv's bare ``prefect`` CLI at the same default address.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Iterator

DEFAULT_PORT = 4200  # infra/prefect/env.sh's WITFLOW_PREFECT_PORT default; prefect.toml names it too


class PrefectServerError(RuntimeError):
    """The configured Prefect API does not answer; the message names its URL."""


def local_api_url(port: int | str | None = None) -> str:
    """The API of the server ``make server`` starts on this machine."""
    return f"http://127.0.0.1:{port or os.environ.get('WITFLOW_PREFECT_PORT') or DEFAULT_PORT}/api"


def api_answers(api_url: str, timeout_s: float = 2.0) -> bool:
    """Whether a Prefect API answers ``/health`` at ``api_url``."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def choose_api() -> tuple[str | None, str]:
    """(API URL, where it comes from) without starting anything; None: a temporary server is needed."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        if not api_answers(configured):
            raise PrefectServerError(f"no Prefect server answers at {configured} (PREFECT_API_URL): start it "
                                     "(`make server`) or unset PREFECT_API_URL for a temporary one")
        return configured, "PREFECT_API_URL"
    local = local_api_url()
    if api_answers(local):
        return local, "the `make server` server"
    return None, "a temporary server"


@contextlib.contextmanager
def prefect_api() -> Iterator[tuple[str, str]]:
    """Export the API this command uses (see the module docstring); yields (URL, where it comes from)."""
    url, origin = choose_api()
    previous = os.environ.get("PREFECT_API_URL")
    server = None
    if url is None:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
        url = server.api_url
    os.environ["PREFECT_API_URL"] = url
    try:
        if "prefect.settings" not in sys.modules:
            yield url, origin
        else:
            # Prefect is imported (to start the server, or by the caller): its settings are loaded already.
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url, origin
    finally:
        if server is not None:
            drain_to_api()  # while the server is up; at exit Prefect would retry a stopped one for minutes
            server.stop()
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def drain_to_api() -> None:
    """Send the log records and events this process still buffers for the Prefect API."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for result in (_started_drain(APILogWorker), EventsWorker.drain_all()):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


def _started_drain(worker: Any) -> Any:
    try:
        return worker.instance().drain()
    except RuntimeError:  # never started in this process
        return None


def failure_reason(flow_run_id: str, max_lines: int = 8) -> str:
    """Why a flow run did not complete: its final state and message, then the first line of each of
    its last ERROR/CRITICAL log records (its tasks' and subflows' too), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        LogFilterLevel,
    )
    from prefect.client.schemas.sorting import LogSort
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read() -> str:
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            logs = await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[run.id, *(c.id for c in children)]),
                level=LogFilterLevel(ge_=40)), sort=LogSort.TIMESTAMP_DESC, limit=max_lines)
        state = run.state
        lines = [f"flow run {run.name!r} ({run.id}) ended {state.name if state else 'without a state'}"
                 + (f": {state.message}" if state and state.message else "")]
        lines += [f"  {log.message.strip().splitlines()[0][:300]}" for log in reversed(logs) if log.message.strip()]
        return "\n".join(lines)

    return run_coro_as_sync(read())


def main(argv: list[str] | None = None) -> int:
    """``python -m infra.prefect_server why FLOW_RUN_ID``: print why a flow run failed."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "why":
        print("usage: python -m infra.prefect_server why FLOW_RUN_ID", file=sys.stderr)
        return 2
    print(failure_reason(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
