"""Our data read by the field's tools and read from where the field keeps it: duckdb counts a
build's shards as a user's query engine would."""

from __future__ import annotations

import pyarrow as pa
import pytest

from infra.manifest import read_manifest
from tests.trainer_fixtures import sample_pairs, write_dataset


def test_duckdb_counts_the_shards(tmp_path, sample_parquet, monkeypatch):
    import duckdb

    pairs = sample_pairs(sample_parquet, 50)
    pairs = pairs.append_column("query_ids", pa.array([[1, 2]] * 50, pa.list_(pa.int32())))
    manifest = write_dataset(tmp_path / "dataset", pairs, 20)
    monkeypatch.chdir(tmp_path / "dataset")
    con = duckdb.connect()
    (count,) = con.execute("SELECT count(*) FROM 'shards/*.parquet'").fetchone()
    assert count == read_manifest(str(manifest)).num_rows == 50
    # The columns come through typed: captions as text, images as bytes, query ids as a list.
    caption, image, ids = con.execute(
        "SELECT caption, image, query_ids FROM 'shards/*.parquet' ORDER BY sample_id LIMIT 1").fetchone()
    first = min(pairs.to_pylist(), key=lambda r: r["sample_id"])
    assert (caption, bytes(image), ids) == (first["caption"], first["image"], [1, 2])


# ---- inputs wherever a path may point (infra/remote.py) -------------------------------------------


def _parquet_bytes(rows: int) -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"caption": [f"caption {i}" for i in range(rows)], "n": list(range(rows))}), buf,
                   row_group_size=100)
    return buf.getvalue()


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_s3_inputs_open_seek_and_list_through_the_storage_layer(s3_store):
    import tarfile

    import pyarrow.parquet as pq

    from infra.remote import expand_inputs, open_input

    s3_store.write_bytes("pairs/part-0.parquet", _parquet_bytes(1000))
    s3_store.write_bytes("pairs/part-1.parquet", _parquet_bytes(10))
    s3_store.write_bytes("pairs/_SUCCESS", b"")
    s3_store.write_bytes("tars/00000.tar", _tar_bytes({"a/k1.txt": b"one", "a/k1.png": b"\x89PNG"}))
    storage = s3_store.config
    with open_input(s3_store.uri("pairs/part-0.parquet"), storage) as f:
        parquet = pq.ParquetFile(f)
        assert parquet.metadata.num_rows == 1000 and parquet.read_row_group(3).column("n")[0].as_py() == 300
    with open_input(s3_store.uri("tars/00000.tar"), storage) as f, tarfile.open(fileobj=f) as tar:
        assert tar.extractfile("a/k1.txt").read() == b"one"
    parts = [s3_store.uri("pairs/part-0.parquet"), s3_store.uri("pairs/part-1.parquet")]
    assert expand_inputs(s3_store.uri("pairs"), storage, (".parquet",)) == parts  # a folder (prefix)
    assert expand_inputs(s3_store.uri("pairs/*.parquet"), storage) == parts  # a glob
    assert expand_inputs(s3_store.uri("pairs/part-{0..1}.parquet"), storage) == parts  # a brace list
    with pytest.raises(FileNotFoundError, match=f"{s3_store.uri('pairs/nope.parquet')}: no such object"):
        open_input(s3_store.uri("pairs/nope.parquet"), storage)
    with pytest.raises(FileNotFoundError, match="matches no object"):
        expand_inputs(s3_store.uri("elsewhere/*.tar"), storage)


def test_s3_inputs_without_credentials_name_the_uri(s3_server, monkeypatch):
    import dataclasses

    from infra.remote import RemoteInputError, open_input

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    storage = dataclasses.replace(s3_server.storage_config(), access_key_id=None, secret_access_key=None)
    uri = s3_server.uri("pairs/part-0.parquet")
    with pytest.raises(RemoteInputError, match=f"{uri} failed: no S3 credentials"):
        open_input(uri, storage)


def test_http_inputs_read_in_byte_ranges():
    import pyarrow.parquet as pq

    from infra.http_server import serve_files
    from infra.remote import expand_inputs, open_input

    data = _parquet_bytes(5000)
    with serve_files({"data/part-0.parquet": data, "data/part-1.parquet": _parquet_bytes(3)}) as server:
        url = server.url("data/part-0.parquet")
        with open_input(url) as f:
            f.seek(len(data) - 8)
            assert f.read(8) == data[-8:]  # the footer, without reading the file
            f.seek(0)
            assert f.read(4) == b"PAR1"
        with open_input(url) as f:
            assert pq.ParquetFile(f).read().num_rows == 5000
        assert server.hits["/data/part-0.parquet"] >= 3  # HEAD + ranges, not one whole download
        assert expand_inputs(server.url("data/part-{0..1}.parquet")) == [url, server.url("data/part-1.parquet")]


def test_http_inputs_from_a_server_without_ranges_are_downloaded_once():
    from aiohttp import web

    from infra.http_server import serve_files
    from infra.remote import RemoteInputError, open_input

    data = _parquet_bytes(200)

    async def plain(request: web.Request) -> web.Response:  # ignores Range, like many simple servers
        return web.Response(body=data)

    async def broken(request: web.Request) -> web.Response:
        raise web.HTTPForbidden()

    routes = [web.get("/plain/part.parquet", plain), web.get("/forbidden/part.parquet", broken)]
    with serve_files({}, routes=routes) as server:
        with open_input(server.url("plain/part.parquet")) as f:
            f.seek(4)
            assert f.read() == data[4:]
        with pytest.raises(FileNotFoundError, match=f"{server.url('missing.parquet')}: no such file"):
            open_input(server.url("missing.parquet"))
        with pytest.raises(RemoteInputError, match=f"{server.url('forbidden/part.parquet')}: HTTP 403"):
            open_input(server.url("forbidden/part.parquet"))
