"""The dataset manifest: one typed record, the JSON it is written as, its one reader and its writer.

``manifest.json`` sits at a dataset's root (any ObjectStore root: path, file://, s3://) and holds
the schema version, the shard schema, every shard (rows, bytes, sha256), the held-out shards
(retrieval evaluation; training reads only ``shards``), the query list's and the eval index's
versions, the funnel, the resolved config, the work directory, the per-query counts, each source's
provenance (licence, attribution) and the eval-set hold-out check. Shard paths are relative to the
manifest's directory.

The build writes it through :func:`build_manifest` and :func:`write_manifest`; everything that
reads a build (the trainer, the evaluation runner) reads it through :func:`read_manifest`, which
refuses another schema version. ``queries``, ``eval_index``, ``funnel``, ``config`` and
``query_counts`` are records of the build, kept as the JSON objects it wrote.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from infra.config import StorageConfig
from infra.schema import SCHEMA_VERSION, SHARD_SCHEMA
from infra.storage import ObjectStore

MANIFEST_NAME = "manifest.json"

_KEYS = ("schema_version", "shard_schema", "num_rows", "num_shards", "queries", "eval_index", "funnel", "shards",
         "holdout", "config", "work", "query_counts", "sources", "eval_holdout")
_SHARD_KEYS = ("path", "rows", "bytes", "sha256", "image_bytes", "plan")


class ManifestError(ValueError):
    """A manifest that cannot be read as this witflow's; the message names its URI."""


@dataclass(frozen=True)
class ShardEntry:
    """One Parquet shard of a build, as ``tasks.shards.write_shard`` records it."""

    path: str  # relative to the dataset root
    rows: int
    bytes: int
    sha256: str
    image_bytes: int | None  # total encoded image bytes; None for shards without that column
    plan: str  # identity of the rows that went into the shard

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256,
                "image_bytes": self.image_bytes, "plan": self.plan}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ShardEntry":
        entry = _object(data, where, _SHARD_KEYS)
        return cls(path=_typed(entry, "path", str, where), rows=_typed(entry, "rows", int, where),
                   bytes=_typed(entry, "bytes", int, where), sha256=_typed(entry, "sha256", str, where),
                   image_bytes=_typed(entry, "image_bytes", int, where, optional=True),
                   plan=_typed(entry, "plan", str, where))


@dataclass(frozen=True)
class Holdout:
    """The held-out shards (listed apart from ``shards``: training never reads them)."""

    shards: tuple[ShardEntry, ...]
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"shards": [s.to_dict() for s in self.shards], "rows": self.rows}


@dataclass(frozen=True)
class Manifest:
    """A dataset build's manifest."""

    schema_version: int
    shard_schema: tuple[str, ...]
    num_rows: int
    num_shards: int
    queries: Mapping[str, Any] | None
    eval_index: Mapping[str, Any] | None
    funnel: Mapping[str, Any]
    shards: tuple[ShardEntry, ...]
    holdout: Holdout | None
    config: Mapping[str, Any]
    work: str | None
    query_counts: Mapping[str, Any] | None
    # Per source: kind, path, files with their size and provenance (origin, licence, attribution).
    sources: tuple[Mapping[str, Any], ...] = ()
    # Per eval set drawn from a training source: its source rows and how many are in the shards (0).
    eval_holdout: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as ``manifest.json`` (key order included)."""
        return {
            "schema_version": self.schema_version,
            "shard_schema": list(self.shard_schema),
            "num_rows": self.num_rows,
            "num_shards": self.num_shards,
            "queries": self.queries,
            "eval_index": self.eval_index,
            "funnel": self.funnel,
            "shards": [s.to_dict() for s in self.shards],
            "holdout": self.holdout.to_dict() if self.holdout else None,
            "config": self.config,
            "work": self.work,
            "query_counts": self.query_counts,
            "sources": [dict(src) for src in self.sources],
            "eval_holdout": {k: dict(v) for k, v in self.eval_holdout.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Manifest":
        """Parse a manifest's JSON; ``where`` (its URI) starts every error message."""
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:  # checked first: another version may have other fields
            raise ManifestError(f"{where}: schema version {version}, this witflow reads {SCHEMA_VERSION}")
        obj = _object(data, where, _KEYS)
        shards = _entries(obj["shards"], f"{where}: shards")
        num_rows, num_shards = _typed(obj, "num_rows", int, where), _typed(obj, "num_shards", int, where)
        if num_rows != sum(s.rows for s in shards) or num_shards != len(shards):
            raise ManifestError(f"{where}: num_rows={num_rows}, num_shards={num_shards}, but its shards list "
                                f"{len(shards)} shards of {sum(s.rows for s in shards)} rows")
        holdout = None
        if obj["holdout"] is not None:
            held = _object(obj["holdout"], f"{where}: holdout", ("shards", "rows"))
            holdout = Holdout(_entries(held["shards"], f"{where}: holdout.shards"),
                              _typed(held, "rows", int, f"{where}: holdout"))
        return cls(schema_version=version, shard_schema=tuple(_typed(obj, "shard_schema", list, where)),
                   num_rows=num_rows, num_shards=num_shards,
                   queries=_typed(obj, "queries", dict, where, optional=True),
                   eval_index=_typed(obj, "eval_index", dict, where, optional=True),
                   funnel=_typed(obj, "funnel", dict, where), shards=shards, holdout=holdout,
                   config=_typed(obj, "config", dict, where), work=_typed(obj, "work", str, where, optional=True),
                   query_counts=_typed(obj, "query_counts", dict, where, optional=True),
                   sources=tuple(_typed(obj, "sources", list, where)),
                   eval_holdout=_typed(obj, "eval_holdout", dict, where))


def build_manifest(*, config: Mapping[str, Any], shards: Sequence[Mapping[str, Any]], funnel: Mapping[str, Any],
                   queries: Mapping[str, Any] | None, eval_index: Mapping[str, Any] | None,
                   holdout: Sequence[Mapping[str, Any]] | None = None, work: str | None = None,
                   query_counts: Mapping[str, Any] | None = None, sources: Sequence[Mapping[str, Any]] = (),
                   eval_holdout: Mapping[str, Mapping[str, int]] | None = None) -> Manifest:
    """The manifest of a build from its shards' stats (``tasks.shards.write_shard``'s records)."""
    entries = tuple(ShardEntry.from_dict(s, f"shard {i}") for i, s in enumerate(shards))
    held = tuple(ShardEntry.from_dict(s, f"holdout shard {i}") for i, s in enumerate(holdout or ()))
    return Manifest(schema_version=SCHEMA_VERSION,
                    shard_schema=tuple(SHARD_SCHEMA.to_string(show_schema_metadata=False).splitlines()),
                    num_rows=sum(s.rows for s in entries), num_shards=len(entries), queries=queries,
                    eval_index=eval_index, funnel=funnel, shards=entries,
                    holdout=Holdout(held, sum(s.rows for s in held)) if held else None, config=config,
                    work=work, query_counts=query_counts, sources=tuple(sources), eval_holdout=dict(eval_holdout or {}))


def manifest_location(uri: str) -> tuple[str, str]:
    """(dataset root, manifest key) for a manifest's URI or the URI of the dataset holding it."""
    uri = str(uri).rstrip("/")
    if not uri.endswith(".json"):
        uri += "/" + MANIFEST_NAME
    root, name = posixpath.split(uri)
    return root or ".", name


def read_manifest(source: str | ObjectStore, storage: StorageConfig | None = None) -> Manifest:
    """The manifest at ``source``: a manifest URI, a dataset's URI, or a dataset's store.

    Raises FileNotFoundError when there is none, ValueError when it is not JSON, and ManifestError
    (a ValueError) when it is not one this witflow reads: another schema version, a missing,
    unknown or mistyped field, counts that disagree with its shards.
    """
    if isinstance(source, ObjectStore):
        store, name = source, MANIFEST_NAME
    else:
        root, name = manifest_location(source)
        store = ObjectStore(root, storage)
    uri = store.uri(name)
    try:
        data = store.read_json(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"no dataset manifest at {uri}") from None
    return Manifest.from_dict(data, uri)


def write_manifest(store: ObjectStore, manifest: Manifest) -> str:
    """Write ``manifest.json`` at the store's root (atomically); returns its URI."""
    store.write_json(MANIFEST_NAME, manifest.to_dict())
    return store.uri(MANIFEST_NAME)


def _object(data: Any, where: str, keys: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    unknown = sorted(set(data) - set(keys))
    if missing or unknown:
        raise ManifestError(f"{where}: " + "; ".join(filter(None, [
            f"missing key(s) {', '.join(missing)}" if missing else "",
            f"unknown key(s) {', '.join(unknown)}" if unknown else ""])))
    return data


def _typed(obj: Mapping[str, Any], key: str, tp: type, where: str, optional: bool = False) -> Any:
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: {key}: expected {'null or ' if optional else ''}{tp.__name__}, "
                            f"got {type(value).__name__}")
    return value


def _entries(data: Any, where: str) -> tuple[ShardEntry, ...]:
    if not isinstance(data, list):
        raise ManifestError(f"{where}: expected a list, got {type(data).__name__}")
    return tuple(ShardEntry.from_dict(e, f"{where}[{i}]") for i, e in enumerate(data))
