"""Training as a Prefect flow: run the ranks, publish the export and the training curve.

One rank runs in the flow's process; more run under ``torchrun`` as a subprocess on this machine
(``python -m trainer.train``, the same entrypoint a cluster job uses: see infra/launch.sh). The
work is in trainer/ (trainer/run.py around the ranks); this module only resolves inputs from the
config and orchestrates.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from infra.config import Config
from infra.log import get_logger, log_event
from infra.prefect_utils import publish_image, publish_markdown, publish_table, retry_if_transient

log = get_logger(__name__)


@task(name="train-ranks")
def run_ranks(config: Config, manifest: str, run_dir: Path) -> Path:
    """Run every rank to completion (or resume an interrupted run); returns the local export dir."""
    from trainer.run import run_ranks as run_every_rank

    return run_every_rank(config, manifest, run_dir)


@task(name="publish-export", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def publish_export(config: Config, export_dir: Path) -> str:
    """The export's URI: the local dir, or a copy at ``Config.export_uri`` in object storage."""
    from trainer.run import publish_export as publish

    return publish(export_dir, config.export_uri(), config.storage)


@task(name="publish-training-curve")
def publish_curve(run_dir: Path, export_uri: str) -> None:
    from trainer.run import curve_rows, curve_summary
    from trainer.train import read_train_log

    records = read_train_log(run_dir)
    if not records:
        return
    publish_table("train-curve", curve_rows(records), description="loss, lr, logit scale, samples/s, data wait per step")
    publish_markdown("train-summary", curve_summary(records, export_uri), description="training summary")


@task(name="publish-learning-curve")
def publish_learning_curve(run_dir: Path) -> None:
    """Zero-shot accuracy every ``train.curve_every_steps`` steps: a table and the PNG (if the curve is on)."""
    from trainer.curve import CURVE_NAME, CURVE_PLOT_NAME, read_curve
    from trainer.run import learning_curve_rows

    points = read_curve(run_dir / CURVE_NAME)
    if not points:
        return
    publish_table("learning-curve", learning_curve_rows(points),
                  description="zero-shot mean per-class accuracy on held-out sets during training")
    if (run_dir / CURVE_PLOT_NAME).is_file():
        publish_image("learning-curve-plot", (run_dir / CURVE_PLOT_NAME).read_bytes(),
                      "zero-shot mean per-class accuracy against training steps")


@flow(name="train", log_prints=True)
def train(config: Config, manifest: str | None = None) -> str:
    """Train on a built dataset (default: this config's) with DeepSpeed; returns the export dir URI."""
    from trainer.run import prepare_run_dir

    manifest = manifest or config.manifest_uri()
    run_dir = prepare_run_dir(config)
    log_event(log, "training", manifest=manifest, run_dir=str(run_dir), model=config.train.model,
              world_size=config.train.world_size, zero_stage=config.train.zero_stage)
    export_dir = run_ranks(config, manifest, run_dir)
    export_uri = publish_export(config, export_dir)
    publish_curve(run_dir, export_uri)
    publish_learning_curve(run_dir)
    print(f"training done: export={export_uri}")
    return export_uri
