"""Shard writing throughput: our atomic shard writer (encode, checksum, atomic commit, stats, marker)
against plain ``pyarrow.parquet.write_table`` to a local file (no atomicity, no stats), same rows.

    .venv/bin/python bench/shards.py [--rows 20000] [--shards 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000, help="rows per shard")
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from infra.schema import SHARD_SCHEMA, conform
    from infra.storage import ObjectStore
    from tasks.shards import write_shard

    tables = [make_rows(args.rows, s) for s in range(args.shards)]
    total_mb = sum(t.nbytes for t in tables) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        store = ObjectStore(f"{tmp}/ours")
        t0 = time.perf_counter()
        for i, t in enumerate(tables):
            write_shard(store, i, t, row_group_rows=1_000, compression="zstd")
        ours = time.perf_counter() - t0
        Path(f"{tmp}/base").mkdir()
        t0 = time.perf_counter()
        for i, t in enumerate(tables):
            pq.write_table(conform(t, SHARD_SCHEMA), f"{tmp}/base/part-{i:05d}.parquet", row_group_size=1_000,
                           compression="zstd")
        base = time.perf_counter() - t0
    print(f"witflow write_shard (atomic + sha256 + stats + marker): {total_mb / ours:8.1f} MB/s")
    print(f"pyarrow write_table (plain file)                      : {total_mb / base:8.1f} MB/s")
    print(f"shard writing {args.shards}x{args.rows} rows ({total_mb:.0f} MB): ours {total_mb / ours:.1f} MB/s "
          f"vs plain write_table {total_mb / base:.1f} MB/s ratio={base / ours:.2f}")


if __name__ == "__main__":
    main()
