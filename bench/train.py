"""Training throughput: DeepSpeed (ZeRO, our engine set-up) vs a plain PyTorch loop, same run.

All train the same model (same initial weights) on the same batches, decoded once from shards of
the bundled Openclipart sample and replayed from memory, so the numbers compare the engines, not
the data pipeline. All use the one optimizer construction (``trainer.train.model_and_optimizer``:
torch's AdamW with its fused kernel, the same param groups), cosine schedule, grad clipping and
ClipLoss; the optimizer each side steps is printed. The engines live side by side and their steps alternate (forward, then reversed
order), so machine load hits them alike: the plain loop; DeepSpeed at ``--zero-stage`` with
``trainer.train.deepspeed_config`` (what ``train.zero_stage`` gets); and DeepSpeed as
``train.single_rank_zero_stage: 0`` runs it on one rank (stage 0: ZeRO partitions nothing across
one rank); at stages 1 and 2 also DeepSpeed's own code, without trainer/zero.py's shortcuts
(``train.zero_shortcuts: false``). Each step's forward, backward and optimizer step are timed (wall and CPU) and the
medians are compared: what DeepSpeed adds (or saves) in each phase. One ``ratio=`` line per
DeepSpeed engine (DeepSpeed / plain, median step); the last line is the headline: the stage asked
for, ``--zero-stage``.

    .venv/bin/python bench/train.py [--quick] [--model tiny] [--zero-stage 2] [--precision fp32] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))

import torch  # noqa: E402

from infra.config import TrainConfig  # noqa: E402
from tests.trainer_fixtures import sample_pairs, write_dataset  # noqa: E402
from trainer.data import ShardStream, load_manifest  # noqa: E402
from trainer.loss import ClipLoss  # noqa: E402
from trainer.model import load_model_config  # noqa: E402
from trainer.train import (build_engine, deepspeed_config, init_distributed, model_and_optimizer,  # noqa: E402
                           shutdown_distributed)


def make_batches(model_name: str, micro_batch: int, count: int, work: Path) -> list[dict]:
    shutil.rmtree(work, ignore_errors=True)
    manifest = write_dataset(work, sample_pairs(REPO_ROOT / "infra" / "data" / "openclipart_sample.parquet",
                                                micro_batch * count), rows_per_shard=256)
    config = load_model_config(model_name)
    stream = ShardStream(load_manifest(str(manifest)), rank=0, world_size=1, micro_batch=micro_batch,
                         image_size=config.image_size, context_length=config.context_length,
                         shuffle_buffer=256)
    return list(itertools.islice(iter(stream), count))


def _model_and_optimizer(cfg: TrainConfig, total_steps: int):
    torch.manual_seed(cfg.seed)
    return model_and_optimizer(cfg, load_model_config(cfg.model), total_steps)


class Phases:
    """Wall and CPU seconds of each step's phases."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {"forward": [], "backward": [], "step": [], "total": []}
        self.cpu: dict[str, list[float]] = {k: [] for k in self.wall}

    def run(self, forward, backward, step) -> None:
        marks = [(time.perf_counter(), time.process_time())]
        loss = forward()
        marks.append((time.perf_counter(), time.process_time()))
        backward(loss)
        marks.append((time.perf_counter(), time.process_time()))
        step()
        marks.append((time.perf_counter(), time.process_time()))
        for k, name in enumerate(("forward", "backward", "step")):
            self.wall[name].append(marks[k + 1][0] - marks[k][0])
            self.cpu[name].append(marks[k + 1][1] - marks[k][1])
        self.wall["total"].append(marks[-1][0] - marks[0][0])
        self.cpu["total"].append(marks[-1][1] - marks[0][1])

    def median(self, name: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu if cpu else self.wall)[name])


def describe(optimizer) -> str:
    """What an engine steps: the optimizer's class, its fused flag, and what it wraps (ZeRO)."""
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and inner is not optimizer:
        return f"{type(optimizer).__name__} over {describe(inner)}"
    return f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})"


def plain_engine(cfg: TrainConfig, total: int) -> Callable[[dict, Phases], None]:
    model, optimizer, scheduler = _model_and_optimizer(cfg, total)
    loss_fn = ClipLoss()

    def step(batch: dict, phases: Phases) -> None:
        def update() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        phases.run(lambda: loss_fn(*model(batch["images"], batch["tokens"])), lambda loss: loss.backward(), update)

    step.optimizer = describe(optimizer)
    return step


def deepspeed_engine(cfg: TrainConfig, total: int, zero_options: dict) -> Callable[[dict, Phases], None]:
    torch.manual_seed(cfg.seed)
    config = deepspeed_config(cfg, 1, on_cuda=False)
    config["zero_optimization"].update(zero_options)
    engine, _ = build_engine(cfg, load_model_config(cfg.model), config, total)
    loss_fn = ClipLoss()

    def step(batch: dict, phases: Phases) -> None:
        phases.run(lambda: loss_fn(*engine(batch["images"], batch["tokens"])), engine.backward, engine.step)

    step.optimizer = describe(engine.optimizer)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per engine (default 40)")
    parser.add_argument("--zero-options", default="{}", help="extra zero_optimization settings, JSON (experiments)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (8 if args.quick else 40)
    warmup = 2 if args.quick else 4
    cfg = TrainConfig(model=args.model, zero_stage=args.zero_stage, precision=args.precision,
                      micro_batch=args.micro_batch, warmup_steps=2)
    batches = make_batches(args.model, args.micro_batch, count=8, work=REPO_ROOT / ".bench" / "train-data")
    print(f"model={args.model} micro_batch={args.micro_batch} steps={steps} (+{warmup} warm-up) each, alternating "
          f"threads={torch.get_num_threads()} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}", flush=True)
    asked = f"deepspeed zero-{args.zero_stage} {args.precision}"
    one_rank = f"deepspeed zero-{args.zero_stage} run as zero-0 (train.single_rank_zero_stage=0) {args.precision}"
    own = f"deepspeed zero-{args.zero_stage} {args.precision}, DeepSpeed's own code (train.zero_shortcuts=false)"
    configs = {asked: cfg, one_rank: dataclasses.replace(cfg, single_rank_zero_stage=0)}
    if args.zero_stage in (1, 2):
        configs[own] = dataclasses.replace(cfg, zero_shortcuts=False)
    init_distributed(rank=0, world_size=1)
    try:
        engines = {"plain": plain_engine(cfg, steps + warmup)}
        for label, ds_cfg in configs.items():
            engines[label] = deepspeed_engine(ds_cfg, steps + warmup, json.loads(args.zero_options))
            zero = {**deepspeed_config(ds_cfg, 1, False)["zero_optimization"], **json.loads(args.zero_options)}
            print(f"{label}: zero_optimization {json.dumps(zero)}", flush=True)
        for name, engine in engines.items():
            print(f"{name}: steps {engine.optimizer}", flush=True)
        phases = {name: Phases() for name in engines}
        warm = {name: Phases() for name in engines}
        names = list(engines)
        for i, batch in enumerate(itertools.islice(itertools.cycle(batches), steps + warmup)):
            for name in (names if i % 2 == 0 else names[::-1]):
                engines[name](batch, (warm if i < warmup else phases)[name])
    finally:
        shutdown_distributed(rank=0)
    plain = phases["plain"]
    short = {"plain": "plain", asked: f"zero-{args.zero_stage}", one_rank: "zero-0", own: "ds-own"}
    print(f"{'median ms':<12}" + "".join(f"{short[n] + ' wall':>13}" for n in names)
          + "".join(f"{short[n] + ' CPU':>12}" for n in names))
    for phase in ("forward", "backward", "step", "total"):
        print(f"{phase:<12}" + "".join(f"{phases[n].median(phase) * 1e3:>13.1f}" for n in names)
              + "".join(f"{phases[n].median(phase, True) * 1e3:>12.1f}" for n in names))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (all engines, one process)")
    plain_rate = cfg.micro_batch / plain.median("total")
    for label in [one_rank, *([own] if own in phases else []), asked]:
        ours = phases[label]
        ours_rate = cfg.micro_batch / ours.median("total")
        cpu_ratio = plain.median("total", True) / ours.median("total", True)
        print(f"train {args.model}: {label} {ours_rate:.1f} samples/s, plain pytorch {plain_rate:.1f} samples/s "
              f"(median step; CPU ratio {cpu_ratio:.2f}), ratio={ours_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
