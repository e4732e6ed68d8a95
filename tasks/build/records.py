"""The typed records the dataset build's stages hand each other (and the flow passes along).

Each per-shard record is written to the work directory as JSON after the data it describes (its
completion record), so a rerun returns the record instead of redoing the shard.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.config import to_dict
from infra.funnel import Funnel
from infra.storage import read_parquet_once


def to_json(record: Any) -> dict:
    """A record as plain JSON data (funnels as their dicts), without its fields marked
    ``metadata={"json": False}`` (pointers into the work directory, for the next stage only)."""
    data = to_dict(record)
    if dataclasses.is_dataclass(record):
        for f in dataclasses.fields(record):
            if f.metadata.get("json", True) is False:
                data.pop(f.name, None)
    return data


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


class QueryMatchCounts:
    """Per-shard match counts of the queries that matched (sparse: ids and their counts), as JSON
    ``{"query_ids": [...], "query_counts": [...]}``.

    Kept packed (int32 ids, int64 counts: 12 bytes a query), not as tuples of Python ints (~50):
    the driver holds one per shard of each stage's records, tens of thousands of queries each."""

    __slots__ = ("_ids", "_counts")

    def __init__(self, query_ids: Any = (), query_counts: Any = ()) -> None:
        ids, counts = np.asarray(query_ids, np.int32), np.asarray(query_counts, np.int64)
        if ids.shape != counts.shape or ids.ndim != 1:
            raise ValueError(f"query match counts: {ids.shape} ids for {counts.shape} counts")
        self._ids, self._counts = ids.tobytes(), counts.tobytes()

    @property
    def query_ids(self) -> np.ndarray:
        return np.frombuffer(self._ids, np.int32)

    @property
    def query_counts(self) -> np.ndarray:
        return np.frombuffer(self._counts, np.int64)

    def to_dict(self) -> dict:
        return {"query_ids": self.query_ids.tolist(), "query_counts": self.query_counts.tolist()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueryMatchCounts):
            return NotImplemented
        return (self._ids, self._counts) == (other._ids, other._counts)

    def __hash__(self) -> int:
        return hash((self._ids, self._counts))

    def __repr__(self) -> str:
        return f"QueryMatchCounts({len(self._ids) // 4} queries, {int(self.query_counts.sum())} pairs)"

    def __reduce__(self) -> tuple:
        return QueryMatchCounts, (self.query_ids, self.query_counts)


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
                   QueryMatchCounts(data["matches"]["query_ids"], data["matches"]["query_counts"]),
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
                   QueryMatchCounts(data["matches"]["query_ids"], data["matches"]["query_counts"]),
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


# Rows of a URL duplicate: which row, in which filtered shard, its queries, and the row kept instead.
URL_DROPS_SCHEMA = pa.schema([("sample_id", pa.string()), ("shard_id", pa.string()),
                              ("query_ids", pa.list_(pa.int32())), ("duplicate_of", pa.string())])


def shard_group(shard_id: str, num_groups: int) -> int:
    """The group of a shard's URL drops: a hash of its id, so no process needs the list of shards."""
    return zlib.crc32(shard_id.encode()) % num_groups


@dataclass(frozen=True)
class UrlDrops:
    """The URL duplicates in storage, by shard group: the rows of shard ``s`` are in file
    ``keys[shard_group(s, len(keys))]`` of ``store`` (URL_DROPS_SCHEMA, by sample_id). Each
    worker reads the group of the shard it works on; nothing holds the whole list."""

    store: Any  # infra.storage.ObjectStore
    keys: tuple[str, ...]
    total: int

    def of_shard(self, shard_id: str) -> pa.Table:
        """URL_DROPS_SCHEMA rows of one shard, by sample_id."""
        if not self.keys or not self.total:
            return URL_DROPS_SCHEMA.empty_table()
        table = read_parquet_once(self.store, self.keys[shard_group(shard_id, len(self.keys))])
        return table.filter(pc.equal(table.column("shard_id"), shard_id))

    def kept(self, table: pa.Table, shard_id: str) -> pa.BooleanArray:
        """Which rows of shard ``shard_id``'s ``table`` (a ``sample_id`` column) are not URL drops."""
        ids = self.of_shard(shard_id).column("sample_id")
        return pc.invert(pc.is_in(table.column("sample_id"), ids)) if len(ids) else pa.array(
            np.ones(table.num_rows, bool))


@dataclass(frozen=True)
class QueryCountsSummary:
    """What the global reduce after the text stage found (also in the manifest's ``query_counts``):
    the per-query counts, and the rows dropped because another shard's row has the same URL
    (``url_drops``: where they are, for the clean stage; not in the manifest)."""

    matched_queries: int
    pairs: int
    over_cap: int
    url_duplicates: int = 0
    url_drops: UrlDrops | None = field(default=None, compare=False, metadata={"json": False})


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
