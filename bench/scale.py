"""Scale: the build's global stages on Ray at 1M, 3M and 10M synthetic candidates, one memory budget.

The global stages are the ones whose cost could grow faster than the data: the URL dedup (2% of
rows share an earlier row's URL), the per-query counts and exact-mode cap thresholds (balancing),
the within-dataset dedup (exact keys, hash bands, verification, connected components, drops by
part group), the hold-out and the output plan. The
per-shard stages (text, fetch, images) are linear by construction and have their own benches.

Synthetic candidates, as clean parts of ``--rows-per-part`` rows (no image bytes, no thumbnails:
without thumbnails the dedup skips pixel verification): captions drawn from the query list
(``runs/demo/queries/queries.parquet``) with Zipf-distributed query popularity and their
``query_ids``; pHashes with a realistic duplicate rate and skew: 4% exact copies (same decoded
pixels) and 8% near copies (1–3 bits flipped) of a Zipf-chosen earlier image, 3% from 1,000 "hot"
images whose hashes share their high bits (a logo on many pages), 1% low-information, 0.5% without
a hash. The skew is reported as Σg² over the band groups ÷ what uniform hashes give.

Every size runs the same code with the same ``dedup.task_memory_mb`` budget; the 1M size runs
again at the end (the machine is shared: load changes over a long run) and the ratio uses the
mean of the two 1M rates. Prints rows/s/core (rows ÷ wall time ÷ Ray CPUs) and rows per CPU-second
of the driver and the Ray workers (on a shared machine the wall clock follows the neighbours'
load, CPU time does not; Ray's daemons are counted apart: their polling grows with wall time), the driver's peak RSS, the largest peak RSS of any one
worker process and the peak sum over all of them; the last line is ``ratio=`` the 10M rate ÷ the
1M rate in rows per CPU-second (linear cost = 1.0).

    .venv/bin/python bench/scale.py [--quick] [--sizes 1e6,3e6,1e7] [--task-memory-mb 256]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
os.environ.setdefault("WITFLOW_PROGRESS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from infra.config import BalanceConfig, DedupConfig, ShardConfig, StorageConfig  # noqa: E402
from infra.funnel import Funnel  # noqa: E402
from tasks.build import stages  # noqa: E402
from tasks.build.records import CleanRecord, CleanStage, FilterRecord, FilterStage, QueryMatchCounts  # noqa: E402
from tasks.build.workdir import WorkDir  # noqa: E402
from tasks.dedup.bands import band_values, bands  # noqa: E402
from tasks.dedup.components import mix64  # noqa: E402

QUERIES = REPO_ROOT / "runs" / "demo" / "queries" / "queries.parquet"
EXACT, NEAR, HOT, LOW_INFO, NO_HASH = 0.04, 0.08, 0.03, 0.01, 0.005
HOT_IMAGES = 1_000
SHARED_URL = 0.02  # rows whose URL an earlier row has too (the URL dedup before fetching drops them)
SEED = np.uint64(0x5EED)


def _hex(words: np.ndarray, prefix: bytes = b"") -> pa.Array:
    """Hex strings of (n, k) uint64 words (``prefix`` first), built straight as an Arrow array."""
    n = len(words)
    raw = np.ascontiguousarray(words.astype(">u8")).view(np.uint8).reshape(n, -1)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    width = len(prefix) + 2 * raw.shape[1]
    out = np.empty((n, width), np.uint8)
    out[:, :len(prefix)] = np.frombuffer(prefix, np.uint8)
    out[:, len(prefix)::2], out[:, len(prefix) + 1::2] = digits[raw >> 4], digits[raw & 15]
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))


def _digest(keys: np.ndarray, salt: int) -> np.ndarray:
    k = keys.astype(np.uint64) * np.uint64(4) + np.uint64(salt)
    return np.stack([mix64(k ^ np.uint64(c * 0x9E3779B97F4A7C15 % 2**64)) for c in range(1, 5)], axis=1)


def base_code(index: np.ndarray) -> np.ndarray:
    """The hash of image ``index`` (a bijection of the index: distinct images, uniform bits)."""
    return mix64(index.astype(np.uint64) ^ SEED)


def make_part(start: int, rows: int, total: int, queries: pa.Table, rng: np.random.Generator) -> pa.Table:
    """Rows ``[start, start + rows)`` of a ``total``-row synthetic candidate pool."""
    index = np.arange(start, start + rows, dtype=np.int64)
    kind = rng.random(rows)
    # Copies pick their original by Zipf popularity (a few images are copied very often).
    original = (rng.zipf(1.3, rows) * 7919 + start) % total
    code = base_code(index)
    pixels = _digest(index, 0)
    exact = kind < EXACT
    near = (kind >= EXACT) & (kind < EXACT + NEAR)
    hot = (kind >= EXACT + NEAR) & (kind < EXACT + NEAR + HOT)
    code[exact] = base_code(original[exact])
    pixels[exact] = _digest(original[exact], 0)
    flips = np.zeros(rows, np.uint64)
    for _ in range(3):
        bit = rng.integers(0, 64, rows).astype(np.uint64)
        flips ^= np.where(rng.random(rows) < 0.6, np.uint64(1) << bit, np.uint64(0))
    code[near] = base_code(original[near]) ^ (flips[near] | np.uint64(1))
    hot_image = (rng.zipf(1.5, rows) - 1) % HOT_IMAGES
    low_bits = rng.integers(0, 2**40, rows, dtype=np.int64).astype(np.uint64)
    code[hot] = (base_code(hot_image[hot]) & np.uint64(0xFFFFFF << 40)) | low_bits[hot]
    # Captions: 1-3 queries each, Zipf-popular, as a sentence.
    n_queries = queries.num_rows
    per_row = rng.integers(1, 4, rows)
    flat = ((rng.zipf(1.2, int(per_row.sum())) - 1) % n_queries).astype(np.int32)
    offsets = np.r_[0, np.cumsum(per_row)].astype(np.int32)
    query_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.sort(flat), pa.int32()))
    texts = queries.column("query").take(pa.array(flat)).to_pylist()
    captions = [" and ".join(texts[offsets[i]:offsets[i + 1]]) for i in range(rows)]
    phash = pa.array(code, pa.uint64(), mask=rng.random(rows) < NO_HASH)
    url_of = np.where(rng.random(rows) < SHARED_URL, original, index)
    urls = [f"https://img.example/{u:x}.jpg" for u in url_of.tolist()]
    return pa.table({
        "sample_id": _hex(mix64(index.astype(np.uint64))[:, None], b"s"),  # id order unrelated to row order
        "caption": pa.array(captions, pa.string()),
        "url": pa.array(urls, pa.string()),
        "image": pa.nulls(rows, pa.binary()),
        "query_ids": query_ids,
        "phash": phash,
        "low_info": pa.array(rng.random(rows) < LOW_INFO),
        "pixels_sha256": _hex(pixels),
        "sha256": _hex(_digest(index, 1)),
    })


def write_pool(work: WorkDir, total: int, rows_per_part: int, queries: pa.Table) -> tuple[FilterStage, CleanStage]:
    """The pool as filtered and clean parts (the same file twice, hard-linked) with their records."""
    from tasks.balance import sparse_query_counts

    filter_records, clean_records = [], []
    root = Path(work.root)
    for start in range(0, total, rows_per_part):
        shard = f"part-{start // rows_per_part:05d}"
        table = make_part(start, min(rows_per_part, total - start), total, queries,
                          np.random.default_rng(start))
        work.store.write_parquet(WorkDir.filtered(shard), table)
        (root / "clean").mkdir(exist_ok=True)
        os.link(root / WorkDir.filtered(shard), root / WorkDir.clean(shard))
        ids, counts = sparse_query_counts(table.column("query_ids"))
        matches = QueryMatchCounts(ids, counts)
        filter_records.append(FilterRecord(shard, table.num_rows, Funnel(), matches))
        clean_records.append(CleanRecord(shard, table.num_rows, int(table.nbytes), Funnel(), matches))
    return FilterStage(work, tuple(filter_records)), CleanStage(work, tuple(clean_records))


def band_skew(table: pa.Table, radius: int) -> float:
    """Σg² over (band, value) groups of these hashes ÷ its expectation for uniform hashes."""
    codes = table.column("phash").drop_null().to_numpy().astype(np.uint64)
    n, observed, expected = len(codes), 0.0, 0.0
    for shift, bits in bands(radius):
        _, counts = np.unique(band_values(codes, shift, bits)[0], return_counts=True)
        observed += float((counts.astype(np.float64) ** 2).sum())
        expected += n + n * (n - 1) / 2.0 ** bits
    return observed / expected


class ProcessTree:
    """Samples this process and all its descendants (Ray's raylet, GCS and workers): peak RSS of
    the driver, of the biggest worker and of all together, and the CPU seconds they all spent."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.driver = self.worker = self.total = 0
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._workers: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessTree":
        self._start = dict(self._sample())
        self._last = dict(self._start)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the driver and the Ray workers (the work itself)."""
        return sum(cpu - self._start.get(pid, 0.0) for pid, cpu in self._last.items() if pid in self._workers)

    @property
    def daemon_cpu_s(self) -> float:
        """CPU seconds of Ray's daemons (raylet, GCS, agents): scheduling, and polling that grows with wall time."""
        return sum(cpu - self._start.get(pid, 0.0) for pid, cpu in self._last.items() if pid not in self._workers)

    def _sample(self) -> list[tuple[int, float]]:
        me = psutil.Process()
        out, workers, total = [], [], 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    times, rss = proc.cpu_times(), proc.memory_info().rss
                    name = proc.name()
                    out.append((proc.pid, times.user + times.system))
                    total += rss
                    if proc.pid == me.pid:
                        self.driver = max(self.driver, rss)
                        self._workers.add(proc.pid)
                    elif name.startswith("ray::") or "default_worker" in " ".join(proc.cmdline()[:3]):
                        workers.append(rss)
                        self._workers.add(proc.pid)
            except psutil.Error:
                pass
        self.worker = max([self.worker, *workers])
        self.total = max(self.total, total)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._last.update(self._sample())


class JobPeaks(logging.Handler):
    """Collects the fan-out's per-stage "job peak RSS" events (``infra.fanout.map_shards``), in MB:
    the largest peak RSS of a worker process during one job of each stage, and the most one job
    added to its worker's RSS at the job's start (the job's own memory, without what the
    long-lived worker already held)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.peaks: dict[str, int] = {}
        self.added: dict[str, int] = {}
        self.dedup: dict[str, object] = {}  # the within-dataset dedup's summary event

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        if record.getMessage() == "job peak RSS":
            stage = str(fields["stage"])
            self.peaks[stage] = max(self.peaks.get(stage, 0), int(fields["max_mb"]))
            self.added[stage] = max(self.added.get(stage, 0), int(fields["max_added_mb"]))
        elif record.getMessage() == "within-dataset duplicates":
            self.dedup = dict(fields)

    _LOGGERS = ("infra.fanout", "tasks.dedup.within")

    def __enter__(self) -> "JobPeaks":
        self._levels = {}
        for name in self._LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.INFO)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self._LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(self._levels[name])


def run_size(total: int, rows_per_part: int, dedup: DedupConfig, holdout: int, queries: pa.Table,
             tmp: Path, cpus: int) -> dict:
    work = WorkDir(str(tmp / f"n{total}"), StorageConfig())
    shutil.rmtree(work.root, ignore_errors=True)
    made = time.perf_counter()
    filtered, clean = write_pool(work, total, rows_per_part, queries)
    made = time.perf_counter() - made
    skew = band_skew(pq.read_table(Path(work.root) / WorkDir.clean(clean.records[0].shard_id), columns=["phash"]),
                     dedup.within_radius) if total <= 1_000_000 else float("nan")
    balance = BalanceConfig(mode="exact", max_per_query=20_000)
    with ProcessTree() as rss, JobPeaks() as jobs:
        started = time.perf_counter()
        counts = stages.count_queries(filtered, queries.num_rows, balance, task_memory_mb=dedup.task_memory_mb)
        counted = time.perf_counter()
        within = stages.within_dataset(clean, dedup, holdout)
        deduped = time.perf_counter()
        plan = stages.plan_output(clean, within, ShardConfig(rows_per_shard=10_000, holdout_rows=holdout))
        seconds = time.perf_counter() - started
    shutil.rmtree(work.root, ignore_errors=True)
    return {"rows": total, "seconds": seconds, "rate": total / seconds / cpus, "cpu_rate": total / rss.cpu_s,
            "cpu_s": rss.cpu_s, "daemon_cpu_s": rss.daemon_cpu_s, "made_s": made,
            "count_s": counted - started, "within_s": deduped - counted, "plan_s": seconds - (deduped - started),
            "drops": within.drops, "reasons": dict(within.reasons), "held": sum(p.held for p in within.parts),
            "over_cap": counts.over_cap, "shards": len(plan), "driver_mb": rss.driver / 2**20,
            "worker_mb": rss.worker / 2**20, "job_mb": jobs.peaks, "job_added_mb": jobs.added, "dedup": jobs.dedup, "total_mb": rss.total / 2**20, "skew": skew}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k and 300k rows (a smoke run)")
    parser.add_argument("--sizes", default=None, help="comma-separated row counts (default 1e6,3e6,1e7)")
    parser.add_argument("--rows-per-part", type=int, default=50_000)
    parser.add_argument("--task-memory-mb", type=int, default=256, help="dedup.task_memory_mb (fixed for all sizes)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray CPUs (local)")
    parser.add_argument("--holdout", type=int, default=10_000)
    parser.add_argument("--no-rates", action="store_true", help="do not update bench/rates.json")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in (args.sizes or ("1e5,3e5" if args.quick else "1e6,3e6,1e7")).split(",")]
    rows_per_part = min(args.rows_per_part, 10_000) if args.quick else args.rows_per_part
    if not QUERIES.exists():
        sys.exit(f"no query list at {QUERIES}: run `witflow queries -c configs/demo.yaml` first")
    queries = pq.read_table(QUERIES, columns=["query_id", "query"]).sort_by("query_id")
    dedup = DedupConfig(within_radius=4, task_memory_mb=args.task_memory_mb)

    from infra.fanout import init_ray

    init_ray(num_cpus=args.cpus, object_store_memory_mb=256)
    print(f"cpus {args.cpus} (machine {os.cpu_count()}, load {os.getloadavg()[0]:.1f}); rows/part {rows_per_part}; "
          f"task_memory_mb {args.task_memory_mb}; max_candidates {dedup.max_candidates}; radius {dedup.within_radius}; "
          f"hold-out {args.holdout}; queries {queries.num_rows}", flush=True)
    print(f"{'rows':>11} {'rows/s/core':>12} {'rows/CPU-s':>11} {'seconds':>8} {'count':>7} {'dedup':>7} "
          f"{'driver MB':>10} {'worker MB':>10} {'all MB':>8} {'drops':>9} {'load':>5}", flush=True)
    order = sizes + [sizes[0]] if len(sizes) > 1 else sizes
    results = []
    with tempfile.TemporaryDirectory(prefix="witflow-scale-", dir=REPO_ROOT / ".bench" if (REPO_ROOT / ".bench").is_dir()
                                     else None) as tmp:
        # Warm-up (not reported): Ray's worker processes start and import once, outside the timings.
        run_size(min(20_000, sizes[0]), min(rows_per_part, 5_000), dedup, 100, queries, Path(tmp), args.cpus)
        for total in order:
            r = run_size(total, rows_per_part, dedup, args.holdout, queries, Path(tmp), args.cpus)
            results.append(r)
            skew = f"; band skew Σg² = {r['skew']:.1f}x uniform" if r["skew"] == r["skew"] else ""
            print(f"{total:>11,} {r['rate']:>12,.0f} {r['cpu_rate']:>11,.0f} {r['seconds']:>8.1f} {r['count_s']:>7.1f} "
                  f"{r['within_s']:>7.1f} "
                  f"{r['driver_mb']:>10.0f} {r['worker_mb']:>10.0f} {r['total_mb']:>8.0f} {r['drops']:>9,} "
                  f"{os.getloadavg()[0]:>5.1f}   ({r['reasons']}, held {r['held']}, {r['shards']} shards, "
                  f"pool written in {r['made_s']:.0f}s; CPU {r['cpu_s']:.0f}s + Ray daemons {r['daemon_cpu_s']:.0f}s{skew})",
                  flush=True)
    # Where the worker memory goes, per stage at every size (the 1M rerun last): the largest peak
    # RSS of a worker during one job, and the most one job added to its worker's RSS at its start.
    # A stage whose added memory grows with the rows holds something per row; a bounded one stays
    # put, and a peak that grows while the added memory does not is the long-lived worker's own
    # footprint (heap fragmentation, caches), which the rerun at the first size shows too.
    stages_seen = sorted({s for r in results for s in r["job_mb"]},
                         key=lambda s: -max(r["job_mb"].get(s, 0) for r in results))
    print("worker memory per stage (MB): largest one-job peak RSS / most one job added, by size:")
    print(f"  {'stage':<44}" + "".join(f"{r['rows']:>13,}" for r in results))
    for stage in stages_seen[:12]:
        print(f"  {stage[:44]:<44}" + "".join(f"{r['job_mb'].get(stage, 0):>7} / {r['job_added_mb'].get(stage, 0):>3}"
                                             for r in results))
    # The band stage's largest reduced group: a hot (band, value) group is reduced in code-order
    # ranges of ~hot_group_rows rows, so this stays put however big the hottest group grows.
    print("band stage, by size: largest group in one reduce / hot groups' rows in ranges / ranges / rows of hot "
          "groups split in the map (copies) / candidate pairs (hot_group_rows "
          + str(results[0]["dedup"].get("hot_group_rows")) + "):")
    for r in results:
        d = r["dedup"]
        print(f"  {r['rows']:>11,}  {d.get('largest_group', 0):>9,} / {d.get('hot_range_rows', 0):>9,} / "
              f"{d.get('hot_ranges', 0):>5,} / {d.get('hot_split_copies', 0):>9,} / {d.get('pairs', 0):>12,}")
    # The ratio is of CPU work per row (rows per CPU-second of the driver and every Ray process):
    # on a shared machine wall-clock rates follow the neighbours' load; both are printed.
    first = [r for r in results if r["rows"] == sizes[0]]
    last = results[len(sizes) - 1]
    small, large = float(np.mean([r["cpu_rate"] for r in first])), last["cpu_rate"]
    wall_ratio = last["rate"] / float(np.mean([r["rate"] for r in first]))
    if not args.no_rates and not args.quick:
        from rates import record

        record("global_stages", large, "candidates/s/core",
               f"bench/scale.py: counts, caps, within-dataset dedup, hold-out, plan at {sizes[-1]:,} rows on "
               f"{args.cpus} Ray CPUs, task_memory_mb {args.task_memory_mb}")
    print(f"global stages: {sizes[-1]:,} rows {large:,.0f} rows/CPU-s vs {sizes[0]:,} rows {small:,.0f} rows/CPU-s "
          f"(mean of {len(first)} runs; wall-clock ratio {wall_ratio:.2f}); peak worker RSS "
          f"{max(r['worker_mb'] for r in results):.0f} MB (at {sizes[0]:,}: {results[0]['worker_mb']:.0f} MB) "
          f"ratio={large / small:.2f}")


if __name__ == "__main__":
    main()
