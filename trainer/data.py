"""Streaming (image, caption) batches from a build's Parquet shards, resumable to the sample.

The stream is a deterministic function of (seed, rank, world size, number of loader streams): shard
order is permuted per epoch, rows are split across ranks and loader workers, a shuffle buffer mixes
them, and each sample's augmentation is seeded by (seed, epoch, row). A position is therefore just
(epoch, items consumed) per loader stream, and resuming replays the cheap part (reading and
shuffling bytes) up to it without decoding anything.

The stream never ends (epochs follow each other), so every rank always has a batch: the trainer
decides how many steps make a run. Bad samples (undecodable image, empty caption) are skipped and
counted per reason; they cost one sample, never a batch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infra.config import StorageConfig
from infra.imaging import decode_rgb, to_rgb
from infra.log import get_logger, log_event
from infra.manifest import manifest_location, read_manifest
from infra.storage import ObjectStore
from trainer.tokenizer import tokenize

log = get_logger("witflow.trainer.data")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_READ_COLUMNS = ["image", "caption"]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> Image.Image:
    """Decode to RGB with ``infra.imaging``'s rule: transparent pixels become white."""
    return decode_rgb(data)


# Modes the eval transform resizes as they are, converting to RGB after the crop (OpenCLIP's order).
_AS_IS_MODES = ("RGB", "L", "CMYK", "YCbCr", "LAB", "HSV", "1")


def eval_image(data: bytes) -> Image.Image:
    """Decode for evaluation: RGB, L, CMYK (and other alpha-free 8-bit modes) stay as they are, so
    the eval transform resizes them as OpenCLIP does before converting to RGB; images with alpha
    (and palette images with transparency) are composited onto white, like training's images, and
    16-bit/float greys go through ``infra.imaging``'s scaling — two deliberate differences from
    OpenCLIP, which drops alpha (showing whatever colour hides under transparent pixels) and clips
    16-bit values."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in _AS_IS_MODES or (im.mode == "P" and "transparency" not in im.info):
            return im.copy()
        return to_rgb(im)


def _to_normalised_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torchvision's ToTensor then Normalize, operation for operation (uint8 -> /255 -> -mean -> /std)."""
    pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(image.size[1], image.size[0], 3)
    return pixels.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255).sub_(mean).div_(std)


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``'s output (width, height): the short side becomes ``size``, the
    long side ``int(size * long / short)`` (truncated, as torchvision does)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


class ImageTransform:
    """CLIP's transforms without torchvision.

    Train: random resized crop (scale 0.9-1.0, aspect 3/4-4/3, bicubic; open_clip's default) of
    the RGB image, then mean/std normalisation. Eval: OpenCLIP's ``image_transform(size,
    is_train=False)`` step for step — torchvision ``Resize(size)`` (shortest side, bicubic, the
    long side truncated, skipped when the size already fits), ``CenterCrop(size)`` (offsets
    rounded), ``convert("RGB")`` after the crop, ``ToTensor``, ``Normalize`` — so its tensors equal
    OpenCLIP's bit for bit on images :func:`eval_image` leaves as they are (tests/test_data.py
    compares them with torchvision's own code).
    """

    def __init__(self, image_size: int, train: bool, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.image_size, self.train, self.scale, self.ratio = image_size, train, scale, ratio
        self._mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(CLIP_STD, dtype=torch.float32).view(-1, 1, 1)

    def _random_crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, fed by ``rng``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = rng.randint(0, width - w)
                top = rng.randint(0, height - h)
                return left, top, left + w, top + h
        in_ratio = width / height  # fallback: the central crop at the nearest allowed aspect
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def eval_pixels(self, image: Image.Image) -> Image.Image:
        """Resize (shortest side) + centre crop as torchvision does, then RGB: the eval image, uint8."""
        size = self.image_size
        new_size = shortest_side_size(image.width, image.height, size)
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BICUBIC)
        top = int(round((image.height - size) / 2.0))
        left = int(round((image.width - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        return image if image.mode == "RGB" else image.convert("RGB")

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if self.train:
            image = image.convert("RGB") if image.mode != "RGB" else image
            box = self._random_crop_box(image.width, image.height, rng or random.Random())
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        else:
            image = self.eval_pixels(image)
        return _to_normalised_tensor(image, self._mean, self._std)


def image_transform(image_size: int, train: bool) -> ImageTransform:
    """CLIP's train (random resized crop) or eval (resize + centre crop) transform, normalised."""
    return ImageTransform(image_size, train)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    key: str  # relative to the dataset root (the manifest's directory)
    rows: int


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset's shards are: a store root and the shards listed by its manifest."""

    root: str
    shards: tuple[ShardRef, ...]
    storage: StorageConfig | None = None

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def store(self) -> ObjectStore:
        return ObjectStore(self.root, self.storage)


def load_manifest(manifest_uri: str, storage: StorageConfig | None = None) -> DatasetSource:
    """The training shards of the build whose manifest (or dataset directory) is ``manifest_uri``
    (path, file:// or s3://); shard paths are relative to the manifest's directory."""
    root, name = manifest_location(manifest_uri)
    store = ObjectStore(root, storage)
    manifest = read_manifest(manifest_uri, storage)
    if not manifest.shards:
        raise ValueError(f"{store.uri(name)}: the manifest lists no shards")
    shards = tuple(ShardRef(key=s.path, rows=s.rows) for s in manifest.shards if s.rows > 0)
    return DatasetSource(root=store.root, shards=shards, storage=storage)


# --------------------------------------------------------------------------------------------
# Online balancing (MetaCLIP's per-epoch draw)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineBalance:
    """MetaCLIP's balancing, redrawn every epoch in the loader.

    A query matched by ``c`` training pairs keeps each with probability min(1, t / c), a pair is
    kept if any of its queries keeps it, and the coins (``infra.coins``, the build's rule) are
    reseeded per epoch: each epoch sees a different subset of the head queries' pairs, so their
    long tail is seen across epochs instead of being cut once at build time. ``counts`` are over
    the training shards (the pool this loader draws from).
    """

    max_per_query: int
    seed: int
    counts: np.ndarray  # pairs per query id
    expected_rows: float  # rows an epoch keeps on average

    def epoch_seed(self, epoch: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{epoch}:online-balance".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def keep(self, sample_ids: Sequence[str], query_ids: pa.Array | pa.ChunkedArray, epoch: int) -> np.ndarray:
        """Which rows this epoch's draw keeps (rows without query ids are always kept)."""
        from infra.coins import keep_with_probability, pair_hashes, sample_hashes

        flat, lengths = _flat_ids(query_ids)
        rows = np.repeat(np.arange(len(sample_ids)), lengths)
        hashes = pair_hashes(sample_hashes(list(sample_ids))[rows], flat, self.epoch_seed(epoch))
        counts = self.counts if flat.size == 0 or flat.max() < self.counts.size else np.r_[
            self.counts, np.zeros(flat.max() + 1 - self.counts.size, np.int64)]
        return keep_with_probability(flat, hashes, rows, counts, self.max_per_query, len(sample_ids)) | (lengths == 0)


def _flat_ids(query_ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(query_ids, pa.ChunkedArray):
        query_ids = query_ids.combine_chunks() if query_ids.num_chunks else pa.array([], pa.list_(pa.int32()))
    lengths = pc.fill_null(pc.list_value_length(query_ids), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return pc.list_flatten(query_ids).to_numpy(zero_copy_only=False).astype(np.int64), lengths


def online_balance(source: "DatasetSource", max_per_query: int, seed: int) -> OnlineBalance:
    """Count the training shards' pairs per query (one pass over ``query_ids``) for :class:`OnlineBalance`."""
    store = source.store()
    columns = [store.read_parquet(s.key, columns=["query_ids"]).column("query_ids") for s in source.shards]
    flats = [_flat_ids(c) for c in columns]
    ids = np.concatenate([f for f, _ in flats]) if flats else np.zeros(0, np.int64)
    counts = np.bincount(ids, minlength=1).astype(np.int64)
    expected = 0.0
    for flat, lengths in flats:  # P(kept) = 1 - prod(1 - p) over a row's queries
        p_drop = 1.0 - np.minimum(1.0, max_per_query / np.maximum(counts[flat], 1))
        rows = np.repeat(np.arange(lengths.size), lengths)
        drop = np.ones(lengths.size)
        np.multiply.at(drop, rows, p_drop)
        expected += float((1.0 - drop).sum())
    return OnlineBalance(max_per_query, seed, counts, expected)


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """Position of one loader stream: items taken from the shuffle buffer in ``epoch``."""

    epoch: int = 0
    offset: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StreamState":
        return cls(int(data["epoch"]), int(data["offset"]), {k: int(v) for k, v in data.get("skipped", {}).items()})


def initial_position(num_streams: int) -> dict[str, Any]:
    """A position at the very start: no batches consumed, every stream at epoch 0."""
    return {"batches": 0, "streams": [StreamState().to_dict() for _ in range(num_streams)]}


def advance_position(position: dict[str, Any], batch_state: dict[str, Any]) -> dict[str, Any]:
    """The position after consuming one batch that carried ``batch_state``."""
    streams = list(position["streams"])
    streams[batch_state["stream"]] = {k: batch_state[k] for k in ("epoch", "offset", "skipped")}
    return {"batches": position["batches"] + 1, "streams": streams}


class ShardStream(IterableDataset):
    """Endless, resumable batches ``{"images", "tokens", "rows", "state"}`` for one rank.

    ``rows`` are the samples' global row numbers in the epoch's shard order (for checks and logs).

    ``num_streams`` must equal the DataLoader's ``max(1, num_workers)``. Batch ``g`` (counted over
    the whole run) always comes from stream ``g % num_streams``, so a resumed run sees the same
    batches in the same order as an uninterrupted one.
    """

    def __init__(self, source: DatasetSource, *, rank: int, world_size: int, micro_batch: int, image_size: int,
                 context_length: int, shuffle_buffer: int = 1_000, seed: int = 0,
                 num_streams: int = 1, position: dict[str, Any] | None = None, train: bool = True,
                 balance: OnlineBalance | None = None, crop_scale: tuple[float, float] = (0.9, 1.0),
                 caption_sampling: bool = False, caption_frames: Sequence[str] = (),
                 caption_frame_prob: float = 0.5):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.source, self.rank, self.world_size = source, rank, world_size
        self.micro_batch, self.context_length = micro_batch, context_length
        self.shuffle_buffer, self.seed, self.num_streams = max(1, shuffle_buffer), seed, num_streams
        self.position = position or initial_position(num_streams)
        if len(self.position["streams"]) != num_streams:
            raise ValueError(f"position has {len(self.position['streams'])} streams, loader has {num_streams}: "
                             "resume with the same train.num_workers")
        self.transform = ImageTransform(image_size, train, scale=crop_scale)
        self.balance = balance
        self.caption_sampling = caption_sampling
        self.caption_frames, self.caption_frame_prob = tuple(caption_frames), caption_frame_prob
        # Whole shards per (rank, stream) when there are enough of them (no wasted reads);
        # otherwise every unit reads every shard and keeps its stride of rows.
        self.units = world_size * num_streams
        self.split_by_shard = len(source.shards) >= 2 * self.units

    # -- raw items: (row id, image bytes, caption) ------------------------------------------------

    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.source.shards)))
        random.Random(f"{self.seed}:{epoch}:shards").shuffle(order)
        return order

    def _raw_items(self, stream: int, epoch: int, store: ObjectStore,
                   skipped: Counter[str]) -> Iterator[tuple[int, Any, Any]]:
        """This unit's rows as (sample number in manifest order, image bytes, caption)."""
        unit = stream * self.world_size + self.rank
        manifest_start = np.cumsum([0] + [s.rows for s in self.source.shards])
        epoch_row = 0  # position in this epoch's shard order: decides which rank/stream owns a row
        for i, shard_index in enumerate(self._shard_order(epoch)):
            shard = self.source.shards[shard_index]
            shard_start = first_row = epoch_row
            epoch_row += shard.rows
            if self.split_by_shard and i % self.units != unit:
                continue
            try:
                with store.filesystem.open_input_file(store.fs_path(shard.key)) as f:
                    parquet = pq.ParquetFile(f)
                    if parquet.metadata.num_rows != shard.rows:
                        raise ValueError(f"{parquet.metadata.num_rows} rows, the manifest says {shard.rows}")
                    columns = _READ_COLUMNS + (["sample_id", "query_ids"] if self.balance else [])
                    for batch in parquet.iter_batches(batch_size=512, columns=columns):
                        rows = np.arange(first_row, first_row + batch.num_rows)
                        first_row += batch.num_rows
                        if not self.split_by_shard:
                            # epoch row g -> rank g % W; this rank's k-th row -> stream k % S
                            mine = (rows % self.world_size == self.rank) & (
                                (rows // self.world_size) % self.num_streams == stream)
                            if not mine.any():
                                continue
                            batch = batch.filter(pa.array(mine))
                            rows = rows[mine]
                        if self.balance is not None:  # after the split: who owns a row does not change
                            kept = self.balance.keep(batch.column("sample_id").to_pylist(),
                                                     batch.column("query_ids"), epoch)
                            batch, rows = batch.filter(pa.array(kept)), rows[kept]
                        sample_numbers = rows - shard_start + manifest_start[shard_index]
                        images = batch.column("image").to_pylist()
                        captions = batch.column("caption").to_pylist()
                        yield from zip((int(n) for n in sample_numbers), images, captions)
            except (OSError, ValueError, pa.ArrowException) as e:
                # One unreadable shard costs its rows for this epoch, not the run. (A resumed run
                # replaying this epoch counts it again: the count is for alerting, not accounting.)
                skipped["unreadable_shard"] += 1
                log_event(log, "skipped an unreadable shard", logging.ERROR, rank=self.rank, shard=shard.key,
                          error=f"{type(e).__name__}: {e}")

    def _shuffled(self, stream: int, epoch: int, store: ObjectStore,
                  skipped: Counter[str]) -> Iterator[tuple[int, Any, Any]]:
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{stream}:buffer")
        buffer: list[tuple[int, Any, Any]] = []
        for item in self._raw_items(stream, epoch, store, skipped):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(self.shuffle_buffer)
            yield buffer[j]
            buffer[j] = item
        rng.shuffle(buffer)
        yield from buffer

    # -- samples and batches -------------------------------------------------------------------------

    def _sample(self, row: int, epoch: int, image_bytes: Any, caption: Any) -> tuple[torch.Tensor, str]:
        if not isinstance(caption, str) or not caption.strip():
            raise _BadSample("empty_caption")
        if not image_bytes:
            raise _BadSample("empty_image")
        try:
            image = decode_image(image_bytes)
        except Exception as e:  # PIL raises many types for corrupt data
            raise _BadSample("decode_error", f"{type(e).__name__}: {e}") from None
        rng = random.Random(f"{self.seed}:{epoch}:{row}:augment")
        if self.caption_sampling:
            caption = sample_caption_parts(caption, random.Random(f"{self.seed}:{epoch}:{row}:caption"))
        if self.caption_frames:
            caption = frame_caption(caption, self.caption_frames, self.caption_frame_prob,
                                    random.Random(f"{self.seed}:{epoch}:{row}:frame"))
        return self.transform(image, rng), caption

    def _stream_batches(self, stream: int, state: StreamState) -> Iterator[dict[str, Any]]:
        store = self.source.store()
        images: list[torch.Tensor] = []
        captions: list[str] = []
        rows: list[int] = []
        epoch, offset, skipped = state.epoch, state.offset, Counter(state.skipped)
        while True:
            produced = 0
            for index, (row, image_bytes, caption) in enumerate(self._shuffled(stream, epoch, store, skipped)):
                produced += 1
                if index < offset:  # replaying up to the resume position: no decoding
                    continue
                offset = index + 1
                try:
                    image, text = self._sample(row, epoch, image_bytes, caption)
                except _BadSample as bad:
                    skipped[bad.reason] += 1
                    if sum(skipped.values()) <= 10 or bad.reason != "decode_error":
                        log_event(log, "skipped a bad sample", logging.WARNING, rank=self.rank, row=row,
                                  reason=bad.reason, detail=bad.detail)
                    continue
                images.append(image)
                captions.append(text)
                rows.append(row)
                if len(images) == self.micro_batch:
                    yield {"images": torch.stack(images), "tokens": tokenize(captions, self.context_length),
                           "rows": torch.tensor(rows, dtype=torch.long),
                           "state": {"stream": stream, "epoch": epoch, "offset": offset, "skipped": dict(skipped)}}
                    images, captions, rows = [], [], []
            if produced == 0:
                raise RuntimeError(f"rank {self.rank} stream {stream}: no rows in epoch {epoch}: "
                                   f"{self.source.num_rows} rows are too few for {self.units} loader streams")
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_streams:
            raise ValueError(f"ShardStream built for {self.num_streams} streams, iterated by {workers} workers")
        # The loader hands out batches round-robin from worker 0; shift so global batch g comes from stream g % S.
        stream = (worker + self.position["batches"]) % self.num_streams
        return self._stream_batches(stream, StreamState.from_dict(self.position["streams"][stream]))


def sample_caption_parts(caption: str, rng: random.Random) -> str:
    """A random non-empty subset, in random order, of a caption's comma-separated parts ("cat face,
    animal, cat, kitten" -> "kitten, cat face"): a title-and-keywords caption shows its words alone
    and in new company each epoch. A caption without commas is kept as it is."""
    parts = [p.strip() for p in caption.split(",") if p.strip()]
    if len(parts) < 2:
        return caption
    return ", ".join(rng.sample(parts, rng.randint(1, len(parts))))


def frame_caption(caption: str, frames: Sequence[str], prob: float, rng: random.Random) -> str:
    """With probability ``prob``, ``caption`` put in one of ``frames`` ("a picture of {}"), else as it is."""
    if rng.random() >= prob:
        return caption
    return rng.choice(frames).format(caption)


class _BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def make_loader(dataset: ShardStream, num_workers: int) -> DataLoader:
    """A DataLoader over ready-made batches (the stream batches; the loader only parallelises)."""
    if max(1, num_workers) != dataset.num_streams:
        raise ValueError("num_workers must match the stream count the dataset was built with")
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=2 if num_workers else None)


def skipped_total(position: dict[str, Any]) -> dict[str, int]:
    """Bad samples skipped so far by this rank, per reason."""
    total: Counter[str] = Counter()
    for stream in position["streams"]:
        total.update(stream.get("skipped", {}))
    return dict(total)
