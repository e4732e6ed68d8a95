"""Captioned sources beyond the sample (infra/emoji.py, the full Openclipart's concepts), their
readers, the held-out concept eval sets and the build's provenance and hold-out checks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra import emoji
from infra.config import ConfigError, EvalSetConfig, SourceConfig, config_from_dict
from infra.eval_sets import EvalSetError, in_split, load_eval_set, training_ids
from infra.openclipart import (CONCEPT_CLASSES, CONCEPT_CLASSES_B, CONCEPT_CLASSES_C, OPENCLIPART_SCHEMA,
                               concept_b_of, concept_c_of, concept_of,
                               concepts_named,
                               excluded_from_training, is_heldout, read_openclipart)
from tasks.captions import CaptionStep
from tasks.readers import plan_input_shards, read_input_shard_with_funnel

# Code points whose emoji.is_heldout is True / False (a stable hash: these never change).
HELD = [u for u in (f"1F{n:03X}" for n in range(0x300, 0x700)) if emoji.is_heldout(u)][:6]
KEPT = [u for u in (f"1F{n:03X}" for n in range(0x300, 0x700)) if not emoji.is_heldout(u)][:10]


def _png(colour: tuple[int, ...], size: tuple[int, int] = (72, 72), mode: str = "RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def fake_npm_root(root: Path, *, licence_ok: bool = True) -> Path:
    """A node_modules tree shaped like the real packages: emoji.json, 64-px PNGs, README, CLDR files."""
    nm = root / "node_modules"
    codes = HELD + KEPT + ["1F3FB"]  # the last: a skin-tone swatch (category Component)
    entries = []
    for i, u in enumerate(codes):
        entries.append({"unified": u, "non_qualified": None, "image": f"{u.lower()}.png",
                        "name": f"THING {i}", "category": "Component" if u == "1F3FB" else "Objects",
                        "subcategory": "country-flag" if i == 1 else "tool",
                        "has_img_twitter": i != 2, "has_img_google": True})
    for vendor in emoji.VENDORS.values():
        pkg = nm / vendor.package
        if vendor.layout == "openmoji":
            _fake_openmoji(pkg, codes, vendor.licence_statement if licence_ok else "all rights reserved")
            continue
        if vendor.layout == "iconify":
            _fake_iconify(pkg, codes, vendor)
            continue
        (pkg / "img" / vendor.name / "64").mkdir(parents=True)
        (pkg / "package.json").write_text(json.dumps({"name": vendor.package, "version": "16.0.0"}))
        (pkg / "emoji.json").write_text(json.dumps(entries))
        statement = vendor.licence_statement if licence_ok else "images: all rights reserved"
        (pkg / "README.md").write_text(f"# emoji data\n\n* {statement}(https://example.invalid)\n")
        for i, e in enumerate(entries):
            (pkg / "img" / vendor.name / "64" / e["image"]).write_bytes(_png((i * 20 % 255, 10, 200, 255 if i % 2 else 0)))
    annotations = {"".join(chr(int(c, 16)) for c in u.split("-")): {"default": ["kw", f"word{i}"], "tts": [f"thing {i}"]}
                   for i, u in enumerate(codes) if i != 3}  # one emoji without a CLDR name
    for package, top in zip(emoji.CLDR_PACKAGES, ("annotations", "annotationsDerived")):
        path = nm / package / top / "en" / "annotations.json"
        path.parent.mkdir(parents=True)
        (nm / package / "package.json").write_text(json.dumps({"name": package, "version": "48.2.0"}))
        path.write_text(json.dumps({top: {"annotations": annotations if top == "annotations" else {}}}))
    return nm


def _fake_openmoji(pkg: Path, codes: list[str], statement: str) -> None:
    """OpenMoji's layout: data/openmoji.json and color/svg/<HEXCODE>.svg, with FE0F in some codes."""
    (pkg / "data").mkdir(parents=True)
    (pkg / "color" / "svg").mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "openmoji", "version": "17.0.0"}))
    (pkg / "README.md").write_text(f"## License\n{statement} ([CC BY-SA 4.0](https://example.invalid))\n")
    entries = []
    for i, u in enumerate(codes):
        hexcode = f"{u}-FE0F" if i == 0 else u  # vendors differ on variation selectors
        group = "component" if u == "1F3FB" else "objects"
        entries.append({"hexcode": hexcode, "annotation": f"om {i}", "group": group, "subgroups": "tool",
                        "skintone": ""})
        (pkg / "color" / "svg" / f"{hexcode}.svg").write_text(
            '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
            f'<circle cx="36" cy="36" r="20" fill="#{(i * 40) % 256:02x}2060"/></svg>')
    entries.append({"hexcode": "E000", "annotation": "openmoji's own", "group": "extras-openmoji",
                    "subgroups": "x", "skintone": ""})
    entries.append({"hexcode": f"{codes[5]}-1F3FB", "annotation": "toned", "group": "objects", "subgroups": "tool",
                    "skintone": "1F3FB"})
    (pkg / "data" / "openmoji.json").write_text(json.dumps(entries))


# The fake Iconify package's code points past the plain ones: a skin-tone variant, one unknown to
# emoji.json, one drawn by a flipped icon (HELD[4]: not drawn by a plain icon).
ICONIFY_TONED, ICONIFY_UNKNOWN = f"{KEPT[0]}-1F3FB", "1FAE8"


def _fake_iconify(pkg: Path, codes: list[str], vendor: emoji.Vendor) -> None:
    """An Iconify JSON package: icons.json (SVG bodies, a 32-px set), chars.json, info.json, package.json."""
    pkg.mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": vendor.package, "version": "1.2.6",
                                                  "license": vendor.licence}))
    (pkg / "info.json").write_text(json.dumps({"prefix": "fake", "name": vendor.drawing, "license": {
        "title": vendor.licence, "spdx": vendor.licence, "url": vendor.licence_statement}}))
    icons, chars = {}, {}
    for i, u in enumerate(codes + [ICONIFY_TONED, ICONIFY_UNKNOWN]):
        icons[f"icon-{i}"] = {"body": f'<circle cx="16" cy="16" r="9" fill="#{(i * 40) % 256:02x}2060"/>'}
        chars[u.lower()] = f"icon-{i}"  # lower case, no FE0F, as the real chars.json
    icons["icon-0"]["width"] = 36  # a wider box than the set's (as some real icons)
    icons[f"icon-{codes.index(HELD[4])}"]["hFlip"] = True
    icons["old-name"] = {"body": "<path d='M0 0h32v32z'/>", "hidden": True}  # no code point maps to it
    (pkg / "icons.json").write_text(json.dumps({"prefix": "fake", "icons": icons, "width": 32, "height": 32,
                                               "aliases": {"icon-1-alias": {"parent": "icon-1"}}}))
    (pkg / "chars.json").write_text(json.dumps(chars))


@pytest.fixture
def npm_root(tmp_path: Path) -> Path:
    return fake_npm_root(tmp_path / "npm")


def test_emoji_table_names_keywords_white_composite_and_provenance(tmp_path: Path, npm_root: Path) -> None:
    table, skipped = emoji.build("twitter", tmp_path / "tw.parquet", npm_root)
    rows = table.to_pylist()
    # 17 entries: the swatch is left out, one emoji has no Twitter drawing.
    assert skipped == {"component": 1, "not_drawn": 1, "named_without_cldr": 1} and len(rows) == 15
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    first = next(r for r in rows if r["unified"] == HELD[0])
    assert first["id"] == f"twitter/{HELD[0]}" and first["name"] == "thing 0" and first["keywords"] == ["kw", "word0"]
    assert next(r for r in rows if r["unified"] == KEPT[0])["name"] == "thing 6"
    image = Image.open(io.BytesIO(first["image"]))
    assert image.mode == "RGB" and image.size == (64, 64) and image.getpixel((5, 5)) == (255, 255, 255)  # alpha 0
    meta = pq.read_schema(tmp_path / "tw.parquet").metadata
    assert b"CC-BY-4.0" in meta[b"witflow.licence"] and b"Unicode License v3" in meta[b"witflow.licence"]
    assert b"emoji-datasource-twitter 16.0.0" in meta[b"witflow.source"] and meta[b"witflow.attribution"]


def test_openmoji_svgs_are_rasterised_and_keyed_like_the_other_vendors(tmp_path: Path, npm_root: Path) -> None:
    table, skipped = emoji.build("openmoji", tmp_path / "om.parquet", npm_root)
    rows = {r["unified"]: r for r in table.to_pylist()}
    # Swatch, OpenMoji's own extra and the skin-tone variant left out; FE0F dropped from the key.
    assert skipped == {"component": 1, "not_unicode": 1, "named_without_cldr": 1}
    assert sorted(rows) == sorted(HELD + KEPT) and rows[HELD[0]]["id"] == f"openmoji/{HELD[0]}"
    assert rows[HELD[0]]["name"] == "thing 0" and rows[HELD[3]]["name"] == "om 3"  # CLDR name, else OpenMoji's
    image = Image.open(io.BytesIO(rows[KEPT[0]]["image"]))
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((32, 32)) != (255, 255, 255)
    assert b"CC-BY-SA-4.0" in pq.read_schema(tmp_path / "om.parquet").metadata[b"witflow.licence"]


def test_iconify_svgs_are_keyed_by_their_chars_map_and_rasterised(tmp_path: Path, npm_root: Path) -> None:
    table, skipped = emoji.build("fluent", tmp_path / "fl.parquet", npm_root)
    rows = {r["unified"]: r for r in table.to_pylist()}
    # Left out: the toned variant, the swatch, the code point emoji.json lacks, the flipped icon, and
    # the hidden icon and alias no code point maps to; HELD[3] has no CLDR name (counted, kept).
    assert skipped == {"skin_tone": 1, "component": 1, "not_in_emoji_data": 1, "no_plain_icon": 1,
                       "no_code_point": 2, "named_without_cldr": 1}
    assert sorted(rows) == sorted(u for u in HELD + KEPT if u != HELD[4])
    assert rows[HELD[0]]["id"] == f"fluent/{HELD[0]}" and rows[HELD[0]]["vendor"] == "fluent"
    assert rows[KEPT[0]]["name"] == "thing 6" and rows[KEPT[0]]["keywords"] == ["kw", "word6"]
    assert rows[HELD[3]]["name"] == "thing 3"  # emoji.json's Unicode name stands in
    assert rows[HELD[1]]["subcategory"] == "country-flag" and rows[KEPT[0]]["category"] == "Objects"
    for u in (HELD[0], KEPT[0]):  # HELD[0]'s icon has a 36-wide box: still 64 x 64, letterboxed
        image = Image.open(io.BytesIO(rows[u]["image"]))
        assert image.mode == "RGB" and image.size == (64, 64)
        assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((32, 32)) != (255, 255, 255)
    assert rows[HELD[0]]["image"] != rows[KEPT[0]]["image"]
    meta = pq.read_schema(tmp_path / "fl.parquet").metadata
    assert b"images MIT" in meta[b"witflow.licence"] and b"Microsoft" in meta[b"witflow.attribution"]
    assert b"@iconify-json/fluent-emoji-flat 1.2.6" in meta[b"witflow.source"]
    assert b"emoji-datasource-google 16.0.0 emoji.json" in meta[b"witflow.source"]
    again, _ = emoji.build("fluent", tmp_path / "fl2.parquet", npm_root)
    assert again.equals(table)  # deterministic


@pytest.mark.parametrize("field", ["package.json", "spdx", "url"])
def test_iconify_build_refuses_a_changed_licence(tmp_path: Path, npm_root: Path, field: str) -> None:
    pkg = npm_root / emoji.VENDORS["fluent"].package
    name = "package.json" if field == "package.json" else "info.json"
    doc = json.loads((pkg / name).read_text())
    if field == "package.json":
        doc["license"] = "CC-BY-NC-4.0"
    else:
        doc["license"][field] = "CC-BY-NC-4.0"
    (pkg / name).write_text(json.dumps(doc))
    with pytest.raises(emoji.EmojiError, match=f"fluent-emoji-flat: .*{'license' if name == 'package.json' else field}"
                                               r" is 'CC-BY-NC-4.0'.*check the package's licence"):
        emoji.build("fluent", tmp_path / "fl.parquet", npm_root)
    assert not (tmp_path / "fl.parquet").exists()


def test_iconify_build_refuses_a_package_without_a_chars_map(tmp_path: Path, npm_root: Path) -> None:
    (npm_root / emoji.VENDORS["fluent"].package / "chars.json").write_text("{}")  # as fxemoji's, emojione's
    with pytest.raises(emoji.EmojiError, match="chars.json: no code point map"):
        emoji.build("fluent", tmp_path / "fl.parquet", npm_root)


REAL_NPM_ROOT = emoji.NPM_ROOT


@pytest.mark.skipif(not (REAL_NPM_ROOT / emoji.VENDORS["fluent"].package / "chars.json").is_file()
                    or not (REAL_NPM_ROOT / emoji.EMOJI_DATA_PACKAGE / "emoji.json").is_file(),
                    reason="npm @iconify-json/fluent-emoji-flat / emoji-datasource-google not in .venv/npm "
                           "(infra/setup.sh installs them)")
def test_real_fluent_package_licence_and_every_icon_accounted_for() -> None:
    from collections import Counter

    vendor = emoji.VENDORS["fluent"]
    emoji.check_licence(REAL_NPM_ROOT, vendor)
    pkg = REAL_NPM_ROOT / vendor.package
    icon_set = json.loads((pkg / "icons.json").read_text())
    chars = json.loads((pkg / "chars.json").read_text())
    skipped: Counter = Counter()
    entries = emoji._entries(vendor, pkg, REAL_NPM_ROOT, skipped)
    assert skipped["not_in_emoji_data"] == 0 and skipped["no_plain_icon"] == 0  # every code point known
    assert len(entries) + sum(skipped.values()) - skipped["no_code_point"] == len(chars)
    assert skipped["no_code_point"] == len(set(icon_set["icons"]) | set(icon_set.get("aliases", {}))) - len(set(chars.values()))
    keys = [e["unified"] for e in entries]
    assert len(set(keys)) == len(keys) and sum(map(emoji.is_heldout, keys)) > 150
    for e in entries[:: len(entries) // 4]:
        data, width, height = emoji.render_png(e["image"])
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert (width, height) == (64, 64) and (pixels < 250).any(axis=-1).mean() > 0.1  # drawn, not blank


def test_emoji_unicode_name_stands_in_without_cldr(tmp_path: Path, npm_root: Path) -> None:
    table, _ = emoji.build("google", tmp_path / "g.parquet", npm_root)
    row = next(r for r in table.to_pylist() if r["unified"] == HELD[3])
    assert row["name"] == "thing 3" and row["keywords"] == []


def test_emoji_build_refuses_a_package_whose_readme_no_longer_grants_the_licence(tmp_path: Path) -> None:
    nm = fake_npm_root(tmp_path / "npm", licence_ok=False)
    with pytest.raises(emoji.EmojiError, match="licence statement"):
        emoji.build("twitter", tmp_path / "tw.parquet", nm)
    with pytest.raises(emoji.EmojiError, match="not found.*setup.sh"):
        emoji.build("twitter", tmp_path / "tw.parquet", tmp_path / "nowhere")
    with pytest.raises(emoji.EmojiError, match="unknown emoji vendor 'apple'"):
        emoji.build("apple", tmp_path / "a.parquet", nm)
    assert not (tmp_path / "tw.parquet").exists()


def test_emoji_holdout_is_by_code_point_for_every_vendor() -> None:
    assert all(emoji.is_heldout(u) for u in HELD) and not any(emoji.is_heldout(u) for u in KEPT)
    assert emoji.is_heldout(HELD[0].lower()) and emoji.emoji_id("google", HELD[0].lower()) == f"google/{HELD[0]}"
    share = np.mean([emoji.is_heldout(f"{n:X}") for n in range(0x1F000, 0x1F000 + 4000)])
    assert abs(share - emoji.HELDOUT_FRACTION) < 0.02


def _read(source: SourceConfig, base: Path) -> tuple[pa.Table, dict]:
    tables, dropped = [], {}
    for shard in plan_input_shards([source], base):
        table, funnel = read_input_shard_with_funnel(shard)
        tables.append(table)
        for k, v in funnel.stage("read").dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    return pa.concat_tables(tables), dropped


def test_emoji_reader_leaves_out_heldout_emoji_and_captions_with_keywords(tmp_path: Path, npm_root: Path) -> None:
    emoji.build("twitter", tmp_path / "tw.parquet", npm_root)
    plain, dropped = _read(SourceConfig(kind="emoji", path="tw.parquet", rows_per_input_shard=4), tmp_path)
    held_drawn = [u for u in HELD if u != HELD[2]]  # HELD[2] has no Twitter drawing
    assert dropped == {"heldout": len(held_drawn)} and plain.num_rows == len(KEPT)
    assert all(s.startswith("emoji:twitter/") and s.split("/")[1] in KEPT for s in plain.column("sample_id").to_pylist())
    assert plain.column("caption").to_pylist()[0] == "thing 6"
    # caption_keywords: the reader gives the name, the caption step (its preset policy) adds the keywords
    source = SourceConfig(kind="emoji", path="tw.parquet", caption_keywords=True)
    rich, _ = _read(source, tmp_path)
    assert rich.column("caption").to_pylist() == plain.column("caption").to_pylist()
    composed = CaptionStep(source.caption)(rich).table
    assert composed.column("caption").to_pylist()[0] == "thing 6, kw, word6"
    meta = json.loads(composed.column("meta").to_pylist()[0])
    assert meta["id"] == f"twitter/{KEPT[0]}" and meta["caption_fields"] == ["caption+keywords"]


def test_caption_keywords_only_for_titled_kinds() -> None:
    with pytest.raises(ConfigError, match="caption_keywords is for kinds openclipart and emoji"):
        config_from_dict({"sources": [{"kind": "parquet", "path": "m.parquet", "caption_keywords": True}]})


# ------------------------------------------------------------------------------------------------
# Openclipart concepts
# ------------------------------------------------------------------------------------------------


def test_concepts_are_whole_words_with_plurals() -> None:
    assert concepts_named("Two cats and a dog", []) == {"cat", "dog"}
    assert concepts_named("Catfish", ["card", "scatter"]) == set()
    assert concepts_named("Red thing", ["boxes", "Houses", "tree"]) == {"house", "tree"}


def full_table(n: int = 400) -> pa.Table:
    """An Openclipart-shaped table: every concept alone, some pairs, some none."""
    rows = {f.name: [] for f in OPENCLIPART_SCHEMA}
    for i in range(n):
        concept = CONCEPT_CLASSES[i % len(CONCEPT_CLASSES)]
        title = [f"A {concept}", f"{concept} and {CONCEPT_CLASSES[(i + 1) % 16]}", f"thing {i}"][i % 3]
        rows["id"].append(f"svg/c/img_{i:04d}.svg")
        rows["category"].append("c")
        rows["title"].append(title)
        rows["keywords"].append(["clip art"])
        rows["description"].append(None)
        rows["image"].append(_png((i % 255, 0, 0), (20 + i % 7, 16), "RGB"))
        rows["width"].append(20 + i % 7)
        rows["height"].append(16)
    return pa.Table.from_pydict(rows, schema=OPENCLIPART_SCHEMA)


def test_concept_set_holds_out_half_of_the_single_concept_images_and_readers_leave_them_out(tmp_path: Path) -> None:
    table = full_table()
    path = tmp_path / "full.parquet"
    pq.write_table(table, path)
    records = table.select(["id", "title", "keywords"]).to_pylist()
    single = [r for r in records if len(concepts_named(r["title"], r["keywords"])) == 1]
    held = [r for r in single if concept_of(r["id"], r["title"], r["keywords"])]
    assert 0.4 < len(held) / len(single) < 0.7  # half, plus is_heldout's 10%
    assert all(concept_of(r["id"], r["title"], r["keywords"]) is None for r in records
               if len(concepts_named(r["title"], r["keywords"])) != 1)
    tune = load_eval_set(EvalSetConfig(name="c", kind="openclipart-concepts", path=str(path), split="tune"))
    final = load_eval_set(EvalSetConfig(name="c", kind="openclipart-concepts", path=str(path), split="final"))
    assert tune.classes == list(CONCEPT_CLASSES) and set(tune.ids).isdisjoint(final.ids)
    assert sorted(tune.ids + final.ids) == sorted(r["id"] for r in held)
    by_id = {r["id"]: r for r in records}
    assert all(CONCEPT_CLASSES[label] in by_id[i]["title"] for i, label in zip(tune.ids, tune.labels.tolist()))
    assert tune.training_ids == {f"openclipart:{i}" for i in tune.ids}
    read, dropped = _read(SourceConfig(kind="openclipart", path="full.parquet", rows_per_input_shard=150), tmp_path)
    trained = set(read.column("sample_id").to_pylist())
    assert trained.isdisjoint(tune.training_ids | final.training_ids)
    excluded = [r for r in records if excluded_from_training(r["id"], r["title"], r["keywords"])]
    assert dropped == {"heldout": len(excluded)} and read.num_rows == len(records) - len(excluded)
    assert all(is_heldout(r["id"]) or concept_of(r["id"], r["title"], r["keywords"]) for r in excluded)
    # read_openclipart's split is the same rule (the demo's HTTP path serves split="train").
    train_ids = read_openclipart(path, "train", columns=["title"]).column("id").to_pylist()
    assert {f"openclipart:{i}" for i in train_ids} == trained


def test_second_concept_set_is_disjoint_from_the_first_and_left_out_of_training(tmp_path: Path) -> None:
    assert not set(CONCEPT_CLASSES) & set(CONCEPT_CLASSES_B) and len(CONCEPT_CLASSES_B) == 16
    table = full_table(64)
    rows = {name: table.column(name).to_pylist() for name in table.column_names}
    for i in range(200):  # set B alone, set B with a set A concept, two of set B
        concept = CONCEPT_CLASSES_B[i % 16]
        rows["id"].append(f"svg/b/img_{i:04d}.svg")
        rows["title"].append([f"My {concept}", f"{concept} and a cat", f"{concept}s, {CONCEPT_CLASSES_B[(i + 1) % 16]}"][i % 3])
        for name in ("category", "keywords", "description", "image", "width", "height"):
            rows[name].append(rows[name][0])
    table = pa.Table.from_pydict(rows, schema=OPENCLIPART_SCHEMA)
    path = tmp_path / "full.parquet"
    pq.write_table(table, path)
    records = table.select(["id", "title", "keywords"]).to_pylist()
    held_b = [r for r in records if concept_b_of(r["id"], r["title"], r["keywords"])]
    alone = [r for r in records if r["id"].startswith("svg/b/") and int(r["id"][-8:-4]) % 3 == 0]
    assert held_b and all(r in alone for r in held_b) and 0.4 < len(held_b) / len(alone) < 0.7
    b = load_eval_set(EvalSetConfig(name="b", kind="openclipart-concepts-b", path=str(path), split="all"))
    assert b.classes == list(CONCEPT_CLASSES_B) and sorted(b.ids) == sorted(r["id"] for r in held_b)
    assert all(CONCEPT_CLASSES_B[label] in i_title for i_title, label in
               zip([{r["id"]: r["title"] for r in records}[i] for i in b.ids], b.labels.tolist()))
    a = load_eval_set(EvalSetConfig(name="a", kind="openclipart-concepts", path=str(path), split="all"))
    assert set(a.ids).isdisjoint(b.ids)
    read, _ = _read(SourceConfig(kind="openclipart", path="full.parquet", rows_per_input_shard=150), tmp_path)
    assert set(read.column("sample_id").to_pylist()).isdisjoint(b.training_ids)
    assert b.templates == a.templates


def test_splits_are_halves_and_unknown_splits_are_refused() -> None:
    keys = [f"k{i}" for i in range(1000)]
    tune = {k for k in keys if in_split("tune", k, "s")}
    final = {k for k in keys if in_split("final", k, "s")}
    assert tune.isdisjoint(final) and tune | final == set(keys) and 400 < len(tune) < 600
    assert all(in_split("all", k, "s") and in_split("test", k, "s") for k in keys)
    with pytest.raises(EvalSetError, match="split must be tune, final or all"):
        in_split("validation", "k", "s")


def test_fresh_fluent_set_is_its_drawings_of_heldout_emoji_without_place_flags(tmp_path: Path, npm_root: Path) -> None:
    emoji.build("fluent", tmp_path / "fl.parquet", npm_root)
    cfg = EvalSetConfig(name="emoji-heldout-fluent", kind="emoji-heldout", path=str(tmp_path / "fl.parquet"), split="all")
    s = load_eval_set(cfg)
    # Fluent draws HELD[1] (a country flag: no eval class) and every KEPT emoji (not held out); HELD[4]
    # only as a flipped icon (not in the table).
    expected = [u for u in HELD if u not in (HELD[1], HELD[4])]
    assert sorted(i.split("/")[1] for i in s.ids) == sorted(expected) and all(i.startswith("fluent/") for i in s.ids)
    assert len(s.classes) == len(expected) and sorted(s.labels.tolist()) == list(range(len(expected)))
    assert [s.classes[k] for k in s.labels.tolist()] == [f"thing {HELD.index(i.split('/')[1])}" for i in s.ids]
    assert s.training_ids == {f"emoji:{v}/{u}" for u in expected for v in emoji.VENDORS}
    assert "fluent" in emoji.VENDORS and training_ids(cfg) == s.training_ids
    assert load_eval_set(cfg).checksum() == s.checksum()  # deterministic
    # No reader trains on it: kind emoji leaves every held-out code point out.
    read, dropped = _read(SourceConfig(kind="emoji", path="fl.parquet"), tmp_path)
    assert dropped == {"heldout": len(HELD) - 1} and set(read.column("sample_id").to_pylist()).isdisjoint(s.training_ids)


def test_emoji_heldout_set_is_another_vendors_drawings_of_heldout_emoji(tmp_path: Path, npm_root: Path) -> None:
    emoji.build("google", tmp_path / "g.parquet", npm_root)
    cfg = EvalSetConfig(name="e", kind="emoji-heldout", path=str(tmp_path / "g.parquet"), split="all")
    s = load_eval_set(cfg)
    # HELD[1] is a country flag: its name is a place, not an eval class.
    expected = [u for u in HELD if u != HELD[1]]
    assert sorted(i.split("/")[1] for i in s.ids) == sorted(expected)
    assert all(i.startswith("google/") for i in s.ids) and len(s.classes) == len(expected)
    assert sorted(s.labels.tolist()) == list(range(len(expected)))  # one drawing per name
    assert s.training_ids == {f"emoji:{v}/{u}" for u in expected for v in emoji.VENDORS}
    assert training_ids(cfg) == s.training_ids
    assert training_ids(EvalSetConfig(name="f", kind="fashion-mnist")) == frozenset()
    with pytest.raises(EvalSetError, match="path.*emoji table is required"):
        load_eval_set(EvalSetConfig(name="e", kind="emoji-heldout"))


# ------------------------------------------------------------------------------------------------
# The build's provenance and hold-out check
# ------------------------------------------------------------------------------------------------


def _shard(store_root: Path, key: str, ids: list[str]) -> dict:
    path = store_root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sample_id": pa.array(ids, pa.string())}), path)
    return {"path": key, "rows": len(ids)}


def test_holdout_check_counts_and_refuses_contaminated_shards(tmp_path: Path, npm_root: Path) -> None:
    from tasks.build.records import WrittenShards
    from tasks.build.stages import EvalContamination, eval_holdout_check

    emoji.build("google", tmp_path / "g.parquet", npm_root)
    sets = [EvalSetConfig(name="e", kind="emoji-heldout", path=str(tmp_path / "g.parquet"), split="all"),
            EvalSetConfig(name="f", kind="fashion-mnist", path=str(tmp_path / "no-such-dir"))]
    root = tmp_path / "ds"
    clean = WrittenShards([_shard(root, "shards/part-00000.parquet", [f"emoji:twitter/{u}" for u in KEPT])],
                          [_shard(root, "holdout/part-00000.parquet", [f"emoji:twitter/{HELD[0]}"])])
    report = eval_holdout_check(sets, str(root), None, clean)
    assert report == {"e": {"training_ids": len(emoji.VENDORS) * (len(HELD) - 1), "in_shards": 0, "in_holdout": 1}}
    dirty = WrittenShards([_shard(root, "shards/part-00001.parquet", [f"emoji:google/{HELD[4]}"])], [])
    with pytest.raises(EvalContamination, match=f"eval set 'e'.*emoji:google/{HELD[4]}"):
        eval_holdout_check(sets, str(root), None, dirty)


def test_source_provenance_reads_the_packaged_tables_metadata(tmp_path: Path, npm_root: Path) -> None:
    from tasks.build.stages import source_provenance

    emoji.build("twitter", tmp_path / "tw.parquet", npm_root)
    pq.write_table(pa.table({"url": ["http://x/1"], "caption": ["c"]}), tmp_path / "m.parquet")
    out = source_provenance([SourceConfig(kind="emoji", path="tw.parquet"),
                             SourceConfig(kind="parquet", path="m.parquet")], str(tmp_path))
    assert out[0]["kind"] == "emoji" and out[0]["files"][0]["file"] == "tw.parquet"
    assert "CC-BY-4.0" in out[0]["files"][0]["licence"] and "Twemoji" in out[0]["files"][0]["attribution"]
    assert out[1]["files"] == [{"file": "m.parquet", "bytes": (tmp_path / "m.parquet").stat().st_size}]


def test_third_concept_set_is_disjoint_from_the_others_and_left_out_of_training(tmp_path: Path) -> None:
    assert len(set(CONCEPT_CLASSES_C)) == len(CONCEPT_CLASSES_C) == 25
    assert not (set(CONCEPT_CLASSES) | set(CONCEPT_CLASSES_B)) & set(CONCEPT_CLASSES_C)
    table = full_table(64)
    rows = {name: table.column(name).to_pylist() for name in table.column_names}
    others = (CONCEPT_CLASSES[0], CONCEPT_CLASSES_B[0])
    for i in range(300):  # set C alone, set C with a set A or a set B concept, two of set C
        concept, nxt = CONCEPT_CLASSES_C[i % 25], CONCEPT_CLASSES_C[(i + 1) % 25]
        rows["id"].append(f"svg/setc/img_{i:04d}.svg")
        rows["title"].append([f"My {concept}", f"{concept} and a {others[0]}", f"{concept} and a {others[1]}",
                              f"{concept}s, {nxt}"][i % 4])
        for name in ("category", "keywords", "description", "image", "width", "height"):
            rows[name].append(rows[name][0])
    table = pa.Table.from_pydict(rows, schema=OPENCLIPART_SCHEMA)
    path = tmp_path / "full.parquet"
    pq.write_table(table, path)
    records = table.select(["id", "title", "keywords"]).to_pylist()
    held_c = [r for r in records if concept_c_of(r["id"], r["title"], r["keywords"])]
    alone = [r for r in records if r["id"].startswith("svg/setc/") and int(r["id"][-8:-4]) % 4 == 0]
    assert held_c and all(r in alone for r in held_c) and 0.4 < len(held_c) / len(alone) < 0.7
    c = load_eval_set(EvalSetConfig(name="c", kind="openclipart-concepts-c", path=str(path), split="all"))
    assert c.classes == list(CONCEPT_CLASSES_C) and sorted(c.ids) == sorted(r["id"] for r in held_c)
    titles = {r["id"]: r["title"] for r in records}
    assert all(CONCEPT_CLASSES_C[label] in titles[i] for i, label in zip(c.ids, c.labels.tolist()))
    for kind in ("openclipart-concepts", "openclipart-concepts-b"):
        other = load_eval_set(EvalSetConfig(name="o", kind=kind, path=str(path), split="all"))
        assert set(other.ids).isdisjoint(c.ids)
    read, _ = _read(SourceConfig(kind="openclipart", path="full.parquet", rows_per_input_shard=150), tmp_path)
    assert set(read.column("sample_id").to_pylist()).isdisjoint(c.training_ids)
    assert len(c.training_ids) == len(held_c)


def test_a_changed_held_out_rule_is_a_new_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.openclipart as oc
    from tasks.build.workdir import sources_identity

    pq.write_table(full_table(8), tmp_path / "full.parquet")
    src = [SourceConfig(kind="openclipart", path="full.parquet")]
    before = sources_identity(src, str(tmp_path))
    assert sources_identity(src, str(tmp_path)) == before
    monkeypatch.setattr(oc, "CONCEPT_CLASSES_C", oc.CONCEPT_CLASSES_C[:-1])
    assert sources_identity(src, str(tmp_path)) != before
