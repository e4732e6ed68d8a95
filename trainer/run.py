"""A training run seen from outside its ranks: start them on this machine (one in this process, more
under torchrun), read back the curve they logged, and publish the export they wrote.

The ranks' own entrypoint is ``python -m trainer.train`` (the same one a cluster job runs: see
infra/launch.sh); this module is what the train flow calls around it.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from infra.config import EXPORT_DIR, RESOLVED_CONFIG_NAME, Config, StorageConfig, dump_config, to_dict
from infra.log import get_logger, log_event
from infra.storage import ObjectStore

log = get_logger("witflow.trainer.run")

REPO_ROOT = Path(__file__).resolve().parent.parent
RANKS_CONFIG_NAME = "ranks_config.yaml"
CURVE_MAX_ROWS = 200  # the curve as a readable table, not thousands of rows
_OUTPUT_TAIL_LINES = 40


def prepare_run_dir(config: Config) -> Path:
    """The run's local directory (``Config.train_dir``), created, with the resolved config in it."""
    run_dir = config.train_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESOLVED_CONFIG_NAME).write_text(dump_config(config))
    return run_dir


def run_ranks(config: Config, manifest_uri: str, run_dir: Path) -> Path:
    """Run every rank to completion (or resume an interrupted run); returns the local export dir."""
    if config.train.world_size == 1:
        return _train_in_process(config, manifest_uri, run_dir)
    return _train_under_torchrun(config, manifest_uri, run_dir)


def _train_in_process(config: Config, manifest_uri: str, run_dir: Path) -> Path:
    from trainer.curve import load_curve_sets
    from trainer.data import load_manifest
    from trainer.train import init_distributed, shutdown_distributed, train

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))
    init_distributed(rank=0, world_size=1)
    try:
        result = train(config.train, load_manifest(manifest_uri, config.storage), run_dir, rank=0, world_size=1,
                       curve_sets=load_curve_sets(config))
    finally:
        shutdown_distributed(rank=0)
    return result.export_dir


def _train_under_torchrun(config: Config, manifest_uri: str, run_dir: Path) -> Path:
    world_size = config.train.world_size
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "trainer.train", "--config", str(write_rank_config(config, run_dir)),
               "--manifest", manifest_uri, "--output-dir", str(run_dir)]
    log_event(log, "launching ranks", command=" ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
    with subprocess.Popen(command, cwd=REPO_ROOT, env=rank_environment(world_size, config.storage),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if "witflow" in line:  # our structured logs, live; DeepSpeed's chatter stays in the tail
                print(line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"training ranks failed (exit {proc.returncode}); rerun to resume from the last "
                           "checkpoint. Last output:\n" + "\n".join(tail))
    return run_dir / EXPORT_DIR


def write_rank_config(config: Config, run_dir: Path) -> Path:
    """The resolved config the ranks read: storage secrets left out (they travel in the environment)."""
    data = to_dict(config)
    data["storage"]["access_key_id"] = None
    data["storage"]["secret_access_key"] = None
    path = run_dir / RANKS_CONFIG_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path


def rank_environment(world_size: int, storage: StorageConfig) -> dict[str, str]:
    """This process's environment for ranks started on this machine, with the storage credentials."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))
    # Ranks share this machine's cores; without this each rank starts one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if storage.access_key_id:
        env["AWS_ACCESS_KEY_ID"] = storage.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = storage.secret_access_key or ""
    return env


def curve_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most about ``CURVE_MAX_ROWS`` evenly spaced step records (always the last), rounded."""
    if not records:
        return []
    stride = max(1, len(records) // CURVE_MAX_ROWS)
    rows = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k != "skipped"}
            for r in records[::stride]]
    if rows[-1]["step"] != records[-1]["step"]:
        rows.append({k: v for k, v in records[-1].items() if k != "skipped"})
    return rows


def curve_summary(records: list[dict[str, Any]], export_uri: str) -> str:
    """The run in a few markdown lines: steps, loss, logit scale, lr, throughput, bad samples, export."""
    first, last = records[0], records[-1]
    mean_rate = sum(r["samples_per_s"] for r in records) / len(records)
    return "\n".join([
        "# Training", "",
        f"- steps: {last['step']}; loss {first['loss']:.4f} -> {last['loss']:.4f}",
        f"- logit scale: {last['logit_scale']:.2f}; final lr: {last['lr']:.3g}",
        f"- mean samples/s: {mean_rate:.1f}; mean data wait/step: "
        f"{sum(r['data_wait_s'] for r in records) / len(records):.3f} s",
        f"- bad samples skipped (rank 0): {last.get('skipped') or 'none'}",
        f"- export: `{export_uri}`",
    ])


def learning_curve_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (step, eval set): zero-shot mean per-class accuracy of each variant, and chance."""
    rows = []
    for point in points:
        for name, r in point["sets"].items():
            rows.append({"step": point["step"], "eval set": name, "chance": round(r["chance"], 4),
                         **{f"{v} mean per-class": round(r[v]["mean_per_class"], 4) for v in ("bare", "single", "ensemble")},
                         "ensemble top-1": round(r["ensemble"]["top1"], 4)})
    return rows


def publish_export(export_dir: Path, target_uri: str, storage: StorageConfig) -> str:
    """The export's URI: the local dir when ``target_uri`` is local, else a copy of its files there."""
    if "://" not in target_uri or target_uri.startswith("file://"):
        return str(export_dir.resolve())
    store = ObjectStore(target_uri, storage)
    for path in sorted(export_dir.iterdir()):
        if path.is_file():
            store.write_bytes(path.name, path.read_bytes())
    return store.root
