"""Build → train without a combined flow: the ``train`` deployment's event trigger (prefect.yaml)
fires when a ``build-dataset`` deployment run completes, with the build's manifest URI, config path
and overrides as its parameters. Everything runs against the session's real Prefect server
(infra/prefect/server.sh): `deploy.sh` registers the deployments and their automation, the build
run executes as a worker would execute it (`prefect flow-run execute`), and the server's trigger
and action services create the training run.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from infra.config import dump_config
from tests.prefect_fixtures import REPO_ROOT, SCRIPTS, _script_env
from tests.test_flows import _tiny_config

TRIGGER_DEADLINE_S = 120  # a deadline for the server's services, not an assertion about speed


async def _deployments() -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return {d.name: d for d in await client.read_deployments()}


async def _automation(name: str) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        (automation,) = await client.read_automations_by_name(name)
        return automation


async def _start_build(deployment_id: Any, parameters: dict) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)


async def _runs_of(deployment_id: Any, deadline_s: float) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        deadline = time.monotonic() + deadline_s
        while True:
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            if runs or time.monotonic() > deadline:
                return runs
            await asyncio.sleep(1)


async def _delete_runs(ids: list[Any]) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for flow_run_id in ids:
            await client.delete_flow_run(flow_run_id)


async def _flow_run(flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


@pytest.mark.slow
def test_a_completed_build_dataset_run_triggers_training_on_its_manifest(prefect_api, ray_local, tmp_path,
                                                                          sample_parquet):
    config = _tiny_config(tmp_path, sample_parquet)  # ~100 rows; its query list already in place
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(dump_config(config))
    env = _script_env(prefect_api.port, prefect_api.home)
    done = subprocess.run([str(SCRIPTS / "deploy.sh")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    deployments = asyncio.run(_deployments())
    automation = asyncio.run(_automation("train-after-build"))
    assert automation.enabled and automation.trigger.expect == {"witflow.dataset.built"}
    assert str(automation.actions[0].deployment_id) == str(deployments["train"].id)
    assert asyncio.run(_runs_of(deployments["train"].id, deadline_s=0)) == []

    overrides = ["train.epochs=2"]
    build = asyncio.run(_start_build(deployments["build-dataset"].id,
                                     {"config_path": str(config_path), "overrides": overrides}))
    # What a process worker does with the run: execute it in a subprocess, from its pull step's checkout.
    import ray

    env.update(PREFECT_API_URL=prefect_api.api_url, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    done = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "prefect"), "flow-run", "execute", str(build.id)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert asyncio.run(_flow_run(build.id)).state.is_completed()

    train_runs = asyncio.run(_runs_of(deployments["train"].id, deadline_s=TRIGGER_DEADLINE_S))
    # The session's server is shared: leave no scheduled run behind (other tests count runs).
    asyncio.run(_delete_runs([build.id, *(r.id for r in train_runs)]))
    (train_run,) = train_runs
    manifest = Path(config.manifest_uri())
    assert manifest.is_file()
    assert train_run.parameters == {"config_path": str(config_path), "overrides": overrides,
                                    "manifest": str(manifest)}
    assert train_run.state.is_scheduled()
    assert train_run.created_by is not None and train_run.created_by.type == "AUTOMATION"
