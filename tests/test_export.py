"""``witflow export`` (tasks/export.py): WebDataset tars read back the way OpenCLIP's data pipeline
reads them (the ``webdataset`` version OpenCLIP pins), image files + TSV read the way its csv loader
does (pandas), resumption, and the same bytes on the SeaweedFS S3 server as on disk.

OpenCLIP's own ``open_clip_train.data`` cannot be imported here: it imports torchvision, and the only
torchvision wheel for our torch (0.28.0) is a CUDA build whose ``_C.so`` needs libtorch_cuda. So the
test builds its pipeline from the same webdataset stages, in the same order (``get_wds_dataset``):
SimpleShardList over the brace pattern, tarfile_to_samples, select(has caption and image),
decode("pilrgb"), rename(image="jpg;png;jpeg;webp", text="txt"); and sizes the dataset as its
``get_dataset_size`` does, from sizes.json.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pytest
from PIL import Image

from infra.manifest import read_manifest
from infra.storage import ObjectStore
from tasks.export import ExportError, export_dataset, sample_key
from tasks.shards import write_shard
from tests.trainer_fixtures import write_dataset

ROWS, PER_SHARD = 45, 20


def _gif(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), (seed * 40 % 256, 90, 200)).save(buf, format="GIF")
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path, sample_parquet):
    """45 pairs in 3 shards: the sample's PNGs with ids that have dots and slashes, captions with a
    tab, a newline, quotes and non-ASCII text, an empty caption, a caption pandas reads as missing
    ("NA"), and two GIFs (a format OpenCLIP's pipeline skips)."""
    import pyarrow.parquet as pq

    table = pq.read_table(sample_parquet, columns=["id", "title", "image"]).slice(0, ROWS)
    captions = [title or f"untitled {i}" for i, title in enumerate(table.column("title").to_pylist())]
    captions[1] = 'a "quoted"\ttab'
    captions[2] = "two\nlines, café"
    captions[0], captions[3] = "", "NA"
    images = table.column("image").to_pylist()
    formats = ["PNG"] * ROWS
    for i in (5, 30):
        images[i], formats[i] = _gif(i), "GIF"
    pairs = pa.table({"sample_id": [f"openclipart:{i}#v1.2" for i in table.column("id").to_pylist()],
                      "source": ["openclipart:sample"] * ROWS, "caption": captions, "image": images,
                      "image_format": formats, "url": [None] * ROWS,
                      "meta": [json.dumps({"row": i}) for i in range(ROWS)]})
    return write_dataset(tmp_path / "dataset", pairs, PER_SHARD), pairs


def _openclip_samples(pattern: str, decode: bool):
    """Samples through OpenCLIP's webdataset stages (see the module docstring)."""
    import webdataset as wds

    def has_caption_and_image(sample: dict) -> bool:
        return "txt" in sample and any(ext in sample for ext in ("png", "jpg", "jpeg", "webp"))

    stages = [wds.SimpleShardList(pattern), wds.split_by_worker, wds.tarfile_to_samples(),
              wds.select(has_caption_and_image)]
    if decode:
        stages.append(wds.decode("pilrgb"))
    stages += [wds.rename(image="jpg;png;jpeg;webp", text="txt"), wds.to_tuple("__key__", "image", "text", "json")]
    return list(wds.DataPipeline(*stages))


def _openclip_dataset_size(pattern: str) -> int:
    """OpenCLIP's get_dataset_size: the shards' counts from sizes.json beside them."""
    import webdataset as wds

    shards = wds.shardlists.expand_urls(pattern)
    sizes = json.load(open(os.path.join(os.path.dirname(shards[0]), "sizes.json")))
    return sum(int(sizes[os.path.basename(s)]) for s in shards)


def test_webdataset_export_reads_back_through_openclips_pipeline(dataset, tmp_path):
    manifest, pairs = dataset
    record = export_dataset(str(manifest), str(tmp_path / "wds"), format="webdataset", use_ray=False)
    assert record["train_data"] == f"{tmp_path / 'wds'}/{{00000..00002}}.tar"
    assert sorted(os.listdir(tmp_path / "wds")) == sorted(
        [f"{i:05d}{s}" for i in range(3) for s in (".tar", "_stats.json")] + ["sizes.json", "export.json"])
    assert record["left_out"] == {"empty_caption": 1}
    assert _openclip_dataset_size(record["train_data"]) == ROWS - 1 == record["num_samples"]

    samples = _openclip_samples(record["train_data"], decode=False)
    assert len(samples) == ROWS - 1  # every sample survives the key split and the caption/image filter
    by_id = {json.loads(meta)["sample_id"]: (key, image, text) for key, image, text, meta in samples}
    assert len({key for key, *_ in samples}) == ROWS - 1
    for i, row in enumerate(pairs.to_pylist()):
        if not row["caption"]:
            assert row["sample_id"] not in by_id
            continue
        key, image, text = by_id[row["sample_id"]]
        assert key.startswith(f"{i // PER_SHARD:05d}_") and "." not in key and "/" not in key
        assert text.decode("utf-8") == row["caption"]
        if row["image_format"] == "PNG":
            assert image == row["image"]  # the shard's bytes, unchanged
        else:  # GIF: re-encoded as PNG, same pixels
            assert image.startswith(b"\x89PNG")
            assert list(Image.open(io.BytesIO(image)).convert("RGB").getdata()) == list(
                Image.open(io.BytesIO(row["image"])).convert("RGB").getdata())
    assert record["reencoded"] == 2

    decoded = _openclip_samples(record["train_data"], decode=True)
    assert len(decoded) == ROWS - 1 and all(isinstance(img, Image.Image) and img.mode == "RGB" for _, img, _, _ in decoded)


def test_member_names_split_into_the_sample_key(dataset, tmp_path):
    """webdataset's key split (base_plus_ext: up to the first dot of the base name) gives our key."""
    from webdataset.tariterators import base_plus_ext

    record = export_dataset(str(dataset[0]), str(tmp_path / "wds"), use_ray=False)
    with tarfile.open(tmp_path / "wds" / "00001.tar") as tar:  # rows 20-39: all with captions
        names = tar.getnames()
    assert len(names) == 3 * PER_SHARD
    assert {base_plus_ext(n)[0] for n in names} == {sample_key(1, r) for r in range(PER_SHARD)}
    assert {base_plus_ext(n)[1] for n in names} == {"png", "txt", "json"}
    assert record["shards"][1]["rows"] == PER_SHARD


def test_csv_export_reads_back_as_openclips_csv_loader(dataset, tmp_path):
    import pandas as pd

    manifest, pairs = dataset
    record = export_dataset(str(manifest), str(tmp_path / "csv"), format="csv", use_ray=False)
    frame = pd.read_csv(record["train_data"], sep="\t")  # OpenCLIP's CsvDataset, its default keys
    assert record["left_out"] == {"empty_caption": 1, "csv_na_caption": 1}
    assert list(frame.columns) == ["filepath", "title"] and len(frame) == ROWS - 2
    kept = [r for r in pairs.to_pylist() if r["caption"] not in ("", "NA")]
    for path, title, row in zip(frame["filepath"], frame["title"], kept):
        assert str(title) == row["caption"]
        assert os.path.isabs(path)
        with Image.open(str(path)) as im:  # as OpenCLIP opens it
            im.load()
        if row["image_format"] == "PNG":
            assert open(path, "rb").read() == row["image"]


def test_a_rerun_redoes_only_missing_or_changed_shards(dataset, tmp_path):
    manifest, pairs = dataset
    out = tmp_path / "wds"
    first = export_dataset(str(manifest), str(out), use_ray=False)
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in ("00000.tar", "00001.tar", "00002.tar")}
    os.remove(out / "00001.tar")
    # Rebuild shard 2 with other rows: its sha256 in the manifest changes.
    store = ObjectStore(str(manifest.parent))
    changed = pairs.slice(40).set_column(2, "caption", pa.array(["changed"] * 5))
    entries = [s.to_dict() for s in read_manifest(str(manifest)).shards]
    entries[2] = write_shard(store, 2, changed, plan_id="changed")
    from infra.manifest import build_manifest, write_manifest

    write_manifest(store, build_manifest(config={}, shards=entries, funnel={}, queries=None, eval_index=None))
    again = export_dataset(str(manifest), str(out), use_ray=False)
    assert os.stat(out / "00000.tar").st_mtime_ns == mtimes["00000.tar"]  # kept
    assert again["shards"][1]["sha256"] == first["shards"][1]["sha256"]  # redone, byte-identical
    assert again["shards"][2]["sha256"] != first["shards"][2]["sha256"]  # redone from the new rows
    texts = {t.decode() for _, _, t, _ in _openclip_samples(again["train_data"], decode=False)}
    assert "changed" in texts


def test_a_smaller_export_removes_the_shards_an_earlier_one_left(dataset, tmp_path, sample_parquet):
    from tests.trainer_fixtures import sample_pairs

    out = tmp_path / "wds"
    export_dataset(str(dataset[0]), str(out), use_ray=False)
    small = write_dataset(tmp_path / "small", sample_pairs(sample_parquet, 10), 10)
    record = export_dataset(str(small), str(out), use_ray=False)
    assert sorted(p for p in os.listdir(out) if p.endswith(".tar")) == ["00000.tar"]
    assert _openclip_dataset_size(record["train_data"]) == 10


def test_export_to_s3_writes_the_same_tars(dataset, tmp_path, s3_store):
    manifest, _ = dataset
    local = export_dataset(str(manifest), str(tmp_path / "wds"), use_ray=False)
    remote = export_dataset(str(manifest), s3_store.uri("export"), storage=s3_store.config, use_ray=False)
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]
    out = s3_store.child("export")
    assert out.read_bytes("00002.tar") == (tmp_path / "wds" / "00002.tar").read_bytes()
    assert out.read_json("sizes.json") == {"00000.tar": 19, "00001.tar": 20, "00002.tar": 5}
    assert remote["train_data"] == f"{out.root}/{{00000..00002}}.tar"


def test_export_errors_name_the_manifest(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match=f"no dataset manifest at {tmp_path}/nothing/manifest.json"):
        export_dataset(str(tmp_path / "nothing"), str(tmp_path / "out"), use_ray=False)
    with pytest.raises(ExportError, match="export format 'tfrecord'"):
        export_dataset(str(dataset[0]), str(tmp_path / "out"), format="tfrecord", use_ray=False)
    with pytest.raises(ExportError, match=r"manifest.json: no holdout shards"):
        export_dataset(str(dataset[0]), str(tmp_path / "out"), split="holdout", use_ray=False)
