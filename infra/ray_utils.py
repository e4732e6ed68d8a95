"""Ray plumbing: start or join a cluster, and fan per-shard work out with retries and progress.

A shard that fails (an exception after its retries, or a worker that keeps dying) costs that shard
only: it is reported in the result, the other shards finish, and a rerun retries it.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from infra.log import get_logger, log_event, progress

log = get_logger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, include_dashboard: bool = False,
             object_store_memory_mb: int | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``) if given, else start a local Ray. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Workers import the project's packages from the working tree (they are installed editable too).
    env = {"env_vars": {"RAY_DISABLE_USAGE_STATS": "1", "WITFLOW_PROGRESS": "0"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False, configure_logging=False)
        log_event(log, "joined Ray cluster", address=address)
        return
    kwargs: dict[str, Any] = {}
    if object_store_memory_mb:
        kwargs["object_store_memory"] = object_store_memory_mb * 1024 * 1024
    ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, runtime_env=env,
             log_to_driver=False, configure_logging=False, **kwargs)
    log_event(log, "started local Ray", num_cpus=num_cpus or os.cpu_count(), dashboard=include_dashboard)


@dataclass
class ShardResult:
    key: str
    ok: bool
    value: Any = None
    error: str | None = None


def _run_one(fn: Callable[..., Any], key: str, args: tuple) -> ShardResult:
    try:
        return ShardResult(key, True, fn(*args))
    except Exception as e:  # noqa: BLE001 - one shard's failure is reported, not raised
        return ShardResult(key, False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")


def map_shards(fn: Callable[..., Any], items: Sequence[tuple[str, tuple]], *, desc: str,
               max_retries: int = 3, num_cpus: float = 1, on_done: Callable[[int, int], None] | None = None,
               use_ray: bool = True) -> list[ShardResult]:
    """Run ``fn(*args)`` for every ``(key, args)`` on Ray, in input order.

    ``max_retries`` covers worker deaths (a killed worker process); an exception raised by ``fn`` is
    not retried here (stages retry their own transient I/O) and comes back as a failed result.
    ``use_ray=False`` runs in-process, for debugging and small inputs.
    """
    results: dict[str, ShardResult] = {}
    total = len(items)
    if not use_ray:
        for i, (key, args) in enumerate(progress(items, desc=desc, total=total, unit="shard")):
            results[key] = _run_one(fn, key, args)
            if on_done:
                on_done(i + 1, total)
        return [results[k] for k, _ in items]

    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(_run_one)
    pending = {remote.remote(fn, key, args): key for key, args in items}
    bar = progress(range(total), desc=desc, total=total, unit="shard")
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            key = pending.pop(ref)
            try:
                results[key] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the worker died more than max_retries times
                results[key] = ShardResult(key, False, error=f"{type(e).__name__}: {e}")
            done += 1
            next(bar, None)
            if on_done:
                on_done(done, total)
            if not results[key].ok:
                log_event(log, "shard failed", stage=desc, shard=key, error=results[key].error.splitlines()[0])
    return [results[k] for k, _ in items]
