"""Dedup: hashing, multi-index hashing, within-dataset duplicates (decontamination: test_decontam.py)."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.config import EvalSetConfig
from infra.eval_sets import EvalSet, load_eval_set
from infra.fanout import ShardFailures
from infra.storage import ObjectStore
from tasks.dedup.hashing import THUMB_SIDE, hash_table
from tasks.dedup.mih import MultiIndexHash, brute_force_search, choose_substrings
from tasks.dedup.verify import pair_ncc, thumbs_of
from tasks.dedup.bands import PairStats, band_values, bands, candidate_pairs, compact_ids, splits_well
from tasks.dedup.components import EDGE_SCHEMA, FileRef, components, read_all, spanning_stars
from tasks.dedup.within import (PartRef, near_duplicate_drops, within_dataset_duplicates,
                                within_dataset_duplicates_distributed)

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fashion_test() -> EvalSet:
    return load_eval_set(EvalSetConfig(name="fashion-mnist", kind="fashion-mnist"), max_images=300)


@pytest.fixture(scope="module")
def sample_hashed(sample_parquet) -> pa.Table:
    table = pq.read_table(sample_parquet, columns=["id", "image"]).rename_columns(["sample_id", "image"])
    return hash_table(table, "phash")


# ------------------------------------------------------------------------------------------------
# Hashing
# ------------------------------------------------------------------------------------------------


def test_hash_table_matches_imagehash_and_flags_what_it_cannot_use(fashion_test):
    blank = _png(Image.new("L", (40, 40), 255))
    table = pa.table({"sample_id": ["a", "b", "c", "d"],
                      "image": [fashion_test.images[0], blank, b"not an image", None]})
    out = hash_table(table, "phash")
    expected = int(str(imagehash.phash(Image.open(io.BytesIO(fashion_test.images[0])).convert("L"))), 16)
    assert out.column("phash").type == pa.uint64()
    assert out.column("phash").to_pylist()[0] == expected
    assert out.column("low_info").to_pylist() == [False, True, None, None]
    assert out.column("phash").to_pylist()[2:] == [None, None]
    assert len(out.column("thumb")[0].as_py()) == 32 * 32
    dh = hash_table(table.slice(0, 1), "dhash")
    assert dh.column("dhash").to_pylist()[0] == int(str(imagehash.dhash(Image.open(io.BytesIO(fashion_test.images[0])))), 16)
    with pytest.raises(ValueError, match="unknown hash kind"):
        hash_table(table, "md5")


def test_transparency_is_flattened_onto_white_before_hashing():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black
    for x in range(10, 50):
        for y in range(20, 30 + x // 4):
            rgba.putpixel((x, y), (200, 30, 30, 255))
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    out = hash_table(pa.table({"sample_id": ["t", "f"], "image": [_png(rgba), _png(flat)]}))
    a, b = out.column("phash").to_pylist()
    assert a == b
    assert out.column("pixels_sha256")[0] != out.column("pixels_sha256")[1]  # different pixels, same picture


# ------------------------------------------------------------------------------------------------
# Multi-index hashing
# ------------------------------------------------------------------------------------------------


def _pairs(result) -> set[tuple[int, int, int]]:
    return set(zip(*(x.tolist() for x in result)))


@pytest.mark.parametrize("radius", [0, 1, 3, 4, 8, 12])
def test_mih_equals_brute_force_on_random_hashes(radius):
    rng = np.random.default_rng(radius)
    codes = rng.integers(0, 2**63, size=60_000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + \
        rng.integers(0, 2, size=60_000).astype(np.uint64)
    queries = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64)
    # Plant neighbours at every distance up to radius + 2 so both sides of the boundary are tested.
    near = codes[:200].copy()
    for i in range(len(near)):
        for bit in rng.choice(64, size=i % (radius + 3), replace=False):
            near[i] ^= np.uint64(1) << np.uint64(int(bit))
    queries = np.concatenate([queries, near])
    assert choose_substrings(len(codes), radius) is not None  # the index path, not the scan
    mih = MultiIndexHash(codes)
    got = _pairs(mih.search(queries, radius))
    want = _pairs(brute_force_search(codes, queries, radius))
    assert got == want
    assert sum(1 for q, _, _ in want if q >= 300) >= 200 * (radius + 1) // (radius + 3) - 1


def test_mih_small_sets_and_edge_cases():
    codes = np.array([0, 1, 3, 2**64 - 1], dtype=np.uint64)
    mih = MultiIndexHash(codes)
    q, c, d = mih.search(np.array([0], np.uint64), 2)
    assert sorted(zip(c.tolist(), d.tolist())) == [(0, 0), (1, 1), (2, 2)]
    assert len(mih.search(np.zeros(0, np.uint64), 4)[0]) == 0
    assert len(MultiIndexHash(np.zeros(0, np.uint64)).search(codes, 4)[0]) == 0
    # Duplicated codes are all returned.
    dup = MultiIndexHash(np.array([5, 5, 5], np.uint64))
    assert sorted(dup.search(np.array([5], np.uint64), 0)[1].tolist()) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# Within the dataset
# ------------------------------------------------------------------------------------------------


def _within(t: pa.Table, radius: int = 4, **kw) -> pa.Table:
    """The single-process reference on a hashed table (``sha256`` used when present)."""
    hashes = t.column("phash")
    return within_dataset_duplicates(t.column("sample_id").to_pylist(),
                                     hashes.to_numpy() if hashes.null_count == 0 else hashes.to_pylist(), radius,
                                     sha256=t.column("sha256").to_pylist() if "sha256" in t.column_names else None,
                                     pixels_sha256=t.column("pixels_sha256").to_pylist(),
                                     low_info=t.column("low_info").to_pylist(), thumbs=thumbs_of(t.column("thumb")), **kw)


def test_within_dataset_duplicates_on_the_bundled_sample(sample_hashed):
    dups = _within(sample_hashed)
    reasons = Counter(dups.column("reason").to_pylist())
    assert reasons["duplicate_exact"] > 0 and reasons["duplicate_near"] > 0
    rows = list(zip(*(dups.column(c).to_pylist() for c in ("sample_id", "representative", "reason"))))
    for sid, rep, _ in rows:
        assert rep < sid  # the smallest sample_id represents its group
    dropped = {r[0] for r in rows}
    assert not {r[1] for r in rows} & dropped  # representatives are kept
    # The sample's _01/_02 variant pairs: some are found as duplicates of each other.
    variant_pairs = [(s, r) for s, r, _ in rows if s.endswith("_02.svg") and r == s.replace("_02.svg", "_01.svg")]
    assert variant_pairs
    # Exact: a smaller sample_id has identical decoded pixels (its group's representative may be
    # a near duplicate of a still smaller one, which is then everyone's representative).
    digest = dict(zip(sample_hashed.column("sample_id").to_pylist(), sample_hashed.column("pixels_sha256").to_pylist()))
    smallest: dict[str, str] = {}
    for sid in sorted(digest):
        smallest.setdefault(digest[sid], sid)
    for sid, rep, reason in rows:
        if reason == "duplicate_exact":
            assert smallest[digest[sid]] < sid
            assert rep == smallest[digest[sid]] or smallest[digest[sid]] in dropped
    # Deterministic whatever the row order.
    shuffled = sample_hashed.take(pa.array(np.random.default_rng(0).permutation(sample_hashed.num_rows)))
    assert _within(shuffled).equals(dups)
    # The contract's form: the set of ids to drop.
    assert near_duplicate_drops(sample_hashed.column("sample_id").to_pylist(), sample_hashed.column("phash").to_numpy(), 4,
                                pixels_sha256=sample_hashed.column("pixels_sha256").to_pylist(),
                                low_info=sample_hashed.column("low_info").to_pylist(),
                                thumbs=thumbs_of(sample_hashed.column("thumb"))) == dropped


def test_within_near_duplicates_are_transitive_and_bytes_sha256_counts():
    ids = ["d", "c", "b", "a", "e"]
    hashes = np.array([0b111, 0b011, 0b001, 0, 0xFFFF0000], dtype=np.uint64)  # a-b-c-d a chain at radius 1
    dups = within_dataset_duplicates(ids, hashes, 1)
    assert dict(zip(dups.column("sample_id").to_pylist(), dups.column("representative").to_pylist())) == {
        "b": "a", "c": "a", "d": "a"}
    same_bytes = within_dataset_duplicates(["x2", "x1", "y"], [1, 2**40, 2**62], 0, sha256=["s", "s", "t"])
    assert same_bytes.to_pylist() == [{"sample_id": "x2", "representative": "x1", "reason": "duplicate_exact"}]
    with_nulls = within_dataset_duplicates(["p", "q"], [None, None], 4)
    assert with_nulls.num_rows == 0
    with pytest.raises(ValueError, match="not unique"):
        within_dataset_duplicates(["p", "p"], [1, 1], 0)


def _planted_duplicates() -> pa.Table:
    """Every within-dataset case at radius 4: exact groups (by pixels, by bytes, pixels before bytes),
    a near chain whose ends are 6 bits apart, an exact group whose representative is a near copy of
    a smaller id, low-information and null-hash rows, pairs within radius that fail verification,
    and unrelated rows."""
    rng = np.random.default_rng(7)
    rows: list[dict] = []

    def code() -> int:
        return int(rng.integers(0, 2**63, dtype=np.int64)) * 2 + int(rng.integers(0, 2))

    def flip(c: int, *bits: int) -> int:
        return c ^ sum(1 << b for b in bits)

    def texture() -> np.ndarray:
        return rng.integers(0, 256, (THUMB_SIDE, THUMB_SIDE)).astype(np.int16)

    def near(t: np.ndarray) -> bytes:  # the same picture, slightly noisy: correlates ~0.999
        return np.clip(t + rng.integers(-3, 4, t.shape), 0, 255).astype(np.uint8).tobytes()

    def digest(tag: str) -> str:
        return hashlib.sha256(tag.encode()).hexdigest()

    def row(sid: str, phash: int | None, thumb: bytes, pixels: str | None = None, sha: str | None = None,
            low: bool | None = False) -> None:
        rows.append({"sample_id": sid, "phash": phash, "thumb": thumb, "low_info": low,
                     "pixels_sha256": digest(sid) if pixels is None else pixels,
                     "sha256": digest("bytes:" + sid) if sha is None else sha})

    c, t = code(), texture()
    for i, bits in enumerate([(), (0, 1, 2), (0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5, 6, 7, 8)]):
        row(f"n{i + 1}", flip(c, *bits), near(t))
    e, t = code(), texture()
    row("e0", flip(e, 10, 11), near(t))
    for sid in ("e1", "e2", "e3"):
        row(sid, e if sid == "e1" else code(), near(t), pixels=digest("P1"))
    row("z1", None, near(t), pixels=digest("P1"))  # exact, though it has no hash
    row("z2", None, bytes(THUMB_SIDE * THUMB_SIDE))
    rows.append({"sample_id": "s1", "phash": code(), "thumb": near(texture()), "low_info": False,
                 "pixels_sha256": None, "sha256": digest("S")})
    rows.append({"sample_id": "s2", "phash": code(), "thumb": near(texture()), "low_info": False,
                 "pixels_sha256": None, "sha256": digest("S")})
    row("s3", code(), near(texture()), sha=digest("S"))  # same bytes' digest, but its own pixels win
    low_code, t = code(), texture()
    for sid, low in (("l1", True), ("l2", True), ("l3", None), ("l4", False)):
        row(sid, low_code, near(t), low=low)
    v = code()
    row("v1", v, near(texture()))
    row("v2", flip(v, 20), near(texture()))  # within radius, different pictures
    for i in range(300):
        row(f"r{i:03d}", code(), near(texture()))
    schema = pa.schema([("sample_id", pa.string()), ("phash", pa.uint64()), ("thumb", pa.binary()),
                        ("low_info", pa.bool_()), ("pixels_sha256", pa.string()), ("sha256", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _write_parts(t: pa.Table, stores: list[ObjectStore], n: int, seed: int = 1) -> list[PartRef]:
    order = np.random.default_rng(seed).permutation(t.num_rows)  # duplicates land in different parts
    parts = []
    for i in range(n):
        store = stores[i % len(stores)]
        store.write_parquet(f"clean/part-{i}.parquet", t.take(pa.array(order[i::n])))
        parts.append(PartRef(f"part-{i}", store, f"clean/part-{i}.parquet"))
    return parts


PLANTED = {"n2": ("n1", "duplicate_near"), "n3": ("n1", "duplicate_near"), "n4": ("n1", "duplicate_near"),
           "e1": ("e0", "duplicate_near"), "e2": ("e0", "duplicate_exact"), "e3": ("e0", "duplicate_exact"),
           "z1": ("e0", "duplicate_exact"), "s2": ("s1", "duplicate_exact")}


@pytest.mark.parametrize("use_ray", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_distributed_within_dedup_equals_the_single_process_result(request, tmp_path, sample_hashed, use_ray):
    if use_ray:
        request.getfixturevalue("ray_local")
    planted = _planted_duplicates()
    want = _within(planted)
    assert {r["sample_id"]: (r["representative"], r["reason"]) for r in want.to_pylist()} == PLANTED
    stores = [ObjectStore(str(tmp_path / "a")), ObjectStore(str(tmp_path / "b"))]
    parts = _write_parts(planted, stores, 4)
    scratch = ObjectStore(str(tmp_path / "scratch"))
    got = within_dataset_duplicates_distributed(parts, scratch=scratch, radius=4, num_partitions=3, use_ray=use_ray)
    assert got.table().equals(want)
    assert got.counts == dict(Counter(want.column("reason").to_pylist()))
    steps = {k.split("/")[1] for k in scratch.list()}
    assert {"exact", "exact-groups", "bands", "verify-a", "verify-b", "components", "join", "drops"} <= steps
    # Each part reads back exactly its own drops.
    by_part = {p.key: set(got.part_drops(p.key).column("sample_id").to_pylist()) for p in parts}
    for p in parts:
        assert by_part[p.key] == set(want.column("sample_id").to_pylist()) & set(p.store.read_parquet(p.path).column("sample_id").to_pylist())

    # The bundled sample's real exact and near groups, another split and the default partition count.
    cols = ["sample_id", "phash", "low_info", "pixels_sha256", "thumb"]
    sample = sample_hashed.select(cols)
    got = within_dataset_duplicates_distributed(_write_parts(sample, stores[:1], 3), scratch=scratch.child("sample"),
                                                radius=4, use_ray=use_ray).table()
    assert got.equals(_within(sample)) and got.num_rows > 0


def test_distributed_within_dedup_resumes_from_its_scratch_and_never_from_stale_pieces(tmp_path):
    planted = _planted_duplicates()
    store, scratch = ObjectStore(str(tmp_path / "parts")), ObjectStore(str(tmp_path / "scratch"))
    parts = _write_parts(planted, [store], 3)
    first = within_dataset_duplicates_distributed(parts, scratch=scratch, radius=4, num_partitions=2,
                                                  use_ray=False).table()
    # A rerun with the same parts and settings reads every map and reduce back: the parts may be gone.
    saved = {p.path: store.read_bytes(p.path) for p in parts}
    for p in parts:
        store.delete(p.path)
    again = within_dataset_duplicates_distributed(parts, scratch=scratch, radius=4, num_partitions=2,
                                                  use_ray=False).table()
    assert again.equals(first)
    # Other settings never reuse those pieces: the chain (3 bits a step) breaks at radius 2.
    for path, data in saved.items():
        store.write_bytes(path, data)
    for radius, partitions in ((2, 2), (4, 3)):
        got = within_dataset_duplicates_distributed(parts, scratch=scratch, radius=radius, num_partitions=partitions,
                                                    use_ray=False).table()
        assert got.equals(_within(planted, radius))
    assert not got.equals(_within(planted, 2))
    assert within_dataset_duplicates_distributed([], scratch=scratch, radius=4, use_ray=False).table().num_rows == 0


def test_distributed_within_dedup_reads_parts_and_writes_pieces_on_s3(s3_store):
    planted = _planted_duplicates()
    parts = _write_parts(planted, [s3_store.child("parts")], 3)
    got = within_dataset_duplicates_distributed(parts, scratch=s3_store.child("scratch"), radius=4, num_partitions=2,
                                                use_ray=False)
    assert got.table().equals(_within(planted))
    assert any("/bands/" in k and k.endswith(".parquet") for k in s3_store.child("scratch").list())


def test_distributed_within_dedup_names_the_part_it_cannot_read(tmp_path):
    store, scratch = ObjectStore(str(tmp_path / "parts")), ObjectStore(str(tmp_path / "scratch"))
    parts = _write_parts(_planted_duplicates(), [store], 2)
    store.write_parquet("clean/nohash.parquet", pa.table({"sample_id": ["x"]}))
    for bad, error in ((PartRef("gone", store, "clean/gone.parquet"), "gone: FileNotFoundError"),
                       (PartRef("nohash", store, "clean/nohash.parquet"), "nohash: ValueError")):
        with pytest.raises(ShardFailures) as failure:
            within_dataset_duplicates_distributed([*parts, bad], scratch=scratch, radius=4, use_ray=False)
        message = str(failure.value)
        assert "1 of 3 shards failed" in message and error in message and store.uri(bad.path) in message
    assert "no column phash" in message
    with pytest.raises(ValueError, match="unknown hash kind"):
        within_dataset_duplicates_distributed(parts, scratch=scratch, radius=4, kind="md5", use_ray=False)


def test_half_size_copies_are_compared_at_their_own_detail(fashion_test):
    """A 14-px copy of a 28-px image cannot hold its detail; both are reduced to 14 px first."""
    small = [_png(Image.open(io.BytesIO(b)).resize((14, 14), Image.BILINEAR)) for b in fashion_test.images[:40]]
    a = hash_table(pa.table({"sample_id": [str(i) for i in range(40)], "image": pa.array(small, pa.binary())}))
    b = hash_table(pa.table({"sample_id": [str(i) for i in range(40)], "image": pa.array(fashion_test.images[:40], pa.binary())}))
    assert a.column("min_side").to_pylist() == [14] * 40 and b.column("min_side").to_pylist() == [28] * 40
    ta, tb = thumbs_of(a.column("thumb")), thumbs_of(b.column("thumb"))
    sharp = pair_ncc(ta, tb)
    matched = pair_ncc(ta, tb, sides=np.full(40, 14))
    assert np.all(matched >= sharp - 1e-6) and np.mean(matched) > np.mean(sharp)
    assert np.allclose(pair_ncc(tb, tb, sides=np.full(40, 28)), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bounded work per row: band groups, capped candidate sets, distributed components
# ------------------------------------------------------------------------------------------------


def _band_pairs(codes: np.ndarray, radius: int, cap: int) -> tuple[set, PairStats]:
    """Pairs the within-dataset band stage finds among ``codes`` (one partition)."""
    n = len(codes)
    band_ids, values, frees, widths = [], [], [], []
    for b, (shift, bits) in enumerate(bands(radius)):
        value, free = band_values(codes, shift, bits)
        band_ids.append(np.full(n, b)), values.append(value), frees.append(free), widths.append(np.full(n, 64 - bits))
    rows = np.tile(np.arange(n), len(band_ids))
    group = compact_ids(np.concatenate(band_ids), np.concatenate(values))
    i, j, stats = candidate_pairs(group, np.tile(codes, len(band_ids)), np.concatenate(frees), np.concatenate(widths),
                                  rows, radius, cap)
    a, b = rows[i], rows[j]
    return set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist())), stats


@pytest.mark.parametrize("radius", [0, 2, 4, 7])
def test_band_pairs_equal_brute_force_at_any_cap(radius):
    rng = np.random.default_rng(radius)
    base = rng.integers(0, 2**63, 700, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    flips = [np.uint64(0), np.uint64(1 << 3), np.uint64(0b101 << 50), np.uint64(0xF << 20)]
    codes = np.concatenate([base ^ f for f in flips])
    # Skew: a third of the codes share their top 24 bits (big groups in the top band).
    codes[::3] = (codes[::3] & np.uint64((1 << 40) - 1)) | np.uint64(0xC0FFEE << 40)
    codes = np.concatenate([codes, codes[:40]])  # identical codes: pairs at radius 0 too
    qi, ci, _ = brute_force_search(codes, codes, radius)
    want = {(int(a), int(b)) for a, b in zip(qi, ci) if a < b}
    assert want
    for cap in (8, 64, 10_000):
        got, stats = _band_pairs(codes, radius, cap)
        assert got <= want  # never a pair beyond the radius
        if stats.capped_rows == 0:  # every group split down to the cap: exact recall
            assert got == want, (radius, cap)
        else:  # near-copy clusters above a small cap compare each row with its `cap` neighbours only
            assert len(got) >= 0.98 * len(want), (radius, cap, len(got), len(want))
    assert _band_pairs(codes, radius, 10_000)[1].capped_rows == 0
    if radius:  # the cap bounds the work: fewer comparisons than all pairs of the big groups
        assert _band_pairs(codes, radius, 8)[1].comparisons < _band_pairs(codes, radius, 10_000)[1].comparisons


def test_identical_codes_are_compared_with_a_capped_window():
    codes = np.full(5000, 0xDEADBEEF, dtype=np.uint64)
    got, stats = _band_pairs(codes, 4, 16)
    assert stats.capped_rows > 0 and stats.comparisons <= 5000 * 16 * 5
    # Each row meets its 16 neighbours in (code, id) order: a chain through the whole cluster.
    assert {(i, i + 1) for i in range(4999)} <= got
    assert len(got) < 5000 * 17


def _components_reference(edges: list[tuple[str, str]]) -> dict[str, str]:
    nodes = sorted({x for e in edges for x in e})
    pos = {s: i for i, s in enumerate(nodes)}
    parent = list(range(len(nodes)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in edges:
        ra, rb = find(pos[a]), find(pos[b])
        parent[max(ra, rb)] = min(ra, rb)
    return {s: nodes[find(i)] for i, s in enumerate(nodes) if find(i) != i}


def _edge_files(edges: list[tuple[str, str]], store: ObjectStore, files: int) -> list[FileRef]:
    node = {s: np.uint64(i) for i, s in enumerate(sorted({x for e in edges for x in e}))}
    refs = []
    for f in range(files):
        chunk = [(min(a, b), max(a, b)) for a, b in edges[f::files]]
        table = pa.table([pa.array([a for a, _ in chunk], pa.string()), pa.array([node[a] for a, _ in chunk], pa.uint64()),
                          pa.array([b for _, b in chunk], pa.string()), pa.array([node[b] for _, b in chunk], pa.uint64())],
                         schema=EDGE_SCHEMA)
        store.write_parquet(f"edges/{f}.parquet", table)
        refs.append(FileRef(f"e{f}", store, f"edges/{f}.parquet"))
    return refs


def test_distributed_components_equal_union_find(tmp_path):
    rng = np.random.default_rng(3)
    names = [f"s{int(x):06d}" for x in rng.permutation(100_000)[:600]]
    edges = [(names[i], names[i + 1]) for i in range(199)]  # a long chain (diameter 199), ids in random order
    edges += [(names[200], names[k]) for k in range(201, 260)]  # a star around a node that is not the smallest
    edges += [(names[rng.integers(260, 600)], names[rng.integers(260, 600)]) for _ in range(300)]  # random sparse
    edges = [(a, b) for a, b in edges if a != b]
    edges += edges[:50]  # duplicates are harmless
    want = _components_reference(edges)
    store = ObjectStore(str(tmp_path))
    for partitions, files in ((1, 1), (4, 3)):
        stars = components(_edge_files(edges, store.child(f"in{partitions}"), files),
                           scratch=store.child(f"cc{partitions}"), num_partitions=partitions, use_ray=False)
        got = read_all(stars)
        members = dict(zip(got.column("b").to_pylist(), got.column("a").to_pylist()))
        assert members == want
        rounds = {k.split("/")[0] for k in store.child(f"cc{partitions}").list()}
        assert len(rounds) < 2 * 20  # O(log² n) rounds, not the chain's length


def test_a_duplicate_cluster_beyond_the_cap_keeps_its_smallest_id(tmp_path):
    """3,000 copies of one image (same hash, correlating thumbnails, distinct bytes) and unrelated rows:
    the cluster's candidate sets are capped, yet every copy points to the cluster's smallest id,
    whatever the parts and partitions."""
    rng = np.random.default_rng(11)
    texture = rng.integers(0, 256, (THUMB_SIDE, THUMB_SIDE)).astype(np.int16)
    rows = []
    for i in rng.permutation(3000):
        noisy = np.clip(texture + rng.integers(-2, 3, texture.shape), 0, 255).astype(np.uint8).tobytes()
        rows.append({"sample_id": f"c{i:05d}", "phash": 0x0123456789ABCDEF, "thumb": noisy, "low_info": False,
                     "pixels_sha256": hashlib.sha256(f"c{i}".encode()).hexdigest()})
    for i in range(500):
        rows.append({"sample_id": f"u{i:05d}", "phash": int(rng.integers(0, 2**63)), "low_info": False,
                     "thumb": rng.integers(0, 256, THUMB_SIDE * THUMB_SIDE).astype(np.uint8).tobytes(),
                     "pixels_sha256": hashlib.sha256(f"u{i}".encode()).hexdigest()})
    table = pa.Table.from_pylist(rows, schema=pa.schema([("sample_id", pa.string()), ("phash", pa.uint64()),
                                                          ("thumb", pa.binary()), ("low_info", pa.bool_()),
                                                          ("pixels_sha256", pa.string())]))
    store = ObjectStore(str(tmp_path / "parts"))
    results = []
    for parts, partitions in ((2, 1), (5, 3)):
        refs = _write_parts(table, [store.child(f"{parts}")], parts, seed=parts)
        dups = within_dataset_duplicates_distributed(refs, scratch=ObjectStore(str(tmp_path / f"s{parts}")), radius=4,
                                                     max_candidates=32, num_partitions=partitions, use_ray=False)
        results.append(dups.table())
    assert results[0].equals(results[1])
    got = dict(zip(results[0].column("sample_id").to_pylist(), results[0].column("representative").to_pylist()))
    assert got == {f"c{i:05d}": "c00000" for i in range(1, 3000)}


def _hot_cluster_table(seed: int) -> pa.Table:
    """2,000 near-copies of one image (codes 0-2 bits from one centre, a third of them identical,
    correlating thumbnails) among 300 unrelated rows: the cluster's (band, value) groups are big and
    split poorly, so the band stage caps them."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (THUMB_SIDE, THUMB_SIDE)).astype(np.int16)
    centre = 0x0123456789ABCDEF
    rows = []
    for k, i in enumerate(rng.permutation(2000)):
        flips = 0 if k % 3 == 0 else sum(1 << int(b) for b in rng.choice(64, rng.integers(1, 3), replace=False))
        noisy = np.clip(texture + rng.integers(-2, 3, texture.shape), 0, 255).astype(np.uint8).tobytes()
        rows.append({"sample_id": f"c{i:05d}", "phash": centre ^ flips, "thumb": noisy, "low_info": False,
                     "pixels_sha256": hashlib.sha256(f"c{i}".encode()).hexdigest()})
    for i in range(300):
        rows.append({"sample_id": f"u{i:05d}", "phash": int(rng.integers(0, 2**63)), "low_info": False,
                     "thumb": rng.integers(0, 256, THUMB_SIDE * THUMB_SIDE).astype(np.uint8).tobytes(),
                     "pixels_sha256": hashlib.sha256(f"u{i}".encode()).hexdigest()})
    return pa.Table.from_pylist(rows, schema=pa.schema([("sample_id", pa.string()), ("phash", pa.uint64()),
                                                        ("thumb", pa.binary()), ("low_info", pa.bool_()),
                                                        ("pixels_sha256", pa.string())]))


def _band_stage(scratch: ObjectStore) -> tuple[set, dict]:
    """The band stage's verified candidate pairs and its summed metadata, read from the scratch."""
    pairs, meta = set(), Counter()
    for key in scratch.list():
        parts = key.split("/")  # d-<digest>/bands/reduce/p-<partition>.parquet
        if len(parts) == 4 and parts[1:3] == ["bands", "reduce"]:
            table = scratch.read_parquet(key)
            pairs |= set(zip(table.column("a").to_pylist(), table.column("b").to_pylist()))
            m = json.loads(table.schema.metadata[b"pairs"])
            for k, v in m.items():
                meta[k] = max(meta[k], v) if k == "largest_group" else meta[k] + v
    assert meta, f"no band reduce under {scratch.uri('')}"
    return pairs, dict(meta)


@pytest.mark.parametrize("hot_rows,parts,partitions,use_ray", [(150, 3, 4, False), (700, 2, 2, False),
                                                          pytest.param(150, 3, 4, True, marks=pytest.mark.slow)])
def test_a_hot_group_is_reduced_in_ranges_with_the_whole_groups_pairs(request, tmp_path, hot_rows, parts, partitions,
                                                                      use_ray):
    """A (band, value) group above ``hot_rows`` never sits whole in one reduce: it is cut into
    code-order ranges (all rows sampled at 150; a ~256-row sample at 700), each with the next
    range's first rows beside it, and the band stage finds exactly the pairs it finds with the
    group in one task; the drops are the same (on Ray too: the count pass's ranges are read on the
    workers)."""
    if use_ray:
        request.getfixturevalue("ray_local")
    table = _hot_cluster_table(seed=4)
    store = ObjectStore(str(tmp_path / "parts"))
    whole = within_dataset_duplicates_distributed(_write_parts(table, [store.child("one")], 1), radius=4,
                                                  scratch=ObjectStore(str(tmp_path / "whole")), max_candidates=8,
                                                  num_partitions=1, use_ray=False)
    want, whole_meta = _band_stage(ObjectStore(str(tmp_path / "whole")))
    assert whole_meta["hot_range_rows"] == 0 and whole_meta["largest_group"] > 1000  # the cluster, whole
    got = within_dataset_duplicates_distributed(_write_parts(table, [store.child("many")], parts, seed=parts), radius=4,
                                                scratch=ObjectStore(str(tmp_path / "ranges")), max_candidates=8,
                                                num_partitions=partitions, hot_rows=hot_rows, use_ray=use_ray)
    pairs, meta = _band_stage(ObjectStore(str(tmp_path / "ranges")))
    assert meta["hot_ranges"] >= 2 * 1000 // hot_rows and meta["hot_range_rows"] > 1000
    assert meta["hot_split_copies"] == 0  # a cluster of near-copies: no sub-band divides it
    # A range: ~hot_rows rows of its own (all sampled at 150: exactly 150) and 9 lent ones.
    assert meta["largest_group"] <= (hot_rows + 9 if hot_rows < 256 else 2 * hot_rows) < whole_meta["largest_group"]
    assert pairs == want
    assert got.table().equals(whole.table())
    reps = dict(zip(got.table().column("sample_id").to_pylist(), got.table().column("representative").to_pylist()))
    assert {k for k in reps if k.startswith("c")} == {f"c{i:05d}" for i in range(1, 2000)}


def test_a_hot_group_that_splits_well_is_split_in_the_map(tmp_path):
    """3,000 unrelated images (and a near-copy of each) whose hashes share one band's bits: a hot
    group of diverse codes. Its sample splits well, so the map sends each row to its sub-band
    groups, one level down, as one task holding the whole group splits it: the same pairs, the same
    comparisons, the same drops, and no reduce holds more than a sliver of the group."""
    rng = np.random.default_rng(7)
    shift, bits = bands(4)[0]
    mask = np.uint64(((1 << bits) - 1) << shift)
    base = rng.integers(0, 2**63, 1500, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    base = (base & ~mask) | (np.uint64(0x5A5 << shift) & mask)
    outside = [b for b in range(64) if not shift <= b < shift + bits]
    flips = np.array([sum(1 << int(b) for b in rng.choice(outside, rng.integers(1, 3), replace=False))
                      for _ in range(1500)], dtype=np.uint64)
    rows = []
    for i in range(1500):
        texture = rng.integers(0, 256, (THUMB_SIDE, THUMB_SIDE)).astype(np.int16)
        for copy, code in ((0, base[i]), (1, base[i] ^ flips[i])):
            thumb = np.clip(texture + rng.integers(-2, 3, texture.shape), 0, 255).astype(np.uint8).tobytes()
            rows.append({"sample_id": f"d{i:05d}-{copy}", "phash": int(code), "thumb": thumb, "low_info": False,
                         "pixels_sha256": hashlib.sha256(f"d{i}-{copy}".encode()).hexdigest()})
    table = pa.Table.from_pylist(rows, schema=pa.schema([("sample_id", pa.string()), ("phash", pa.uint64()),
                                                        ("thumb", pa.binary()), ("low_info", pa.bool_()),
                                                        ("pixels_sha256", pa.string())]))
    store = ObjectStore(str(tmp_path / "parts"))
    whole = within_dataset_duplicates_distributed(_write_parts(table, [store.child("one")], 1), radius=4,
                                                  scratch=ObjectStore(str(tmp_path / "whole")), max_candidates=8,
                                                  num_partitions=1, use_ray=False)
    want, whole_meta = _band_stage(ObjectStore(str(tmp_path / "whole")))
    assert whole_meta["largest_group"] == 3000
    got = within_dataset_duplicates_distributed(_write_parts(table, [store.child("many")], 3, seed=3), radius=4,
                                                scratch=ObjectStore(str(tmp_path / "split")), max_candidates=8,
                                                num_partitions=4, hot_rows=150, use_ray=False)
    pairs, meta = _band_stage(ObjectStore(str(tmp_path / "split")))
    assert meta["hot_split_copies"] == 5 * 3000 and meta["hot_ranges"] == 0
    assert meta["largest_group"] < 150
    assert (meta["comparisons"], meta["capped_rows"]) == (whole_meta["comparisons"], whole_meta["capped_rows"])
    assert pairs == want and len(want) >= 1500
    assert got.table().equals(whole.table())
    assert got.counts == {"duplicate_near": 1500}


def test_splits_well_applies_the_one_task_rule_to_many_groups_at_once():
    """Unrelated codes split; a cluster of near-copies, identical codes and a lone row do not:
    decided for every group in one call, as ``_split_plan`` decides inside one task."""
    rng = np.random.default_rng(2)
    diverse = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    centre = np.uint64(0x0123456789ABC)
    cluster = centre ^ (np.uint64(1) << rng.integers(0, 51, 400).astype(np.uint64))
    free = np.concatenate([diverse, cluster, np.full(50, centre, np.uint64), [centre]]) & np.uint64((1 << 51) - 1)
    group = np.repeat([7, 3, 9, 1], [400, 400, 50, 1])  # ids need not be dense or sorted
    # dense ids in sorted order: 1 (lone row), 3 (cluster), 7 (unrelated), 9 (identical)
    assert splits_well(group, free, 51, 4).tolist() == [False, False, True, False]
    assert splits_well(group[:400], free[:400], 51, 4).tolist() == [True]


def test_hot_rows_must_leave_room_for_the_candidate_window(tmp_path):
    parts = _write_parts(_hot_cluster_table(seed=1).slice(0, 50), [ObjectStore(str(tmp_path / "p"))], 1)
    with pytest.raises(ValueError, match=r"hot_rows \(9\) must be > max_candidates \+ 1 \(9\)"):
        within_dataset_duplicates_distributed(parts, scratch=ObjectStore(str(tmp_path / "s")), radius=4,
                                              max_candidates=8, hot_rows=9, use_ray=False)


def test_spanning_stars_keep_the_components_in_fewer_edges(tmp_path):
    rng = np.random.default_rng(5)
    names = [f"n{int(x):05d}" for x in rng.permutation(10_000)[:300]]
    clique = [(names[i], names[j]) for i in range(40) for j in range(i + 1, 40)]  # a cluster of copies
    chain = [(names[i], names[i + 1]) for i in range(40, 120)]
    edges = clique + chain
    table = read_all(_edge_files(edges, ObjectStore(str(tmp_path)), 1))
    stars = spanning_stars(table)
    assert stars.num_rows == 39 + 80  # nodes - components
    members = dict(zip(stars.column("b").to_pylist(), stars.column("a").to_pylist()))
    assert members == _components_reference(edges)
    assert spanning_stars(table.slice(0, 1)).equals(table.slice(0, 1))


def _imports_torch(module: str) -> bool:
    """Whether importing ``module`` in a fresh interpreter loads torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("module", ["tasks.dedup.hashing", "tasks.dedup.within", "tasks.dedup.eval_index",
                                    "tasks.dedup.eval_overlap", "tasks.build.jobs"])
def test_hashing_and_dedup_workers_do_not_import_torch(module):
    # torch costs a worker ~200 MB and seconds of imports; only verifying copy pairs needs it.
    assert not _imports_torch(module)


def test_copy_verification_is_what_loads_torch():
    # The check above can fail: the module that verifies copy pairs does load torch.
    assert _imports_torch("tasks.dedup.copy_verify")
