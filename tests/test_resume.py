"""Resumable, exactly once: a build killed (SIGKILL, whole process tree) at several points and rerun
yields exactly the shards of an uninterrupted build — the same sample ids, no duplicates, no losses,
byte-identical shards."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _make_inputs(tmp: Path, sample_parquet: Path, rows: int = 240, **sections: dict) -> Path:
    """A ``rows``-row slice of the bundled sample, a query list of the words in its titles and a
    build config (``sections`` update its sections: ``shards={...}``, ``name="..."``)."""
    import re

    sample = pq.read_table(sample_parquet).slice(0, rows)
    pq.write_table(sample, tmp / "pairs.parquet")
    words = sorted({w for t in sample.column("title").to_pylist() if t for w in re.findall(r"[a-z]{3,}", t.lower())})
    queries = pa.table({"query_id": pa.array(range(len(words)), pa.int32()), "query": words,
                        "source": ["unigram"] * len(words), "count": pa.array([100] * len(words), pa.int64()),
                        "pmi": pa.nulls(len(words), pa.float64()), "views": pa.nulls(len(words), pa.int64())})
    (tmp / "queries").mkdir()
    pq.write_table(queries, tmp / "queries" / "queries.parquet")
    cfg = {
        "name": "resume-test",
        "output": str(tmp / "run"),
        "ray": {"num_cpus": 2},
        "sources": [{"kind": "openclipart", "path": str(tmp / "pairs.parquet"), "rows_per_input_shard": 40}],
        "queries": {"output": str(tmp / "queries")},
        "images": {"resize_longest_side": 64, "encode_format": "PNG"},
        "balance": {"max_per_query": 5},
        "dedup": {"against_eval": False},
        "shards": {"rows_per_shard": 25},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = tmp / "build.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(api_url: str) -> dict:
    # One Prefect server for the session (no ephemeral server per run, which costs ~10 s each).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"WITFLOW_PROGRESS": "0", "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": api_url})
    return env


def _build(config: Path, output: Path, api_url: str, timeout: float = 300) -> None:
    cmd = [sys.executable, "-m", "flows.cli", "build", "--config", str(config), "--set", f"output={output}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(api_url), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        parent = psutil.Process(proc.pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)  # the local Ray's daemons and workers are in the tree and die with it


def _build_killed_when(config: Path, output: Path, api_url: str, pattern: str, count: int,
                       timeout: float = 300) -> bool:
    """Start a build and SIGKILL it once ``count`` files match ``pattern`` under ``output``."""
    cmd = [sys.executable, "-m", "flows.cli", "build", "--config", str(config), "--set", f"output={output}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(api_url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if len(glob.glob(str(output / pattern), recursive=True)) >= count:
                _kill_tree(proc)
                return True
            if proc.poll() is not None:
                return False  # finished before the kill point: still a valid (if weaker) check
            time.sleep(0.05)
        raise AssertionError(f"no {pattern} after {timeout}s")
    finally:
        if proc.poll() is None:
            _kill_tree(proc)


def _shards(output: Path) -> tuple[list[str], list[str]]:
    manifest = json.loads((output / "dataset" / "manifest.json").read_text())
    ids: list[str] = []
    for entry in manifest["shards"]:
        ids += pq.read_table(output / "dataset" / entry["path"], columns=["sample_id"]).column("sample_id").to_pylist()
    return ids, [s["sha256"] for s in manifest["shards"]]


def _funnel_problems(output: Path) -> list[str]:
    from tests.test_build import funnel_problems

    return funnel_problems(json.loads((output / "dataset" / "manifest.json").read_text())["funnel"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, sample_parquet: Path, prefect_server):
    """The inputs both tests build, and their uninterrupted build: (config, its shards' ids and sha256s)."""
    tmp = tmp_path_factory.mktemp("resume-inputs")
    config = _make_inputs(tmp, sample_parquet)
    prefect_server.wait_healthy()
    _build(config, tmp / "clean-run", prefect_server.api_url)
    ids, shas = _shards(tmp / "clean-run")
    assert ids and len(ids) == len(set(ids)), "the reference build has duplicates"
    assert len(shas) >= 2
    return config, ids, shas


def test_killed_builds_resume_to_exactly_the_uninterrupted_result(tmp_path: Path, reference, prefect_server):
    config, want_ids, want_shas = reference
    api = prefect_server.api_url
    kill_points = [
        ("dataset/work/*/filtered/*.json", 2),  # during read/gather/filter/match
        # (during balance/images/eval dedup: the process-group kill below, compared the same way)
        ("dataset/shards/*.done", 1),  # while writing output shards
    ]
    killed = 0
    for i, (pattern, count) in enumerate(kill_points):
        out = tmp_path / f"killed-{i}"
        killed += _build_killed_when(config, out, api, pattern, count)
        _build(config, out, api)  # the rerun resumes
        ids, shas = _shards(out)
        assert len(ids) == len(set(ids)), f"kill point {pattern}: duplicated samples after resume"
        assert sorted(ids) == sorted(want_ids), f"kill point {pattern}: lost or extra samples after resume"
        assert shas == want_shas, f"kill point {pattern}: shards differ from the uninterrupted build"
        assert _funnel_problems(out) == [], f"kill point {pattern}: the resumed build's funnel does not add up"
    assert killed >= 1, "the builds finished before the kill points; the test did not test resumption"


def _visible_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` a reader can see (temp files of unfinished writes left out): size, mtime."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and not (path.name.startswith(".") and ".tmp-" in path.name):
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp-*"))


def _kill_group_when(config: Path, output: Path, api_url: str, pattern: str, count: int,
                     timeout: float = 300) -> tuple[dict, list[psutil.Process]] | None:
    """Start a build in its own process group; once ``count`` files match ``pattern``, SIGKILL the
    group (as a user's kill -9 -PGID does). Returns the visible files at the kill and the build's
    other processes as they were just before it (Ray's daemons and workers), or None if it finished."""
    cmd = [sys.executable, "-m", "flows.cli", "build", "--config", str(config), "--set", f"output={output}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(api_url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(glob.glob(str(output / pattern), recursive=True)) >= count:
            others = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            at_kill = _visible_files(output)
            proc.wait(timeout=30)
            return at_kill, others
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no {pattern} after {timeout}s")


def test_no_file_changes_after_the_build_process_group_is_killed(tmp_path: Path, reference, prefect_server):
    """Issue 16 #11: workers that outlive a killed driver never write into its output, and a rerun
    started at once (while they may still run) finishes with exactly the uninterrupted result
    (killed during balance/images/eval dedup: the first test's middle kill point)."""
    config, want_ids, want_shas = reference
    api = prefect_server.api_url
    out = tmp_path / "killed"
    killed = _kill_group_when(config, out, api, "dataset/work/*/c-*/clean/*.json", 2)
    assert killed is not None, "the build finished before the kill point"
    at_kill, others = killed
    psutil.wait_procs(others, timeout=30)  # orphaned Ray workers exit once they notice their raylet is gone
    time.sleep(1.0)
    after = _visible_files(out)
    changed = sorted(k for k in set(at_kill) | set(after) if at_kill.get(k) != after.get(k))
    assert changed == [], f"files written after the kill: {changed}"
    # What a write killed between its temp file and the rename leaves (a worker SIGKILLed mid-write).
    killed_write = out / "dataset" / "shards" / ".part-00000.parquet.tmp-k1ll3d"
    killed_write.parent.mkdir(parents=True, exist_ok=True)
    killed_write.write_bytes(b"half a shard")
    _build(config, out, api)  # the rerun
    # The killed build could not end its flow run; the rerun marked it crashed (issue 16 #13).
    runs = httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": ["build_dataset"]}}},
                      timeout=30).json()
    states = [r["state"]["type"] for r in runs]
    assert "RUNNING" not in states and "CRASHED" in states, states
    assert _shards(out) == (want_ids, want_shas)
    assert _funnel_problems(out) == [], "the resumed build's funnel does not add up"
    assert _temp_files(out) == [], "the rerun leaves no temp file of a killed write"
