"""Eval-index lookups/s: multi-index hashing vs a vectorised numpy brute force, same run.

Random 64-bit eval hashes (100k and 1M); queries are half random, half planted neighbours of eval
hashes (a few bits flipped), so lookups return real matches. MIH answers every query; the brute
force (one XOR + popcount per stored hash, numpy-vectorised) answers a subsample and its rate is
scaled per lookup. On that subsample both must return the same pairs. Rates are per CPU-second
(``time.process_time``; both sides single-threaded) so that other load on a shared machine does not
skew the comparison.

    .venv/bin/python bench/dedup.py           # 100k and 1M, r=4 and r=8
    .venv/bin/python bench/dedup.py --quick   # 100k only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.dedup.mih import MultiIndexHash, brute_force_search, choose_substrings  # noqa: E402


def random_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)


def queries_for(rng: np.random.Generator, codes: np.ndarray, n: int, radius: int) -> np.ndarray:
    planted = codes[rng.integers(0, len(codes), size=n // 2)].copy()
    for i in range(len(planted)):
        for bit in rng.choice(64, size=int(rng.integers(0, radius + 1)), replace=False):
            planted[i] ^= np.uint64(1) << np.uint64(int(bit))
    return np.concatenate([planted, random_codes(rng, n - len(planted))])


def run(n_eval: int, radius: int, n_queries: int, n_brute: int, rng: np.random.Generator) -> float:
    codes = random_codes(rng, n_eval)
    queries = queries_for(rng, codes, n_queries, radius)
    mih = MultiIndexHash(codes)
    t = time.process_time()
    mih.search(queries[:64], radius)  # builds the substring tables (timed apart)
    build_s = time.process_time() - t
    t = time.process_time()
    q, c, d = mih.search(queries, radius)
    mih_rate = len(queries) / (time.process_time() - t)
    sub = np.concatenate([queries[: n_brute // 2], queries[-(n_brute - n_brute // 2):]])
    t = time.process_time()
    bq, bc, bd = brute_force_search(codes, sub, radius)
    brute_rate = len(sub) / (time.process_time() - t)
    got = set(zip(*(x.tolist() for x in mih.search(sub, radius))))
    if got != set(zip(bq.tolist(), bc.tolist(), bd.tolist())):
        raise SystemExit(f"MIH and brute force disagree at n={n_eval} r={radius}")
    ratio = mih_rate / brute_rate
    print(f"eval={n_eval:>9,} r={radius}: mih {mih_rate:>12,.0f} lookups/s (m={choose_substrings(n_eval, radius)} "
          f"substrings, tables built in {build_s:.2f}s, {len(q):,} matches for {len(queries):,} queries) | "
          f"numpy brute force {brute_rate:>10,.0f} lookups/s ({len(sub)} queries) | ratio={ratio:.1f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--queries", type=int, default=20_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    ratios = {}
    for n in sizes:
        for r in (4, 8):
            ratios[(n, r)] = run(n, r, args.queries, 2_000 if n <= 100_000 else 200, rng)
    n = sizes[-1]
    print(f"eval-index lookup at {n:,} eval hashes, r=4: MIH vs numpy brute force ratio={ratios[(n, 4)]:.1f}")


if __name__ == "__main__":
    main()
