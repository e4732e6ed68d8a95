"""The build's work directory: every key it holds, and the fingerprints that name its parts.

    <dataset>/work/f-<fp>/captions/counts.parquet              repeated captions (different images per caption)
    <dataset>/work/f-<fp>/captions/p<n>/                       that count's shuffle (n partitions)
    <dataset>/work/f-<fp>/filtered/<shard>.parquet|.json       read -> caption -> text filters -> query match
    <dataset>/work/f-<fp>/caption_outcomes/<shard>.parquet     what rows with a boilerplate caption field got instead
    <dataset>/work/f-<fp>/url_dedup/p<n>/                      the URL shuffle's pieces and duplicates (n partitions)
    <dataset>/work/f-<fp>/url_dedup/p<n>/by_shard/g<g>/        those duplicates by shard group (read per shard)
    <dataset>/work/f-<fp>/query_matcher.pkl                    the query matcher, built once for every worker
    <dataset>/work/f-<fp>/query_counts.parquet                 global per-query counts (balancing)
    <dataset>/work/f-<fp>/cap_thresholds.npy                   exact-mode balancing cut per query
    <dataset>/work/f-<fp>/c-<fp2>/clean/<shard>.parquet|.json  balance -> fetch + images -> hash -> eval dedup
    <dataset>/work/f-<fp>/c-<fp2>/failed/<shard>.parquet       fetch/decode failures with status and reason
    <dataset>/work/f-<fp>/c-<fp2>/eval_matches/<shard>.parquet what each eval-dedup drop matched
    <dataset>/work/f-<fp>/c-<fp2>/within/w-<fp3>/              within-dataset shuffles (drops by part group), hold-out

A fingerprint covers every input that changes a result (the sources with their sizes and mtimes,
or a remote source's sizes and ETags, and for Openclipart the held-out rules its reader applies,
each stage's settings, the query list's and eval index's versions, and :data:`WORK_FORMAT`, the
version of this layout and of the records' code), so a changed input or a new witflow never
reuses stale parts: it works in a new directory beside the old.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from infra.config import (BalanceConfig, DedupConfig, GatherConfig, ImageConfig, SourceConfig, StorageConfig,
                          TextFilterConfig, to_dict)
from infra.remote import is_remote
from infra.storage import ObjectStore

WORK_FORMAT = 3  # bump when a record's fields or a key's content change
# Dedup settings only the within-dataset stage reads: changing them never redoes a fetch.
WITHIN_ONLY = frozenset({"within_radius", "within_dataset", "max_candidates", "task_memory_mb"})


def fingerprint(*parts: Any) -> str:
    """A short stable digest of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sources_identity(sources: Sequence[SourceConfig], base_dir: str, storage: StorageConfig | None = None) -> list:
    """The sources as configured, plus size and mtime of their local files, or size, ETag and
    Last-Modified of their remote ones (HEAD; never a local stat): a changed input is a new build."""
    from infra.openclipart import holdout_identity
    from tasks.readers import source_files

    out = []
    for src in sources:
        # An Openclipart source leaves out the eval sets' images: its rows change with those rules.
        rules = [["holdout", holdout_identity()]] if src.kind == "openclipart" else []
        if is_remote(src.path):
            out.append([to_dict(src), [sorted(f.items()) for f in source_files(src, base_dir, storage)], *rules])
            continue
        path = src.path if os.path.isabs(src.path) or "://" in src.path else os.path.join(base_dir, src.path)
        files = sorted(glob.glob(path)) if "://" not in path else []
        out.append([to_dict(src), [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in _local_files(files)],
                    *rules])
    return out


def _local_files(paths: Sequence[str]) -> list[str]:
    """The files of ``paths``, a folder's standing for every file below it (a folder source's
    identity is its files', not the folder's own)."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            out.extend(sorted(os.path.join(d, name) for d, _, names in os.walk(path) for name in names))
        elif os.path.isfile(path):
            out.append(path)
    return out


@dataclass(frozen=True)
class WorkDir:
    """One level of the work directory (``f-<fp>`` or ``f-<fp>/c-<fp2>``) and its keys."""

    root: str
    storage: StorageConfig
    # infra.lease.OutputLease of the build writing here (None: unguarded, e.g. in-process tests):
    # every store below refuses to write once that build's driver is gone.
    lease: Any = field(default=None, compare=False)

    @property
    def store(self) -> ObjectStore:
        return self.store_at(self.root)

    def store_at(self, root: str) -> ObjectStore:
        """A store at ``root`` (the work directory, or the dataset beside it) guarded by this lease."""
        return ObjectStore(root, self.storage, guard=self.lease.check if self.lease is not None else None)

    @classmethod
    def for_filter(cls, dataset_root: str, storage: StorageConfig, sources: Sequence[SourceConfig], base_dir: str,
                   text_filter: TextFilterConfig, queries_sha256: str, lease: Any = None) -> "WorkDir":
        # where the machine caches its word-frequency index is no part of what the filter does
        rules = {k: v for k, v in to_dict(text_filter).items() if k != "frequency_cache"}
        fp = fingerprint(WORK_FORMAT, sources_identity(sources, base_dir, storage), rules, queries_sha256)
        return cls(f"{dataset_root.rstrip('/')}/work/f-{fp}", storage, lease)

    def for_clean(self, balance: BalanceConfig, gather: GatherConfig, images: ImageConfig, dedup: DedupConfig,
                  eval_index_version: str | None) -> "WorkDir":
        clean_dedup = {k: v for k, v in to_dict(dedup).items() if k not in WITHIN_ONLY}
        fp = fingerprint(self.root, to_dict(balance), to_dict(gather), to_dict(images), clean_dedup,
                         eval_index_version)
        return WorkDir(f"{self.root}/c-{fp}", self.storage, self.lease)

    def within_prefix(self, clean_records_identity: Any, settings: Any) -> str:
        """The within-dataset stage's prefix: named by the clean parts it reads (a `--retry-failed`
        run that adds rows gets a new one) and its settings."""
        return f"within/w-{fingerprint(clean_records_identity, settings)}"

    # ---- keys --------------------------------------------------------------------------------

    @staticmethod
    def filtered(shard_id: str) -> str:
        return f"filtered/{shard_id}.parquet"

    @staticmethod
    def filter_record(shard_id: str) -> str:
        return f"filtered/{shard_id}.json"

    QUERY_COUNTS = "query_counts.parquet"
    QUERY_MATCHER = "query_matcher.pkl"  # the query list's matcher with its automaton, built once
    CAPTION_COUNTS = "captions/counts.parquet"

    @staticmethod
    def caption_scratch(num_partitions: int) -> str:
        return f"captions/p{num_partitions}"

    @staticmethod
    def caption_report_scratch(name: str) -> str:
        """The caption report's (value, phash) shuffle, named by what it counts (its output shards)."""
        return f"captions/report-{name}"

    CAP_THRESHOLDS = "cap_thresholds.npy"

    @staticmethod
    def url_scratch(num_partitions: int) -> str:
        """The URL shuffle's pieces and reduce outputs (named by its partition count)."""
        return f"url_dedup/p{num_partitions}"

    @staticmethod
    def url_groups(num_groups: int) -> str:
        """Under :meth:`url_scratch`: the URL drops routed to ``num_groups`` shard groups."""
        return f"by_shard/g{num_groups}"

    @staticmethod
    def clean(shard_id: str) -> str:
        return f"clean/{shard_id}.parquet"

    @staticmethod
    def clean_record(shard_id: str) -> str:
        return f"clean/{shard_id}.json"

    @staticmethod
    def side(name: str, shard_id: str) -> str:
        """A step's side output for one shard (``failed``, ``eval_matches``, ...)."""
        return f"{name}/{shard_id}.parquet"

    @staticmethod
    def holdout_ids(prefix: str) -> str:
        return f"{prefix}/holdout.parquet"

    @staticmethod
    def holdout_candidates(prefix: str, level: int, name: str) -> str:
        """One part's (level 0) or one merge's smallest-rank survivors, the hold-out's candidates."""
        return f"{prefix}/holdout/l{level}/{name}.parquet"

    @staticmethod
    def within_scratch(prefix: str) -> str:
        return f"{prefix}/shuffle"
