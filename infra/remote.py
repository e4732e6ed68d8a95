"""Inputs wherever a path may point: a local path, ``file://``, ``s3://`` or ``http(s)://``.

    with open_input("s3://bucket/pairs/part-0.parquet", storage) as f:   # seekable, read-only
        ...
    expand_inputs("s3://bucket/shards/*.tar", storage)                  # sorted URIs

``s3://`` goes through :class:`infra.storage.ObjectStore` (the storage section's endpoint and
credentials, as for outputs; pyarrow's S3 file, read in ranges). ``http(s)://`` is read with HTTP
range requests when the server answers them, else streamed once into a temporary file; either way
the reader can seek (Parquet footers, tar members, CSV re-reads). HTTP cannot list a folder, so an
``http(s)://`` input is one file (or a brace list: ``http://h/{00000..00009}.tar``). Every error
names the URI.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, BinaryIO, Sequence

from infra.config import StorageConfig
from infra.storage import ObjectStore, StorageError

HTTP_TIMEOUT_S = 30.0
HTTP_RETRIES = 3  # on 5xx/429 and connection errors, with backoff
_READ_BLOCK = 1 << 20
_GLOB_CHARS = "*?["


class RemoteInputError(OSError):
    """A remote input cannot be read; the message names its URI."""


def is_remote(path: str) -> bool:
    """Whether ``path`` is an object-storage or HTTP URI (not a local path or file://)."""
    return urllib.parse.urlparse(str(path)).scheme in ("s3", "http", "https")


def _split(uri: str) -> tuple[str, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    return parent, name


def _s3_store(uri: str, storage: StorageConfig | None) -> tuple[ObjectStore, str]:
    parent, name = _split(uri)
    if not name or urllib.parse.urlparse(parent).netloc == "":
        raise RemoteInputError(f"{uri}: expected s3://bucket/key")
    return ObjectStore(parent, storage), name


# ---- HTTP -----------------------------------------------------------------------------------


def _http(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    """One HTTP request, retried on 5xx/429 and connection errors; other errors name the URL."""
    request = urllib.request.Request(url, method=method, headers={"User-Agent": "witflow", **(headers or {})})
    for attempt in range(HTTP_RETRIES + 1):
        try:
            return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{url}: no such file (HTTP 404)") from None
            if e.code == 416:
                raise
            if e.code < 500 and e.code != 429 or attempt == HTTP_RETRIES:
                raise RemoteInputError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == HTTP_RETRIES:
                reason = getattr(e, "reason", e)
                raise RemoteInputError(f"{url}: cannot connect ({reason})") from None
        time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


class HttpRangeFile(io.RawIOBase):
    """A seekable read-only file over HTTP range requests (one request per buffer refill)."""

    def __init__(self, url: str, size: int) -> None:
        super().__init__()
        self.url, self.size, self.pos = url, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.pos >= self.size or len(buffer) == 0:
            return 0
        end = min(self.size, self.pos + len(buffer)) - 1
        with _http(self.url, headers={"Range": f"bytes={self.pos}-{end}"}) as response:
            if response.status != 206:
                raise RemoteInputError(f"{self.url}: the server stopped answering byte ranges")
            data = response.read()
        if len(data) != end - self.pos + 1:
            raise RemoteInputError(f"{self.url}: short range read ({len(data)} of {end - self.pos + 1} bytes)")
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _open_http(url: str) -> BinaryIO:
    with _http(url, method="HEAD") as head:
        size = head.headers.get("Content-Length")
        ranges = head.headers.get("Accept-Ranges", "").lower() == "bytes"
    if size is not None and ranges:
        return io.BufferedReader(HttpRangeFile(url, int(size)), buffer_size=_READ_BLOCK)
    # No ranges: one streamed download, spilled to disk past 64 MiB.
    spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
    with _http(url) as response:
        while block := response.read(_READ_BLOCK):
            spool.write(block)
    spool.seek(0)
    return spool  # type: ignore[return-value]


class _NativeRaw(io.RawIOBase):
    """A pyarrow file as a raw Python file (so it can be buffered and read by lines)."""

    def __init__(self, native: Any) -> None:
        super().__init__()
        self.native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.native.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.native.seek(offset, whence)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self.native.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self.native.close()
        super().close()


# ---- the interface --------------------------------------------------------------------------


def open_input(uri: str, storage: StorageConfig | None = None) -> BinaryIO:
    """Open a local path, file://, s3:// or http(s):// input for seekable binary reading."""
    uri = str(uri)
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        return _open_http(uri)
    if scheme == "s3":
        store, name = _s3_store(uri, storage)
        try:
            if not store.exists(name):
                raise FileNotFoundError(f"{uri}: no such object")
            # Buffered: tar headers and JSONL lines are small reads, each would be an S3 request.
            native = store.filesystem.open_input_file(store.fs_path(name))
            return io.BufferedReader(_NativeRaw(native), buffer_size=_READ_BLOCK)  # type: ignore[return-value]
        except StorageError as e:
            raise RemoteInputError(str(e)) from None
        except OSError as e:  # pyarrow's own S3 errors
            if isinstance(e, FileNotFoundError):
                raise
            raise RemoteInputError(f"{uri}: cannot open ({e})") from None
    return open(uri.removeprefix("file://"), "rb")


def _brace_expand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def expand_inputs(pattern: str, storage: StorageConfig | None = None,
                  extensions: Sequence[str] = ()) -> list[str]:
    """The input URIs a remote source names, sorted: for s3:// a key, a prefix (every object under
    it with one of ``extensions``) or a glob of keys; for http(s):// one URL or a brace list."""
    scheme = urllib.parse.urlparse(pattern).scheme
    if scheme in ("http", "https"):
        return _brace_expand(pattern) if "{" in pattern else [pattern]
    if scheme != "s3":
        raise ValueError(f"{pattern}: not a remote URI")
    if "{" in pattern:
        return sorted(u for p in _brace_expand(pattern) for u in expand_inputs(p, storage, extensions))
    globbed = any(ch in pattern for ch in _GLOB_CHARS)
    fixed = pattern
    if globbed:  # list from the last folder before the first wildcard
        first = min(pattern.index(ch) for ch in _GLOB_CHARS if ch in pattern)
        fixed = pattern[:first].rpartition("/")[0]
    parsed = urllib.parse.urlparse(fixed)
    store = ObjectStore(f"s3://{parsed.netloc}", storage)
    prefix = parsed.path.strip("/")
    try:
        if not globbed and prefix and store.exists(prefix):
            return [pattern]
        keys = store.list(prefix + "/" if prefix else "")
    except StorageError as e:
        raise RemoteInputError(str(e)) from None
    uris = [store.uri(k) for k in keys if not any(part.startswith((".", "_")) for part in k.split("/"))]
    if globbed:
        uris = [u for u in uris if fnmatch.fnmatchcase(u, pattern)]
    elif extensions:
        uris = [u for u in uris if u.lower().endswith(tuple(extensions))]
    if not uris:
        raise FileNotFoundError(f"{pattern}: matches no object")
    return sorted(uris)


def input_identity(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """What names one version of a remote input, without reading it: ``bytes`` and the S3 object's
    ``etag`` and ``last_modified``, or the HTTP ``etag``/``last_modified`` headers. A server that
    sends neither gets the content's ``sha256`` (one download): a changed input is never taken for
    the old one. Errors name the URI (FileNotFoundError, RemoteInputError)."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme == "s3":
        store, name = _s3_store(uri, storage)
        try:
            return {"file": uri, **store.head(name)}
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such object") from None
        except StorageError as e:
            raise RemoteInputError(str(e)) from None
    if scheme not in ("http", "https"):
        raise ValueError(f"{uri}: not a remote URI")
    with _http(uri, method="HEAD") as head:
        size, etag, modified = (head.headers.get(h) for h in ("Content-Length", "ETag", "Last-Modified"))
    identity: dict[str, Any] = {"file": uri, "bytes": int(size) if size is not None else None}
    if etag or modified:
        return {**identity, "etag": etag, "last_modified": modified}
    digest, total = hashlib.sha256(), 0
    with _http(uri) as response:
        while block := response.read(_READ_BLOCK):
            digest.update(block)
            total += len(block)
    return {**identity, "bytes": total, "sha256": digest.hexdigest()}
