"""tasks/gather.py against a real local HTTP server with hostile routes (infra/http_server.py)."""

from __future__ import annotations

import asyncio
import collections
import io
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

from infra.config import ConfigError, GatherConfig, ImageConfig
from infra.http_server import serve_directory, serve_files, serve_parquet, serve_table_images
from tasks.gather import (FAILED, FAILED_PERMANENT, FAILED_TRANSIENT, OK, SKIPPED, AddressPolicy, CheckedResolver,
                          fetch_urls, gather_images, retry_transient)
from tasks.step import StepOutput


def _png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
FAST = dict(allow_loopback=True, connect_timeout_s=1.0, read_timeout_s=0.5, total_timeout_s=1.0,
            retries=2, backoff_s=0.01, max_backoff_s=0.05, max_bytes=100_000)


def _cfg(**overrides) -> GatherConfig:
    return GatherConfig(**{**FAST, **overrides})


# Images are checked but kept as fetched, so the tests can compare bytes with what was served.
KEEP = ImageConfig(resize_longest_side=None, encode_format="keep", min_side=1, max_aspect_ratio=100.0)


def _gather(table: pa.Table, cfg: GatherConfig) -> StepOutput:
    return gather_images(table, cfg, KEEP)


def _failures(result: StepOutput) -> pa.Table:
    return result.side[FAILED]


def _candidates(urls: list[str | None], images: list[bytes | None] | None = None) -> pa.Table:
    n = len(urls)
    return pa.table({
        "sample_id": [f"s{i}" for i in range(n)],
        "source": ["test"] * n,
        "caption": [f"caption {i}" for i in range(n)],
        "url": pa.array(urls, pa.string()),
        "image": pa.array(images or [None] * n, pa.binary()),
        "meta": pa.array([None] * n, pa.string()),
    })


class Hostile:
    """Hostile routes; ``requests`` counts what each route was asked, to prove (no) retries."""

    def __init__(self) -> None:
        self.requests: collections.Counter = collections.Counter()

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/slow", self.slow), web.get("/drip", self.drip), web.get("/loop/{name}", self.loop),
                web.get("/chain/{n}", self.chain), web.get("/html.jpg", self.html), web.get("/huge", self.huge),
                web.get("/huge-declared", self.huge_declared), web.get("/429-then-ok", self.throttled),
                web.get("/500", self.error_500), web.get("/503-once/{key}", self.unavailable_once),
                web.get("/noai", self.noai), web.get("/agent-noimageai", self.agent_noimageai),
                web.get("/to-private", self.to_private), web.get("/to-file", self.to_file),
                web.get("/to-image", self.to_image)]

    def _count(self, request: web.Request) -> int:
        self.requests[request.path] += 1
        return self.requests[request.path]

    async def slow(self, request: web.Request) -> web.Response:
        self._count(request)
        await asyncio.sleep(5)
        return web.Response(body=PNG, content_type="image/png")

    async def drip(self, request: web.Request) -> web.StreamResponse:
        # Never silent long enough for the read timeout: only the total budget can stop it.
        self._count(request)
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        for _ in range(200):
            await resp.write(b"x")
            await asyncio.sleep(0.05)
        return resp

    async def loop(self, request: web.Request) -> web.Response:
        self._count(request)
        other = "b" if request.match_info["name"] == "a" else "a"
        raise web.HTTPFound(f"/loop/{other}")

    async def chain(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPFound(f"/chain/{int(request.match_info['n']) + 1}")

    async def html(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(text="<!DOCTYPE html><html><body>Not found</body></html>", content_type="image/jpeg")

    async def huge(self, request: web.Request) -> web.StreamResponse:
        self._count(request)  # no Content-Length: the cap must hold while streaming
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"\0" * 65536)
        return resp

    async def huge_declared(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=b"\0" * 200_000, content_type="image/png")

    async def throttled(self, request: web.Request) -> web.Response:
        if self._count(request) == 1:
            return web.Response(status=429, headers={"Retry-After": "0"})
        return web.Response(body=PNG, content_type="image/png")

    async def error_500(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(status=500)

    async def unavailable_once(self, request: web.Request) -> web.Response:
        if self._count(request) == 1:
            return web.Response(status=503)
        return web.Response(body=PNG, content_type="image/png")

    async def noai(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=PNG, content_type="image/png", headers={"X-Robots-Tag": "noindex, noai"})

    async def agent_noimageai(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=PNG, content_type="image/png", headers={"X-Robots-Tag": "otherbot: noimageai"})

    async def to_private(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPFound("http://10.0.0.1/secret.png")

    async def to_file(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPFound("file:///etc/passwd")

    async def to_image(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPMovedPermanently("/img/0.png")


@pytest.fixture(scope="module")
def hostile():
    routes = Hostile()
    files = {f"img/{i}.png": _png((i * 20 % 256, 100, 50)) for i in range(8)}
    with serve_files(files, routes=routes.routes()) as server:
        server.hostile = routes  # type: ignore[attr-defined]
        yield server


def _reasons(result: StepOutput) -> dict[str, str]:
    return dict(zip(_failures(result).column("url").to_pylist(), _failures(result).column("reason").to_pylist()))


def test_fetches_images_and_marks_status(hostile):
    urls = hostile.urls[:5]
    result = _gather(_candidates(urls), _cfg())
    assert result.table.column("url").to_pylist() == urls
    assert result.table.column("status").to_pylist() == [OK] * 5
    assert result.table.column("error").to_pylist() == [None] * 5
    for url, data in zip(urls, result.table.column("image").to_pylist()):
        assert data == hostile_file(hostile, url)
    stage = result.funnel.to_dict()["stages"][0]
    assert (stage["stage"], stage["in"], stage["out"], stage["dropped"]) == ("gather", 5, 5, {})
    assert _failures(result).num_rows == 0
    assert [s["stage"] for s in result.funnel.to_dict()["stages"]] == ["gather", "images"]


def hostile_file(server, url: str) -> bytes:
    path = url.split(server.base_url + "/", 1)[1]
    return _png((int(path.split("/")[1].split(".")[0]) * 20 % 256, 100, 50))


def test_inline_images_are_skipped_not_fetched(hostile):
    url = hostile.url("img/7.png")
    before = hostile.hits["/img/7.png"]
    table = _candidates([url, None], images=[PNG, PNG])
    out = _gather(table, _cfg()).table
    assert out.column("status").to_pylist() == [SKIPPED, SKIPPED]
    assert out.column("image").to_pylist() == [PNG, PNG]
    assert hostile.hits["/img/7.png"] == before


def test_hostile_urls_are_dropped_with_reasons(hostile):
    cases = {
        "file:///etc/passwd": "bad_scheme",
        "ftp://example.com/a.png": "bad_scheme",
        "data:image/png;base64,iVBORw0KGgo=": "bad_scheme",
        "http://10.0.0.1/a.png": "private_address",
        "http://169.254.169.254/latest/meta-data/": "private_address",
        "http://[::ffff:10.0.0.1]/a.png": "private_address",
        "http:///no-host": "invalid_url",
        hostile.url("missing.png"): "http_404",
        hostile.url("loop/a"): "redirect_loop",
        hostile.url("chain/0"): "too_many_redirects",
        hostile.url("slow"): "timeout",
        hostile.url("drip"): "timeout",
        hostile.url("huge"): "too_large",
        hostile.url("huge-declared"): "too_large",
        hostile.url("noai"): "noai",
        hostile.url("agent-noimageai"): "noai",
        hostile.url("to-private"): "private_address",
        hostile.url("to-file"): "bad_scheme",
    }
    urls = list(cases) + [hostile.url("to-image")]
    result = _gather(_candidates(urls), _cfg())
    assert _reasons(result) == cases
    assert result.table.column("url").to_pylist() == [hostile.url("to-image")]
    assert result.table.column("image").to_pylist() == [hostile_file(hostile, hostile.url("img/0.png"))]
    statuses = dict(zip(_failures(result).column("url").to_pylist(), _failures(result).column("status").to_pylist()))
    assert statuses[hostile.url("slow")] == FAILED_TRANSIENT
    assert statuses[hostile.url("missing.png")] == FAILED_PERMANENT
    assert statuses["file:///etc/passwd"] == FAILED_PERMANENT
    for error, reason in zip(_failures(result).column("error").to_pylist(), _failures(result).column("reason").to_pylist()):
        assert error.startswith(reason + ": ")
    assert _failures(result).column("image").null_count == _failures(result).num_rows
    stage = result.funnel.to_dict()["stages"][0]
    assert stage["in"] == len(urls) and stage["out"] == 1
    assert sum(stage["dropped"].values()) == len(cases)
    # Neither a timeout nor a 4xx is retried in-run.
    assert hostile.hostile.requests["/slow"] == 1
    assert hostile.hits["/missing.png"] == 1


def test_429_is_retried_then_ok(hostile):
    result = _gather(_candidates([hostile.url("429-then-ok")]), _cfg())
    assert result.table.column("status").to_pylist() == [OK]
    assert result.table.column("image").to_pylist() == [PNG]
    assert hostile.hostile.requests["/429-then-ok"] == 2


def test_500_is_retried_then_fails_transiently(hostile):
    before = hostile.hostile.requests["/500"]
    result = _gather(_candidates([hostile.url("500")]), _cfg(retries=2))
    assert result.table.num_rows == 0
    assert _failures(result).column("status").to_pylist() == [FAILED_TRANSIENT]
    assert _failures(result).column("reason").to_pylist() == ["http_500"]
    assert hostile.hostile.requests["/500"] - before == 3


def test_connection_refused_is_transient():
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/a.png"
        result = _gather(_candidates([url]), _cfg(retries=1))
    assert _failures(result).column("reason").to_pylist() == ["connection_error"]
    assert _failures(result).column("status").to_pylist() == [FAILED_TRANSIENT]


def test_noai_can_be_switched_off(hostile):
    out = _gather(_candidates([hostile.url("noai")]), _cfg(honour_noai=False)).table
    assert out.column("image").to_pylist() == [PNG]


def test_duplicate_urls_are_fetched_once(hostile):
    url = hostile.url("img/3.png")
    before = hostile.hits["/img/3.png"]
    result = _gather(_candidates([url, url, hostile.url("img/4.png"), url]), _cfg())
    assert result.table.column("sample_id").to_pylist() == ["s0", "s2"]
    assert _failures(result).column("sample_id").to_pylist() == ["s1", "s3"]
    assert _failures(result).column("reason").to_pylist() == ["duplicate_url", "duplicate_url"]
    assert _failures(result).column("status").to_pylist() == [SKIPPED, SKIPPED]
    assert hostile.hits["/img/3.png"] - before == 1


def test_loopback_refused_by_default_before_any_request(hostile):
    before = sum(hostile.hits.values())
    port = hostile.port
    urls = [f"http://127.0.0.1:{port}/img/0.png", f"http://localhost:{port}/img/1.png", None]
    result = _gather(_candidates(urls), GatherConfig(retries=0))
    assert _failures(result).column("reason").to_pylist() == ["private_address", "private_address", "no_url"]
    assert "localhost resolves to 127.0.0.1 is loopback" in _failures(result).column("error")[1].as_py()
    assert sum(hostile.hits.values()) == before


def test_allowing_loopback_does_not_allow_private_networks():
    assert AddressPolicy(allow_loopback=True).refusal("127.0.0.1") is None
    assert AddressPolicy(allow_loopback=True).refusal("10.1.2.3") == "10.1.2.3 is private"
    policy = AddressPolicy()
    for address in ("127.0.0.1", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                    "fe80::1", "224.0.0.1", "0.0.0.0", "100.64.0.1", "240.0.0.1", "fc00::1",
                    "::ffff:192.168.0.1", "64:ff9b::a00:1", "2002:a00:1::"):
        assert policy.refusal(address) is not None, address
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert policy.refusal(address) is None, address
    assert AddressPolicy(allow_private=True).refusal("10.0.0.1") is None


class _FixedAnswers(AbstractResolver):
    """A stand-in for DNS (a mock: no real name server can be made to answer this here)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
                for a in self.answers]

    async def close(self) -> None:
        return None


def test_every_resolved_address_is_checked():
    async def resolve(answers: list[str]):
        return await CheckedResolver(AddressPolicy(), _FixedAnswers(answers)).resolve("example.test", 80)

    assert [r["host"] for r in asyncio.run(resolve(["93.184.215.14"]))] == ["93.184.215.14"]
    with pytest.raises(OSError, match="10.0.0.1 is private"):
        asyncio.run(resolve(["93.184.215.14", "10.0.0.1"]))  # one bad answer refuses the host


def test_rebinding_name_is_refused_without_connecting():
    # The connector's resolver answers 10.0.0.1 for a name: the fetch fails before any socket opens.
    cfg = _cfg(allow_loopback=True, retries=0)
    outcomes = asyncio.run(fetch_urls([(0, "http://rebind.test/a.png")], cfg, _FixedAnswers(["10.0.0.1"])))
    assert (outcomes[0].status, outcomes[0].reason) == (FAILED_PERMANENT, "private_address")


class _RecordingResolver(_FixedAnswers):
    """Records every name it is asked for and answers none (a mock of DNS: nothing is connected to)."""

    def __init__(self) -> None:
        super().__init__([])
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        raise OSError(f"{host}: no name server in this test")


def test_malformed_host_names_are_permanent_invalid_url_without_a_lookup():
    bad = ["http://bad host/a.png", "http://exa%20mple.com/a.png", "http://a<b>.example/a.png",
           "http://a..b.example/a.png", f"http://{'a' * 64}.example/a.png", "http://-a.example/a.png"]
    resolver = _RecordingResolver()
    cfg = _cfg(retries=0)
    outcomes = asyncio.run(fetch_urls(list(enumerate(bad)), cfg, resolver))
    assert [(outcomes[i].status, outcomes[i].reason) for i in range(len(bad))] == \
        [(FAILED_PERMANENT, "invalid_url")] * len(bad)
    assert resolver.asked == []  # refused before any DNS lookup: a rerun never retries them
    # Real names pass the check (and reach the resolver): underscores and IDNA included.
    good = ["http://under_score.example/a.png", "http://bücher.example/a.png"]
    asyncio.run(fetch_urls(list(enumerate(good)), cfg, resolver))
    assert resolver.asked == ["under_score.example", "xn--bcher-kva.example"]


def test_retry_failed_fetches_only_transient_failures(hostile):
    urls = [hostile.url("503-once/a"), hostile.url("missing-2.png"), hostile.url("img/5.png")]
    first = _gather(_candidates(urls), _cfg(retries=0))
    assert first.table.column("sample_id").to_pylist() == ["s2"]
    assert _failures(first).column("status").to_pylist() == [FAILED_TRANSIENT, FAILED_PERMANENT]
    hits_404 = hostile.hits["/missing-2.png"]

    second = retry_transient(_failures(first), _cfg(retries=0), KEEP)
    assert second.table.column("sample_id").to_pylist() == ["s0"]
    assert second.table.column("status").to_pylist() == [OK]
    assert second.table.column("image").to_pylist() == [PNG]
    assert _failures(second).column("sample_id").to_pylist() == ["s1"]
    assert _failures(second).column("reason").to_pylist() == ["http_404"]
    assert hostile.hits["/missing-2.png"] == hits_404  # permanent failures are not asked again
    stage = second.funnel.to_dict()["stages"][0]
    assert (stage["stage"], stage["in"], stage["out"]) == ("gather_retry", 1, 1)


def test_gather_inside_a_running_event_loop(hostile):
    async def from_async_code():
        return _gather(_candidates([hostile.url("img/6.png")]), _cfg())

    out = asyncio.run(from_async_code()).table
    assert out.column("status").to_pylist() == [OK]


def test_html_served_as_image_is_fetched_then_dropped_by_images(hostile):
    result = _gather(_candidates([hostile.url("html.jpg"), hostile.url("img/1.png")]), _cfg())
    stages = {s["stage"]: s for s in result.funnel.to_dict()["stages"]}
    assert stages["gather"]["out"] == 2  # gathering does not judge payloads
    assert result.table.column("sample_id").to_pylist() == ["s1"]
    assert stages["images"]["dropped"] == {"not_image": 1}
    assert _failures(result).column("status").to_pylist() == [FAILED_PERMANENT]


def test_gather_images_fuses_fetching_and_image_processing(hostile):
    big = _png((10, 20, 30), size=(300, 200))
    urls = [hostile.url("img/2.png"), hostile.url("html.jpg"), hostile.url("missing-3.png"),
            hostile.url("503-once/c"), None]
    table = _candidates(urls, images=[None, None, None, None, big])
    image_cfg = ImageConfig(resize_longest_side=30, encode_format="PNG")
    result = gather_images(table, _cfg(retries=0), image_cfg, image_threads=2)
    assert result.table.column("sample_id").to_pylist() == ["s0", "s4"]
    assert result.table.column("status").to_pylist() == [OK, SKIPPED]
    assert list(zip(result.table["width"].to_pylist(), result.table["height"].to_pylist())) == [(30, 22), (30, 20)]
    assert all(Image.open(io.BytesIO(b)).size[0] == 30 for b in result.table["image"].to_pylist())
    stages = {s["stage"]: s for s in result.funnel.to_dict()["stages"]}
    assert (stages["gather"]["in"], stages["gather"]["out"]) == (5, 3)
    assert stages["gather"]["dropped"] == {"http_404": 1, "http_503": 1}
    assert (stages["images"]["in"], stages["images"]["out"], stages["images"]["dropped"]) == (3, 2, {"not_image": 1})
    reasons = dict(zip(_failures(result)["sample_id"].to_pylist(), _failures(result)["reason"].to_pylist()))
    assert reasons == {"s1": "not_image", "s2": "http_404", "s3": "http_503"}

    again = retry_transient(_failures(result), _cfg(retries=0), image_cfg)
    assert again.table.column("sample_id").to_pylist() == ["s3"]  # only the transient failure is fetched again
    assert sorted(_failures(again)["reason"].to_pylist()) == ["http_404", "not_image"]
    assert [s["stage"] for s in again.funnel.to_dict()["stages"]] == ["gather_retry", "images_retry"]


def test_serves_the_bundled_sample_end_to_end(sample_parquet):
    originals = pq.read_table(sample_parquet, columns=["image"]).column("image").to_pylist()[:20]
    with serve_parquet(sample_parquet, in_subprocess=True) as server:
        out = _gather(_candidates(server.urls[:20]), _cfg(total_timeout_s=10.0, read_timeout_s=5.0)).table
    assert out.column("image").to_pylist() == originals


def test_serve_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(PNG)
    with serve_directory(tmp_path) as server:
        assert server.paths == ["sub/a.png"]
        out = _gather(_candidates(server.urls), _cfg()).table
    assert out.column("image").to_pylist() == [PNG]
    with pytest.raises(NotADirectoryError):
        with serve_directory(tmp_path / "sub" / "a.png"):
            pass


def test_demo_path_serves_inline_images_for_fetching(sample_parquet):
    sample = pq.read_table(sample_parquet, columns=["image"]).column("image").to_pylist()[:12]
    table = _candidates([None] * 12, images=sample)
    with serve_table_images(table) as (server, to_fetch):
        assert to_fetch.column("image").null_count == 12
        assert all(u.startswith(server.base_url) for u in to_fetch.column("url").to_pylist())
        result = gather_images(to_fetch, _cfg(total_timeout_s=10.0, read_timeout_s=5.0),
                               ImageConfig(resize_longest_side=None, encode_format="keep", min_side=1,
                                           max_aspect_ratio=100.0))
    assert result.table.column("status").to_pylist() == [OK] * 12
    assert result.table.column("sample_id").to_pylist() == to_fetch.column("sample_id").to_pylist()


def test_config_rejects_nonsense():
    with pytest.raises(ConfigError):
        GatherConfig(max_bytes=0)
    with pytest.raises(ConfigError):
        GatherConfig(total_timeout_s=0)
