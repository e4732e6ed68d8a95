"""infra.manifest: the typed manifest, the JSON a build writes, the one reader and its refusals."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from infra.manifest import (MANIFEST_NAME, Holdout, ManifestError, ShardEntry, build_manifest, manifest_location,
                            read_manifest, write_manifest)
from infra.schema import SCHEMA_VERSION, SHARD_SCHEMA
from infra.storage import ObjectStore
from tasks.shards import write_shard

QUERIES = {"uri": "/run/queries/queries.parquet", "sha256": "ab" * 32, "rows": 22}
EVAL_INDEX = {"root": "/run/eval_index", "version": "v1", "sets": {"colours": 3}, "built": True}
COUNTS = {"matched_queries": 3, "pairs": 12, "over_cap": 0}
SOURCES = [{"kind": "emoji", "path": "tw.parquet", "files": [{"file": "tw.parquet", "bytes": 9, "licence": "CC-BY-4.0"}]}]
HOLDOUT_CHECK = {"emoji-heldout": {"training_ids": 6, "in_shards": 0, "in_holdout": 0}}


def rows(n: int, start: int = 0) -> pa.Table:
    return pa.table({"sample_id": [f"s{i:04d}" for i in range(start, start + n)], "source": ["test"] * n,
                     "caption": [f"thing {i}" for i in range(start, start + n)],
                     "image": [bytes([i % 256]) * 10 for i in range(start, start + n)], "image_bytes": [10] * n})


@pytest.fixture()
def built(tmp_path):
    """A store with two shards and a held-out shard written by tasks.shards, and their manifest."""
    store = ObjectStore(str(tmp_path))
    shards = [write_shard(store, i, rows(4, start=4 * i), plan_id=f"plan{i}") for i in range(2)]
    held = [write_shard(store, 0, rows(2, start=8), prefix="holdout", plan_id="held")]
    manifest = build_manifest(config={"name": "t"}, shards=shards, funnel={"stages": []}, queries=QUERIES,
                              eval_index=EVAL_INDEX, holdout=held, work="/run/dataset/work/f-1/c-2",
                              query_counts=COUNTS, sources=SOURCES, eval_holdout=HOLDOUT_CHECK)
    return store, shards, held, manifest


def test_the_json_a_build_writes(built):
    store, shards, held, manifest = built
    uri = write_manifest(store, manifest)
    assert uri == store.uri(MANIFEST_NAME)
    on_disk = json.loads(store.read_text(MANIFEST_NAME))
    assert list(on_disk) == ["schema_version", "shard_schema", "num_rows", "num_shards", "queries", "eval_index",
                             "funnel", "shards", "holdout", "config", "work", "query_counts", "sources",
                             "eval_holdout"]
    assert on_disk["schema_version"] == SCHEMA_VERSION and on_disk["num_rows"] == 8 and on_disk["num_shards"] == 2
    assert on_disk["shard_schema"] == SHARD_SCHEMA.to_string(show_schema_metadata=False).splitlines()
    assert on_disk["shards"] == shards  # each shard's stats exactly as write_shard recorded them
    assert on_disk["holdout"] == {"shards": held, "rows": 2}
    assert all(s["path"].startswith("shards/") for s in on_disk["shards"])  # training reads only these
    assert (on_disk["queries"], on_disk["eval_index"], on_disk["query_counts"]) == (QUERIES, EVAL_INDEX, COUNTS)
    assert on_disk["work"] == "/run/dataset/work/f-1/c-2" and on_disk["config"] == {"name": "t"}
    assert on_disk["sources"] == SOURCES and on_disk["eval_holdout"] == HOLDOUT_CHECK


def test_read_back_is_the_same_manifest_and_the_same_json(built):
    store, _, _, manifest = built
    write_manifest(store, manifest)
    text = store.read_text(MANIFEST_NAME)
    for source in (store, store.root, store.uri(MANIFEST_NAME), f"file://{store.root}/"):
        got = read_manifest(source)
        assert got == manifest
        assert json.dumps(got.to_dict(), indent=2, ensure_ascii=False) + "\n" == text
    assert isinstance(got.shards[0], ShardEntry) and got.shards[1].plan == "plan1"
    assert got.holdout == Holdout(shards=(got.holdout.shards[0],), rows=2)
    assert got.holdout.shards[0].path == "holdout/part-00000.parquet"


def test_no_holdout_and_no_extras_are_null():
    manifest = build_manifest(config={}, shards=[], funnel={}, queries=None, eval_index=None, holdout=[])
    data = manifest.to_dict()
    assert data["holdout"] is None and data["work"] is None and data["query_counts"] is None
    assert data["sources"] == [] and data["eval_holdout"] == {}
    assert data["num_rows"] == 0 and data["shards"] == []


def test_build_keeps_the_records_it_was_given():
    # Prefect links a task's result to the values inside it by identity: the build's queries and
    # eval-index records must be the very objects the manifest holds.
    manifest = build_manifest(config={}, shards=[], funnel={}, queries=QUERIES, eval_index=EVAL_INDEX)
    assert manifest.queries is QUERIES and manifest.to_dict()["eval_index"] is EVAL_INDEX


def test_location_of_a_manifest_or_its_dataset():
    assert manifest_location("s3://b/run/dataset") == ("s3://b/run/dataset", "manifest.json")
    assert manifest_location("s3://b/run/dataset/") == ("s3://b/run/dataset", "manifest.json")
    assert manifest_location("/data/other.json") == ("/data", "other.json")
    assert manifest_location("manifest.json") == (".", "manifest.json")


def test_refusals_name_the_manifest(built, tmp_path):
    store, _, _, manifest = built
    uri = store.uri(MANIFEST_NAME)
    with pytest.raises(FileNotFoundError, match=f"no dataset manifest at {uri}"):
        read_manifest(store)
    good = manifest.to_dict()
    cases = [
        ({**good, "schema_version": SCHEMA_VERSION + 1}, f"{uri}: schema version {SCHEMA_VERSION + 1}, this witflow"),
        ({k: v for k, v in good.items() if k != "funnel"}, f"{uri}: missing key\\(s\\) funnel"),
        ({**good, "shardz": []}, f"{uri}: unknown key\\(s\\) shardz"),
        ({**good, "num_rows": 9}, f"{uri}: num_rows=9, num_shards=2, but its shards list 2 shards of 8 rows"),
        ({**good, "shards": [{**good["shards"][0], "rows": "4"}, good["shards"][1]]},
         f"{uri}: shards\\[0\\]: rows: expected int, got str"),
        ({**good, "holdout": {"shards": [{"path": "holdout/part-00000.parquet"}], "rows": 2}},
         f"{uri}: holdout.shards\\[0\\]: missing key\\(s\\) rows, bytes, sha256, image_bytes, plan"),
        ([good], f"{uri}: schema version None"),
    ]
    for data, message in cases:
        store.write_json(MANIFEST_NAME, data)
        with pytest.raises(ManifestError, match=message) as caught:
            read_manifest(store)
        assert "\n" not in str(caught.value)
    store.write_text(MANIFEST_NAME, "{not json")
    with pytest.raises(ValueError, match=f"{uri}: not valid JSON"):
        read_manifest(store)


def test_a_manifest_on_s3_reads_the_same(built, s3_store):
    """The same manifest written to and read from a real S3 server (SeaweedFS on loopback)."""
    _, _, _, manifest = built
    uri = write_manifest(s3_store, manifest)
    assert uri == s3_store.uri(MANIFEST_NAME)
    assert read_manifest(uri, s3_store.config) == manifest == read_manifest(s3_store)
