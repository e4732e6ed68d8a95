"""The dataset build's runner (tasks/build/): per-shard jobs with completion records through the one
fan-out (in this process and on Ray, with the same results), the global reduces (counts, caps,
within-dataset drops, hold-out, output plan), and the rerun mode that fetches again only the
samples that failed transiently."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from infra.config import (BalanceConfig, DedupConfig, GatherConfig, ImageConfig, ShardConfig, SourceConfig,
                          StorageConfig, TextFilterConfig)
from infra.http_server import serve_files
from infra.storage import ObjectStore
from tasks.balance import CapHashes, balance_table, count_queries
from tasks.build import stages
from tasks.build.jobs import CleanContext, clean_shard
from tasks.build.records import FilterRecord, FilterStage, QueryMatchCounts, to_json
from tasks.build.workdir import WorkDir
from tasks.shards import select_holdout

STORAGE = StorageConfig()


def png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def filtered_part(ids: list[str], query_ids: list[list[int]], images: list[bytes | None] | None = None,
                  urls: list[str | None] | None = None) -> pa.Table:
    n = len(ids)
    return pa.table({"sample_id": ids, "source": ["t"] * n, "caption": [f"a photo of thing {i}" for i in ids],
                     "url": pa.array(urls or [None] * n, pa.string()),
                     "image": pa.array(images or [None] * n, pa.binary()), "meta": pa.nulls(n, pa.string()),
                     "query_ids": pa.array(query_ids, pa.list_(pa.int32()))})


def filter_stage_of(work: WorkDir, parts: dict[str, pa.Table]) -> FilterStage:
    """Write filtered parts as the read-filter-match stage leaves them, with their records."""
    from tasks.balance import sparse_query_counts

    records = []
    for shard_id, table in parts.items():
        work.store.write_parquet(WorkDir.filtered(shard_id), table)
        ids, counts = sparse_query_counts(table.column("query_ids"))
        records.append(FilterRecord(shard_id, table.num_rows, matches=QueryMatchCounts(tuple(ids.tolist()),
                                                                                        tuple(counts.tolist()))))
    return FilterStage(work, tuple(records))


# ------------------------------------------------------------------------------------------------
# read -> filter -> match: the same records in this process and on Ray
# ------------------------------------------------------------------------------------------------


def test_filter_stage_on_ray_equals_in_process(tmp_path, ray_local):
    pairs = pa.table({"id": [f"p{i}" for i in range(9)],
                      "caption": ["A dog on the beach", "IMG_0001.JPG", "A red car", "Un cane sulla spiaggia",
                                  "a cat", "the dog and the cat", "", "beach house at night", "zzz qqq"],
                      "image": pa.array([png(i) for i in range(9)], pa.binary())})
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    queries = pa.table({"query_id": pa.array([0, 1, 2], pa.int32()), "query": ["dog", "beach", "cat"],
                        "source": ["unigram"] * 3, "count": pa.array([1, 1, 1], pa.int64()),
                        "pmi": pa.nulls(3, pa.float64()), "views": pa.nulls(3, pa.int64())})
    pq.write_table(queries, tmp_path / "queries.parquet")
    ref = stages.find_query_list(str(tmp_path), STORAGE)
    assert ref is not None and ref.rows == 3 and stages.find_query_list(str(tmp_path / "none"), STORAGE) is None
    source = SourceConfig(kind="parquet", path=str(tmp_path / "pairs.parquet"), image_column="image", id_column="id",
                          rows_per_input_shard=4)
    shards = stages.plan_inputs([source], str(tmp_path))
    assert len(shards) == 3
    results = {}
    for use_ray in (False, True):
        root = str(tmp_path / f"run-{use_ray}")
        results[use_ray] = stages.filter_stage(shards, dataset_root=root, storage=STORAGE, sources=[source],
                                               base_dir=str(tmp_path), text_filter=TextFilterConfig(), queries=ref,
                                               use_ray=use_ray)
    local, remote = results[False], results[True]
    assert [r.shard_id for r in remote.records] == [s.shard_id for s in shards]
    assert [(r.rows, r.matches, r.funnel.to_dict()) for r in remote.records] == \
           [(r.rows, r.matches, r.funnel.to_dict()) for r in local.records]
    kept = pa.concat_tables([remote.work.store.read_parquet(WorkDir.filtered(s.shard_id)) for s in shards])
    assert sorted(kept.column("caption").to_pylist()) == ["A dog on the beach", "a cat", "beach house at night",
                                                           "the dog and the cat"]
    # The matcher was built once, by the driver, and stored with its automaton for every worker.
    from tasks.build.jobs import query_matcher
    from tasks.query_match import QueryMatcher

    stored = QueryMatcher.from_bytes(remote.work.store.read_bytes(WorkDir.QUERY_MATCHER))
    assert stored.match(["a dog and a cat"]).to_pylist() == [[0, 2]]
    remote.work.store.write_bytes(WorkDir.QUERY_MATCHER, b"not a pickle")  # unreadable: built from the list
    query_matcher.cache_clear()
    assert query_matcher(remote.work, ref).match(["a dog and a cat"]).to_pylist() == [[0, 2]]
    # A rerun returns the completion records instead of redoing the shards.
    store = remote.work.store
    stamp = {s.shard_id: store.read_text(WorkDir.filter_record(s.shard_id)) for s in shards}
    again = stages.filter_stage(shards, dataset_root=str(tmp_path / "run-True"), storage=STORAGE, sources=[source],
                                base_dir=str(tmp_path), text_filter=TextFilterConfig(), queries=ref, use_ray=False)
    assert again.records == remote.records and again.work == remote.work
    assert {s.shard_id: store.read_text(WorkDir.filter_record(s.shard_id)) for s in shards} == stamp


def test_repeated_captions_counted_across_shards_then_the_caption_falls_back(tmp_path, ray_local):
    """The count stage's shuffle finds a title on many different images across shards (copies of
    one image do not count); the filter stage then captions those rows from their keywords, with
    the provenance in meta, and drops the rows with nothing else."""
    import json

    from tasks.captions import BOILERPLATE

    from infra.openclipart import is_heldout
    from infra.schema import OPENCLIPART_SCHEMA

    n = 12
    titles = ["gramastar"] * 6 + ["A lighthouse on a cliff"] * 4 + ["a red car", "a dog on the beach"]
    keywords = [["star", "shape"]] * 5 + [[]] + [["lighthouse"]] * 4 + [["car"], ["dog"]]
    images = [png(i) for i in range(6)] + [png(99)] * 4 + [png(7), png(8)]  # the lighthouse: 4 copies of one image
    ids = [i for i in (f"svg/c/p{k:03d}.svg" for k in range(100)) if not is_heldout(i)][:n]
    pairs = pa.table({"id": ids, "category": ["c"] * n, "title": titles, "keywords": keywords,
                      "description": pa.nulls(n, pa.string()), "image": pa.array(images, pa.binary()),
                      "width": pa.array([40] * n, pa.int32()), "height": pa.array([48] * n, pa.int32())},
                     schema=OPENCLIPART_SCHEMA)
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    queries = pa.table({"query_id": pa.array([0, 1, 2, 3], pa.int32()), "query": ["star", "lighthouse", "car", "dog"],
                        "source": ["unigram"] * 4, "count": pa.array([1] * 4, pa.int64()),
                        "pmi": pa.nulls(4, pa.float64()), "views": pa.nulls(4, pa.int64())})
    pq.write_table(queries, tmp_path / "queries.parquet")
    ref = stages.find_query_list(str(tmp_path), STORAGE)
    from infra.config import CaptionConfig

    source = SourceConfig(kind="openclipart", path=str(tmp_path / "pairs.parquet"), rows_per_input_shard=5,
                          caption=CaptionConfig(fields=("title", "keywords")))
    shards = stages.plan_inputs([source], str(tmp_path))
    text_filter = TextFilterConfig(boilerplate_min_images=4)
    results = {}
    for use_ray in (False, True):
        root = str(tmp_path / f"run-{use_ray}")
        counts = stages.caption_counts(shards, dataset_root=root, storage=STORAGE, sources=[source],
                                       base_dir=str(tmp_path), text_filter=text_filter, queries=ref, use_ray=use_ray)
        assert counts is not None and counts.boilerplate == 2  # "gramastar" and its keywords "star, shape"
        filtered = stages.filter_stage(shards, dataset_root=root, storage=STORAGE, sources=[source],
                                       base_dir=str(tmp_path), text_filter=text_filter, queries=ref, captions=counts,
                                       use_ray=use_ray)
        table = pa.concat_tables([filtered.work.store.read_parquet(WorkDir.filtered(r.shard_id)) for r in filtered.records])
        results[use_ray] = (table.select(["sample_id", "caption", "meta"]).to_pylist(),
                            [r.funnel.to_dict() for r in filtered.records])
        counted = filtered.work.store.read_parquet(counts.key).to_pylist()
        assert {r["value"]: (r["rows"], r["images"], r["boilerplate"]) for r in counted} == \
            {"gramastar": (6, 6, True), "a lighthouse on a cliff": (4, 1, False), "star shape": (5, 5, True),
             "lighthouse": (4, 1, False)}
    assert results[True] == results[False]
    rows = {r["sample_id"].removeprefix("openclipart:"): r for r in results[True][0]}
    assert not any(i in rows for i in ids[:6])  # gramastar: its keywords are on 5 different images too
    meta = json.loads(rows[ids[6]]["meta"])  # copies of one image: not boilerplate
    assert rows[ids[6]]["caption"] == "A lighthouse on a cliff" and meta["caption_fields"] == ["title"]
    caption_drops = sum((s["dropped"].get(BOILERPLATE, 0) for f in results[True][1] for s in f["stages"]
                         if s["stage"] == "caption"))
    assert caption_drops == 6
    off = stages.caption_counts(shards, dataset_root=str(tmp_path / "off"), storage=STORAGE, sources=[source],
                                base_dir=str(tmp_path), text_filter=TextFilterConfig(boilerplate_min_images=None),
                                queries=ref)
    assert off is None


@pytest.mark.parametrize("use_ray,rows_per_partition", [(False, 4_000_000), (False, 3), (True, 3)])
def test_caption_report_from_shard_workers_equals_the_whole_output_read_at_once(tmp_path, ray_local, monkeypatch,
                                                                                use_ray, rows_per_partition):
    """Workers count the report values' different hashes on a (value, phash) shuffle and the
    caption lengths per shard; the driver merges counts, and the report is the one the whole
    output read at once gives (duplicate hashes across shards, skipped fields, null hashes)."""
    import json

    from infra.manifest import Manifest, ShardEntry
    from tasks.build.records import CaptionCounts
    from tasks.captions import (BOILERPLATE, COUNTS_SCHEMA, MAX_WORDS_BUCKET, OUTCOMES, OUTCOMES_SCHEMA,
                                carried_values, length_histogram, repeated_caption_report)

    monkeypatch.setattr(stages, "CAPTION_REPORT_ROWS_PER_PARTITION", rows_per_partition)
    skipped = json.dumps({"caption_skipped": {"title": [BOILERPLATE, "Gramastar"]}})
    shards = [  # (caption, meta, phash)
        [("star", skipped, 1), ("Star shape", skipped, 2), ("a red car", None, 5), ("A red car!", None, 5)],
        [("stars", skipped, 1), ("shape", skipped, None), ("a red car", None, 6), ("", None, 7)],
        [("star", skipped, 3), ("a dog " * 45, None, 8), ("a red car", None, 5)],
    ]
    root = tmp_path / "out"
    out = ObjectStore(str(root), STORAGE)
    entries = []
    for k, rows in enumerate(shards):
        table = pa.table({"caption": [r[0] for r in rows], "meta": pa.array([r[1] for r in rows], pa.string()),
                          "phash": pa.array([r[2] for r in rows], pa.uint64())})
        out.write_parquet(f"shards/{k:05d}.parquet", table)
        entries.append(ShardEntry(f"shards/{k:05d}.parquet", len(rows), 0, f"sha-{k}", None, f"plan-{k}"))
    manifest = Manifest(1, ("caption", "meta", "phash"), 11, 3, None, None, {}, tuple(entries), None, {}, None, None)
    work = WorkDir(str(tmp_path / "work"), STORAGE)
    counts = pa.table({"value": ["gramastar", "a red car", "star", "never output"], "rows": pa.array([5, 4, 3, 2]),
                       "images": pa.array([5, 3, 2, 2]), "example": ["Gramastar", "a red car", "star", "never"],
                       "boilerplate": [True, False, False, False]}, schema=COUNTS_SCHEMA)
    work.store.write_parquet("captions/counts.parquet", counts)
    outcomes = pa.table({"value": ["gramastar", "gramastar"], "outcome": ["keywords", "dropped"],
                         "rows": pa.array([5, 1])}, schema=OUTCOMES_SCHEMA)
    work.store.write_parquet(WorkDir.side(OUTCOMES, "p0"), outcomes)
    filtered = FilterStage(work, (FilterRecord("p0", 12, caption_words=(1,) * (MAX_WORDS_BUCKET + 1)),))

    stages.caption_report(dataset_root=str(root), filtered=filtered, captions=CaptionCounts("captions/counts.parquet", 4, 1),
                          manifest=manifest, top=4, use_ray=use_ray)

    every = [r for rows in shards for r in rows]
    whole: dict[str, set[int]] = {}  # the whole output at once, as the report was computed before
    for caption, meta, phash in every:
        for value in carried_values(caption, meta) if phash is not None else ():
            whole.setdefault(value, set()).add(phash)
    expected = repeated_caption_report(counts, outcomes, {v: len(h) for v, h in whole.items()}, top=4)
    report = out.read_parquet("reports/repeated_captions.parquet")
    assert report.to_pylist() == expected.to_pylist()
    assert [(r["value"], r["images_by_hash"]) for r in report.to_pylist()] == \
        [("gramastar", 3), ("a red car", 2), ("never output", 0), ("star", 2)]  # hash 1 twice; 5 on three rows
    lengths = out.read_parquet("reports/caption_lengths.parquet")
    assert lengths.column("output").to_pylist() == length_histogram([r[0] for r in every])
    assert lengths.column("as_read").to_pylist() == [1] * (MAX_WORDS_BUCKET + 1)


# ------------------------------------------------------------------------------------------------
# Balancing across shards: the counts reduce, the cap reduce, then the per-shard step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,cap_partitions,tight", [("probability", 1, False), ("exact", 1, False),
                                                        ("exact", 3, False), ("exact", 3, True)])
def test_balancing_across_shards_equals_balancing_the_whole_pool(tmp_path, ray_local, monkeypatch, mode,
                                                                 cap_partitions, tight):
    if cap_partitions > 1:  # the cap thresholds' shuffle by query over several partitions
        monkeypatch.setattr(stages, "CAP_PAIRS_PER_PARTITION", 60)
    if tight:  # bounds that let fewer than t + 1 pairs of every over-cap query through: later rounds widen them
        monkeypatch.setattr(stages, "CAP_SAMPLE_SIGMAS", -6.0)
        monkeypatch.setattr(stages, "CAP_SAMPLE_EXTRA", 0)
    rng = np.random.default_rng(3)
    n = 400
    ids = [f"s{i:04d}" for i in range(n)]
    qids = [[int(q) for q in sorted(set(rng.choice(4, size=rng.integers(1, 3), p=[0.7, 0.2, 0.05, 0.05])))]
            for _ in range(n)]
    tiny = png(0, (20, 20))
    whole = filtered_part(ids, qids, images=[tiny] * n)
    cuts = [0, 90, 250, n]
    work = WorkDir(str(tmp_path / "f"), STORAGE)
    filtered = filter_stage_of(work, {f"p{k}": whole.slice(cuts[k], cuts[k + 1] - cuts[k]) for k in range(3)})
    balance = BalanceConfig(max_per_query=60, mode=mode, seed=5)
    summary = stages.count_queries(filtered, 4, balance)
    counts = count_queries(whole.column("query_ids"), 4)
    assert (summary.pairs, summary.matched_queries) == (int(counts.sum()), 4)
    assert summary.over_cap == int((counts > 60).sum()) and summary.over_cap >= 2
    if mode == "exact":  # one shuffle per round: the first only when its bounds let t + 1 pairs through
        rounds = len(list((tmp_path / "f" / "caps").iterdir()))
        assert rounds > 1 if tight else rounds == 1
    clean = stages.clean_stage(filtered, balance=balance, gather=GatherConfig(),
                               images=ImageConfig(resize_longest_side=None, encode_format="keep", min_side=1),
                               dedup=DedupConfig(against_eval=False), index=None)
    kept = sorted(s for r in clean.records
                  for s in clean.work.store.read_parquet(WorkDir.clean(r.shard_id)).column("sample_id").to_pylist())
    thresholds = CapHashes.from_table(whole, counts, balance).thresholds(4) if mode == "exact" else None
    expected = balance_table(whole, counts, balance, thresholds=thresholds).table
    assert kept == sorted(expected.column("sample_id").to_pylist())
    stages_seen = {s for r in clean.records for s in r.funnel.stages}
    assert {"balance", "gather", "images"} <= stages_seen


# ------------------------------------------------------------------------------------------------
# Within the dataset, the hold-out and the output shards
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in", [64, 2])
def test_within_dataset_holdout_and_output_shards(tmp_path, ray_local, monkeypatch, fan_in):
    monkeypatch.setattr(stages, "HOLDOUT_FAN_IN", fan_in)  # 2: the hold-out merges over two levels
    images = [png(i) for i in range(30)]
    images[7] = images[3]  # exact duplicates across parts: the smallest sample_id is kept
    images[21] = images[3]
    images[12] = images[11]
    ids = [f"x{i:03d}" for i in range(30)]
    whole = filtered_part(ids, [[0]] * 30, images=images)
    work = WorkDir(str(tmp_path / "f"), STORAGE)
    filtered = filter_stage_of(work, {"a": whole.slice(0, 10), "b": whole.slice(10, 10), "c": whole.slice(20, 10)})
    stages.count_queries(filtered, 1, BalanceConfig())
    clean = stages.clean_stage(filtered, balance=BalanceConfig(), gather=GatherConfig(),
                               images=ImageConfig(resize_longest_side=None, encode_format="PNG"),
                               dedup=DedupConfig(against_eval=False), index=None)
    within = stages.within_dataset(clean, DedupConfig(against_eval=False), holdout_rows=5)
    assert within.drops == 3 and within.reasons == {"duplicate_exact": 3}
    drops = {"x007", "x021", "x012"}
    survivors = [s for s in ids if s not in drops]
    held = select_holdout(survivors, 5)
    assert sum(p.held for p in within.parts) == 5 and sum(p.kept for p in within.parts) == 22

    shard_cfg = ShardConfig(rows_per_shard=8, holdout_rows=5)
    dataset = str(tmp_path / "dataset")
    monkeypatch.setattr(stages, "cluster_cpus", lambda default=1: 1)  # one worker: the 3 shards are one run
    written = stages.write_output(clean, within, dataset_root=dataset, shards=shard_cfg)
    out = ObjectStore(dataset)
    train_ids = [s for w in written.shards for s in out.read_parquet(w["path"]).column("sample_id").to_pylist()]
    held_ids = [s for w in written.holdout for s in out.read_parquet(w["path"]).column("sample_id").to_pylist()]
    assert [w["rows"] for w in written.shards] == [8, 8, 6]
    assert sorted(train_ids) == sorted(set(survivors) - held) and len(train_ids) == len(set(train_ids))
    assert sorted(held_ids) == sorted(held)
    assert train_ids == [s for s in survivors if s not in held]  # part order, then row order

    # Rerun: every shard is complete for the same plan, nothing is rewritten.
    mtimes = {w["path"]: (tmp_path / "dataset" / w["path"]).stat().st_mtime_ns for w in written.shards}
    assert stages.write_output(clean, within, dataset_root=dataset, shards=shard_cfg) == written
    assert {p: (tmp_path / "dataset" / p).stat().st_mtime_ns for p in mtimes} == mtimes
    # Another plan (smaller shards) rewrites them and removes the extra shards of the old plan.
    bigger = stages.write_output(clean, within, dataset_root=dataset, shards=ShardConfig(rows_per_shard=50))
    assert [w["rows"] for w in bigger.shards] == [22]
    assert sorted(k for k in out.list("shards/") if k.endswith(".parquet")) == ["shards/part-00000.parquet"]


def test_output_runs_cover_every_shard_once_in_order_one_prefix_a_run():
    jobs = [stages.OutputShard(f"shards/part-{i:05d}", i, "shards", (), f"p{i}") for i in range(20)]
    jobs.append(stages.OutputShard("holdout/part-00000", 0, "holdout", (), "h"))
    for workers, sizes in [(1, [8, 8, 4, 1]), (4, [5, 5, 5, 5, 1]), (64, [1] * 21)]:
        runs = stages.output_runs(jobs, workers)
        assert [len(r.jobs) for r in runs] == sizes
        assert [j for r in runs for j in r.jobs] == jobs and all({j.prefix for j in r.jobs} == {r.prefix} for r in runs)
        assert len({r.key for r in runs}) == len(runs)
    assert stages.output_runs(jobs, 1)[0].key == "shards/part-00000..00007"


def test_manifest_funnel_adds_up(tmp_path):
    work = WorkDir(str(tmp_path / "f"), STORAGE)
    filtered = filter_stage_of(work, {"a": filtered_part(["a1", "a2"], [[0], [0]], images=[png(1), png(1)])})
    stages.count_queries(filtered, 1, BalanceConfig())
    clean = stages.clean_stage(filtered, balance=BalanceConfig(), gather=GatherConfig(),
                               images=ImageConfig(resize_longest_side=None, encode_format="PNG"),
                               dedup=DedupConfig(against_eval=False), index=None, use_ray=False)
    within = stages.within_dataset(clean, DedupConfig(against_eval=False), holdout_rows=0, use_ray=False)
    funnel = stages.build_funnel(filtered, clean, within).to_dict()
    last = funnel["stages"][-1]
    assert (last["stage"], last["in"], last["out"], last["dropped"]) == ("dedup_within", 2, 1, {"duplicate_exact": 1})


# ------------------------------------------------------------------------------------------------
# --retry-failed
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def flaky_server():
    """Serves ok/<i>.png always, and flaky/<i>.png with 503 until `state["up"]` is set."""
    state = {"up": False}
    files = {f"ok/{i}.png": png(i) for i in range(6)}
    flaky = {f"{i}.png": png(100 + i) for i in range(4)}

    async def flaky_route(request: web.Request) -> web.Response:
        if not state["up"]:
            return web.Response(status=503, text="try later")
        return web.Response(body=flaky[request.match_info["name"]], content_type="image/png")

    with serve_files(files, routes=[web.get("/flaky/{name}", flaky_route)]) as server:
        yield server, state, len(files), len(flaky)


def test_retry_failed_fetches_only_transient_failures(tmp_path, flaky_server):
    server, state, n_ok, n_flaky = flaky_server
    urls = [server.url(f"ok/{i}.png") for i in range(n_ok)] + [server.url(f"flaky/{i}.png") for i in range(n_flaky)]
    urls.append(server.url("missing.png"))  # a 404: permanent, never retried
    n = len(urls)
    filter_work = WorkDir(str(tmp_path / "f"), STORAGE)
    filtered = filter_stage_of(filter_work, {"s0-00000": filtered_part([f"t:{i:02d}" for i in range(n)],
                                                                       [[i % 3] for i in range(n)], urls=urls)})
    stages.count_queries(filtered, 3, BalanceConfig(max_per_query=100))
    record = filtered.records[0]
    ctx = CleanContext(filter_work, WorkDir(str(tmp_path / "f" / "c"), STORAGE), BalanceConfig(max_per_query=100),
                       GatherConfig(allow_loopback=True, retries=0),
                       ImageConfig(resize_longest_side=None, encode_format="PNG"), DedupConfig(against_eval=False),
                       None)

    first = clean_shard(record, ctx)
    assert first.rows == n_ok and first.transient_failures == n_flaky
    work = ctx.work.store
    assert work.read_parquet("failed/s0-00000.parquet").num_rows == n_flaky + 1
    ok_hits = sum(server.hits[f"/ok/{i}.png"] for i in range(n_ok))

    state["up"] = True
    assert clean_shard(record, ctx) == first  # a plain rerun resumes: nothing fetched again
    retry = CleanContext(**{**ctx.__dict__, "retry_failed": True})
    retried = clean_shard(record, retry)
    assert retried.rows == n_ok + n_flaky and retried.transient_failures == 0
    assert sum(server.hits[f"/ok/{i}.png"] for i in range(n_ok)) == ok_hits  # only the failures were fetched
    assert server.hits["/missing.png"] == 1  # the permanent failure is carried over, not retried
    clean = work.read_parquet("clean/s0-00000.parquet")
    assert sorted(clean.column("sample_id").to_pylist()) == [f"t:{i:02d}" for i in range(n_ok + n_flaky)]
    left = work.read_parquet("failed/s0-00000.parquet")
    assert left.column("sample_id").to_pylist() == [f"t:{n - 1:02d}"]
    # The retry is folded into the shard's funnel: the recovered rows left gather's drops.
    gather = retried.funnel.stage("gather")
    assert (gather.rows_out, dict(gather.dropped)) == (n_ok + n_flaky, {"http_404": 1})
    assert retried.funnel.stage("images").rows_in == n_ok + n_flaky
    assert not {"gather_retry", "images_retry"} & set(retried.funnel.stages)
    assert pc.sum(clean.column("image_bytes")).as_py() > 0


# ------------------------------------------------------------------------------------------------
# Issue 16: duplicate URLs across shards, funnels that add up, builds that produce nothing
# ------------------------------------------------------------------------------------------------


def funnel_problems(funnel: dict) -> list[str]:
    """Every stage balances (in = out + drops) and hands its rows on (stage[i].out == stage[i+1].in)."""
    problems = []
    stages_ = funnel["stages"]
    for s in stages_:
        if s["in"] != s["out"] + sum(s["dropped"].values()):
            problems.append(f"{s['stage']}: in {s['in']} != out {s['out']} + drops {s['dropped']}")
    for a, b in zip(stages_, stages_[1:]):
        if a["out"] != b["in"]:
            problems.append(f"{a['stage']} out {a['out']} != {b['stage']} in {b['in']}")
    return problems


def test_a_url_in_two_input_shards_is_fetched_once_and_counted_duplicate_url(tmp_path):
    files = {f"{i}.png": png(i) for i in range(4)}
    with serve_files(files) as server:
        u = [server.url(f"{i}.png") for i in range(4)]
        work = WorkDir(str(tmp_path / "f"), STORAGE)
        filtered = filter_stage_of(work, {"s0-00000": filtered_part(["a0", "a1", "a2"], [[0]] * 3, urls=u[:3]),
                                          "s0-00001": filtered_part(["b0", "b1"], [[0]] * 2, urls=[u[1], u[3]])})
        summary = stages.count_queries(filtered, 1, BalanceConfig(max_per_query=100), use_ray=False)
        clean = stages.clean_stage(filtered, balance=BalanceConfig(max_per_query=100),
                                   gather=GatherConfig(allow_loopback=True, retries=0),
                                   images=ImageConfig(resize_longest_side=None, encode_format="PNG"),
                                   dedup=DedupConfig(against_eval=False), index=None, use_ray=False)
        assert server.hits["/1.png"] == 1, "the same URL in two shards is fetched once"
    assert summary.pairs == 4  # balancing counts the pool without the duplicate
    kept = sorted(s for r in clean.records
                  for s in clean.work.store.read_parquet(WorkDir.clean(r.shard_id)).column("sample_id").to_pylist())
    assert kept == ["a0", "a1", "a2", "b1"]  # the smallest sample_id keeps the URL
    drops = {}
    for r in clean.records:
        for s in r.funnel.stages.values():
            for reason, n in s.dropped.items():
                drops[reason] = drops.get(reason, 0) + n
    assert drops == {"duplicate_url": 1}


def test_query_match_counts_are_packed_and_round_trip_through_json_and_pickle():
    import json
    import pickle

    record = FilterRecord("s0", 5, matches=QueryMatchCounts((2, 7, 410_000), (3, 1, 2)))
    data = json.loads(json.dumps(to_json(record)))
    assert data["matches"] == {"query_ids": [2, 7, 410_000], "query_counts": [3, 1, 2]}
    assert FilterRecord.from_json(data) == record == pickle.loads(pickle.dumps(record))
    assert record.matches != QueryMatchCounts((2, 7, 410_000), (3, 1, 3))
    assert record.matches.query_ids.dtype == np.int32 and not record.matches.query_ids.flags.writeable
    with pytest.raises(ValueError, match=r"\(3,\) ids for \(1,\) counts"):
        QueryMatchCounts((1, 2, 3), (1,))


def test_url_drops_are_stored_by_shard_group_and_read_per_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "URL_ROWS_PER_PARTITION", 7)  # several URL partitions, so several shard groups
    rng = np.random.default_rng(11)
    urls = [f"https://img.example/{int(u)}.jpg" for u in rng.integers(0, 40, 120)]
    parts = {f"s{k}": filtered_part([f"id{k}-{i:03d}" for i in range(20)], [[k % 3]] * 20, urls=urls[20 * k:20 * k + 20])
             for k in range(6)}
    filtered = filter_stage_of(WorkDir(str(tmp_path / "f"), STORAGE), parts)
    summary = stages.count_queries(filtered, 3, BalanceConfig(max_per_query=1000), use_ray=False)
    drops = summary.url_drops
    assert len(drops.keys) > 1
    kept_of: dict[str, str] = {}  # each URL kept by its smallest sample_id
    for shard, t in parts.items():
        for sid, url in zip(t.column("sample_id").to_pylist(), t.column("url").to_pylist()):
            kept_of[url] = min(kept_of.get(url, sid), sid)
    for shard, t in parts.items():
        expected = sorted(sid for sid, url in zip(t.column("sample_id").to_pylist(), t.column("url").to_pylist())
                          if kept_of[url] != sid)
        assert drops.of_shard(shard).column("sample_id").to_pylist() == expected
    assert drops.total == summary.url_duplicates == 120 - len(kept_of)
    assert summary.pairs == len(kept_of)  # the duplicates' pairs are not counted
    assert "url_drops" not in to_json(summary)  # a pointer for the clean stage, not part of the manifest

    def again(*args, **kwargs):
        raise AssertionError("the clean stage redid the URL shuffles it was handed")

    monkeypatch.setattr(stages, "url_duplicates", again)
    clean = stages.clean_stage(filtered, balance=BalanceConfig(max_per_query=1000), gather=GatherConfig(retries=0),
                               images=ImageConfig(), dedup=DedupConfig(against_eval=False), index=None,
                               url_drops=drops, use_ray=False)
    dropped = sum(r.funnel.stages["dedup_url"].dropped["duplicate_url"] for r in clean.records)
    assert dropped == drops.total


@pytest.fixture()
def flaky_pairs(tmp_path, flaky_server):
    """A Parquet source of URLs (always-ok, flaky until `state["up"]`, one 404) and its query list."""
    server, state, n_ok, n_flaky = flaky_server
    urls = [server.url(f"ok/{i}.png") for i in range(n_ok)] + [server.url(f"flaky/{i}.png") for i in range(n_flaky)]
    urls += [server.url("missing.png"), server.url("ok/0.png")]  # a permanent failure, a duplicate URL
    n = len(urls)
    pq.write_table(pa.table({"id": [f"p{i:02d}" for i in range(n)], "url": urls,
                             "caption": [f"a photo of a thing number {i}" if i != 2 else "IMG_0001.JPG"
                                         for i in range(n)]}), tmp_path / "pairs.parquet")
    queries = pa.table({"query_id": pa.array([0], pa.int32()), "query": ["photo"], "source": ["unigram"],
                        "count": pa.array([1], pa.int64()), "pmi": pa.nulls(1, pa.float64()),
                        "views": pa.nulls(1, pa.int64())})
    pq.write_table(queries, tmp_path / "queries.parquet")
    source = SourceConfig(kind="parquet", path=str(tmp_path / "pairs.parquet"), id_column="id", rows_per_input_shard=4)
    return source, stages.find_query_list(str(tmp_path), STORAGE), state


def _build(tmp_path, source, queries, *, retry_failed=False):
    """The build's stages in the flow's order, in this process; the funnel of the manifest."""
    shards = stages.plan_inputs([source], str(tmp_path))
    root = str(tmp_path / "dataset")
    filtered = stages.filter_stage(shards, dataset_root=root, storage=STORAGE, sources=[source],
                                   base_dir=str(tmp_path), text_filter=TextFilterConfig(english=False),
                                   queries=queries, use_ray=False)
    balance = BalanceConfig(max_per_query=100)
    dedup = DedupConfig(against_eval=False)
    stages.count_queries(filtered, queries.rows, balance, use_ray=False)
    clean = stages.clean_stage(filtered, balance=balance, gather=GatherConfig(allow_loopback=True, retries=0),
                               images=ImageConfig(resize_longest_side=None, encode_format="PNG"), dedup=dedup,
                               index=None, retry_failed=retry_failed, use_ray=False)
    within = stages.within_dataset(clean, dedup, holdout_rows=1, use_ray=False)
    return stages.build_funnel(filtered, clean, within).to_dict()


def test_funnel_balances_after_every_kind_of_run(tmp_path, flaky_pairs, ray_local):
    source, queries, state = flaky_pairs
    first = _build(tmp_path, source, queries)
    assert funnel_problems(first) == []
    assert first["stages"][0]["in"] == 12 and first["stages"][-1]["out"] == 5
    assert _build(tmp_path, source, queries) == first  # resumed: the records, the same funnel
    state["up"] = True
    retried = _build(tmp_path, source, queries, retry_failed=True)
    assert funnel_problems(retried) == []
    assert retried["stages"][0]["in"] == 12 and retried["stages"][-1]["out"] == 5 + 4
    gather = next(s for s in retried["stages"] if s["stage"] == "gather")
    assert not any(r.startswith("http_503") for r in gather["dropped"]), "recovered rows still counted as drops"


def test_a_build_that_leaves_nothing_to_train_on_fails_clearly(tmp_path, ray_local):
    with serve_files({}) as server:  # every fetch fails (404)
        urls = [server.url(f"{i}.png") for i in range(3)]
        work = WorkDir(str(tmp_path / "f"), STORAGE)
        filtered = filter_stage_of(work, {"s0-00000": filtered_part(["a", "b", "c"], [[0]] * 3, urls=urls)})
        stages.count_queries(filtered, 1, BalanceConfig(), use_ray=False)
        failing = stages.clean_stage(filtered, balance=BalanceConfig(), gather=GatherConfig(allow_loopback=True),
                                     images=ImageConfig(), dedup=DedupConfig(against_eval=False), index=None,
                                     use_ray=False)
    within = stages.within_dataset(failing, DedupConfig(against_eval=False), holdout_rows=0, use_ray=False)
    with pytest.raises(stages.NothingToTrainOn, match=r"no rows to train on.*http_404: 3"):
        stages.write_output(failing, within, dataset_root=str(tmp_path / "d1"), shards=ShardConfig(), use_ray=False)

    images = [png(i) for i in range(4)]
    work = WorkDir(str(tmp_path / "g"), STORAGE)
    filtered = filter_stage_of(work, {"s0-00000": filtered_part(["a", "b", "c", "d"], [[0]] * 4, images=images)})
    stages.count_queries(filtered, 1, BalanceConfig(), use_ray=False)
    clean = stages.clean_stage(filtered, balance=BalanceConfig(), gather=GatherConfig(),
                               images=ImageConfig(resize_longest_side=None, encode_format="PNG"),
                               dedup=DedupConfig(against_eval=False), index=None, use_ray=False)
    within = stages.within_dataset(clean, DedupConfig(against_eval=False), holdout_rows=4, use_ray=False)
    with pytest.raises(stages.NothingToTrainOn, match=r"shards.holdout_rows=4 holds out all 4"):
        stages.write_output(clean, within, dataset_root=str(tmp_path / "d2"), shards=ShardConfig(holdout_rows=4),
                            use_ray=False)
    assert not (tmp_path / "d2" / "holdout").exists()  # refused before anything is written


def test_global_shuffles_size_their_partitions_by_the_task_memory_budget():
    # 3M URL rows at 512 B each: a 256 MB reduce holds 524,288 of them -> 6 partitions; 1 GB -> 2
    # (the 2M-row ceiling); a huge pool stops at 1,024 partitions; an empty one still has one.
    assert stages.shuffle_partitions(3_000_000, stages.URL_ROWS_PER_PARTITION, item_bytes=stages.URL_ROW_BYTES, task_memory_mb=256) == 6
    assert stages.shuffle_partitions(3_000_000, stages.URL_ROWS_PER_PARTITION, item_bytes=stages.URL_ROW_BYTES, task_memory_mb=1024) == 2
    assert stages.shuffle_partitions(10**12, stages.URL_ROWS_PER_PARTITION, item_bytes=stages.URL_ROW_BYTES, task_memory_mb=256) == 1024
    assert stages.shuffle_partitions(0, stages.URL_ROWS_PER_PARTITION, item_bytes=stages.URL_ROW_BYTES, task_memory_mb=256) == 1
    # Without a budget, only the per-partition ceiling; half a budget is refused, naming both.
    assert stages.shuffle_partitions(3_000_000, stages.URL_ROWS_PER_PARTITION) == 2
    with pytest.raises(ValueError, match=r"item_bytes \(512\) and task_memory_mb \(None\) go together"):
        stages.shuffle_partitions(3_000_000, stages.URL_ROWS_PER_PARTITION, item_bytes=stages.URL_ROW_BYTES)
