"""Emoji image sets from npm packages as captioned Parquet sources (Twemoji, Noto, OpenMoji, Fluent).

Reads one vendor's 64-px PNGs from iamcal's ``emoji-datasource-<vendor>`` npm package and its
``emoji.json`` (code points, categories) — or OpenMoji's SVGs (rasterised by CairoSVG) and
``openmoji.json`` from the ``openmoji`` package — or an Iconify JSON package (``@iconify-json/*``:
every icon's SVG body in ``icons.json``, ``chars.json`` mapping code points to icon names;
categories and Unicode names from :data:`EMOJI_DATA_PACKAGE`'s ``emoji.json``) — and the English
names and keywords of Unicode CLDR (``cldr-annotations-full`` and ``cldr-annotations-derived-full``),
and writes one Parquet table (:data:`infra.schema.EMOJI_SCHEMA`):

    python -m infra.emoji --vendor twitter runs/sources/emoji_twitter.parquet
    python -m infra.emoji --vendor google  runs/sources/emoji_google.parquet
    python -m infra.emoji --vendor openmoji runs/sources/emoji_openmoji.parquet
    python -m infra.emoji --vendor fluent runs/sources/emoji_fluent.parquet

``infra/setup.sh`` installs the packages into ``.venv/npm`` (``--npm-root``). Licences: the npm
packages' own ``license`` field (MIT) covers iamcal's code and data; the images are the vendors'
(:data:`VENDORS`: Twemoji CC-BY 4.0, Noto Apache 2.0, OpenMoji CC BY-SA 4.0 — ShareAlike: a
dataset built from it is shared under the same licence), as the package README states — the build
checks that statement is still there and records it in the file's metadata. An Iconify package
states its icons' licence in ``package.json`` (``license``) and ``info.json`` (``license.spdx``,
``license.url``): the build checks both (Fluent Emoji Flat: MIT, Microsoft). Apple's and
Facebook's sets are not openly licensed and are not offered.

Rows: every Unicode emoji the vendor draws except the skin-tone swatches (category ``Component``)
and OpenMoji's own non-Unicode extras; skin-tone variants are left out (the same concept recoloured).
An Iconify icon is keyed only through ``chars.json`` (icon names are never parsed): icons and
aliases no code point maps to are counted (``no_code_point``) and left out.
Ids and the ``unified`` column use :func:`emoji_key` (no FE0F), the same for every vendor. Images are composited onto white
(as Openclipart's, see infra/openclipart.py) and stored as RGB PNG.

Held out: :func:`is_heldout` marks ~15% of the emoji by a stable hash of their code points, the
same emoji for every vendor. Readers (``kind: emoji``) leave them out of training; the
``emoji-heldout`` eval set shows another vendor's drawings of them (style transfer): Noto's, and
Fluent's for one fresh look at the end (neither vendor is in a training config).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from infra.imaging import png_on_white
from infra.log import get_logger, log_event
from infra.schema import EMOJI_SCHEMA

log = get_logger("witflow.emoji")

NPM_ROOT = Path(__file__).resolve().parent.parent / ".venv" / "npm" / "node_modules"
HELDOUT_FRACTION = 0.15
IMAGE_SIDE = 64
CLDR_PACKAGES = ("cldr-annotations-full", "cldr-annotations-derived-full")
CLDR_LICENCE = "Unicode License v3 (Unicode CLDR annotations)"
# Flags named after places: a picture teaches nothing about the name, so they are not eval classes.
PLACE_FLAG_SUBCATEGORIES = ("country-flag", "subdivision-flag")
# Unicode's categories and names for the Iconify vendors: the emoji.json every emoji-datasource
# package ships (the same file in each); its images are not used.
EMOJI_DATA_PACKAGE = "emoji-datasource-google"
SKIN_TONE_MODIFIERS = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
ICONIFY_DEFAULT_SIDE = 16  # IconifyJSON's default width and height


class EmojiError(RuntimeError):
    """An emoji package or file cannot be read; the message names it."""


@dataclass(frozen=True)
class Vendor:
    """One openly licensed emoji set on the npm registry."""

    name: str  # emoji-datasource's image folder and has_img_<name> flag; the row ids' prefix
    package: str
    drawing: str  # the set's own name
    licence: str
    # The line of the package README that grants it (iconify: info.json's license.url); checked at build time.
    licence_statement: str
    attribution: str
    # or "openmoji": data/openmoji.json + color/svg/<hexcode>.svg; or "iconify": icons.json + chars.json
    layout: str = "emoji-datasource"


VENDORS: dict[str, Vendor] = {
    "twitter": Vendor("twitter", "emoji-datasource-twitter", "Twemoji", "CC-BY-4.0",
                      "Twitter images are available under the [Creative Commons Attribution 4.0 license]",
                      "Twemoji graphics by Twitter, Inc. and other contributors, CC-BY 4.0 "
                      "(https://github.com/jdecked/twemoji)"),
    "google": Vendor("google", "emoji-datasource-google", "Noto Emoji", "Apache-2.0",
                     "Android/Google/Noto images, are available under the [Apache License 2.0]",
                     "Noto Emoji by Google, Apache License 2.0 (https://github.com/googlefonts/noto-emoji)"),
    "openmoji": Vendor("openmoji", "openmoji", "OpenMoji", "CC-BY-SA-4.0",
                       "OpenMoji graphics are licensed under the Creative Commons Share Alike License 4.0",
                       "All emojis designed by OpenMoji, the open-source emoji and icon project, CC BY-SA 4.0 "
                       "(https://openmoji.org/)", layout="openmoji"),
    # Eval only (emoji-heldout-fluent in configs/zeroshot.yaml): never in a training config.
    "fluent": Vendor("fluent", "@iconify-json/fluent-emoji-flat", "Fluent Emoji Flat", "MIT",
                     "https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE",
                     "Fluent Emoji (Flat) by Microsoft Corporation, Copyright (c) Microsoft Corporation, MIT License "
                     "(https://github.com/microsoft/fluentui-emoji); Iconify JSON packaging "
                     "(https://github.com/iconify/icon-sets)", layout="iconify"),
}
# OpenMoji's own additions (no Unicode code points, no CLDR names) and skin-tone swatches.
_OPENMOJI_SKIPPED_GROUPS = ("extras-openmoji", "extras-unicode", "component")


# ------------------------------------------------------------------------------------------------
# Held-out split
# ------------------------------------------------------------------------------------------------


def emoji_key(unified: str) -> str:
    """The emoji's code points, upper-case, without variation selector 16 (vendors differ on FE0F)."""
    return "-".join(cp for cp in unified.upper().split("-") if cp != "FE0F")


def is_heldout(unified: str) -> bool:
    """True for the ~15% of emoji held out for evaluation (stable: the first 8 bytes of a sha1).

    Keyed by :func:`emoji_key`, so every vendor's drawing of an emoji is held out together.
    """
    digest = hashlib.sha1(b"witflow-emoji:" + emoji_key(unified).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") < int(HELDOUT_FRACTION * 2**64)


def emoji_id(vendor: str, unified: str) -> str:
    """The row id: ``<vendor>/<emoji_key>`` (``twitter/1F431``)."""
    return f"{vendor}/{emoji_key(unified)}"


# ------------------------------------------------------------------------------------------------
# Package files
# ------------------------------------------------------------------------------------------------


def _package_dir(npm_root: Path, package: str) -> Path:
    path = npm_root / package
    if not (path / "package.json").is_file():
        raise EmojiError(f"npm package {package} not found under {npm_root} (run infra/setup.sh, "
                         f"or npm install --prefix {npm_root.parent} {package})")
    return path


def package_version(npm_root: Path, package: str) -> str:
    """The installed version of an npm package (from its package.json)."""
    return str(json.loads((_package_dir(npm_root, package) / "package.json").read_text())["version"])


def check_licence(npm_root: Path, vendor: Vendor) -> None:
    """Raise unless the package still grants the images' licence as :data:`VENDORS` records it: its
    README's statement, or an Iconify package's ``package.json`` and ``info.json`` licence fields."""
    if vendor.layout == "iconify":
        _check_iconify_licence(_package_dir(npm_root, vendor.package), vendor)
        return
    readme = _package_dir(npm_root, vendor.package) / "README.md"
    if vendor.licence_statement not in readme.read_text(encoding="utf-8", errors="replace"):
        raise EmojiError(f"{readme}: the image licence statement {vendor.licence_statement!r} is not there: "
                         "check the package's licence before using its images")


def _check_iconify_licence(package: Path, vendor: Vendor) -> None:
    info = _read_json(package / "info.json")
    stated = info.get("license") if isinstance(info, dict) else None
    found = {"package.json license": _read_json(package / "package.json").get("license"),
             "info.json license.spdx": (stated or {}).get("spdx"), "info.json license.url": (stated or {}).get("url")}
    wanted = {"package.json license": vendor.licence, "info.json license.spdx": vendor.licence,
              "info.json license.url": vendor.licence_statement}
    for field, value in found.items():
        if value != wanted[field]:
            raise EmojiError(f"{package}: {field} is {value!r}, not {wanted[field]!r}: "
                             "check the package's licence before using its images")


def read_cldr_annotations(npm_root: Path, package: str, top: str, locale: str,
                          required: bool = True) -> dict[str, dict]:
    """One locale's CLDR annotations file (``top``: "annotations" or "annotationsDerived"): emoji
    string -> {"tts": [name], "default": [keywords]}. A missing file is ``{}`` unless ``required``
    (a variant locale need not have derived names); an unreadable one is an EmojiError naming it."""
    path = _package_dir(npm_root, package) / top / locale / "annotations.json"
    if not required and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))[top]["annotations"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise EmojiError(f"{path}: unreadable CLDR annotations ({type(e).__name__}: {e})") from None


def cldr_annotations(npm_root: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """English CLDR annotations: emoji string (without FE0F) -> (name, keywords)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for package, top in zip(CLDR_PACKAGES, ("annotations", "annotationsDerived")):
        for chars, entry in read_cldr_annotations(npm_root, package, top, "en").items():
            if entry.get("tts"):
                out.setdefault(chars.replace("\ufe0f", ""), (entry["tts"][0], tuple(entry.get("default", ()))))
    return out


def _chars(unified: str) -> str:
    return "".join(chr(int(cp, 16)) for cp in unified.split("-")).replace("\ufe0f", "")


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def render_png(image: Path | bytes, side: int = IMAGE_SIDE) -> tuple[bytes, int, int]:
    """The emoji (a PNG or SVG file, or an SVG document's bytes) composited onto white as an
    optimised RGB PNG, shrunk to ``side`` if larger (an SVG is rasterised at ``side`` by CairoSVG)."""
    if isinstance(image, bytes) or image.suffix == ".svg":
        import cairosvg

        source = {"bytestring": image} if isinstance(image, bytes) else {"url": str(image)}
        try:
            data = cairosvg.svg2png(**source, output_width=side, output_height=side)
        except Exception as e:  # CairoSVG raises many types for broken SVGs
            raise ValueError(f"{type(e).__name__}: {e}") from None
        image = io.BytesIO(data)  # type: ignore[assignment]
    with Image.open(image) as im:
        im.load()
        rgba = im.convert("RGBA")
    return png_on_white(rgba, side)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EmojiError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _emoji_data(npm_root: Path) -> dict[str, dict]:
    """:data:`EMOJI_DATA_PACKAGE`'s emoji.json entries by :func:`emoji_key` (qualified or not)."""
    out: dict[str, dict] = {}
    for e in _read_json(_package_dir(npm_root, EMOJI_DATA_PACKAGE) / "emoji.json"):
        out[emoji_key(e["unified"])] = e
        if e.get("non_qualified"):
            out.setdefault(emoji_key(e["non_qualified"]), e)
    return out


def iconify_svg(icon_set: dict, icon: dict) -> bytes:
    """One IconifyJSON icon as a standalone SVG document (its box: the icon's, else the set's)."""
    box = [icon.get(k, icon_set.get(k, default)) for k, default in
           (("left", 0), ("top", 0), ("width", ICONIFY_DEFAULT_SIDE), ("height", ICONIFY_DEFAULT_SIDE))]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{" ".join(str(v) for v in box)}">{icon["body"]}</svg>').encode()


def _iconify_entries(package: Path, npm_root: Path, skipped: Counter) -> list[dict]:
    icon_set, chars = _read_json(package / "icons.json"), _read_json(package / "chars.json")
    if not chars:
        raise EmojiError(f"{package / 'chars.json'}: no code point map: the icons cannot be keyed by code point")
    icons, data = icon_set.get("icons", {}), _emoji_data(npm_root)
    skipped["no_code_point"] += len((set(icons) | set(icon_set.get("aliases", {}))) - set(chars.values()))
    out = []
    for hexcode, icon_name in chars.items():
        key = emoji_key(hexcode)
        code_points = key.split("-")
        if len(code_points) > 1 and SKIN_TONE_MODIFIERS.intersection(code_points):
            skipped["skin_tone"] += 1
            continue
        entry = data.get(key)
        if entry is None:
            skipped["not_in_emoji_data"] += 1  # no category: cannot tell a place flag from another emoji
            continue
        if entry["category"] == "Component":
            skipped["component"] += 1
            continue
        icon = icons.get(icon_name)
        if icon is None or any(icon.get(k) for k in ("rotate", "hFlip", "vFlip")):
            skipped["no_plain_icon"] += 1  # an alias or a transformed icon: drawn otherwise than its body
            continue
        out.append({"unified": key, "non_qualified": None, "name": entry["name"], "category": entry["category"],
                    "subcategory": entry["subcategory"], "image": iconify_svg(icon_set, icon),
                    "where": f"{package / 'icons.json'} icon {icon_name}"})
    return out


def _entries(vendor: Vendor, package: Path, npm_root: Path, skipped: Counter) -> list[dict]:
    """The vendor's emoji as {unified, non_qualified, name, category, subcategory, image, where}:
    ``image`` a PNG/SVG file or an SVG document's bytes, ``where`` names it."""
    if vendor.layout == "iconify":
        return _iconify_entries(package, npm_root, skipped)
    out = []
    if vendor.layout == "openmoji":
        for e in _read_json(package / "data" / "openmoji.json"):
            if e.get("skintone"):
                continue  # skin-tone variants: left out, as emoji-datasource's are
            if e.get("group") in _OPENMOJI_SKIPPED_GROUPS:
                skipped["component" if e.get("group") == "component" else "not_unicode"] += 1
                continue
            svg = package / "color" / "svg" / f"{e['hexcode']}.svg"
            out.append({"unified": e["hexcode"], "non_qualified": None, "name": e.get("annotation") or e["hexcode"],
                        "category": e["group"], "subcategory": e.get("subgroups") or "", "image": svg,
                        "where": str(svg)})
        return out
    for e in _read_json(package / "emoji.json"):
        if e.get("category") == "Component":
            skipped["component"] += 1
            continue
        if not e.get(f"has_img_{vendor.name}"):
            skipped["not_drawn"] += 1
            continue
        png = package / "img" / vendor.name / "64" / e["image"]
        out.append({"unified": e["unified"], "non_qualified": e.get("non_qualified"), "name": e["name"],
                    "category": e["category"], "subcategory": e["subcategory"], "image": png, "where": str(png)})
    return out


def build_table(vendor: Vendor, npm_root: Path = NPM_ROOT) -> tuple[pa.Table, Counter]:
    """Every emoji ``vendor`` draws as an EMOJI_SCHEMA table sorted by id; skips counted by reason."""
    package = _package_dir(npm_root, vendor.package)
    names = cldr_annotations(npm_root)
    rows: dict[str, list] = {f.name: [] for f in EMOJI_SCHEMA}
    skipped: Counter = Counter()
    for entry in sorted(_entries(vendor, package, npm_root, skipped), key=lambda e: e["unified"]):
        try:
            data, width, height = render_png(entry["image"])
        except (OSError, ValueError) as e:
            skipped["unreadable_png"] += 1
            log_event(log, "skipping unreadable emoji image", level=30, png=entry["where"], error=str(e))
            continue
        cldr = names.get(_chars(entry["unified"]))
        if cldr is None and entry.get("non_qualified"):
            cldr = names.get(_chars(entry["non_qualified"]))
        name, keywords = cldr if cldr else (entry["name"].lower(), ())
        if cldr is None:
            skipped["named_without_cldr"] += 1  # counted, not dropped: the Unicode name stands in
        rows["id"].append(emoji_id(vendor.name, entry["unified"]))
        rows["unified"].append(emoji_key(entry["unified"]))
        rows["vendor"].append(vendor.name)
        rows["name"].append(name)
        rows["keywords"].append([k for k in keywords if k != name])
        rows["category"].append(entry["category"])
        rows["subcategory"].append(entry["subcategory"])
        rows["image"].append(data)
        rows["width"].append(width)
        rows["height"].append(height)
    return pa.Table.from_pydict(rows, schema=EMOJI_SCHEMA), skipped


def provenance(vendor: Vendor, npm_root: Path = NPM_ROOT) -> dict[str, str]:
    """What the file is made of, under which licences (written into its Parquet metadata)."""
    cldr = ", ".join(f"{p} {package_version(npm_root, p)}" for p in CLDR_PACKAGES)
    categories = (f"categories from npm {EMOJI_DATA_PACKAGE} {package_version(npm_root, EMOJI_DATA_PACKAGE)} "
                  "emoji.json; " if vendor.layout == "iconify" else "")
    return {"source": f"{vendor.drawing} via npm {vendor.package} {package_version(npm_root, vendor.package)}; "
                      f"{categories}names and keywords from npm {cldr}",
            "licence": f"images {vendor.licence}; names/keywords {CLDR_LICENCE}; emoji.json MIT (iamcal/emoji-data)",
            "attribution": vendor.attribution,
            "generator": f"python -m infra.emoji --vendor {vendor.name}"}


def write_table(table: pa.Table, out: Path, meta: dict[str, str]) -> None:
    """Write atomically (temp file + rename) with ``meta`` in the Parquet key-value metadata."""
    out.parent.mkdir(parents=True, exist_ok=True)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta.update({f"witflow.{k}".encode(): v.encode() for k, v in meta.items()})
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table.replace_schema_metadata(schema_meta), tmp, compression="zstd", row_group_size=256)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def build(vendor_name: str, out: Path, npm_root: Path = NPM_ROOT) -> tuple[pa.Table, Counter]:
    """Check the licence, build ``vendor_name``'s table and write it to ``out``."""
    if vendor_name not in VENDORS:
        raise EmojiError(f"unknown emoji vendor {vendor_name!r} (openly licensed ones: {sorted(VENDORS)})")
    vendor = VENDORS[vendor_name]
    check_licence(npm_root, vendor)
    table, skipped = build_table(vendor, npm_root)
    write_table(table, out, provenance(vendor, npm_root))
    log_event(log, "wrote emoji table", path=str(out), vendor=vendor_name, rows=table.num_rows,
              heldout=sum(is_heldout(u) for u in table.column("unified").to_pylist()),
              **{f"skipped_{k}": v for k, v in skipped.items()})
    return table, skipped


def main(argv: Iterable[str] | None = None) -> int:
    from infra.log import setup_logging

    parser = argparse.ArgumentParser(prog="python -m infra.emoji", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output Parquet file")
    parser.add_argument("--vendor", choices=sorted(VENDORS), required=True)
    parser.add_argument("--npm-root", type=Path, default=NPM_ROOT, help="node_modules folder (default: %(default)s)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    setup_logging("INFO")
    try:
        build(args.vendor, args.out, args.npm_root)
    except EmojiError as e:
        print(f"emoji: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
