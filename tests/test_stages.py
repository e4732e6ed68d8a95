"""Per-shard stage runners: completion records, and the rerun mode that fetches again only the
samples that failed transiently."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from aiohttp import web
from PIL import Image

from infra.config import BalanceConfig, DedupConfig, GatherConfig, ImageConfig, StorageConfig
from infra.http_server import serve_files
from infra.storage import ObjectStore
from tasks.stages import clean_shard, write_query_counts


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def flaky_server():
    """Serves ok/<i>.png always, and flaky/<i>.png with 503 until `state["up"]` is set."""
    state = {"up": False}
    files = {f"ok/{i}.png": png(i) for i in range(6)}
    flaky = {f"{i}.png": png(100 + i) for i in range(4)}

    async def flaky_route(request: web.Request) -> web.Response:
        if not state["up"]:
            return web.Response(status=503, text="try later")
        return web.Response(body=flaky[request.match_info["name"]], content_type="image/png")

    with serve_files(files, routes=[web.get("/flaky/{name}", flaky_route)]) as server:
        yield server, state, len(files), len(flaky)


def test_retry_failed_fetches_only_transient_failures(tmp_path, flaky_server):
    server, state, n_ok, n_flaky = flaky_server
    urls = [server.url(f"ok/{i}.png") for i in range(n_ok)] + [server.url(f"flaky/{i}.png") for i in range(n_flaky)]
    urls.append(server.url("missing.png"))  # a 404: permanent, never retried
    n = len(urls)
    filtered = pa.table({"sample_id": [f"t:{i:02d}" for i in range(n)], "source": ["t"] * n,
                         "caption": [f"a photo of thing {i}" for i in range(n)], "url": urls,
                         "image": pa.nulls(n, pa.binary()), "meta": pa.nulls(n, pa.string()),
                         "query_ids": [[i % 3] for i in range(n)]})
    storage = StorageConfig()
    filter_root, work_root = str(tmp_path / "f"), str(tmp_path / "f" / "c")
    ObjectStore(filter_root).write_parquet("filtered/s0-00000.parquet", filtered)
    write_query_counts(filter_root, storage, [{"query_ids": [0, 1, 2], "query_counts": [4, 4, 3]}], 3)
    args = ("s0-00000", filter_root, work_root, storage, BalanceConfig(max_per_query=100),
            GatherConfig(allow_loopback=True, retries=0), ImageConfig(resize_longest_side=None, encode_format="PNG"),
            DedupConfig(against_eval=False), None, None)

    first = clean_shard(*args)
    assert first["rows"] == n_ok and first["transient_failures"] == n_flaky
    work = ObjectStore(work_root)
    assert work.read_parquet("failed/s0-00000.parquet").num_rows == n_flaky + 1
    ok_hits = sum(server.hits[f"/ok/{i}.png"] for i in range(n_ok))

    state["up"] = True
    assert clean_shard(*args) == first  # a plain rerun resumes: nothing fetched again
    retried = clean_shard(*args, retry_failed=True)
    assert retried["rows"] == n_ok + n_flaky and retried["transient_failures"] == 0
    assert sum(server.hits[f"/ok/{i}.png"] for i in range(n_ok)) == ok_hits  # only the failures were fetched
    assert server.hits["/missing.png"] == 1  # the permanent failure is carried over, not retried
    clean = work.read_parquet("clean/s0-00000.parquet")
    assert sorted(clean.column("sample_id").to_pylist()) == [f"t:{i:02d}" for i in range(n_ok + n_flaky)]
    left = work.read_parquet("failed/s0-00000.parquet")
    assert left.column("sample_id").to_pylist() == [f"t:{n - 1:02d}"]
    stages = {s["stage"] for s in retried["funnel"]["stages"]}
    assert {"balance", "gather", "images"} <= stages and any("retry" in s for s in stages)
