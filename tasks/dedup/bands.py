"""Candidate pairs within hash bands, with work and memory bounded per row whatever the group sizes.

Why: two 64-bit codes within ``r`` bits agree exactly on at least one of ``r + 1`` disjoint bands
(the pigeonhole argument of multi-index hashing), so the within-dataset dedup groups rows by
(band, band value) and compares only inside a group. Comparing every pair of a group is quadratic
in its size, and group sizes grow with the data: at r = 4 a band holds 12–13 bits, so 400M uniform
codes put ~50k rows in every group, and real hashes are skewed on top of that. So:

- a group of at most ``max_candidates + 1`` rows compares all its pairs;
- a bigger group is split again by the same argument on the bits its band did not fix: codes
  within r of each other also agree on one of r + 1 sub-bands of the remaining bits, so every pair
  within r still meets in some sub-group (recall stays exact) while the sub-groups are ~2^10 times
  smaller;
- what cannot be split (identical codes, a cluster of near-identical codes that no sub-band
  divides, or still too big after :data:`MAX_DEPTH` levels) is compared in code order with its
  ``max_candidates`` next rows only: the capped candidate set. A
  cluster of identical or near-identical codes is then a chain of verified neighbours, which the
  connected components join as one group, at ``max_candidates`` comparisons per row;
- a *hot* group, too big for one task's memory, is split by sub-bands before its rows reach a
  task when a sample says it splits well (:func:`splits_well`), each sub-group in the task of its
  key; otherwise it is capped at once and compared over ranges of its code order
  (:func:`window_pairs`), each range in its own task with the next range's first rows beside it,
  so that the pairs are exactly the whole group's capped candidate set.

Everything is vectorised over all groups at once (numpy), one pass per offset, not one per group.
The result depends only on which rows share a group, never on the order rows arrive in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.dedup.mih import chunk_bits

MAX_DEPTH = 2  # levels of copying sub-bands (≤ (r + 1)² copies of a row) before a group is capped
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def bands(radius: int) -> list[tuple[int, int]]:
    """(shift, bits) of the r + 1 pigeonhole bands of a 64-bit code."""
    return chunk_bits(radius + 1) if radius < 64 else [(0, 64)]


def _mask(bits: np.ndarray | int) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.uint64)
    # (1 << 64) overflows: a full-width mask is all ones.
    return np.where(bits >= 64, _ONES, (np.uint64(1) << np.minimum(bits, np.uint64(63))) - np.uint64(1))


def band_values(codes: np.ndarray, shift: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(value of the band, the code without the band's bits packed low): the level-0 split."""
    codes = codes.astype(np.uint64)
    value = (codes >> np.uint64(shift)) & _mask(bits)
    low = codes & _mask(shift)
    high = (codes >> np.uint64(shift + bits)) << np.uint64(shift) if shift + bits < 64 else np.zeros_like(codes)
    return value, low | high


@dataclass
class PairStats:
    """What the pairing did: comparisons made and rows whose candidate set was capped."""

    comparisons: int = 0
    capped_rows: int = 0
    largest_group: int = 0

    def add(self, other: "PairStats") -> "PairStats":
        self.comparisons += other.comparisons
        self.capped_rows += other.capped_rows
        self.largest_group = max(self.largest_group, other.largest_group)
        return self


def compact_ids(*keys: np.ndarray) -> np.ndarray:
    """Dense group ids (0..k-1) of the rows' key tuples."""
    order = np.lexsort(keys[::-1])
    change = np.zeros(len(order), dtype=bool)
    if len(order):
        change[0] = True
        for k in keys:
            ks = k[order]
            change[1:] |= ks[1:] != ks[:-1]
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.cumsum(change) - 1
    return ids


def _offset_pairs(left: np.ndarray, end: np.ndarray, max_offset: int, codes: np.ndarray, radius: int,
                  stats: PairStats) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, i + k), 1 ≤ k ≤ max_offset, inside each row's group [.., end), within radius."""
    out_i, out_j = [], []
    active = left[left + 1 < end[left]]
    k = 1
    while len(active) and k <= max_offset:
        right = active + k
        close = np.bitwise_count(codes[active] ^ codes[right]) <= radius
        stats.comparisons += len(active)
        out_i.append(active[close])
        out_j.append(right[close])
        k += 1
        active = active[active + k < end[active]]
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def sub_band_bits(free: np.ndarray, width: np.ndarray, c: int, parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-band ``c`` of ``parts`` of each row's ``width`` free bits (sizes differ by at most one,
    low bits first): (its value, the free bits left, packed low, their width)."""
    size = width // parts + (c < width % parts)
    lo = (c * (width // parts) + np.minimum(c, width % parts)).astype(np.uint64)
    value = (free >> lo) & _mask(size)
    top = lo + size.astype(np.uint64)
    above = np.where(top < 64, free >> np.minimum(top, np.uint64(63)), np.uint64(0))
    return value, (free & _mask(lo)) | (above << lo), width - size


def splits_well(group: np.ndarray, free: np.ndarray, width: int, radius: int) -> np.ndarray:
    """Per group (dense ids 0..k-1 of ``group``), whether its rows, or a sample of them, split by
    sub-bands as :func:`candidate_pairs` splits a big group at the first level: by
    :func:`_split_plan`'s rule, no sub-band on which all agree and none whose biggest sub-group
    holds over a quarter (otherwise the group is capped, or whittled down a whole sub-band at a
    time). A group of one row, of identical codes or of fewer free bits than sub-bands has a whole
    sub-band, so it does not split."""
    dense = compact_ids(group)
    size = np.bincount(dense)
    keep_band, poor = _split_plan(dense, size[dense], free, np.full(len(free), width, np.int64), radius + 1)
    well = np.zeros(len(size), bool)
    well[dense] = (keep_band < 0) & ~poor
    return well


def _sorted_groups(group: np.ndarray, codes: np.ndarray, order_key: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows in (group, code, order_key) order: (that order, each group's start and size in
    it, and each sorted row's group end)."""
    order = np.lexsort((order_key, codes, group))
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, len(group)])
    return order, starts, sizes, np.repeat(starts + sizes, sizes)


def _split_plan(parent: np.ndarray, parent_size: np.ndarray, free: np.ndarray, width: np.ndarray, parts: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """How each parent group splits over the ``parts`` sub-bands of its free bits (one sub-band in
    memory at a time): per row, the one sub-band to keep (a whole one) or -1, and whether its
    parent splits poorly.

    - A sub-band on which all of a parent's codes agree holds its whole parent: every pair meets
      there, so only that one is kept, with those bits gone; no copies are made.
    - A parent whose biggest sub-group keeps more than a quarter of it (a cluster of near-identical
      codes) would be copied ``parts`` times for little gain: it is capped instead.
    - Otherwise every sub-group is kept: ``parts`` copies, each in a group ~2^bits times smaller.
    """
    dense = compact_ids(parent)
    first_whole = np.full(dense.max() + 1, -1, np.int64)
    biggest = np.zeros(dense.max() + 1, np.int64)
    for c in reversed(range(parts)):
        value = sub_band_bits(free, width, c, parts)[0]
        sub = compact_ids(parent, value)
        size = np.bincount(sub)[sub]
        np.maximum.at(biggest, dense, size)
        whole = np.zeros(len(first_whole), bool)
        whole[dense[size == parent_size]] = True
        first_whole[whole] = c  # reversed: the lowest whole sub-band wins
    keep_band = first_whole[dense]
    return keep_band, (keep_band < 0) & (biggest[dense] * 4 > parent_size)


def candidate_pairs(group: np.ndarray, codes: np.ndarray, free: np.ndarray, width: np.ndarray, order_key: np.ndarray,
                    radius: int, max_candidates: int, depth: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, PairStats]:
    """Row pairs (i, j) that share a group and whose codes are within ``radius`` bits.

    ``group``: a group id per row (rows of a group share the bits that made it); ``free``: the
    bits of each code no group key has fixed yet, packed low, ``width`` of them; ``order_key``: a
    total order of the rows' samples (the capped comparison follows (code, order_key)). A pair may
    be returned more than once (it can meet in several sub-groups).
    """
    stats = PairStats()
    n = len(group)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
    depth = np.zeros(n, np.int64) if depth is None else depth
    order, starts, sizes, end = _sorted_groups(group, codes, order_key)
    c = codes[order]
    stats.largest_group = int(sizes.max())
    row_group = np.repeat(np.arange(len(starts)), sizes)
    small = sizes <= max_candidates + 1
    # A group of identical codes cannot be split (every sub-band agrees): cap it at once.
    identical = c[starts] == c[starts + sizes - 1]
    can_split = (~small) & ~identical & (width[order][starts] > radius) & (depth[order][starts] < MAX_DEPTH)
    capped = (~small) & ~can_split
    out_i, out_j = [], []
    split_rows = order[can_split[row_group]]  # original row indices, grouped
    if len(split_rows):
        level_group = np.empty(n, np.int64)
        level_group[order] = row_group
        parts = radius + 1
        parent = group[split_rows]
        keep_band, poor = _split_plan(parent, sizes[level_group[split_rows]], free[split_rows], width[split_rows],
                                      parts)
        # Parents that do not split well are capped here, with the groups that cannot split.
        capped[level_group[split_rows[poor]]] = True
        for sub_band in range(parts):  # one sub-band at a time: its sub-groups never meet another's
            chosen = (keep_band == sub_band) | ((keep_band < 0) & ~poor)
            rows = split_rows[chosen]
            if len(rows) < 2:
                continue
            value, rest, left = sub_band_bits(free[rows], width[rows], sub_band, parts)
            sub_group = compact_ids(group[rows], value)
            # A whole sub-group lost bits but was not copied: only real splits spend depth.
            copied = keep_band[chosen] < 0
            i, j, sub = candidate_pairs(sub_group, codes[rows], rest, left, order_key[rows], radius, max_candidates,
                                        depth[rows] + copied)
            stats.add(sub)
            out_i.append(rows[i])
            out_j.append(rows[j])
    pos = np.arange(n)
    for chosen in (small, capped):
        rows = pos[chosen[row_group]]
        if len(rows):
            i, j = _offset_pairs(rows, end, max_candidates, c, radius, stats)
            out_i.append(order[i])
            out_j.append(order[j])
    stats.capped_rows += int(sizes[capped].sum())
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
    return np.concatenate(out_i), np.concatenate(out_j), stats


def window_pairs(group: np.ndarray, codes: np.ndarray, order_key: np.ndarray, lead: np.ndarray, radius: int,
                 max_candidates: int) -> tuple[np.ndarray, np.ndarray, PairStats]:
    """A capped group's pairs, one range of it at a time: each ``lead`` row with its
    ``max_candidates`` next rows in (code, order_key) order inside its ``group``, within ``radius``.

    A group here is one range of a hot group's code order: its own rows (``lead``) followed by at
    least ``max_candidates`` rows of the next range (not ``lead``: they start no pair here, their
    own range's task pairs them), or by none when the range is the last. The pairs of all ranges
    are then exactly those the whole group, capped, gives in one task.
    """
    stats = PairStats()
    n = len(group)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
    order, _, sizes, end = _sorted_groups(group, codes, order_key)
    stats.largest_group = int(sizes.max())
    left = np.flatnonzero(lead[order])
    stats.capped_rows = len(left)
    i, j = _offset_pairs(left, end, max_candidates, codes[order], radius, stats)
    return order[i], order[j], stats
