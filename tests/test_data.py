"""trainer.data: transforms, manifest reading, rank/worker split, resumable position, bad samples."""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from infra.manifest import build_manifest, write_manifest
from infra.schema import SCHEMA_VERSION
from infra.storage import ObjectStore
from tests.trainer_fixtures import sample_pairs, write_dataset
from trainer.data import (CLIP_MEAN, CLIP_STD, ShardStream, StreamState, advance_position, decode_image, image_transform,
                          initial_position, load_manifest, make_loader, skipped_total)
from trainer.tokenizer import CONTEXT_LENGTH, tokenize

ROWS = 96


@pytest.fixture(scope="module")
def pairs(sample_parquet) -> pa.Table:
    return sample_pairs(sample_parquet, ROWS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, pairs):
    return load_manifest(str(write_dataset(tmp_path_factory.mktemp("ds"), pairs, rows_per_shard=20)))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _stream(source, **kwargs) -> ShardStream:
    args = dict(rank=0, world_size=1, micro_batch=8, image_size=32, context_length=CONTEXT_LENGTH, shuffle_buffer=16,
                seed=0)
    return ShardStream(source, **{**args, **kwargs})


def test_transform_normalises_with_clip_mean_std_and_crops_deterministically():
    white = Image.new("RGB", (80, 40), (255, 255, 255))
    for train in (False, True):
        x = image_transform(32, train)(white, random.Random(0))
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-4)
    pixels = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    noise = Image.fromarray(pixels)
    square = noise.crop((0, 0, 64, 64))  # (96x64 is too wide for any 0.9-1.0 crop in 3/4-4/3: centre fallback)
    train = image_transform(32, True)
    assert torch.equal(train(square, random.Random(1)), train(square, random.Random(1)))
    assert not torch.equal(train(square, random.Random(1)), train(square, random.Random(2)))
    # Eval: centre crop of the shorter side: the outer columns of 96 never matter (16 are cropped;
    # the bicubic kernel reaches a few pixels past the box, so change only the outer 10).
    changed = pixels.copy()
    changed[:, :10] = 0
    changed[:, -10:] = 0
    evaluate = image_transform(32, False)
    assert torch.allclose(evaluate(noise), evaluate(Image.fromarray(changed)))


def test_decode_puts_transparency_on_white():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image = decode_image(_png(clear))
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 255, 255)
    with pytest.raises(Exception):
        decode_image(b"not an image")


def test_manifest_paths_are_relative_to_its_directory(tmp_path, pairs):
    manifest = write_dataset(tmp_path / "deep" / "dataset", pairs, rows_per_shard=40)
    source = load_manifest(f"file://{manifest}")
    assert [s.key for s in source.shards] == [f"shards/part-{i:05d}.parquet" for i in range(3)]
    assert source.num_rows == ROWS and source.root == str(manifest.parent)
    assert load_manifest(str(manifest.parent)).shards == source.shards  # a directory finds manifest.json
    written = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**written, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match=f"{manifest}: schema version {SCHEMA_VERSION + 1}"):
        load_manifest(str(manifest))
    write_manifest(ObjectStore(str(manifest.parent)),
                   build_manifest(config={}, shards=[], funnel={}, queries=None, eval_index=None))
    with pytest.raises(ValueError, match="lists no shards"):
        load_manifest(str(manifest))


def test_one_rank_sees_every_row_once_per_epoch_then_the_next_epoch(dataset, pairs):
    batches = list(itertools.islice(iter(_stream(dataset)), 2 * ROWS // 8))
    first = torch.cat([b["rows"] for b in batches[:ROWS // 8]]).tolist()
    second = torch.cat([b["rows"] for b in batches[ROWS // 8:]]).tolist()
    assert sorted(first) == sorted(second) == list(range(ROWS))
    assert first != list(range(ROWS)) and first != second  # shuffled, differently per epoch
    assert [b["state"]["epoch"] for b in batches] == [0] * (ROWS // 8) + [1] * (ROWS // 8)
    batch = batches[0]
    assert batch["images"].shape == (8, 3, 32, 32) and batch["tokens"].shape == (8, 77)
    captions = pairs.column("caption").to_pylist()
    assert torch.equal(batch["tokens"], tokenize([captions[r] for r in batch["rows"].tolist()]))


@pytest.mark.parametrize("rows_per_shard", [20, 4])  # 5 shards: rows split; 24 shards: whole shards split
def test_ranks_and_streams_partition_the_rows(tmp_path, pairs, rows_per_shard):
    source = load_manifest(str(write_dataset(tmp_path, pairs, rows_per_shard)))
    seen = []
    for rank in range(2):
        for stream in range(2):
            ds = _stream(source, rank=rank, world_size=2, num_streams=2, micro_batch=4)
            assert ds.split_by_shard == (rows_per_shard == 4)
            got = []
            for b in ds._stream_batches(stream, StreamState()):  # what DataLoader worker `stream` runs
                if b["state"]["epoch"] > 0:
                    break
                got += b["rows"].tolist()
            seen.append(set(got))
    assert all(len(s) > 0 for s in seen)
    for a, b in itertools.combinations(seen, 2):
        assert not a & b
    assert len(set().union(*seen)) >= ROWS - 4 * 3  # all but partial last batches of each unit


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_a_position_replays_the_same_batches(dataset, num_workers):
    streams = max(1, num_workers)
    full = list(itertools.islice(iter(make_loader(_stream(dataset, num_streams=streams), num_workers)), 9))
    position = initial_position(streams)
    for batch in full[:5]:
        position = advance_position(position, batch["state"])
    resumed = list(itertools.islice(
        iter(make_loader(_stream(dataset, num_streams=streams, position=position), num_workers)), 4))
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["rows"], b["rows"])
        assert torch.equal(a["images"], b["images"])  # same augmentation too
        assert torch.equal(a["tokens"], b["tokens"])
    with pytest.raises(ValueError, match="same train.num_workers"):
        _stream(dataset, num_streams=3, position=position)


def test_bad_samples_are_skipped_and_counted(tmp_path, pairs):
    images = pairs.column("image").to_pylist()
    captions = pairs.column("caption").to_pylist()
    images[3] = b"\x89PNG\r\n\x1a\n truncated"
    images[10] = b"garbage"
    captions[5] = "   "
    broken = pairs.set_column(pairs.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    broken = broken.set_column(broken.schema.get_field_index("caption"), "caption", pa.array(captions))
    source = load_manifest(str(write_dataset(tmp_path, broken, rows_per_shard=50)))
    batches = list(itertools.islice(iter(_stream(source)), (ROWS - 3) // 8))
    rows = torch.cat([b["rows"] for b in batches]).tolist()
    assert all(len(b["rows"]) == 8 for b in batches)  # full batches despite the holes
    assert not {3, 5, 10} & set(rows)
    position = initial_position(1)
    for batch in batches:
        position = advance_position(position, batch["state"])
    assert skipped_total(position) == {"decode_error": 2, "empty_caption": 1}


def test_unreadable_shard_costs_its_rows_not_the_run(tmp_path, pairs):
    manifest = write_dataset(tmp_path, pairs, rows_per_shard=48)
    (tmp_path / "shards" / "part-00001.parquet").write_bytes(b"not parquet")
    batches = list(itertools.islice(iter(_stream(load_manifest(str(manifest)))), 8))
    assert all(r < 48 for b in batches for r in b["rows"].tolist())
    assert batches[-1]["state"]["skipped"]["unreadable_shard"] >= 1


def test_streams_a_dataset_from_s3(s3_store, tmp_path, pairs, dataset):
    """The same stream from a real S3 server (SeaweedFS on loopback) as from local files."""
    local_manifest = write_dataset(tmp_path, pairs, rows_per_shard=20)
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            s3_store.write_bytes(path.relative_to(tmp_path).as_posix(), path.read_bytes())
    source = load_manifest(s3_store.uri("manifest.json"), s3_store.config)
    assert source.root.startswith("s3://") and source.shards == load_manifest(str(local_manifest)).shards
    from_s3 = list(itertools.islice(iter(_stream(source)), 3))
    from_disk = list(itertools.islice(iter(_stream(dataset)), 3))
    for a, b in zip(from_s3, from_disk):
        assert torch.equal(a["rows"], b["rows"]) and torch.equal(a["images"], b["images"])


# ---- online balancing (MetaCLIP's per-epoch draw) ----------------------------------------------

HEAD, T = 60, 10  # 60 rows match only the head query 0 (t = 10); the other 36 rows each a rare query


@pytest.fixture(scope="module")
def balanced_source(tmp_path_factory, pairs):
    query_ids = [[0] if i < HEAD else [1 + i, 0] if i % 2 else [1 + i] for i in range(ROWS)]
    table = pairs.append_column("query_ids", pa.array(query_ids, pa.list_(pa.int32())))
    return load_manifest(str(write_dataset(tmp_path_factory.mktemp("bal"), table, rows_per_shard=20)))


def _epoch_rows(source, balance, epoch: int) -> set[int]:
    ds = _stream(source, balance=balance, micro_batch=1)
    rows = set()
    for b in ds._stream_batches(0, StreamState(epoch=epoch)):
        if b["state"]["epoch"] != epoch:
            return rows
        rows |= set(b["rows"].tolist())
    return rows


def test_online_balance_redraws_the_head_each_epoch_and_keeps_the_tail(balanced_source):
    from trainer.data import online_balance

    balance = online_balance(balanced_source, T, seed=0)
    head_count = HEAD + (ROWS - HEAD) // 2
    assert balance.counts[0] == head_count and balance.counts[1 + HEAD] == 1
    # Tail rows are always kept; head-only rows with probability t / count.
    assert balance.expected_rows == pytest.approx((ROWS - HEAD) + HEAD * T / head_count)
    epochs = [_epoch_rows(balanced_source, balance, e) for e in range(4)]
    tail = set(range(HEAD, ROWS))
    for rows in epochs:
        assert tail <= rows and 0 < len(rows - tail) < 3 * T
    assert epochs[0] != epochs[1]  # reseeded per epoch
    assert _epoch_rows(balanced_source, balance, 1) == epochs[1]  # and reproducible
    seen_head = set().union(*epochs) - tail
    assert len(seen_head) > max(len(r - tail) for r in epochs)  # the head's long tail is seen across epochs
    unbalanced = _epoch_rows(balanced_source, None, 0)
    assert unbalanced == set(range(ROWS))


def test_online_balance_uses_the_builds_coin_rule(balanced_source):
    """One epoch's draw is the build's probability-mode balancing with that epoch's seed."""
    from infra.config import BalanceConfig
    from tasks.balance import balance_table
    from trainer.data import online_balance

    balance = online_balance(balanced_source, T, seed=3)
    store = balanced_source.store()
    table = pa.concat_tables([store.read_parquet(s.key, columns=["sample_id", "query_ids"])
                              for s in balanced_source.shards])
    kept = balance.keep(table.column("sample_id").to_pylist(), table.column("query_ids"), epoch=2)
    build = balance_table(table, balance.counts, BalanceConfig(max_per_query=T, seed=balance.epoch_seed(2))).table
    assert table.filter(pa.array(kept)).column("sample_id").to_pylist() == build.column("sample_id").to_pylist()


def test_caption_frames_put_a_share_of_captions_in_sentences_per_epoch(dataset):
    from trainer.data import frame_caption

    frames = ("a picture of {}", "{} clip art")
    draws = [frame_caption("cat, kitten", frames, 0.5, random.Random(i)) for i in range(400)]
    framed = [d for d in draws if d != "cat, kitten"]
    assert set(framed) == {"a picture of cat, kitten", "cat, kitten clip art"}
    assert 150 < len(framed) < 250  # about half
    assert frame_caption("cat", frames, 0.0, random.Random(0)) == "cat"
    assert frame_caption("cat", frames, 1.0, random.Random(0)) in {"a picture of cat", "cat clip art"}
    # In the stream: fixed by (seed, epoch, row), after caption sampling, varying across epochs.
    ds = _stream(dataset, caption_sampling=True, caption_frames=frames, caption_frame_prob=1.0)
    image = _png(Image.new("RGB", (8, 8)))
    assert ds._sample(3, 0, image, "cat, kitten")[1] == ds._sample(3, 0, image, "cat, kitten")[1]
    epochs = {ds._sample(3, e, image, "cat, kitten")[1] for e in range(20)}
    assert len(epochs) > 3 and all(c.startswith("a picture of ") or c.endswith(" clip art") for c in epochs)


def test_caption_frames_are_checked_at_config_load():
    from infra.config import ConfigError, TrainConfig

    assert TrainConfig(caption_frames=("a picture of {}",)).caption_frames == ("a picture of {}",)
    for bad in (("no slot",), ("{} and {}",), ("{0} named",)):
        with pytest.raises(ConfigError, match="caption_frames"):
            TrainConfig(caption_frames=bad)
    with pytest.raises(ConfigError, match="caption_frame_prob"):
        TrainConfig(caption_frame_prob=1.5)


def test_caption_sampling_draws_subsets_of_the_parts_per_epoch(dataset):
    from trainer.data import sample_caption_parts

    caption = "cat face, animal, cat, kitten, pet"
    parts = set(caption.split(", "))
    draws = [sample_caption_parts(caption, random.Random(i)) for i in range(200)]
    assert all(d and set(d.split(", ")) <= parts for d in draws)
    assert len(set(draws)) > 50 and "cat" in draws  # single words appear alone too
    assert sample_caption_parts("no commas here", random.Random(0)) == "no commas here"
    # In the stream: fixed by (seed, epoch, row), different across epochs, always a subset.
    ds = _stream(dataset, caption_sampling=True)
    a = ds._sample(3, 0, _png(Image.new("RGB", (8, 8))), caption)[1]
    assert a == ds._sample(3, 0, _png(Image.new("RGB", (8, 8))), caption)[1]
    epochs = {ds._sample(3, e, _png(Image.new("RGB", (8, 8))), caption)[1] for e in range(20)}
    assert len(epochs) > 5 and all(set(c.split(", ")) <= parts for c in epochs)


def test_stream_tokenizes_to_the_context_length_it_is_given(dataset):
    """The model fixes the context length (``zeroshot-rn``: 24, not the tokenizer's 77); ShardStream has no
    default for it, so no caller can feed a 24-token model 77-token batches by leaving it out."""
    short = next(iter(_stream(dataset, context_length=24)))
    assert short["tokens"].shape == (8, 24)
    full = next(iter(_stream(dataset)))
    assert torch.equal(short["tokens"][:, :23], full["tokens"][:, :23])
    with pytest.raises(TypeError, match="context_length"):
        ShardStream(dataset, rank=0, world_size=1, micro_batch=8, image_size=32)


def test_train_bench_batches_fit_the_benched_model(tmp_path):
    """bench/train.py's replayed batches carry the model's context length (it once took 77 for every model)."""
    import importlib.util

    from trainer.model import load_model_config

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).resolve().parent.parent / "bench" / "train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    batches = bench.make_batches("zeroshot-rn", micro_batch=4, count=1, work=tmp_path / "batches")
    config = load_model_config("zeroshot-rn")
    assert batches[0]["tokens"].shape == (4, config.context_length) and config.context_length != 77
    assert batches[0]["images"].shape[-1] == config.image_size
