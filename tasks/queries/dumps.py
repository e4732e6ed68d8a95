"""Streaming enwiki XML dumps: pages cut from decompressed bytes, bz2 streams, and the blocks that
workers decompress on their own (or the page batches the driver cuts from a single-stream file)."""

from __future__ import annotations

import bz2
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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


@dataclass(frozen=True)
class PageBatch:
    """Pages the driver cut from a single-stream dump, counted as one block."""

    block_id: str
    pages: tuple[bytes, ...]


def dump_name(path: str) -> str:
    """The prefix of a dump's block ids: its file name up to the first dot."""
    return Path(path).name.split(".")[0]


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
    compressed; an ordinary (single-stream) .bz2 or plain .xml file is one block, which is cut into
    page batches on the driver instead (:func:`single_stream_batches`).
    """
    size = os.path.getsize(path)
    name = dump_name(path)
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


def single_stream_batches(path: str, stats: Counter, batch_bytes: int) -> Iterator[PageBatch]:
    """Batches of at least ``batch_bytes`` of page XML (the last one smaller), cut in file order by
    one decompressor over the whole file; ids ``<name>-qNNNNN``, so a rerun cuts the same batches."""
    name = dump_name(path)
    batch: list[bytes] = []
    size = index = 0
    for page in iter_page_xml(decompressed_chunks(path), stats):
        batch.append(page)
        size += len(page)
        if size >= batch_bytes:
            yield PageBatch(f"{name}-q{index:05d}", tuple(batch))
            batch, size, index = [], 0, index + 1
    if batch:
        yield PageBatch(f"{name}-q{index:05d}", tuple(batch))
