"""Readers (tasks/readers.py): every source kind on tiny files made here, shards, ids, bad input."""

from __future__ import annotations

import base64
import io
import json
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.config import ConfigError, SourceConfig, config_from_dict
from infra.openclipart import excluded_from_training, is_heldout
from infra.schema import CANDIDATE_SCHEMA
from tasks.readers import (
    READER_ERROR_KEY,
    InputShard,
    ReaderError,
    plan_input_shards,
    read_input_shard,
    read_input_shard_with_funnel,
)


def png(colour: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def read_all(sources: list[SourceConfig], base: Path) -> tuple[pa.Table, dict]:
    """Plan and read every shard; the concatenated table and the merged `read` funnel stage."""
    tables, dropped, seen = [], {}, 0
    for shard in plan_input_shards(sources, base):
        table, funnel = read_input_shard_with_funnel(shard)
        assert table.schema == CANDIDATE_SCHEMA
        tables.append(table)
        stage = funnel.stages["read"]
        seen += stage.rows_in
        for k, v in stage.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    table = pa.concat_tables(tables) if tables else CANDIDATE_SCHEMA.empty_table()
    assert seen == table.num_rows + sum(dropped.values())
    return table, dropped


def metas(table: pa.Table) -> list[dict]:
    return [json.loads(m) if m else {} for m in table.column("meta").to_pylist()]


# ------------------------------------------------------------------------------------------------
# Manifests
# ------------------------------------------------------------------------------------------------


def test_parquet_manifest_with_img2dataset_default_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"url": ["http://a.example/1.jpg", "http://b.example/2.png", None],
                             "caption": ["a red bus", None, "a cat"], "extra": [1, 2, 3]}),
                   tmp_path / "m.parquet", row_group_size=2)
    table, dropped = read_all([SourceConfig(kind="parquet", path="m.parquet")], tmp_path)
    assert table.column("sample_id").to_pylist() == ["parquet:m.parquet#0", "parquet:m.parquet#1", "parquet:m.parquet#2"]
    assert table.column("caption").to_pylist() == ["a red bus", None, "a cat"]
    assert table.column("url").to_pylist() == ["http://a.example/1.jpg", "http://b.example/2.png", None]
    assert table.column("image").null_count == 3
    assert set(table.column("source").to_pylist()) == {"parquet:m.parquet"}
    assert dropped == {}


def test_parquet_inline_bytes_and_id_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"img": [png(), png((0, 0, 255))], "text": ["red", "blue"], "uid": ["r-1", "b-2"]}),
                   tmp_path / "m.parquet")
    src = SourceConfig(kind="parquet", path="m.parquet", image_column="img", caption_column="text", id_column="uid")
    table, _ = read_all([src], tmp_path)
    assert table.column("sample_id").to_pylist() == ["parquet:m.parquet#r-1", "parquet:m.parquet#b-2"]
    assert Image.open(io.BytesIO(table.column("image")[1].as_py())).getpixel((0, 0)) == (0, 0, 255)
    assert table.column("url").null_count == 2


def test_img2dataset_parquet_output_is_recognised(tmp_path: Path) -> None:
    pq.write_table(pa.table({
        "url": ["http://x/1.jpg", "http://x/2.jpg"], "caption": ["a dog", "a tree"], "key": ["000000000", "000000001"],
        "status": ["success", "failed_to_download"], "error_message": [None, "timeout"],
        "jpg": pa.array([png(), None], pa.binary()), "width": [8, None]}), tmp_path / "00000.parquet")
    pq.write_table(pa.table({"count": [2]}), tmp_path / "_stats.parquet")  # not a manifest: skipped
    table, _ = read_all([SourceConfig(kind="parquet", path=".")], tmp_path)
    assert table.column("sample_id").to_pylist() == ["parquet:00000.parquet#000000000", "parquet:00000.parquet#000000001"]
    assert table.column("image")[0].as_py() == png() and table.column("image")[1].as_py() is None
    assert [m["status"] for m in metas(table)] == ["success", "failed_to_download"]
    assert metas(table)[1]["error_message"] == "timeout"


def test_missing_columns_raise_naming_the_column_and_file(tmp_path: Path) -> None:
    pq.write_table(pa.table({"link": ["http://x/1.jpg"], "text": ["a"]}), tmp_path / "m.parquet")
    for src, column in [(SourceConfig(kind="parquet", path="m.parquet"), "'caption'"),
                        (SourceConfig(kind="parquet", path="m.parquet", caption_column="text"), "'url'"),
                        (SourceConfig(kind="parquet", path="m.parquet", caption_column="text", url_column="link",
                                      image_column="bytes"), "'image_column'|'bytes'"),
                        (SourceConfig(kind="parquet", path="m.parquet", caption_column="text", url_column="link",
                                      id_column="key"), "'key'")]:
        shard = plan_input_shards([src], tmp_path)[0]
        with pytest.raises(ReaderError, match=f"m.parquet.*({column})"):
            read_input_shard(shard)


def test_caption_policy_fields_are_read_into_meta(tmp_path: Path) -> None:
    """The columns a source's caption policy names come along in meta (parquet keeps lists as lists,
    CSV gives text), so tasks/captions.py can compose from them; a named column that is missing raises."""
    from infra.config import CaptionConfig

    policy = CaptionConfig(fields=("caption", "alt"), append=("tags",))
    pq.write_table(pa.table({"url": ["http://a/1.png", "http://a/2.png"], "caption": ["logo", "A red car"],
                             "alt": ["a lighthouse at dusk", None], "tags": [["sea", "light"], []]}), tmp_path / "m.parquet")
    table, _ = read_all([SourceConfig(kind="parquet", path=str(tmp_path / "m.parquet"), caption=policy)], tmp_path)
    assert [(m["alt"], m["tags"]) for m in metas(table)] == [("a lighthouse at dusk", ["sea", "light"]), (None, [])]
    (tmp_path / "m.csv").write_text("url,caption,alt,tags\nhttp://a/1.png,logo,a lighthouse,\"sea, light\"\n")
    table, _ = read_all([SourceConfig(kind="csv", path=str(tmp_path / "m.csv"), caption=policy)], tmp_path)
    assert [(m["alt"], m["tags"]) for m in metas(table)] == [("a lighthouse", "sea, light")]
    with pytest.raises(ReaderError, match="'alt_text'.*caption.fields"):
        read_all([SourceConfig(kind="parquet", path=str(tmp_path / "m.parquet"),
                               caption=CaptionConfig(fields=("alt_text",)))], tmp_path)


def test_csv_with_local_paths_quoted_newlines_and_text_ids(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    (tmp_path / "m.csv").write_text('id,path,caption\n007,imgs/a.png,"two\nlines, and a comma"\n'
                                    '008,imgs/missing.png,a ghost\n009,,no path\n')
    src = SourceConfig(kind="csv", path="m.csv", path_column="path", id_column="id")
    table, _ = read_all([src], tmp_path)
    assert table.column("sample_id").to_pylist() == ["csv:m.csv#007", "csv:m.csv#008", "csv:m.csv#009"]
    assert table.column("caption").to_pylist() == ["two\nlines, and a comma", "a ghost", "no path"]
    assert table.column("image")[0].as_py() == png()
    assert table.column("image")[1].as_py() is None and table.column("image")[2].as_py() is None
    m = metas(table)
    assert m[1][READER_ERROR_KEY].startswith("unreadable_path:") and "missing.png" in m[1][READER_ERROR_KEY]
    assert READER_ERROR_KEY not in m[0] and READER_ERROR_KEY not in m[2]


def test_tsv_and_base64_inline_images(tmp_path: Path) -> None:
    b64 = base64.b64encode(png()).decode()
    (tmp_path / "m.tsv").write_text(f"caption\timage\nred square\t{b64}\nbroken\tnot*base64\n")
    table, _ = read_all([SourceConfig(kind="tsv", path="m.tsv", image_column="image")], tmp_path)
    assert table.column("image")[0].as_py() == png()
    assert table.column("image")[1].as_py() is None
    assert metas(table)[1][READER_ERROR_KEY].startswith("bad_inline_image")


@pytest.mark.parametrize("block_bytes", [1 << 22, 90])  # one parse block, or many small ones
def test_csv_malformed_rows_are_counted_once_across_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           block_bytes: int) -> None:
    monkeypatch.setattr("tasks.readers.CSV_BLOCK_BYTES", block_bytes)
    lines = ["url,caption"]
    for i in range(50):
        lines.append(f"http://x/{i}.jpg,caption {i}")
        if i % 10 == 3:
            lines.append("http://x/bad.jpg,too,many,fields")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    src = SourceConfig(kind="csv", path="m.csv", rows_per_input_shard=7)
    shards = plan_input_shards([src], tmp_path)
    assert len(shards) == 8 and shards[-1].stop is None
    assert [s.malformed_rows for s in shards] == [5, 0, 0, 0, 0, 0, 0, 0]  # counted once, on the first shard
    table, dropped = read_all([src], tmp_path)
    assert table.column("caption").to_pylist() == [f"caption {i}" for i in range(50)]
    assert dropped == {"bad_csv_row": 5}


def test_jsonl_bad_lines_missing_fields_and_byte_offset_shards(tmp_path: Path) -> None:
    lines = []
    for i in range(11):
        lines.append(json.dumps({"url": f"http://x/{i}.jpg", "caption": f"photo {i} — café"}, ensure_ascii=False))
    lines[4] = "{not json"
    lines[6] = "[1, 2]"
    lines[8] = json.dumps({"url": "http://x/8.jpg"})  # no caption: kept with a null caption
    lines.insert(2, "")  # blank lines are not rows but keep line numbers honest
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = SourceConfig(kind="jsonl", path="m.jsonl", rows_per_input_shard=3)
    shards = plan_input_shards([src], tmp_path)
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    table, dropped = read_all([src], tmp_path)
    assert dropped == {"bad_json_line": 2}
    ids = table.column("sample_id").to_pylist()
    assert ids == [f"jsonl:m.jsonl#{n}" for n in (0, 1, 3, 4, 6, 8, 9, 10, 11)]
    captions = dict(zip(ids, table.column("caption").to_pylist()))
    assert captions["jsonl:m.jsonl#3"] == "photo 2 — café" and captions["jsonl:m.jsonl#9"] is None


def test_jsonl_missing_caption_key_everywhere_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"url": "http://x/1.jpg", "text": "a"}\n')
    with pytest.raises(ReaderError, match="m.jsonl.*'caption'"):
        read_input_shard(plan_input_shards([SourceConfig(kind="jsonl", path="m.jsonl")], tmp_path)[0])


def test_unreadable_files_raise_naming_them(tmp_path: Path) -> None:
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(ReaderError, match="junk.parquet"):
        plan_input_shards([SourceConfig(kind="parquet", path="junk.parquet")], tmp_path)
    with pytest.raises(ReaderError, match="nothing.csv.*does not exist"):
        plan_input_shards([SourceConfig(kind="csv", path="nothing.csv")], tmp_path)
    with pytest.raises(ReaderError, match="matches no file"):
        plan_input_shards([SourceConfig(kind="jsonl", path="parts/*.jsonl")], tmp_path)
    with pytest.raises(ReaderError, match="not a folder"):
        plan_input_shards([SourceConfig(kind="directory", path="nope")], tmp_path)


def test_folder_and_glob_sources_list_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    for name in ("b", "a", "c"):
        pq.write_table(pa.table({"url": [f"http://x/{name}"], "caption": [name]}), tmp_path / "parts" / f"{name}.parquet")
    by_folder, _ = read_all([SourceConfig(kind="parquet", path="parts")], tmp_path)
    by_glob, _ = read_all([SourceConfig(kind="parquet", path="parts/*.parquet")], tmp_path)
    assert by_folder.column("caption").to_pylist() == ["a", "b", "c"]
    assert by_folder.column("sample_id").to_pylist() == by_glob.column("sample_id").to_pylist() == [
        "parquet:parts/a.parquet#0", "parquet:parts/b.parquet#0", "parquet:parts/c.parquet#0"]


# ------------------------------------------------------------------------------------------------
# WebDataset and directories
# ------------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _add(tar, name, data)
    return path


def test_webdataset_pairs_members_by_key(tmp_path: Path) -> None:
    (tmp_path / "wds").mkdir()
    make_tar(tmp_path / "wds" / "00000.tar", [
        ("d/000.png", png()), ("d/000.txt", "a red square".encode()),
        ("d/001.jpg", png((0, 255, 0))), ("d/001.json", json.dumps({"caption": "green", "url": "http://x/1", "width": 8}).encode()),
        ("d/002.png", png()),  # no caption: kept, null caption
        ("d/003.txt", b"caption without image"),
        ("d/004.png", png()), ("d/004.txt", b"\xff\xfe bad utf-8"),
    ])
    with tarfile.open(tmp_path / "wds" / "00001.tar.gz", "w:gz") as tar:  # compressed shards too
        _add(tar, "005.webp", png())
        _add(tar, "005.txt", b"second tar")
    src = SourceConfig(kind="webdataset", path="wds", rows_per_input_shard=1)
    shards = plan_input_shards([src], tmp_path)
    assert [s.shard_id for s in shards] == ["s0-00000", "s0-00001"]  # one shard per tar
    table, dropped = read_all([src], tmp_path)
    assert table.column("sample_id").to_pylist() == [
        "webdataset:wds/00000.tar#d/000", "webdataset:wds/00000.tar#d/001", "webdataset:wds/00000.tar#d/002",
        "webdataset:wds/00000.tar#d/003", "webdataset:wds/00001.tar.gz#005"]
    captions = table.column("caption").to_pylist()
    assert captions == ["a red square", "green", None, "caption without image", "second tar"]
    assert table.column("url").to_pylist()[1] == "http://x/1"
    m = metas(table)
    assert m[1]["width"] == 8 and m[3][READER_ERROR_KEY].startswith("no_image_member")
    assert table.column("image")[3].as_py() is None
    assert dropped == {"bad_utf8": 1}  # undecodable caption bytes cost that sample, not the tar


def test_truncated_tar_keeps_what_was_read_and_counts_it(tmp_path: Path) -> None:
    members = []
    for i in range(4):
        members += [(f"{i:03d}.png", png(size=(64, 64))), (f"{i:03d}.txt", f"caption {i}".encode())]
    data = make_tar(tmp_path / "full.tar", members).read_bytes()
    assert len(png(size=(64, 64))) < 512  # each member: one 512-byte header + one 512-byte block
    (tmp_path / "cut.tar").write_bytes(data[: 2 * 2048 + 512 + 50])  # cut inside 002.png's data
    table, dropped = read_all([SourceConfig(kind="webdataset", path="cut.tar")], tmp_path)
    assert table.column("caption").to_pylist() == ["caption 0", "caption 1", None]
    assert table.column("image")[1].as_py() == png(size=(64, 64)) and table.column("image")[2].as_py() is None
    assert metas(table)[2][READER_ERROR_KEY].startswith("broken_member: 002.png")
    assert dropped == {"broken_tar": 1}
    (tmp_path / "junk.tar").write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(ReaderError, match="junk.tar.*not a readable tar"):
        read_input_shard(plan_input_shards([SourceConfig(kind="webdataset", path="junk.tar")], tmp_path)[0])


def test_directory_with_sidecar_captions(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "cat.png").write_bytes(png())
    (root / "cat.txt").write_text("a cat on a mat")
    (root / "sub" / "dog.jpg").write_bytes(png((0, 0, 255)))
    (root / "sub" / "dog.json").write_text(json.dumps({"caption": "a dog", "author": "me"}))
    (root / "sub" / "lonely.png").write_bytes(png())  # missing sidecar: kept, null caption
    (root / "sub" / "v1.2.png").write_bytes(png())  # dotted name: the sidecar is v1.2.txt, not v1.txt
    (root / "sub" / "v1.2.txt").write_text("version one point two")
    (root / "sub" / "v1.txt").write_text("wrong sidecar")
    (root / "notes.txt").write_text("not a sidecar of anything")
    (root / ".hidden.png").write_bytes(png())
    src = SourceConfig(kind="directory", path="photos", rows_per_input_shard=2)
    assert [len(s.members) for s in plan_input_shards([src], tmp_path)] == [2, 2]
    table, _ = read_all([src], tmp_path)
    assert table.column("sample_id").to_pylist() == ["directory:photos/cat.png", "directory:photos/sub/dog.jpg",
                                                     "directory:photos/sub/lonely.png", "directory:photos/sub/v1.2.png"]
    assert table.column("caption").to_pylist() == ["a cat on a mat", "a dog", None, "version one point two"]
    m = metas(table)
    assert m[1]["author"] == "me" and m[2]["missing_sidecar"] is True
    assert table.column("image").null_count == 0


def test_directory_image_deleted_after_planning_keeps_a_null_row(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(png())
    (tmp_path / "d" / "a.txt").write_text("gone soon")
    shard = plan_input_shards([SourceConfig(kind="directory", path="d")], tmp_path)[0]
    (tmp_path / "d" / "a.png").unlink()
    table = read_input_shard(shard)
    assert table.num_rows == 1 and table.column("image")[0].as_py() is None
    assert metas(table)[0][READER_ERROR_KEY].startswith("unreadable_path")


# ------------------------------------------------------------------------------------------------
# Openclipart, shards and determinism
# ------------------------------------------------------------------------------------------------


def test_openclipart_excludes_heldout_and_uses_titles(sample_parquet: Path) -> None:
    src = SourceConfig(kind="openclipart", path=str(sample_parquet), rows_per_input_shard=700)
    table, dropped = read_all([src], sample_parquet.parent)
    ids = pq.read_table(sample_parquet, columns=["id", "title", "keywords"])
    rows = ids.to_pylist()
    heldout = sum(excluded_from_training(r["id"], r["title"], r["keywords"]) for r in rows)
    assert heldout > sum(is_heldout(r["id"]) for r in rows)  # the concept set's images too
    assert dropped == {"heldout": heldout} and table.num_rows == ids.num_rows - heldout
    titles = dict(zip(ids.column("id").to_pylist(), ids.column("title").to_pylist()))
    for sid, caption, meta in zip(table.column("sample_id").to_pylist(), table.column("caption").to_pylist(),
                                  metas(table)):
        assert sid == f"openclipart:{meta['id']}" and caption == titles[meta["id"]] and not is_heldout(meta["id"])
        assert {"category", "keywords", "description", "title"} <= meta.keys()
    assert table.column("image").null_count == 0


def test_openclipart_wrong_file_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["svg/a/b.svg"], "title": ["t"]}), tmp_path / "oc.parquet")
    with pytest.raises(ReaderError, match="oc.parquet.*category"):
        read_input_shard(plan_input_shards([SourceConfig(kind="openclipart", path="oc.parquet")], tmp_path)[0])


def test_shard_ids_and_sample_ids_are_stable(tmp_path: Path, sample_parquet: Path) -> None:
    pq.write_table(pa.table({"url": [f"http://x/{i}" for i in range(10)], "caption": [str(i) for i in range(10)]}),
                   tmp_path / "m.parquet", row_group_size=3)
    sources = [SourceConfig(kind="parquet", path="m.parquet", rows_per_input_shard=4),
               SourceConfig(kind="openclipart", path=str(sample_parquet), rows_per_input_shard=1000)]
    first = plan_input_shards(sources, tmp_path)
    assert first == plan_input_shards(sources, tmp_path)
    assert [s.shard_id for s in first] == ["s0-00000", "s0-00001", "s0-00002", "s1-00000", "s1-00001", "s1-00002"]
    assert [(s.start, s.stop) for s in first[:3]] == [(0, 4), (4, 8), (8, None)]
    assert pickle.loads(pickle.dumps(first[0])) == first[0]  # travels to Ray workers
    a = read_input_shard(first[1]).column("sample_id").to_pylist()
    assert a == read_input_shard(first[1]).column("sample_id").to_pylist() == [f"parquet:m.parquet#{i}" for i in range(4, 8)]
    # Sample ids do not depend on how the input is cut into shards.
    resharded = [SourceConfig(kind="parquet", path="m.parquet", rows_per_input_shard=3)]
    assert read_all(resharded, tmp_path)[0].column("sample_id").to_pylist() == [f"parquet:m.parquet#{i}" for i in range(10)]


def test_source_config_rejects_bad_shard_size() -> None:
    with pytest.raises(ConfigError, match="rows_per_input_shard"):
        config_from_dict({"sources": [{"kind": "csv", "path": "m.csv", "rows_per_input_shard": 0}]})
    with pytest.raises(ConfigError, match="sources.0.kind"):
        config_from_dict({"sources": [{"kind": "xml", "path": "m.xml"}]})
    assert isinstance(plan_input_shards([], "."), list)
    assert InputShard.__dataclass_params__.frozen


# ------------------------------------------------------------------------------------------------
# Bad input costs one row, never a file (issue 16, defects 5-8)
# ------------------------------------------------------------------------------------------------


def read_and_filter(sources: list[SourceConfig], base: Path) -> tuple[pa.Table, dict[str, dict]]:
    """Read every shard and run the text filters on it, as the build's filter job does; the kept
    rows and the merged funnel (stage -> its dict)."""
    from infra.config import TextFilterConfig
    from infra.funnel import Funnel
    from tasks.step import run_steps
    from tasks.text_filter import TextFilter

    text_filter = TextFilter(TextFilterConfig(english=False, min_chars=1))
    tables, funnel = [], Funnel()
    for shard in plan_input_shards(sources, base):
        table, read_funnel = read_input_shard_with_funnel(shard)
        out = run_steps(table, [text_filter], read_funnel)
        tables.append(out.table)
        funnel.merge(out.funnel)
    stages = {s["stage"]: s for s in funnel.to_dict()["stages"]}
    for s in stages.values():
        assert s["in"] == s["out"] + sum(s["dropped"].values()), s
    return pa.concat_tables(tables), stages


@pytest.mark.parametrize("shard_rows", [100, 2])
def test_csv_caption_with_invalid_utf8_costs_that_row_as_bad_utf8(tmp_path: Path, shard_rows: int) -> None:
    (tmp_path / "m.csv").write_bytes(b"url,caption\nhttp://x/1.jpg,a red bus\nhttp://x/2.jpg,bad \xff\xfe bytes\n"
                                     b"http://x/3.jpg,a blue car\n")
    table, stages = read_and_filter([SourceConfig(kind="csv", path="m.csv", rows_per_input_shard=shard_rows)],
                                    tmp_path)
    assert table.column("caption").to_pylist() == ["a red bus", "a blue car"]
    dropped = {**stages["read"]["dropped"], **stages["text_filter"]["dropped"]}
    assert stages["read"]["in"] == 3 and dropped == {"bad_utf8": 1}


def test_csv_huge_caption_costs_that_row_as_too_long(tmp_path: Path) -> None:
    huge = "word " * 2_000_000  # 10 MB: more than one CSV parse block
    (tmp_path / "m.csv").write_text(f'url,caption\nhttp://x/1.jpg,a red bus\nhttp://x/2.jpg,"{huge}"\n'
                                    "http://x/3.jpg,a blue car\n")
    src = SourceConfig(kind="csv", path="m.csv", rows_per_input_shard=2)
    table, stages = read_and_filter([src], tmp_path)
    assert table.column("caption").to_pylist() == ["a red bus", "a blue car"]
    assert stages["read"]["in"] == 3 and stages["read"]["dropped"] == {}
    assert stages["text_filter"]["dropped"] == {"too_long": 1}


def test_csv_unclosed_quote_accounts_for_every_line(tmp_path: Path) -> None:
    # Line 3's quote is never closed as meant: the parser merges it with the lines up to the next quote.
    lines = ["http://x/1.jpg,ok one", "http://x/2.jpg,ok two", 'http://x/3.jpg,"unclosed caption',
             "http://x/4.jpg,valid four", 'http://x/5.jpg,"ok five"', "http://x/6.jpg,ok six"]
    (tmp_path / "m.csv").write_text("url,caption\n" + "\n".join(lines) + "\n")
    table, stages = read_and_filter([SourceConfig(kind="csv", path="m.csv", rows_per_input_shard=2)], tmp_path)
    read = stages["read"]
    assert read["in"] == len(lines), "every input line is a row in, kept or dropped"
    assert table.column("caption").to_pylist() == ["ok one", "ok two", "ok six"]
    assert read["dropped"] == {"bad_csv_row": 3}


def test_parquet_binary_caption_with_invalid_utf8_is_bad_utf8(tmp_path: Path) -> None:
    pq.write_table(pa.table({"url": ["http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg"],
                             "caption": pa.array([b"a red bus", b"bad \xff\xfe bytes", b"caf\xc3\xa9 au lait"],
                                                 pa.binary())}), tmp_path / "m.parquet")
    table, stages = read_and_filter([SourceConfig(kind="parquet", path="m.parquet")], tmp_path)
    assert table.column("caption").to_pylist() == ["a red bus", "café au lait"]
    dropped = {**stages["read"]["dropped"], **stages["text_filter"]["dropped"]}
    assert dropped == {"bad_utf8": 1}


def test_webdataset_and_directory_captions_with_invalid_utf8_are_bad_utf8(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, caption in (("a", b"a red bus"), ("b", b"bad \xff bytes")):
            for ext, data in (("png", png()), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "w.tar").write_bytes(buf.getvalue())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(png())
    (tmp_path / "d" / "x.txt").write_bytes(b"bad \xff bytes")
    (tmp_path / "d" / "y.png").write_bytes(png())
    (tmp_path / "d" / "y.txt").write_bytes(b"a blue car")
    table, stages = read_and_filter([SourceConfig(kind="webdataset", path="w.tar"),
                                     SourceConfig(kind="directory", path="d")], tmp_path)
    assert table.column("caption").to_pylist() == ["a red bus", "a blue car"]
    dropped = {**stages["read"]["dropped"], **stages["text_filter"]["dropped"]}
    assert dropped == {"bad_utf8": 2}
