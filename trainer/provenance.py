"""What a training run was trained on, recorded with its checkpoints and its export.

A :class:`DatasetIdentity` names the dataset: its manifest (URI, and the sha256 of its bytes), its
training shards (their paths and sha256s in order — the training stream is a function of them, so
this is what a resume compares), and its training rows (how many, and a digest of their sorted
ids). The ids themselves are kept beside it as sorted 64-bit hashes (``training_ids.npy``), so an
evaluation can check that the pairs it holds out were never trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from infra.manifest import MANIFEST_NAME, manifest_sha256, read_manifest

TRAINING_IDS_NAME = "training_ids.npy"


@dataclass(frozen=True)
class DatasetIdentity:
    manifest_uri: str
    manifest_sha256: str
    shards_digest: str  # sha256 of the training shards' (path, sha256) list, in order
    training_ids_digest: str  # sha256 of the sorted training sample ids, one per line
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DatasetIdentity | None":
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__}) if data else None
        except (KeyError, TypeError):
            return None  # recorded by an older witflow: unknown

    def describe(self) -> str:
        return f"manifest sha256 {self.manifest_sha256[:12]}…, {self.rows} rows, at {self.manifest_uri}"


def id_hashes(sample_ids: Iterable[str]) -> np.ndarray:
    """Sorted 64-bit BLAKE2b hashes of sample ids: membership tests without keeping the strings."""
    values = {int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")
              for s in sample_ids}
    return np.array(sorted(values), dtype=np.uint64)


def dataset_identity(source: Any) -> tuple[DatasetIdentity, np.ndarray]:
    """The identity of a ``trainer.data.DatasetSource``'s dataset and its training ids' hashes.
    Refuses a manifest whose training shards are not the ones ``source`` streams (rewritten since)."""
    store = source.store()
    manifest = read_manifest(store)
    uri = store.uri(MANIFEST_NAME)
    streamed = [(s.key, s.rows) for s in source.shards]
    if [(s.path, s.rows) for s in manifest.shards if s.rows > 0] != streamed:
        raise ValueError(f"{uri}: the manifest was rewritten since this run read it; start the run again")
    ids: list[str] = []
    for s in manifest.shards:
        ids += store.read_parquet(s.path, columns=["sample_id"]).column("sample_id").to_pylist()
    ids.sort()
    shards = json.dumps([(s.path, s.sha256) for s in manifest.shards])
    identity = DatasetIdentity(uri, manifest_sha256(store), hashlib.sha256(shards.encode()).hexdigest(),
                               hashlib.sha256("\n".join(ids).encode()).hexdigest(), len(ids))
    return identity, id_hashes(ids)


def write_training_ids(directory: Path, hashes: np.ndarray) -> None:
    tmp = directory / (TRAINING_IDS_NAME + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, hashes)
    tmp.replace(directory / TRAINING_IDS_NAME)


def trained_on(holdout_ids: Sequence[str], training: np.ndarray) -> int:
    """How many of ``holdout_ids`` are among the training ids' hashes ``training``."""
    return int(np.isin(id_hashes(holdout_ids), training).sum()) if len(training) else 0
