"""Object storage: one small layer over local paths and S3 (pyarrow.fs for streaming, boto3 for I/O).

``ObjectStore(root)`` takes a plain path, ``file:///path`` or ``s3://bucket/prefix``; keys are
``/``-separated paths relative to the root. Every write is atomic: locally a temp file in the same
directory is fsynced and renamed over the key; on S3 an object is either one PUT or a completed
multipart upload (aborted on failure), so a reader never sees a partial object. S3 calls are
retried with exponential backoff and jitter on throttling, 5xx and connection errors — never on
other 4xx — and fail with a :class:`StorageError` that names the URI. Credentials are never logged
or shown in errors and reprs. Stores pickle without their clients (rebuilt lazily), for Ray workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import io
import json
import logging
import mmap
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from infra.config import StorageConfig
from infra.log import get_logger, log_event

log = get_logger(__name__)
T = TypeVar("T")

# S3 error codes that mean "try again later" even when the HTTP status is not 5xx/429.
_RETRYABLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                              "TooManyRequests", "RequestTimeout", "InternalError", "ServiceUnavailable"})
_MIN_PART_BYTES = 5 * 1024 * 1024  # S3's minimum size of every multipart part but the last
_TMP_MARK = ".tmp-"  # local temp files are ".<name>.tmp-<random>", hidden from list()


class StorageError(OSError):
    """An object-store operation failed (after retries where the failure was transient).

    ``transient``: the failure was of a kind that may pass (throttling, 5xx, dropped connections)
    and the store's own retries ran out; a task-level retry may still succeed.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: expected a relative 'a/b/c' path without '.', '..' or '//'")
    return key


@functools.lru_cache(maxsize=4)
def read_parquet_once(store: "ObjectStore", key: str) -> pa.Table:
    """``store.read_parquet(key)``, read once per process: for files that are complete before any
    job reads them and never change (a shuffle's group files, read by many jobs of one worker)."""
    return store.read_parquet(key)


# One boto3 client and one pyarrow filesystem per process for each storage config (and the AWS
# environment it resolves credentials from): a store is rebuilt in every job a worker runs (it is
# pickled without its clients), and a new boto3 client costs 65-130 ms. Both are thread-safe.
_CLIENTS: dict[tuple, Any] = {}
_FILESYSTEMS: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE")


def _shared(cache: dict[tuple, Any], store: "ObjectStore", make: Callable[[], Any]) -> Any:
    """``cache``'s object for an S3 ``store``'s config in this process (a forked child makes its own)."""
    assert store.is_s3, store
    key = (os.getpid(), store.config, tuple(os.environ.get(name) for name in _AWS_ENV))
    with _SHARED_LOCK:
        hit = cache.get(key)
    if hit is None:
        hit = make()
        with _SHARED_LOCK:
            hit = cache.setdefault(key, hit)
    return hit


class ObjectStore:
    """Files under one root URI (plain path, ``file:///path`` or ``s3://bucket/prefix``)."""

    def __init__(self, root: str, config: StorageConfig | None = None,
                 guard: Callable[[str], None] | None = None, *, durable: bool = True) -> None:
        self.config = config or StorageConfig()
        # Called with the key before every write and delete commits; raises to refuse it
        # (infra.lease.OutputLease.check: nothing is written once the build's driver is gone).
        self.guard = guard
        # durable=False (scratch: shuffle pieces a rerun can recompute): local writes stay atomic
        # (temp file + rename, so a killed process never leaves a partial object) but skip the
        # fsyncs, which cost ~6 ms a file; only an OS crash can then lose a recent write.
        self.durable = durable
        root = str(root)
        parsed = urllib.parse.urlparse(root)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"storage root {root!r}: expected s3://bucket[/prefix]")
            self.is_s3 = True
            self.bucket = parsed.netloc
            self.prefix = parsed.path.strip("/")
            self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        elif parsed.scheme in ("", "file"):
            path = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else root
            if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
                raise ValueError(f"storage root {root!r}: file:// URIs must be local (file:///path)")
            self.is_s3 = False
            self.bucket = None
            self.prefix = os.path.abspath(os.path.expanduser(path))
            self.root = self.prefix
        else:
            raise ValueError(f"storage root {root!r}: unsupported scheme {parsed.scheme!r} "
                             "(use a path, file:// or s3://)")
        self._lock = threading.RLock()  # re-entrant: building the pyarrow fs builds the boto3 client
        self._client: Any = None
        self._fs: pafs.FileSystem | None = None

    # ---- identity, pickling ------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"ObjectStore({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectStore) and (self.root, self.config) == (other.root, other.config)

    def __hash__(self) -> int:
        return hash(self.root)

    def __getstate__(self) -> dict:
        # Clients hold sockets and locks; workers rebuild them on first use.
        return {"root": self.root, "config": self.config, "guard": self.guard, "durable": self.durable}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["config"], state.get("guard"), durable=state.get("durable", True))

    def uri(self, key: str) -> str:
        """The full URI (or absolute path, for local roots) of ``key``."""
        return f"{self.root}/{_check_key(key)}"

    def child(self, prefix: str) -> ObjectStore:
        """A store rooted at ``prefix`` under this one, with the same config, guard and durability."""
        return ObjectStore(self.uri(prefix.strip("/")), self.config, self.guard, durable=self.durable)

    def scratch(self) -> ObjectStore:
        """This store for recomputable scratch data: the same objects (and guard), written without fsync."""
        return ObjectStore(self.root, self.config, self.guard, durable=False)

    def _check_guard(self, key: str) -> None:
        if self.guard is not None:
            self.guard(key)

    def fs_path(self, key: str) -> str:
        """``key``'s path on :attr:`filesystem` (``bucket/prefix/key`` on S3)."""
        _check_key(key)
        if self.is_s3:
            return "/".join(p for p in (self.bucket, self.prefix, key) if p)
        return os.path.join(self.prefix, *key.split("/"))

    def _s3_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # ---- clients -----------------------------------------------------------------------------

    @property
    def filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem for streaming (``pyarrow.dataset``, ``open_input_file``).

        Streamed writes are not atomic on S3 (pyarrow completes the upload on close, even after an
        error in the writer); use the ``write_*`` methods where readers must never see a partial object.
        """
        if self._fs is None:
            with self._lock:
                if self._fs is None:
                    self._fs = _shared(_FILESYSTEMS, self, self._make_arrow_fs) if self.is_s3 else self._make_arrow_fs()
        return self._fs

    @property
    def s3_client(self) -> Any:
        """The boto3 S3 client (S3 roots only)."""
        if not self.is_s3:
            raise TypeError(f"{self!r} is not an S3 store")
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = _shared(_CLIENTS, self, self._make_boto3_client)
        return self._client

    def _make_boto3_client(self) -> Any:
        from botocore.config import Config as BotoConfig

        session = self._boto3_session()
        return session.client(
            "s3", endpoint_url=self.config.endpoint_url, region_name=session.region_name or "us-east-1",
            config=BotoConfig(
                s3={"addressing_style": "path"},
                # Newer botocore adds CRC checksums by default, which many S3-compatible servers reject.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"total_max_attempts": 1},  # we retry ourselves, with our policy and logging
                connect_timeout=10, read_timeout=60, max_pool_connections=16))

    def _boto3_session(self) -> Any:
        import boto3

        cfg = self.config
        return boto3.session.Session(aws_access_key_id=cfg.access_key_id.reveal() if cfg.access_key_id else None,
                                     aws_secret_access_key=cfg.secret_access_key.reveal() if cfg.secret_access_key
                                     else None, region_name=cfg.region)

    def _make_arrow_fs(self) -> pafs.FileSystem:
        if not self.is_s3:
            return pafs.LocalFileSystem()
        client = self.s3_client
        # Credentials and endpoint resolved as boto3 does (config, then env/profile chain), so both agree.
        creds = self._boto3_session().get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
        endpoint = urllib.parse.urlparse(client.meta.endpoint_url)
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=self.config.retries + 1)
        kwargs: dict[str, Any] = dict(region=client.meta.region_name, scheme=endpoint.scheme,
                                      endpoint_override=endpoint.netloc, force_virtual_addressing=False,
                                      retry_strategy=retry)
        if frozen is None:
            kwargs["anonymous"] = True
        else:
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
        return pafs.S3FileSystem(**kwargs)

    # ---- retries -----------------------------------------------------------------------------

    def _retry(self, op: str, uri: str, call: Callable[[], T]) -> T:
        """Run ``call``; retry transient S3 failures with exponential backoff and full jitter."""
        from botocore.exceptions import ClientError, NoCredentialsError

        attempts = self.config.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except NoCredentialsError:
                raise StorageError(f"{op} {uri} failed: no S3 credentials (set storage.access_key_id and "
                                   "storage.secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from None
            except ClientError as e:
                code, status = _client_error_code(e)
                if code == "NoSuchBucket":
                    raise StorageError(f"{op} {uri} failed: bucket {self.bucket!r} does not exist") from None
                if code in ("NoSuchKey", "NotFound") or status == 404:
                    raise FileNotFoundError(f"{op} {uri}: no such object") from None
                transient = status in (429,) or status >= 500 or code in _RETRYABLE_CODES
                reason = f"{code or 'HTTP'} (HTTP {status})"
                if not transient:
                    raise StorageError(f"{op} {uri} failed: {reason}") from None
            except _transient_errors() as e:
                reason = f"{type(e).__name__}: {e}"
            if attempt == attempts:
                raise StorageError(f"{op} {uri} failed after {attempts} attempt(s): {reason}", transient=True) from None
            delay = self.config.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            log_event(log, "storage retry", logging.WARNING, op=op, uri=uri, attempt=attempt,
                      of=attempts, reason=reason, sleep_s=round(delay, 3))
            time.sleep(delay)
        raise AssertionError("unreachable")

    # ---- bytes -------------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        """The whole object; :class:`FileNotFoundError` if it does not exist."""
        uri = self.uri(key)
        if not self.is_s3:
            try:
                return Path(self.fs_path(key)).read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"read {uri}: no such object") from None
        bucket, s3_key = self.bucket, self._s3_key(key)
        # The body is read inside the retried call: a connection dropped mid-body is retried too.
        return self._retry("read", uri, lambda: self.s3_client.get_object(Bucket=bucket, Key=s3_key)["Body"].read())

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to ``key`` atomically (readers see the old object or the whole new one)."""
        uri = self.uri(key)
        data = bytes(data) if not isinstance(data, bytes) else data
        self._check_guard(key)
        if not self.is_s3:
            _atomic_local_write(self.fs_path(key), data, lambda: self._check_guard(key), durable=self.durable)
            return
        part_bytes = max(self.config.multipart_threshold_mb * 1024 * 1024, _MIN_PART_BYTES)
        if len(data) <= part_bytes:
            bucket, s3_key = self.bucket, self._s3_key(key)
            self._retry("write", uri, lambda: self.s3_client.put_object(Bucket=bucket, Key=s3_key, Body=data))
        else:
            self._multipart_write(key, data, part_bytes)

    def write_file(self, key: str, path: str | os.PathLike) -> None:
        """Copy the local file ``path`` to ``key`` atomically, a part at a time (never whole in memory)."""
        self._check_guard(key)
        if not self.is_s3:
            _atomic_local_copy(os.fspath(path), self.fs_path(key), lambda: self._check_guard(key))
            return
        part_bytes = max(self.config.multipart_threshold_mb * 1024 * 1024, _MIN_PART_BYTES)
        if os.path.getsize(path) <= part_bytes:
            self.write_bytes(key, Path(path).read_bytes())
            return
        with open(path, "rb") as f:
            self._multipart_upload(key, iter(lambda: f.read(part_bytes), b""))

    @contextlib.contextmanager
    def open_atomic(self, key: str) -> Iterator[BinaryIO]:
        """A binary file to stream ``key``'s content into; the object appears, whole, only when the
        block ends without an error (locally: a temp file, fsynced once, renamed; on S3: one PUT or
        a multipart upload of what was written)."""
        with self.open_pending(key) as pending:
            yield pending.file
        pending.commit()

    @contextlib.contextmanager
    def open_pending(self, key: str) -> Iterator[PendingObject]:
        """Like :meth:`open_atomic`, but the block only writes ``pending.file``: the object appears,
        whole, when ``pending.commit()`` runs (later, on another thread if need be: a writer can
        encode its next object while this one's fsync waits for the disk), and never if the block
        raises or ``pending.discard()`` runs instead."""
        self._check_guard(key)
        pending = PendingObject(self, key)
        try:
            yield pending
        except BaseException:
            pending.discard()
            raise

    def _multipart_write(self, key: str, data: bytes, part_bytes: int) -> None:
        view = memoryview(data)
        self._multipart_upload(key, (view[start:start + part_bytes].tobytes()
                                     for start in range(0, len(data), part_bytes)))

    def _multipart_upload(self, key: str, bodies: Iterator[bytes]) -> None:
        uri, client, bucket, s3_key = self.uri(key), self.s3_client, self.bucket, self._s3_key(key)
        upload_id = self._retry("write (create multipart upload)", uri, lambda: client.create_multipart_upload(
            Bucket=bucket, Key=s3_key)["UploadId"])
        try:
            parts = []
            for number, body in enumerate(bodies, start=1):
                etag = self._retry(f"write (part {number})", uri, lambda: client.upload_part(
                    Bucket=bucket, Key=s3_key, UploadId=upload_id, PartNumber=number, Body=body)["ETag"])
                parts.append({"PartNumber": number, "ETag": etag})
            self._check_guard(key)
            self._retry("write (complete multipart upload)", uri, lambda: client.complete_multipart_upload(
                Bucket=bucket, Key=s3_key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except BaseException:
            try:
                self._retry("abort multipart upload", uri, lambda: client.abort_multipart_upload(
                    Bucket=bucket, Key=s3_key, UploadId=upload_id))
            except (StorageError, FileNotFoundError) as e:
                # Never completed, so never visible; a bucket lifecycle rule reclaims the parts.
                log_event(log, "could not abort multipart upload", logging.WARNING, uri=uri, error=str(e))
            raise

    # ---- listing, existence, deletion --------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether an object exists at ``key``."""
        if not self.is_s3:
            return os.path.isfile(self.fs_path(key))
        bucket, s3_key = self.bucket, self._s3_key(key)
        try:
            self._retry("exists", self.uri(key), lambda: self.s3_client.head_object(Bucket=bucket, Key=s3_key))
        except FileNotFoundError:
            return False
        return True

    def head(self, key: str) -> dict[str, Any]:
        """An object's identity without its bytes: ``bytes`` and, on S3, ``etag`` and
        ``last_modified`` (locally ``mtime``); :class:`FileNotFoundError` if it does not exist."""
        uri = self.uri(key)
        if not self.is_s3:
            try:
                st = os.stat(self.fs_path(key))
            except FileNotFoundError:
                raise FileNotFoundError(f"head {uri}: no such object") from None
            return {"bytes": st.st_size, "mtime": int(st.st_mtime)}
        bucket, s3_key = self.bucket, self._s3_key(key)
        info = self._retry("head", uri, lambda: self.s3_client.head_object(Bucket=bucket, Key=s3_key))
        return {"bytes": int(info["ContentLength"]), "etag": str(info.get("ETag", "")).strip('"'),
                "last_modified": str(info.get("LastModified", ""))}

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root, sorted) of every object whose key starts with ``prefix``."""
        if prefix and ".." in prefix.split("/"):
            raise ValueError(f"invalid storage prefix {prefix!r}")
        if self.is_s3:
            return self._list_s3(prefix)
        keys = []
        start = os.path.join(self.prefix, *prefix.split("/")[:-1])
        for dirpath, _, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, self.prefix).replace(os.sep, "/")
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix) and not _is_temp_name(name):
                    keys.append(key)
        return sorted(keys)

    def _list_s3(self, prefix: str) -> list[str]:
        full_prefix = self._s3_key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(f"{self.prefix}/") if self.prefix else 0

        def list_all() -> list[str]:
            pages = self.s3_client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix)
            return [obj["Key"][strip:] for page in pages for obj in page.get("Contents", [])
                    if not obj["Key"].endswith("/")]
        return sorted(self._retry("list", f"{self.root}/{prefix}", list_all))

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        self._check_guard(key)
        if not self.is_s3:
            try:
                os.remove(self.fs_path(key))
            except FileNotFoundError:
                pass
            return
        bucket, s3_key = self.bucket, self._s3_key(key)
        try:
            self._retry("delete", self.uri(key), lambda: self.s3_client.delete_object(Bucket=bucket, Key=s3_key))
        except FileNotFoundError:
            pass

    # ---- what killed writers leave behind -----------------------------------------------------

    def remove_temp_files(self, older_than: float) -> list[str]:
        """Delete the temp files of unfinished local writes under this root last modified before
        ``older_than`` (epoch seconds); their paths. A caller passes the time from which it alone
        writes here (``infra.lease.OutputLease.acquired``), so only dead writers' temps go."""
        if self.is_s3 or not os.path.isdir(self.prefix):
            return []
        removed = []
        for dirpath, _, filenames in os.walk(self.prefix):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    if _is_temp_name(name) and os.stat(path).st_mtime < older_than:
                        os.remove(path)
                        removed.append(path)
                except FileNotFoundError:  # its writer renamed or removed it meanwhile
                    pass
        return removed

    def abort_multipart_uploads(self, older_than: float) -> list[str]:
        """Abort the multipart uploads under this root's prefix started before ``older_than`` (epoch
        seconds): a writer killed mid-upload never completes or aborts them, and their parts are
        billed until someone does. Returns the keys (relative to the root) of the aborted uploads."""
        if not self.is_s3:
            return []
        client, bucket = self.s3_client, self.bucket
        prefix = f"{self.prefix}/" if self.prefix else ""
        strip = len(prefix)

        def list_uploads() -> list[tuple[str, str]]:
            pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
            return [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])
                    if u["Initiated"].timestamp() < older_than]
        aborted = []
        for s3_key, upload_id in self._retry("list multipart uploads", self.root, list_uploads):
            try:
                self._retry("abort multipart upload", f"s3://{bucket}/{s3_key}", lambda: client.abort_multipart_upload(
                    Bucket=bucket, Key=s3_key, UploadId=upload_id))
            except FileNotFoundError:  # completed or aborted meanwhile
                continue
            aborted.append(s3_key[strip:])
        return aborted

    # ---- text, JSON, Parquet -----------------------------------------------------------------

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        """Write UTF-8 ``text`` atomically."""
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        try:
            return json.loads(self.read_bytes(key))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.uri(key)}: not valid JSON: {e}") from None

    def write_json(self, key: str, obj: Any) -> None:
        """Write ``obj`` as indented JSON, atomically."""
        self.write_text(key, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def read_parquet(self, key: str, **read_kwargs: Any) -> pa.Table:
        """A whole Parquet object as a table (use :attr:`filesystem` to stream large ones)."""
        if not self.is_s3:
            if not os.path.isfile(self.fs_path(key)):
                raise FileNotFoundError(f"read {self.uri(key)}: no such object")
            return pq.read_table(self.fs_path(key), **read_kwargs)
        return pq.read_table(pa.BufferReader(self.read_bytes(key)), **read_kwargs)

    def write_parquet(self, key: str, table: pa.Table, **pq_kwargs: Any) -> None:
        """Write ``table`` as one Parquet object, atomically (``pq_kwargs`` go to ``pq.write_table``)."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **pq_kwargs)
        self.write_bytes(key, sink.getvalue().to_pybytes())


def _client_error_code(e: Any) -> tuple[str, int]:
    err = e.response.get("Error", {}) or {}
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    code = str(err.get("Code", "") or "")
    if not status and code.isdigit():  # HEAD responses carry no body, only the status as the code
        status = int(code)
    return code, int(status)


def _transient_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    return (BotoConnectionError, HTTPClientError, IncompleteReadError)


@contextlib.contextmanager
def _atomic_local_file(path: str, before_commit: Callable[[], None] = lambda: None,
                       durable: bool = True) -> Iterator[BinaryIO]:
    """A temp file beside ``path`` to write into; renamed over ``path`` when the block ends without
    an error (``before_commit`` first: the write guard again, as writing may have outlasted the
    writer's lease), removed otherwise. ``durable``: fsync the file and the directory entry."""
    pending = _PendingLocalFile(path, before_commit, durable)
    try:
        yield pending.file
    except BaseException:
        pending.discard()
        raise
    pending.commit()


class _PendingLocalFile:
    """A temp file beside ``path``; :meth:`finish` ends the writing, :meth:`commit` fsyncs it
    (``durable``), checks ``before_commit`` and renames it over ``path`` (then fsyncs the directory
    entry); :meth:`discard` removes it."""

    def __init__(self, path: str, before_commit: Callable[[], None], durable: bool) -> None:
        self.path, self.before_commit, self.durable = path, before_commit, durable
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{name}{_TMP_MARK}", dir=directory)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.native: pa.NativeFile | None = None
        self.size: int | None = None

    def native_file(self) -> pa.NativeFile:
        if self.native is None:
            self.native = pa.OSFile(self.tmp, "wb")  # the same (empty) temp file, written by Arrow's own I/O
        return self.native

    def finish(self, digest: Any = None) -> int:
        try:
            if self.native is not None:
                self.native.close()
            self.file.flush()
            fd = self.file.fileno()
            self.size = os.fstat(fd).st_size
            if self.durable:
                start_writeback(fd, 0, self.size)  # the disk writes while the digest reads and the caller goes on
            if digest is not None:
                _digest_file(fd, self.size, digest)
        except BaseException:
            self.discard()
            raise
        return self.size

    def commit(self) -> int:
        size = self.finish() if self.size is None else self.size
        try:
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, 0o644)  # mkstemp makes 0600 files; objects should read like any written file
            self.before_commit()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        if self.durable:
            _fsync_directory(os.path.dirname(self.path))
        return size

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails again where writing failed
            if self.native is not None:
                self.native.close()
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


_READBACK_BYTES = 8 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY; bounds what one mapping adds to RSS


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    """sha256 of a local file, read in chunks (inputs' and exports' checksums for the manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_file(fd: int, size: int, digest: Any) -> None:
    """Feed the first ``size`` bytes of the file ``fd`` to ``digest.update``, mapped from the page
    cache a window at a time (no copy into the process; hashlib releases the GIL while it hashes)."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # one fault-in per window, not one per page
    for offset in range(0, size, _READBACK_BYTES):
        with mmap.mmap(fd, min(_READBACK_BYTES, size - offset), flags=flags, prot=mmap.PROT_READ,
                       offset=offset) as window:
            digest.update(window)


class PendingObject:
    """An object written but not yet visible (:meth:`ObjectStore.open_pending`). Its bytes go to
    ``file`` or, for writers that encode natively, to :meth:`native_file` (one of the two).
    :meth:`finish` ends the writing (and can hash what was written); :meth:`commit` makes the
    object durable and visible (locally: fsync, rename, fsync of the directory; on S3: one PUT or
    a multipart upload), possibly on another thread; :meth:`discard` drops it. Either, once."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self.store, self.key = store, key
        self._local = None if store.is_s3 else _PendingLocalFile(
            store.fs_path(key), lambda: store._check_guard(key), store.durable)
        self.file: BinaryIO = io.BytesIO() if self._local is None else self._local.file
        self._buffer: pa.BufferOutputStream | None = None
        self._data: bytes | memoryview | None = None

    def native_file(self) -> pa.NativeFile:
        """An Arrow output stream onto the object, in place of ``file``: ``pq.write_table`` into it
        writes its bytes without passing them through Python (locally into the temp file itself, on
        S3 into an Arrow buffer)."""
        if self._local is not None:
            return self._local.native_file()
        if self._buffer is None:
            self._buffer = pa.BufferOutputStream()
        return self._buffer

    def finish(self, digest: Any = None) -> int:
        """No more writes; the object's size. Locally this starts the disk writeback, so the commit's
        fsync waits for the tail. ``digest`` (a ``hashlib`` object) is fed the bytes as read back
        from what was written (locally mapped from the page cache, no copy, right after the writing,
        when much of it is still in the CPU's cache; on S3 the buffer): a checksum of exactly what
        the commit publishes."""
        if self._local is not None:
            return self._local.finish(digest)
        try:
            if self._data is None:
                self._data = memoryview(self._buffer.getvalue()) if self._buffer is not None else self.file.getvalue()
            if digest is not None:
                digest.update(self._data)
        except BaseException:
            self.discard()
            raise
        return len(self._data)

    def commit(self) -> int:
        """Make the object durable and visible (after :meth:`finish`, which it calls if need be); its size."""
        if self._local is not None:
            return self._local.commit()
        try:
            size = self.finish()
            self.store.write_bytes(self.key, self._data)
            return size
        finally:
            self.discard()

    def discard(self) -> None:
        if self._local is not None:
            self._local.discard()
            return
        self._data = None
        if self._buffer is not None:
            self._buffer.close()
        self.file.close()


def _atomic_local_copy(source: str, path: str, before_commit: Callable[[], None] = lambda: None) -> None:
    with _atomic_local_file(path, before_commit) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 20)


def _atomic_local_write(path: str, data: bytes, before_commit: Callable[[], None] = lambda: None,
                        durable: bool = True) -> None:
    with _atomic_local_file(path, before_commit, durable) as f:
        f.write(data)


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait
_sync_file_range: Any = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing bytes ``[offset, offset + nbytes)`` of ``fd`` to disk without waiting for them
    (Linux ``sync_file_range``; a no-op elsewhere). A writer that calls this as it streams has the
    disk busy while it encodes, and its fsync at the end waits for the tail instead of the whole
    file. Durability still comes from that fsync alone."""
    global _sync_file_range
    if _sync_file_range is None:
        function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None) if sys.platform == "linux" else None
        if function is not None:
            function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            function.restype = ctypes.c_int
        _sync_file_range = function or False
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start


def _fsync_directory(directory: str) -> None:
    """A rename is durable only once the directory entry is on disk."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
