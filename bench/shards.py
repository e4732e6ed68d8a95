"""Shard writing throughput: our shard writer (encode, sha256, atomic commit, fsync, stats, marker)
against a plain ``pyarrow.parquet.write_table`` to a local file (no atomicity, no checksum, no
fsync), the same rows, ``zstd`` and 1,000-row groups.

The headline baseline is ``write_table(compression="zstd")`` as one would call it: every column
zstd, dictionaries and statistics everywhere. Ours differs in its Parquet options, on purpose
(``tasks.shards.parquet_options``: the image column, compressed images already, stored without
zstd or a dictionary; statistics only where a reader filters), so a second baseline,
``write_table`` with exactly our options, is measured too: ours ÷ that one is what atomicity, the
checksum, the fsync, the stats and the marker cost over the encoder alone.

All sides alternate shard by shard (forward, then reversed order, so machine load hits them alike)
for ``--rounds`` rounds; each side's best round counts. Every side's files are deleted (untimed)
as soon as they are written and sized: a baseline's file left in the page cache would have its
delayed writeback flushed by the next shard's fsync (ext4 has one journal per file system) and
charged to ours, and files piling up in the cache slow every later write alike. Wall-clock MB/s (of
the tables' in-memory size) and CPU MB/s are printed, with the file sizes and peak RSS; the last
line is ``ratio=`` ours ÷ plain (wall).

    .venv/bin/python bench/shards.py [--quick] [--rows 5000] [--shards 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_rows(n: int, seed: int):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, size=int(rng.integers(2_000, 6_000)), dtype=np.uint8).tobytes() for _ in range(n)]
    return pa.table({
        "sample_id": [f"bench:{seed}:{i}" for i in range(n)],
        "source": ["bench"] * n,
        "caption": [f"a clip art of item {i}" for i in range(n)],
        "image": images,
        "image_bytes": [len(b) for b in images],
        "width": pa.array([128] * n, pa.int32()),
        "height": pa.array([96] * n, pa.int32()),
        "query_ids": [[i % 1000, (i * 7) % 1000] for i in range(n)],
    })


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 shards of 2,000 rows, one round")
    ap.add_argument("--rows", type=int, default=5_000, help="rows per shard")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-rates", action="store_true", help="do not update bench/rates.json")
    args = ap.parse_args()
    rows, shards, rounds = (2_000, 4, 1) if args.quick else (args.rows, args.shards, args.rounds)

    import pyarrow.parquet as pq

    from infra.schema import SHARD_SCHEMA, conform
    from infra.storage import ObjectStore
    from tasks.shards import parquet_options, write_shard

    baselines = {"plain": {"compression": "zstd"}, "same-options": parquet_options("zstd")}
    sides = ["ours", *baselines]
    tables = [make_rows(rows, s) for s in range(shards)]
    total_mb = sum(t.nbytes for t in tables) / 1e6
    best = {side: (0.0, 0.0) for side in sides}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        for r in range(rounds):
            spent = {side: [0.0, 0.0] for side in sides}
            sizes = {side: 0 for side in sides}
            store = ObjectStore(f"{tmp}/ours-{r}")
            for i, t in enumerate(tables):
                for side in (sides if i % 2 == 0 else sides[::-1]):
                    path = f"{tmp}/{side}-{r}-{i:05d}.parquet"
                    wall, cpu = time.perf_counter(), _cpu()
                    if side == "ours":
                        sizes[side] += write_shard(store, i, t, row_group_rows=1_000, compression="zstd")["bytes"]
                    else:
                        pq.write_table(conform(t, SHARD_SCHEMA), path, row_group_size=1_000, **baselines[side])
                    spent[side][0] += time.perf_counter() - wall
                    spent[side][1] += _cpu() - cpu
                    if side == "ours":
                        for key in store.list(""):
                            store.delete(key)
                    else:
                        sizes[side] += os.path.getsize(path)
                        os.remove(path)
            for side, (wall, cpu) in spent.items():
                best[side] = (max(best[side][0], total_mb / wall), max(best[side][1], total_mb / cpu))
            print(f"round {r + 1}: " + ", ".join(f"{side} {total_mb / spent[side][0]:.1f} MB/s" for side in sides)
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    ours, plain, same = best["ours"], best["plain"], best["same-options"]
    print(f"witflow write_shard (atomic + sha256 + fsync + stats + marker): {ours[0]:8.1f} MB/s  {ours[1]:8.1f} MB/CPU-s  "
          f"files {sizes['ours'] / 1e6:.1f} MB")
    print(f"pyarrow write_table (plain file, zstd)                       : {plain[0]:8.1f} MB/s  {plain[1]:8.1f} MB/CPU-s  "
          f"files {sizes['plain'] / 1e6:.1f} MB")
    print(f"pyarrow write_table (plain file, our Parquet options)        : {same[0]:8.1f} MB/s  {same[1]:8.1f} MB/CPU-s  "
          f"files {sizes['same-options'] / 1e6:.1f} MB  (ours / this: {ours[0] / same[0]:.2f})")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if not args.no_rates and not args.quick:
        from rates import record

        record("shard_write", ours[1], "MB/s/core", "bench/shards.py: write_shard, zstd, 1,000-row groups")
    print(f"shard writing {shards}x{rows} rows ({total_mb:.0f} MB), best of {rounds} interleaved rounds: "
          f"ours {ours[0]:.1f} MB/s vs plain write_table {plain[0]:.1f} MB/s ratio={ours[0] / plain[0]:.2f}")


if __name__ == "__main__":
    main()
