"""trainer.train and flows.train: real DeepSpeed runs (gloo on CPU) of the tiny config.

One Prefect-harness flow run (1 process, ZeRO-2) is the uninterrupted reference; the resume test
replays it stopped and resumed; a 2-process ZeRO-2 run goes through torchrun; ZeRO-3 runs once.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from pathlib import Path

import pytest
import torch

from infra.config import Config, TrainConfig
from tests.trainer_fixtures import sample_pairs, write_dataset
from trainer.train import (build_engine, clear_stale_op_locks, model_and_optimizer, cosine_with_warmup, deepspeed_config, init_distributed,
                           param_groups, shutdown_distributed, total_steps, train)

STEPS = 8
TRAIN = TrainConfig(model="tiny", zero_stage=2, micro_batch=16, max_steps=STEPS, lr=2e-3, warmup_steps=2,
                    weight_decay=0.1, shuffle_buffer=32, save_every_steps=4, log_every_steps=4, seed=0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, sample_parquet) -> str:
    # 64 pairs in 4 shards: small enough that the tiny model fits them within a few steps.
    root = tmp_path_factory.mktemp("dataset")
    return str(write_dataset(root, sample_pairs(sample_parquet, 64), rows_per_shard=16))


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _run_in_process(train_cfg: TrainConfig, manifest: str, run_dir: Path, stop_after: int | None = None):
    from trainer.data import load_manifest

    init_distributed(rank=0, world_size=1)
    try:
        return train(train_cfg, load_manifest(manifest), run_dir, rank=0, world_size=1, stop_after=stop_after)
    finally:
        shutdown_distributed(rank=0)


# ---- pieces --------------------------------------------------------------------------------------


def test_batch_arithmetic_and_precision_are_checked():
    cfg = dataclasses.replace(TRAIN, micro_batch=8, grad_accum=3, world_size=2)
    ds = deepspeed_config(cfg, world_size=2, on_cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (48, 8, 3)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == TRAIN.grad_clip
    with pytest.raises(ValueError, match="2 but 1 processes"):
        deepspeed_config(cfg, world_size=1, on_cuda=False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        deepspeed_config(dataclasses.replace(TRAIN, precision="fp16"), world_size=1, on_cuda=False)
    assert deepspeed_config(dataclasses.replace(TRAIN, precision="fp16"), 1, on_cuda=True)["fp16"]["loss_scale"] == 0
    assert deepspeed_config(dataclasses.replace(TRAIN, precision="bf16"), 1, on_cuda=False)["bf16"]["enabled"]
    assert total_steps(dataclasses.replace(TRAIN, max_steps=None, epochs=3), num_rows=100) == 3 * (100 // 16)


def test_single_rank_zero_stage_applies_on_one_rank_only_and_is_validated():
    from infra.config import ConfigError, config_from_dict

    fast = dataclasses.replace(TRAIN, single_rank_zero_stage=0)
    assert (TRAIN.effective_zero_stage, fast.effective_zero_stage) == (2, 0)
    assert deepspeed_config(fast, 1, on_cuda=False)["zero_optimization"] == {"stage": 0}
    two = dataclasses.replace(fast, world_size=2, micro_batch=8)
    assert two.effective_zero_stage == 2 and deepspeed_config(two, 2, on_cuda=False)["zero_optimization"]["stage"] == 2
    # ZeRO-2 on CPU: no contiguous-gradient bucket; on CUDA DeepSpeed's defaults stay.
    assert deepspeed_config(TRAIN, 1, on_cuda=False)["zero_optimization"] == {"stage": 2, "contiguous_gradients": False}
    assert deepspeed_config(TRAIN, 1, on_cuda=True)["zero_optimization"] == {"stage": 2}
    assert config_from_dict({"train": {"single_rank_zero_stage": 0}}).train.effective_zero_stage == 0
    with pytest.raises(ConfigError, match="single_rank_zero_stage"):
        config_from_dict({"train": {"single_rank_zero_stage": 1}})


def test_a_run_of_another_zero_stage_is_not_resumed(tmp_path):
    from trainer.train import RUN_CONFIG_NAME, _check_resumable

    def run_config(cfg: TrainConfig) -> dict:
        return {"train": dataclasses.asdict(cfg), "model": {"name": "tiny"}, "train_batch": cfg.train_batch,
                "deepspeed": deepspeed_config(cfg, 1, on_cuda=False)}
    (tmp_path / RUN_CONFIG_NAME).write_text(json.dumps(run_config(TRAIN)))
    _check_resumable(tmp_path, run_config(TRAIN))  # the same stage resumes
    with pytest.raises(ValueError, match="ZeRO stage 2, this run's is 0"):
        _check_resumable(tmp_path, run_config(dataclasses.replace(TRAIN, single_rank_zero_stage=0)))


def test_deepspeed_steps_take_the_plain_loops_losses():
    """Our engine set-up (build_engine + deepspeed_config) trains like a plain PyTorch loop: ZeRO-2
    as configured and the one-rank stage 0, same seed, same batches, the same first losses."""
    from trainer.loss import ClipLoss
    from trainer.model import load_model_config

    cfg = dataclasses.replace(TRAIN, micro_batch=8, max_steps=None, grad_clip=0.05)  # a clip that bites
    model_config = load_model_config(cfg.model)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(cfg.micro_batch, 3, 32, 32, generator=generator),
                torch.randint(1, 49407, (cfg.micro_batch, 77), generator=generator)) for _ in range(4)]
    loss_fn = ClipLoss()

    def plain_losses(unfused: bool = False) -> list[float]:
        torch.manual_seed(cfg.seed)
        model, optimizer, scheduler = model_and_optimizer(cfg, model_config, 10)
        if unfused:  # torch's default per-tensor AdamW loop, as before the fused kernel
            for group in optimizer.param_groups:
                group["fused"] = None
        losses = []
        for images, tokens in batches:
            loss = loss_fn(*model(images, tokens))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses
    plain = plain_losses()
    assert plain[-1] < plain[0]  # it learns: the steps did something
    assert plain_losses(unfused=True) == pytest.approx(plain, rel=1e-5)  # the fused AdamW: the same update

    init_distributed(rank=0, world_size=1)
    try:
        for ds_cfg in (cfg, dataclasses.replace(cfg, single_rank_zero_stage=0)):
            torch.manual_seed(cfg.seed)
            engine, _ = build_engine(ds_cfg, model_config, deepspeed_config(ds_cfg, 1, on_cuda=False), 10)
            assert engine.zero_optimization_stage() == ds_cfg.effective_zero_stage
            # Stage 0 on one rank skips the all-reduce over itself (an identity): the losses show it is one.
            assert engine.enable_backward_allreduce == (ds_cfg.effective_zero_stage != 0)
            losses = []
            for images, tokens in batches:
                loss = loss_fn(*engine(images, tokens))
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            assert losses == pytest.approx(plain, rel=1e-5), (ds_cfg.effective_zero_stage, losses, plain)
    finally:
        shutdown_distributed(rank=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_shortcuts_take_deepspeeds_own_steps(precision):
    """trainer/zero.py on ZeRO-2, one rank, a clip that bites: skipping the reduction over one rank
    leaves the weights bit for bit as DeepSpeed's own code does; the foreach norm is DeepSpeed's fp64
    norm to float rounding, and so are the weights after it (bf16: to a bf16 rounding flip). Both
    paths really run (no fallback)."""
    import deepspeed

    from trainer.loss import ClipLoss
    from trainer.model import load_model_config
    from trainer.zero import NORM, REDUCTION, speed_up_zero_optimizer

    cfg = dataclasses.replace(TRAIN, micro_batch=8, max_steps=None, grad_clip=0.05, zero_shortcuts=False,
                              precision=precision)
    model_config = load_model_config(cfg.model)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(cfg.micro_batch, 3, 32, 32, generator=generator),
                torch.randint(1, 49407, (cfg.micro_batch, 77), generator=generator)) for _ in range(4)]
    weights, losses = {}, {}
    init_distributed(rank=0, world_size=1)
    try:
        for variant, asked in (("deepspeed", ()), ("reduction", (REDUCTION,)), ("both", (NORM, REDUCTION))):
            torch.manual_seed(cfg.seed)
            engine, _ = build_engine(cfg, model_config, deepspeed_config(cfg, 1, on_cuda=False), 10)
            optimizer = engine.optimizer
            done, refused = speed_up_zero_optimizer(optimizer, deepspeed.__version__, norm=NORM in asked,
                                                    reduction=REDUCTION in asked)
            assert done == asked and refused is None
            reductions, own_bucket = [], optimizer.allreduce_bucket
            optimizer.allreduce_bucket = lambda *a, **k: reductions.append(1) or own_bucket(*a, **k)
            losses[variant], gaps = [], []
            for images, tokens in batches:
                loss = ClipLoss()(*engine(images, tokens))
                engine.backward(loss)
                for group in range(len(optimizer.bit16_groups)):
                    grads, params = optimizer.averaged_gradients[group], optimizer.params_in_partition[group]
                    own = type(optimizer).get_grad_norm_direct(optimizer, grads, params)  # DeepSpeed's fp64 loop
                    gaps.append(abs(optimizer.get_grad_norm_direct(grads, params).item() / own.item() - 1))
                assert engine.get_global_grad_norm() is None or engine.get_global_grad_norm() > cfg.grad_clip
                engine.step()
                assert engine.get_global_grad_norm() > cfg.grad_clip  # the clip bites every step
                losses[variant].append(loss.item())
            assert bool(reductions) == (REDUCTION not in asked)  # the shortcut ran, not DeepSpeed's reduction
            assert max(gaps) < 5e-6 and (max(gaps) > 0) == (NORM in asked)
            weights[variant] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    finally:
        shutdown_distributed(rank=0)
    assert losses["reduction"] == losses["deepspeed"]
    assert all(torch.equal(weights["reduction"][k], w) for k, w in weights["deepspeed"].items())
    assert losses["both"] == pytest.approx(losses["deepspeed"], rel=1e-6 if precision == "fp32" else 1e-2)
    if precision == "fp32":
        for k, w in weights["deepspeed"].items():
            torch.testing.assert_close(weights["both"][k], w, rtol=1e-5, atol=1e-6)
    else:  # a norm one rounding off flips some bf16 weights' last bit, and AdamW's step on a gradient
        # near zero can then flip sign (up to 2 x lr): a few weights in a million, not closeness of each.
        # The norm itself is checked above, on the same gradients.
        far = sum(int(((weights["both"][k].float() - w.float()).abs() > 1e-3).sum()) for k, w in weights["deepspeed"].items())
        assert far <= 1e-5 * sum(w.numel() for w in weights["deepspeed"].values()), far


def test_zero_shortcuts_are_set_by_default_and_refused_on_an_unchecked_deepspeed(caplog):
    import deepspeed

    from trainer.model import load_model_config
    from trainer.zero import speed_up_zero_optimizer

    cfg = dataclasses.replace(TRAIN, micro_batch=8, max_steps=None)
    init_distributed(rank=0, world_size=1)
    try:
        with caplog.at_level("INFO", logger="witflow.trainer"):
            engine, _ = build_engine(cfg, load_model_config(cfg.model), deepspeed_config(cfg, 1, on_cuda=False), 10)
        said = [r.fields for r in caplog.records if r.getMessage() == "ZeRO shortcuts"]
        assert said == [{"shortcuts": "grad_norm,one_rank_reduction", "switch": "train.zero_shortcuts"}]
        optimizer = engine.optimizer
        assert optimizer.get_grad_norm_direct.__func__ is not type(optimizer).get_grad_norm_direct
        off = dataclasses.replace(cfg, zero_shortcuts=False)
        engine, _ = build_engine(off, load_model_config(off.model), deepspeed_config(off, 1, on_cuda=False), 10)
        optimizer = engine.optimizer
        assert optimizer.get_grad_norm_direct.__func__ is type(optimizer).get_grad_norm_direct
        assert optimizer.allreduce_and_copy.__func__ is type(optimizer).allreduce_and_copy
        assert speed_up_zero_optimizer(optimizer, "0.20.1") == ((), "DeepSpeed 0.20.1 is not a checked version (0.19.x)")
        assert optimizer.get_grad_norm_direct.__func__ is type(optimizer).get_grad_norm_direct
        assert deepspeed.__version__.startswith("0.19.")  # the pinned version is a checked one
    finally:
        shutdown_distributed(rank=0)


class _ChangedOptimizer:
    """A stand-in for a DeepSpeed release whose methods changed their arguments."""

    def get_grad_norm_direct(self, gradients, params, norm_type=2, mpu=None):
        return None

    def allreduce_and_copy(self, small_bucket, communication_data_type, rank=None, log=None, divide=True,
                           process_group=None, output_bucket=None):
        return None


def test_zero_shortcuts_skip_a_method_whose_arguments_changed():
    from trainer.zero import REDUCTION, speed_up_zero_optimizer

    optimizer = _ChangedOptimizer()
    done, refused = speed_up_zero_optimizer(optimizer, "0.19.8")
    assert done == (REDUCTION,)
    assert refused == "_ChangedOptimizer.get_grad_norm_direct is not the method checked"
    assert optimizer.get_grad_norm_direct.__func__ is _ChangedOptimizer.get_grad_norm_direct


def test_the_one_rank_reduction_shortcut_runs_deepspeeds_reduction_on_more_ranks(monkeypatch):
    """Over a group of two ranks (world size as deepspeed.comm reports it), or a bucket in another
    dtype than the communication's, DeepSpeed's own all-reduce runs, with the same arguments."""
    from deepspeed import comm

    from trainer.zero import _skip_one_rank_reduction

    calls = []

    class Optimizer:
        dp_process_group, overlap_comm, sequence_parallel_size = "group", False, 1

        def _add_to_grad_partition_buffer(self, output, grad):
            calls.append(("kept", grad.dtype))

    def own(*args, **kwargs):
        calls.append(("deepspeed", args[1], kwargs["process_group"]))

    bucket = [torch.ones(3), torch.ones(2)]
    for world, dtype, expected in ((2, torch.float32, [("deepspeed", torch.float32, None)]),
                                   (1, torch.bfloat16, [("deepspeed", torch.bfloat16, None)]),
                                   (1, torch.float32, [("kept", torch.float32)] * 2)):
        monkeypatch.setattr(comm, "get_world_size", lambda group=None, world=world: world)
        calls.clear()
        _skip_one_rank_reduction(Optimizer(), own, bucket, dtype)
        assert calls == expected, (world, dtype)


def test_weight_decay_skips_gains_biases_embeddings_and_logit_scale():
    from trainer.model import CLIP, load_model_config

    model = CLIP(load_model_config("tiny"))
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "visual.conv1.weight" in decayed and "transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert "text_projection" in decayed and "visual.proj" in decayed
    for name in ("logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
                 "visual.positional_embedding", "ln_final.weight", "transformer.resblocks.0.attn.in_proj_bias"):
        assert name not in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factor = cosine_with_warmup(warmup_steps=4, total_steps=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx(0.5) and factor(20) == pytest.approx(0.0)
    values = [factor(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_train_log_reads_back_a_resumed_run_once_per_step(tmp_path):
    from trainer.train import LOG_NAME, read_train_log

    assert read_train_log(tmp_path) == []
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4}, {"step": 3, "loss": 2.0}]
    (tmp_path / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    assert read_train_log(tmp_path) == [lines[0], lines[2], lines[3]]  # the resumed run's step 2 wins


def test_curve_rows_thin_a_long_run_and_keep_the_last_step():
    from trainer.run import CURVE_MAX_ROWS, curve_rows, curve_summary

    records = [{"step": s, "loss": 1 / s, "lr": 1e-3, "logit_scale": 14.3, "samples_per_s": 100.0,
                "data_wait_s": 0.01, "skipped": {}} for s in range(1, 2 * CURVE_MAX_ROWS + 3)]
    rows = curve_rows(records)
    assert [r["step"] for r in rows][:3] == [1, 3, 5] and rows[-1]["step"] == records[-1]["step"]
    assert len(rows) == CURVE_MAX_ROWS + 2 and all("skipped" not in r for r in rows)
    assert rows[1]["loss"] == round(1 / 3, 5)
    assert [r["step"] for r in curve_rows(records[:5])] == [1, 2, 3, 4, 5] and curve_rows([]) == []
    summary = curve_summary(records, "s3://b/run/train/export")
    assert f"steps: {records[-1]['step']}; loss 1.0000 -> " in summary and "`s3://b/run/train/export`" in summary


def test_a_killed_loaders_op_lock_is_removed_a_fresh_one_waited_for(tmp_path, caplog):
    import threading
    import time

    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    threading.Timer(0.3, fresh.unlink).start()  # a build in progress, finishing
    removed = clear_stale_op_locks(tmp_path, stale_after_s=60, poll_s=0.05)
    assert removed == [str(stale)] and not stale.exists() and not fresh.exists()
    assert "stale op build lock" in caplog.text
    assert clear_stale_op_locks(tmp_path / "missing") == []


def test_ranks_get_the_secrets_in_their_environment_not_in_their_config_file(tmp_path):
    import yaml

    from infra.config import StorageConfig
    from trainer.run import rank_environment, write_rank_config

    storage = StorageConfig(endpoint_url="http://127.0.0.1:1", access_key_id="AKID", secret_access_key="SECRET")
    path = write_rank_config(Config(storage=storage, train=dataclasses.replace(TRAIN, world_size=2)), tmp_path)
    written = yaml.safe_load(path.read_text())
    assert written["storage"]["access_key_id"] is None and written["storage"]["secret_access_key"] is None
    assert written["storage"]["endpoint_url"] == "http://127.0.0.1:1" and written["train"]["world_size"] == 2
    assert "SECRET" not in path.read_text()
    env = rank_environment(2, storage)
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("AKID", "SECRET")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parent.parent)


# ---- real runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_run(prefect_harness, manifest, tmp_path_factory):
    """The uninterrupted reference: flows.train.train, 1 rank, ZeRO-2, under a real Prefect API."""
    from flows.train import train as train_flow

    from infra.config import EvalSetConfig

    output = tmp_path_factory.mktemp("flowrun")
    # The learning curve on: it must not change the run (the resume test compares losses with it).
    curve = dataclasses.replace(TRAIN, curve_every_steps=4, curve_eval_sets=("oc",))
    config = Config(output=str(output), train=curve,
                    eval_sets=(EvalSetConfig(name="oc", kind="openclipart-heldout", max_images=48),))
    export_uri = train_flow(config, manifest=manifest)
    return Path(export_uri), output / "train"


@pytest.mark.slow
def test_flow_one_process_zero2_learns_exports_and_publishes(flow_run):
    from prefect.client.orchestration import get_client

    from trainer.model import load_exported

    export_dir, run_dir = flow_run
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert min(losses[-3:]) < losses[0] - 0.3, losses  # learning, not noise
    assert all(r["samples_per_s"] > 0 and r["data_wait_s"] >= 0 for r in records)
    assert records[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine reached its end
    model, config = load_exported(export_dir)
    assert config.vision_width == 96 and (export_dir / "train_config.json").is_file()
    assert (run_dir / "config.resolved.yaml").is_file()
    assert torch.load(export_dir / "model.pt", weights_only=True)["logit_scale"].shape == ()

    async def artifacts() -> list:
        async with get_client() as client:
            return await client.read_artifacts()

    import asyncio
    by_key = {a.key: a for a in asyncio.run(artifacts()) if a.key}
    assert {"train-curve", "train-summary", "train-curve-plot", "learning-curve", "learning-curve-plot"} <= set(by_key)
    # The plot artifact was rewritten in place with the curve (it starts as a placeholder line).
    assert by_key["train-curve-plot"].data.startswith("![train-curve-plot](data:image/png;base64,")
    assert (run_dir / "training_curve.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_learning_curve_scores_held_out_sets_every_n_steps(flow_run):
    from PIL import Image

    from trainer.curve import CURVE_NAME, CURVE_PLOT_NAME, read_curve

    export_dir, run_dir = flow_run
    points = read_curve(run_dir / CURVE_NAME)
    assert [p["step"] for p in points] == [0, 4, 8]
    scores = points[-1]["sets"]["oc"]
    assert scores["images"] == 48 and scores["chance"] == pytest.approx(1 / 22)
    for variant in ("bare", "single", "ensemble"):
        assert 0.0 <= scores[variant]["mean_per_class"] <= 1.0 and 0.0 <= scores[variant]["top1"] <= 1.0
    assert points[0]["sets"]["oc"] != points[-1]["sets"]["oc"]  # the model changed between the points
    assert read_curve(export_dir / CURVE_NAME) == points
    assert Image.open(export_dir / CURVE_PLOT_NAME).size[0] > 0 and (run_dir / CURVE_PLOT_NAME).is_file()


@pytest.mark.slow
def test_resumed_run_continues_the_same_loss_trajectory(flow_run, manifest, tmp_path):
    reference = [r["loss"] for r in _records(flow_run[1])]
    first = _run_in_process(TRAIN, manifest, tmp_path, stop_after=STEPS // 2)
    assert first.steps == STEPS // 2 and not (tmp_path / "export").exists()
    assert (tmp_path / "checkpoints" / "latest_complete").read_text().strip() == f"step{STEPS // 2:08d}"
    second = _run_in_process(TRAIN, manifest, tmp_path)
    assert second.steps == STEPS and len(second.losses) == STEPS // 2
    resumed = list(first.losses) + list(second.losses)
    assert resumed == pytest.approx(reference, rel=1e-5, abs=1e-6)
    # A changed batch layout must not silently resume into the same directory.
    with pytest.raises(ValueError, match="micro_batch changed"):
        _run_in_process(dataclasses.replace(TRAIN, micro_batch=8, grad_accum=2, max_steps=STEPS + 2), manifest,
                        tmp_path)


@pytest.mark.slow
def test_one_rank_stage0_trains_the_zero2_runs_trajectory(flow_run, manifest, tmp_path, caplog):
    reference = [r["loss"] for r in _records(flow_run[1])]
    with caplog.at_level("INFO", logger="witflow.trainer"):
        result = _run_in_process(dataclasses.replace(TRAIN, single_rank_zero_stage=0), manifest, tmp_path)
    assert list(result.losses) == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert "train.single_rank_zero_stage" in caplog.text  # the changed stage is said, not silent
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["deepspeed"]["zero_optimization"]["stage"] == 0 and saved["train"]["zero_stage"] == 2


@pytest.mark.slow
def test_zero3_bf16_smoke_exports_full_weights(manifest, tmp_path):
    from trainer.model import load_exported

    cfg = dataclasses.replace(TRAIN, zero_stage=3, precision="bf16", max_steps=3, micro_batch=8)
    result = _run_in_process(cfg, manifest, tmp_path)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    model, _ = load_exported(result.export_dir)  # gathered from the ZeRO-3 partitions: full shapes
    assert model.token_embedding.weight.shape == (49408, 64)
    assert model.token_embedding.weight.dtype == torch.float32 and torch.isfinite(model.token_embedding.weight).all()


@pytest.mark.slow
def test_two_process_zero2_through_torchrun(prefect_harness, manifest, tmp_path):
    from flows.train import train as train_flow

    cfg = dataclasses.replace(TRAIN, world_size=2, micro_batch=8)  # same global batch of 16
    shm_before = set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))
    export_uri = train_flow(Config(output=str(tmp_path), train=cfg), manifest=manifest)
    records = _records(tmp_path / "train")
    losses = [r["loss"] for r in records]
    assert len(losses) == STEPS and min(losses[-3:]) < losses[0] - 0.3, losses
    assert (Path(export_uri) / "model.pt").is_file()
    state = torch.load(tmp_path / "train" / "checkpoints" / f"step{STEPS:08d}" / "rank1_trainer_state.pt",
                       weights_only=False)
    assert state["step"] == STEPS and state["position"]["batches"] == STEPS
    assert set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*")) <= shm_before  # none leaked


def test_curve_maths_on_known_predictions(tmp_path):
    import numpy as np

    from trainer.curve import mean_per_class_accuracy, read_curve, render_curve
    from trainer.run import learning_curve_rows

    labels = np.array([0, 0, 0, 0, 1, 1])
    predictions = np.array([0, 0, 0, 0, 0, 1])  # class 0: 4/4, class 1: 1/2
    assert mean_per_class_accuracy(labels, predictions, 3) == pytest.approx(0.75)  # absent class 2 not counted
    point = {"step": 5, "sets": {"s": {"chance": 0.5, "images": 6, **{
        v: {"top1": 5 / 6, "mean_per_class": 0.75} for v in ("bare", "single", "ensemble")}}}}
    (tmp_path / "curve.jsonl").write_text(json.dumps({**point, "step": 5, "stale": 1}) + "\n" + json.dumps(point) + "\n")
    assert read_curve(tmp_path / "curve.jsonl") == [point]  # a resumed run's repeated step keeps its latest point
    assert learning_curve_rows([point]) == [{"step": 5, "eval set": "s", "chance": 0.5, "bare mean per-class": 0.75,
                                             "single mean per-class": 0.75, "ensemble mean per-class": 0.75,
                                             "ensemble top-1": 0.8333}]
    assert render_curve([point])[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_needs_named_eval_sets_and_no_zero3():
    from infra.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="curve_eval_sets: \\['nope'\\] not among eval_sets"):
        config_from_dict({"train": {"curve_every_steps": 5, "curve_eval_sets": ["nope"]}})
    with pytest.raises(ConfigError, match="needs train.curve_eval_sets"):
        config_from_dict({"train": {"curve_every_steps": 5}})
    with pytest.raises(ConfigError, match="ZeRO-3"):
        config_from_dict({"train": {"curve_every_steps": 5, "curve_eval_sets": ["a"], "zero_stage": 3},
                          "eval_sets": [{"name": "a", "kind": "mnist"}]})
    with pytest.raises(ConfigError, match="balance_online_t must be > 0"):
        config_from_dict({"train": {"balance_online_t": 0}})
