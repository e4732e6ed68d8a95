"""ObjectStore against local paths and a real SeaweedFS S3 server on loopback, fault paths included.

Faults come from a small HTTP proxy on loopback in front of the real server: it answers chosen
requests with 5xx/429/SlowDown/403, drops connections, or runs a hook (killing the server) — the
only way to make a healthy local server misbehave on cue. Everything behind it is real.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from infra.config import StorageConfig
from infra.s3server import S3ServerInfo, SeaweedS3Server, find_weed
from infra.storage import ObjectStore, StorageError

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Fault-injecting proxy
# --------------------------------------------------------------------------------------------


@dataclass
class _Rule:
    kind: str  # "status": answer with an S3 error; "drop": close the connection without an answer
    remaining: int
    match: str | None = None  # substring of "METHOD /path?query"; None matches every request
    status: int = 503
    code: str = "SlowDown"
    before: Callable[[], None] | None = None


class FaultProxy:
    """Forwards HTTP to an upstream S3 server; rules inject faults into matching requests."""

    def __init__(self, upstream_url: str) -> None:
        host_port = upstream_url.split("://", 1)[1]
        self.upstream_host, port = host_port.rsplit(":", 1)
        self.upstream_port = int(port)
        self.requests: list[str] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, times: int, status: int = 503, code: str = "SlowDown", match: str | None = None) -> None:
        self._rules.append(_Rule("status", times, match, status, code))

    def drop(self, times: int, match: str | None = None, before: Callable[[], None] | None = None) -> None:
        self._rules.append(_Rule("drop", times, match, before=before))

    def take_rule(self, line: str) -> _Rule | None:
        with self._lock:
            self.requests.append(line)
            for rule in self._rules:
                if rule.remaining > 0 and (rule.match is None or rule.match in line):
                    rule.remaining -= 1
                    return rule
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.close_connection = True
        rule = proxy.take_rule(f"{self.command} {self.path}")
        if rule is not None and rule.before is not None:
            rule.before()
        if rule is not None and rule.kind == "drop":
            return
        if rule is not None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                   f"<Message>injected</Message></Error>").encode()
            self._reply(rule.status, [("Content-Type", "application/xml")], xml)
            return
        try:
            # Host is forwarded verbatim: the SigV4 signature covers it.
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() != "connection":
                    conn.putheader(name, value)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
            conn.close()
        except OSError:
            return  # upstream gone: drop the client's connection, as a dead server would
        self._reply(resp.status, headers, data, keep_length=self.command == "HEAD")

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, keep_length: bool = False) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if keep_length or name.lower() != "content-length":
                self.send_header(name, value)
        if not keep_length:
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture
def proxy(s3_server: S3ServerInfo) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_server.endpoint_url)
    yield p
    p.close()


def _proxied_store(s3_store: ObjectStore, proxy: FaultProxy, retries: int = 2) -> ObjectStore:
    """The same bucket/prefix as ``s3_store``, reached through ``proxy``."""
    cfg = StorageConfig(endpoint_url=proxy.url, region="us-east-1", access_key_id=s3_store.config.access_key_id,
                        secret_access_key=s3_store.config.secret_access_key, retries=retries, backoff_s=0.001,
                        multipart_threshold_mb=5)
    return ObjectStore(s3_store.root, cfg)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------------------------
# Every backend: plain path, file:// URI, s3://
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["path", "file-uri", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "path":
        return ObjectStore(str(tmp_path / "root"))
    if request.param == "file-uri":
        return ObjectStore((tmp_path / "root with space").as_uri())
    return request.getfixturevalue("s3_store")


def test_round_trip_bytes_text_json(store: ObjectStore) -> None:
    payload = bytes(range(256)) * 10
    store.write_bytes("a/b/blob.bin", payload)
    assert store.read_bytes("a/b/blob.bin") == payload
    store.write_text("note.txt", "héllo wörld ✓")
    assert store.read_text("note.txt") == "héllo wörld ✓"
    obj = {"rows": 3, "shards": [{"path": "shards/part-00000.parquet", "sha256": "ab"}], "name": "ünï"}
    store.write_json("manifest.json", obj)
    assert store.read_json("manifest.json") == obj
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""
    store.write_bytes("a/b/blob.bin", b"v2")  # overwrite replaces the whole object
    assert store.read_bytes("a/b/blob.bin") == b"v2"


def test_parquet_round_trip(store: ObjectStore) -> None:
    table = pa.table({"id": ["x", "y", "z"], "n": pa.array([1, 2, 3], pa.int32()),
                      "image": [b"\x89PNG", b"", None], "tags": [["a"], [], ["b", "c"]]})
    store.write_parquet("shards/part-00000.parquet", table, compression="zstd", row_group_size=2)
    back = store.read_parquet("shards/part-00000.parquet")
    assert back.equals(table)
    assert store.read_parquet("shards/part-00000.parquet", columns=["n"]).column_names == ["n"]


def test_list_exists_delete(store: ObjectStore) -> None:
    assert store.list() == []
    for key in ["shards/part-00001.parquet", "shards/part-00000.parquet", "manifest.json", "shards_stats/x.json"]:
        store.write_bytes(key, b"1")
    assert store.list() == ["manifest.json", "shards/part-00000.parquet", "shards/part-00001.parquet",
                            "shards_stats/x.json"]
    assert store.list("shards/") == ["shards/part-00000.parquet", "shards/part-00001.parquet"]
    assert store.list("shards") == ["shards/part-00000.parquet", "shards/part-00001.parquet", "shards_stats/x.json"]
    assert store.list("shards/part-00001") == ["shards/part-00001.parquet"]
    assert store.list("nothing/") == []
    assert store.exists("manifest.json") and not store.exists("manifest.jso") and not store.exists("shards")
    store.delete("manifest.json")
    assert not store.exists("manifest.json")
    store.delete("manifest.json")  # deleting a missing key is fine
    assert store.list() == ["shards/part-00000.parquet", "shards/part-00001.parquet", "shards_stats/x.json"]


def test_missing_key_errors_name_the_uri(store: ObjectStore) -> None:
    for read in (store.read_bytes, store.read_json, store.read_parquet):
        with pytest.raises(FileNotFoundError, match=re.escape(store.uri("no/such.key"))):
            read("no/such.key")


def test_bad_json_is_a_clear_error(store: ObjectStore) -> None:
    store.write_text("broken.json", "{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        store.read_json("broken.json")


def test_child_uri_and_streaming_filesystem(store: ObjectStore) -> None:
    child = store.child("dataset/")
    assert child.uri("shards/p.parquet") == store.uri("dataset/shards/p.parquet")
    for i in range(2):
        child.write_parquet(f"shards/part-{i:05d}.parquet", pa.table({"i": [i] * (i + 2)}))
    assert store.list("dataset/") == ["dataset/shards/part-00000.parquet", "dataset/shards/part-00001.parquet"]
    paths = [child.fs_path(k) for k in child.list("shards/")]
    dataset = pads.dataset(paths, filesystem=child.filesystem, format="parquet")
    assert sorted(dataset.to_table()["i"].to_pylist()) == [0, 0, 1, 1, 1]
    with child.filesystem.open_input_stream(child.fs_path("shards/part-00001.parquet")) as f:
        assert f.read(4) == b"PAR1"
    fresh = ObjectStore(child.root, child.config)  # the filesystem first, before any other client
    with fresh.filesystem.open_output_stream(fresh.fs_path("streamed.bin")) as f:
        f.write(b"streamed")
    assert child.read_bytes("streamed.bin") == b"streamed"


def test_invalid_keys_and_roots_are_rejected(tmp_path: Path) -> None:
    store = ObjectStore(str(tmp_path))
    for key in ["", "/abs", "../escape", "a/../../b", "a//b", "./a", "a\\b"]:
        with pytest.raises(ValueError, match="invalid storage key"):
            store.write_bytes(key, b"x")
    with pytest.raises(ValueError, match="invalid storage prefix"):
        store.list("../")
    with pytest.raises(ValueError, match="unsupported scheme 'gs'"):
        ObjectStore("gs://bucket/x")
    with pytest.raises(ValueError, match="expected s3://bucket"):
        ObjectStore("s3:///nobucket")
    with pytest.raises(ValueError, match="must be local"):
        ObjectStore("file://otherhost/x")


def test_roots_are_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = ObjectStore("runs/out")
    assert relative.root == str(tmp_path / "runs" / "out")  # absolute: Ray workers may run elsewhere
    relative.write_text("k", "v")
    assert (tmp_path / "runs" / "out" / "k").read_text() == "v"
    assert ObjectStore((tmp_path / "a b").as_uri()).root == str(tmp_path / "a b")
    s3 = ObjectStore("s3://bucket/some/prefix/")
    assert (s3.bucket, s3.prefix, s3.uri("x.json")) == ("bucket", "some/prefix", "s3://bucket/some/prefix/x.json")
    assert s3.fs_path("x.json") == "bucket/some/prefix/x.json"
    assert ObjectStore("s3://bucket").uri("k") == "s3://bucket/k"


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def test_local_failure_before_rename_keeps_old_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(str(tmp_path))
    store.write_bytes("d/obj", b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        store.write_bytes("d/obj", b"new" * 1000)
    with pytest.raises(OSError, match="disk gone"):
        store.write_json("d/fresh.json", {"a": 1})
    monkeypatch.undo()
    assert store.read_bytes("d/obj") == b"old"
    assert not store.exists("d/fresh.json")
    assert sorted(os.listdir(tmp_path / "d")) == ["obj"]  # temp files cleaned up


def test_local_crash_between_temp_write_and_rename_leaves_no_visible_object(tmp_path: Path, repo_root: Path) -> None:
    script = (
        "import os, sys\n"
        "from infra.storage import ObjectStore\n"
        "os.replace = lambda src, dst: os._exit(9)  # the process dies after the temp write, before the rename\n"
        "ObjectStore(sys.argv[1]).write_bytes('shards/part-00000.parquet', b'x' * 100000)\n"
    )
    store = ObjectStore(str(tmp_path))
    store.write_bytes("shards/part-00000.parquet", b"complete")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=repo_root, capture_output=True)
    assert result.returncode == 9, result.stderr.decode()
    leftovers = [n for n in os.listdir(tmp_path / "shards") if n != "part-00000.parquet"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".part-00000.parquet.tmp-")
    assert os.path.getsize(tmp_path / "shards" / leftovers[0]) == 100000  # the crash came after the full write
    assert store.read_bytes("shards/part-00000.parquet") == b"complete"
    assert store.list() == ["shards/part-00000.parquet"]  # the orphaned temp file is not an object


def test_s3_failed_multipart_upload_is_aborted_and_invisible(s3_store: ObjectStore, proxy: FaultProxy) -> None:
    flaky = _proxied_store(s3_store, proxy, retries=1)
    flaky.write_bytes("shard.bin", b"old")
    proxy.fail(2, status=500, code="InternalError", match="partNumber=2")  # both attempts of part 2
    with pytest.raises(StorageError, match=r"write \(part 2\) s3://.*/shard.bin failed after 2 attempt"):
        flaky.write_bytes("shard.bin", os.urandom(11 * MIB))
    assert any("partNumber=1" in r for r in proxy.requests)  # the upload really was under way
    assert any(r.startswith("DELETE") and "uploadId=" in r for r in proxy.requests)
    assert s3_store.read_bytes("shard.bin") == b"old"  # read directly, not through the proxy
    client = s3_store.s3_client
    pending = client.list_multipart_uploads(Bucket=s3_store.bucket, Prefix=s3_store.prefix).get("Uploads", [])
    assert pending == []
    flaky.write_bytes("new.bin", b"z" * (11 * MIB))  # a healthy multipart upload through the same path
    assert s3_store.read_bytes("new.bin") == b"z" * (11 * MIB)


@pytest.mark.slow
def test_s3_server_killed_mid_upload_leaves_no_partial_object(tmp_path: Path) -> None:
    server = SeaweedS3Server(tmp_path / "seaweedfs", bucket="killme")
    info = server.start()
    proxy = FaultProxy(info.endpoint_url)
    try:
        store = ObjectStore(info.uri("run"), StorageConfig(
            endpoint_url=proxy.url, access_key_id=info.access_key, secret_access_key=info.secret_key,
            retries=2, backoff_s=0.001, multipart_threshold_mb=5))
        store.write_text("before.txt", "written before the crash")
        proxy.drop(1, match="partNumber=2", before=server.kill)
        with pytest.raises(StorageError, match=r"s3://killme/run/shard.bin failed after 3 attempt") as err:
            store.write_bytes("shard.bin", os.urandom(11 * MIB))
        assert info.secret_key not in str(err.value)
        assert any("partNumber=1" in r for r in proxy.requests)
        assert not server.running

        restarted = server.start()  # same data directory, ports and credentials
        direct = ObjectStore(restarted.uri("run"), restarted.storage_config())
        assert direct.read_text("before.txt") == "written before the crash"
        assert not direct.exists("shard.bin")
        assert direct.list() == ["before.txt"]
        with pytest.raises(FileNotFoundError):
            direct.read_bytes("shard.bin")
    finally:
        proxy.close()
        server.stop()
    assert not server.running
    with pytest.raises(ConnectionRefusedError):  # stopped for good: nothing listens on its port
        socket.create_connection(("127.0.0.1", server.ports["s3.port"]), timeout=2).close()


# --------------------------------------------------------------------------------------------
# Retries and errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503-SlowDown", "500-InternalError", "429-TooManyRequests", "drop"])
def test_transient_faults_are_retried(s3_store: ObjectStore, proxy: FaultProxy, fault: str) -> None:
    flaky = _proxied_store(s3_store, proxy, retries=3)

    def inject() -> None:
        if fault == "drop":
            proxy.drop(2)
        else:
            status, code = fault.split("-")
            proxy.fail(2, int(status), code)

    inject()
    flaky.write_bytes("k.bin", b"payload")
    assert len(proxy.requests) == 3  # two faults, then success
    inject()
    assert flaky.read_bytes("k.bin") == b"payload"
    inject()
    assert flaky.list() == ["k.bin"]
    inject()
    assert flaky.exists("k.bin")
    assert len(proxy.requests) == 12


def test_too_many_faults_give_a_clear_error(s3_store: ObjectStore, proxy: FaultProxy) -> None:
    flaky = _proxied_store(s3_store, proxy, retries=2)
    proxy.fail(100, 503, "SlowDown")
    with pytest.raises(StorageError) as err:
        flaky.write_bytes("k.bin", b"payload")
    assert str(err.value) == f"write {s3_store.uri('k.bin')} failed after 3 attempt(s): SlowDown (HTTP 503)"
    assert len(proxy.requests) == 3
    assert not s3_store.exists("k.bin")


def test_connection_refused_gives_a_clear_error_after_retries() -> None:
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{_closed_port()}", region="us-east-1",
                        access_key_id="AKIDREFUSED", secret_access_key="refused-secret", retries=2, backoff_s=0.001)
    store = ObjectStore("s3://bucket/prefix", cfg)
    for op, call in [("write", lambda: store.write_bytes("a.bin", b"x")), ("read", lambda: store.read_bytes("a.bin")),
                     ("exists", lambda: store.exists("a.bin")), ("list", lambda: store.list())]:
        with pytest.raises(StorageError, match=rf"^{op} s3://bucket/prefix/\S* failed after 3 attempt\(s\): "
                                               r"EndpointConnectionError") as err:
            call()
        assert "refused-secret" not in str(err.value) and "AKIDREFUSED" not in str(err.value)


def test_client_errors_are_not_retried(s3_store: ObjectStore, proxy: FaultProxy, s3_server: S3ServerInfo) -> None:
    flaky = _proxied_store(s3_store, proxy, retries=3)
    proxy.fail(1, 403, "AccessDenied")  # a retry would succeed, so only "not retried" passes
    with pytest.raises(StorageError, match=r"^write s3://\S+/k.bin failed: AccessDenied \(HTTP 403\)$"):
        flaky.write_bytes("k.bin", b"x")
    assert len(proxy.requests) == 1
    with pytest.raises(FileNotFoundError):  # 404 is an answer, not a fault
        flaky.read_bytes("missing.bin")
    assert len(proxy.requests) == 2

    wrong = ObjectStore(s3_store.root, StorageConfig(endpoint_url=proxy.url, region="us-east-1",
                                                     access_key_id=s3_server.access_key,
                                                     secret_access_key="not-the-secret", retries=3, backoff_s=0.001))
    with pytest.raises(StorageError, match=r"failed: SignatureDoesNotMatch \(HTTP 403\)$"):
        wrong.write_bytes("k.bin", b"x")
    assert len(proxy.requests) == 3


def test_missing_bucket_is_not_a_missing_key(s3_store: ObjectStore) -> None:
    other = ObjectStore(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", s3_store.config)
    for call in (other.list, lambda: other.read_bytes("k"), lambda: other.delete("k")):
        with pytest.raises(StorageError, match=r"failed: bucket 'no-such-bucket-\w+' does not exist"):
            call()


def test_credentials_never_appear_in_logs_errors_or_reprs(s3_store: ObjectStore, proxy: FaultProxy,
                                                          s3_server: S3ServerInfo,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # botocore's own debug logs included
    flaky = _proxied_store(s3_store, proxy, retries=2)
    proxy.fail(1, 503, "SlowDown")
    flaky.write_bytes("ok.bin", b"x")
    proxy.drop(100)
    with pytest.raises(StorageError) as err:
        flaky.read_bytes("ok.bin")
    retry_logs = [r for r in caplog.records if r.name == "infra.storage" and r.getMessage() == "storage retry"]
    assert len(retry_logs) == 3
    ours = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records
                     if r.name.startswith("infra"))
    shown = [caplog.text, ours, str(err.value), repr(flaky), repr(flaky.config), str(flaky.config), repr(s3_server),
             repr(s3_store)]
    for text in shown:
        assert s3_server.secret_key not in text
    for text in shown[1:]:
        assert s3_server.access_key not in text


def test_credentials_and_endpoint_from_the_aws_environment(s3_store: ObjectStore, s3_server: S3ServerInfo,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    from_env = ObjectStore(s3_store.root)  # no StorageConfig: the standard chain decides
    from_env.write_text("env.txt", "via env")
    assert s3_store.read_text("env.txt") == "via env"
    with from_env.filesystem.open_input_stream(from_env.fs_path("env.txt")) as f:  # pyarrow agrees with boto3
        assert f.read() == b"via env"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
        ObjectStore(s3_store.root, StorageConfig(retries=0)).read_text("env.txt")


# --------------------------------------------------------------------------------------------
# Pickling (Ray workers) and the server helper
# --------------------------------------------------------------------------------------------


def test_stores_of_one_config_share_one_client_per_process(s3_store: ObjectStore, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A job rebuilds its stores (they pickle without clients); a boto3 client costs 65-130 ms to
    make, so every store of one config in a process shares one, and one pyarrow filesystem."""
    clone = pickle.loads(pickle.dumps(s3_store))
    other_root = ObjectStore(s3_store.uri("elsewhere"), s3_store.config)
    assert clone.s3_client is s3_store.s3_client is other_root.s3_client
    assert clone.filesystem is s3_store.filesystem
    clone.write_text("shared.txt", "one client")
    assert s3_store.read_text("shared.txt") == "one client"
    # another config, other credentials in the environment, a local root: never that client
    retried = ObjectStore(s3_store.root, replace(s3_store.config, retries=1))
    assert retried.s3_client is not s3_store.s3_client
    monkeypatch.setenv("AWS_SESSION_TOKEN", "another-session")
    assert ObjectStore(s3_store.root, s3_store.config).s3_client is not s3_store.s3_client
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    local = ObjectStore(str(tmp_path), s3_store.config)
    assert isinstance(local.filesystem, pafs.LocalFileSystem) and not isinstance(s3_store.filesystem, pafs.LocalFileSystem)


def test_store_pickles_without_clients_and_works_in_another_process(s3_store: ObjectStore, repo_root: Path) -> None:
    s3_store.write_text("from-parent.txt", "parent")
    _ = s3_store.filesystem, s3_store.s3_client  # clients built before pickling are not carried over
    blob = pickle.dumps(s3_store)
    clone = pickle.loads(blob)
    assert clone == s3_store and clone._client is None and clone._fs is None
    script = (
        "import pickle, sys\n"
        "store = pickle.loads(sys.stdin.buffer.read())\n"
        "store.write_text('from-child.txt', store.read_text('from-parent.txt') + ' -> child')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], input=blob, cwd=repo_root, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    assert s3_store.read_text("from-child.txt") == "parent -> child"


@pytest.mark.slow
def test_store_works_in_ray_tasks(s3_store: ObjectStore, ray_local) -> None:
    @ray_local.remote
    def write_part(store: ObjectStore, i: int) -> str:
        store.write_parquet(f"parts/part-{i:05d}.parquet", pa.table({"i": [i]}))
        return store.uri(f"parts/part-{i:05d}.parquet")

    uris = ray_local.get([write_part.remote(s3_store, i) for i in range(3)])
    assert uris == [s3_store.uri(f"parts/part-{i:05d}.parquet") for i in range(3)]
    assert [s3_store.read_parquet(k)["i"][0].as_py() for k in s3_store.list("parts/")] == [0, 1, 2]


def test_server_info_and_binary(s3_server: S3ServerInfo) -> None:
    assert os.access(find_weed(), os.X_OK)
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert s3_server.uri("a/b/") == f"s3://{s3_server.bucket}/a/b"
    assert s3_server.secret_key not in repr(s3_server)
    store = ObjectStore(s3_server.uri(f"info-{uuid.uuid4().hex[:8]}"), s3_server.storage_config())
    store.write_text("x", "y")
    assert store.read_text("x") == "y"


# --------------------------------------------------------------------------------------------
# After a kill: the output lease, stale temp files, orphaned multipart uploads (issue 16: 11, 12)
# --------------------------------------------------------------------------------------------

_HOLD_LEASE = """
import sys, time
from infra.config import StorageConfig
from infra.lease import OutputLease
OutputLease.acquire(sys.argv[1], StorageConfig())
print("held", flush=True)
time.sleep(600)
"""


def test_the_lease_refuses_a_second_build_and_passes_to_a_rerun_once_the_holder_is_dead(tmp_path: Path,
                                                                                          repo_root: Path) -> None:
    from infra.lease import LeaseHeld, LeaseLost, OutputLease
    from tasks.build.stages import take_output

    root = str(tmp_path / "dataset")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LEASE, root], cwd=repo_root, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(repo_root)}, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            take_output(root, StorageConfig())
        # What the holder's workers carry: a guard that passes while the holder lives...
        held = json.loads((tmp_path / "dataset" / "work" / "lease.json").read_text())
        from infra.lease import Holder

        theirs = OutputLease(root, StorageConfig(), held["token"], Holder(**held["holder"]), held["acquired"])
        guarded = ObjectStore(root, guard=theirs.check)
        guarded.write_text("shards/part-00000.done", "plan\n")
    finally:
        holder.kill()
        holder.wait()
    # ...and refuses every write, delete included, once it is gone.
    with pytest.raises(LeaseLost, match=f"pid {holder.pid}.*gone"):
        guarded.write_text("shards/part-00001.done", "plan\n")
    with pytest.raises(LeaseLost):
        guarded.delete("shards/part-00000.done")
    assert ObjectStore(root).list("shards/") == ["shards/part-00000.done"]
    assert not list((tmp_path / "dataset" / "shards").glob(".*.tmp-*"))
    lease = take_output(root, StorageConfig())  # a rerun takes the dead holder's lease over at once
    assert json.loads((tmp_path / "dataset" / "work" / "lease.json").read_text())["token"] == lease.token
    lease.release()
    assert not (tmp_path / "dataset" / "work" / "lease.json").exists()


def test_a_rerun_removes_the_temp_files_of_killed_writes_and_only_those(tmp_path: Path) -> None:
    from tasks.build.stages import take_output

    root = tmp_path / "dataset"
    (root / "shards").mkdir(parents=True)
    (root / "work" / "f-1" / "clean").mkdir(parents=True)
    stale = [root / "shards" / ".part-00001.parquet.tmp-k1ll3d", root / "work" / "f-1" / "clean" / ".s0-00001.json.tmp-x"]
    for path in stale:
        path.write_bytes(b"half a write")
        os.utime(path, (time.time() - 60, time.time() - 60))
    (root / "shards" / "part-00000.parquet").write_bytes(b"a shard")
    lease = take_output(str(root), StorageConfig())
    try:
        live = root / "shards" / ".part-00002.parquet.tmp-l1ve"  # a write of this build, under way
        live.write_bytes(b"in progress")
        assert not any(p.exists() for p in stale)
        assert ObjectStore(str(root)).remove_temp_files(older_than=lease.acquired) == []
        assert live.exists() and (root / "shards" / "part-00000.parquet").read_bytes() == b"a shard"
    finally:
        lease.release()


def test_a_rerun_aborts_the_orphaned_multipart_uploads_under_its_prefix(s3_store: ObjectStore) -> None:
    from tasks.build.stages import take_output

    client, bucket = s3_store.s3_client, s3_store.bucket
    mine = client.create_multipart_upload(Bucket=bucket, Key=f"{s3_store.prefix}/dataset/shards/part-00000.parquet")
    client.upload_part(Bucket=bucket, Key=mine["Key"], UploadId=mine["UploadId"], PartNumber=1, Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket=bucket, Key=f"{s3_store.prefix}-other/dataset/x.parquet")

    def uploads(prefix: str) -> list[str]:
        return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]

    assert uploads(f"{s3_store.prefix}/") == [mine["Key"]]
    time.sleep(1.1)  # S3 stamps uploads to the second: the lease starts after this one
    lease = take_output(s3_store.uri("dataset"), s3_store.config)
    lease.release()
    assert uploads(f"{s3_store.prefix}/") == []
    assert uploads(f"{s3_store.prefix}-other/") == [other["Key"]]  # another build's prefix is not ours
    client.abort_multipart_upload(Bucket=bucket, Key=other["Key"], UploadId=other["UploadId"])


def test_a_killed_driver_not_yet_reaped_is_gone_for_its_workers(tmp_path: Path) -> None:
    """A SIGKILLed driver stays a zombie until its parent reaps it: its workers must not write meanwhile."""
    import signal

    import psutil

    from infra.lease import Holder, LeaseLost, OutputLease

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    holder = Holder(Holder.me().node, child.pid, psutil.Process(child.pid).create_time())
    lease = OutputLease(str(tmp_path), StorageConfig(), "t", holder, time.time())
    assert holder.alive() is True
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert holder.alive() is False  # not reaped yet, and dead
        with pytest.raises(LeaseLost):
            ObjectStore(str(tmp_path), guard=lease.check).write_text("shards/part-00000.done", "x")
    finally:
        child.wait()
    assert not (tmp_path / "shards" / "part-00000.done").exists()


def test_a_holder_is_its_start_in_ticks_not_the_wall_clock() -> None:
    """psutil's create_time adds the boot time as read at each call, which follows the wall clock:
    a live driver whose recorded start is off by seconds is still alive (its ticks since boot
    match), another process under its pid is not, and a holder without ticks (a lease from before
    them) compares the wall-clock start, give or take a second."""
    import dataclasses

    from infra.lease import Holder, _start_ticks

    me = Holder.me()
    assert me.start_ticks == _start_ticks(os.getpid()) and me.alive() is True
    assert dataclasses.replace(me, started=me.started - 7.0).alive() is True  # the wall clock moved
    assert dataclasses.replace(me, start_ticks=me.start_ticks - 1).alive() is False  # a reused pid
    assert dataclasses.replace(me, start_ticks=None, started=me.started + 0.9).alive() is True
    assert dataclasses.replace(me, start_ticks=None, started=me.started - 60).alive() is False
    child = subprocess.Popen([sys.executable, "-c", "print(1)"], stdout=subprocess.DEVNULL)
    started = _start_ticks(child.pid)
    child.wait()
    assert Holder(me.node, child.pid, 0.0, started).alive() is False  # exited and reaped


def test_a_process_with_a_sigkill_pending_counts_as_killed() -> None:
    from infra.lease import being_killed

    running = "Name:\tpython\nState:\tD (disk sleep)\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n"
    assert not being_killed(running)
    assert being_killed(running.replace("ShdPnd:\t0000000000000000", "ShdPnd:\t0000000000000100"))  # SIGKILL: bit 9
    assert being_killed(running.replace("SigPnd:\t0000000000000000", "SigPnd:\t0000000000000100"))
    assert being_killed(running.replace("D (disk sleep)", "Z (zombie)"))
    assert not being_killed(running.replace("ShdPnd:\t0000000000000000", "ShdPnd:\t0000000000004000"))  # SIGTERM
    with open(f"/proc/{os.getpid()}/status") as f:
        assert not being_killed(f.read())


def test_streamed_writes_appear_whole_or_not_at_all(store: ObjectStore) -> None:
    with store.open_atomic("a/streamed.bin") as f:
        for i in range(10):
            f.write(bytes([i]) * 1000)
        assert not store.exists("a/streamed.bin")  # nothing visible while it is written
    assert store.read_bytes("a/streamed.bin") == b"".join(bytes([i]) * 1000 for i in range(10))
    with pytest.raises(RuntimeError):
        with store.open_atomic("a/streamed.bin") as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert store.read_bytes("a/streamed.bin")[:1000] == bytes(1000)  # the old object, untouched
    assert store.list("a/") == ["a/streamed.bin"]  # no temp file left behind


def test_a_pending_write_appears_only_at_its_commit_which_may_run_on_another_thread(store: ObjectStore) -> None:
    import threading

    with store.open_pending("a/pending.bin") as pending:
        pending.file.write(b"written")
    assert not store.exists("a/pending.bin") and store.list("a/") == []  # written, not yet committed
    committer = threading.Thread(target=pending.commit)
    committer.start()
    committer.join()
    assert store.read_bytes("a/pending.bin") == b"written"
    with store.open_pending("a/dropped.bin") as dropped:
        dropped.file.write(b"never")
    dropped.discard()
    with pytest.raises(RuntimeError):
        with store.open_pending("a/failed.bin") as failed:
            failed.file.write(b"half")
            raise RuntimeError("writer died")
    assert store.list("a/") == ["a/pending.bin"]  # nothing of the dropped or failed writes, no temp file


def test_a_natively_written_pending_object_is_hashed_as_read_back_then_committed(store: ObjectStore,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import mmap

    import infra.storage

    monkeypatch.setattr(infra.storage, "_READBACK_BYTES", mmap.ALLOCATIONGRANULARITY)  # read back in several windows
    data = os.urandom(3 * mmap.ALLOCATIONGRANULARITY + 123)
    with store.open_pending("a/native.bin") as pending:
        out = pending.native_file()
        out.write(data[:1000])
        out.write(data[1000:])
    assert not store.exists("a/native.bin") and store.list("a/") == []  # written, not yet committed
    digest = hashlib.sha256()
    assert pending.finish(digest) == len(data) and not store.exists("a/native.bin")
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    committer = threading.Thread(target=pending.commit)  # as a ShardWriter commits
    committer.start()
    committer.join()
    assert store.read_bytes("a/native.bin") == data
    with store.open_pending("a/empty.bin") as empty:
        empty.native_file()
    digest = hashlib.sha256()
    assert empty.finish(digest) == 0 and digest.hexdigest() == hashlib.sha256(b"").hexdigest()
    assert empty.commit() == 0
    with store.open_pending("a/dropped.bin") as dropped:
        dropped.native_file().write(b"never")
    dropped.discard()
    with pytest.raises(RuntimeError):
        with store.open_pending("a/failed.bin") as failed:
            failed.native_file().write(b"half")
            raise RuntimeError("writer died")
    assert store.list("a/") == ["a/empty.bin", "a/native.bin"]
    if not store.is_s3:
        assert [n for _, _, names in os.walk(store.prefix) for n in names if ".tmp-" in n] == []


def test_scratch_writes_skip_fsync_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.storage

    synced: list[int] = []
    monkeypatch.setattr(infra.storage.os, "fsync", lambda fd: synced.append(fd))
    store = ObjectStore(str(tmp_path))
    store.write_bytes("durable.bin", b"x")
    assert len(synced) == 2  # the file and its directory
    scratch = store.child("work").scratch()
    scratch.write_bytes("piece.bin", b"y")
    scratch.child("deeper").write_text("more.txt", "z")
    assert len(synced) == 2 and not scratch.durable and not scratch.child("deeper").durable
    assert store.read_bytes("work/piece.bin") == b"y" and store.read_text("work/deeper/more.txt") == "z"
    assert pickle.loads(pickle.dumps(scratch)).durable is False
    assert store.list("work/") == ["work/deeper/more.txt", "work/piece.bin"]
