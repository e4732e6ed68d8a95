"""The dataset build and the deployments against a real Prefect API.

One `prefect server start` (infra/prefect/server.sh: the same script a user runs) serves the whole
session, on a free loopback port with a temporary PREFECT_HOME. A real server rather than
prefect_test_harness: the harness runs the API in ephemeral mode, without the scheduler service, so it
could not show the nightly cron creating runs, and it starts only a little faster (measured on the
busy 2-core box: ~25 s vs ~29 s). The server starts while Ray and the test data get ready. Everything is asserted through the API the UI reads: task runs, their `task_inputs`
(the edges the UI draws), the flow-run graph, artifacts, deployments and scheduled runs.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.prefect_fixtures import REPO_ROOT, SCRIPTS, _free_port, _script_env

# The stages of build_dataset and the upstream stages each one reads (what the UI's graph draws).
EXPECTED_UPSTREAM: dict[str, set[str]] = {
    "queries": set(),
    "eval-index": set(),
    "plan-inputs": set(),
    "count-captions": {"plan-inputs", "queries"},
    "read-filter-match": {"plan-inputs", "queries", "count-captions"},
    "count-queries": {"read-filter-match", "queries"},
    "balance-fetch-images-eval-dedup": {"read-filter-match", "count-queries", "eval-index"},
    "dedup-within-dataset": {"balance-fetch-images-eval-dedup"},
    "write-shards": {"balance-fetch-images-eval-dedup", "dedup-within-dataset"},
    "manifest": {"write-shards", "read-filter-match", "balance-fetch-images-eval-dedup", "count-queries",
                 "dedup-within-dataset", "queries", "eval-index"},
    # `manifest` too: Prefect links a task's inputs to upstream results (and the values one level
    # inside them) by object identity, and the manifest holds the clean stage's work root that reports
    # reads. The UI draws that edge; it also matches the order the flow runs them in.
    "reports": {"read-filter-match", "balance-fetch-images-eval-dedup", "queries", "eval-index", "manifest",
                "count-captions"},
}


# A hand-made query list: words and one bigram that Openclipart titles use.
QUERIES = ["icon", "card", "symbol", "signs", "lemon", "map", "arrow", "book", "flag", "pattern", "hotel",
           "ice cream", "road", "box", "house", "heart", "tree", "clock", "glass", "man", "cat", "dog"]


def _tiny_config(tmp_path: Path, sample_parquet: Path) -> Any:
    """~100 Openclipart rows whose titles name a query, in 3 input shards; the held-out eval set."""
    import pyarrow.compute as pc

    from infra.config import config_from_dict
    from infra.schema import QUERY_SCHEMA

    sample = pq.read_table(sample_parquet)
    titles = pc.utf8_lower(sample.column("title"))
    matching = pc.match_substring_regex(titles, r"\b(" + "|".join(QUERIES) + r")\b").to_pylist()
    first_of_title: dict[str, int] = {}  # one row per distinct title: the sample repeats some many times
    for i, (title, match) in enumerate(zip(titles.to_pylist(), matching)):
        if match:
            first_of_title.setdefault(title, i)
    rows = sample.take(sorted(first_of_title.values())[:100])
    source = tmp_path / "tiny_openclipart.parquet"
    pq.write_table(rows, source)
    config = config_from_dict({
        "name": "flows-test",
        "output": str(tmp_path / "out"),
        "ray": {"num_cpus": 2},
        "sources": [{"kind": "openclipart", "path": str(source), "rows_per_input_shard": 40}],
        "balance": {"max_per_query": 10},
        "eval_sets": [{"name": "openclipart-heldout", "kind": "openclipart-heldout", "max_images": 40}],
        "shards": {"rows_per_shard": 20},
    })
    # Placed where the build looks for it, so the `queries` stage uses it instead of building the list.
    n = len(QUERIES)
    queries = pa.table({"query_id": pa.array(range(n), pa.int32()), "query": QUERIES,
                        "source": ["bigram" if " " in q else "unigram" for q in QUERIES],
                        "count": pa.array([1_000_000] * n, pa.int64()), "pmi": pa.nulls(n, pa.float64()),
                        "views": pa.nulls(n, pa.int64())}, schema=QUERY_SCHEMA)
    queries_dir = Path(config.queries_uri())
    queries_dir.mkdir(parents=True)
    pq.write_table(queries, queries_dir / "queries.parquet")
    return config


def _stage(run_name: str) -> str:
    return run_name.rsplit("-", 1)[0]  # task run names are "<task name>-<3 hex digits>"


async def _read_run(flow_run_id: Any, expected: set[str]) -> tuple[list[Any], list[Any], dict]:
    """Task runs, artifacts and the UI graph of a finished flow run.

    Task-run states reach the database through the server's event pipeline (TaskRunRecorder), a moment
    after the flow returns; poll until every expected stage is there and final.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        deadline = time.monotonic() + 60
        while True:
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            names = {_stage(tr.name) for tr in task_runs}
            if expected <= names and all(tr.state and tr.state.is_final() for tr in task_runs):
                break
            if time.monotonic() > deadline:
                break  # the assertions below say what is missing
            await asyncio.sleep(0.5)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        graph = (await client._client.get(f"/flow_runs/{flow_run_id}/graph-v2")).json()
    return task_runs, artifacts, graph


@pytest.mark.slow
def test_build_dataset_dag_through_the_api(prefect_server, ray_local, prefect_api, tmp_path, sample_parquet):
    from prefect.client.schemas.objects import TaskRunResult

    from flows.dataset import build_dataset

    config = _tiny_config(tmp_path, sample_parquet)
    state = build_dataset(config, return_state=True)  # the state carries the flow run's id
    assert state.is_completed(), state.message
    manifest = state.result()
    flow_run_id = state.state_details.flow_run_id
    assert manifest.num_rows > 0 and manifest.num_shards >= 2
    assert Path(config.manifest_uri()).exists()

    task_runs, artifacts, graph = asyncio.run(_read_run(flow_run_id, set(EXPECTED_UPSTREAM)))

    by_name: dict[str, Any] = {}
    for tr in task_runs:
        stage = _stage(tr.name)
        assert stage not in by_name, f"stage {stage} ran twice"
        by_name[stage] = tr
    assert set(by_name) == set(EXPECTED_UPSTREAM)
    for stage, tr in by_name.items():
        assert tr.state.is_completed(), f"{stage}: {tr.state}"

    stage_of = {tr.id: stage for stage, tr in by_name.items()}
    upstream = {stage: {stage_of[ref.id] for refs in tr.task_inputs.values() for ref in refs
                        if isinstance(ref, TaskRunResult)} for stage, tr in by_name.items()}
    assert upstream == EXPECTED_UPSTREAM

    # The graph the UI draws (/flow_runs/{id}/graph-v2): the same nodes and edges.
    nodes = dict((node_id, node) for node_id, node in graph["nodes"])
    assert {_stage(n["label"]) for n in nodes.values()} == set(EXPECTED_UPSTREAM)
    assert {n["kind"] for n in nodes.values()} == {"task-run"}
    drawn = {_stage(n["label"]): {_stage(nodes[edge["id"]]["label"]) for edge in n["parents"]} for n in nodes.values()}
    assert drawn == EXPECTED_UPSTREAM

    by_key = {a.key: a for a in artifacts if a.key}
    assert by_key["dataset-funnel"].type == "markdown" and "funnel" in by_key["dataset-funnel"].data.lower()
    assert by_key["dataset-shards"].type == "table"
    shard_rows = by_key["dataset-shards"].data
    shard_rows = json.loads(shard_rows) if isinstance(shard_rows, str) else shard_rows
    assert [r["path"] for r in shard_rows] == [s.path for s in manifest.shards]
    assert by_key["query-counts"].type == "markdown" and "data:image/png;base64," in by_key["query-counts"].data
    assert by_key["eval-overlap"].type == "table" and "openclipart-heldout" in str(by_key["eval-overlap"].data)
    assert by_key["caption-lengths"].type == "markdown" and "data:image/png;base64," in by_key["caption-lengths"].data
    assert by_key["repeated-captions"].type == "table" and "images_by_hash" in str(by_key["repeated-captions"].data)
    # Per-shard progress: one progress artifact per fanned-out stage, each finished at 100%.
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == 3 and all(float(a.data) == 100.0 for a in progress)


DEPLOYMENTS = {"build-queries": "deploy_build_queries", "build-dataset": "deploy_build_dataset",
               "train": "deploy_train", "evaluate": "deploy_evaluate", "pipeline": "deploy_pipeline"}


async def _read_deployments(deadline_s: float) -> tuple[Any, dict[str, Any], dict[str, str], dict[str, list[Any]]]:
    """The work pool, the deployments, their flows' names and their scheduled runs (polled: the
    server's scheduler service creates the cron runs a few seconds after a deployment appears)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        pool = await client.read_work_pool("witflow-process")
        deployments = {d.name: d for d in await client.read_deployments()}
        flows = {name: (await client.read_flow(d.flow_id)).name for name, d in deployments.items()}
        deadline = time.monotonic() + deadline_s
        while True:
            runs = {name: await client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))
                    for name, d in deployments.items()}
            if runs.get("build-dataset") or time.monotonic() > deadline:
                return pool, deployments, flows, runs
            await asyncio.sleep(1)


@pytest.mark.slow
def test_deploy_all_registers_every_flow_with_the_nightly_build(prefect_api, tmp_path, monkeypatch):
    """`infra/prefect/deploy.sh` (prefect deploy --all, no prompts) against the session server."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.steps.core import run_steps

    done = subprocess.run([str(SCRIPTS / "deploy.sh")], env=_script_env(prefect_api.port, prefect_api.home),
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    pool, deployments, flows, runs = asyncio.run(_read_deployments(deadline_s=90))
    assert pool.type == "process"
    assert set(deployments) == set(DEPLOYMENTS)
    for name, fn in DEPLOYMENTS.items():
        d = deployments[name]
        assert d.entrypoint == f"flows/deployments.py:{fn}"
        assert flows[name] == f"deploy-{name}"
        assert d.work_pool_name == "witflow-process"
        assert d.parameters == {"config_path": "configs/demo.yaml", "overrides": []}
        assert {"config_path", "overrides"} <= set(d.parameter_openapi_schema["properties"])
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}]
        if name != "build-dataset":
            assert d.schedules == [] and runs[name] == []

    (schedule,) = deployments["build-dataset"].schedules
    assert schedule.active and isinstance(schedule.schedule, CronSchedule)
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")
    # The scheduler service turned the cron into upcoming runs: 03:00 UTC on distinct days.
    nightly = runs["build-dataset"]
    assert nightly, "no scheduled runs for the nightly build (SQLAlchemy >= 2.1 stops the scheduler)"
    starts = [r.expected_start_time.astimezone(datetime.timezone.utc) for r in nightly]
    assert all(r.state_type.value == "SCHEDULED" for r in nightly)
    assert all((t.hour, t.minute) == (3, 0) for t in starts) and len({t.date() for t in starts}) == len(starts)

    # What a worker does first with a run: the pull step puts it in this checkout, wherever it started.
    monkeypatch.chdir(tmp_path)
    asyncio.run(run_steps(deployments["build-dataset"].pull_steps))
    assert Path.cwd() == REPO_ROOT


def test_scripts_fail_clearly_without_a_server(tmp_path):
    port = _free_port()  # nothing listens here
    done = subprocess.run([str(SCRIPTS / "deploy.sh")], env=_script_env(port, tmp_path, WITFLOW_PREFECT_WAIT_S="1"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"no Prefect server at http://127.0.0.1:{port}/api" in done.stderr and "make server" in done.stderr
