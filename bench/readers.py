"""Reader throughput: reading every input shard of a manifest, ours against a naive shard reader.

Ours reads only the Parquet row groups a shard overlaps and seeks JSONL shards to the byte offset
found at planning time. The baseline is the obvious reader: for each shard, read the whole file and
slice out the shard's rows (what a reader without planning metadata has to do). Same files, same
shards, same output rows, measured in the same run.

    .venv/bin/python bench/readers.py [--quick]

The last line is the headline: ``... ratio=<ours / baseline>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.config import SourceConfig  # noqa: E402
from tasks.readers import plan_input_shards, read_input_shard  # noqa: E402


def make_manifests(folder: Path, rows: int) -> None:
    urls = [f"http://img{i % 97}.example.org/photos/{i:08d}.jpg" for i in range(rows)]
    captions = [f"a photo of thing number {i} on a table, seen from above" for i in range(rows)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), folder / "m.parquet", row_group_size=2_000)
    with open(folder / "m.jsonl", "w") as f:
        for u, c in zip(urls, captions):
            f.write(json.dumps({"url": u, "caption": c}) + "\n")


def baseline_read(kind: str, path: Path, start: int, stop: int | None) -> int:
    """Read the whole file, slice the shard's rows, build the same per-row values."""
    if kind == "parquet":
        records = pq.read_table(path).to_pylist()
    else:
        with open(path) as f:
            records = [json.loads(line) for line in f]
    part = records[start:stop]
    return len([(f"{kind}:{path.name}#{start + i}", r.get("caption"), r.get("url")) for i, r in enumerate(part)])


def run(kind: str, folder: Path, per_shard: int) -> tuple[float, float, int]:
    src = SourceConfig(kind=kind, path=f"m.{kind}", rows_per_input_shard=per_shard)
    t0 = time.perf_counter()
    shards = plan_input_shards([src], folder)
    ours_rows = sum(read_input_shard(s).num_rows for s in shards)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_rows = sum(baseline_read(kind, Path(s.file), s.start, s.stop) for s in shards)
    base = time.perf_counter() - t0
    assert ours_rows == base_rows, (ours_rows, base_rows)
    return ours_rows / ours, base_rows / base, len(shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k rows instead of 100k")
    args = parser.parse_args()
    rows = 20_000 if args.quick else 100_000
    per_shard = 2_000
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_manifests(folder, rows)
        results = {kind: run(kind, folder, per_shard) for kind in ("jsonl", "parquet")}
    for kind, (ours, base, n) in results.items():
        print(f"{kind}: {rows} rows in {n} shards: ours {ours:,.0f} rows/s, whole-file-per-shard baseline "
              f"{base:,.0f} rows/s, ratio={ours / base:.2f}")
    ours, base, n = results["parquet"]
    print(f"readers (parquet manifest, {rows} rows, {n} shards of {per_shard}): ours {ours:,.0f} rows/s vs "
          f"baseline {base:,.0f} rows/s ratio={ours / base:.2f}")


if __name__ == "__main__":
    main()
