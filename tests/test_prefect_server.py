"""One Prefect server for everything (infra/prefect_server.py, prefect.toml): which API a command
uses, a CLI run that appears on the running server, the temporary server otherwise, the bare
`prefect` CLI of the checkout, and why a run failed (what `make run-deployment` prints)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.prefect_server import PrefectServerError, choose_api, local_api_url
from tests.prefect_fixtures import REPO_ROOT, _free_port

PREFECT = REPO_ROOT / ".venv" / "bin" / "prefect"


def _env_without_api(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def test_an_unanswering_prefect_api_url_is_an_error_naming_it(monkeypatch):
    dead = f"http://127.0.0.1:{_free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", dead)
    with pytest.raises(PrefectServerError, match=f"no Prefect server answers at {dead} \\(PREFECT_API_URL\\)"):
        choose_api()


def test_no_server_means_a_temporary_one(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("WITFLOW_PREFECT_PORT", str(_free_port()))
    assert choose_api() == (None, "a temporary server")


def test_the_running_server_is_found_and_an_explicit_url_wins(prefect_server, monkeypatch):
    prefect_server.wait_healthy()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("WITFLOW_PREFECT_PORT", str(prefect_server.port))
    assert choose_api() == (prefect_server.api_url, "the `make server` server")
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    assert choose_api() == (prefect_server.api_url, "PREFECT_API_URL")


def test_the_checkouts_bare_prefect_cli_talks_to_make_servers_address():
    done = subprocess.run([str(PREFECT), "config", "view", "--show-sources"], cwd=REPO_ROOT, env=_env_without_api(),
                          capture_output=True, text=True, timeout=300)
    assert f"PREFECT_API_URL='{local_api_url(4200)}' (from prefect.toml)" in done.stdout, done.stdout + done.stderr
    env_sh = (REPO_ROOT / "infra" / "prefect" / "env.sh").read_text()
    assert 'WITFLOW_PREFECT_PORT="${WITFLOW_PREFECT_PORT:-4200}"' in env_sh  # the port server.sh serves


def _export_argv(tmp_path: Path, sample_parquet: Path) -> list[str]:
    from tests.trainer_fixtures import sample_pairs, write_dataset

    manifest = write_dataset(tmp_path / "dataset", sample_pairs(sample_parquet, 6), 3)
    return [sys.executable, "-m", "flows.cli", "export", "--manifest", str(manifest), "--output",
            str(tmp_path / "wds"), "--set", "ray.num_cpus=1"]


async def _runs_named(flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with get_client() as client:
        return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


async def _logs_of(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        for _ in range(30):  # logs arrive in batches, a moment after the run ends
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any(log.name.startswith("tasks.") for log in logs):
                return logs
            await asyncio.sleep(1)
        return logs


@pytest.mark.slow
def test_a_cli_run_appears_on_the_running_server(prefect_api, tmp_path, sample_parquet):
    before = {r.id for r in asyncio.run(_runs_named("export_dataset"))}
    env = _env_without_api(WITFLOW_PREFECT_PORT=str(prefect_api.port), WITFLOW_LOG_DIR=str(tmp_path / "logs"))
    done = subprocess.run(_export_argv(tmp_path, sample_parquet), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"url={prefect_api.api_url} server=the `make server` server" in done.stderr
    assert "Starting temporary server" not in done.stderr
    (run,) = [r for r in asyncio.run(_runs_named("export_dataset")) if r.id not in before]
    assert run.state.is_completed()
    # witflow's own log lines reach the run's logs in the UI, with their fields.
    messages = [log.message for log in asyncio.run(_logs_of(run.id))]
    assert any(m.startswith("exported format=webdataset split=train samples=6 shards=2") for m in messages), messages


@pytest.mark.slow
def test_without_a_server_a_command_starts_one_temporary_server(tmp_path, sample_parquet):
    env = _env_without_api(WITFLOW_PREFECT_PORT=str(_free_port()), WITFLOW_LOG_DIR=str(tmp_path / "logs"),
                           PREFECT_HOME=str(tmp_path / "prefect_home"))
    done = subprocess.run(_export_argv(tmp_path, sample_parquet), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Starting temporary server") == 1 and "server=a temporary server" in done.stderr
    assert "Error logging to API" not in done.stderr  # its logs were sent before it stopped
    assert (tmp_path / "wds" / "sizes.json").is_file()


def test_why_a_run_failed_names_its_state_and_error(prefect_api):
    from prefect import flow, task

    @task(name="read-a-shard")
    def read_shard() -> None:
        raise FileNotFoundError("read s3://bucket/ds/shards/part-00007.parquet: no such object")

    @flow(name="failing-for-why")
    def failing() -> None:
        read_shard()

    state = failing(return_state=True)
    assert state.is_failed()
    done = subprocess.run([sys.executable, "-m", "infra.prefect_server", "why", str(state.state_details.flow_run_id)],
                          cwd=REPO_ROOT, env={**os.environ, "PREFECT_API_URL": prefect_api.api_url,
                                              "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first, *errors = done.stdout.strip().splitlines()
    assert " ended Failed: " in first and "part-00007.parquet: no such object" in first
    assert any("read s3://bucket/ds/shards/part-00007.parquet: no such object" in line for line in errors)
    assert not any(line.strip().startswith("Traceback") for line in errors)
