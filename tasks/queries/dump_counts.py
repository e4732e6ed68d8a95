"""Counting a dump: map (per block, spilled hash partitions) and reduce (per partition)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from infra.fanout import ShardResult, init_ray, map_shards, values_or_raise
from tasks.queries.counts import read_counts_file
from tasks.queries.dumps import (DumpBlock, PageBatch, decompressed_chunks, dump_name, iter_page_xml, parse_page,
                                 plan_dump_blocks, single_stream_batches)
from tasks.queries.wikitext import count_tokens, strip_wikitext


@dataclass
class CountSettings:
    """Knobs of the dump counting map-reduce (explicit arguments, no config object)."""

    work_dir: str
    num_partitions: int = 16
    max_entries: int = 2_000_000  # unigram+bigram entries held per worker before a spill
    min_unigram_keep: int = 5  # counts kept after the reduce (PMI needs c(a) >= c(ab) >= min)
    min_bigram_keep: int = 5


def _partition(key: str, num_partitions: int) -> int:
    # crc32, not hash(): Python's str hash differs between worker processes.
    return zlib.crc32(key.encode("utf-8")) % num_partitions


def _spill(counter: Counter, kind: str, settings: CountSettings, name: str) -> None:
    parts: list[list[tuple[str, int]]] = [[] for _ in range(settings.num_partitions)]
    for key, n in counter.items():
        parts[_partition(key, settings.num_partitions)].append((key, n))
    for p, items in enumerate(parts):
        if not items:
            continue
        d = Path(settings.work_dir) / "spill" / kind / f"p{p:03d}"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, d / f"{name}.pkl")


def count_pages(pages_xml: Iterable[bytes], block_id: str, settings: CountSettings,
                stats: Counter | None = None) -> dict:
    """Map step: count unigrams and bigrams of article pages, spilling hash partitions to disk.

    Memory is bounded by ``settings.max_entries``: when the in-memory counters grow past it they
    are written out as one file per partition and cleared. A ``<block_id>.done`` marker with the
    stats is written last, so a rerun can skip finished blocks. Returns the stats: ``pages``,
    ``tokens``, ``bigrams`` and skip/error reasons (``bad_page_xml``, ``skipped_namespace``,
    ``skipped_redirect``, ``truncated_page``).
    """
    stats = stats if stats is not None else Counter()
    unigrams: Counter = Counter()
    bigrams: Counter = Counter()
    spills = 0
    for page_xml in pages_xml:
        try:
            page = parse_page(page_xml)
        except (ET.ParseError, ValueError):
            stats["bad_page_xml"] += 1
            continue
        if page.ns != 0:
            stats["skipped_namespace"] += 1
            continue
        if page.redirect:
            stats["skipped_redirect"] += 1
            continue
        n = count_tokens(strip_wikitext(page.text), unigrams, bigrams)
        stats["pages"] += 1
        stats["tokens"] += n
        if len(unigrams) + len(bigrams) > settings.max_entries:
            _spill(unigrams, "unigram", settings, f"{block_id}-{spills:04d}")
            _spill(bigrams, "bigram", settings, f"{block_id}-{spills:04d}")
            spills += 1
            unigrams.clear()
            bigrams.clear()
    _spill(unigrams, "unigram", settings, f"{block_id}-{spills:04d}")
    _spill(bigrams, "bigram", settings, f"{block_id}-{spills:04d}")
    stats["spills"] += spills + 1
    done = Path(settings.work_dir) / "done" / f"{block_id}.json"
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(stats)))
    os.replace(tmp, done)
    return dict(stats)


def count_block(block: DumpBlock, settings: CountSettings) -> dict:
    """Map step over one :class:`DumpBlock` (the worker reads and decompresses its own bytes)."""
    stats: Counter = Counter()
    pages = iter_page_xml(decompressed_chunks(block.path, block.start, block.end), stats)
    return count_pages(pages, block.block_id, settings, stats)


def count_page_batch(batch: PageBatch, settings: CountSettings) -> dict:
    """Map step over one :class:`PageBatch` the driver cut from a single-stream dump."""
    return count_pages(batch.pages, batch.block_id, settings)


@dataclass(frozen=True)
class CountPartition:
    """One reduce job: a hash partition of the unigram or the bigram counts."""

    kind: str  # "unigram" | "bigram"
    partition: int

    @property
    def key(self) -> str:
        return f"{self.kind}-p{self.partition:03d}"


def merge_partition(part: CountPartition, settings: CountSettings) -> dict:
    """Reduce step: sum one hash partition's spill files; write ``key\\tcount`` lines (sorted by key)
    for counts at or above the keep threshold to ``counts/<kind>-pNNN.tsv``."""
    kind, partition = part.kind, part.partition
    src = Path(settings.work_dir) / "spill" / kind / f"p{partition:03d}"
    total: Counter = Counter()
    for f in sorted(src.glob("*.pkl")) if src.exists() else []:
        with open(f, "rb") as fh:
            for key, n in pickle.load(fh):
                total[key] += n
    keep = settings.min_unigram_keep if kind == "unigram" else settings.min_bigram_keep
    out = Path(settings.work_dir) / "counts" / f"{kind}-p{partition:03d}.tsv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    kept = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for key in sorted(k for k, n in total.items() if n >= keep):
            fh.write(f"{key}\t{total[key]}\n")
            kept += 1
    os.replace(tmp, out)
    return {"kind": kind, "partition": partition, "distinct": len(total), "kept": kept,
            "sum": sum(total.values())}


@dataclass
class DumpCounts:
    """Result of :func:`count_dump`: partitioned count files plus totals."""

    work_dir: str
    unigram_files: list[str]
    bigram_files: list[str]
    total_tokens: int
    stats: dict
    failed_blocks: dict[str, str] = field(default_factory=dict)

    def unigrams(self, min_count: int = 1) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.unigram_files:
            out.update((k, v) for k, v in read_counts_file(f).items() if v >= min_count)
        return out

    def iter_bigrams(self) -> Iterator[tuple[str, int]]:
        for f in self.bigram_files:
            yield from read_counts_file(f).items()


def count_settings(work_dir: str, *, num_partitions: int, max_entries: int, min_unigram_count: int,
                   bigram_min_count: int) -> CountSettings:
    """The map-reduce's settings for these query thresholds: the reduce keeps every count that the
    unigram selection or PMI (``c(a) >= c(ab) >= bigram_min_count``) can still use."""
    return CountSettings(work_dir=work_dir, num_partitions=num_partitions, max_entries=max_entries,
                         min_unigram_keep=min(min_unigram_count, bigram_min_count),
                         min_bigram_keep=bigram_min_count)


@contextmanager
def count_work_dir(work_dir: str | None) -> Iterator[str]:
    """``work_dir`` itself (kept, so a rerun skips counted blocks), or a temporary one removed on exit."""
    if work_dir:
        yield work_dir
        return
    tmp = tempfile.mkdtemp(prefix="witflow-counts-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _job_key(job: DumpBlock | PageBatch) -> str:
    return job.block_id


def _windows(jobs: Iterable[PageBatch], size: int) -> Iterator[list[PageBatch]]:
    window: list[PageBatch] = []
    for job in jobs:
        window.append(job)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _map_windows(windows: Iterator[list[PageBatch]], settings: CountSettings, desc: str,
                 use_ray: bool) -> Iterator[list[ShardResult]]:
    # map_shards over one window while this thread cuts the next: the driver holds at most two
    # windows of page batches, and the workers do not wait for the decompressor between windows.
    with ThreadPoolExecutor(max_workers=1) as pool:
        running: Future | None = None
        for window in windows:
            if running is not None:
                yield running.result()
            running = pool.submit(map_shards, count_page_batch, window, context=settings, desc=desc,
                                  key=_job_key, max_retries=2, use_ray=use_ray)
        if running is not None:
            yield running.result()


def count_dump(paths: Sequence[str], settings: CountSettings, *, use_ray: bool = True,
               target_block_bytes: int = 32 << 20, page_batch_bytes: int = 16 << 20,
               max_in_flight: int = 4, on_progress: Callable[[str, dict], None] | None = None) -> DumpCounts:
    """Count unigrams and bigrams of enwiki dumps as a map-reduce through ``infra.fanout.map_shards``.

    Map: each multistream block (:func:`count_block`), or for a single-stream file each page batch
    the driver cuts from its one decompressor (:func:`count_page_batch`, ``max_in_flight`` batches
    per window), is counted by a worker that spills hash-partitioned partial counts
    (:func:`count_pages`). Reduce: one job per partition sums its spills (:func:`merge_partition`).
    No process ever holds every bigram: a worker holds at most ``max_entries``, a reducer one
    partition. Finished blocks (``done/<block>.json``) are skipped on a rerun with the same
    ``work_dir``. A block that fails (corrupt bz2, I/O error, a worker that keeps dying) is reported
    in ``failed_blocks``; the other blocks still count. ``use_ray=False`` runs the same jobs in this
    process; with Ray, the jobs go to the connected Ray (the flow connects first; a local one is
    started otherwise).
    """
    names = [dump_name(p) for p in paths]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"wikipedia_dumps: two dumps named {dup!r}.*: their blocks would share done records")
    if use_ray:
        init_ray()  # here, not in the helper thread that runs map_shards over page batches
    wd = Path(settings.work_dir)
    wd.mkdir(parents=True, exist_ok=True)
    driver_stats: Counter = Counter()
    block_stats: dict[str, dict] = {}
    failed: dict[str, str] = {}

    def todo(jobs: Iterable[DumpBlock | PageBatch]) -> Iterator[DumpBlock | PageBatch]:
        for job in jobs:
            done = wd / "done" / f"{job.block_id}.json"
            if done.exists():
                block_stats[job.block_id] = json.loads(done.read_text())
            else:
                yield job

    def record(results: Sequence[ShardResult]) -> None:
        for r in results:
            if r.ok:
                block_stats[r.key] = r.value
                if on_progress:
                    on_progress(r.key, r.value)
            else:
                failed[r.key] = (r.error or "?").splitlines()[0]

    for path, name in zip(paths, names):
        blocks = plan_dump_blocks(path, target_block_bytes)
        if len(blocks) > 1:
            record(map_shards(count_block, list(todo(blocks)), context=settings, desc=f"count {name}",
                              key=_job_key, max_retries=2, use_ray=use_ray))
            continue
        batches = todo(single_stream_batches(path, driver_stats, page_batch_bytes))
        for results in _map_windows(_windows(batches, max(max_in_flight, 1)), settings, f"count {name}", use_ray):
            record(results)
    partitions = [CountPartition(kind, p) for kind in ("unigram", "bigram") for p in range(settings.num_partitions)]
    merged = values_or_raise("dump counts (merge)", map_shards(merge_partition, partitions, context=settings,
                                                               desc="merge dump counts", max_retries=2,
                                                               use_ray=use_ray))
    totals: Counter = Counter(driver_stats)
    for s in block_stats.values():
        totals.update(s)
    stats = dict(totals)
    stats["blocks"] = len(block_stats)
    stats["distinct_unigrams"] = sum(m["distinct"] for m in merged if m["kind"] == "unigram")
    stats["distinct_bigrams"] = sum(m["distinct"] for m in merged if m["kind"] == "bigram")
    return DumpCounts(
        work_dir=str(wd),
        unigram_files=[str(wd / "counts" / f"unigram-p{p:03d}.tsv") for p in range(settings.num_partitions)],
        bigram_files=[str(wd / "counts" / f"bigram-p{p:03d}.tsv") for p in range(settings.num_partitions)],
        total_tokens=int(totals.get("tokens", 0)),
        stats=stats,
        failed_blocks=failed,
    )

