"""Shard writing throughput: our shard writer (encode, sha256, atomic commit, fsync, stats, marker)
against a plain ``pyarrow.parquet.write_table`` to a local file (no atomicity, no checksum, and no
fsync: its bytes may still be in the page cache when it returns), the same rows, ``zstd`` and
1,000-row groups. Every side writes the same ``--shards`` shards in sequence, as a build's writer does.

Ours is ``tasks.shards.ShardWriter``: the encoder writes a shard's Parquet bytes straight into its
temp file (Arrow's file I/O, as the baseline's), and the shard's commit (sha256 of the bytes read
back from the page cache, fsync, rename, stats, marker) runs on a background thread, overlapping
the encoding of the next; the timed sequence ends when the last shard is durable. ``write_shard``
one shard at a time (each commit waited for) is measured too: what the overlap saves. On a machine
whose cores are all busy the overlap buys little: the CPU figures (every thread counted) are what
a fully loaded cluster feels, and ours ÷ plain in CPU is printed beside the wall ratio.

The headline baseline is ``write_table(compression="zstd")`` as one would call it: every column
zstd, dictionaries and statistics everywhere. Ours differs in its Parquet options, on purpose
(``tasks.shards.parquet_options``: the image column, compressed images already, stored without
zstd or a dictionary; statistics only where a reader filters), so a second baseline,
``write_table`` with exactly our options, is measured too: ours ÷ that one is what atomicity, the
checksum, the fsync, the stats and the marker cost over the encoder alone.

The sides take turns, one whole sequence each (forward, then reversed order, so machine load
hits them alike) for ``--rounds`` rounds; each side's best round counts. A baseline's file is
deleted (untimed, its clock stopped) as soon as it is written and sized: left in the page cache,
its delayed writeback would be flushed by one of our fsyncs (ext4 has one journal per file
system) and charged to ours, and files piling up in the cache slow every later write alike; ours
are deleted (untimed) after their sequence. Wall-clock MB/s (of the tables' in-memory size) and
CPU MB/s (every thread) are printed, with the file sizes and peak RSS, and the median over rounds
of ours ÷ plain within a round (less at the mercy of one lucky round on a shared machine); the
last line is ``ratio=`` ours ÷ plain (wall), best against best.

    .venv/bin/python bench/shards.py [--quick] [--rows 5000] [--shards 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-rates", action="store_true", help="do not update bench/rates.json")
    args = ap.parse_args()
    rows, shards, rounds = (2_000, 4, 1) if args.quick else (args.rows, args.shards, args.rounds)

    import pyarrow.parquet as pq

    from infra.schema import SHARD_SCHEMA, conform
    from infra.storage import ObjectStore
    from tasks.shards import ShardWriter, parquet_options, write_shard

    baselines = {"plain": {"compression": "zstd"}, "same-options": parquet_options("zstd")}
    sides = ["ours", "one-at-a-time", *baselines]
    tables = [make_rows(rows, s) for s in range(shards)]
    total_mb = sum(t.nbytes for t in tables) / 1e6
    best = {side: (0.0, 0.0) for side in sides}
    round_ratios: list[tuple[float, float]] = []  # ours ÷ plain within each round, wall and CPU
    sizes: dict[str, int] = {}

    def ours(store: ObjectStore) -> int:
        with ShardWriter(store, row_group_rows=1_000, compression="zstd") as writer:
            for i, t in enumerate(tables):
                writer.write(i, t)
        return sum(s["bytes"] for s in writer.stats)

    def one_at_a_time(store: ObjectStore) -> int:
        return sum(write_shard(store, i, t, row_group_rows=1_000, compression="zstd")["bytes"]
                   for i, t in enumerate(tables))

    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        for r in range(rounds):
            spent = {side: [0.0, 0.0] for side in sides}
            for side in (sides if r % 2 == 0 else sides[::-1]):
                if side in baselines:
                    size = 0
                    for i, t in enumerate(tables):
                        path = f"{tmp}/{side}-{r}-{i:05d}.parquet"
                        wall, cpu = time.perf_counter(), _cpu()
                        pq.write_table(conform(t, SHARD_SCHEMA), path, row_group_size=1_000, **baselines[side])
                        spent[side][0] += time.perf_counter() - wall
                        spent[side][1] += _cpu() - cpu
                        size += os.path.getsize(path)
                        os.remove(path)
                else:
                    store = ObjectStore(f"{tmp}/{side}-{r}")
                    wall, cpu = time.perf_counter(), _cpu()
                    size = (ours if side == "ours" else one_at_a_time)(store)
                    spent[side] = [time.perf_counter() - wall, _cpu() - cpu]
                    for key in store.list(""):
                        store.delete(key)
                sizes[side] = size
            for side, (wall, cpu) in spent.items():
                best[side] = (max(best[side][0], total_mb / wall), max(best[side][1], total_mb / cpu))
            round_ratios.append((spent["plain"][0] / spent["ours"][0], spent["plain"][1] / spent["ours"][1]))
            print(f"round {r + 1}: " + ", ".join(f"{side} {total_mb / spent[side][0]:.1f} MB/s" for side in sides)
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    mine, serial, plain, same = best["ours"], best["one-at-a-time"], best["plain"], best["same-options"]
    print(f"witflow ShardWriter (atomic + sha256 + fsync + stats + marker): {mine[0]:8.1f} MB/s  {mine[1]:8.1f} MB/CPU-s  "
          f"files {sizes['ours'] / 1e6:.1f} MB")
    print(f"witflow write_shard, one at a time (each commit waited for)  : {serial[0]:8.1f} MB/s  {serial[1]:8.1f} MB/CPU-s  "
          f"files {sizes['one-at-a-time'] / 1e6:.1f} MB  (ours / this: {mine[0] / serial[0]:.2f})")
    print(f"pyarrow write_table (plain file, zstd, no fsync)              : {plain[0]:8.1f} MB/s  {plain[1]:8.1f} MB/CPU-s  "
          f"files {sizes['plain'] / 1e6:.1f} MB")
    print(f"pyarrow write_table (plain file, our Parquet options, no fsync): {same[0]:8.1f} MB/s  {same[1]:8.1f} MB/CPU-s  "
          f"files {sizes['same-options'] / 1e6:.1f} MB  (ours / this: {mine[0] / same[0]:.2f})")
    print(f"ours / plain within a round, median of {rounds}: wall {statistics.median(r[0] for r in round_ratios):.2f}, "
          f"CPU {statistics.median(r[1] for r in round_ratios):.2f} (the best-of ratios below pair rounds of unequal load)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if not args.no_rates and not args.quick:
        from rates import record

        record("shard_write", mine[1], "MB/s/core", "bench/shards.py: ShardWriter, zstd, 1,000-row groups")
    print(f"shard writing {shards}x{rows} rows ({total_mb:.0f} MB) in sequence, best of {rounds} interleaved rounds: "
          f"ours {mine[0]:.1f} MB/s vs plain write_table (no fsync) {plain[0]:.1f} MB/s (CPU ratio "
          f"{mine[1] / plain[1]:.2f}, load {os.getloadavg()[0]:.1f}) ratio={mine[0] / plain[0]:.2f}")


if __name__ == "__main__":
    main()
