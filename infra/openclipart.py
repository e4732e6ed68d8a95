"""The bundled Openclipart sample and the full Debian Openclipart source.

Reads Debian's ``openclipart-svg`` (metadata: ``dc:title``, ``dc:subject`` keywords, ``dc:description``
in each SVG's RDF block) and ``openclipart-png`` (the same images rasterised, at the same relative
path), and writes one Parquet table (:data:`OPENCLIPART_SCHEMA`):

    python -m infra.openclipart                    # regenerate infra/data/openclipart_sample.parquet
    python -m infra.openclipart --full OUT.parquet # all ~8,121 images, for larger local runs

Captions are kept exactly as the artists wrote them (mixed languages, terse titles, odd names,
``_01``/``_02`` variants): the text filters and the dedupe stage exist for those.

Images are composited onto white and stored as RGB PNG. Clip art is drawn for a white page, and
every later consumer (the image stage's RGB conversion, perceptual hashes, the CLIP transform) would
otherwise drop alpha and show the hidden RGB under transparent pixels — usually black, which turns
black line art into a black square.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse as safe_iterparse
from PIL import Image

from infra.imaging import png_on_white
from infra.log import get_logger, log_event, progress
from infra.schema import OPENCLIPART_SCHEMA

log = get_logger("witflow.openclipart")

OPENCLIPART_ROOT = Path("/usr/share/openclipart")
SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "openclipart_sample.parquet"
SAMPLE_TARGET = 2_000
SAMPLE_MIN_PER_CATEGORY = 40
MAX_SIDE = 128
HELDOUT_FRACTION = 0.10
DEBIAN_PACKAGES = ("openclipart-svg", "openclipart-png")

_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "svg": "http://www.w3.org/2000/svg",
}
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_WORK_TAG = "{%s}Work" % _NS["cc"]
# Openclipart names variants "<title>_<artist>_01", "_02", ...: one group for the sample selection.
_VARIANT_SUFFIX = re.compile(r"_\d{2}[a-z]?$")


class OpenclipartError(RuntimeError):
    """An Openclipart file could not be read; the message names it."""


@dataclass(frozen=True)
class ClipartMetadata:
    id: str  # "svg/<category>/.../<name>.svg"
    category: str
    title: str
    keywords: tuple[str, ...]
    description: str | None

    @property
    def png_relpath(self) -> str:
        """The rasterised image's path under the Openclipart root (same relative path, .png)."""
        return "png/" + self.id[len("svg/"):-len(".svg")] + ".png"


# ------------------------------------------------------------------------------------------------
# Held-out split
# ------------------------------------------------------------------------------------------------


def is_heldout(id: str) -> bool:
    """True for the ~10% of ids held out for evaluation (stable: the first 8 bytes of sha1(id)).

    Readers exclude these ids from training candidates; the eval registry uses exactly them.
    """
    digest = hashlib.sha1(id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < int(HELDOUT_FRACTION * 2**64)


# Concepts for zero-shot evaluation (the ``openclipart-concepts`` eval set): frequent concrete nouns
# of the titles and keywords, leaving out words that name one artist's collection more than a
# thing ("star": 1,375 of gramastar's geometric stars; "computer", "card", "map", "flag").
CONCEPT_CLASSES = ("apple", "ball", "bird", "boat", "book", "car", "cat", "clock", "cloud", "dog", "fish",
                   "flower", "hat", "house", "moon", "tree")
CONCEPT_HELDOUT_FRACTION = 0.5  # of the images naming exactly one concept (on top of is_heldout's ids)
_WORD = re.compile(r"[a-z]+")


# A second, disjoint set of 16 concepts (the ``openclipart-concepts-b`` eval set), fixed on
# 2026-12-01 before any model was scored on it and scored once, at the end, by each reported recipe:
# the next 16 frequent concrete nouns by image count (>= 11 images naming them), with the same
# exclusions. Its images name exactly one of these and none of CONCEPT_CLASSES.
CONCEPT_CLASSES_B = ("bear", "bus", "cake", "camera", "dinosaur", "face", "globe", "gun", "hand", "heart",
                     "horse", "leaf", "pear", "penguin", "phone", "sun")


# A third, disjoint set of concepts (the ``openclipart-concepts-c`` eval set), fixed on 2026-12-03
# before any model was scored on it, for a set with more classes than A and B's 16. The rule, from
# image counts alone: the concrete nouns (no category words such as "tool" or "animal", no
# material or shape words such as "glass" or "triangle", no place words) named by at least 8
# images that name none of sets A and B, in at least 5 different titles, with no one title holding
# over half of them ("man", "head", "smiley" and "mountain" are mostly one collection's title);
# then the nouns with at least 3 held-out images naming exactly one of them ("baseball", "fire" and
# "pill" have fewer). Its images name exactly one of these and none of sets A and B.
CONCEPT_CLASSES_C = ("arrow", "box", "boy", "building", "button", "chess", "cone", "diamond", "drum", "egg",
                     "eye", "folder", "girl", "lightbulb", "monitor", "muffin", "paper", "pin", "pizza",
                     "planet", "plant", "toy", "trumpet", "wine", "woman")


def concepts_named(title: str, keywords: Sequence[str], classes: Sequence[str] = CONCEPT_CLASSES) -> set[str]:
    """The ``classes`` a caption names: whole words of the title or keywords, plural -s/-es too."""
    words = set(_WORD.findall(" ".join([title, *keywords]).lower()))
    return {c for c in classes if c in words or c + "s" in words or c + "es" in words}


def _chosen_for_concepts(id: str) -> bool:
    digest = hashlib.sha1(b"witflow-concepts:" + id.encode("utf-8")).digest()
    return is_heldout(id) or int.from_bytes(digest[:8], "big") < int(CONCEPT_HELDOUT_FRACTION * 2**64)


def concept_of(id: str, title: str, keywords: Sequence[str]) -> str | None:
    """The concept class of an image held out for ``openclipart-concepts``, else None.

    An image is in the set when its caption names exactly one concept and it is held out: one of
    :func:`is_heldout`'s ids, or among the :data:`CONCEPT_HELDOUT_FRACTION` of such images chosen
    by a stable hash of the id. The others naming that concept stay in training, so the concept
    can be learnt at all.
    """
    named = concepts_named(title, keywords)
    return next(iter(named)) if len(named) == 1 and _chosen_for_concepts(id) else None


def concept_b_of(id: str, title: str, keywords: Sequence[str]) -> str | None:
    """The :data:`CONCEPT_CLASSES_B` class of an image held out for ``openclipart-concepts-b``, else
    None: as :func:`concept_of`, for captions naming exactly one of set B and none of set A."""
    named = concepts_named(title, keywords, CONCEPT_CLASSES_B)
    if len(named) != 1 or concepts_named(title, keywords) or not _chosen_for_concepts(id):
        return None
    return next(iter(named))


def concept_c_of(id: str, title: str, keywords: Sequence[str]) -> str | None:
    """The :data:`CONCEPT_CLASSES_C` class of an image held out for ``openclipart-concepts-c``, else
    None: as :func:`concept_of`, for captions naming exactly one of set C and none of sets A and B."""
    named = concepts_named(title, keywords, CONCEPT_CLASSES_C)
    if (len(named) != 1 or concepts_named(title, keywords) or concepts_named(title, keywords, CONCEPT_CLASSES_B)
            or not _chosen_for_concepts(id)):
        return None
    return next(iter(named))


def excluded_from_training(id: str, title: str, keywords: Sequence[str]) -> bool:
    """True for every image an eval set uses: :func:`is_heldout`'s ids and the concept sets' images."""
    return (is_heldout(id) or concept_of(id, title, keywords) is not None
            or concept_b_of(id, title, keywords) is not None or concept_c_of(id, title, keywords) is not None)


def holdout_identity() -> str:
    """A digest of the rules :func:`excluded_from_training` applies: a build's fingerprint holds it,
    so a changed held-out rule (a new concept set) reads its sources again instead of resuming."""
    rules = [HELDOUT_FRACTION, CONCEPT_HELDOUT_FRACTION, CONCEPT_CLASSES, CONCEPT_CLASSES_B, CONCEPT_CLASSES_C]
    return hashlib.sha256(repr(rules).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# SVG metadata
# ------------------------------------------------------------------------------------------------


def _text(elem: ET.Element | None) -> str | None:
    """An element's text; for ``rdf:Alt`` language alternatives, x-default, then English, then the first."""
    if elem is None:
        return None
    alts = elem.findall("rdf:Alt/rdf:li", _NS)
    if alts:
        by_lang = {(li.get(_XML_LANG) or "").lower(): li.text for li in alts}
        for lang in ("x-default", "en", "en-us", "en-gb", ""):
            if by_lang.get(lang):
                return by_lang[lang]
        return alts[0].text
    return elem.text


def parse_svg_metadata(svg_path: Path, root: Path = OPENCLIPART_ROOT) -> ClipartMetadata:
    """Title, keywords and description of one Openclipart SVG; raises OpenclipartError naming the file."""
    rel = svg_path.relative_to(root).as_posix()
    parts = rel.split("/")
    if len(parts) < 3 or parts[0] != "svg":
        raise OpenclipartError(f"{svg_path}: not under {root}/svg/<category>/")
    work: ET.Element | None = None
    try:
        # Stop at the end of cc:Work (inside <metadata>): the drawing that follows is most of the
        # bytes and unused here. Internal DTD entities are allowed (Adobe Illustrator declares its
        # namespaces with them); external ones are refused, and expat >= 2.4 caps entity amplification.
        for _, elem in safe_iterparse(str(svg_path), events=("end",), forbid_dtd=False,
                                      forbid_entities=False, forbid_external=True):
            if elem.tag == _WORK_TAG:
                work = elem
                break
    except (ET.ParseError, DefusedXmlException, OSError, ValueError) as e:
        raise OpenclipartError(f"{svg_path}: unreadable SVG ({type(e).__name__}: {e})") from None
    if work is None:
        raise OpenclipartError(f"{svg_path}: no cc:Work metadata")
    title = _text(work.find("dc:title", _NS))
    keywords = tuple(li.text for li in work.findall("dc:subject//rdf:li", _NS) if li.text and li.text.strip())
    description = _text(work.find("dc:description", _NS))
    return ClipartMetadata(
        id=rel,
        category=parts[1],
        title=title if title is not None else "",
        keywords=keywords,
        description=description if description and description.strip() else None,
    )


def list_svgs(root: Path = OPENCLIPART_ROOT) -> list[Path]:
    """Every SVG under ``root/svg``, sorted by relative path."""
    svg_root = root / "svg"
    if not svg_root.is_dir():
        raise OpenclipartError(f"{svg_root} not found: install the Debian packages {' and '.join(DEBIAN_PACKAGES)}")
    return sorted(svg_root.rglob("*.svg"))


def read_all_metadata(root: Path = OPENCLIPART_ROOT) -> tuple[list[ClipartMetadata], Counter]:
    """Metadata of every SVG; broken files are skipped and counted (``skipped[reason]``)."""
    records: list[ClipartMetadata] = []
    skipped: Counter = Counter()
    paths = list_svgs(root)
    for path in progress(paths, desc="svg metadata", unit="svg"):
        try:
            records.append(parse_svg_metadata(path, root))
        except OpenclipartError as e:
            skipped["broken_svg"] += 1
            log_event(log, "skipping SVG", level=30, error=str(e))
    return records, skipped


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def render_png(png_path: Path, max_side: int = MAX_SIDE) -> tuple[bytes, int, int]:
    """Shrink (keep aspect, never enlarge) to ``max_side``, composite onto white; optimised RGB PNG.

    Raises ``Image.DecompressionBombError`` above Pillow's hard pixel limit (~179 M pixels).
    """
    with warnings.catch_warnings():
        # A dozen packaged PNGs are 90-179 M pixels: trusted local files, decoded once, so no warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(png_path) as im:
            im.load()
            rgba = im.convert("RGBA")
    return png_on_white(rgba, max_side)


def build_table(records: Sequence[ClipartMetadata], root: Path = OPENCLIPART_ROOT,
                max_side: int = MAX_SIDE) -> tuple[pa.Table, Counter]:
    """Rasterised images + metadata as an OPENCLIPART_SCHEMA table (sorted by id); skips are counted."""
    rows: dict[str, list] = {f.name: [] for f in OPENCLIPART_SCHEMA}
    skipped: Counter = Counter()
    for rec in progress(sorted(records, key=lambda r: r.id), desc="png", unit="img"):
        png_path = root / rec.png_relpath
        if not png_path.is_file():
            skipped["missing_png"] += 1
            log_event(log, "no PNG for SVG", level=30, id=rec.id, png=str(png_path))
            continue
        try:
            data, width, height = render_png(png_path, max_side)
        except Image.DecompressionBombError as e:
            skipped["too_large_png"] += 1
            log_event(log, "skipping PNG above Pillow's pixel limit", level=30, png=str(png_path), error=str(e))
            continue
        except (OSError, ValueError, SyntaxError) as e:
            skipped["broken_png"] += 1
            log_event(log, "skipping unreadable PNG", level=30, png=str(png_path), error=f"{type(e).__name__}: {e}")
            continue
        rows["id"].append(rec.id)
        rows["category"].append(rec.category)
        rows["title"].append(rec.title)
        rows["keywords"].append(list(rec.keywords))
        rows["description"].append(rec.description)
        rows["image"].append(data)
        rows["width"].append(width)
        rows["height"].append(height)
    return pa.Table.from_pydict(rows, schema=OPENCLIPART_SCHEMA), skipped


# ------------------------------------------------------------------------------------------------
# Sample selection
# ------------------------------------------------------------------------------------------------


def variant_group(id: str) -> str:
    """The file name without its ``_01``/``_02`` variant suffix: variants are selected together."""
    stem = id.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return _VARIANT_SUFFIX.sub("", stem)


def _rank(key: str) -> int:
    return int.from_bytes(hashlib.sha1(b"witflow-sample:" + key.encode("utf-8")).digest()[:8], "big")


def _quotas(sizes: dict[str, int], target: int, min_per_category: int) -> dict[str, int]:
    """Per-category counts: proportional, at least ``min_per_category`` (or all), summing to ~target."""
    def quotas_at(frac: float) -> dict[str, int]:
        return {c: min(n, max(min_per_category, round(n * frac))) for c, n in sizes.items()}

    lo, hi = 0.0, 1.0
    for _ in range(50):  # bisect the proportional fraction; the minimums make it non-linear
        mid = (lo + hi) / 2
        if sum(quotas_at(mid).values()) < target:
            lo = mid
        else:
            hi = mid
    return quotas_at(hi)


def select_sample(records: Sequence[ClipartMetadata], target: int = SAMPLE_TARGET,
                  min_per_category: int = SAMPLE_MIN_PER_CATEGORY) -> list[ClipartMetadata]:
    """A deterministic sample stratified by category.

    Within a category, records are ranked by a stable hash of their variant group, so ``_01``/``_02``
    variants come in together (near-duplicates for the dedupe stage to find). Every title with
    non-ASCII letters is included as well (there are only a handful), so accented non-English
    captions always reach the language filter.
    """
    by_category: dict[str, list[ClipartMetadata]] = {}
    for rec in records:
        by_category.setdefault(rec.category, []).append(rec)
    quotas = _quotas({c: len(v) for c, v in by_category.items()}, target, min_per_category)
    chosen: dict[str, ClipartMetadata] = {}
    for category, recs in sorted(by_category.items()):
        recs = sorted(recs, key=lambda r: (_rank(variant_group(r.id)), r.id))
        for rec in recs[: quotas[category]]:
            chosen[rec.id] = rec
    for rec in records:
        if any(ch.isalpha() and ord(ch) > 127 for ch in rec.title):
            chosen[rec.id] = rec
    return sorted(chosen.values(), key=lambda r: r.id)


# ------------------------------------------------------------------------------------------------
# Reading and writing
# ------------------------------------------------------------------------------------------------


def debian_versions() -> dict[str, str]:
    """Installed versions of the Debian packages (empty where dpkg is absent)."""
    out = {}
    for pkg in DEBIAN_PACKAGES:
        try:
            res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if res.returncode == 0 and res.stdout:
            out[pkg] = res.stdout
    return out


def write_table(table: pa.Table, out: Path, provenance: dict[str, str]) -> None:
    """Write atomically (temp file + rename) with provenance in the Parquet key-value metadata."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta.update({f"witflow.{k}".encode(): str(v).encode() for k, v in provenance.items()})
    table = table.replace_schema_metadata(meta)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=256)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def read_openclipart(path: str | Path, split: Literal["all", "train", "heldout"] = "all",
                     columns: Sequence[str] | None = None) -> pa.Table:
    """Read a sample or full file; ``split`` keeps all rows, the training rows, or the rows an eval set
    uses (:func:`excluded_from_training`)."""
    path = Path(path)
    if not path.is_file():
        raise OpenclipartError(f"Openclipart table not found: {path} (build it with python -m infra.openclipart)")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise OpenclipartError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [f.name for f in OPENCLIPART_SCHEMA if f.name not in schema.names]
    if missing:
        raise OpenclipartError(f"{path}: missing column(s) {missing} of the Openclipart schema")
    cols = list(columns) if columns is not None else None
    if cols is not None and split != "all":
        cols = list(dict.fromkeys([*cols, "id", "title", "keywords"]))
    table = pq.read_table(path, columns=cols)
    if split != "all":
        held = pa.array([excluded_from_training(i, t, k) for i, t, k in zip(
            table.column("id").to_pylist(), table.column("title").to_pylist(), table.column("keywords").to_pylist())],
            pa.bool_())
        table = table.filter(held if split == "heldout" else pc.invert(held))
        if columns is not None:
            table = table.select(list(dict.fromkeys(["id", *columns])))
    return table


def build(out: Path, *, root: Path = OPENCLIPART_ROOT, full: bool = False, target: int = SAMPLE_TARGET,
          max_side: int = MAX_SIDE) -> tuple[pa.Table, Counter]:
    """Build the sample (or, with ``full``, every image) and write it to ``out``; returns the skip counts too."""
    records, skipped = read_all_metadata(root)
    chosen = list(records) if full else select_sample(records, target)
    table, png_skipped = build_table(chosen, root, max_side)
    skipped.update(png_skipped)
    provenance = {"source": "Openclipart via Debian " + ", ".join(f"{k} {v}" for k, v in debian_versions().items()),
                  "licence": "public domain (Openclipart)", "max_side": str(max_side),
                  "selection": "full" if full else f"stratified sample, target {target}",
                  "generator": "python -m infra.openclipart"}
    write_table(table, out, provenance)
    log_event(log, "wrote Openclipart table", path=str(out), rows=table.num_rows, svgs=len(records) + skipped["broken_svg"],
              mbytes=round(out.stat().st_size / 1e6, 2), **{f"skipped_{k}": v for k, v in skipped.items()})
    return table, skipped


def main(argv: Iterable[str] | None = None) -> int:
    from infra.log import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m infra.openclipart",
        description="Build the bundled Openclipart sample (default) or the full source from Debian's "
                    "openclipart-svg and openclipart-png packages.")
    parser.add_argument("--root", type=Path, default=OPENCLIPART_ROOT, help="Openclipart root (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=SAMPLE_PATH, help="sample output (default: infra/data/openclipart_sample.parquet)")
    parser.add_argument("--full", type=Path, metavar="OUT.parquet", help="write every image to OUT.parquet instead of the sample")
    parser.add_argument("--target", type=int, default=SAMPLE_TARGET, help="sample size (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="longest image side in pixels (default: %(default)s)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    setup_logging("INFO")
    try:
        if args.full:
            build(args.full, root=args.root, full=True, max_side=args.max_side)
        else:
            build(args.out, root=args.root, target=args.target, max_side=args.max_side)
    except OpenclipartError as e:
        print(f"openclipart: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
