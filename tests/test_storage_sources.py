"""Our data read by the field's tools and read from where the field keeps it: duckdb counts a
build's shards as a user's query engine would."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
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


def _without_credentials(s3_server, monkeypatch):
    """The server's storage settings with no credentials anywhere (config, environment, files)."""
    import dataclasses

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    return dataclasses.replace(s3_server.storage_config(), access_key_id=None, secret_access_key=None)


def test_s3_inputs_without_credentials_name_the_uri(s3_server, monkeypatch):
    from infra.remote import RemoteInputError, open_input

    storage = _without_credentials(s3_server, monkeypatch)
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


# ---- remote sources through the readers (tasks/readers.py) ---------------------------------------
# A remote file's sample ids name it by its URI (`parquet:s3://bucket/k/pairs.parquet#p0`), a local
# one by its path as configured (`parquet:pairs.parquet#p0`): the part after the file is the same.


def _pairs(n: int = 7) -> pa.Table:
    import base64

    from tests.test_readers import png

    return pa.table({"id": [f"p{i}" for i in range(n)], "caption": [f"a photo of thing {i}" for i in range(n)],
                     "url": [f"http://example.com/{i}.jpg" if i % 2 else None for i in range(n)],
                     "image": [base64.b64encode(png((i * 30 % 255, 0, 0))).decode() if i % 2 == 0 else None
                               for i in range(n)]})


def _read(sources, base, storage=None) -> pa.Table:
    from tasks.readers import plan_input_shards, read_input_shard

    shards = plan_input_shards(sources, base, storage)
    assert shards, "no shards planned"
    return pa.concat_tables(read_input_shard(s) for s in shards)


def _same_rows(local: pa.Table, remote: pa.Table, local_file: str, remote_file: str) -> None:
    assert remote.num_rows == local.num_rows > 0
    for name in ("caption", "url", "image", "meta"):
        assert remote.column(name).to_pylist() == local.column(name).to_pylist(), name
    ids = [i.replace(remote_file, local_file, 1) for i in remote.column("sample_id").to_pylist()]
    assert ids == local.column("sample_id").to_pylist()
    assert all(remote_file in i for i in remote.column("sample_id").to_pylist())


def _csv_bytes(table: pa.Table) -> bytes:
    import io

    import pyarrow.csv as pacsv

    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    return buf.getvalue()


def _jsonl_bytes(table: pa.Table) -> bytes:
    import json

    return "".join(json.dumps(r) + "\n" for r in table.to_pylist()).encode()


def test_parquet_and_csv_sources_on_s3_read_as_the_local_files(tmp_path, s3_store):
    import pyarrow.parquet as pq

    from infra.config import SourceConfig

    pairs = _pairs(9)
    binary = pairs.set_column(3, "image", pa.array([None] * 9, pa.binary()))
    pq.write_table(binary, tmp_path / "pairs.parquet", row_group_size=2)
    (tmp_path / "pairs.csv").write_bytes(_csv_bytes(pairs))
    s3_store.write_file("in/pairs.parquet", tmp_path / "pairs.parquet")
    s3_store.write_file("in/pairs.csv", tmp_path / "pairs.csv")
    storage = s3_store.config
    for kind, ext in (("parquet", "parquet"), ("csv", "csv")):
        common = dict(kind=kind, image_column="image", id_column="id", rows_per_input_shard=4)
        local = _read([SourceConfig(path=f"pairs.{ext}", **common)], tmp_path)
        uri = s3_store.uri(f"in/pairs.{ext}")
        remote = _read([SourceConfig(path=uri, **common)], tmp_path, storage)
        _same_rows(local, remote, f"pairs.{ext}", uri)
    # A folder (prefix) of them, listed through the storage layer.
    folder = _read([SourceConfig(kind="csv", path=s3_store.uri("in"), image_column="image", id_column="id")],
                   tmp_path, storage)
    assert folder.num_rows == 9


def test_jsonl_csv_gz_and_webdataset_over_http_and_s3_read_as_the_local_files(tmp_path, s3_store):
    import gzip

    from infra.config import SourceConfig
    from infra.http_server import serve_files
    from tests.test_readers import png

    pairs = _pairs(7)
    files = {"m.jsonl": _jsonl_bytes(pairs), "m.csv.gz": gzip.compress(_csv_bytes(pairs)),
             "shard.tar": _tar_bytes({"a/k1.png": png(), "a/k1.txt": b"one", "a/k2.png": png((0, 9, 0)),
                                      "a/k2.json": b'{"caption": "two", "extra": 1}'})}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    s3_store.write_bytes("tars/shard.tar", files["shard.tar"])
    with serve_files(files) as server:
        for kind, name in (("jsonl", "m.jsonl"), ("csv", "m.csv.gz"), ("webdataset", "shard.tar")):
            common = dict(kind=kind, rows_per_input_shard=3,
                          **({} if kind == "webdataset" else {"image_column": "image", "id_column": "id"}))
            local = _read([SourceConfig(path=name, **common)], tmp_path)
            remote = _read([SourceConfig(path=server.url(name), **common)], tmp_path)
            _same_rows(local, remote, name, server.url(name))
        assert server.hits["/m.jsonl"] >= 2  # planned (offsets) and read by ranges, not from a local copy
    uri = s3_store.uri("tars/shard.tar")
    tar = _read([SourceConfig(kind="webdataset", path=uri)], tmp_path, s3_store.config)
    assert tar.column("caption").to_pylist() == ["one", "two"]
    assert tar.column("sample_id").to_pylist() == [f"webdataset:{uri}#a/k1", f"webdataset:{uri}#a/k2"]


def test_a_missing_remote_source_is_one_line_naming_it_at_plan_time(tmp_path, s3_store):
    from infra.config import SourceConfig
    from infra.http_server import serve_files
    from tasks.readers import ReaderError, check_source, plan_input_shards

    s3_store.write_bytes("d/x.png", b"\x89PNG")
    missing = s3_store.uri("in/nope.parquet")
    with serve_files({}) as server:
        url = server.url("gone.jsonl")
        # A missing key could be a prefix: it is listed, and matches nothing.
        cases = [(SourceConfig(kind="parquet", path=missing), missing, "matches no object"),
                 (SourceConfig(kind="webdataset", path=s3_store.uri("tars/*.tar")), s3_store.uri("tars/*.tar"),
                  "matches no object"),
                 (SourceConfig(kind="jsonl", path=url), url, "no such file"),
                 (SourceConfig(kind="webdataset", path=server.url("gone.tar")), server.url("gone.tar"), "HTTP 404"),
                 (SourceConfig(kind="directory", path=s3_store.uri("d")), s3_store.uri("d"),
                  "remote inputs are not supported for kind 'directory'")]
        for source, uri, why in cases:
            for check in (lambda: plan_input_shards([source], tmp_path, s3_store.config),
                          lambda: check_source(source, tmp_path, s3_store.config)):
                with pytest.raises(ReaderError) as info:
                    check()
                message = str(info.value)
                assert "\n" not in message and uri in message and why in message, message


def test_a_changed_remote_source_gets_a_new_identity(tmp_path, s3_store):
    """The build's fingerprint of its sources takes a remote file's size and ETag (S3) or, from a
    server that sends neither ETag nor Last-Modified, its digest: new bytes are never the old input."""
    from infra.config import SourceConfig
    from infra.http_server import serve_files
    from tasks.build.stages import source_provenance
    from tasks.build.workdir import sources_identity

    s3_store.write_bytes("in/pairs.csv", b"caption,url\na,http://x/1.jpg\n")
    source = SourceConfig(kind="csv", path=s3_store.uri("in/pairs.csv"))
    before = sources_identity([source], str(tmp_path), s3_store.config)
    assert before == sources_identity([source], str(tmp_path), s3_store.config)
    s3_store.write_bytes("in/pairs.csv", b"caption,url\nb,http://x/1.jpg\n")  # same size, new content
    after = sources_identity([source], str(tmp_path), s3_store.config)
    (old,), (new,) = before[0][1], after[0][1]
    assert dict(old)["bytes"] == dict(new)["bytes"] and dict(old)["etag"] != dict(new)["etag"]
    (entry,) = source_provenance([source], str(tmp_path), s3_store.config)[0]["files"]
    assert entry["file"] == source.path and entry["bytes"] == 29 and entry["etag"]
    files = {"m.csv": b"caption,url\na,http://x/1.jpg\n"}
    with serve_files(files) as server:
        http = SourceConfig(kind="csv", path=server.url("m.csv"))
        first = sources_identity([http], str(tmp_path))
        files["m.csv"] = b"caption,url\nb,http://x/1.jpg\n"
        with serve_files(files) as changed:
            moved = SourceConfig(kind="csv", path=changed.url("m.csv"))
            second = sources_identity([moved], str(tmp_path))
        (old,), (new,) = first[0][1], second[0][1]  # this server sends no ETag: the content's digest
        assert dict(old)["bytes"] == dict(new)["bytes"] and dict(old)["sha256"] != dict(new)["sha256"]


def test_preflight_checks_remote_sources_with_the_storage_settings(tmp_path, s3_store):
    import dataclasses

    from flows.preflight import PreflightError, check_sources
    from infra.config import config_from_dict

    s3_store.write_bytes("in/pairs.csv", b"caption,url\na,http://x/1.jpg\n")
    storage = s3_store.config
    base = {"name": "remote-sources", "output": str(tmp_path / "out"),
            "storage": {"endpoint_url": storage.endpoint_url, "access_key_id": storage.access_key_id.reveal(),
                        "secret_access_key": storage.secret_access_key.reveal()}}
    ok = config_from_dict({**base, "sources": [{"kind": "csv", "path": s3_store.uri("in/pairs.csv")}]})
    check_sources(ok, tmp_path)
    bad = dataclasses.replace(ok, sources=(dataclasses.replace(ok.sources[0], path=s3_store.uri("in/nope.csv")),))
    with pytest.raises(PreflightError, match=r"sources\.0: .*in/nope\.csv: matches no object"):
        check_sources(bad, tmp_path)


def _build_rows(source, base, storage, root: str, queries) -> tuple[int, list[str]]:
    """A small build, stage by stage as flows/dataset.py runs them (the read on Ray workers, which
    open s3:// with the storage config the planned shards carry); its output rows and sample ids."""
    from infra.config import BalanceConfig, DedupConfig, GatherConfig, ImageConfig, ShardConfig, TextFilterConfig
    from tasks.build import stages

    shards = stages.plan_inputs([source], str(base), storage)
    filtered = stages.filter_stage(shards, dataset_root=root, storage=storage, sources=[source], base_dir=str(base),
                                   text_filter=TextFilterConfig(), queries=queries, use_ray=True)
    stages.count_queries(filtered, queries.rows, BalanceConfig(max_per_query=10), use_ray=False)
    dedup = DedupConfig(against_eval=False)
    clean = stages.clean_stage(filtered, balance=BalanceConfig(max_per_query=10), gather=GatherConfig(),
                               images=ImageConfig(), dedup=dedup, index=None, use_ray=False)
    within = stages.within_dataset(clean, dedup, holdout_rows=0, use_ray=False)
    written = stages.write_output(clean, within, dataset_root=root, shards=ShardConfig(rows_per_shard=20),
                                  use_ray=False)
    ids = sorted(i for w in written.shards for i in pq.read_table(w["path"] if w["path"].startswith("/") else
                                                                  f"{root}/{w['path']}", columns=["sample_id"])
                 .column("sample_id").to_pylist())
    return sum(w["rows"] for w in written.shards), ids


def test_a_build_from_the_bundled_sample_on_s3_equals_the_local_build(tmp_path, s3_store, sample_parquet, ray_local):
    import pyarrow.compute as pc

    from infra.config import SourceConfig
    from tasks.build import stages

    words = ["icon", "card", "symbol", "map", "arrow", "book", "flag", "house", "heart", "tree", "cat", "dog"]
    sample = pq.read_table(sample_parquet)
    matching = pc.match_substring_regex(pc.utf8_lower(sample.column("title")), r"\b(" + "|".join(words) + r")\b")
    rows = sample.filter(matching).slice(0, 80)
    pq.write_table(rows, tmp_path / "tiny.parquet", row_group_size=16)
    s3_store.write_file("sources/tiny.parquet", tmp_path / "tiny.parquet")
    n = len(words)
    pq.write_table(pa.table({"query_id": pa.array(range(n), pa.int32()), "query": words, "source": ["unigram"] * n,
                             "count": pa.array([1] * n, pa.int64()), "pmi": pa.nulls(n, pa.float64()),
                             "views": pa.nulls(n, pa.int64())}), tmp_path / "queries.parquet")
    queries = stages.find_query_list(str(tmp_path), s3_store.config)
    storage = s3_store.config
    local = SourceConfig(kind="openclipart", path="tiny.parquet", rows_per_input_shard=30)
    remote = SourceConfig(kind="openclipart", path=s3_store.uri("sources/tiny.parquet"), rows_per_input_shard=30)
    local_rows, local_ids = _build_rows(local, tmp_path, storage, str(tmp_path / "local"), queries)
    remote_rows, remote_ids = _build_rows(remote, tmp_path, storage, str(tmp_path / "remote"), queries)
    assert remote_rows == local_rows > 0 and remote_ids == local_ids
    # The manifest's provenance of the remote file: its size, ETag and the table's own licence metadata.
    (local_info,) = stages.source_provenance([local], str(tmp_path), storage)[0]["files"]
    (remote_info,) = stages.source_provenance([remote], str(tmp_path), storage)[0]["files"]
    assert remote_info["bytes"] == local_info["bytes"] and remote_info["etag"] and remote_info["licence"]
    assert {k: v for k, v in remote_info.items() if k not in ("file", "bytes", "etag", "last_modified")} == \
           {k: v for k, v in local_info.items() if k not in ("file", "bytes")}


def test_a_remote_source_without_credentials_fails_the_plan_naming_it(tmp_path, s3_server, monkeypatch):
    from infra.config import SourceConfig
    from tasks.readers import ReaderError, plan_input_shards

    storage = _without_credentials(s3_server, monkeypatch)
    uri = s3_server.uri("pairs/part-0.parquet")
    with pytest.raises(ReaderError, match=f"source parquet:{uri}: .*{uri} failed: no S3 credentials"):
        plan_input_shards([SourceConfig(kind="parquet", path=uri)], tmp_path, storage)


def test_a_remote_shard_carries_its_storage_unprinted_and_refuses_a_changed_file(tmp_path, s3_store):
    import pickle

    from infra.config import SourceConfig
    from tasks.readers import ReaderError, plan_input_shards, read_input_shard

    s3_store.write_bytes("in/pairs.csv", b"caption,url\na,http://x/1.jpg\nb,http://x/2.jpg\n")
    uri = s3_store.uri("in/pairs.csv")
    (shard,) = plan_input_shards([SourceConfig(kind="csv", path=uri)], tmp_path, s3_store.config)
    secret = s3_store.config.secret_access_key.reveal()
    assert secret not in repr(shard) and secret not in str(shard)
    on_worker = pickle.loads(pickle.dumps(shard))  # as Ray ships it
    assert on_worker.storage.secret_access_key.reveal() == secret
    assert read_input_shard(on_worker).column("caption").to_pylist() == ["a", "b"]
    s3_store.write_bytes("in/pairs.csv", b"caption,url\nc,http://x/1.jpg\nd,http://x/2.jpg\n")
    with pytest.raises(ReaderError, match=f"{uri}: changed since the build planned it"):
        read_input_shard(on_worker)


def test_a_changed_file_in_a_local_folder_source_gets_a_new_identity(tmp_path):
    import os

    from infra.config import SourceConfig
    from tasks.build.workdir import sources_identity

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    (folder / "cat.txt").write_text("a cat")
    (folder / "cat.png").write_bytes(b"png")
    source = SourceConfig(kind="directory", path=str(tmp_path / "images"))
    before = sources_identity([source], str(tmp_path))
    assert [f for f, _, _ in before[0][1]] == [str(folder / "cat.png"), str(folder / "cat.txt")]
    (folder / "cat.txt").write_text("a black cat")
    os.utime(folder / "cat.txt", (1, 1))
    assert sources_identity([source], str(tmp_path)) != before
    (folder / "dog.txt").write_text("a dog")
    assert len(sources_identity([source], str(tmp_path))[0][1]) == 3
