"""Dedup lookups/s: the eval index's descriptor search and the within-dataset hash search, each
against a vectorised numpy brute force, same run.

- **Descriptor search** (decontamination, ``tasks.dedup.ann``): the eval index's inner-product
  top-k (faiss; an inverted file above 50k entries) over unit descriptors of the copy detector's
  dimension, 100k and 1M entries drawn around 20k centres (real descriptors cluster); queries are
  half noisy copies of entries, half fresh draws. The brute force is ``ann.brute_force_top_k``
  (one matrix product + partial sort per block). Both return top-10; beside the rate: the share of
  planted copies whose source entry is in the index's top-10 (what decontamination needs; the
  exact scan's share beside it) and the overlap of the two top-10 lists.
- **Hash search** (within-dataset dedup, ``tasks.dedup.mih``): multi-index hashing over random
  64-bit hashes vs one XOR + popcount per stored hash; both must return the same pairs.

The brute force answers a subsample and its rate is scaled per lookup. Rates are per CPU-second
(``time.process_time``; both sides single-threaded) so that other load on a shared machine does
not skew the comparison. The last line is the descriptor search at 1M entries.

    .venv/bin/python bench/dedup.py           # 100k and 1M
    .venv/bin/python bench/dedup.py --quick   # 100k only
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.dedup.ann import DescriptorIndex, brute_force_top_k  # noqa: E402
from tasks.dedup.copy_detect import DESCRIPTOR_DIM  # noqa: E402
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


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def run_descriptors(n_eval: int, n_queries: int, n_brute: int, rng: np.random.Generator, k: int = 10) -> float:
    centres = rng.normal(size=(20_000, DESCRIPTOR_DIM)).astype(np.float32)
    entries = unit(centres[rng.integers(0, len(centres), n_eval)] + 0.6 * rng.normal(size=(n_eval, DESCRIPTOR_DIM)))
    source = rng.integers(0, n_eval, n_queries // 2)
    planted = entries[source]
    fresh = centres[rng.integers(0, len(centres), n_queries - len(planted))]
    # Planted copies sit at cosine ~0.7–0.99 from their source, as the benchmark's altered copies do.
    noise = rng.uniform(0.02, 0.13, size=(len(planted), 1))
    queries = unit(np.concatenate([planted + noise * rng.normal(size=planted.shape),
                                   fresh + 0.6 * rng.normal(size=fresh.shape)]).astype(np.float32))
    t = time.process_time()
    index = DescriptorIndex(entries)
    build_s = time.process_time() - t
    t = time.process_time()
    _, got = index.search(queries, k)
    rate = len(queries) / (time.process_time() - t)
    sub = np.concatenate([queries[: n_brute // 2], queries[-(n_brute - n_brute // 2):]])
    t = time.process_time()
    _, want = brute_force_top_k(entries, sub, k)
    brute_rate = len(sub) / (time.process_time() - t)
    sub_got = np.concatenate([got[: n_brute // 2], got[-(n_brute - n_brute // 2):]])
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(sub_got, want)]))
    # What decontamination needs: the entry a planted query was copied from, among the top-k.
    found = float(np.mean((got[: len(source)] == source[:, None]).any(axis=1)))
    found_exact = float(np.mean((want[: n_brute // 2] == source[: n_brute // 2, None]).any(axis=1)))
    ratio = rate / brute_rate
    kind = "exact flat" if index.exact else f"IVF {index.index.nlist} cells, nprobe {index.nprobe}"
    sims = (queries[: len(source)] * entries[source]).sum(axis=1)
    print(f"eval={n_eval:>9,} descriptors (dim {DESCRIPTOR_DIM}, top-{k}): faiss {rate:>10,.0f} lookups/s ({kind}, "
          f"built in {build_s:.1f}s, planted copies (cosine {np.quantile(sims, 0.05):.2f}–{np.quantile(sims, 0.95):.2f}) "
          f"found {found:.3f} (exact scan: {found_exact:.3f}), top-{k} "
          f"overlap with the exact top-{k} {recall:.3f}) | "
          f"numpy brute force {brute_rate:>8,.0f} lookups/s ({len(sub)} queries) | ratio={ratio:.1f}")
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
    print(f"within-dataset hash lookup at {n:,} hashes, r=4: MIH vs numpy brute force ratio={ratios[(n, 4)]:.1f}")
    desc = {m: run_descriptors(m, args.queries, 2_000 if m <= 100_000 else 200, rng) for m in sizes}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB")
    print(f"eval-index lookup at {n:,} eval descriptors: faiss top-10 vs numpy brute force ratio={desc[n]:.1f}")


if __name__ == "__main__":
    main()
