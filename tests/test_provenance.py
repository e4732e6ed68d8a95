"""A checkpoint knows what it was trained on (issue 16 #1): resuming on another dataset in the same
folder is refused (or starts afresh, when configured, and says so), and retrieval is never reported
as "excluded from training" when the checkpoint was trained on held-out pairs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from infra.config import EvalConfig, TrainConfig
from infra.manifest import build_manifest, write_manifest
from infra.storage import ObjectStore
from tasks.shards import write_shard
from tests.trainer_fixtures import sample_pairs
from trainer.train import init_distributed, shutdown_distributed, train

pytestmark = pytest.mark.slow

TRAIN = TrainConfig(model="tiny", zero_stage=2, micro_batch=16, max_steps=2, lr=2e-3, warmup_steps=1,
                    shuffle_buffer=32, save_every_steps=2, log_every_steps=1, seed=0)


def build(root: Path, train_rows: pa.Table, held: pa.Table | None = None) -> str:
    """A dataset as a build writes it, into ``root`` (whatever was there is replaced)."""
    shutil.rmtree(root, ignore_errors=True)
    store = ObjectStore(str(root))
    shards = [write_shard(store, 0, train_rows, row_group_rows=64)]
    holdout = [write_shard(store, 0, held, row_group_rows=64, prefix="holdout")] if held is not None else None
    write_manifest(store, build_manifest(config={}, shards=shards, funnel={}, queries=None, eval_index=None,
                                         holdout=holdout))
    return str(root / "manifest.json")


def run(cfg: TrainConfig, manifest: str, run_dir: Path):
    from trainer.data import load_manifest

    init_distributed(rank=0, world_size=1)
    try:
        return train(cfg, load_manifest(manifest), run_dir, rank=0, world_size=1)
    finally:
        shutdown_distributed(rank=0)


@pytest.fixture(scope="module")
def pairs(sample_parquet) -> pa.Table:
    return sample_pairs(sample_parquet, 96)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs):
    """A finished run on dataset A (rows 0-47 for training, 48-57 held out)."""
    base = tmp_path_factory.mktemp("trained")
    manifest = build(base / "dataset", pairs.slice(0, 48), pairs.slice(48, 10))
    run(TRAIN, manifest, base / "train")
    return base


def test_a_finished_checkpoint_is_not_resumed_on_another_dataset_built_into_the_same_folder(trained, pairs, tmp_path):
    dataset, run_dir = tmp_path / "dataset", tmp_path / "train"
    shutil.copytree(trained / "dataset", dataset)
    shutil.copytree(trained / "train", run_dir)
    exported = (run_dir / "export" / "model.pt").read_bytes()
    manifest = build(dataset, pairs.slice(40, 50))  # "the same config" built another way: other rows
    with pytest.raises(ValueError, match="trained on another dataset"):
        run(TRAIN, manifest, run_dir)
    assert (run_dir / "export" / "model.pt").read_bytes() == exported  # nothing re-exported under its name

    fresh = run(dataclasses.replace(TRAIN, on_dataset_change="restart"), manifest, run_dir)
    assert fresh.steps == TRAIN.max_steps and len(fresh.losses) == TRAIN.max_steps  # trained again, from step 0
    recorded = json.loads((run_dir / "export" / "train_config.json").read_text())["dataset"]
    import hashlib

    assert recorded["manifest_sha256"] == hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    assert recorded["rows"] == 50
    assert list((run_dir / "superseded").iterdir()), "the run trained on the old dataset is kept aside"


def test_retrieval_is_not_reported_as_excluded_when_the_checkpoint_trained_on_the_holdout(trained, pairs, tmp_path):
    from trainer.evaluate import evaluate_checkpoint

    cfg = EvalConfig(linear_probe=False, ensembles=False)
    own = evaluate_checkpoint(str(trained / "train" / "export"), [], cfg, results_uri=str(tmp_path / "own"),
                              dataset_uri=str(trained / "dataset"))
    assert own["retrieval"]["excluded_from_training"] is True  # its own hold-out: checked, disjoint
    assert "image_to_text_R@1" in own["retrieval"]

    # The folder rebuilt so that 10 of its held-out pairs are rows the checkpoint trained on.
    rebuilt = tmp_path / "dataset"
    build(rebuilt, pairs.slice(60, 30), pa.concat_tables([pairs.slice(0, 10), pairs.slice(90, 5)]))
    leaked = evaluate_checkpoint(str(trained / "train" / "export"), [], cfg, results_uri=str(tmp_path / "leaked"),
                                 dataset_uri=str(rebuilt))
    retrieval = leaked.get("retrieval", {})
    assert retrieval.get("excluded_from_training") is not True
    assert "image_to_text_R@1" not in retrieval, "no recall is reported on pairs the model was trained on"
    assert "10 of 15 held-out pairs" in leaked["errors"]["retrieval"]
