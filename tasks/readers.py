"""Sources (readers): every input of (image, caption) pairs as CANDIDATE_SCHEMA tables, in input shards.

    shards = plan_input_shards(config.sources, base_dir=".", storage=config.storage)   # metadata, line counts, listings
    table = read_input_shard(shards[0])                          # one Ray worker's unit of work

Source kinds (``SourceConfig.kind``):

* ``parquet`` / ``csv`` / ``tsv`` / ``jsonl`` — manifests with a caption column and a URL, a local
  path (relative paths are relative to the manifest's folder) or inline image bytes (binary, or base64
  text in CSV/JSONL). The columns the source's caption policy names (``caption.fields``/``append``:
  title, alt text, keywords...) are kept in ``meta`` under their names. Column names are configurable; img2dataset's ``url``/``caption`` are the
  defaults, and img2dataset's own Parquet output (``key``, ``status``, ``jpg``...) is recognised.
  ``path`` is a file, a folder (every file with the kind's extension) or a glob.
* ``webdataset`` — tar shards: members sharing a key (``dir/key.jpg`` + ``dir/key.txt``/``.json``).
* ``directory`` — a folder of images with sidecar captions (``a/cat.jpg`` + ``a/cat.txt``).
* ``openclipart`` — the bundled sample or the full Debian-built file (infra/openclipart.py): caption
  is the title as written (``caption_keywords``, a preset of ``sources[].caption``, adds the
  keywords in the caption step: "caption+keywords"); every image an eval set
  uses (``infra.openclipart.excluded_from_training``) is left out; ``meta`` has its text fields
  (``title``, ``keywords``, ``description``, ``file_name``) for ``sources[].caption`` to compose from.
* ``emoji`` — an emoji table built by infra/emoji.py: caption is the CLDR name (keywords
  likewise with ``caption_keywords``); held-out emoji (``infra.emoji.is_heldout``) are left out;
  ``meta`` has ``name`` and ``keywords`` to compose from.

Bad rows never fail a shard: a missing caption, an unreadable local path or a broken tar member
keeps its row with a null caption/image (later stages count those) and a ``reader_error`` in
``meta``; rows with nothing to keep (a malformed JSONL line or CSV row) and held-out ids are dropped
and counted in the ``read`` funnel stage. A wholly unreadable input file, or a configured column
that is not there, raises :class:`ReaderError` naming the file and the column.

A source's ``path`` may also be ``s3://`` (opened with the build's StorageConfig, which the shards
carry to the Ray workers) or ``http(s)://`` for every kind but ``directory`` (infra/remote.py);
each reader opens its file through :func:`_open`, local or remote alike.

``sample_id`` is stable across reruns and independent of shard sizes: ``<kind>:<file as
configured>#<id column value or row number>``, ``webdataset:<tar>#<key>``,
``directory:<folder>/<image path>``, ``openclipart:<id>``, ``emoji:<vendor>/<code points>``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import glob
import io
import json
import os
import re
import tarfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from infra.config import SourceConfig, StorageConfig
from infra.funnel import Funnel
from infra.log import get_logger, log_event
from infra.remote import expand_inputs, input_identity, is_remote, open_input
from infra.schema import CANDIDATE_SCHEMA

log = get_logger("witflow.readers")

READ_STAGE = "read"
READER_ERROR_KEY = "reader_error"  # in `meta`: why a kept row has no image or caption
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MANIFEST_EXTENSIONS = {
    "parquet": (".parquet",),
    "csv": (".csv", ".csv.gz", ".csv.bz2", ".csv.zst"),
    "tsv": (".tsv", ".tsv.gz", ".tsv.bz2", ".tsv.zst"),
    "jsonl": (".jsonl", ".json"),
    "webdataset": (".tar", ".tar.gz", ".tgz"),
    "openclipart": (".parquet",),
    "emoji": (".parquet",),
}
# img2dataset's output Parquet (output_format="parquet") carries these; the image is in jpg/png/webp.
_IMG2DATASET_COLUMNS = {"key", "status", "error_message"}
_IMG2DATASET_IMAGE_COLUMNS = ("jpg", "png", "webp")
CSV_BLOCK_BYTES = 1 << 22  # pyarrow's CSV parse unit: one record batch per block
# A row must fit in one parse block; a file with a longer row is parsed with larger blocks, up to this.
CSV_MAX_BLOCK_BYTES = 1 << 30
# Kinds whose files may be s3:// or http(s):// URIs (read through infra.remote); the others are local.
REMOTE_KINDS = ("parquet", "csv", "tsv", "jsonl", "webdataset", "openclipart", "emoji")
BAD_UTF8 = "bad_utf8"  # a caption that is not valid UTF-8: the row is dropped (text cannot hold it)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class ReaderError(ValueError):
    """An input file or column cannot be read at all; the message names it."""


@dataclass(frozen=True)
class InputShard:
    """One unit of reading work: a slice of one input file (or a list of files of a folder)."""

    shard_id: str  # "s<source index>-<shard number:05d>", stable for the same sources
    source: SourceConfig
    source_name: str  # "<kind>:<path as configured>": the CANDIDATE `source` column
    file: str  # absolute path or URI: the manifest, tar or Parquet file, or the directory source's folder
    display_file: str  # the file as the config names it (stable across machines): in sample ids
    start: int = 0  # first row (line for JSONL); directory shards list their `members` instead
    stop: int | None = None  # exclusive; None: to the end
    byte_offset: int = 0  # JSONL: where line `start` begins
    members: tuple[str, ...] = ()  # directory: image paths relative to `file`
    malformed_rows: int = 0  # CSV/TSV: lines of the file in rows the parser skipped (counted on its first shard)
    csv_block_bytes: int = 0  # CSV/TSV: the parse block that holds the file's longest row (0: CSV_BLOCK_BYTES)
    csv_strict: bool = False  # CSV/TSV: a row spans lines, so the file is parsed by the strict RFC 4180 reader
    # s3:// files: the endpoint and credentials to open them with on a worker (None for local files).
    # It pickles with its secrets (Ray needs them); its repr never shows them.
    storage: StorageConfig | None = field(default=None, repr=False)
    version: str = ""  # a remote file's size and ETag/Last-Modified when planned: checked again when read


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------


def _has_ext(name: str, exts: Sequence[str]) -> bool:
    lower = name.lower()
    return any(lower.endswith(e) for e in exts)


def _remote_error(source: SourceConfig, e: OSError) -> ReaderError:
    message = str(e)  # names the URI already; said once when it is the source's own path
    if message.startswith(f"{source.path}: "):
        return ReaderError(f"source {source.kind}:{message}")
    return ReaderError(f"source {source.kind}:{source.path}: {message}")


def _check_remote_kind(source: SourceConfig) -> None:
    if source.kind not in REMOTE_KINDS:
        raise ReaderError(f"source {source.kind}:{source.path}: remote inputs are not supported for kind "
                          f"{source.kind!r} (only {', '.join(REMOTE_KINDS)}); use a local path")
    if source.path_column:
        raise ReaderError(f"source {source.kind}:{source.path}: path_column (local image paths) is not supported "
                          "for a remote manifest; use url_column or image_column")


def _resolve_files(source: SourceConfig, base_dir: Path,
                   storage: StorageConfig | None = None) -> list[tuple[str, str]]:
    """(absolute file or URI, name as configured) pairs for a file/folder/glob source, sorted.

    The name is relative to ``base_dir`` when the configured path is, so sample ids do not depend on
    where the checkout lives; a remote file's name is its URI.
    """
    configured = source.path
    if is_remote(configured):
        _check_remote_kind(source)
        try:
            return [(uri, uri) for uri in expand_inputs(configured, storage, MANIFEST_EXTENSIONS.get(source.kind, ()))]
        except OSError as e:
            raise _remote_error(source, e) from None
    relative = not os.path.isabs(configured)
    path = base_dir / configured if relative else Path(configured)
    exts = MANIFEST_EXTENSIONS.get(source.kind, ())

    def name(p: Path) -> str:
        return p.relative_to(base_dir).as_posix() if relative and p.is_relative_to(base_dir) else str(p)

    if any(ch in configured for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not files:
            raise ReaderError(f"source {source.kind}:{configured}: the pattern matches no file")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _has_ext(p.name, exts)
                       and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
        if not files:
            raise ReaderError(f"source {source.kind}:{configured}: no {'/'.join(exts)} file in the folder {path}")
    elif path.is_file():
        files = [path]
    else:
        raise ReaderError(f"source {source.kind}:{configured}: {path} does not exist")
    return [(str(f), name(f)) for f in files]


def source_files(source: SourceConfig, base_dir: str | Path = ".",
                 storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Each file of a (non-directory) source, as configured, with what identifies its version
    without reading it: ``file`` (the name in sample ids), ``bytes``, and for a remote file its
    ``etag``/``last_modified`` (S3 HEAD or HTTP HEAD), for a local one ``path``."""
    out = []
    for file, display in _resolve_files(source, Path(base_dir).resolve(), storage):
        if is_remote(file):
            try:
                identity = input_identity(file, storage)
            except OSError as e:
                raise _remote_error(source, e) from None
            out.append({**identity, "file": display})
        else:
            out.append({"file": display, "path": file, "bytes": os.path.getsize(file)})
    return out


def _remote_version(source: SourceConfig, file: str, storage: StorageConfig | None) -> str:
    """The planned version of a remote file: its size with ETag/Last-Modified ("" when the server
    sends neither: it is then named by a digest in the fingerprint, which a read cannot check cheaply)."""
    try:
        identity = input_identity(file, storage)
    except OSError as e:
        raise _remote_error(source, e) from None
    if not (identity.get("etag") or identity.get("last_modified")):
        return ""
    return json.dumps([identity.get("bytes"), identity.get("etag"), identity.get("last_modified")])


def _check_version(shard: InputShard) -> None:
    """A remote file must still be the one the shard was planned on: rows from a new version under
    the old plan (and the old fingerprint) would pass stale offsets and counts as fresh."""
    now = _remote_version(shard.source, shard.file, shard.storage)
    if now != shard.version:
        raise ReaderError(f"{shard.file}: changed since the build planned it (was {shard.version}, now {now}); "
                          "rerun the build to plan the new version")


@contextmanager
def _open(file: str, storage: StorageConfig | None) -> Iterator[BinaryIO]:
    """One input file for seekable binary reading, local or remote (infra.remote): every reader opens
    its file here. A file that cannot be opened raises ReaderError naming it."""
    try:
        f = open_input(file, storage)
    except OSError as e:
        raise ReaderError(f"{file}: cannot read ({e})" if not is_remote(file) else str(e)) from None
    with f:
        yield f


def _count_parquet_rows(file: str, storage: StorageConfig | None) -> int:
    with _parquet(file, storage) as pf:
        return pf.metadata.num_rows


@dataclass(frozen=True)
class _CsvPlan:
    rows: int  # rows read (the shards' row numbers)
    malformed: int  # lines of the rows the parser skipped
    block_bytes: int
    strict: bool


def _count_csv_rows(path: str, source: SourceConfig, storage: StorageConfig | None = None) -> _CsvPlan:
    """How a CSV/TSV file is read, and its rows and malformed lines.

    pyarrow's parser is fast and lenient: the parse block starts at ``CSV_BLOCK_BYTES`` and grows
    until the file's longest row fits in one (one huge caption costs that row, later dropped as too
    long, not the file). Lenient means an unclosed quote can merge the lines up to the next quote
    into one row that still has the right number of fields, swallowing valid rows unseen; such a
    row always spans lines. So a file where any row spans lines is read by the strict RFC 4180
    reader instead (Python's csv, slower), which rejects the merged row and counts its lines."""
    block = CSV_BLOCK_BYTES
    while True:
        try:
            names = _csv_header(path, source, block, storage)
            malformed, multiline = [0], [False]
            rows = sum(batch.num_rows for batch in _csv_batches(path, source, names, names, block, malformed,
                                                                 multiline, storage))
            break
        except _RowLongerThanBlock:
            if block >= CSV_MAX_BLOCK_BYTES:
                raise ReaderError(f"{path}: a row is longer than {CSV_MAX_BLOCK_BYTES} bytes") from None
            block = min(block * 4, CSV_MAX_BLOCK_BYTES)
    if not multiline[0]:
        return _CsvPlan(rows, malformed[0], block, False)
    malformed = [0]
    rows = sum(batch.num_rows for batch in _strict_csv_batches(path, source, names[:1], malformed, storage))
    return _CsvPlan(rows, malformed[0], block, True)


def _jsonl_line_offsets(path: str, every: int, storage: StorageConfig | None = None) -> tuple[int, list[int]]:
    """Number of lines, and the byte offset of every ``every``-th line (the shard starts)."""
    offsets: list[int] = []
    lines = 0
    pos = 0
    try:
        with _open(path, storage) as f:
            for line in f:
                if lines % every == 0:
                    offsets.append(pos)
                pos += len(line)
                lines += 1
    except OSError as e:
        raise ReaderError(f"{path}: cannot read ({e})") from None
    return lines, offsets


def _list_directory(folder: Path) -> list[str]:
    members = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and _has_ext(p.name, IMAGE_EXTENSIONS) and not any(s.startswith(".") for s in rel.parts):
            members.append(rel.as_posix())
    return members


def _source_folder(source: SourceConfig, base: Path) -> Path:
    """A ``directory`` source's folder (ReaderError if it is not one)."""
    folder = Path(source.path) if os.path.isabs(source.path) else base / source.path
    if not folder.is_dir():
        raise ReaderError(f"source {source.kind}:{source.path}: {folder} is not a folder")
    return folder


def check_source(source: SourceConfig, base_dir: str | Path = ".", storage: StorageConfig | None = None) -> int:
    """Check, without reading rows, that a source's files exist and are readable (ReaderError naming
    the source and the file otherwise); returns the number of files (a folder source counts as one).
    A remote source's files are listed and asked for their identity (HEAD), with ``storage`` for s3://."""
    base = Path(base_dir).resolve()
    if is_remote(source.path):
        return len(source_files(source, base, storage))
    if source.kind == "directory":
        paths = [_source_folder(source, base)]
    else:
        paths = [p for p, _ in _resolve_files(source, base)]
    for path in paths:
        if not os.access(path, os.R_OK):
            raise ReaderError(f"source {source.kind}:{source.path}: {path} is not readable (permission denied)")
    return len(paths)


def plan_input_shards(sources: Sequence[SourceConfig], base_dir: str | Path = ".",
                      storage: StorageConfig | None = None) -> list[InputShard]:
    """Split every source into input shards of ``rows_per_input_shard`` rows (one per tar file).

    Deterministic: the same sources and files give the same shard ids and slices. Relative source
    paths are resolved against ``base_dir``; ``s3://`` paths are read with ``storage`` (the build's
    endpoint and credentials), ``http(s)://`` ones directly. Every error is raised here, before any work.
    """
    base = Path(base_dir).resolve()
    shards: list[InputShard] = []
    for index, source in enumerate(sources):
        name = f"{source.kind}:{source.path}"
        per = source.rows_per_input_shard
        if per <= 0:
            raise ReaderError(f"source {name}: rows_per_input_shard must be > 0")
        n = 0

        remote = is_remote(source.path)
        if remote:
            _check_remote_kind(source)
        opener = storage if remote else None

        def add(**kw: Any) -> None:
            nonlocal n
            shards.append(InputShard(shard_id=f"s{index}-{n:05d}", source=source, source_name=name,
                                     storage=opener, **kw))
            n += 1

        if source.kind == "directory":
            folder = _source_folder(source, base)
            members = _list_directory(folder)
            for i in range(0, len(members), per):
                add(file=str(folder), display_file=source.path.rstrip("/"), members=tuple(members[i:i + per]))
            continue
        for path, display in _resolve_files(source, base, storage):
            # A remote file's version now (and a check that it is there: a tar is opened only on a worker).
            version = _remote_version(source, path, storage) if remote else ""
            if source.kind == "webdataset":
                add(file=str(path), display_file=display, version=version)
                continue
            if source.kind == "jsonl":
                lines, offsets = _jsonl_line_offsets(path, per, opener)
                for k, off in enumerate(offsets):
                    add(file=str(path), display_file=display, start=k * per, stop=min(lines, (k + 1) * per),
                        byte_offset=off, version=version)
                continue
            if source.kind in ("parquet", "openclipart", "emoji"):
                rows, how = _count_parquet_rows(path, opener), _CsvPlan(0, 0, 0, False)
            else:
                how = _count_csv_rows(path, source, opener)
                rows = how.rows
            for start in range(0, max(rows, 1 if how.malformed else 0), per):
                # Malformed CSV rows have no row number: the file's first shard counts them all.
                add(file=str(path), display_file=display, start=start, stop=start + per if start + per < rows else None,
                    malformed_rows=how.malformed if start == 0 else 0, csv_block_bytes=how.block_bytes,
                    csv_strict=how.strict, version=version)
    return shards


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


class _Rows:
    """The candidate rows of one shard (row by row, or whole column chunks) and the read stage's counts."""

    def __init__(self) -> None:
        self.sample_id: list[str] = []
        self.caption: list[str | None] = []
        self.url: list[str | None] = []
        self.image: list[bytes | None] = []
        self.meta: list[str | None] = []
        self.chunks: list[pa.Table] = []  # without `source`, which is added once at the end
        self.seen = 0
        self.dropped: Counter = Counter()
        self.errors: Counter = Counter()  # kept rows with a reader_error, by kind

    def add(self, sample_id: str, caption: str | None, url: str | None, image: bytes | None,
            meta: dict[str, Any] | None, error: str | None = None) -> None:
        self.seen += 1
        if error:
            meta = {**(meta or {}), READER_ERROR_KEY: error}
            self.errors[error.split(":", 1)[0]] += 1
        self.sample_id.append(sample_id)
        self.caption.append(caption)
        self.url.append(url)
        self.image.append(image)
        self.meta.append(_json(meta) if meta else None)

    def add_columns(self, sample_id: pa.Array, caption: pa.Array, url: pa.Array, image: pa.Array, meta: pa.Array) -> None:
        self._flush()
        self.seen += len(sample_id)
        self.chunks.append(pa.table({"sample_id": sample_id, "caption": caption, "url": url, "image": image,
                                     "meta": meta}))

    def drop(self, reason: str, count: int = 1) -> None:
        self.seen += count
        self.dropped[reason] += count

    def _flush(self) -> None:
        if self.sample_id:
            self.chunks.append(pa.table({
                "sample_id": pa.array(self.sample_id, pa.string()), "caption": pa.array(self.caption, pa.string()),
                "url": pa.array(self.url, pa.string()), "image": pa.array(self.image, pa.binary()),
                "meta": pa.array(self.meta, pa.string())}))
            self.sample_id, self.caption, self.url, self.image, self.meta = [], [], [], [], []

    def table(self, source_name: str) -> pa.Table:
        self._flush()
        names = ["sample_id", "caption", "url", "image", "meta"]
        body = (pa.concat_tables([c.select(names) for c in self.chunks]) if self.chunks
                else pa.table({n: pa.array([], CANDIDATE_SCHEMA.field(n).type) for n in names}))
        body = body.combine_chunks()
        columns = {n: body.column(n) for n in names}
        columns["source"] = pa.array([source_name] * body.num_rows, pa.string())
        return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in CANDIDATE_SCHEMA], schema=CANDIDATE_SCHEMA)


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, sort_keys=True)


def _read_local(path: str, relative_to: Path) -> tuple[bytes | None, str | None]:
    p = Path(path)
    if not p.is_absolute():
        p = relative_to / p
    try:
        return p.read_bytes(), None
    except OSError as e:
        return None, f"unreadable_path: {p}: {e.strerror or e}"


def _decode_inline(value: Any) -> tuple[bytes | None, str | None]:
    """Inline image bytes: binary as is, text as base64 (CSV/JSONL cannot hold raw bytes)."""
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True), None
        except (binascii.Error, ValueError) as e:
            return None, f"bad_inline_image: not base64 ({e})"
    return None, f"bad_inline_image: unexpected {type(value).__name__}"


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


@dataclass(frozen=True)
class _Columns:
    """Which manifest columns to read, checked against the file's header."""

    caption: str
    url: str | None
    image: str | None
    path: str | None
    id: str | None
    extra: tuple[str, ...]  # kept in meta (img2dataset's status/error_message, the caption policy's fields)

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.caption, self.url, self.image, self.path, self.id, *self.extra) if c))


def _columns_for(source: SourceConfig, available: Sequence[str], file: str) -> _Columns:
    have = set(available)

    def need(column: str, key: str) -> str:
        if column not in have:
            raise ReaderError(f"{file}: column {column!r} (sources.{key}) not found; columns are {sorted(have)}")
        return column

    image, id_column, extra = source.image_column, source.id_column, ()
    if _IMG2DATASET_COLUMNS <= have:  # img2dataset's own output: its key is the stable id
        extra = ("status", "error_message")
        id_column = id_column or "key"
        image = image or next((c for c in _IMG2DATASET_IMAGE_COLUMNS if c in have), None)
    caption = need(source.caption_column, "caption_column")
    # The caption policy's other fields are columns too, kept in meta under their names (tasks/captions.py)
    texts = tuple(need(f, "caption.fields") for f in source.caption.text_fields() if f != "caption" and f not in extra)
    extra = (*extra, *texts)
    image = need(image, "image_column") if image else None
    path = need(source.path_column, "path_column") if source.path_column else None
    id_column = need(id_column, "id_column") if id_column else None
    url = source.url_column if source.url_column in have else None
    if url is None and image is None and path is None:
        need(source.url_column, "url_column")  # raises: nothing would give an image
    return _Columns(caption, url, image, path, id_column, extra)


def _manifest_row(rows: _Rows, shard: InputShard, cols: _Columns, record: dict[str, Any], row_number: int,
                  folder: Path) -> None:
    ident = record.get(cols.id) if cols.id else None
    key = _as_text(ident) if ident is not None else str(row_number)
    sample_id = f"{shard.source.kind}:{shard.display_file}#{key}"
    image, error = _decode_inline(record.get(cols.image)) if cols.image else (None, None)
    if image is None and error is None and cols.path and record.get(cols.path):
        image, error = _read_local(str(record[cols.path]), folder)
    meta: dict[str, Any] = {"row": row_number}
    if cols.id and ident is None:
        meta["missing_id"] = True
    for c in cols.extra:
        meta[c] = record.get(c)
    if cols.path and record.get(cols.path):
        meta["path"] = record[cols.path]
    url = _as_text(record.get(cols.url)) if cols.url else None
    rows.add(sample_id, _as_text(record.get(cols.caption)), url or None, image, meta, error)


def _text_column(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as UTF-8 text; values Arrow cannot cast (bad UTF-8, nested) are converted one by one."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.array([_as_text(v) for v in column.to_pylist()], pa.string())


def _caption_column(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """A caption column as text, and a mask of the values that are not valid UTF-8 (None: all are).

    Those rows are dropped as ``bad_utf8``: replacing the bytes would turn a bad encoding into a
    caption with U+FFFD in it, which is a different finding."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        try:
            return column.cast(pa.string()), None  # validates: the common case stays vectorised
        except pa.ArrowInvalid:
            pass
        values = column.to_pylist()
        bad = [v is not None and not _valid_utf8(v) for v in values]
        return pa.array([None if b else v.decode("utf-8") if v is not None else None
                         for v, b in zip(values, bad)], pa.string()), pa.array(bad, pa.bool_())
    return _text_column(column), None


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _manifest_columns(rows: _Rows, shard: InputShard, cols: _Columns, table: pa.Table, first_row: int,
                      folder: Path) -> None:
    """Contiguous manifest rows ``first_row ...`` as candidate columns: Arrow kernels for the common
    case, Python only for the rows that need it (local paths, base64 text, metadata beyond the row).
    Rows whose caption is not valid UTF-8 are dropped as ``bad_utf8``."""
    numbers = pa.array(range(first_row, first_row + table.num_rows), pa.int64())
    caption, bad = _caption_column(table.column(cols.caption))
    if bad is not None:
        good = pc.invert(bad)
        rows.drop(BAD_UTF8, table.num_rows - pc.sum(good.cast(pa.int64())).as_py())
        table, numbers, caption = table.filter(good), numbers.filter(good), caption.filter(good)
    n = table.num_rows
    if n == 0:
        return
    row_numbers = numbers.to_pylist()
    number_text = numbers.cast(pa.string())
    key, missing_id = number_text, None
    if cols.id:
        ids = _text_column(table.column(cols.id))
        missing_id = ids.is_null().to_pylist() if ids.null_count else None
        key = pc.coalesce(ids, number_text)
    sample_id = pc.binary_join_element_wise(f"{shard.source.kind}:{shard.display_file}#", key, "")
    url = pa.nulls(n, pa.string())
    if cols.url:
        url = _text_column(table.column(cols.url))
        url = pc.if_else(pc.equal(url, ""), pa.scalar(None, pa.string()), url)

    images: list[bytes | None] | pa.Array = pa.nulls(n, pa.binary())
    errors: dict[int, str] = {}
    if cols.image:
        column = table.column(cols.image).combine_chunks()
        if (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)) and shard.source.kind == "parquet":
            images = column.cast(pa.binary())
        else:  # text (CSV/TSV cells are read as bytes): base64
            images = []
            for i, value in enumerate(column.to_pylist()):
                data, error = _decode_inline(value.decode("ascii", errors="replace") if isinstance(value, bytes)
                                             else value)
                images.append(data)
                if error:
                    errors[i] = error
    paths = _text_column(table.column(cols.path)).to_pylist() if cols.path else None
    if paths is not None:
        if isinstance(images, pa.Array):
            images = images.to_pylist()
        for i, p in enumerate(paths):
            if p and images[i] is None and i not in errors:
                images[i], error = _read_local(str(p), folder)
                if error:
                    errors[i] = error

    extras = {c: table.column(c).to_pylist() for c in cols.extra}
    meta: pa.Array | list[str] = pc.binary_join_element_wise('{"row": ', number_text, "}", "")
    special = set(errors) | {i for i, p in enumerate(paths or ()) if p}
    special |= {i for i, m in enumerate(missing_id or ()) if m}
    if extras:
        special = set(range(n))
    if special:
        meta = meta.to_pylist()
        for i in special:
            d: dict[str, Any] = {"row": row_numbers[i], **{c: _as_text(v[i]) if isinstance(v[i], bytes) else v[i]
                                                          for c, v in extras.items()}}
            if paths and paths[i]:
                d["path"] = paths[i]
            if missing_id and missing_id[i]:
                d["missing_id"] = True
            if i in errors:
                d[READER_ERROR_KEY] = errors[i]
                rows.errors[errors[i].split(":", 1)[0]] += 1
            meta[i] = _json(d)
    rows.add_columns(sample_id, caption, url, pa.array(images, pa.binary()) if isinstance(images, list) else images,
                     pa.array(meta, pa.string()) if isinstance(meta, list) else meta)


@contextmanager
def _parquet(path: str, storage: StorageConfig | None) -> Iterator[pq.ParquetFile]:
    """A Parquet file, open while the block runs (remote: the footer and row groups by ranged reads)."""
    with _open(path, storage) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise ReaderError(f"{path}: not a readable Parquet file ({e})") from None
        with pf:
            yield pf


def _parquet_rows(pf: pq.ParquetFile, path: str, columns: list[str], start: int, stop: int | None) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that overlap them."""
    stop = pf.metadata.num_rows if stop is None else stop
    groups, first_row, offset = [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > start and offset < stop:
            if not groups:
                first_row = offset
            groups.append(g)
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    try:
        table = pf.read_row_groups(groups, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise ReaderError(f"{path}: cannot read rows {start}-{stop} ({e})") from None
    return table.slice(start - first_row, stop - start)


def _read_parquet(shard: InputShard, rows: _Rows) -> None:
    with _parquet(shard.file, shard.storage) as pf:
        cols = _columns_for(shard.source, pf.schema_arrow.names, shard.file)
        table = _parquet_rows(pf, shard.file, cols.names, shard.start, shard.stop)
    _manifest_columns(rows, shard, cols, table, shard.start, Path(shard.file).parent)


def _csv_parse_options(source: SourceConfig, on_invalid: Any) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if source.kind == "tsv" else ",", newlines_in_values=True,
                              invalid_row_handler=on_invalid)


class _RowLongerThanBlock(Exception):
    """A CSV row does not fit in one parse block (planning then retries with larger blocks)."""


def _read_options(block_bytes: int) -> pacsv.ReadOptions:
    return pacsv.ReadOptions(block_size=block_bytes or CSV_BLOCK_BYTES, use_threads=False)  # a Ray worker has one CPU


def _csv_error(path: str, source: SourceConfig, e: Exception) -> Exception:
    if "straddl" in str(e):  # pyarrow: "straddling object straddles two block boundaries"
        return _RowLongerThanBlock(str(e))
    return ReaderError(f"{path}: not a readable {source.kind.upper()} file ({e})")


_CODECS = {".gz": "gzip", ".tgz": "gzip", ".bz2": "bz2", ".zst": "zstd"}


@contextmanager
def _text_stream(path: str, storage: StorageConfig | None) -> Iterator[pa.NativeFile]:
    """A CSV/TSV file as a decompressed stream (the codec by the file name's extension)."""
    codec = next((c for ext, c in _CODECS.items() if path.lower().endswith(ext)), None)
    if not is_remote(path):  # Arrow's own file: half the time of a Python file object for a local CSV
        with pa.input_stream(path, compression=codec) as stream:
            yield stream
        return
    with _open(path, storage) as f, pa.input_stream(f, compression=codec) as stream:
        yield stream


def _csv_header(path: str, source: SourceConfig, block_bytes: int = 0,
                storage: StorageConfig | None = None) -> list[str]:
    try:
        with _text_stream(path, storage) as stream:
            return pacsv.open_csv(stream, read_options=_read_options(block_bytes),
                                  parse_options=_csv_parse_options(source, lambda row: "skip")).schema.names
    except (pa.ArrowInvalid, OSError) as e:
        raise _csv_error(path, source, e) from None


def _csv_batches(path: str, source: SourceConfig, names: Sequence[str], columns: Sequence[str],
                 block_bytes: int = 0, malformed: list[int] | None = None,
                 multiline: list[bool] | None = None, storage: StorageConfig | None = None) -> Iterator[pa.RecordBatch]:
    """The file's record batches by pyarrow (the same rows on every call, whatever the block size).

    ``malformed[0]`` counts the lines of the rows the parser skipped (an unclosed quote merges the
    lines up to the next quote into one bad row, and each of those lines was meant as a row);
    ``multiline[0]`` is set when a row spans lines (see :func:`_count_csv_rows`)."""
    def on_invalid(row: Any) -> str:
        breaks = len(_LINE_BREAK.findall(row.text or ""))
        if malformed is not None:
            malformed[0] += 1 + breaks
        if multiline is not None and breaks:
            multiline[0] = True
        return "skip"

    # Every column as bytes: ids like "00012" and numeric-looking captions survive unchanged, and
    # a caption that is not UTF-8 costs its row (checked per column), not the file.
    convert = pacsv.ConvertOptions(include_columns=list(columns), strings_can_be_null=True,
                                   column_types={n: pa.binary() for n in names})
    try:
        with _text_stream(path, storage) as stream:
            for batch in pacsv.open_csv(stream, read_options=_read_options(block_bytes),
                                        parse_options=_csv_parse_options(source, on_invalid), convert_options=convert):
                if multiline is not None and not multiline[0]:
                    multiline[0] = any(pc.any(pc.match_substring_regex(c, "[\r\n]")).as_py() for c in batch.columns)
                yield batch
    except (pa.ArrowInvalid, OSError) as e:
        raise _csv_error(path, source, e) from None


STRICT_BATCH_ROWS = 65_536


def _strict_csv_batches(path: str, source: SourceConfig, columns: Sequence[str],
                        malformed: list[int] | None = None,
                        storage: StorageConfig | None = None) -> Iterator[pa.RecordBatch]:
    """The file's rows by Python's csv reader in strict mode (RFC 4180: a closing quote must end its
    field), as batches of bytes columns like :func:`_csv_batches`. A row it rejects, or one with the
    wrong number of fields, is skipped; ``malformed[0]`` counts the lines it took."""
    # The reader's field limit is process-wide; a long caption must reach the text filter (too_long).
    csv.field_size_limit(max(csv.field_size_limit(), CSV_MAX_BLOCK_BYTES))
    delimiter = "\t" if source.kind == "tsv" else ","
    bad = 0
    try:
        with _text_stream(path, storage) as stream:
            # surrogateescape keeps bytes that are not UTF-8, so a bad caption costs its row only.
            text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
            reader = csv.reader(text, delimiter=delimiter, strict=True)
            header = next(reader, [])
            where = [header.index(c) for c in columns]
            values: list[list[bytes | None]] = [[] for _ in columns]
            line = reader.line_num
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error:
                    bad += reader.line_num - line
                    line = reader.line_num
                    continue
                if row and len(row) != len(header):
                    bad += reader.line_num - line
                if row and len(row) == len(header):
                    for out, i in zip(values, where):
                        out.append(row[i].encode("utf-8", "surrogateescape") if row[i] else None)
                    if len(values[0]) >= STRICT_BATCH_ROWS:
                        yield pa.record_batch([pa.array(v, pa.binary()) for v in values], names=list(columns))
                        values = [[] for _ in columns]
                line = reader.line_num
            if values and values[0]:
                yield pa.record_batch([pa.array(v, pa.binary()) for v in values], names=list(columns))
    except (OSError, ValueError) as e:
        raise ReaderError(f"{path}: not a readable {source.kind.upper()} file ({e})") from None
    if malformed is not None:
        malformed[0] += bad


def _read_csv(shard: InputShard, rows: _Rows) -> None:
    path = shard.file
    names = _csv_header(path, shard.source, shard.csv_block_bytes, shard.storage)
    cols = _columns_for(shard.source, names, shard.file)
    if shard.malformed_rows:
        rows.drop("bad_csv_row", shard.malformed_rows)
    start, stop = shard.start, shard.stop
    row = 0  # index of the batch's first row in the file
    batches = (_strict_csv_batches(path, shard.source, cols.names, storage=shard.storage) if shard.csv_strict
               else _csv_batches(path, shard.source, names, cols.names, shard.csv_block_bytes, storage=shard.storage))
    for batch in batches:
        if stop is not None and row >= stop:
            break
        n = batch.num_rows
        if row + n > start:  # CSV has no index: earlier shards' rows are parsed and skipped
            lo, hi = max(0, start - row), n if stop is None else min(n, stop - row)
            _manifest_columns(rows, shard, cols, pa.Table.from_batches([batch.slice(lo, hi - lo)]), row + lo,
                              Path(path).parent)
        row += n


def _read_jsonl(shard: InputShard, rows: _Rows) -> None:
    path = Path(shard.file)  # a local manifest's folder: where its relative image paths start
    stop = shard.stop if shard.stop is not None else float("inf")
    records: list[tuple[int, dict]] = []
    try:
        with _open(shard.file, shard.storage) as f:
            f.seek(shard.byte_offset)
            line_no = shard.start
            for raw in f:
                if line_no >= stop:
                    break
                line_no += 1
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError:
                    rows.drop(BAD_UTF8)
                    continue
                except json.JSONDecodeError:
                    rows.drop("bad_json_line")
                    continue
                if not isinstance(record, dict):
                    rows.drop("bad_json_line")
                    continue
                records.append((line_no - 1, record))
    except OSError as e:
        raise ReaderError(f"{shard.file}: cannot read ({e})") from None
    if not records:
        return
    keys = set().union(*(r.keys() for _, r in records))
    cols = _columns_for(shard.source, sorted(keys), shard.file)
    for line_no, record in records:
        _manifest_row(rows, shard, cols, record, line_no, path.parent)


def _split_key(member: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/key.ext.ext2`` -> (``dir/key``, ``ext.ext2``), by the first dot of the name."""
    folder, _, name = member.rpartition("/")
    stem, dot, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _read_webdataset(shard: InputShard, rows: _Rows) -> None:
    with _open(shard.file, shard.storage) as f:
        _read_tar(shard, f, rows)


def _read_tar(shard: InputShard, f: BinaryIO, rows: _Rows) -> None:
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    try:
        tar = tarfile.open(fileobj=f, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ReaderError(f"{shard.file}: not a readable tar file ({e})") from None
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                try:
                    handle = tar.extractfile(member)
                    samples[key][ext] = handle.read() if handle else None
                except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                    samples[key]["__error__"] = f"broken_member: {member.name}: {e}"
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            # Truncated or corrupt past this point: keep what was read, count the rest as one loss.
            rows.drop("broken_tar")
            log_event(log, "tar ends early; keeping the members read so far", level=30, file=shard.file,
                      samples_read=len(order), error=str(e))
    caption_key = shard.source.caption_column
    for key in order:
        parts = samples[key]
        error = parts.pop("__error__", None)
        image_ext = next((e for e in parts if ("." + e.rsplit(".", 1)[-1]) in IMAGE_EXTENSIONS), None)
        image = parts.get(image_ext) if image_ext else None
        meta: dict[str, Any] = {"key": key}
        caption, url = None, None
        if parts.get("json") is not None:
            try:
                info = json.loads(parts["json"])
                if isinstance(info, dict):
                    caption = _as_text(info.get(caption_key))
                    url = _as_text(info.get(shard.source.url_column))
                    meta.update({k: v for k, v in info.items() if k not in (caption_key,)})
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                error = error or f"bad_json_member: {key}.json: {e}"
        if parts.get("txt") is not None:
            if not _valid_utf8(parts["txt"]):
                rows.drop(BAD_UTF8)
                continue
            caption = parts["txt"].decode("utf-8")
        if image is None and error is None and not url:
            error = f"no_image_member: {key}"
        rows.add(f"webdataset:{shard.display_file}#{key}", caption, url or None, image, meta, error)


def _read_directory(shard: InputShard, rows: _Rows) -> None:
    folder = Path(shard.file)
    for rel in shard.members:
        image, error = _read_local(rel, folder)
        image_path = folder / rel
        caption: str | None = None
        meta: dict[str, Any] = {"path": rel}
        # "a.b.jpg" pairs with "a.b.txt" (only the image extension is replaced).
        txt, js = image_path.with_name(image_path.stem + ".txt"), image_path.with_name(image_path.stem + ".json")
        try:
            if txt.is_file():
                raw = txt.read_bytes()
                if not _valid_utf8(raw):
                    rows.drop(BAD_UTF8)
                    continue
                caption = raw.decode("utf-8")
            elif js.is_file():
                info = json.loads(js.read_bytes())
                if isinstance(info, dict):
                    caption = _as_text(info.get(shard.source.caption_column))
                    meta.update({k: v for k, v in info.items() if k != shard.source.caption_column})
            else:
                meta["missing_sidecar"] = True
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            error = error or f"unreadable_sidecar: {e}"
        rows.add(f"directory:{shard.display_file}/{rel}", caption, None, image, meta, error)


def _packaged_table(shard: InputShard, schema: pa.Schema, columns: list[str], what: str) -> pa.Table:
    with _parquet(shard.file, shard.storage) as pf:
        missing = [f.name for f in schema if f.name not in pf.schema_arrow.names]
        if missing:
            raise ReaderError(f"{shard.file}: column(s) {missing} of the {what} table not found "
                              f"(regenerate it with python -m infra.{what.lower()})")
        return _parquet_rows(pf, shard.file, columns, shard.start, shard.stop)


def _read_openclipart(shard: InputShard, rows: _Rows) -> None:
    from infra.openclipart import OPENCLIPART_SCHEMA, excluded_from_training

    table = _packaged_table(shard, OPENCLIPART_SCHEMA, ["id", "category", "title", "keywords", "description", "image"],
                            "Openclipart")
    for r in table.to_pylist():
        if excluded_from_training(r["id"], r["title"], r["keywords"]):
            rows.drop("heldout")
            continue
        meta = {"id": r["id"], "category": r["category"], "title": r["title"], "keywords": r["keywords"],
                "description": r["description"], "file_name": _file_name_text(r["id"])}
        rows.add(f"openclipart:{r['id']}", r["title"], None, r["image"], meta)


def _read_emoji(shard: InputShard, rows: _Rows) -> None:
    from infra.emoji import is_heldout
    from infra.schema import EMOJI_SCHEMA

    table = _packaged_table(shard, EMOJI_SCHEMA, ["id", "unified", "name", "keywords", "category", "subcategory",
                                                  "image"], "Emoji")
    for r in table.to_pylist():
        if is_heldout(r["unified"]):  # every vendor's drawing of a held-out emoji
            rows.drop("heldout")
            continue
        meta = {"id": r["id"], "name": r["name"], "keywords": r["keywords"], "category": r["category"],
                "subcategory": r["subcategory"]}
        rows.add(f"emoji:{r['id']}", r["name"], None, r["image"], meta)


def _file_name_text(path: str) -> str:
    """A file's name as caption text (a text field like the others): extension off, ``_``/``-`` as spaces."""
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


_READERS = {"parquet": _read_parquet, "csv": _read_csv, "tsv": _read_csv, "jsonl": _read_jsonl,
            "webdataset": _read_webdataset, "directory": _read_directory, "openclipart": _read_openclipart,
            "emoji": _read_emoji}


def read_input_shard_with_funnel(shard: InputShard) -> tuple[pa.Table, Funnel]:
    """Read one input shard; the funnel's ``read`` stage counts rows seen, dropped (by reason) and kept."""
    rows = _Rows()
    if shard.version:
        _check_version(shard)
    _READERS[shard.source.kind](shard, rows)
    table = rows.table(shard.source_name)
    funnel = Funnel()
    funnel.record(READ_STAGE, rows.seen, table.num_rows)
    funnel.stage(READ_STAGE).dropped.update(rows.dropped)
    if rows.errors or rows.dropped:
        log_event(log, "read shard with bad rows", level=30 if rows.errors or set(rows.dropped) - {"heldout"} else 20,
                  shard=shard.shard_id, file=shard.display_file, rows=table.num_rows,
                  **{f"dropped_{k}": v for k, v in rows.dropped.items()},
                  **{f"kept_with_{k}": v for k, v in rows.errors.items()})
    return table, funnel


def read_input_shard(shard: InputShard) -> pa.Table:
    """Read one input shard as a CANDIDATE_SCHEMA table (see the module docstring for bad rows)."""
    return read_input_shard_with_funnel(shard)[0]
