"""The balancing coins: stable hashes of (seed, sample, query), shared by the build and the loader.

MetaCLIP flips ``random.random()``; these coins are hashes, so a pair's outcome does not depend on
how the pool is split into shards, in which order they run, or on which machine. The build's
balancing (tasks/balance.py) and the trainer's per-epoch online balancing (trainer/data.py) use
the same rule.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import pyarrow as pa


def sample_hashes(sample_ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A stable 64-bit hash per sample id (BLAKE2b), the same on every machine and Python."""
    if isinstance(sample_ids, (pa.Array, pa.ChunkedArray)):
        sample_ids = sample_ids.to_pylist()
    return np.fromiter((int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")
                        for s in sample_ids), dtype=np.uint64, count=len(sample_ids))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche on uint64 (the balancing coins, and the
    partitions of the dedup's shuffles)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x).astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def pair_hashes(sample_hash: np.ndarray, query_ids: np.ndarray, seed: int) -> np.ndarray:
    """Hash of (seed, sample, query) per pair: the coin of probability mode, the rank of exact mode."""
    with np.errstate(over="ignore"):
        key = mix64(query_ids.astype(np.uint64) + mix64(np.full(1, seed % 2**64, np.uint64)))
        return mix64(sample_hash.astype(np.uint64) ^ key)


def keep_with_probability(query_ids: np.ndarray, hashes: np.ndarray, rows: np.ndarray, counts: np.ndarray,
                          max_per_query: int, num_rows: int) -> np.ndarray:
    """MetaCLIP's draw: each (row, query) pair survives its coin with probability min(1, t / count);
    a row is kept if any of its pairs survives. ``rows`` maps each pair to its row."""
    prob = np.minimum(1.0, max_per_query / np.maximum(counts[query_ids], 1))  # 0 cannot occur; guard anyway
    uniform = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53  # the top 53 bits: exact doubles
    keep = np.zeros(num_rows, bool)
    np.logical_or.at(keep, rows, uniform < prob)
    return keep
