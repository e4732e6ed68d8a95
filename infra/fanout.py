"""The one fan-out: start or join Ray, run a job per shard, and shuffle between stages.

Every parallel step of witflow goes through :func:`map_shards` (img2dataset has one distributor with
one signature; so do we). A job is ``fn(item, context) -> value``: ``item`` is one typed shard
record (an input shard, a part name, an output-shard plan), ``context`` the frozen settings every
job of the stage shares (sent to the cluster once, not once per job). Results come back in input
order as :class:`ShardResult`: a shard that fails (an exception, or a worker that keeps dying)
costs that shard only; the others finish and a rerun retries it.

:func:`shuffle` is a map → partition → reduce built on two ``map_shards`` calls whose pieces go
through object storage, so no process holds more than one map input or one partition, and a rerun
skips every map and reduce whose output is already complete.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from infra.log import get_logger, log_event, progress

log = get_logger(__name__)

T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")

# Environment every Ray worker gets. Ray 2.60 reads RAY_USAGE_STATS_ENABLED (not
# RAY_DISABLE_USAGE_STATS): with it, no usage-stats report ever leaves the machine.
WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "WITFLOW_PROGRESS": "0"}
# The project's packages, shipped to a cluster's workers (runtime_env py_modules): they need its Python
# environment (infra/ray/Dockerfile), not this checkout.
PROJECT_PACKAGES = ("infra", "tasks", "trainer", "flows")
_REPO_ROOT = Path(__file__).resolve().parent.parent


class RayClusterError(RuntimeError):
    """The Ray cluster to join cannot be joined; the message names its address."""


def worker_runtime_env(ship_code: bool) -> dict[str, Any]:
    """Every worker's runtime_env: the environment variables, and with ``ship_code`` the project's
    packages, uploaded once per job and put first on the workers' path."""
    env: dict[str, Any] = {"env_vars": dict(WORKER_ENV)}
    if ship_code:
        env["py_modules"] = [str(_REPO_ROOT / p) for p in PROJECT_PACKAGES]
        env["excludes"] = ["__pycache__", "*.pyc"]
    return env


def _token_auth_if_available() -> None:
    # A cluster started with token auth (infra/ray_cluster.sh; Ray 2.60's default for a new head)
    # refuses a driver that does not send its token, and a driver sends it only in token mode.
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file)):
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:  # imported already: Ray re-reads its settings as its own CLI does
            sys.modules["ray._raylet"].Config.initialize("")

# Even with usage stats off, the usage-stats module of Ray 2.60's dashboard process (started with
# include_dashboard=False too) asks the cloud metadata endpoints which cloud it runs on (HTTP to
# 169.254.169.254 and a DNS lookup of metadata.google.internal) unless it finds
# ~/ray_bootstrap_config.yaml, the file a Ray-launched cluster has (ray/_common/usage/usage_lib.py:
# get_cluster_config_to_report). So a local cluster's daemons start with HOME at a directory that
# holds an empty one, and ~/.ray (Ray's own files: the cluster's auth token) as a link to the real
# one, so every process reads the same token; the workers get the real HOME back.
# tests/test_network.py checks that no connect() leaves loopback during a build.
RAY_BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"


def _daemon_home(real_home: str) -> str:
    home = Path(tempfile.gettempdir()) / f"witflow-ray-home-{os.getuid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    if not (home / RAY_BOOTSTRAP_CONFIG).is_file():
        (home / RAY_BOOTSTRAP_CONFIG).write_text("{}\n")
    ray_dir = Path(real_home) / ".ray"
    ray_dir.mkdir(exist_ok=True)
    link = home / ".ray"
    if not (link.is_symlink() and os.readlink(link) == str(ray_dir)):
        tmp = home / f".ray.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(ray_dir)
        os.replace(tmp, link)  # atomic: a concurrent init sees the old link or the new one
    return str(home)


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def init_ray(address: str | None = None, num_cpus: int | None = None, include_dashboard: bool = False,
             object_store_memory_mb: int | None = None, ship_code: bool = True) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``) if given, else start a local Ray. Idempotent.

    Joining a cluster ships the project's packages to its workers unless ``ship_code`` is false (every
    node has this checkout); ``$WITFLOW_RAY_NODE_IP`` is this driver's node address (as the cluster's
    nodes registered it: 127.0.0.1 for a loopback cluster, which Ray would otherwise replace with
    the host's address). Failing to join raises :class:`RayClusterError` naming the address.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _token_auth_if_available()  # before Ray reads its settings (at import)
    import ray

    if ray.is_initialized():
        return
    if address:
        node_ip = os.environ.get("WITFLOW_RAY_NODE_IP") or None
        try:
            ray.init(address=address, runtime_env=worker_runtime_env(ship_code), log_to_driver=False,
                     configure_logging=False, _node_ip_address=node_ip)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RayClusterError(f"cannot join the Ray cluster at {address} (ray.address / RAY_ADDRESS): {first}; "
                                  "see README 'A Ray cluster'") from None
        log_event(log, "joined Ray cluster", address=address, shipped_code=ship_code)
        return
    # Local workers import the project's packages from this checkout (installed editable too).
    env = worker_runtime_env(ship_code=False)
    kwargs: dict[str, Any] = {}
    if object_store_memory_mb:
        kwargs["object_store_memory"] = object_store_memory_mb * 1024 * 1024
    real_home = os.environ.get("HOME") or os.path.expanduser("~")
    env["env_vars"]["HOME"] = real_home
    with _environ("HOME", _daemon_home(real_home)):  # the daemons inherit it; this process gets its own back
        ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, runtime_env=env,
                 log_to_driver=False, configure_logging=False, **kwargs)
    log_event(log, "started local Ray", num_cpus=num_cpus or os.cpu_count(), dashboard=include_dashboard)


@dataclass
class ShardResult(Generic[R]):
    key: str
    ok: bool
    value: R | None = None
    error: str | None = None
    node: str | None = None  # the Ray node that ran it (None in this process)
    peak_rss: int | None = None  # bytes: the worker process's peak RSS during this job (Linux, on Ray)
    start_rss: int | None = None  # bytes: its RSS when the job started (peak - start: what the job added)


class ShardFailures(RuntimeError):
    """Some shards of a stage failed; everything else is kept and a rerun retries only those."""


def values_or_raise(stage: str, results: Sequence[ShardResult[R]]) -> list[R]:
    """The values of a stage's results, or :class:`ShardFailures` listing every failed shard."""
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "\n".join(f"  {r.key}: {r.error.splitlines()[0] if r.error else '?'}" for r in failed[:20])
        more = f"\n  … and {len(failed) - 20} more" if len(failed) > 20 else ""
        raise ShardFailures(f"{stage}: {len(failed)} of {len(results)} shards failed (the rest are kept; "
                            f"rerun the same build to retry only these):\n{lines}{more}")
    return [r.value for r in results]  # type: ignore[misc]


def item_key(item: Any) -> str:
    """A shard's name: its ``key`` or ``shard_id`` attribute, else ``str(item)``."""
    for attr in ("key", "shard_id"):
        value = getattr(item, attr, None)
        if isinstance(value, str):
            return value
    return str(item)


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, loaded once per process; None when the allocator is not glibc's."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        return None


def release_memory() -> None:
    """Hand the memory freed by a finished job back to the OS (Arrow's pool, then glibc's heap), so
    a long-lived worker's footprint is its current job's, not the largest job it ever ran."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _reset_peak_rss() -> bool:
    """Start this process's peak-RSS count afresh (Linux: ``5`` to ``/proc/self/clear_refs`` resets
    VmHWM); False where the kernel does not offer it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss(field: str = "VmHWM") -> int | None:
    """This process's peak RSS since the last reset (``VmHWM``) or its current RSS (``VmRSS``), in
    bytes; None where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _run_one(fn: Callable[[Any, Any], Any], key: str, item: Any, context: Any, on_ray: bool = False) -> ShardResult:
    """Run one job. On Ray it also measures the worker's peak RSS during the job (the worker's
    footprint at the start, its imports included, plus what the job held at its worst), then hands
    the job's freed memory back, so the next job's peak is its own."""
    node = _node_id() if on_ray else None
    measured = on_ray and _reset_peak_rss()
    start = _rss("VmRSS") if measured else None
    try:
        result = ShardResult(key, True, fn(item, context), node=node)
    except Exception as e:  # noqa: BLE001 - one shard's failure is reported, not raised
        result = ShardResult(key, False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}", node=node)
    if measured:
        result.peak_rss, result.start_rss = _rss("VmHWM"), start
    if on_ray:
        release_memory()
    return result


def stage_peak_rss(results: Sequence[ShardResult]) -> tuple[int, int] | None:
    """A stage's largest per-job worker peak RSS and the largest a job added to its worker's RSS at
    the start (peak - start: the job's own memory, without what the long-lived worker already
    held), in bytes; None when no job was measured (run in this process, or not on Linux)."""
    measured = [r for r in results if r.peak_rss is not None]
    if not measured:
        return None
    return (max(r.peak_rss for r in measured),  # type: ignore[type-var]
            max(r.peak_rss - (r.start_rss or 0) for r in measured))  # type: ignore[operator]


def map_shards(fn: Callable[[T, C], R], items: Sequence[T], *, context: C = None, desc: str,
               key: Callable[[T], str] = item_key, max_retries: int = 3, num_cpus: float = 1,
               on_done: Callable[[int, int], None] | None = None, use_ray: bool = True) -> list[ShardResult[R]]:
    """Run ``fn(item, context)`` for every item on Ray; results in input order.

    ``context`` is put in the object store once and shared by every job. ``max_retries`` covers
    worker deaths (a killed worker process); an exception raised by ``fn`` is not retried here
    (stages retry their own transient I/O) and comes back as a failed result. ``use_ray=False``
    runs in this process (debugging, tiny inputs, and code that must not start Ray).
    """
    keys = [key(i) for i in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{desc}: shard keys are not unique")
    results: dict[str, ShardResult[R]] = {}
    total = len(items)
    if not use_ray:
        for n, (k, item) in enumerate(progress(list(zip(keys, items)), desc=desc, total=total, unit="shard")):
            results[k] = _run_one(fn, k, item, context)
            if on_done:
                on_done(n + 1, total)
            if not results[k].ok:
                log_event(log, "shard failed", stage=desc, shard=k, error=results[k].error.splitlines()[0])
        return [results[k] for k in keys]

    import ray

    if not ray.is_initialized():
        init_ray()
    # SPREAD: a stage's shards go to every node of a cluster; the default packs them onto the driver's
    # node while it has room (its leased workers take task after task), leaving the others idle.
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, scheduling_strategy="SPREAD")(_run_one)
    context_ref = ray.put(context)
    pending = {remote.remote(fn, k, item, context_ref, True): k for k, item in zip(keys, items)}
    bar = iter(progress(range(total), desc=desc, total=total, unit="shard"))
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            k = pending.pop(ref)
            try:
                results[k] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the worker died more than max_retries times
                results[k] = ShardResult(k, False, error=f"{type(e).__name__}: {e}")
            done += 1
            next(bar, None)
            if on_done:
                on_done(done, total)
            if not results[k].ok:
                log_event(log, "shard failed", stage=desc, shard=k, error=results[k].error.splitlines()[0])
    per_node = Counter(r.node for r in results.values() if r.node)
    if per_node:  # where the work ran: on a cluster, every node should appear
        log_event(log, "shards per node", stage=desc, nodes=dict(sorted(per_node.items())))
    peak = stage_peak_rss(list(results.values()))
    if peak is not None:  # what one job of this stage holds: the figure a task memory budget bounds
        log_event(log, "job peak RSS", stage=desc, jobs=total, max_mb=round(peak[0] / 2**20),
                  max_added_mb=round(peak[1] / 2**20))
    return [results[k] for k in keys]


# ------------------------------------------------------------------------------------------------
# Shuffle: map -> partition -> reduce through object storage
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShuffleContext:
    scratch: Any  # infra.storage.ObjectStore: where pieces and reduce outputs live
    num_partitions: int
    map_fn: Callable[[Any, Any], Sequence[Any]]
    reduce_fn: Callable[[int, Any, Any], Any]
    context: Any


@dataclass(frozen=True)
class _MapJob:
    key: str
    item: Any


def map_output_key(map_key: str) -> str:
    """One map's output: every partition's piece in one Arrow IPC file, a record batch each.

    IPC, not Parquet: a piece is written once and read once, by one reduce, so Parquet's encoding
    and per-row-group footer buy nothing. With lz4-compressed buffers the file is about the size of
    the Parquet one (10.6 vs 10.8 MB for 250k band rows), written ~3x and read ~3-5x cheaper in CPU,
    and reading one piece parses a flatbuffer footer instead of R row groups' metadata."""
    return f"map/{map_key}.arrow"


def reduce_key(partition: int) -> str:
    return f"reduce/p-{partition:05d}.parquet"


_BATCHES = b"witflow.shuffle.batches"  # per partition, its record batch in the map's file (-1: none)
_IPC_COMPRESSION = "lz4"


def _shuffle_map(job: _MapJob, ctx: _ShuffleContext) -> str:
    """Run one map and write its pieces as one file (written last and atomically: it is the map's
    completion record). One file per map, not one per (map, partition): a shuffle of M maps and
    R partitions creates M objects, not M × R."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    store = ctx.scratch
    key = map_output_key(job.key)
    if store.exists(key):
        return job.key
    pieces = ctx.map_fn(job.item, ctx.context)
    if len(pieces) != ctx.num_partitions:
        raise ValueError(f"shuffle map {job.key}: {len(pieces)} pieces for {ctx.num_partitions} partitions")
    batches, next_batch = [], 0
    for piece in pieces:
        batches.append(next_batch if piece.num_rows else -1)
        next_batch += 1 if piece.num_rows else 0
    schema = pieces[0].schema.with_metadata({**(pieces[0].schema.metadata or {}),
                                             _BATCHES: json.dumps(batches).encode()}) if pieces else pa.schema([])
    options = ipc.IpcWriteOptions(compression=_IPC_COMPRESSION)
    with store.open_atomic(key) as f:
        with ipc.new_file(f, schema, options=options) as writer:
            for piece in pieces:
                if piece.num_rows:  # one batch: its index is the partition's entry in _BATCHES
                    writer.write_batch(piece.cast(schema).combine_chunks().to_batches()[0])
    return job.key


@dataclass(frozen=True)
class _ReduceContext:
    shuffle: _ShuffleContext
    map_keys: tuple[str, ...]


def _read_piece(store: Any, map_key: str, partition: int) -> Any:
    """One map's piece of ``partition``: its record batch of the map's file (an empty table if none)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    key = map_output_key(map_key)
    with store.filesystem.open_input_file(store.fs_path(key)) as f:
        reader = ipc.open_file(f)
        batch = json.loads(reader.schema.metadata[_BATCHES])[partition]
        if batch < 0:
            return reader.schema.empty_table()
        return pa.Table.from_batches([reader.get_batch(batch)], schema=reader.schema)


def _shuffle_reduce(partition: int, ctx: _ReduceContext) -> str:
    store = ctx.shuffle.scratch
    out = reduce_key(partition)
    if store.exists(out):
        return out
    pieces = [_read_piece(store, k, partition) for k in ctx.map_keys]
    table = ctx.shuffle.reduce_fn(partition, pieces, ctx.shuffle.context)
    store.write_parquet(out, table)
    return out


def shuffle(map_fn: Callable[[T, C], Sequence[Any]], reduce_fn: Callable[[int, list[Any], C], Any],
            items: Sequence[T], *, num_partitions: int, scratch: Any, context: C = None, desc: str,
            key: Callable[[T], str] = item_key, use_ray: bool = True) -> list[str]:
    """Map every item to ``num_partitions`` Arrow tables, then reduce each partition's pieces.

    ``map_fn(item, context)`` returns one ``pa.Table`` per partition; ``reduce_fn(partition,
    pieces, context)`` gets that partition's piece of every map and returns a ``pa.Table``. Pieces
    and reduce outputs are written under ``scratch`` (an ``ObjectStore``: local, shared or S3, so
    any node can read them); finished maps and reduces are skipped on a rerun. Returns the keys of
    the reduce outputs under ``scratch``, in partition order. A failed map or reduce raises
    :class:`ShardFailures` after the others finish.
    """
    if num_partitions < 1:
        raise ValueError("shuffle: num_partitions must be >= 1")
    ctx = _ShuffleContext(scratch, num_partitions, map_fn, reduce_fn, context)
    jobs = [_MapJob(key(i), i) for i in items]
    map_keys = values_or_raise(f"{desc} (map)", map_shards(_shuffle_map, jobs, context=ctx, desc=f"{desc}: map",
                                                          use_ray=use_ray))
    reduce_ctx = _ReduceContext(ctx, tuple(map_keys))
    return values_or_raise(f"{desc} (reduce)", map_shards(_shuffle_reduce, list(range(num_partitions)),
                                                          context=reduce_ctx, desc=f"{desc}: reduce",
                                                          key=lambda p: f"p-{p:05d}", use_ray=use_ray))


def split_by(table: Any, bucket: Any, n: int) -> list[Any]:
    """A shuffle map's pieces: ``table``'s rows by ``bucket`` (ints 0..n-1, numpy), each piece in
    the rows' order; one sort and n slices, not n filters."""
    import numpy as np
    import pyarrow as pa

    order = np.argsort(bucket, kind="stable")
    ordered = table.take(pa.array(order))
    counts = np.bincount(bucket, minlength=n)
    offsets = np.r_[0, np.cumsum(counts)]
    return [ordered.slice(int(offsets[i]), int(counts[i])) for i in range(n)]


def cluster_cpus(default: int = 1) -> int:
    """CPUs of the connected Ray cluster (``default`` when Ray is not running)."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.available_resources().get("CPU", default)))
    except Exception:  # noqa: BLE001 - sizing hint only
        pass
    return default
