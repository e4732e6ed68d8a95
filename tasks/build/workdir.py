"""The build's work directory: every key it holds, and the fingerprints that name its parts.

    <dataset>/work/f-<fp>/captions/counts.parquet              repeated captions (different images per caption)
    <dataset>/work/f-<fp>/captions/p<n>/                       that count's shuffle (n partitions)
    <dataset>/work/f-<fp>/filtered/<shard>.parquet|.json       read -> caption -> text filters -> query match
    <dataset>/work/f-<fp>/caption_outcomes/<shard>.parquet     what rows with a boilerplate caption field got instead
    <dataset>/work/f-<fp>/query_counts.parquet                 global per-query counts (balancing)
    <dataset>/work/f-<fp>/cap_thresholds.npy                   exact-mode balancing cut per query
    <dataset>/work/f-<fp>/c-<fp2>/clean/<shard>.parquet|.json  balance -> fetch + images -> hash -> eval dedup
    <dataset>/work/f-<fp>/c-<fp2>/failed/<shard>.parquet       fetch/decode failures with status and reason
    <dataset>/work/f-<fp>/c-<fp2>/eval_matches/<shard>.parquet what each eval-dedup drop matched
    <dataset>/work/f-<fp>/c-<fp2>/within/w-<fp3>/              within-dataset drops, hold-out, shuffle pieces

A fingerprint covers every input that changes a result (the sources with their sizes and mtimes,
each stage's settings, the query list's and eval index's versions, and :data:`WORK_FORMAT`, the
version of this layout and of the records' code), so a changed input or a new witflow never
reuses stale parts: it works in a new directory beside the old.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from infra.config import (BalanceConfig, DedupConfig, GatherConfig, ImageConfig, SourceConfig, StorageConfig,
                          TextFilterConfig, to_dict)
from infra.storage import ObjectStore

WORK_FORMAT = 3  # bump when a record's fields or a key's content change


def fingerprint(*parts: Any) -> str:
    """A short stable digest of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sources_identity(sources: Sequence[SourceConfig], base_dir: str) -> list:
    """The sources as configured, plus size and mtime of their local files: a changed input is a new build."""
    out = []
    for src in sources:
        path = src.path if os.path.isabs(src.path) or "://" in src.path else os.path.join(base_dir, src.path)
        files = sorted(glob.glob(path)) if "://" not in path else []
        out.append([to_dict(src), [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files if os.path.isfile(f)]])
    return out


@dataclass(frozen=True)
class WorkDir:
    """One level of the work directory (``f-<fp>`` or ``f-<fp>/c-<fp2>``) and its keys."""

    root: str
    storage: StorageConfig

    @property
    def store(self) -> ObjectStore:
        return ObjectStore(self.root, self.storage)

    @classmethod
    def for_filter(cls, dataset_root: str, storage: StorageConfig, sources: Sequence[SourceConfig], base_dir: str,
                   text_filter: TextFilterConfig, queries_sha256: str) -> "WorkDir":
        fp = fingerprint(WORK_FORMAT, sources_identity(sources, base_dir), to_dict(text_filter), queries_sha256)
        return cls(f"{dataset_root.rstrip('/')}/work/f-{fp}", storage)

    def for_clean(self, balance: BalanceConfig, gather: GatherConfig, images: ImageConfig, dedup: DedupConfig,
                  eval_index_version: str | None) -> "WorkDir":
        fp = fingerprint(self.root, to_dict(balance), to_dict(gather), to_dict(images), to_dict(dedup),
                         eval_index_version)
        return WorkDir(f"{self.root}/c-{fp}", self.storage)

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
    CAPTION_COUNTS = "captions/counts.parquet"

    @staticmethod
    def caption_scratch(num_partitions: int) -> str:
        return f"captions/p{num_partitions}"
    CAP_THRESHOLDS = "cap_thresholds.npy"

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
    def within_drops(prefix: str) -> str:
        return f"{prefix}/drops.parquet"

    @staticmethod
    def holdout_ids(prefix: str) -> str:
        return f"{prefix}/holdout.parquet"

    @staticmethod
    def within_scratch(prefix: str) -> str:
        return f"{prefix}/shuffle"
