"""Train CLIP with DeepSpeed ZeRO; the same code on a CPU (gloo) and on GPUs (NCCL).

Library: ``train(cfg, source, output_dir, rank=..., world_size=..., local_rank=...)`` takes the train
section and explicit distributed coordinates, and expects the process group to be up
(``init_distributed``). Entrypoint: ``python -m trainer.train --config C [--set k=v] [--manifest M]``,
run as one process, by ``torchrun`` or by the ``deepspeed`` launcher; it reads the whole Config and
the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Output directory (local, shared between nodes for multi-node runs):
    train_config.json          the resolved train section and model config of this run, and the
                               dataset it trains on (trainer/provenance.py: manifest sha256, shards, ids)
    training_ids.npy           the training rows' ids (hashes), copied into the export
    train_log.jsonl            one line per step (rank 0)
    checkpoints/<tag>/         DeepSpeed engine state + rank<N>_trainer_state.pt (data position, RNG)
    checkpoints/latest_complete
    export/model.pt, export/model_config.json   OpenAI-layout weights (written at the end)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from infra.config import EXPORT_DIR, TrainConfig
from infra.log import get_logger, log_event
from trainer.data import (DatasetSource, ShardStream, advance_position, initial_position, load_manifest,
                          make_loader, online_balance, skipped_total)
from trainer.loss import ClipLoss
from trainer.model import CLIP, ModelConfig, load_model_config, save_exported
from trainer.zero import speed_up_zero_optimizer

log = get_logger("witflow.trainer")

CHECKPOINT_DIR = "checkpoints"
LATEST_MARKER = "latest_complete"
LOG_NAME = "train_log.jsonl"
RUN_CONFIG_NAME = "train_config.json"


# --------------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OP_LOCK_STALE_S = 300.0  # a no-op load holds it for milliseconds, the first build (setup.sh) for about a minute


def clear_stale_op_locks(extensions_dir: str | os.PathLike | None = None, stale_after_s: float = OP_LOCK_STALE_S,
                         poll_s: float = 0.5) -> list[str]:
    """Remove the build locks a killed process left in DeepSpeed's op directories; returns their paths.

    torch's extension loader takes ``<op>/lock`` (a bare file: no owner, no lease) on every load,
    even when nothing is rebuilt, and a second loader waits for it to go with no deadline. A rank
    killed in that window leaves it behind and every later training waits for ever, silently. A lock
    younger than ``stale_after_s`` may be a build in progress: wait for it; an older one is debris:
    remove it, logged."""
    root = Path(extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR") or "")
    if not str(root) or not root.is_dir():
        return []
    removed: list[str] = []
    for lock in sorted(root.glob("*/lock")):
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break  # released
            if age < stale_after_s:
                time.sleep(poll_s)
                continue
            try:
                lock.unlink()
            except FileNotFoundError:
                break
            removed.append(str(lock))
            log_event(log, "removed a stale op build lock (left by a killed process)", 30, lock=str(lock),
                      age_s=round(age))
            break
    return removed


def init_distributed(rank: int, world_size: int, local_rank: int = 0, master_addr: str = "127.0.0.1",
                     master_port: int | None = None, backend: str | None = None) -> str:
    """Start the process group through DeepSpeed (gloo on CPU, NCCL on CUDA); returns the backend."""
    import deepspeed

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    port = master_port or free_port()
    # deepspeed.initialize insists on LOCAL_RANK and its CPU shared-memory allreduce reads MASTER_*:
    # keep them consistent with the group we start.
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(port)
    clear_stale_op_locks()  # the group's start loads DeepSpeed's CPU communication op
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=f"tcp://{master_addr}:{port}",
                               rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=30))
    return backend


def shutdown_distributed(rank: int) -> None:
    """Barrier, destroy the group, remove DeepSpeed's CPU shared-memory files (it never does)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _forget_deepspeed_groups()
    port = os.environ.get("MASTER_PORT")
    if port:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
            try:
                os.remove(path)
            except OSError:
                pass


def _forget_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed caches at module level.

    They outlive ``destroy_process_group``; a second run in the same process (a flow called twice,
    the tests) would otherwise broadcast over a destroyed group and fail.
    """
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "mpu"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


# --------------------------------------------------------------------------------------------
# Optimiser, schedule, DeepSpeed config
# --------------------------------------------------------------------------------------------


def deepspeed_config(cfg: TrainConfig, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg``; asserts train_batch = micro_batch x grad_accum x world_size."""
    train_batch = cfg.micro_batch * cfg.grad_accum * world_size
    if cfg.world_size != world_size:
        raise ValueError(f"train.world_size is {cfg.world_size} but {world_size} processes were launched")
    assert train_batch == cfg.train_batch, "train_batch must equal micro_batch x grad_accum x world_size"
    if cfg.precision == "fp16" and not on_cuda:
        raise ValueError("train.precision=fp16 needs a CUDA device (DeepSpeed's fp16 loss scaling is not "
                         "supported on CPU); use bf16 or fp32 on CPU")
    config: dict[str, Any] = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.effective_zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.effective_zero_stage in (1, 2) and not on_cuda:
        # Contiguous gradients copy every gradient, in its backward hook, into a bucket DeepSpeed
        # allocates afresh each step (reduce_bucket_size elements, 2 GB of fp32): against GPU
        # memory fragmentation, of no use on CPU, where it cost ~10% of a step (bench/train.py).
        config["zero_optimization"]["contiguous_gradients"] = False
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return config


def model_and_optimizer(cfg: TrainConfig, model_config: ModelConfig, steps: int) -> tuple[CLIP, Any, Any]:
    """The CLIP model, its AdamW (``param_groups``) and the cosine schedule over ``steps``: what
    :func:`build_engine` hands DeepSpeed, and what a plain PyTorch loop steps itself."""
    model = CLIP(model_config)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    # fused: one kernel over each parameter instead of a dozen tensor ops; on CPU 6x faster than the
    # default per-tensor loop (3.3 vs 19.6 ms for the tiny model), ~25% of a training step, the same
    # update to float rounding (bench/train.py). DeepSpeed steps this optimizer as it is.
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  fused=True)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, steps))


def build_engine(cfg: TrainConfig, model_config: ModelConfig, ds_config: dict[str, Any], steps: int) -> tuple[Any, Any]:
    """The CLIP model, AdamW and the cosine schedule under DeepSpeed (``ds_config``); seed first.
    Returns the engine and its scheduler."""
    import deepspeed

    model, optimizer, scheduler = model_and_optimizer(cfg, model_config, steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config, dist_init_required=False)
    if dist.get_world_size() == 1 and engine.zero_optimization_stage() == 0:
        # An all-reduce over one rank is the identity, which DeepSpeed runs anyway (flatten, gloo,
        # unflatten: ~7% of a CPU step, bench/train.py); this is its own switch for "no reduction".
        engine.enable_backward_allreduce = False
    if cfg.zero_shortcuts and engine.zero_optimization_stage() in (1, 2):
        done, refused = speed_up_zero_optimizer(engine.optimizer, deepspeed.__version__)
        if refused:
            log_event(log, "ZeRO shortcuts not set: DeepSpeed's own code runs", 30, reason=refused)
        if done:
            log_event(log, "ZeRO shortcuts", shortcuts=",".join(done), switch="train.zero_shortcuts")
    return engine, scheduler


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices only: not gains, biases, embeddings or the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "embedding" in name or name == "logit_scale":
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def total_steps(cfg: TrainConfig, num_rows: int) -> int:
    """``max_steps`` if set, else ``epochs`` passes over the dataset (at least one step)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, cfg.epochs * (num_rows // cfg.train_batch))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(output_dir: Path) -> str | None:
    """The tag of the last checkpoint every rank finished writing, if any."""
    marker = output_dir / CHECKPOINT_DIR / LATEST_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def save_checkpoint(engine: Any, output_dir: Path, step: int, position: dict[str, Any], rank: int,
                    keep: int) -> str:
    """All ranks: DeepSpeed state, then each rank's position and RNG, then (rank 0) the marker."""
    tag = f"step{step:08d}"
    root = output_dir / CHECKPOINT_DIR
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    tmp = root / tag / f"rank{rank}_trainer_state.pt.tmp"
    torch.save({"step": step, "position": position, "rng": _rng_state()}, tmp)
    tmp.replace(root / tag / f"rank{rank}_trainer_state.pt")
    dist.barrier()
    if rank == 0:
        tmp_marker = root / (LATEST_MARKER + ".tmp")
        tmp_marker.write_text(tag + "\n")
        tmp_marker.replace(root / LATEST_MARKER)
        old = sorted(p for p in root.glob("step*") if p.is_dir() and p.name != tag)
        for stale in old[:max(0, len(old) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return tag


def load_checkpoint(engine: Any, output_dir: Path, tag: str, rank: int) -> tuple[int, dict[str, Any]]:
    """Restore engine, optimiser, scheduler, this rank's data position and RNG; returns (step, position)."""
    root = output_dir / CHECKPOINT_DIR
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    state_path = root / tag / f"rank{rank}_trainer_state.pt"
    if not state_path.is_file():
        raise RuntimeError(f"{state_path} is missing: was the checkpoint written with a different world size?")
    state = torch.load(state_path, weights_only=False)
    _set_rng_state(state["rng"])
    return int(state["step"]), state["position"]


SUPERSEDED_DIR = "superseded"


def _check_resumable(output_dir: Path, run_config: dict[str, Any], on_dataset_change: str = "refuse") -> None:
    """Refuse to resume into a directory trained on another dataset (or, with ``on_dataset_change``
    "restart", set that run aside and start afresh), or with a different model or batch layout."""
    saved_path = output_dir / RUN_CONFIG_NAME
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    if latest_checkpoint(output_dir) is not None or (output_dir / EXPORT_DIR).exists():
        if not _same_dataset(output_dir, saved, run_config, on_dataset_change):
            return  # set aside: nothing left to resume
    for key in ("model", "train_batch"):
        if saved.get(key) != run_config.get(key):
            raise ValueError(f"{output_dir} holds a run with a different {key} ({saved.get(key)} vs "
                             f"{run_config.get(key)}): use a new train.output or delete it")
    saved_stage = saved.get("deepspeed", {}).get("zero_optimization", {}).get("stage")
    stage = run_config["deepspeed"]["zero_optimization"]["stage"]
    if saved_stage is not None and saved_stage != stage:
        raise ValueError(f"{output_dir}: its checkpoints are of ZeRO stage {saved_stage}, this run's is {stage} "
                         "(train.zero_stage / train.single_rank_zero_stage): use a new train.output")
    for key in ("micro_batch", "grad_accum", "world_size", "num_workers", "seed"):
        if saved["train"].get(key) != run_config["train"].get(key):
            raise ValueError(f"{output_dir}: train.{key} changed since the checkpoint "
                             f"({saved['train'].get(key)} -> {run_config['train'].get(key)}); resuming would not "
                             "continue the same run: use a new train.output")


def _same_dataset(output_dir: Path, saved: dict[str, Any], run_config: dict[str, Any], on_change: str) -> bool:
    """Whether the run in ``output_dir`` was trained on this run's dataset (the same training shards).
    If not: raise (``on_change`` "refuse"), or move that run into superseded/ and return False."""
    from trainer.provenance import DatasetIdentity

    before = DatasetIdentity.from_dict(saved.get("dataset"))
    now = DatasetIdentity.from_dict(run_config["dataset"])
    if before is not None and before.shards_digest == now.shards_digest:
        return True
    was = before.describe() if before is not None else "a dataset it did not record"
    message = f"{output_dir}: its checkpoints were trained on another dataset ({was}); this run's is {now.describe()}"
    if on_change == "refuse":
        raise ValueError(f"{message}: set train.on_dataset_change=restart to train afresh here (the old run is "
                         "kept under superseded/), or use a new train.output")
    aside = output_dir / SUPERSEDED_DIR / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside.mkdir(parents=True)
    from trainer.provenance import TRAINING_IDS_NAME

    for name in (CHECKPOINT_DIR, EXPORT_DIR, LOG_NAME, RUN_CONFIG_NAME, TRAINING_IDS_NAME):
        if (output_dir / name).exists():
            (output_dir / name).rename(aside / name)
    log_event(log, "dataset changed: training afresh", 30, run=str(output_dir), was=was, now=now.describe(),
              set_aside=str(aside))
    return False


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    export_dir: Path
    steps: int
    losses: tuple[float, ...]  # the global-batch loss of each step run by this call
    skipped: dict[str, int]  # bad samples this rank skipped, per reason


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def _curve_hook(curve_sets: Sequence[Any], output_dir: Path, rank: int) -> Callable[[Any, int], None]:
    """Rank 0 scores the learning curve's sets and appends the point to ``curve.jsonl``; all ranks wait."""
    from trainer.curve import CURVE_NAME, curve_point

    def record(module: Any, step: int) -> None:
        if rank == 0:
            point = curve_point(module, curve_sets, step)
            with open(output_dir / CURVE_NAME, "a") as f:
                f.write(json.dumps(point) + "\n")
            log_event(log, "learning curve", step=step, **{
                f"{name}/{v}": round(r[v]["mean_per_class"], 4) for name, r in point["sets"].items()
                for v in ("bare", "ensemble")})
        dist.barrier()
    return record


def _write_curve_plot(output_dir: Path, export_dir: Path | None) -> None:
    from trainer.curve import CURVE_NAME, CURVE_PLOT_NAME, read_curve, render_curve

    points = read_curve(output_dir / CURVE_NAME)
    if not points:
        return
    png = render_curve(points)
    for directory in filter(None, (output_dir, export_dir)):
        if directory.is_dir():
            tmp = directory / (CURVE_PLOT_NAME + ".tmp")
            tmp.write_bytes(png)
            tmp.replace(directory / CURVE_PLOT_NAME)
    if export_dir is not None and export_dir.is_dir():
        shutil.copyfile(output_dir / CURVE_NAME, export_dir / CURVE_NAME)


def train(cfg: TrainConfig, source: DatasetSource, output_dir: str | Path, *, rank: int, world_size: int,
          local_rank: int = 0, model_config: ModelConfig | None = None, stop_after: int | None = None,
          curve_sets: Sequence[Any] = ()) -> TrainResult:
    """Train (or resume) a CLIP model; every rank calls this with the process group up.

    ``stop_after`` ends this call after that many global steps without exporting (as if the
    job were killed right after a checkpoint): tests use it to prove resumption. ``curve_sets``
    (``trainer.curve.CurveSet``, needed on rank 0) are scored every ``cfg.curve_every_steps``.
    """
    output_dir = Path(output_dir)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    ds_config = deepspeed_config(cfg, world_size, on_cuda)
    model_config = model_config or load_model_config(cfg.model)
    balance = online_balance(source, cfg.balance_online_t, cfg.seed) if cfg.balance_online_t else None
    # Online balancing draws ~expected_rows pairs per epoch: an epoch is that many samples.
    steps = total_steps(cfg, int(balance.expected_rows) if balance else source.num_rows)
    run_config = {"train": dataclasses.asdict(cfg), "model": model_config.to_dict(), "train_batch": cfg.train_batch,
                  "total_steps": steps, "dataset_root": source.root, "dataset_rows": source.num_rows,
                  "deepspeed": ds_config}
    if rank == 0:
        from trainer.provenance import dataset_identity, write_training_ids

        output_dir.mkdir(parents=True, exist_ok=True)
        # What this run trains on, checked against what the checkpoints here were trained on.
        identity, training_ids = dataset_identity(source)
        run_config["dataset"] = identity.to_dict()
        _check_resumable(output_dir, run_config, cfg.on_dataset_change)
        tmp = output_dir / (RUN_CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(run_config, indent=2, default=_json_default) + "\n")
        tmp.replace(output_dir / RUN_CONFIG_NAME)
        write_training_ids(output_dir, training_ids)
    dist.barrier()

    # Same seed on every rank: identical initial weights without a broadcast.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    engine, scheduler = build_engine(cfg, model_config, ds_config, steps)

    num_streams = max(1, cfg.num_workers)
    step, position = 0, initial_position(num_streams)
    tag = latest_checkpoint(output_dir)
    if tag is not None:
        step, position = load_checkpoint(engine, output_dir, tag, rank)
        if rank == 0:
            log_event(log, "resumed", checkpoint=tag, step=step)
    dataset = ShardStream(source, rank=rank, world_size=world_size, micro_batch=cfg.micro_batch,
                          image_size=model_config.image_size, context_length=model_config.context_length,
                          shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, num_streams=num_streams, position=position,
                          balance=balance, crop_scale=cfg.crop_scale, caption_sampling=cfg.caption_sampling,
                          caption_frames=cfg.caption_frames, caption_frame_prob=cfg.caption_frame_prob)
    batches = iter(make_loader(dataset, cfg.num_workers))
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    log_file = open(output_dir / LOG_NAME, "a") if rank == 0 else None
    losses: list[float] = []
    last_step = steps if stop_after is None else min(steps, stop_after)
    if rank == 0:
        if cfg.effective_zero_stage != cfg.zero_stage:
            log_event(log, "one rank: ZeRO stage changed by train.single_rank_zero_stage", zero_stage=cfg.zero_stage,
                      runs_stage=cfg.effective_zero_stage, reason="ZeRO partitions nothing across one rank")
        log_event(log, "training", model=cfg.model, zero_stage=cfg.effective_zero_stage, precision=cfg.precision,
                  world_size=world_size, train_batch=cfg.train_batch, steps=steps, start_step=step, device=str(device))
    curve = _curve_hook(curve_sets, output_dir, rank) if cfg.curve_every_steps and curve_sets else None
    if curve is not None and step == 0:
        curve(engine.module, 0)
    try:
        while step < last_step:
            started = time.perf_counter()
            data_wait = 0.0
            step_loss = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                wait_start = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - wait_start
                images = batch["images"].to(device, non_blocking=True)
                tokens = batch["tokens"].to(device, non_blocking=True)
                image_features, text_features, logit_scale = engine(images, tokens)
                loss = loss_fn(image_features, text_features, logit_scale)
                engine.backward(loss)
                engine.step()
                position = advance_position(position, batch["state"])
                step_loss += loss.detach().float() / cfg.grad_accum
            step += 1
            # Every rank's loss covers its own rows; their mean is the global-batch loss.
            dist.all_reduce(step_loss)
            mean_loss = step_loss.item() / world_size
            losses.append(mean_loss)
            elapsed = time.perf_counter() - started
            if rank == 0:
                record = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                          "logit_scale": float(logit_scale.detach().float().reshape(-1)[0]),
                          "samples_per_s": cfg.train_batch / elapsed, "data_wait_s": data_wait, "step_s": elapsed,
                          "epoch": min(s["epoch"] for s in position["streams"]), "skipped": skipped_total(position)}
                log_file.write(json.dumps(record, default=_json_default) + "\n")
                log_file.flush()
                if step % cfg.log_every_steps == 0 or step == 1 or step == last_step:
                    log_event(log, "step", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()})
            if curve is not None and (step % cfg.curve_every_steps == 0 or step == steps):
                curve(engine.module, step)
            if step % cfg.save_every_steps == 0 or step == last_step:
                save_checkpoint(engine, output_dir, step, position, rank, keep=cfg.keep_checkpoints)
        export_dir = output_dir / EXPORT_DIR
        if step >= steps:
            export_model(engine, export_dir, rank, zero_stage=cfg.effective_zero_stage)
        if rank == 0 and curve is not None:
            _write_curve_plot(output_dir, export_dir if step >= steps else None)
        dist.barrier()
    finally:
        if log_file is not None:
            log_file.close()
    return TrainResult(export_dir=export_dir, steps=step, losses=tuple(losses), skipped=skipped_total(position))


def export_model(engine: Any, export_dir: Path, rank: int, zero_stage: int) -> None:
    """Rank 0 writes the OpenAI-layout fp32 weights; ZeRO-3 shards are gathered first (all ranks)."""
    import deepspeed

    module: CLIP = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        if rank == 0:
            export = CLIP(module.config)
            export.load_state_dict({k: v.detach().float().cpu() for k, v in module.state_dict().items()})
            save_exported(export, export_dir)
            from trainer.provenance import TRAINING_IDS_NAME

            # The export carries what it was trained on: evaluation checks its hold-out against it.
            for name in (RUN_CONFIG_NAME, TRAINING_IDS_NAME):
                tmp = export_dir / (name + ".tmp")
                shutil.copyfile(export_dir.parent / name, tmp)
                tmp.replace(export_dir / name)


def read_train_log(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of a run (a resumed run appends; a repeated step keeps its latest record)."""
    path = Path(output_dir) / LOG_NAME
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------------------------
# Entrypoint
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from infra.config import ConfigError, load_config
    from infra.log import setup_logging
    from trainer.curve import load_curve_sets

    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", type=Path, default=None, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--manifest", default=None, help="dataset manifest.json (default: the config's dataset)")
    parser.add_argument("--output-dir", type=Path, default=None, help="local run directory (default: from config)")
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    setup_logging()
    # DeepSpeed compiles its CPU ops on first use; keep them with the environment, built once.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".venv" / "torch_extensions"))
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"trainer: config error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world_size))))
    if "OMP_NUM_THREADS" not in os.environ:  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    master_port = int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None
    init_distributed(rank, world_size, local_rank, os.environ.get("MASTER_ADDR", "127.0.0.1"), master_port)
    try:
        source = load_manifest(args.manifest or config.manifest_uri(), config.storage)
        result = train(config.train, source, args.output_dir or config.train_dir(), rank=rank,
                       world_size=world_size, local_rank=local_rank, stop_after=args.stop_after,
                       curve_sets=load_curve_sets(config) if rank == 0 else ())
        if rank == 0:
            log_event(log, "done", export_dir=str(result.export_dir), steps=result.steps, skipped=result.skipped)
    except Exception:
        log.exception("training failed on rank %d", rank)
        raise
    finally:
        shutdown_distributed(rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
