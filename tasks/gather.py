"""Gathering over HTTP: fetch the image of every candidate row that has a URL and no inline image.

Every row leaves with a ``status`` and an ``error`` value:

- ``ok``: fetched now; ``skipped``: nothing to fetch (the row carries its image inline) — both kept;
- ``failed_transient``: may succeed later (timeout, connection error, 429/5xx after in-run retries);
- ``failed_permanent``: will not (404, bad scheme, private address, too large, noai opt-out, ...);
- duplicate URLs are ``skipped`` and dropped (the first row with the URL is fetched).

Dropped rows are counted by reason in the Funnel (stage ``gather``) and returned as the ``failed``
side output (the input columns without image bytes, plus ``status``, ``reason`` and ``error`` =
``"<reason>: <detail>"``). Rerun mode: ``retry_transient(failed, ...)`` fetches only the
``failed_transient`` rows again and carries the permanent ones over unchanged.

:func:`gather_images` is the step: it fuses fetching with tasks/images.py, processing bodies in a
thread pool as they arrive, overlapping decode with network waits (see bench/gather.py); rows
that carry their image inline go through the same pool.

Safety: only http/https; every address a host resolves to is checked (private, loopback,
link-local, multicast, reserved, and IPv4 embedded in IPv6) by the connector's own resolver, so the
socket connects to exactly the address that was checked (no DNS-rebinding window); IP literals are
checked before any connection; redirects are followed by hand so every hop gets the same checks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import ipaddress
import random
import re
import socket
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import aiohttp
import pyarrow as pa
import pyarrow.compute as pc
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy
from yarl import URL

from infra.config import GatherConfig, ImageConfig
from infra.funnel import Funnel
from infra.log import get_logger, log_event, progress
from tasks.images import STAGE as IMAGE_STAGE
from tasks.images import assemble_image_results, try_process_image
from tasks.step import StepOutput

STAGE = "gather"
RETRY_STAGE = "gather_retry"

OK = "ok"
SKIPPED = "skipped"
FAILED_TRANSIENT = "failed_transient"
FAILED_PERMANENT = "failed_permanent"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 1 << 16
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_log = get_logger(__name__)


# --------------------------------------------------------------------------------------------
# Address policy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressPolicy:
    """Which resolved addresses a fetch may connect to."""

    allow_private: bool = False
    allow_loopback: bool = False

    def refusal(self, address: str) -> str | None:
        """None if ``address`` may be used, else why not (e.g. ``"10.0.0.1 is private"``)."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return f"{address!r} is not an IP address"
        for candidate in _embedded_addresses(ip):
            why = self._refuse_one(candidate)
            if why:
                return f"{address} {why}" if candidate == ip else f"{address} embeds {candidate}, {why}"
        return None

    def _refuse_one(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        if ip.is_loopback:
            return None if (self.allow_loopback or self.allow_private) else "is loopback"
        if self.allow_private:
            return None
        if ip.is_multicast:
            return "is multicast"
        if ip.is_link_local:
            return "is link-local"
        if ip.is_unspecified:
            return "is unspecified"
        if ip.is_private:
            return "is private"
        if ip.is_reserved or not ip.is_global:
            return "is reserved (not globally routable)"
        return None


def _embedded_addresses(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The address itself plus any IPv4 address tunnelled inside an IPv6 one."""
    out = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            out.append(ip.ipv4_mapped)
        if ip.sixtofour:
            out.append(ip.sixtofour)
        if ip.teredo:
            out.append(ip.teredo[1])
        if ip in _NAT64_PREFIX:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


class AddressRefused(OSError):
    """A host resolved to an address the policy refuses; raised before any connection."""


class CheckedResolver(AbstractResolver):
    """Resolves with ``inner`` and refuses the host if ANY of its addresses is refused.

    aiohttp connects to the addresses this returns, so the check and the connection use the same
    answer. (IP literals never reach a resolver; ``_check_url`` handles those.)
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            why = self._policy.refusal(result["host"])
            if why:
                raise AddressRefused(f"{host} resolves to {why}")
        return results

    async def close(self) -> None:
        await self._inner.close()


# --------------------------------------------------------------------------------------------
# One fetch
# --------------------------------------------------------------------------------------------


class FetchFailure(Exception):
    """A classified fetch failure: ``reason`` is the funnel key."""

    def __init__(self, reason: str, detail: str, *, transient: bool = False, retryable: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient
        self.retryable = retryable
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class FetchOutcome:
    status: str
    body: bytes | None = None
    reason: str | None = None
    detail: str | None = None
    final_url: str | None = None
    attempts: int = 0
    transformed: object = None  # what fetch_urls' transform made of the body (the body is then dropped)

    @property
    def error(self) -> str | None:
        return None if self.reason is None else f"{self.reason}: {self.detail}"


# One DNS label: letters, digits, hyphens (underscores too: real hosts use them), no hyphen at an end.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def _host_name_problem(raw_host: str) -> str | None:
    """Why an (IDNA-encoded) host name can never resolve, or None. Such a URL is permanently
    invalid: looking it up would only fail as a DNS error, which a rerun would retry for ever."""
    name = raw_host[:-1] if raw_host.endswith(".") else raw_host
    if len(name) > 253:
        return "longer than 253 characters"
    bad = next((label for label in name.split(".") if not _LABEL.match(label)), None)
    return None if bad is None else f"label {bad[:70]!r} is not a DNS label"


def _check_url(url: URL, policy: AddressPolicy) -> None:
    scheme = (url.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise FetchFailure("bad_scheme", f"only http/https are fetched, not {scheme or 'no scheme'}:")
    if not url.host:
        raise FetchFailure("invalid_url", f"no host in {str(url)[:200]!r}")
    try:
        ipaddress.ip_address(url.host.split("%", 1)[0])
    except ValueError:
        problem = _host_name_problem(url.raw_host or "")
        if problem:
            raise FetchFailure("invalid_url", f"host of {str(url)[:200]!r}: {problem}") from None
        return  # a name: the CheckedResolver checks what it resolves to
    why = policy.refusal(url.host)
    if why:
        raise FetchFailure("private_address", why)


def _parse_url(raw: str) -> URL:
    try:
        return URL(raw.strip())
    except (ValueError, TypeError) as e:
        raise FetchFailure("invalid_url", f"{raw[:200]!r}: {e}") from None


def _noai_directive(headers: CIMultiDictProxy[str], directives: Sequence[str]) -> str | None:
    """The first opt-out directive in X-Robots-Tag, whichever agent it names.

    ``X-Robots-Tag: otherbot: noai`` is honoured too: an AI opt-out aimed at one crawler is taken
    as meant for all of them.
    """
    wanted = {d.lower() for d in directives}
    for value in headers.getall("X-Robots-Tag", ()):
        for token in re.split(r"[,\s:]+", value.lower()):
            if token in wanted:
                return token
    return None


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _status_failure(status: int, url: URL, retry_after: str | None) -> FetchFailure:
    if status == 429 or status == 408 or (500 <= status <= 599 and status not in (501, 505)):
        return FetchFailure(f"http_{status}", f"GET {url} returned {status}", transient=True,
                            retryable=True, retry_after_s=_retry_after_s(retry_after))
    return FetchFailure(f"http_{status}", f"GET {url} returned {status}")


def classify_exception(exc: BaseException) -> FetchFailure:
    """Map an exception raised while fetching to a reason; unknown ones are permanent."""
    if isinstance(exc, FetchFailure):
        return exc
    os_error = getattr(exc, "os_error", None)
    if isinstance(exc, AddressRefused) or isinstance(os_error, AddressRefused):
        return FetchFailure("private_address", str(os_error or exc))
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return FetchFailure("dns_error", str(exc), transient=True)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        # Not retried in-run: a slow host would eat the budget again. A rerun may try it.
        return FetchFailure("timeout", f"{type(exc).__name__} {exc}".strip(), transient=True)
    if isinstance(exc, aiohttp.ClientSSLError):
        return FetchFailure("ssl_error", str(exc))
    if isinstance(exc, aiohttp.InvalidURL):
        return FetchFailure("invalid_url", str(exc))
    if isinstance(exc, aiohttp.ClientResponseError):
        return FetchFailure("bad_response", str(exc))
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)):
        return FetchFailure("connection_error", f"{type(exc).__name__}: {exc}", transient=True, retryable=True)
    return FetchFailure("fetch_error", f"{type(exc).__name__}: {exc}")


class _Fetcher:
    """Shared state of one gather call: session, limits, policy."""

    def __init__(self, session: aiohttp.ClientSession, cfg: GatherConfig, policy: AddressPolicy) -> None:
        self.session = session
        self.cfg = cfg
        self.policy = policy
        self.in_flight = asyncio.Semaphore(cfg.concurrency)
        self.per_host: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(cfg.per_host_concurrency))
        self.request_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s)

    async def fetch(self, raw_url: str) -> FetchOutcome:
        """Fetch with retries (429/5xx/connection errors only, exponential backoff with jitter)."""
        cfg = self.cfg
        attempt = 0
        while True:
            attempt += 1
            try:
                body, final_url = await self._attempt(raw_url)
                return FetchOutcome(OK, body=body, final_url=final_url, attempts=attempt)
            except Exception as exc:  # noqa: BLE001 - every failure costs this sample only
                failure = classify_exception(exc)
            if failure.retryable and attempt <= cfg.retries:
                wait = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
                if failure.retry_after_s is not None:
                    wait = min(cfg.max_backoff_s, max(wait, failure.retry_after_s))
                await asyncio.sleep(wait)
                continue
            status = FAILED_TRANSIENT if failure.transient else FAILED_PERMANENT
            return FetchOutcome(status, reason=failure.reason, detail=failure.detail[:500], attempts=attempt)

    async def _attempt(self, raw_url: str) -> tuple[bytes, str]:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        url = _parse_url(raw_url)
        seen = {str(url)}
        deadline: float | None = None  # starts once the first hop has its slots, not while queued
        for hop in range(cfg.max_redirects + 1):
            _check_url(url, self.policy)
            host_key = f"{url.host}:{url.port}"
            async with self.per_host[host_key], self.in_flight:
                if deadline is None:
                    deadline = loop.time() + cfg.total_timeout_s
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise FetchFailure("timeout", f"total budget of {cfg.total_timeout_s}s spent after {hop} hops",
                                       transient=True)
                async with asyncio.timeout(remaining):
                    next_url, body = await self._hop(url)
            if next_url is None:
                return body, str(url)
            if str(next_url) in seen:
                raise FetchFailure("redirect_loop", f"{url} redirects back to {next_url}")
            seen.add(str(next_url))
            url = next_url
        raise FetchFailure("too_many_redirects", f"more than {cfg.max_redirects} redirects from {raw_url[:200]}")

    async def _hop(self, url: URL) -> tuple[URL | None, bytes]:
        """One request: (redirect target, b"") or (None, body)."""
        cfg = self.cfg
        async with self.session.get(url, allow_redirects=False, timeout=self.request_timeout) as resp:
            if resp.status in _REDIRECT_STATUSES:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchFailure("bad_redirect", f"{resp.status} from {url} without a Location")
                try:
                    target = url.join(URL(location))
                except (ValueError, TypeError) as e:
                    raise FetchFailure("invalid_url", f"redirect to {location[:200]!r}: {e}") from None
                return target, b""
            if not 200 <= resp.status < 300:
                raise _status_failure(resp.status, url, resp.headers.get("Retry-After"))
            if cfg.honour_noai:
                directive = _noai_directive(resp.headers, cfg.noai_directives)
                if directive:
                    raise FetchFailure("noai", f"X-Robots-Tag {directive} on {url}")
            if resp.content_length is not None and resp.content_length > cfg.max_bytes:
                resp.close()
                raise FetchFailure("too_large", f"Content-Length {resp.content_length} > {cfg.max_bytes}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
                body += chunk
                if len(body) > cfg.max_bytes:
                    resp.close()  # drop the connection rather than drain an endless body
                    raise FetchFailure("too_large", f"body exceeds {cfg.max_bytes} bytes")
            return None, bytes(body)


def _interleave_by_host(items: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """Round-robin over hosts so a big host's queue does not block the others."""
    by_host: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for item in items:
        try:
            host = URL(item[1]).host or ""
        except (ValueError, TypeError):
            host = ""
        by_host[host].append(item)
    queues = list(by_host.values())
    out: list[tuple[int, str]] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        out.extend(q[depth] for q in queues if depth < len(q))
    return out


async def fetch_urls(items: Sequence[tuple[int, str]], cfg: GatherConfig,
                     resolver: AbstractResolver | None = None,
                     transform: Callable[[bytes], object] | None = None,
                     executor: concurrent.futures.Executor | None = None) -> dict[int, FetchOutcome]:
    """Fetch ``(key, url)`` pairs concurrently in the running loop; one outcome per key.

    With ``transform``, each body is handed to ``transform`` on ``executor`` as soon as it arrives;
    the outcome then carries ``transformed`` instead of the body (bounded memory: at most
    ``2 × concurrency`` bodies wait for the executor).
    """
    policy = AddressPolicy(cfg.allow_private_addresses, cfg.allow_loopback)
    connector = aiohttp.TCPConnector(
        resolver=CheckedResolver(policy, resolver), limit=0, limit_per_host=0, ttl_dns_cache=300)
    headers = {"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"}
    async with aiohttp.ClientSession(connector=connector, headers=headers, trust_env=False) as session:
        fetcher = _Fetcher(session, cfg, policy)

        loop = asyncio.get_running_loop()
        waiting_bodies = asyncio.Semaphore(2 * cfg.concurrency)

        async def one(key: int, url: str) -> tuple[int, FetchOutcome]:
            if transform is None:
                return key, await fetcher.fetch(url)
            async with waiting_bodies:
                outcome = await fetcher.fetch(url)
                if outcome.status == OK:
                    made = await loop.run_in_executor(executor, transform, outcome.body)
                    outcome = dataclasses.replace(outcome, body=None, transformed=made)
            return key, outcome

        tasks = [asyncio.ensure_future(one(k, u)) for k, u in _interleave_by_host(items)]
        outcomes: dict[int, FetchOutcome] = {}
        for next_done in progress(asyncio.as_completed(tasks), desc="gather", total=len(tasks), unit="url"):
            key, outcome = await next_done
            outcomes[key] = outcome
    return outcomes


def _run_in_new_loop(items: Sequence[tuple[int, str]], cfg: GatherConfig,
                     transform: Callable[[bytes], object] | None = None,
                     executor: concurrent.futures.Executor | None = None) -> dict[int, FetchOutcome]:
    def run() -> dict[int, FetchOutcome]:
        return asyncio.run(fetch_urls(items, cfg, transform=transform, executor=executor))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    # Called from inside a running loop (an async Prefect task, a notebook): use a fresh thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _column_or_nulls(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    return table.column(name) if name in table.column_names else pa.nulls(table.num_rows, type_)


def _with_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


@dataclass
class _Plan:
    """Per-row bookkeeping of one gather call (index = row number)."""

    status: list[str | None]
    reason: list[str | None]
    error: list[str | None]
    to_fetch: list[tuple[int, str]]
    inline: list[int]  # rows that carry their image already


def _plan(table: pa.Table, cfg: GatherConfig) -> _Plan:
    n = table.num_rows
    urls = _column_or_nulls(table, "url", pa.string()).to_pylist()
    image_col = _column_or_nulls(table, "image", pa.binary())
    has_image = pc.fill_null(pc.invert(pc.is_null(image_col)), False).to_pylist()
    plan = _Plan([None] * n, [None] * n, [None] * n, [], [])
    first_row_of_url: dict[str, int] = {}
    for i in range(n):
        if has_image[i]:
            plan.status[i] = SKIPPED
            plan.inline.append(i)
        elif not urls[i] or not urls[i].strip():
            plan.status[i], plan.reason[i], plan.error[i] = FAILED_PERMANENT, "no_url", "no_url: neither an image nor a URL"
        elif cfg.dedupe_urls and urls[i] in first_row_of_url:
            plan.status[i], plan.reason[i] = SKIPPED, "duplicate_url"
            plan.error[i] = f"duplicate_url: same URL as row {first_row_of_url[urls[i]]}"
        else:
            first_row_of_url[urls[i]] = i
            plan.to_fetch.append((i, urls[i]))
    return plan


def _assemble(table: pa.Table, plan: _Plan, outcomes: dict[int, FetchOutcome], stage: str
              ) -> tuple[pa.Table, pa.Table, Funnel]:
    """Record outcomes in the plan; split rows into kept (with fetched bodies) and failures."""
    for i, outcome in outcomes.items():
        plan.status[i], plan.reason[i], plan.error[i] = outcome.status, outcome.reason, outcome.error
    image_col = _column_or_nulls(table, "image", pa.binary())
    images = image_col
    if outcomes:
        values = image_col.to_pylist()
        for i, outcome in outcomes.items():
            values[i] = outcome.body
        images = pa.array(values, image_col.type)
    full = _with_column(table, "image", images)
    full = _with_column(full, "status", pa.array(plan.status, pa.string()))
    full = _with_column(full, "error", pa.array(plan.error, pa.string()))

    reasons = plan.reason
    keep = pa.array([r is None for r in reasons], pa.bool_())
    kept = full.filter(keep)
    failures = full.filter(pc.invert(keep))
    failures = _with_column(failures, "image", pa.nulls(failures.num_rows, image_col.type))
    failures = _with_column(failures, "reason", pa.array([r for r in reasons if r is not None], pa.string()))

    funnel = Funnel()
    funnel.record(stage, table.num_rows, kept.num_rows, (r for r in reasons if r is not None))
    counts = {s: plan.status.count(s) for s in (OK, SKIPPED, FAILED_TRANSIENT, FAILED_PERMANENT)}
    log_event(_log, "gathered", rows=table.num_rows, fetched=len(plan.to_fetch), **counts)
    return kept, failures, funnel


FAILED = "failed"  # the side output: rows dropped by fetching or image processing, with reasons


class ImageFeatureStep(Protocol):
    """What the image stage computes from each image's final pixels and adds as columns (the dedup
    hashes: ``tasks.dedup.hashing.HashFeatures``)."""

    def of_image(self, img: Any) -> Any: ...

    def add_columns(self, table: pa.Table, features: list) -> pa.Table: ...


def gather_images(table: pa.Table, gather_cfg: GatherConfig, image_cfg: ImageConfig, *,
                  image_threads: int = 1, stages: tuple[str, str] = (STAGE, IMAGE_STAGE),
                  features: ImageFeatureStep | None = None) -> StepOutput:
    """The gather step: fetch (rows with a URL and no image) and process every image in one pass.

    Each body is decoded/validated/resized in a pool of ``image_threads`` threads as soon as it
    arrives (Pillow releases the GIL), so image work overlaps fetching and at most
    ``2 × concurrency`` raw bodies are held at once. Inline images go through the same pool. The
    funnel has both stages (``gather``, ``images``); the ``failed`` side output holds fetch failures
    and image rejects (status ``failed_permanent``), as :func:`retry_transient` reads them. With
    ``features``, each image's features are computed from the pixels it was decoded to (before
    encoding) and added as columns: the image is decoded once in the whole build.
    """
    if image_threads < 1:
        raise ValueError("image_threads must be >= 1")
    plan = _plan(table, gather_cfg)
    images = _column_or_nulls(table, "image", pa.binary())
    with concurrent.futures.ThreadPoolExecutor(image_threads, thread_name_prefix="witflow-images") as pool:
        of_image = features.of_image if features is not None else None
        transform = functools.partial(try_process_image, cfg=image_cfg, features=of_image)
        inline = {i: pool.submit(try_process_image, images[i].as_py(), image_cfg, of_image) for i in plan.inline}
        outcomes = _run_in_new_loop(plan.to_fetch, gather_cfg, transform, pool) if plan.to_fetch else {}
        processed = {i: o.transformed for i, o in outcomes.items() if o.status == OK}
        processed.update({i: future.result() for i, future in inline.items()})
    gathered, failures, funnel = _assemble(table, plan, outcomes, stages[0])
    kept_rows = [i for i, r in enumerate(plan.reason) if r is None]
    pairs = [processed[i] for i in kept_rows]
    result = assemble_image_results(gathered, [p[0] for p in pairs], [p[1] for p in pairs], stage=stages[1])
    if features is not None:
        result.table = features.add_columns(result.table, [p[0].features for p in pairs if p[0] is not None])
    if result.rejects.num_rows:
        failures = pa.concat_tables([failures, result.rejects], promote_options="default")
    return StepOutput(result.table, funnel.merge(result.funnel), {FAILED: failures})


def _is_transient(failures: pa.Table) -> pa.Array:
    return pc.fill_null(pc.equal(failures.column("status"), FAILED_TRANSIENT), False)


def transient_rows(failures: pa.Table) -> pa.Table:
    """The ``failed_transient`` rows of a failures table, as input rows to fetch again."""
    return failures.filter(_is_transient(failures)).drop_columns(
        [c for c in ("status", "error", "reason") if c in failures.column_names])


def retry_transient(failures: pa.Table, gather_cfg: GatherConfig, image_cfg: ImageConfig, *,
                    image_threads: int = 1, features: ImageFeatureStep | None = None) -> StepOutput:
    """Rerun mode: fetch again only the ``failed_transient`` rows of an earlier ``failed`` output.

    Returns the recovered rows, a funnel under stages ``gather_retry``/``images_retry`` (in = rows
    retried: they were counted in by the first pass), and the new ``failed`` output: rows that
    failed again plus the earlier non-transient failures unchanged.
    """
    out = gather_images(transient_rows(failures), gather_cfg, image_cfg, image_threads=image_threads,
                        stages=(RETRY_STAGE, f"{IMAGE_STAGE}_retry"), features=features)
    carried = failures.filter(pc.invert(_is_transient(failures)))
    if carried.num_rows:
        out.side[FAILED] = pa.concat_tables([out.side[FAILED], carried], promote_options="default")
    return out


__all__ = [
    "AddressPolicy", "CheckedResolver", "FetchOutcome", "fetch_urls", "gather_images", "retry_transient",
    "transient_rows", "classify_exception", "OK", "SKIPPED", "FAILED_TRANSIENT", "FAILED_PERMANENT", "FAILED",
]
