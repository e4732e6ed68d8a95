"""Exact r-neighbour search over 64-bit hashes: multi-index hashing and its brute-force reference.

Why: a Hamming-radius lookup of n candidates against m eval hashes (or n against n within the
dataset) must never be a scan over all pairs. Multi-index hashing (Norouzi et al.) splits each
code into substrings; by the pigeonhole principle two codes within ``r`` bits agree within
``r // m`` bits on some substring, so only the keys near each query's substrings are probed.
:func:`brute_force_search` is the vectorised scan it must equal (tests, bench/dedup.py).
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def chunk_bits(m: int) -> list[tuple[int, int]]:
    """(shift, bits) of m contiguous substrings covering 64 bits (sizes differ by at most one)."""
    sizes = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    out, hi = [], 64
    for b in sizes:
        hi -= b
        out.append((hi, b))
    return out


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for k in range(1, radius + 1):
        masks.extend(sum(1 << i for i in c) for c in itertools.combinations(range(bits), k))
    return np.asarray(masks, dtype=np.int64)


def _probe_count(bits: int, radius: int) -> int:
    return sum(math.comb(bits, k) for k in range(radius + 1))


def choose_substrings(n: int, radius: int) -> int | None:
    """Number of substrings m minimising expected work per query, or None if a scan is cheaper.

    Pigeonhole (Norouzi et al., MIH): if two codes differ in ≤ r bits, some substring of m differs
    in ≤ r // m bits. Per substring we probe every key within r // m bits; the expected cost is
    probes × (1 + 2 · n / 2^bits) (a probe, then the candidates it yields). m = r + 1 is the
    exact-match special case; larger substrings with a small probe radius win once n is large.
    """
    best, best_cost = None, float(n)  # the scan: one popcount per stored code
    # m ≥ 3: substrings of ≤ 22 bits, so each bucket offset table has ≤ 2^22 + 1 int64 entries (32 MiB).
    for m in range(3, max(3, radius + 1) + 1):
        sub_r = radius // m
        cost = sum(_probe_count(b, sub_r) * (1.0 + 2.0 * n / 2.0 ** b) for _, b in chunk_bits(m))
        if cost < best_cost:
            best, best_cost = m, cost
    return best


class MultiIndexHash:
    """Exact r-neighbour search over 64-bit codes (numpy-vectorised multi-index hashing)."""

    def __init__(self, codes: np.ndarray) -> None:
        self.codes = np.ascontiguousarray(codes, dtype=np.uint64)
        self._tables: dict[int, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}

    def __len__(self) -> int:
        return len(self.codes)

    def _tables_for(self, m: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        if m not in self._tables:
            tables = []
            for shift, bits in chunk_bits(m):
                keys = ((self.codes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
                order = np.argsort(keys, kind="stable").astype(np.int64)
                offsets = np.zeros((1 << bits) + 1, dtype=np.int64)
                np.cumsum(np.bincount(keys, minlength=1 << bits), out=offsets[1:])
                tables.append((shift, bits, offsets, order))
            self._tables[m] = tables
        return self._tables[m]

    def search(self, queries: np.ndarray, radius: int, *, max_probes: int = 2_000_000
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (query index, code index, distance) with Hamming distance ≤ radius, sorted."""
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))
        if len(queries) == 0 or len(self.codes) == 0:
            return empty
        m = choose_substrings(len(self.codes), radius)
        if m is None:
            return brute_force_search(self.codes, queries, radius)
        tables = self._tables_for(m)
        sub_r = radius // m
        masks = [_flip_masks(bits, sub_r) for _, bits, _, _ in tables]
        per_query = sum(len(x) for x in masks)
        step = max(1, max_probes // per_query)
        out_q, out_c, out_d = [], [], []
        for lo in range(0, len(queries), step):
            q = queries[lo:lo + step]
            cand_q, cand_c = [], []
            for (shift, bits, offsets, order), flips in zip(tables, masks):
                keys = ((q >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
                probes = (keys[:, None] ^ flips[None, :]).reshape(-1)
                starts, ends = offsets[probes], offsets[probes + 1]
                counts = ends - starts
                total = int(counts.sum())
                if total == 0:
                    continue
                nz = np.flatnonzero(counts)
                counts, starts = counts[nz], starts[nz]
                first = np.cumsum(counts) - counts
                pos = np.repeat(starts - first, counts) + np.arange(total, dtype=np.int64)
                cand_c.append(order[pos])
                cand_q.append(np.repeat(nz // len(flips), counts))
            if not cand_c:
                continue
            qi, ci = np.concatenate(cand_q), np.concatenate(cand_c)
            d = np.bitwise_count(q[qi] ^ self.codes[ci]).astype(np.int32)
            keep = d <= radius
            qi, ci, d = qi[keep], ci[keep], d[keep]
            # A pair found through several substrings is one pair.
            pair = np.unique(qi * len(self.codes) + ci, return_index=True)[1]
            out_q.append(qi[pair] + lo), out_c.append(ci[pair]), out_d.append(d[pair])
        if not out_q:
            return empty
        return np.concatenate(out_q), np.concatenate(out_c), np.concatenate(out_d)


def brute_force_search(codes: np.ndarray, queries: np.ndarray, radius: int, *, block: int = 1 << 18
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised scan of every (query, code) pair: the reference MIH must equal."""
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    step = max(1, block // max(len(codes), 1))
    out_q, out_c, out_d = [], [], []
    for lo in range(0, len(queries), step):
        d = np.bitwise_count(queries[lo:lo + step, None] ^ codes[None, :])
        qi, ci = np.nonzero(d <= radius)
        out_q.append(qi.astype(np.int64) + lo), out_c.append(ci.astype(np.int64)), out_d.append(d[qi, ci].astype(np.int32))
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(out_q), np.concatenate(out_c), np.concatenate(out_d)
