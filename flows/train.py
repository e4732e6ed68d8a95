"""Training as a Prefect flow: launch the ranks, publish the training curve, return the export.

One rank runs in the flow's process; more run under ``torchrun`` as a subprocess on this machine
(``python -m trainer.train``, the same entrypoint a cluster job uses: see infra/launch.sh). The
work is in trainer/; this module only resolves inputs from the config and orchestrates.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task

from infra.config import Config, RESOLVED_CONFIG_NAME, dump_config, to_dict
from infra.log import get_logger, log_event
from infra.prefect_utils import publish_markdown, publish_table

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _write_rank_config(config: Config, run_dir: Path) -> Path:
    """The resolved config the ranks read: storage secrets left out (they travel in the environment)."""
    data = to_dict(config)
    data["storage"]["access_key_id"] = None
    data["storage"]["secret_access_key"] = None
    path = run_dir / "ranks_config.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path


def _rank_environment(config: Config) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))
    # Ranks share this machine's cores; without this each rank starts one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.train.world_size)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if config.storage.access_key_id:
        env["AWS_ACCESS_KEY_ID"] = config.storage.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = config.storage.secret_access_key or ""
    return env


@task(name="train-ranks")
def run_ranks(config: Config, manifest: str, run_dir: Path) -> Path:
    """Run every rank to completion (or resume an interrupted run); returns the local export dir."""
    from trainer.train import EXPORT_DIR, init_distributed, shutdown_distributed
    from trainer.train import train as train_ranks
    from trainer.data import load_manifest

    world_size = config.train.world_size
    if world_size == 1:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))
        init_distributed(rank=0, world_size=1)
        try:
            result = train_ranks(config.train, load_manifest(manifest, config.storage), run_dir, rank=0, world_size=1)
        finally:
            shutdown_distributed(rank=0)
        return result.export_dir
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "trainer.train", "--config", str(_write_rank_config(config, run_dir)),
               "--manifest", manifest, "--output-dir", str(run_dir)]
    log_event(log, "launching ranks", command=" ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(command, cwd=REPO_ROOT, env=_rank_environment(config), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if "witflow" in line:  # our structured logs, live; DeepSpeed's chatter stays in the tail
                print(line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"training ranks failed (exit {proc.returncode}); rerun to resume from the last "
                           "checkpoint. Last output:\n" + "\n".join(tail))
    return run_dir / EXPORT_DIR


def read_train_log(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records (a resumed run appends; a repeated step keeps its latest record)."""
    from trainer.train import LOG_NAME

    path = run_dir / LOG_NAME
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


@task(name="publish-training-curve")
def publish_curve(records: list[dict[str, Any]], export_uri: str) -> None:
    if not records:
        return
    stride = max(1, len(records) // 200)  # a readable table, not thousands of rows
    rows = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k != "skipped"}
            for r in records[::stride]]
    if rows[-1]["step"] != records[-1]["step"]:
        rows.append({k: v for k, v in records[-1].items() if k != "skipped"})
    publish_table("train-curve", rows, description="loss, lr, logit scale, samples/s, data wait per step")
    first, last = records[0], records[-1]
    mean_rate = sum(r["samples_per_s"] for r in records) / len(records)
    publish_markdown("train-summary", "\n".join([
        "# Training", "",
        f"- steps: {last['step']}; loss {first['loss']:.4f} -> {last['loss']:.4f}",
        f"- logit scale: {last['logit_scale']:.2f}; final lr: {last['lr']:.3g}",
        f"- mean samples/s: {mean_rate:.1f}; mean data wait/step: "
        f"{sum(r['data_wait_s'] for r in records) / len(records):.3f} s",
        f"- bad samples skipped (rank 0): {last.get('skipped') or 'none'}",
        f"- export: `{export_uri}`",
    ]), description="training summary")


@task(name="publish-export", retries=2, retry_delay_seconds=5)
def publish_export(config: Config, export_dir: Path) -> str:
    """The export's URI: the local dir, or a copy under ``train.output`` in object storage."""
    from infra.storage import ObjectStore

    target = config.uri(config.train.output).rstrip("/") + "/export"
    if "://" not in target or target.startswith("file://"):
        return str(export_dir.resolve())
    store = ObjectStore(target, config.storage)
    for path in sorted(export_dir.iterdir()):
        if path.is_file():
            store.write_bytes(path.name, path.read_bytes())
    return store.root


@flow(name="train", log_prints=True)
def train(config: Config, manifest: str | None = None) -> str:
    """Train on a built dataset (default: this config's) with DeepSpeed; returns the export dir URI."""
    from trainer.train import default_manifest, local_output_dir

    manifest = manifest or default_manifest(config)
    run_dir = local_output_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESOLVED_CONFIG_NAME).write_text(dump_config(config))
    log_event(log, "training", manifest=manifest, run_dir=str(run_dir), model=config.train.model,
              world_size=config.train.world_size, zero_stage=config.train.zero_stage)
    export_dir = run_ranks(config, manifest, run_dir)
    export_uri = publish_export(config, export_dir)
    publish_curve(read_train_log(run_dir), export_uri)
    print(f"training done: export={export_uri}")
    return export_uri

