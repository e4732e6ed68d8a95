"""infra/prefect/server.sh in the background (issue 16 #13): a log file, a stale PID file recovered
from, a clean stop; and a flow run whose process died without telling the API (killed, or the API
went away under it) is marked Crashed once the server is back, not left Running for ever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.prefect_fixtures import SCRIPTS, SERVER_START_TIMEOUT_S, _free_port, _script_env
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _script(env: dict, *args: str, timeout: float = SERVER_START_TIMEOUT_S + 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / "server.sh"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _listener(port: int) -> psutil.Process | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def _wait_closed(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _listener(port) is not None:
        assert time.monotonic() < deadline, f"port {port} still served"
        time.sleep(0.2)


def test_background_server_logs_to_a_file_recovers_from_a_stale_pid_and_stops(tmp_path: Path) -> None:
    port, home = _free_port(), tmp_path / "home"
    env = _script_env(port, home, WITFLOW_PREFECT_WAIT_S=str(SERVER_START_TIMEOUT_S))
    started = _script(env, "--background", "--no-ui")
    assert started.returncode == 0, started.stdout + started.stderr
    log = home / "server.log"
    assert log.is_file() and f":{port}" in log.read_text(), "the background server writes its output to a log"
    server = _listener(port)
    assert server is not None
    server.kill()  # the server dies under its PID file
    _wait_closed(port)
    again = _script(env, "--background", "--no-ui")
    assert again.returncode == 0, again.stdout + again.stderr  # the stale PID file does not block a restart
    assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200
    stopped = _script(env, "stop", timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    _wait_closed(port)
    assert not list(home.glob("*.pid")), "stop leaves no PID file behind"


_TRACKED_FLOW = """
import time
from prefect import flow
from infra.prefect_utils import track_flow_run

@flow(name="tracked")
def tracked():
    track_flow_run()
    print("running", flush=True)
    time.sleep(600)

tracked()
"""


def test_a_run_whose_process_lost_the_api_is_marked_crashed_when_the_server_is_back(tmp_path: Path) -> None:
    port, home = _free_port(), tmp_path / "home"
    env = _script_env(port, home, WITFLOW_PREFECT_WAIT_S=str(SERVER_START_TIMEOUT_S))
    assert _script(env, "--background", "--no-ui").returncode == 0
    api = f"http://127.0.0.1:{port}/api"
    flow_env = {**env, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, "-c", _TRACKED_FLOW], cwd=REPO_ROOT, env=flow_env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert run.stdout.readline().strip() == "running"
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert [r["state"]["type"] for r in runs] == ["RUNNING"]
        _listener(port).kill()  # the API goes away mid-run...
        _wait_closed(port)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # ...and the run's process ends without telling it
        run.wait()
    try:
        assert _script(env, "--background", "--no-ui").returncode == 0  # the server is back
        (state,) = [r["state"] for r in httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()]
        assert state["type"] == "CRASHED", state
        assert f"pid {run.pid}" in state["message"]
    finally:
        _script(env, "stop", timeout=60)
