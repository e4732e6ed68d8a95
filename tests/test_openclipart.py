"""The Openclipart sample builder (infra/openclipart.py) and the committed sample."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.openclipart import (
    OPENCLIPART_ROOT,
    OPENCLIPART_SCHEMA,
    ClipartMetadata,
    OpenclipartError,
    build,
    excluded_from_training,
    is_heldout,
    parse_svg_metadata,
    read_all_metadata,
    read_openclipart,
    render_png,
    select_sample,
    variant_group,
)

SVG_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
{doctype}<svg {xmlns} xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/"
  xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" width="10" height="10">
<metadata><rdf:RDF><cc:Work rdf:about="">
  <dc:title>{title}</dc:title>
  <dc:description>{description}</dc:description>
  <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
  <dc:publisher><cc:Agent><dc:title>Someone Else</dc:title></cc:Agent></dc:publisher>
</cc:Work></rdf:RDF></metadata>
<rect width="10" height="10"/>
</svg>
"""


def write_svg(path: Path, title: str = "Cigno", description: str = "", keywords: tuple[str, ...] = ("bird",),
              xmlns: str = 'xmlns="http://www.w3.org/2000/svg"', doctype: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    path.write_text(SVG_TEMPLATE.format(title=title, description=description, keywords=lis, xmlns=xmlns,
                                        doctype=doctype), encoding="utf-8")
    return path


def write_png(path: Path, size: tuple[int, int], mode: str = "RGBA", colour: tuple = (0, 0, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# Held-out split
# ------------------------------------------------------------------------------------------------


def test_heldout_is_deterministic_and_about_ten_percent() -> None:
    ids = [f"svg/cat/{i}_01.svg" for i in range(20_000)]
    first = [is_heldout(i) for i in ids]
    assert first == [is_heldout(i) for i in ids]
    assert 0.09 < sum(first) / len(ids) < 0.11
    # Depends on the whole id, not on a prefix or the category folder.
    assert len({is_heldout(f"svg/{c}/x.svg") for c in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j",
                                                         "k", "l", "m", "n", "o", "p", "q", "r", "s", "t",
                                                         "u", "v", "w", "x", "y", "z")}) == 2


# ------------------------------------------------------------------------------------------------
# SVG metadata
# ------------------------------------------------------------------------------------------------


def test_parse_metadata_keeps_text_as_written(tmp_path: Path) -> None:
    path = write_svg(tmp_path / "svg" / "animals" / "birds" / "cigno_01.svg", title=" Cigno &amp; co ",
                     description="un cigno bianco", keywords=("bird", "", "  ", "uccello"))
    meta = parse_svg_metadata(path, tmp_path)
    assert meta == ClipartMetadata(id="svg/animals/birds/cigno_01.svg", category="animals", title=" Cigno & co ",
                                   keywords=("bird", "uccello"), description="un cigno bianco")
    assert meta.png_relpath == "png/animals/birds/cigno_01.png"


def test_parse_metadata_empty_description_is_none_and_no_default_namespace_works(tmp_path: Path) -> None:
    path = write_svg(tmp_path / "svg" / "unsorted" / "lamp.svg", title="", description="   ", xmlns="")
    meta = parse_svg_metadata(path, tmp_path)
    assert meta.title == "" and meta.description is None and meta.category == "unsorted"


def test_parse_metadata_language_alternatives_prefer_default_then_english(tmp_path: Path) -> None:
    alt = ('<rdf:Alt><rdf:li xml:lang="it">Cavallo</rdf:li><rdf:li xml:lang="en">Horse</rdf:li>'
           '</rdf:Alt>')
    path = write_svg(tmp_path / "svg" / "animals" / "horse.svg", title=alt, description=
                     '<rdf:Alt><rdf:li xml:lang="fr">un cheval</rdf:li><rdf:li xml:lang="x-default">a horse</rdf:li></rdf:Alt>')
    meta = parse_svg_metadata(path, tmp_path)
    assert (meta.title, meta.description) == ("Horse", "a horse")


def test_internal_dtd_entities_are_allowed_external_ones_refused(tmp_path: Path) -> None:
    internal = '<!DOCTYPE svg [ <!ENTITY ns_svg "http://www.w3.org/2000/svg"> ]>\n'
    ok = write_svg(tmp_path / "svg" / "office" / "floppy.svg", title="Floppy", doctype=internal,
                   xmlns='xmlns="&ns_svg;"')
    assert parse_svg_metadata(ok, tmp_path).title == "Floppy"
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    external = f'<!DOCTYPE svg [ <!ENTITY xxe SYSTEM "file://{secret}"> ]>\n'
    bad = write_svg(tmp_path / "svg" / "office" / "xxe.svg", title="&xxe;", doctype=external)
    with pytest.raises(OpenclipartError, match="xxe.svg"):
        parse_svg_metadata(bad, tmp_path)


@pytest.mark.parametrize("content, message", [
    ("<svg><metadata><unclosed></svg>", "unreadable SVG"),
    ("", "unreadable SVG"),
    ('<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', "no cc:Work"),
])
def test_broken_svgs_raise_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "svg" / "shapes" / "broken.svg"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(OpenclipartError, match=f"broken.svg.*{message}"):
        parse_svg_metadata(path, tmp_path)


def test_read_all_metadata_skips_and_counts_broken_files(tmp_path: Path) -> None:
    write_svg(tmp_path / "svg" / "food" / "apple_01.svg", title="Apple")
    write_svg(tmp_path / "svg" / "food" / "pear_01.svg", title="Pera")
    (tmp_path / "svg" / "food" / "broken.svg").write_bytes(b"<svg><not xml")
    records, skipped = read_all_metadata(tmp_path)
    assert [r.title for r in records] == ["Apple", "Pera"]
    assert skipped == Counter(broken_svg=1)


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OpenclipartError, match="openclipart-svg"):
        read_all_metadata(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def test_render_png_shrinks_keeps_aspect_and_composites_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (400, 200), (0, 0, 0, 0))  # transparent black: must become white
    for x in range(180, 220):
        for y in range(80, 120):
            im.putpixel((x, y), (200, 0, 0, 255))
    im.save(tmp_path / "wide.png")
    data, w, h = render_png(tmp_path / "wide.png", 128)
    out = Image.open(io.BytesIO(data))
    assert out.format == "PNG" and out.mode == "RGB" and out.size == (w, h) == (128, 64)
    assert out.getpixel((2, 2)) == (255, 255, 255)
    r, g, b = out.getpixel((64, 32))
    assert r > 150 and g < 60 and b < 60


def test_render_png_never_enlarges_and_handles_palette_and_grey(tmp_path: Path) -> None:
    write_png(tmp_path / "p.png", (30, 50), mode="P", colour=3)
    write_png(tmp_path / "la.png", (300, 30), mode="LA", colour=(10, 255))
    assert render_png(tmp_path / "p.png", 128)[1:] == (30, 50)
    data, w, h = render_png(tmp_path / "la.png", 128)
    assert (w, h) == (128, 13)
    assert Image.open(io.BytesIO(data)).getpixel((5, 5)) == (10, 10, 10)


# ------------------------------------------------------------------------------------------------
# Selection and building
# ------------------------------------------------------------------------------------------------


def _meta(id: str, title: str = "x") -> ClipartMetadata:
    return ClipartMetadata(id=id, category=id.split("/")[1], title=title, keywords=(), description=None)


def test_variant_group_strips_only_two_digit_suffixes() -> None:
    assert variant_group("svg/a/ladybug_01.svg") == variant_group("svg/a/ladybug_02.svg") == "ladybug"
    assert variant_group("svg/a/people_juliane_krug_01a.svg") == "people_juliane_krug"
    assert variant_group("svg/a/white_h_9.svg") == "white_h_9"
    assert variant_group("svg/a/star_67pt11step.svg") == "star_67pt11step"


def test_select_sample_is_stratified_deterministic_and_keeps_variants_together() -> None:
    records = [_meta(f"svg/big/item{i:04d}_{v:02d}.svg") for i in range(600) for v in (1, 2)]
    records += [_meta(f"svg/small/thing{i}.svg") for i in range(10)]
    records += [_meta("svg/big/zz_accent.svg", title="danger général")]
    chosen = select_sample(records, target=200, min_per_category=40)
    assert chosen == select_sample(list(reversed(records)), target=200, min_per_category=40)
    cats = Counter(r.category for r in chosen)
    assert cats["small"] == 10  # all of a category smaller than the minimum
    assert 185 <= cats["big"] <= 195
    groups = Counter(variant_group(r.id) for r in chosen if r.category == "big")
    assert sum(1 for n in groups.values() if n == 2) >= len(groups) - 2  # only the quota's edge may split a pair
    assert "svg/big/zz_accent.svg" in {r.id for r in chosen}


def _fake_root(root: Path) -> None:
    for i, (cat, title) in enumerate([("animals", "Cigno"), ("animals", "Bored dog"), ("food", "apple"),
                                      ("food", "Rios de España"), ("shapes", "gramastar")]):
        write_svg(root / "svg" / cat / f"img{i}_01.svg", title=title)
        write_png(root / "png" / cat / f"img{i}_01.png", (60 + 40 * i, 50), colour=(0, 0, 255, 255))
    write_svg(root / "svg" / "food" / "nopng_01.svg", title="no raster")
    write_svg(root / "svg" / "food" / "badpng_01.svg", title="bad raster")
    (root / "png" / "food" / "badpng_01.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "svg" / "shapes" / "broken.svg").write_text("<svg")


def test_build_writes_schema_counts_skips_and_is_reproducible(tmp_path: Path) -> None:
    root = tmp_path / "openclipart"
    _fake_root(root)
    out1, out2 = tmp_path / "a.parquet", tmp_path / "b.parquet"
    table, skipped = build(out1, root=root, full=True, max_side=64)
    build(out2, root=root, full=True, max_side=64)
    assert out1.read_bytes() == out2.read_bytes()
    assert table.schema.remove_metadata() == OPENCLIPART_SCHEMA.remove_metadata()
    assert table.column("id").to_pylist() == sorted(f"svg/{c}/img{i}_01.svg" for i, c in
                                                    enumerate(["animals", "animals", "food", "food", "shapes"]))
    assert max(table.column("width").to_pylist() + table.column("height").to_pylist()) <= 64
    assert "Rios de España" in table.column("title").to_pylist()
    read = read_openclipart(out1)
    assert read.num_rows == 5 and pq.read_metadata(out1).metadata[b"witflow.max_side"] == b"64"
    assert skipped == Counter(missing_png=1, broken_png=1, broken_svg=1)


def test_read_openclipart_splits_and_checks_columns(tmp_path: Path, sample_parquet: Path) -> None:
    train = read_openclipart(sample_parquet, "train", columns=["title"])
    held = read_openclipart(sample_parquet, "heldout", columns=["title"])
    assert train.num_rows + held.num_rows == pq.read_metadata(sample_parquet).num_rows
    table = pq.read_table(sample_parquet, columns=["id", "title", "keywords"]).to_pylist()
    excluded = {r["id"] for r in table if excluded_from_training(r["id"], r["title"], r["keywords"])}
    assert set(held.column("id").to_pylist()) == excluded
    assert {r["id"] for r in table if is_heldout(r["id"])} < excluded  # and the concept set's images
    assert not excluded & set(train.column("id").to_pylist())
    bad = tmp_path / "bad.parquet"
    pq.write_table(train.select(["id"]), bad)
    with pytest.raises(OpenclipartError, match="missing column.*category"):
        read_openclipart(bad)
    with pytest.raises(OpenclipartError, match="not found"):
        read_openclipart(tmp_path / "none.parquet")


def test_cli_help() -> None:
    res = subprocess.run([sys.executable, "-m", "infra.openclipart", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert res.returncode == 0 and "--full" in res.stdout and "--max-side" in res.stdout


@pytest.mark.skipif(not (OPENCLIPART_ROOT / "svg").is_dir(), reason="Debian openclipart-svg not installed")
def test_real_debian_svgs_parse() -> None:
    svg = OPENCLIPART_ROOT / "svg" / "unsorted" / "lam_arn_01.svg"  # no default namespace
    adobe = OPENCLIPART_ROOT / "svg" / "office" / "floppy_frederic_moser_01.svg"  # DTD entities
    for path in (svg, adobe):
        if path.exists():
            meta = parse_svg_metadata(path)
            assert meta.id == path.relative_to(OPENCLIPART_ROOT).as_posix() and (OPENCLIPART_ROOT / meta.png_relpath).exists()


# ------------------------------------------------------------------------------------------------
# The committed sample
# ------------------------------------------------------------------------------------------------


def test_committed_sample_schema_size_and_limits(sample_parquet: Path) -> None:
    assert sample_parquet.stat().st_size < 20_000_000
    table = pq.read_table(sample_parquet)
    assert table.schema.remove_metadata() == OPENCLIPART_SCHEMA.remove_metadata()
    assert table.num_rows >= 1_500
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(re.fullmatch(r"svg/[^/]+/.+\.svg", i) for i in ids)
    assert table.column("category").to_pylist() == [i.split("/")[1] for i in ids]
    for data, w, h in zip(table.column("image").to_pylist(), table.column("width").to_pylist(),
                          table.column("height").to_pylist()):
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == (w, h) and max(w, h) <= 128


def test_committed_sample_has_the_hard_cases(sample_parquet: Path) -> None:
    table = pq.read_table(sample_parquet, columns=["id", "category", "title", "description"])
    ids, titles = table.column("id").to_pylist(), table.column("title").to_pylist()
    assert len(set(table.column("category").to_pylist())) == 22
    assert sum(1 for t in titles if re.search(r"[^\x00-\x7f]", t)) >= 5  # accented French/Spanish titles
    assert sum(1 for i in ids if "architetto" in i) >= 20  # Italian titles ("Cigno", "Cavallo")
    groups = Counter(variant_group(i) for i in ids if re.search(r"_0[12]\.svg$", i))
    assert sum(1 for n in groups.values() if n >= 2) >= 20  # _01/_02 variant pairs
    assert any(t != t.strip() or not t for t in titles)  # leading spaces and empty titles kept as written
    assert table.column("description").null_count < table.num_rows
    held = sum(map(is_heldout, ids))
    assert 0.07 * len(ids) < held < 0.13 * len(ids)


def test_png_above_the_pixel_limit_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.openclipart import build_table

    write_png(tmp_path / "png" / "food" / "huge_01.png", (100, 100))
    write_png(tmp_path / "png" / "food" / "small_01.png", (20, 20))
    records = [_meta("svg/food/huge_01.svg"), _meta("svg/food/small_01.svg")]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # 10,000 px is now over Pillow's 2x hard limit
    table, skipped = build_table(records, tmp_path)
    assert table.column("id").to_pylist() == ["svg/food/small_01.svg"]
    assert skipped == Counter(too_large_png=1)
