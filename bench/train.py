"""Training throughput: DeepSpeed (ZeRO, our engine set-up) vs a plain PyTorch loop, same run.

Both train the same model (same initial weights) on the same batches, decoded once from shards of
the bundled Openclipart sample and replayed from memory, so the numbers compare the engines, not
the data pipeline. Both use AdamW with the same param groups, cosine schedule, grad clipping and
ClipLoss. The last line is the headline: ``... ratio=<deepspeed / plain>``.

    .venv/bin/python bench/train.py [--quick] [--model tiny] [--zero-stage 2] [--precision fp32]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))

import torch  # noqa: E402

from infra.config import TrainConfig  # noqa: E402
from tests.trainer_fixtures import sample_pairs, write_dataset  # noqa: E402
from trainer.data import ShardStream, load_manifest  # noqa: E402
from trainer.loss import ClipLoss  # noqa: E402
from trainer.model import CLIP, load_model_config  # noqa: E402
from trainer.train import (cosine_with_warmup, deepspeed_config, init_distributed, param_groups,  # noqa: E402
                           shutdown_distributed)


def make_batches(model_name: str, micro_batch: int, count: int, work: Path) -> list[dict]:
    shutil.rmtree(work, ignore_errors=True)
    manifest = write_dataset(work, sample_pairs(REPO_ROOT / "infra" / "data" / "openclipart_sample.parquet",
                                                micro_batch * count), rows_per_shard=256)
    config = load_model_config(model_name)
    stream = ShardStream(load_manifest(str(manifest)), rank=0, world_size=1, micro_batch=micro_batch,
                         image_size=config.image_size, shuffle_buffer=256)
    return list(itertools.islice(iter(stream), count))


def _model_and_optimizer(cfg: TrainConfig, total_steps: int):
    torch.manual_seed(cfg.seed)
    model = CLIP(load_model_config(cfg.model))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, total_steps))
    return model, optimizer, scheduler


def _samples_per_s(step, cfg: TrainConfig, batches: list[dict], steps: int, warmup: int) -> float:
    """Run ``step(batch)`` for warmup + steps batches; samples/s over the timed steps."""
    started = 0.0
    for i, batch in enumerate(itertools.islice(itertools.cycle(batches), steps + warmup)):
        if i == warmup:
            started = time.perf_counter()
        step(batch)
    return steps * cfg.micro_batch / (time.perf_counter() - started)


def plain_loop(cfg: TrainConfig, batches: list[dict], steps: int, warmup: int) -> float:
    model, optimizer, scheduler = _model_and_optimizer(cfg, steps + warmup)
    loss_fn = ClipLoss()

    def step(batch: dict) -> None:
        loss = loss_fn(*model(batch["images"], batch["tokens"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return _samples_per_s(step, cfg, batches, steps, warmup)


def deepspeed_loop(cfg: TrainConfig, batches: list[dict], steps: int, warmup: int) -> float:
    import deepspeed

    model, optimizer, scheduler = _model_and_optimizer(cfg, steps + warmup)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, 1, on_cuda=False), dist_init_required=False)
    loss_fn = ClipLoss()

    def step(batch: dict) -> None:
        engine.backward(loss_fn(*engine(batch["images"], batch["tokens"])))
        engine.step()

    return _samples_per_s(step, cfg, batches, steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--micro-batch", type=int, default=32)
    args = parser.parse_args()
    steps, warmup, rounds = (6, 2, 1) if args.quick else (20, 3, 2)
    cfg = TrainConfig(model=args.model, zero_stage=args.zero_stage, precision=args.precision,
                      micro_batch=args.micro_batch, warmup_steps=2)
    batches = make_batches(args.model, args.micro_batch, count=8, work=REPO_ROOT / ".bench" / "train-data")
    print(f"model={args.model} micro_batch={args.micro_batch} steps={steps} (+{warmup} warm-up) "
          f"threads={torch.get_num_threads()} cpus={os.cpu_count()}", flush=True)
    init_distributed(rank=0, world_size=1)
    try:
        plain, ours = [], []
        for _ in range(rounds):  # interleaved rounds: a busy machine slows both alike
            plain.append(plain_loop(cfg, batches, steps, warmup))
            print(f"plain pytorch: {plain[-1]:.1f} samples/s", flush=True)
            ours.append(deepspeed_loop(dataclasses.replace(cfg), batches, steps, warmup))
            print(f"deepspeed zero-{args.zero_stage} {args.precision}: {ours[-1]:.1f} samples/s", flush=True)
    finally:
        shutdown_distributed(rank=0)
    best_plain, best_ours = max(plain), max(ours)
    print(f"train {args.model}: deepspeed zero-{args.zero_stage} {args.precision} {best_ours:.1f} samples/s, "
          f"plain pytorch {best_plain:.1f} samples/s, ratio={best_ours / best_plain:.2f}")


if __name__ == "__main__":
    main()
