"""Evaluate a CLIP checkpoint: zero-shot classification, retrieval and a linear probe.

The runner around ``trainer.eval``'s maths: load a checkpoint (the trainer's export dir, or a plain
OpenAI-layout state dict with its config), encode each eval set's images and class prompts once,
score them, and write the results (``trainer.results``: results.json, results.md, one per-class bar
plot per eval set) where it is told (``Config.eval_uri``: ``eval/`` beside the weights by default).
Images that cannot be decoded cost one sample each, counted with a reason; a whole eval set that
cannot be loaded is recorded as an error, not fatal.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from infra.config import WEIGHTS_SUFFIXES, EvalConfig, EvalSetConfig, StorageConfig, checkpoint_dir
from infra.funnel import Funnel
from infra.log import get_logger, log_event, progress
from infra.manifest import read_manifest
from infra.storage import ObjectStore
from trainer.eval import (
    ClassifierCache,
    build_zeroshot_classifier,
    l2_normalize,
    linear_probe,
    retrieval_recall,
    stratified_split,
    zeroshot_logits,
    zeroshot_report,
)
from trainer.results import pct, write_outputs
from trainer.templates import BARE_TEMPLATE, SINGLE_TEMPLATE, templates_for

log = get_logger("witflow.evaluate")

CACHE_DIR = "classifier_cache"
# Linear probe on an eval set with one split: half of each class trains (20% of that validates C),
# the other half tests. Below this many images per class the probe is skipped, with the reason.
PROBE_TEST_FRACTION = 0.5
PROBE_MIN_PER_CLASS = 4


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def default_device() -> str:
    """The device to evaluate on: the first GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    model_config: Any  # trainer.model.ModelConfig
    model_id: str  # sha256 of the weights file: the classifier cache key
    weights_uri: str


def _split_weights(checkpoint: str) -> tuple[str, str]:
    """(directory URI, weights file name) for an export dir or a ``.pt``/``.pth``/``.bin`` file."""
    from trainer.model import EXPORT_WEIGHTS_NAME

    if checkpoint.rstrip("/").endswith(WEIGHTS_SUFFIXES):
        return checkpoint_dir(checkpoint), checkpoint.rstrip("/").rpartition("/")[2]
    return checkpoint_dir(checkpoint), EXPORT_WEIGHTS_NAME


def load_checkpoint(checkpoint: str, *, model_config: str | None = None, storage: StorageConfig | None = None,
                    device: str = "cpu") -> LoadedCheckpoint:
    """Load an export dir (``model.pt`` + ``model_config.json``) or a plain OpenAI-layout state dict.

    ``checkpoint`` may be a local path, ``file://`` or ``s3://`` URI. For a bare state dict the
    architecture comes from ``model_config`` (a named config or JSON path) when given, else from the
    ``model_config.json`` or ``open_clip_config.json`` beside it, else from the tensor shapes when
    they are one of OpenAI's models (``trainer.model.exported_config``; others are refused: their
    head counts are not in the weights).
    """
    from trainer.model import (CLIP, EXPORT_CONFIG_NAME, OPEN_CLIP_CONFIG_NAME, load_exported, load_model_config,
                               load_openai_state_dict)

    directory, weights_name = _split_weights(checkpoint)
    store = ObjectStore(directory, storage)
    if not store.exists(weights_name):
        raise FileNotFoundError(f"no checkpoint weights at {store.uri(weights_name)} "
                                f"(expected the trainer's export dir or an OpenAI-layout .pt file)")
    weights = store.read_bytes(weights_name)
    model_id = hashlib.sha256(weights).hexdigest()
    with tempfile.TemporaryDirectory(prefix="witflow-eval-") as tmp:
        # A local copy lets one loader serve paths and s3:// alike.
        local = Path(tmp) / "model.pt"
        local.write_bytes(weights)
        del weights
        if model_config is not None:
            config = load_model_config(model_config)
            state_dict = torch.load(local, map_location="cpu", weights_only=True)
            if isinstance(state_dict, dict) and "state_dict" in state_dict:
                state_dict = state_dict["state_dict"]
            model = CLIP(config)
            try:
                load_openai_state_dict(model, state_dict)
            except RuntimeError as e:
                raise ValueError(f"{checkpoint}: weights do not fit model config {model_config!r}: "
                                 f"{str(e).splitlines()[0]}") from None
            model.eval()
        else:
            for name in (EXPORT_CONFIG_NAME, OPEN_CLIP_CONFIG_NAME):
                if store.exists(name):
                    (Path(tmp) / name).write_bytes(store.read_bytes(name))
            model, config = load_exported(local, where=store.uri(weights_name))
    model.to(device)
    return LoadedCheckpoint(model=model, model_config=config, model_id=model_id, weights_uri=store.uri(weights_name))


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------


def decode_image(data: bytes | None):
    """Encoded bytes -> PIL image for the eval transform (``trainer.data.eval_image``: RGB, L and
    CMYK as decoded, so the transform matches OpenCLIP's; alpha on white, as in training);
    raises ValueError whose text starts with the drop reason."""
    from PIL import Image, UnidentifiedImageError

    from trainer.data import eval_image

    if not data:
        raise ValueError("empty_image")
    try:
        return eval_image(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"undecodable_image: {e}") from None


class ClipEncoder:
    """L2-normalised image and text features from a CLIP model, batched and without gradients."""

    def __init__(self, model: torch.nn.Module, image_size: int, batch_size: int = 256, device: str = "cpu",
                 image_transform: Callable | None = None) -> None:
        if image_transform is None:
            from trainer.data import image_transform as make_transform

            image_transform = make_transform(image_size, train=False)
        self.model = model.eval()
        self.transform = image_transform
        self.batch_size = batch_size
        self.device = device
        self.context_length = getattr(getattr(model, "config", None), "context_length", 77)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        from trainer.tokenizer import tokenize

        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = tokenize(list(texts[i:i + self.batch_size]), context_length=self.context_length)
            out.append(self.model.encode_text(tokens.to(self.device)).float().cpu().numpy())
        dim = getattr(getattr(self.model, "config", None), "embed_dim", 0)
        return l2_normalize(np.concatenate(out)) if out else np.zeros((0, dim), np.float32)

    @torch.no_grad()
    def encode_images(self, images: Sequence[bytes], funnel: Funnel | None = None, stage: str = "images",
                      desc: str = "encode images") -> tuple[np.ndarray, np.ndarray]:
        """Features of the decodable images and a boolean mask of which inputs they are."""
        keep = np.zeros(len(images), dtype=bool)
        reasons: list[str] = []
        feats: list[np.ndarray] = []
        batches = range(0, len(images), self.batch_size)
        for start in progress(batches, desc=desc, total=len(batches), unit="batch"):
            tensors = []
            for j, data in enumerate(images[start:start + self.batch_size]):
                try:
                    tensors.append(self.transform(decode_image(data)))
                    keep[start + j] = True
                except ValueError as e:
                    reasons.append(str(e).split(":", 1)[0])
                    log_event(log, "image skipped", index=start + j, reason=str(e)[:200])
            if tensors:
                batch = torch.stack(tensors).to(self.device)
                feats.append(self.model.encode_image(batch).float().cpu().numpy())
        if funnel is not None:
            funnel.record(stage, len(images), int(keep.sum()), reasons)
        dim = getattr(getattr(self.model, "config", None), "embed_dim", 0)
        return (l2_normalize(np.concatenate(feats)) if feats else np.zeros((0, dim), np.float32)), keep


# ------------------------------------------------------------------------------------------------
# Classification eval sets
# ------------------------------------------------------------------------------------------------


@dataclass
class ClassificationSet:
    """What the runner needs of an eval set (``infra.eval_sets.EvalSet`` has these fields)."""

    name: str
    classes: list[str]
    images: list[bytes]
    labels: np.ndarray
    templates: tuple[str, ...] = ()
    ids: list[str] = field(default_factory=list)


def evaluate_classification(encoder: ClipEncoder, eval_set: Any, *, kind: str | None = None,
                            templates: Sequence[str] = (), cache: ClassifierCache | None = None,
                            model_id: str = "", ensembles: bool = True, probe: bool = True,
                            seed: int = 0) -> dict:
    """Zero-shot (bare name, one template, the full ensemble) and linear-probe results for one set."""
    started = time.perf_counter()
    classes = list(eval_set.classes)
    family = templates_for(eval_set.name, kind, templates or tuple(getattr(eval_set, "templates", ()) or ()))
    funnel = Funnel()
    feats, keep = encoder.encode_images(eval_set.images, funnel, stage=f"eval:{eval_set.name}",
                                        desc=f"encode {eval_set.name}")
    labels = np.asarray(eval_set.labels, dtype=np.int64)[keep]
    cache = cache if cache is not None else ClassifierCache()

    variants: dict[str, tuple[str, ...]] = {"ensemble": family}
    if ensembles:
        variants = {"bare": BARE_TEMPLATE, "single": SINGLE_TEMPLATE, "ensemble": family}
    classifiers = {
        variant: cache.get_or_build(model_id, eval_set.name, classes, tmpl,
                                    lambda tmpl=tmpl: build_zeroshot_classifier(encoder.encode_texts, classes, tmpl,
                                                                                encoder.batch_size))
        for variant, tmpl in variants.items()
    }
    result: dict = {
        "name": eval_set.name,
        "kind": kind,
        "classes": classes,
        "num_classes": len(classes),
        "images": int(keep.sum()),
        "funnel": funnel.to_dict(),
        "templates": {"count": len(family), "examples": list(family[:3])},
        "zeroshot": zeroshot_report(feats, labels, classifiers, classes) if len(labels) else {},
    }
    if len(labels):  # each image's predicted class by variant: what a paired comparison of prompts needs
        ids = list(getattr(eval_set, "ids", None) or [f"{eval_set.name}-{i}" for i in range(len(keep))])
        result["predictions"] = {
            "id": [i for i, k in zip(ids, keep) if k], "label": labels.tolist(),
            **{variant: zeroshot_logits(feats, w).argmax(axis=1).tolist() for variant, w in classifiers.items()}}
    if probe:
        result["linear_probe"] = _probe_on_one_split(feats, labels, seed)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _probe_on_one_split(feats: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    counts = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    # A class needs images in train, validation and test; smaller classes sit the probe out.
    usable = np.flatnonzero(counts >= PROBE_MIN_PER_CLASS)
    if len(usable) < 2:
        return {"skipped": f"fewer than two classes with >= {PROBE_MIN_PER_CLASS} images"}
    rows = np.flatnonzero(np.isin(labels, usable))
    feats, labels = feats[rows], labels[rows]
    train_idx, test_idx = stratified_split(labels, PROBE_TEST_FRACTION, seed)
    try:
        out = linear_probe(feats[train_idx], labels[train_idx], feats[test_idx], labels[test_idx], seed=seed)
    except ValueError as e:
        return {"skipped": str(e)}
    out["classes_used"] = int(len(usable))
    out["classes_left_out"] = int((counts > 0).sum() - len(usable))
    out["protocol"] = (f"one split: {PROBE_TEST_FRACTION:.0%} of each class tests; the rest trains, "
                       f"20% of it validates C; classes with < {PROBE_MIN_PER_CLASS} images left out")
    return out


# ------------------------------------------------------------------------------------------------
# Retrieval on held-out pairs of a build
# ------------------------------------------------------------------------------------------------


def load_heldout_pairs(dataset_uri: str, storage: StorageConfig | None = None) -> tuple[pa.Table, dict]:
    """The (image, caption) pairs of a build's held-out shards (``shards.holdout_rows`` of them,
    never read by training). A build without them has nothing to score retrieval on: LookupError."""
    store = ObjectStore(dataset_uri, storage)
    manifest = read_manifest(store)
    if not (manifest.holdout and manifest.holdout.shards):
        raise LookupError(f"{store.uri('manifest.json')} lists no held-out shards: build with shards.holdout_rows > 0 "
                          "for retrieval pairs that training never saw")
    table = _concat([_select(store.read_parquet(s.path), _PAIR_COLUMNS) for s in manifest.holdout.shards])
    info = {"source": "the manifest's held-out shards", "dataset": store.root, "rows": table.num_rows}
    return table, info


def check_not_trained_on(checkpoint: str, pairs: pa.Table, dataset: str, storage: StorageConfig | None = None) -> dict:
    """Whether the checkpoint was trained on none of ``pairs``, from the training ids its export
    records (trainer/provenance.py). LookupError when it was trained on some: recall on them would
    measure memory, not retrieval. A checkpoint that records no ids (a bare state dict, an older
    export) cannot be checked: ``excluded_from_training`` is then None, never True."""
    from trainer.provenance import TRAINING_IDS_NAME, trained_on

    store = ObjectStore(_split_weights(checkpoint)[0], storage)
    if not store.exists(TRAINING_IDS_NAME) or "sample_id" not in pairs.column_names:
        return {"excluded_from_training": None,
                "excluded_check": f"not checked: {store.uri(TRAINING_IDS_NAME)} (the checkpoint's training ids) "
                                  "or the pairs' sample ids are missing"}
    training = np.load(io.BytesIO(store.read_bytes(TRAINING_IDS_NAME)))
    ids = pairs.column("sample_id").to_pylist()
    overlap = trained_on(ids, training)
    if overlap:
        raise LookupError(f"{overlap} of {len(ids)} held-out pairs of {dataset} were in the checkpoint's training "
                          f"data ({store.uri(TRAINING_IDS_NAME)}): it was trained on another build of this dataset; "
                          "retrieval is not scored")
    return {"excluded_from_training": True,
            "excluded_check": f"none of the {len(ids)} pairs is among the checkpoint's {len(training)} training ids"}


_PAIR_COLUMNS = ["sample_id", "caption", "image", "sha256"]


def _concat(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return pa.table({"caption": pa.array([], pa.string()), "image": pa.array([], pa.binary())})
    return pa.concat_tables(tables, promote_options="permissive")


def _select(table: pa.Table, columns: list[str]) -> pa.Table:
    missing = [c for c in ("caption", "image") if c not in table.column_names]
    if missing:
        raise ValueError(f"shard lacks column(s) {missing}")
    return table.select([c for c in columns if c in table.column_names])


def evaluate_retrieval(encoder: ClipEncoder, pairs: pa.Table) -> dict:
    """Image->text and text->image recall@1/5/10. Rows sharing an image (same sha256, else same
    bytes) count as several captions of one image."""
    funnel = Funnel()
    images = pairs.column("image").to_pylist()
    captions = pairs.column("caption").to_pylist()
    if "sha256" in pairs.column_names:
        keys = [k or hashlib.sha256(b or b"").hexdigest() for k, b in zip(pairs.column("sha256").to_pylist(), images)]
    else:
        keys = [hashlib.sha256(b or b"").hexdigest() for b in images]
    first_row: dict[str, int] = {}
    for i, k in enumerate(keys):
        first_row.setdefault(k, i)
    unique_rows = sorted(first_row.values())
    img_feats, keep = encoder.encode_images([images[i] for i in unique_rows], funnel, stage="retrieval:images",
                                            desc="encode retrieval images")
    image_index = {keys[r]: j for j, r in enumerate(np.asarray(unique_rows)[keep])}
    text_rows = [i for i, k in enumerate(keys) if k in image_index and captions[i]]
    funnel.record("retrieval:captions", len(captions), len(text_rows),
                  ["no_image" if k not in image_index else "empty_caption"
                   for i, k in enumerate(keys) if not (k in image_index and captions[i])])
    if not text_rows:
        return {"skipped": "no usable (image, caption) pairs", "funnel": funnel.to_dict()}
    txt_feats = encoder.encode_texts([captions[i] for i in text_rows])
    owner = np.array([image_index[keys[i]] for i in text_rows], dtype=np.int64)
    out = retrieval_recall(img_feats, txt_feats, owner)
    out["funnel"] = funnel.to_dict()
    return out


# ------------------------------------------------------------------------------------------------
# The whole evaluation, and its outputs
# ------------------------------------------------------------------------------------------------


def _load_registry_set(cfg: EvalSetConfig):
    from infra.eval_sets import EvalSetError, load_eval_set

    try:
        return load_eval_set(cfg, max_images=cfg.max_images)
    except EvalSetError as e:  # a missing package or folder: reported per set, not fatal
        raise LookupError(str(e)) from e


def evaluate_checkpoint(checkpoint: str, eval_sets: Sequence[EvalSetConfig], cfg: EvalConfig, *, results_uri: str,
                        dataset_uri: str | None = None, storage: StorageConfig | None = None,
                        model_config: str | None = None, seed: int = 0, device: str = "cpu",
                        load_set: Callable[[EvalSetConfig], Any] | None = None) -> dict:
    """Evaluate ``checkpoint`` on every eval set (and on held-out pairs of ``dataset_uri`` when
    given); write ``results.json``, ``results.md`` and plots under ``results_uri``; return the
    results. ``load_set`` replaces the registry's loader (``infra.eval_sets.load_eval_set``) for
    in-memory sets."""
    load_set = load_set or _load_registry_set
    started = time.perf_counter()
    torch.manual_seed(seed)
    loaded = load_checkpoint(checkpoint, model_config=model_config, storage=storage, device=device)
    out_store = ObjectStore(results_uri, storage)
    encoder = ClipEncoder(loaded.model, loaded.model_config.image_size, batch_size=cfg.batch_size, device=device)
    cache_dir = None if out_store.is_s3 else Path(out_store.root) / CACHE_DIR
    cache = ClassifierCache(cache_dir)
    results: dict = {
        "checkpoint": loaded.weights_uri,
        "model_id": loaded.model_id,
        "model_config": loaded.model_config.to_dict(),
        "eval_config": {"batch_size": cfg.batch_size, "retrieval": cfg.retrieval,
                        "linear_probe": cfg.linear_probe, "ensembles": cfg.ensembles, "model_config": model_config},
        "device": device,
        "eval_sets": {},
        "errors": {},
    }
    for set_cfg in eval_sets:
        try:
            eval_set = load_set(set_cfg)
        except (OSError, ValueError, LookupError) as e:
            # One unreadable eval set is recorded and reported; the others still run.
            results["errors"][set_cfg.name] = f"{type(e).__name__}: {e}"
            log_event(log, "eval set failed to load", name=set_cfg.name, error=str(e)[:300])
            continue
        r = evaluate_classification(encoder, eval_set, kind=set_cfg.kind, templates=set_cfg.templates,
                                    cache=cache, model_id=loaded.model_id, ensembles=cfg.ensembles,
                                    probe=cfg.linear_probe, seed=seed)
        results["eval_sets"][set_cfg.name] = r
        _log_set(r)
    if dataset_uri is not None and cfg.retrieval:
        try:
            pairs, info = load_heldout_pairs(dataset_uri, storage)
            info.update(check_not_trained_on(checkpoint, pairs, info["dataset"], storage))
            results["retrieval"] = {**info, **evaluate_retrieval(encoder, pairs)}
            _log_retrieval(results["retrieval"])
        except (OSError, ValueError, KeyError, LookupError) as e:
            results["errors"]["retrieval"] = f"{type(e).__name__}: {e}"
            log_event(log, "retrieval skipped", error=str(e)[:300])
    results["classifier_cache"] = {"hits": cache.hits, "misses": cache.misses}
    results["seconds"] = round(time.perf_counter() - started, 3)
    predictions = {name: r.pop("predictions") for name, r in results["eval_sets"].items() if "predictions" in r}
    results["outputs"] = write_outputs(out_store, results, predictions)
    return results


def _log_set(r: dict) -> None:
    for variant, m in r["zeroshot"].items():
        log_event(log, f"zero-shot {r['name']} [{variant}]", top1=pct(m["top1"]), chance=pct(m["chance_top1"]),
                  top5=pct(m.get("top5")), chance_top5=pct(m.get("chance_top5")), n=m["n"])
    probe = r.get("linear_probe") or {}
    if "top1" in probe:
        log_event(log, f"linear probe {r['name']}", top1=pct(probe["top1"]), chance=pct(probe["chance_top1"]),
                  C=f"{probe['best_C']:.3g}")


def _log_retrieval(r: dict) -> None:
    if "skipped" in r:
        log_event(log, "retrieval skipped", reason=r["skipped"])
        return
    log_event(log, "retrieval", pairs=r["texts"], **{
        k: pct(r[k]) for k in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5")})
