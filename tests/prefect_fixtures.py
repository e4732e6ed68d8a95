"""A real Prefect API server for the session: `infra/prefect/server.sh --no-ui` (the script a user
runs) on a free loopback port with a temporary PREFECT_HOME. Tests that run flows in this process use
`prefect_api`; tests that run `witflow` subprocesses point PREFECT_API_URL at `prefect_server.api_url`
(one server for the session instead of an ephemeral one per run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "infra" / "prefect"
SERVER_START_TIMEOUT_S = 240  # a deadline, not an assertion: a busy 2-core machine starts it slowly


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_env(port: int, prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(WITFLOW_PREFECT_PORT=str(port), PREFECT_HOME=str(prefect_home), WITFLOW_HOME=str(REPO_ROOT), **extra)
    return env


class _Server:
    def __init__(self, port: int, home: Path, proc: subprocess.Popen, log_path: Path) -> None:
        self.port, self.home, self.proc, self.log_path = port, home, proc, log_path
        self.api_url = f"http://127.0.0.1:{port}/api"

    def wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prefect server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT_S}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "".join(deque(self.log_path.open(errors="replace"), maxlen=40))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Any:
    """`infra/prefect/server.sh --no-ui` started now; waiting for it is `prefect_api`'s job, so Ray
    and the test data get ready while the server starts."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    log_path = home / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(SCRIPTS / "server.sh"), "--no-ui"], env=_script_env(port, home),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = _Server(port, home, proc, log_path)
    yield server
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def prefect_api(prefect_server) -> Any:
    """This process's Prefect client settings pointed at the session server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    prefect_server.wait_healthy()
    # Persisted results go beside the temporary server's database, not into the shared PREFECT_HOME.
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url,
                                     PREFECT_LOCAL_STORAGE_PATH: prefect_server.home / "storage"}):
        yield prefect_server
        _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send the logs and events still buffered in this process while the server is up; otherwise
    Prefect retries them against a stopped server at interpreter exit (minutes of connection errors)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())
