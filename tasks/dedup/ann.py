"""Nearest eval descriptors by inner product: faiss (exact for small indexes, IVF for large ones).

Why: each candidate is verified only against the few eval images whose descriptors are nearest
(:mod:`tasks.dedup.copy_detect`), and finding those must never be a scan over every eval entry
at scale. Below ``IVF_MIN_ENTRIES`` an exact flat scan is cheap and loses nothing; above it an
inverted file (k-means cells, ``nprobe`` cells searched) answers in a small fraction of a scan
(``bench/dedup.py``: lookups/s against 1M entries vs a vectorised numpy scan, and the recall of the
true nearest neighbours). :func:`brute_force_top_k` is that numpy scan, the reference.
"""

from __future__ import annotations

import numpy as np

IVF_MIN_ENTRIES = 50_000
IVF_NPROBE = 32
_TRAIN_PER_CELL = 64  # k-means training points per cell (faiss warns below ~39)
_SEED = 1234


def _faiss():
    import faiss  # a compiled library: imported only where an index is built or searched

    faiss.omp_set_num_threads(1)  # one core per Ray worker; the build's parallelism is the shards
    return faiss


class DescriptorIndex:
    """Inner-product top-k over unit descriptors (float32, one row per entry)."""

    def __init__(self, vectors: np.ndarray, *, nprobe: int = IVF_NPROBE) -> None:
        faiss = _faiss()
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = self.vectors.shape
        self.nprobe = nprobe
        if n < IVF_MIN_ENTRIES:
            self.index = faiss.IndexFlatIP(dim)
        else:
            cells = int(4 * np.sqrt(n))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(_SEED)
            train = self.vectors[rng.choice(n, size=min(n, cells * _TRAIN_PER_CELL), replace=False)]
            self.index.cp.seed = _SEED
            self.index.train(train)
            self.index.nprobe = nprobe
        if n:
            self.index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def exact(self) -> bool:
        return len(self.vectors) < IVF_MIN_ENTRIES

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, entry ids), each (len(queries), k); missing neighbours have id −1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, len(self.vectors)))
        if len(queries) == 0 or len(self.vectors) == 0:
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        return self.index.search(queries, k)


def brute_force_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, *, block: int = 64
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The vectorised numpy scan: every query against every entry (the reference for the index)."""
    sims, ids = [], []
    for lo in range(0, len(queries), block):
        s = queries[lo:lo + block] @ vectors.T
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        ts = np.take_along_axis(s, top, 1)
        order = np.argsort(-ts, axis=1)
        sims.append(np.take_along_axis(ts, order, 1)), ids.append(np.take_along_axis(top, order, 1))
    return np.concatenate(sims), np.concatenate(ids)
