"""Per-shard fan-out: Ray inside one Prefect stage task (ours) vs prefect-ray's RayTaskRunner.

Both run the same per-shard work (Parquet-encode and hash a table of captions + image bytes) under a
real Prefect API (ephemeral) on the same local Ray. Prints shards/s for each; the headline ratio is
ours ÷ RayTaskRunner.

    .venv/bin/python bench/orchestration.py [--shards 64] [--rows 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WITFLOW_PROGRESS", "0")


def shard_job(seed: int, rows: int) -> str:  # the fan-out's job protocol: fn(item, context)
    return shard_work(seed, rows)


def shard_work(seed: int, rows: int) -> str:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    table = pa.table({"caption": [f"caption {i} {rng.integers(1e9)}" for i in range(rows)],
                      "image": [rng.bytes(256) for _ in range(rows)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args()

    from prefect import flow, task
    from prefect_ray import RayTaskRunner

    from infra.fanout import init_ray, map_shards

    init_ray(num_cpus=2)
    import ray

    address = ray.get_runtime_context().gcs_address

    @task(name="fan-out-on-ray")
    def stage(n: int, rows: int) -> list[str]:
        res = map_shards(shard_job, list(range(n)), context=rows, desc="shards")
        return [r.value for r in res]

    @flow(name="bench-ray-inside-task")
    def ours(n: int, rows: int) -> list[str]:
        return stage(n, rows)

    @task(name="shard")
    def shard_task(i: int, rows: int) -> str:
        return shard_work(i, rows)

    @flow(name="bench-ray-task-runner", task_runner=RayTaskRunner(address=address))
    def theirs(n: int, rows: int) -> list[str]:
        futures = [shard_task.submit(i, rows) for i in range(n)]
        return [f.result() for f in futures]

    ours(2, 10)  # warm both paths (Prefect API, Ray workers) before timing
    theirs(2, 10)
    t0 = time.perf_counter()
    a = ours(args.shards, args.rows)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = theirs(args.shards, args.rows)
    t_theirs = time.perf_counter() - t0
    assert a == b, "both paths must compute the same shards"
    print(f"ray inside a stage task : {args.shards / t_ours:8.2f} shards/s ({t_ours:.2f} s)")
    print(f"prefect-ray RayTaskRunner: {args.shards / t_theirs:8.2f} shards/s ({t_theirs:.2f} s)")
    print(f"orchestration fan-out {args.shards} shards x {args.rows} rows: ours {args.shards / t_ours:.2f} shards/s "
          f"vs RayTaskRunner {args.shards / t_theirs:.2f} shards/s ratio={t_theirs / t_ours:.2f}")


if __name__ == "__main__":
    main()
