"""The typed records the dataset build's stages hand each other (and the flow passes along).

Each per-shard record is written to the work directory as JSON after the data it describes (its
completion record), so a rerun returns the record instead of redoing the shard.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

from infra.config import to_dict
from infra.funnel import Funnel


def to_json(record: Any) -> dict:
    """A record as plain JSON data (funnels as their dicts)."""
    return to_dict(record)


@dataclass(frozen=True)
class QueryListRef:
    """The query list a build matches against: where, which bytes, how many queries."""

    uri: str
    sha256: str
    rows: int


@dataclass(frozen=True)
class EvalIndexRef:
    """The eval-set index of this build (content-versioned): where, which version, set sizes."""

    root: str
    version: str
    sets: Mapping[str, int]
    built: bool


@dataclass(frozen=True)
class QueryMatchCounts:
    """Per-shard match counts of the queries that matched (sparse: ids and their counts)."""

    query_ids: tuple[int, ...] = ()
    query_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class FilterRecord:
    """One input shard after read -> text filters -> query match."""

    shard_id: str
    rows: int
    funnel: Funnel = field(default_factory=Funnel, compare=False)
    matches: QueryMatchCounts = QueryMatchCounts()
    caption_words: tuple[int, ...] = ()  # rows read by words in their first caption field (tasks.captions)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FilterRecord":
        return cls(data["shard_id"], int(data["rows"]), Funnel.from_dict(data["funnel"]),
                   QueryMatchCounts(tuple(data["matches"]["query_ids"]), tuple(data["matches"]["query_counts"])),
                   tuple(data.get("caption_words", ())))


@dataclass(frozen=True)
class CaptionCounts:
    """The repeated-caption count of a build (tasks.captions): where its table is, the threshold,
    and how many values it found boilerplate."""

    key: str  # in the filter stage's work directory: COUNTS_SCHEMA rows, boilerplate and the most repeated others
    min_images: int | None
    boilerplate: int


@dataclass(frozen=True)
class CleanRecord:
    """One filtered shard after balance -> fetch + images -> hash -> eval-set dedup."""

    shard_id: str
    rows: int
    bytes: int  # in-memory size of the clean part: the output plan's byte estimate
    funnel: Funnel = field(default_factory=Funnel, compare=False)
    matches: QueryMatchCounts = QueryMatchCounts()
    eval_matches: int = 0  # verified (sample, eval image) pairs written beside the part
    transient_failures: int = 0  # rows `--retry-failed` would fetch again

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CleanRecord":
        return cls(data["shard_id"], int(data["rows"]), int(data["bytes"]), Funnel.from_dict(data["funnel"]),
                   QueryMatchCounts(tuple(data["matches"]["query_ids"]), tuple(data["matches"]["query_counts"])),
                   int(data["eval_matches"]), int(data["transient_failures"]))


@dataclass(frozen=True)
class FilterStage:
    """The read-filter-match stage's result: its work directory and one record per input shard."""

    work: Any  # tasks.build.workdir.WorkDir
    records: tuple[FilterRecord, ...]


@dataclass(frozen=True)
class CleanStage:
    """The clean stage's result: its work directory and one record per filtered shard."""

    work: Any  # tasks.build.workdir.WorkDir
    records: tuple[CleanRecord, ...]


@dataclass(frozen=True)
class QueryCountsSummary:
    """What the global reduce after the text stage found (also in the manifest's ``query_counts``):
    the per-query counts, and the rows dropped because another shard's row has the same URL."""

    matched_queries: int
    pairs: int
    over_cap: int
    url_duplicates: int = 0


@dataclass(frozen=True)
class PartRows:
    """Rows a clean part keeps after the within-dataset drops, and how many of them are held out."""

    shard_id: str
    kept: int
    held: int


@dataclass(frozen=True)
class WithinResult:
    """The within-dataset dedup and hold-out: counts per part, drop reasons, where the ids are."""

    key: str  # the work-directory prefix holding the shuffles and holdout.parquet
    drops: int
    reasons: Mapping[str, int]
    parts: tuple[PartRows, ...]
    duplicates: Any = None  # tasks.dedup.within.DuplicateSets: the drops by part group, in storage

    @functools.cached_property
    def by_part(self) -> dict[str, PartRows]:
        return {p.shard_id: p for p in self.parts}


@dataclass(frozen=True)
class WrittenShards:
    """The output shards' stats (as ``tasks.shards.write_shard`` returns them), training and held out.

    Lists, not tuples: Prefect links a task's inputs to upstream results by object identity, and the
    empty tuple is one shared object, so an empty hold-out would draw edges that are not there."""

    shards: list[Mapping[str, Any]]
    holdout: list[Mapping[str, Any]]
