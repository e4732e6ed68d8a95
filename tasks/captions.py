"""Captions worth learning from: named boilerplate patterns, captions composed from a source's text
fields, and the build-wide count of captions repeated across many different images.

A source names its text fields in order of preference (``SourceConfig.caption``): the caption is
the first field that is neither empty, nor caught by a named pattern, nor boilerplate (the same
text on at least ``text_filter.boilerplate_min_images`` different images of the build), plus the
``append`` fields that pass the same checks and are short. So a collection name as the title
("gramastar" on 1,375 different stars) falls back to the keywords, and a title with nothing
behind it is dropped as ``boilerplate_caption``. Which fields made the caption, and why others
were skipped, is kept in the row's ``meta`` (``caption_fields``, ``caption_skipped``).

Named patterns (``PATTERNS``), each a drop reason:

* ``date_stamp`` — an automatic time stamp ("Wed Aug 25 23:29:46 2004", "2004-08-25T23:29").
* ``collection_stamp`` — a collection, theme or icon-set name ("Part of the Flat Icon
  Collection", "SVG Gradient Collection by Alan Horkan, 2004.", "Lemon SVG theme", "gold-theme",
  "blueberry - iconset", "Various Cliparts").
* ``author_credit`` — "Clipart by Nicu Buculei - ", "photo by ...", "© ...", "courtesy of ...":
  stripped; the field is dropped only when nothing else is left.
* ``email_address`` — e-mail addresses (with "email:"/"contact:" labels): stripped likewise.
* ``converted_from`` — provenance notes ("EPS converted from http://aiga.org").

The repeated-caption count (:func:`caption_pieces` / :func:`count_captions`) is a global reduce on
the build's storage-backed shuffle: every field value is normalised (:func:`normalise`: case,
digits, punctuation), and counted once per *different image* — the image's identity is its URL
or, for an inline image, a digest of its bytes — so copies of one image do not make its caption
boilerplate. It runs on the text, before anything is fetched: at web scale most boilerplate rows
are never downloaded. Distinct URLs can still be copies of one image; the report
(``reports/repeated_captions.parquet``) confirms each repeated caption with the perceptual hashes
of its rows that reached the image stage.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.config import CAPTION_PATTERNS, CaptionConfig, caption_field_parts
from infra.fanout import split_by
from infra.funnel import Funnel
from tasks.step import StepOutput

STAGE = "caption"
BOILERPLATE = "boilerplate_caption"
DATE_STAMP, COLLECTION_STAMP, AUTHOR_CREDIT = "date_stamp", "collection_stamp", "author_credit"
EMAIL_ADDRESS, CONVERTED_FROM = "email_address", "converted_from"
PATTERNS = (DATE_STAMP, COLLECTION_STAMP, AUTHOR_CREDIT, EMAIL_ADDRESS, CONVERTED_FROM)
assert PATTERNS == CAPTION_PATTERNS  # the config checks names against its own copy
CAPTION_COLUMN = "caption"  # the field name of a source's caption column
OUTCOMES = "caption_outcomes"  # the step's side output: what rows with a boilerplate field got instead
OUTCOMES_SCHEMA = pa.schema([("value", pa.string()), ("outcome", pa.string()), ("rows", pa.int64())])

# ------------------------------------------------------------------------------------------------
# Named patterns
# ------------------------------------------------------------------------------------------------

_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*"
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*"
_DATE_STAMP = re.compile(
    rf"\b{_DAY},?\s+{_MONTH}\s+\d{{1,2}}\s+\d{{1,2}}:\d{{2}}(?::\d{{2}})?(?:\s+\w+)?\s+\d{{4}}\b"  # ctime
    r"|\b\d{4}-\d{2}-\d{2}[t ]\d{2}:\d{2}"  # ISO date and time
    r"|\b\d{1,2}:\d{2}:\d{2}\b", re.IGNORECASE)
_COLLECTION = re.compile(
    r"^part of (?:the )?.*\b(?:collection|set|series|theme)\b"
    r"|\bcollection (?:by|from)\b|\b(?:clip ?art|icon|svg|image|gradient)s? collection\b"
    r"|\bcollection of\b.*\b(?:clip ?arts?|icons?|images|graphics|vectors|svgs?)\b"
    r"|(?:^|[\s_-])(?:svg[\s_-]+|icon[\s_-]+)?theme$|\bicon[\s_-]?(?:set|theme|pack)\b|\biconset\b"
    r"|^various clip ?arts?$", re.IGNORECASE)
_CREDIT_PREFIX = re.compile(
    r"^\s*(?:clip ?art|drawing|drawn|image|photo|picture|illustration|art|icon|vector|graphic)s?\s+by\s+"
    r"[^-–—|:]{1,60}?\s*[-–—|:]\s*", re.IGNORECASE)
_CREDIT_ANYWHERE = re.compile(
    r"\s*[-–—|(]?\s*(?:(?:photo|image|picture|drawing)s?\s+(?:by|courtesy of)|courtesy of|©|\(c\)\s|copyright)"
    r"\s+[^()]{1,60}\)?\s*$", re.IGNORECASE)
_EMAIL = re.compile(r"\s*(?:\(?\s*(?:e-?mail|contact|mail)\s*:\s*)?[\w.+-]+@[\w-]+\.[\w.-]+\)?", re.IGNORECASE)
_CONVERTED = re.compile(r"\b(?:converted|imported|exported|traced|vectori[sz]ed)\s+(?:from|with|by)\s+"
                        r"(?:https?://|www\.|[\w-]+\.(?:com|org|net))", re.IGNORECASE)
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
_LEFTOVER = re.compile(r"^[\s\-–—|:,;.()]+|[\s\-–—|:,;(]+$")


def _strip(pattern: re.Pattern, text: str) -> str:
    text = _EMPTY_BRACKETS.sub(" ", pattern.sub(" ", text))
    return _LEFTOVER.sub("", " ".join(text.split()))


def apply_patterns(text: str, names: Iterable[str]) -> tuple[str | None, str | None]:
    """``(text, None)``, with credits and addresses stripped, or ``(None, reason)`` when a named
    pattern (``PATTERNS``) makes the field unusable."""
    names = set(names)
    if CONVERTED_FROM in names and _CONVERTED.search(text):
        return None, CONVERTED_FROM
    if DATE_STAMP in names and _DATE_STAMP.search(text):
        return None, DATE_STAMP
    if COLLECTION_STAMP in names and _COLLECTION.search(text.strip()):
        return None, COLLECTION_STAMP
    for name, patterns in ((AUTHOR_CREDIT, (_CREDIT_PREFIX, _CREDIT_ANYWHERE)), (EMAIL_ADDRESS, (_EMAIL,))):
        if name in names and any(p.search(text) for p in patterns):
            for p in patterns:
                text = _strip(p, text)
            if not any(ch.isalpha() for ch in text):
                return None, name
    return text, None


# ------------------------------------------------------------------------------------------------
# Normalised captions and fields
# ------------------------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+")
_DIGITS = re.compile(r"\d+")


def normalise(text: str) -> str:
    """The form repeated captions are counted in: NFKC, case-folded, digit runs as "0", every run
    of punctuation, symbols and spaces one space ("BlueMan#109" and "blueman 210" are one)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", _DIGITS.sub("0", text)).split())


def field_text(value: Any) -> str | None:
    """A field as caption text: strings as they are, lists (keywords) joined with ", "."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(dict.fromkeys(_items(value))) or None
    text = str(value)
    return text if text.strip() else None


def _items(value: Any) -> list[str]:
    """A field's non-empty items, stripped: a list's elements, or a string as one item."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    return [str(value).strip()] if str(value).strip() else []


def policy_field_text(fields: Mapping[str, Any], name: str) -> str | None:
    """The text of one field a policy names (``CaptionConfig``): ``field_text`` of it, or for a
    joined name ("caption+keywords") the first field's text, then the other fields' items that
    repeat neither an earlier item nor, ignoring case, the first text, all joined with ", "."""
    first, *rest = caption_field_parts(name)
    if not rest:
        return field_text(fields.get(name))
    head = field_text(fields.get(first))
    seen = {head.strip().lower()} if head else set()
    extra = [item for item in dict.fromkeys(i for part in rest for i in _items(fields.get(part)))
             if item.lower() not in seen]
    text = ", ".join([head, *extra]) if head else ", ".join(extra)
    return text or None


def row_fields(caption: str | None, meta: str | None) -> dict[str, Any]:
    """A row's text fields: its ``meta`` keys and its caption column (``CAPTION_COLUMN``)."""
    fields: dict[str, Any] = {}
    if meta:
        try:
            loaded = json.loads(meta)
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, dict):
            fields.update(loaded)
    fields[CAPTION_COLUMN] = caption
    return fields


# ------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Composed:
    caption: str | None
    fields: tuple[str, ...] = ()  # the fields the caption is made of, in order
    skipped: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # field -> (reason, text)
    reason: str | None = None  # why there is no caption (None: every field was empty)


def _usable(text: str | None, policy: CaptionConfig, boilerplate: frozenset[str]) -> tuple[str | None, str | None]:
    if text is None:
        return None, None
    cleaned, reason = apply_patterns(" ".join(text.split()), policy.patterns)
    if reason:
        return None, reason
    if normalise(cleaned) in boilerplate:
        return None, BOILERPLATE
    return cleaned, None


def compose(fields: Mapping[str, Any], policy: CaptionConfig, boilerplate: frozenset[str] = frozenset()) -> Composed:
    """The caption of one row (module docstring): the first usable field, then the short usable
    ``append`` fields that add something (not already in the caption)."""
    skipped: dict[str, tuple[str, str]] = {}
    caption, used = None, []
    for name in policy.fields:
        raw = policy_field_text(fields, name)
        text, reason = _usable(raw, policy, boilerplate)
        if text:
            caption, used = text, [name]
            break
        if reason:
            skipped[name] = (reason, raw or "")
    if caption is None:
        first = next(iter(skipped.values()), None)
        return Composed(None, (), skipped, first[0] if first else None)
    for name in policy.append:
        raw = policy_field_text(fields, name)
        text, reason = _usable(raw, policy, boilerplate)
        if reason:
            skipped[name] = (reason, raw or "")
        elif text and len(text) <= policy.append_max_chars and normalise(text) not in normalise(caption):
            caption = f"{caption.rstrip(' .')}{policy.append_separator}{text}"
            used.append(name)
    return Composed(caption, tuple(used), skipped)


class CaptionStep:
    """The caption step of one source: ``table -> StepOutput`` (rows with no usable field are
    dropped with the first field's reason; rows whose fields are all empty keep a null caption,
    which the text filter counts as ``empty``)."""

    def __init__(self, policy: CaptionConfig, boilerplate: frozenset[str] = frozenset()) -> None:
        self.policy, self.boilerplate = policy, boilerplate

    def __call__(self, table: pa.Table) -> StepOutput:
        captions, metas, reasons = [], [], []
        outcomes: Counter = Counter()  # (boilerplate value, what the row got instead) -> rows
        for caption, meta in zip(table.column("caption").to_pylist(), table.column("meta").to_pylist()):
            out = compose(row_fields(caption, meta), self.policy, self.boilerplate)
            reasons.append(out.reason if out.caption is None else None)
            captions.append(out.caption)
            metas.append(_with_provenance(meta, out))
            instead = "+".join(out.fields) if out.caption is not None else "dropped"
            for reason, text in out.skipped.values():
                if reason == BOILERPLATE:
                    outcomes[normalise(text), instead] += 1
        table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string()))
        table = table.set_column(table.schema.get_field_index("meta"), "meta", pa.array(metas, pa.string()))
        funnel = Funnel()
        side = {OUTCOMES: pa.table({"value": pa.array([v for v, _ in outcomes], pa.string()),
                                    "outcome": pa.array([o for _, o in outcomes], pa.string()),
                                    "rows": pa.array(list(outcomes.values()), pa.int64())}, schema=OUTCOMES_SCHEMA)}
        return StepOutput(funnel.apply(STAGE, table, reasons), funnel, side)


def _with_provenance(meta: str | None, out: Composed) -> str | None:
    if not out.fields and not out.skipped:
        return meta
    try:
        data = json.loads(meta) if meta else {}
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    data["caption_fields"] = list(out.fields)
    if out.skipped:
        data["caption_skipped"] = {k: [reason, text[:200]] for k, (reason, text) in out.skipped.items()}
    return json.dumps(data, ensure_ascii=False, default=str, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# The repeated-caption count (map: pieces by hash of the value; reduce: different images per value)
# ------------------------------------------------------------------------------------------------

PIECE_SCHEMA = pa.schema([("value", pa.string()), ("identity", pa.binary(8)), ("example", pa.string())])
COUNTS_SCHEMA = pa.schema([("value", pa.string()), ("rows", pa.int64()), ("images", pa.int64()),
                           ("example", pa.string()), ("boilerplate", pa.bool_())])
REPORT_TOP = 50  # values each reduce keeps below the threshold too, for the report


def image_identity(url: str | None, image: bytes | None, sample_id: str) -> bytes:
    """8 bytes naming the image a row shows: its URL, else a digest of its inline bytes, else its id."""
    key = b"u:" + url.encode() if url else b"b:" + image if image is not None else b"s:" + sample_id.encode()
    return hashlib.blake2b(key, digest_size=8).digest()


def caption_pieces(table: pa.Table, policy: CaptionConfig, num_partitions: int) -> list[pa.Table]:
    """One input shard's field values (normalised, after the named patterns) with the identity of
    their image, split into ``num_partitions`` pieces by a hash of the value."""
    values, identities, examples = [], [], []
    columns = [table.column(c).to_pylist() for c in ("caption", "meta", "url", "image", "sample_id")]
    for caption, meta, url, image, sample_id in zip(*columns):
        fields = row_fields(caption, meta)
        identity = image_identity(url, image, sample_id)
        seen = set()
        for name in (*policy.fields, *policy.append):
            raw = policy_field_text(fields, name)
            text, reason = apply_patterns(" ".join(raw.split()), policy.patterns) if raw else (None, None)
            value = normalise(text) if text else ""
            if value and value not in seen:
                seen.add(value)
                values.append(value)
                identities.append(identity)
                examples.append(text[:200])
    piece = pa.table({"value": pa.array(values, pa.string()), "identity": pa.array(identities, pa.binary(8)),
                      "example": pa.array(examples, pa.string())}, schema=PIECE_SCHEMA)
    return split_by_value(piece, num_partitions)


def split_by_value(table: pa.Table, num_partitions: int) -> list[pa.Table]:
    if num_partitions == 1:
        return [table]
    digests = np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
                        for v in table.column("value").to_pylist()], dtype=np.uint64)
    part = (digests % np.uint64(num_partitions)).astype(np.int64)
    return split_by(table, part, num_partitions)  # one sort and R slices, not R filters


def count_captions(pieces: Sequence[pa.Table], min_images: int, keep_top: int = REPORT_TOP) -> pa.Table:
    """Per value of one partition: rows, different images, an example as written, and whether it
    is boilerplate (``images >= min_images``). Keeps every boilerplate value and the ``keep_top``
    most repeated others (for the report); sorted by images, then value."""
    table = pa.concat_tables([PIECE_SCHEMA.empty_table(), *pieces])
    if table.num_rows == 0:
        return COUNTS_SCHEMA.empty_table()
    rows = table.group_by("value").aggregate([("identity", "count"), ("example", "min")])
    images = table.group_by(["value", "identity"]).aggregate([]).group_by("value").aggregate([("identity", "count")])
    counts = rows.join(images.rename_columns(["value", "images"]), "value")
    counts = counts.rename_columns({"identity_count": "rows", "example_min": "example"})
    flagged = pc.greater_equal(counts.column("images"), min_images)
    counts = counts.append_column("boilerplate", flagged)
    counts = counts.sort_by([("images", "descending"), ("value", "ascending")])
    others = counts.filter(pc.invert(counts.column("boilerplate"))).filter(pc.greater(
        counts.filter(pc.invert(counts.column("boilerplate"))).column("rows"), 1)).slice(0, keep_top)
    out = pa.concat_tables([counts.filter(counts.column("boilerplate")), others])
    out = out.select(COUNTS_SCHEMA.names).cast(COUNTS_SCHEMA)
    return out.sort_by([("images", "descending"), ("value", "ascending")])


def boilerplate_values(counts: pa.Table) -> frozenset[str]:
    return frozenset(counts.filter(counts.column("boilerplate")).column("value").to_pylist())


# ------------------------------------------------------------------------------------------------
# Caption lengths (the report's histogram)
# ------------------------------------------------------------------------------------------------

MAX_WORDS_BUCKET = 40  # the last bucket holds longer captions too


def length_histogram(captions: Iterable[str | None]) -> list[int]:
    """Counts of captions by number of words (0 .. MAX_WORDS_BUCKET and over)."""
    hist = Counter(min(len(c.split()), MAX_WORDS_BUCKET) if c else 0 for c in captions)
    return [hist.get(i, 0) for i in range(MAX_WORDS_BUCKET + 1)]


def primary_field_captions(table: pa.Table, policy: CaptionConfig) -> list[str | None]:
    """The first field the policy names, as written (the caption before composition)."""
    name = policy.fields[0] if policy.fields else CAPTION_COLUMN
    return [policy_field_text(row_fields(c, m), name)
            for c, m in zip(table.column("caption").to_pylist(), table.column("meta").to_pylist())]


# ------------------------------------------------------------------------------------------------
# Reports: the most repeated captions, what happened to them, and caption lengths before/after
# ------------------------------------------------------------------------------------------------

REPORT_SCHEMA = pa.schema([("rank", pa.int32()), ("caption", pa.string()), ("value", pa.string()),
                           ("rows", pa.int64()), ("images", pa.int64()), ("boilerplate", pa.bool_()),
                           ("outcome", pa.string()), ("rows_out", pa.int64()), ("images_by_hash", pa.int64())])


IMAGE_PIECE_SCHEMA = pa.schema([("value", pa.string()), ("phash", pa.uint64())])
IMAGES_SCHEMA = pa.schema([("value", pa.string()), ("images", pa.int64())])


def carried_values(caption: str | None, meta: str | None) -> set[str]:
    """The normalised values an output row carries: its caption and the fields the caption step skipped."""
    values = {normalise(caption)} if caption else set()
    if meta and '"caption_skipped"' in meta:
        skipped = json.loads(meta).get("caption_skipped", {})
        values.update(normalise(text) for _, text in skipped.values() if text)
    return values


def caption_image_pieces(table: pa.Table, values: frozenset[str], num_partitions: int) -> list[pa.Table]:
    """One output shard's distinct (value, phash) pairs for ``values`` (``carried_values``), split
    into ``num_partitions`` pieces by phash: a value's different hashes are then counted exactly,
    partition by partition, without every hash in one place."""
    pairs = set()
    columns = (table.column(c).to_pylist() for c in ("caption", "meta", "phash"))
    for caption, meta, phash in zip(*columns):
        if phash is not None:
            pairs.update((v, phash) for v in carried_values(caption, meta) & values)
    ordered = sorted(pairs)
    hashes = np.array([p for _, p in ordered], np.uint64)
    piece = pa.table({"value": pa.array([v for v, _ in ordered], pa.string()), "phash": pa.array(hashes, pa.uint64())},
                     schema=IMAGE_PIECE_SCHEMA)
    return split_by(piece, (hashes % np.uint64(num_partitions)).astype(np.int64), num_partitions)


def count_caption_images(pieces: Sequence[pa.Table]) -> pa.Table:
    """Per value of one partition: its different perceptual hashes (``IMAGES_SCHEMA``)."""
    table = pa.concat_tables([IMAGE_PIECE_SCHEMA.empty_table(), *pieces])
    distinct = table.group_by(["value", "phash"]).aggregate([])
    counts = distinct.group_by("value").aggregate([("phash", "count")]).rename_columns(["value", "images"])
    return counts.select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA)


def report_head(counts: pa.Table, top: int) -> pa.Table:
    """The ``top`` most repeated values of a count table (by different images, then value)."""
    return counts.sort_by([("images", "descending"), ("value", "ascending")]).slice(0, top)


def repeated_caption_report(counts: pa.Table, outcomes: pa.Table, images_by_hash: Mapping[str, int],
                            top: int = 20) -> pa.Table:
    """The ``top`` most repeated caption values (by different images): how often, what the caption
    step did with their rows (``outcome``: the fields they got instead, or dropped), and
    ``images_by_hash``: per value, the different perceptual hashes among its rows in the output."""
    head = report_head(counts, top)
    by_value: dict[str, Counter] = {}
    for v, o, n in zip(*(outcomes.column(c).to_pylist() for c in ("value", "outcome", "rows"))):
        by_value.setdefault(v, Counter())[o] += n
    rows = []
    for rank, r in enumerate(head.to_pylist(), 1):
        done = by_value.get(r["value"], Counter())
        outcome = "; ".join(f"{k} {n:,}" for k, n in done.most_common()) if done else \
            "never the caption (an earlier field was used)" if r["boilerplate"] else "kept"
        rows.append({"rank": rank, "caption": r["example"], "value": r["value"], "rows": r["rows"], "images": r["images"],
                     "boilerplate": r["boilerplate"], "outcome": outcome,
                     "rows_out": sum(n for k, n in done.items() if k != "dropped") if done else None,
                     "images_by_hash": images_by_hash.get(r["value"], 0)})
    return pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)


def render_caption_lengths(before: Sequence[int], after: Sequence[int]) -> bytes:
    """PNG bytes: the share of captions by number of words, as read (first field) and in the output."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global figure state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(MAX_WORDS_BUCKET + 1)
    for hist, label, shift in ((before, "as read (first caption field)", -0.2), (after, "in the output", 0.2)):
        h = np.asarray(hist, np.float64)
        if h.sum():
            ax.bar(x + shift, h / h.sum(), width=0.4, label=f"{label}: {int(h.sum()):,} captions")
    ax.set_xlabel(f"words per caption ({MAX_WORDS_BUCKET} = {MAX_WORDS_BUCKET} or more)")
    ax.set_ylabel("share of captions")
    ax.set_xlim(-1, 25)
    ax.set_title("Caption lengths")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
