"""Decontamination: the copy detector against the CLIP-paper alteration families, colour-aware
verification, identical images, the faiss lookup, the versioned index and the report files
(full numbers: bench/dedup_quality.py)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from infra.config import BalanceConfig, DedupConfig, EvalSetConfig, GatherConfig, ImageConfig, StorageConfig
from infra.eval_sets import EvalSet, load_eval_set
from infra.storage import ObjectStore
from tasks.dedup import ann
from tasks.dedup import eval_index as eval_index_module
from tasks.dedup.alterations import FAMILIES, alter
from tasks.dedup.copy_detect import (DEFAULT_MAX_HUE_SHIFT, DEFAULT_MIN_SCORE, DEFAULT_MIN_SCORE_SMALL,
                                     copy_features, copy_features_from_bytes)
from tasks.dedup.copy_verify import verify
from tasks.dedup.eval_index import EvalIndex, ensure_eval_index
from tasks.dedup.eval_overlap import EVAL_MATCHES, filter_eval_overlap, match_eval, overlap_report
from tasks.dedup.hashing import hash_table
from tasks.dedup.overlap_sheet import MATCHES_COLUMNS, match_sheet, matches_table


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _table(ids: list[str], images: list[bytes | None]) -> pa.Table:
    return pa.table({"sample_id": ids, "image": pa.array(images, pa.binary())})


@pytest.fixture(scope="module")
def clipart(sample_parquet) -> EvalSet:
    """60 bundled Openclipart images, one per title (the sample repeats some pictures)."""
    t = pq.read_table(sample_parquet, columns=["id", "title", "image"])
    seen, rows = set(), []
    for i, (title, data) in enumerate(zip(t.column("title").to_pylist(), t.column("image").to_pylist())):
        digest = copy_features_from_bytes(data).rgb_sha256
        if title not in seen and digest not in seen and not copy_features_from_bytes(data).flat:
            seen.update((title, digest))
            rows.append(i)
        if len(rows) == 60:
            break
    ids = t.column("id").to_pylist()
    return EvalSet("clipart", ["x"], (), [ids[i] for i in rows], [t.column("image")[i].as_py() for i in rows],
                   np.zeros(len(rows), np.int64))


@pytest.fixture(scope="module")
def fashion() -> EvalSet:
    return load_eval_set(EvalSetConfig(name="fashion-mnist", kind="fashion-mnist"), max_images=200)


# ------------------------------------------------------------------------------------------------
# The detector
# ------------------------------------------------------------------------------------------------


def test_alteration_families_change_the_image_and_keep_it_readable(clipart):
    rng = np.random.default_rng(5)
    with Image.open(io.BytesIO(clipart.images[1])) as im:
        original = np.asarray(im.convert("RGB"))
    for family in FAMILIES:
        out = alter(clipart.images[1], family, rng)
        with Image.open(io.BytesIO(out)) as im:
            altered = np.asarray(im.convert("RGB"))
        assert altered.shape != original.shape or np.abs(altered.astype(int) - original).mean() > 0.5, family
    with pytest.raises(ValueError, match="unknown alteration family"):
        alter(clipart.images[1], "mirror", rng)


def test_hash_table_adds_the_copy_features_from_the_same_decode(clipart):
    out = hash_table(_table(["a", "b"], [clipart.images[0], b"not an image"]))
    f = copy_features_from_bytes(clipart.images[0])
    assert out.column("copy_thumb")[0].as_py() == f.thumb.tobytes()
    assert np.array_equal(np.frombuffer(out.column("copy_desc")[0].as_py(), np.float32), f.descriptor)
    assert out.column("rgb_sha256").to_pylist() == [f.rgb_sha256, None]
    assert out.column("copy_flat").to_pylist() == [False, None]


def test_defaults_agree_with_the_config():
    cfg = DedupConfig()
    assert (cfg.eval_min_score, cfg.eval_min_score_small, cfg.eval_max_hue_shift) == (
        DEFAULT_MIN_SCORE, DEFAULT_MIN_SCORE_SMALL, DEFAULT_MAX_HUE_SHIFT)


@pytest.mark.parametrize("kind", ["clipart", "fashion"])
def test_every_alteration_family_is_found(request, kind):
    eval_set = request.getfixturevalue(kind)
    index = EvalIndex.build([eval_set])
    rng = np.random.default_rng(0)
    per = 6
    src = rng.choice(len(eval_set), size=per * len(FAMILIES), replace=False)
    families = [FAMILIES[i // per] for i in range(len(src))]
    copies = [alter(eval_set.images[s], f, rng) for s, f in zip(src, families)]
    ids = [f"{f}/{i}" for i, f in enumerate(families)]
    step = filter_eval_overlap(_table(ids, copies), index)
    matched: dict[str, set[str]] = {}
    for sid, eid in zip(*(step.side[EVAL_MATCHES].column(c).to_pylist() for c in ("sample_id", "eval_id"))):
        matched.setdefault(sid, set()).add(eid)
    found = Counter(f for sid, f, s in zip(ids, families, src) if eval_set.ids[s] in matched.get(sid, ()))
    print(kind, dict(found))
    assert sum(found.values()) >= 0.85 * len(ids)
    assert all(found[f] >= per // 2 for f in FAMILIES), found  # no family is lost


def _arrow(colour: tuple[int, int, int], size: int = 96) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    d.polygon([(10, 38), (55, 38), (55, 18), (88, 48), (55, 78), (55, 58), (10, 58)], fill=colour, outline=(0, 0, 0))
    return img


def _flag(colours: tuple, size: tuple[int, int] = (96, 64)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    w = size[0] // 3
    for k, c in enumerate(colours):
        d.rectangle([k * w, 0, (k + 1) * w - 1, size[1] - 1], fill=c)
    return img


def _hue_shift(img: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(shift * 256)) % 256).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


def test_recoloured_drawings_are_not_copies_but_jittered_ones_are():
    green = _arrow((40, 180, 40))
    nigeria, peru = _flag(((0, 135, 81), (255, 255, 255), (0, 135, 81))), _flag(((217, 16, 35), (255, 255, 255), (217, 16, 35)))
    france, romania = _flag(((0, 35, 149), (255, 255, 255), (237, 41, 57))), _flag(((0, 43, 127), (252, 209, 22), (206, 17, 38)))
    evals = EvalSet("drawings", ["x"], (), ["green-arrow", "nigeria", "france"], [_png(green), _png(nigeria), _png(france)],
                    np.zeros(3, np.int64))
    index = EvalIndex.build([evals])
    cands = {"purple-arrow": _hue_shift(green, 0.45), "red-arrow": _arrow((200, 30, 30)), "peru": peru, "romania": romania,
             "jittered-arrow": _hue_shift(green, 0.03), "jittered-flag": _hue_shift(nigeria, -0.04)}
    step = filter_eval_overlap(_table(list(cands), [_png(v) for v in cands.values()]), index)
    matches = step.side[EVAL_MATCHES]
    assert dict(zip(matches.column("sample_id").to_pylist(), matches.column("eval_id").to_pylist())) == {
        "jittered-arrow": "green-arrow", "jittered-flag": "nigeria"}
    # Without the colour check the recolourings would pass on structure alone.
    thumbs = [copy_features(cands[k]).thumb for k in ("purple-arrow", "red-arrow", "peru")]
    v = verify(np.stack(thumbs), np.stack([copy_features(x).thumb for x in (green, green, nigeria)]))
    assert (v.whole > 0.9).all() and not v.colour_ok.any()


def test_only_alignments_a_copy_family_makes_are_plausible():
    import torch

    from tasks.dedup.copy_verify import plausible

    def params(a11, a12, a21, a22):
        return torch.tensor([[0.0, 0.0, a11 - 1, a12, a21, a22 - 1]])

    r = np.deg2rad(8)
    assert plausible(params(np.cos(r), -np.sin(r), np.sin(r), np.cos(r)))  # a rotation
    assert plausible(params(0.9, 0.0, 0.0, 0.97))  # a crop keeping 90% x 97%
    assert not plausible(params(0.8, -0.185, 0.074, 1.177))  # a heart squeezed into a box's outline
    assert not plausible(params(0.8, 0.0, 0.0, 0.8))  # zoomed further than any crop


def test_distinct_look_alikes_are_not_matched(fashion):
    """A generated family (rings and polygons that differ in one parameter) and distinct
    Fashion-MNIST train images: look-alikes at thumbnail size, not copies."""
    def ring(r: int, width: int) -> bytes:
        img = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(img).ellipse([48 - r, 48 - r, 48 + r, 48 + r], outline=(20, 20, 20), width=width)
        return _png(img)

    def polygon(n: int) -> bytes:
        img = Image.new("RGB", (96, 96), "white")
        pts = [(48 + 40 * np.cos(2 * np.pi * k / n), 48 + 40 * np.sin(2 * np.pi * k / n)) for k in range(n)]
        ImageDraw.Draw(img).polygon(pts, fill=(30, 90, 200))
        return _png(img)

    # Not told apart at thumbnail size (the benchmark's look-alike rate counts such families):
    # rings that differ only in line width (2 vs 6 px of 96), a filled pentagon and hexagon.
    family = {f"ring-{r}": ring(r, 3) for r in (20, 32, 44)} | {f"poly-{n}": polygon(n) for n in (3, 4, 6)}
    names = list(family)
    evals = EvalSet("shapes", ["x"], (), names[::2], [family[n] for n in names[::2]], np.zeros(len(names[::2]), np.int64))
    step = filter_eval_overlap(_table(names[1::2], [family[n] for n in names[1::2]]), EvalIndex.build([evals]))
    assert step.side[EVAL_MATCHES].num_rows == 0

    train = load_eval_set(EvalSetConfig(name="train", kind="fashion-mnist", split="train"), max_images=300)
    step = filter_eval_overlap(_table(train.ids, train.images), EvalIndex.build([fashion]))
    wrongly_dropped = 1 - step.table.num_rows / len(train.ids)
    print(f"fashion train dropped: {wrongly_dropped:.3f}")
    assert wrongly_dropped <= 0.03


def test_identical_bytes_and_pixels_always_match_whatever_the_name(clipart):
    blank = _png(Image.new("RGB", (40, 40), (255, 255, 255)))
    evals = EvalSet("e", ["x"], (), ["pic", "blank"], [clipart.images[0], blank], np.zeros(2, np.int64))
    index = EvalIndex.build([evals])
    assert index.image_flat.tolist() == [False, True]  # the blank page has no descriptor entry
    with Image.open(io.BytesIO(clipart.images[0])) as im:
        rgba = im.convert("RGBA")  # the same pixels, opaque, in another mode and encoding
    other_encoding = io.BytesIO()
    rgba.save(other_encoding, "PNG", compress_level=0)
    cands = {"renamed-bytes": clipart.images[0], "renamed-pixels": other_encoding.getvalue(), "blank-copy": blank,
             "other-blank": _png(Image.new("RGB", (41, 40), (255, 255, 255))), "broken": b"\x89PNG not really"}
    step = filter_eval_overlap(_table(list(cands), list(cands.values())), index)
    matches = step.side[EVAL_MATCHES]
    got = {(s, e, m) for s, e, m in zip(*(matches.column(c).to_pylist() for c in ("sample_id", "eval_id", "method")))}
    assert got == {("renamed-bytes", "pic", "pixels"), ("renamed-pixels", "pic", "pixels"),
                   ("blank-copy", "blank", "pixels")}
    assert step.funnel.stages["dedup_eval"].dropped == Counter({"eval_overlap:e": 3, "unhashable_image": 1})
    assert step.table.column("sample_id").to_pylist() == ["other-blank"]


# ------------------------------------------------------------------------------------------------
# The lookup and the versioned index
# ------------------------------------------------------------------------------------------------


def test_descriptor_index_exact_and_ivf_agree_with_the_numpy_scan(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16)).astype(np.float32)
    vectors = centres[rng.integers(0, 40, 6000)] + 0.4 * rng.normal(size=(6000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.integers(0, 6000, 200)] + 0.05 * rng.normal(size=(200, 16)).astype(np.float32)
    want_s, want = ann.brute_force_top_k(vectors, queries, 5)
    exact = ann.DescriptorIndex(vectors)
    assert exact.exact
    got_s, got = exact.search(queries, 5)
    assert np.array_equal(got, want) and np.allclose(got_s, want_s, atol=1e-5)
    monkeypatch.setattr(ann, "IVF_MIN_ENTRIES", 1000)
    ivf = ann.DescriptorIndex(vectors)
    assert not ivf.exact
    _, approx = ivf.search(queries, 5)
    recall = np.mean([len(set(a) & set(w)) / 5 for a, w in zip(approx, want)])
    assert recall >= 0.95
    assert ann.DescriptorIndex(vectors[:0]).search(queries, 3)[1].shape == (200, 1)


def test_index_save_load_and_versioning(tmp_path, fashion, monkeypatch):
    small = EvalSet(fashion.name, fashion.classes, (), fashion.ids[:30], fashion.images[:30], fashion.labels[:30])
    store = ObjectStore(str(tmp_path / "eval_index"))
    index, built = ensure_eval_index([small], store)
    assert built and store.exists(f"{index.version}/index.json")
    again, built_again = ensure_eval_index([small], store)
    assert not built_again and again.version == index.version
    assert np.array_equal(again.descriptors, index.descriptors) and np.array_equal(again.thumbs, index.thumbs)
    assert again.image_digests == index.image_digests and again.params == index.params
    queries = index.descriptors[::5]
    assert all(np.array_equal(a, b) for a, b in zip(again.lookup(queries), index.lookup(queries)))

    changed = EvalSet(small.name, small.classes, (), list(small.ids), list(small.images), small.labels.copy())
    changed.images[5] = _png(Image.new("L", (28, 28), 128))
    versions = {index.version, ensure_eval_index([changed], store)[0].version,
                ensure_eval_index([small], store, min_score=0.8)[0].version,
                ensure_eval_index([small], store, views=False)[0].version}
    assert len(versions) == 4  # a changed eval set or setting is a new version, beside the old
    # A changed detector is a new version too, and an index it did not build is never read.
    monkeypatch.setattr(eval_index_module, "detector_digest", lambda: "another detector")
    newer, built_newer = ensure_eval_index([small], store)
    assert built_newer and newer.version not in versions
    monkeypatch.undo()
    with pytest.raises(ValueError, match="built by another detector"):
        EvalIndex.load(store, newer.version)


# ------------------------------------------------------------------------------------------------
# The report a person can check, end to end through the build's stages
# ------------------------------------------------------------------------------------------------


def test_build_reports_every_drop_and_a_sheet_of_matches(tmp_path, fashion):
    from tasks.build import stages
    from tasks.build.records import FilterRecord, FilterStage, QueryMatchCounts
    from tasks.build.workdir import WorkDir

    storage = StorageConfig()
    eval_cfg = EvalSetConfig(name="fashion-mnist", kind="fashion-mnist", max_images=200)
    rng = np.random.default_rng(3)
    train = load_eval_set(EvalSetConfig(name="train", kind="fashion-mnist", split="train"), max_images=40)
    copies = [alter(fashion.images[i], f, rng) for i, f in zip(range(0, 40, 4), ("jpeg", "hsv", "rotation", "crop_zoom") * 3)]
    images = copies + list(train.images)
    ids = [f"c{i:02d}" for i in range(len(copies))] + [f"t{i:02d}" for i in range(len(train.images))]
    table = pa.table({"sample_id": ids, "source": ["t"] * len(ids), "caption": ["a thing"] * len(ids),
                      "url": pa.nulls(len(ids), pa.string()), "image": pa.array(images, pa.binary()),
                      "meta": pa.nulls(len(ids), pa.string()), "query_ids": pa.array([[0]] * len(ids), pa.list_(pa.int32()))})
    work = WorkDir(str(tmp_path / "work"), storage)
    records = []
    for shard, part in (("a", table.slice(0, 25)), ("b", table.slice(25))):
        work.store.write_parquet(WorkDir.filtered(shard), part)
        records.append(FilterRecord(shard, part.num_rows, matches=QueryMatchCounts((0,), (part.num_rows,))))
    filtered = FilterStage(work, tuple(records))
    stages.count_queries(filtered, 1, BalanceConfig())
    dedup = DedupConfig(within_dataset=False)
    ref = stages.eval_index([eval_cfg], str(tmp_path / "eval_index"), storage, dedup)
    clean = stages.clean_stage(filtered, balance=BalanceConfig(), gather=GatherConfig(),
                               images=ImageConfig(resize_longest_side=None, encode_format="PNG"), dedup=dedup,
                               index=ref, use_ray=False)
    dataset = str(tmp_path / "dataset")
    report = stages.eval_overlap_report(dataset_root=dataset, clean=clean, index=ref, eval_sets=[eval_cfg])

    out = ObjectStore(dataset)
    drops = pq.read_table(tmp_path / "dataset" / "reports" / "eval_matches.parquet")
    assert drops.column_names == list(MATCHES_COLUMNS)
    dropped = set(drops.column("sample_id").to_pylist())
    kept = {s for r in clean.records
            for s in clean.work.store.read_parquet(WorkDir.clean(r.shard_id)).column("sample_id").to_pylist()}
    assert dropped and not dropped & kept and dropped | kept == set(ids)  # every drop is recorded
    funnel_drops = sum(sum(r.funnel.stages["dedup_eval"].dropped.values()) for r in clean.records)
    assert funnel_drops == len(dropped)
    assert sum(1 for s in dropped if s.startswith("c")) >= 8  # the altered copies
    # Each altered copy was dropped for the eval image it was made from.
    by_sample: dict[str, set[str]] = {}
    for sid, eid in zip(drops.column("sample_id").to_pylist(), drops.column("eval_id").to_pylist()):
        by_sample.setdefault(sid, set()).add(eid)
    for sid in (s for s in dropped if s.startswith("c")):
        assert fashion.ids[int(sid[1:]) * 4] in by_sample[sid]
    assert report["fashion-mnist"]["overlap"] == len(set(drops.column("eval_id").to_pylist()))
    assert out.exists("reports/eval_overlap.json")
    with Image.open(io.BytesIO(out.read_bytes("reports/eval_matches.png"))) as sheet:
        assert sheet.format == "PNG" and sheet.width >= 4 * 96


def test_match_sheet_and_audit_table_from_matches(clipart):
    index = EvalIndex.build([clipart])
    rng = np.random.default_rng(1)
    copies = [alter(clipart.images[i], "jpeg", rng) for i in range(5)]
    matches = match_eval(hash_table(_table([f"s{i}" for i in range(5)], copies)), index)
    assert matches.num_rows >= 4 and matches.column("candidate_png").null_count == 0
    audit = matches_table(matches)
    assert audit.column_names == list(MATCHES_COLUMNS)
    assert audit.column("score").to_pylist() == sorted(audit.column("score").to_pylist(), reverse=True)
    lookup = dict(zip(clipart.ids, clipart.images))
    png = match_sheet(matches, lambda s, i: lookup[i], per_set=4, columns=2)
    with Image.open(io.BytesIO(png)) as sheet:
        assert sheet.size[0] == 2 * (2 * 96 + 8) and sheet.size[1] > 2 * 96
    assert match_sheet(matches.slice(0, 0), lambda s, i: None) is None
    report = overlap_report(matches, index)["clipart"]
    assert report["overlap"] == len(set(matches.column("eval_id").to_pylist())) and report["eval_images"] == len(clipart)
