"""The training loader with MetaCLIP's online balancing vs without it, same run, interleaved.

Both stream the same shards (the bundled Openclipart sample, captions matched to a skewed set of
query ids: one head query on most rows, a rare one on the others) through ``trainer.data``'s
ShardStream: read, shuffle, decode, augment, tokenise. Online balancing adds, per 512-row read
batch, the per-epoch hashed coins of every (row, query) pair, and the rows it drops are read but
never decoded. The figure is samples a second that reach training; peak RSS is printed; the last
line is ``... ratio=<balanced / plain>``.

    .venv/bin/python bench/loader.py [--rows 1500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import pyarrow as pa  # noqa: E402

from tests.trainer_fixtures import sample_pairs, write_dataset  # noqa: E402
from trainer.data import ShardStream, load_manifest, online_balance  # noqa: E402
from trainer.tokenizer import CONTEXT_LENGTH  # noqa: E402

T = 100


def _dataset(rows: int, work: Path):
    pairs = sample_pairs(REPO_ROOT / "infra" / "data" / "openclipart_sample.parquet", rows)
    # 80% of rows match only the head query 0 (count ~0.8 rows, far above t); the rest a rare one.
    query_ids = [[0] if i % 5 else [1 + i] for i in range(pairs.num_rows)]
    pairs = pairs.append_column("query_ids", pa.array(query_ids, pa.list_(pa.int32())))
    return load_manifest(str(write_dataset(work, pairs, rows_per_shard=250)))


def _rows_per_s(source, balance, batches: int) -> float:
    stream = ShardStream(source, rank=0, world_size=1, micro_batch=64, image_size=64,
                         context_length=CONTEXT_LENGTH, shuffle_buffer=256,
                         balance=balance)
    started = time.perf_counter()
    rows = sum(len(b["rows"]) for b in itertools.islice(iter(stream), batches))
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="witflow-bench-loader-"))
    try:
        source = _dataset(args.rows, work)
        balance = online_balance(source, T, seed=0)
        print(f"{source.num_rows} rows; online balancing t={T} keeps {balance.expected_rows:.0f} a epoch on average")
        ours, plain = [], []
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits both
            plain.append(_rows_per_s(source, None, args.batches))
            ours.append(_rows_per_s(source, balance, args.batches))
        best_ours, best_plain = max(ours), max(plain)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"plain loader:    {best_plain:.0f} rows/s (rounds: {', '.join(f'{x:.0f}' for x in plain)})")
        print(f"online balanced: {best_ours:.0f} rows/s (rounds: {', '.join(f'{x:.0f}' for x in ours)})")
        print(f"peak RSS {peak_mb:.0f} MB")
        print(f"loader with online balancing: {best_ours:.0f} rows/s vs without: {best_plain:.0f} rows/s "
              f"ratio={best_ours / best_plain:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
