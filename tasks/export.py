"""Export a built dataset in the layouts the field's trainers read.

* ``webdataset``: ``00000.tar`` … one tar per manifest shard, each sample ``<key>.jpg|png|webp`` +
  ``<key>.txt`` (the caption) + ``<key>.json`` (its metadata: sample id, url, source, size, sha256,
  query ids, the reader's meta), and ``sizes.json`` (samples per tar), as OpenCLIP's
  ``--dataset-type webdataset`` and img2dataset's output look. WebDataset splits a member name at
  the first dot of its base name and keeps the folders in the key, so keys are ``<tar>_<row>``
  digits only; the sample id (which has dots, slashes and colons) travels in the ``.json``.
  Written beside them: ``00000_stats.json`` … (the resume records) and ``export.json``.
* ``csv``: ``images/<tar>/<key>.<ext>`` files and ``train.tsv`` (``filepath`` and ``title``
  columns, tab-separated, quoted where needed), OpenCLIP's ``--dataset-type csv`` defaults;
  ``parts/00000.tsv`` + ``parts/00000_stats.json`` per shard, concatenated into ``train.tsv``.

A row with an empty caption is left out of both (OpenCLIP would train on an empty text), and in
``csv`` a caption pandas reads as missing ("NA", "null", ...: it would train as "nan"); both are
counted per reason in the export record.

Streaming: a shard is read a record batch at a time and its tar written to a local temporary file,
then copied to the output atomically (local or s3://). Resumable: each output shard is followed by
its stats record naming the source shard's sha256 and the export settings; a rerun skips the
shards whose record matches and redoes the others. Tars are byte-for-byte reproducible (fixed
member order, mtime and owner), so a redone shard is the same file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow.parquet as pq

from infra.config import StorageConfig
from infra.fanout import map_shards, values_or_raise
from infra.imaging import decode_rgb
from infra.log import get_logger, log_event
from infra.manifest import ShardEntry, manifest_location, read_manifest
from infra.storage import ObjectStore, file_sha256

log = get_logger(__name__)

FORMATS = ("webdataset", "csv")
SPLITS = ("train", "holdout")
EXPORT_RECORD = "export.json"
SIZES_NAME = "sizes.json"  # OpenCLIP's get_dataset_size reads it beside the tars
TSV_NAME = "train.tsv"
TSV_COLUMNS = ("filepath", "title")  # OpenCLIP's --csv-img-key / --csv-caption-key defaults
EXPORT_VERSION = 1  # bump when a member's name or content changes: older outputs are redone
# OpenCLIP's pipeline renames image="jpg;png;jpeg;webp"; other stored formats are re-encoded to PNG.
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_READ_COLUMNS = ["sample_id", "source", "caption", "url", "image", "image_format", "width", "height", "sha256",
                 "query_ids", "meta"]
_BATCH_ROWS = 256
# pandas' read_csv (OpenCLIP's csv loader) reads these cells as missing, quoted or not, so such a
# caption would train as "nan": the csv export leaves those rows out (counted).
PANDAS_NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                               "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class ExportError(ValueError):
    """An export that cannot run (unknown format, empty split); the message names the manifest."""


@dataclass(frozen=True)
class ExportJob:
    """One output shard: the manifest shard it is made from."""

    key: str  # "00042": the tar's (or image folder's) name
    shard: ShardEntry


@dataclass(frozen=True)
class ExportContext:
    dataset_root: str
    output_root: str
    storage: StorageConfig | None
    format: str
    fingerprint: str  # the settings that shape an output shard


@dataclass(frozen=True)
class ExportedShard:
    name: str  # "00042.tar", or "00042" (csv: the image folder, whose TSV rows are in parts/)
    rows: int
    bytes: int
    sha256: str
    source: str  # the manifest shard's path
    source_sha256: str
    reencoded: int  # images stored in a format OpenCLIP does not read, written as PNG
    left_out: dict[str, int]  # rows not exported, by reason (empty_caption, csv_na_caption)
    skipped: bool  # already complete from an earlier run

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256,
                "source": self.source, "source_sha256": self.source_sha256, "reencoded": self.reencoded,
                "left_out": self.left_out}


def sample_key(shard_index: int, row: int) -> str:
    """A WebDataset-safe key: digits and one underscore, no dot or slash (unique within the export)."""
    return f"{shard_index:05d}_{row:06d}"


def _image_member(image: bytes, image_format: str | None) -> tuple[str, bytes, bool]:
    """(extension, bytes, re-encoded?) of a stored image as OpenCLIP's pipeline reads it."""
    ext = _EXTENSIONS.get((image_format or "").upper())
    if ext:
        return ext, image, False
    buf = io.BytesIO()
    decode_rgb(image).save(buf, format="PNG")
    return "png", buf.getvalue(), True


def _metadata(key: str, row: dict[str, Any]) -> dict[str, Any]:
    meta: Any = row.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            pass
    return {"key": key, "sample_id": row["sample_id"], "caption": row["caption"], "url": row.get("url"),
            "source": row.get("source"), "width": row.get("width"), "height": row.get("height"),
            "image_format": row.get("image_format"), "sha256": row.get("sha256"),
            "query_ids": row.get("query_ids"), "meta": meta}


def _rows(dataset: ObjectStore, shard: ShardEntry, left_out: Counter[str], fmt: str) -> Iterator[dict[str, Any]]:
    """The shard's exportable rows, a record batch at a time (never the whole shard in memory);
    ``left_out`` counts the others by reason."""
    with dataset.filesystem.open_input_file(dataset.fs_path(shard.path)) as f:
        parquet = pq.ParquetFile(f)
        if parquet.metadata.num_rows != shard.rows:
            raise ValueError(f"{dataset.uri(shard.path)}: {parquet.metadata.num_rows} rows, the manifest says {shard.rows}")
        columns = [c for c in _READ_COLUMNS if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                caption = row["caption"]
                if not caption or not caption.strip():
                    left_out["empty_caption"] += 1
                elif fmt == "csv" and caption in PANDAS_NA_STRINGS:
                    left_out["csv_na_caption"] += 1
                else:
                    yield row


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible tars: the same shard gives the same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_tar(job: ExportJob, dataset: ObjectStore, out: ObjectStore,
               left_out: Counter[str]) -> tuple[int, int, str, int]:
    index = int(job.key)
    rows = reencoded = 0
    with tempfile.TemporaryDirectory(prefix="witflow-export-") as tmp:
        path = os.path.join(tmp, f"{job.key}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in _rows(dataset, job.shard, left_out, "webdataset"):
                key = sample_key(index, rows)
                ext, image, converted = _image_member(row["image"], row.get("image_format"))
                reencoded += converted
                _add_member(tar, f"{key}.{ext}", image)
                _add_member(tar, f"{key}.txt", row["caption"].encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(_metadata(key, row), ensure_ascii=False,
                                                          sort_keys=True).encode("utf-8"))
                rows += 1
        size, sha = os.path.getsize(path), file_sha256(path)
        out.write_file(f"{job.key}.tar", path)
    return rows, size, sha, reencoded


def _write_images_and_tsv(job: ExportJob, dataset: ObjectStore, out: ObjectStore, left_out: Counter[str]) -> tuple[int, int, str, int]:
    index = int(job.key)
    rows = reencoded = size = 0
    lines = io.StringIO()
    writer = csv.writer(lines, delimiter="\t", lineterminator="\n")
    for row in _rows(dataset, job.shard, left_out, "csv"):
        key = sample_key(index, rows)
        ext, image, converted = _image_member(row["image"], row.get("image_format"))
        reencoded += converted
        image_key = f"images/{job.key}/{key}.{ext}"
        out.write_bytes(image_key, image)
        # OpenCLIP opens the path as given: absolute for a local export; relative to the export's
        # folder in object storage (copy it down and run from there).
        writer.writerow([image_key if out.is_s3 else out.uri(image_key), row["caption"]])
        size += len(image)
        rows += 1
    tsv = lines.getvalue().encode("utf-8")
    out.write_bytes(f"parts/{job.key}.tsv", tsv)
    return rows, size + len(tsv), hashlib.sha256(tsv).hexdigest(), reencoded


def _output_name(job: ExportJob, fmt: str) -> str:
    return f"{job.key}.tar" if fmt == "webdataset" else job.key


def export_shard(job: ExportJob, ctx: ExportContext) -> ExportedShard:
    """Write one output shard (or keep it, when an earlier run made it from the same shard and settings)."""
    dataset, out = ObjectStore(ctx.dataset_root, ctx.storage), ObjectStore(ctx.output_root, ctx.storage)
    record_key = _record_key(job.key, ctx.format)
    name = _output_name(job, ctx.format)
    if out.exists(record_key):
        record = out.read_json(record_key)
        present = out.exists(name) if ctx.format == "webdataset" else out.exists(f"parts/{job.key}.tsv")
        if (present and record.get("source_sha256") == job.shard.sha256
                and record.get("fingerprint") == ctx.fingerprint):
            return ExportedShard(name=name, rows=record["rows"], bytes=record["bytes"], sha256=record["sha256"],
                                 source=job.shard.path, source_sha256=job.shard.sha256,
                                 reencoded=record["reencoded"], left_out=record["left_out"], skipped=True)
    write = _write_tar if ctx.format == "webdataset" else _write_images_and_tsv
    left_out: Counter[str] = Counter()
    rows, size, sha, reencoded = write(job, dataset, out, left_out)
    done = ExportedShard(name=name, rows=rows, bytes=size, sha256=sha, source=job.shard.path,
                         source_sha256=job.shard.sha256, reencoded=reencoded, left_out=dict(left_out), skipped=False)
    out.write_json(record_key, {**done.to_dict(), "fingerprint": ctx.fingerprint})  # last: the shard is complete
    return done


def _fingerprint(fmt: str, output_root: str) -> str:
    # csv rows hold absolute paths of a local export: a moved output is a different one.
    return hashlib.sha256(json.dumps({"version": EXPORT_VERSION, "format": fmt, "root": output_root if fmt == "csv"
                                      else None}).encode()).hexdigest()[:16]


def export_dataset(manifest_uri: str, output_uri: str, *, format: str = "webdataset", split: str = "train",
                   storage: StorageConfig | None = None, use_ray: bool = True) -> dict[str, Any]:
    """Export a build's ``split`` (its training shards, or the held-out ones) to ``output_uri``.

    Returns the export record (also written as ``export.json``): the format, the source manifest,
    every output shard with its rows, bytes and sha256, the sample count and, for ``webdataset``,
    the brace pattern OpenCLIP's ``--train-data`` takes.
    """
    if format not in FORMATS:
        raise ExportError(f"export format {format!r}: expected one of {list(FORMATS)}")
    if split not in SPLITS:
        raise ExportError(f"export split {split!r}: expected one of {list(SPLITS)}")
    manifest = read_manifest(manifest_uri, storage)
    dataset_root, manifest_name = manifest_location(manifest_uri)
    dataset = ObjectStore(dataset_root, storage)
    shards = manifest.shards if split == "train" else (manifest.holdout.shards if manifest.holdout else ())
    shards = tuple(s for s in shards if s.rows > 0)
    if not shards:
        raise ExportError(f"{dataset.uri(manifest_name)}: no {split} shards with rows to export")
    out = ObjectStore(output_uri, storage)
    ctx = ExportContext(dataset_root=dataset.root, output_root=out.root, storage=storage, format=format,
                        fingerprint=_fingerprint(format, out.root))
    jobs = [ExportJob(f"{i:05d}", s) for i, s in enumerate(shards)]
    done: list[ExportedShard] = values_or_raise("export", map_shards(export_shard, jobs, context=ctx,
                                                                     desc=f"export {format}", use_ray=use_ray))
    _remove_stale(out, {j.key for j in jobs}, format)
    total = sum(d.rows for d in done)
    record: dict[str, Any] = {
        "format": format, "split": split, "manifest": dataset.uri(manifest_name), "output": out.root,
        "num_samples": total, "num_shards": len(done), "reencoded": sum(d.reencoded for d in done),
        "left_out": dict(sum((Counter(d.left_out) for d in done), Counter())),
        "shards": [d.to_dict() for d in done],
    }
    if format == "webdataset":
        out.write_json(SIZES_NAME, {d.name: d.rows for d in done})
        record["train_data"] = f"{out.root}/{{{jobs[0].key}..{jobs[-1].key}}}.tar"
    else:
        header = "\t".join(TSV_COLUMNS) + "\n"
        out.write_bytes(TSV_NAME, header.encode() + b"".join(out.read_bytes(f"parts/{j.key}.tsv") for j in jobs))
        record["train_data"] = out.uri(TSV_NAME)
    out.write_json(EXPORT_RECORD, record)
    log_event(log, "exported", format=format, split=split, samples=total, shards=len(done),
              redone=sum(not d.skipped for d in done), output=out.root)
    return record


def _record_key(key: str, fmt: str) -> str:
    return f"{key}_stats.json" if fmt == "webdataset" else f"parts/{key}_stats.json"


def _remove_stale(out: ObjectStore, keep: set[str], fmt: str) -> None:
    """Output shards an earlier, larger export left in the same place (a glob would pick them up)."""
    pattern = r"(\d{5})(\.tar|_stats\.json)" if fmt == "webdataset" else r"parts/(\d{5})(\.tsv|_stats\.json)"
    for key in out.list("" if fmt == "webdataset" else "parts/"):
        match = re.fullmatch(pattern, key)
        if match and match.group(1) not in keep:
            out.delete(key)
            log_event(log, "removed an output shard of an earlier export", key=out.uri(key))


def openclip_train_command(record: dict[str, Any], *, model: str = "RN50", batch_size: int = 32, epochs: int = 1,
                           workers: int = 1) -> str:
    """The ``open_clip_train`` command line that trains on an export (its record), as a user runs it.

    ``--train-num-samples`` is given although OpenCLIP finds sizes.json beside local tars, because it
    cannot for tars in object storage (read there through a ``pipe:`` URL).
    """
    data = record["train_data"]
    if record["format"] == "webdataset" and data.startswith("s3://"):
        data = f"pipe:aws s3 cp {data} -"
    args = ["python", "-m", "open_clip_train.main", f"--train-data '{data}'"]
    if record["format"] == "webdataset":
        args += ["--dataset-type webdataset", f"--train-num-samples {record['num_samples']}",
                 f"--workers {min(workers, record['num_shards'])}"]
    else:
        args += ["--dataset-type csv", "--csv-img-key filepath", "--csv-caption-key title",
                 "--csv-separator $'\\t'", f"--workers {workers}"]
    args += [f"--model {model}", f"--batch-size {batch_size}", f"--epochs {epochs}", "--lr 5e-4", "--warmup 10",
             "--report-to ''", "--logs runs/openclip"]
    return " ".join(args)
