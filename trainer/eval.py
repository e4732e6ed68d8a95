"""Evaluation maths over feature arrays: zero-shot classifiers, accuracy, retrieval, linear probe.

Everything here takes numpy arrays (image/text features, labels) and returns numbers or arrays, so
it is testable without a model. The runner (trainer/evaluate.py) encodes images and prompts and calls
these. Conventions follow the CLIP paper: features are L2-normalised, similarity is the dot product,
a class's zero-shot weight is the renormalised mean of its normalised prompt embeddings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from trainer.templates import format_prompts

DEFAULT_TOPK = (1, 5)
DEFAULT_RECALL_K = (1, 5, 10)
# CLIP's sweep range for the L2 regularisation (paper, Appendix A.3: 1e-6 .. 1e6).
DEFAULT_PROBE_CS = tuple(float(c) for c in np.logspace(-6, 6, 13))


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x / ||x||`` along ``axis`` (zero vectors stay zero instead of becoming NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


# ------------------------------------------------------------------------------------------------
# Zero-shot classifiers
# ------------------------------------------------------------------------------------------------


def ensemble_classifier(prompt_features: np.ndarray) -> np.ndarray:
    """Class weights from prompt embeddings ``[C, T, D]`` (C classes, T templates): normalise each
    embedding, average over templates, renormalise -> ``[C, D]`` unit rows."""
    feats = np.asarray(prompt_features, dtype=np.float32)
    if feats.ndim != 3:
        raise ValueError(f"prompt_features: expected [classes, templates, dim], got shape {feats.shape}")
    return l2_normalize(l2_normalize(feats, axis=-1).mean(axis=1), axis=-1)


def build_zeroshot_classifier(encode_text: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                              templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Encode every (class, template) prompt with ``encode_text`` (list of captions -> ``[B, D]``
    features) in batches and ensemble them into a ``[C, D]`` classifier."""
    if not class_names:
        raise ValueError("class_names: empty")
    prompts = [p for name in class_names for p in format_prompts(templates, name)]
    chunks = [np.asarray(encode_text(prompts[i:i + batch_size]), dtype=np.float32)
              for i in range(0, len(prompts), batch_size)]
    feats = np.concatenate(chunks, axis=0)
    if feats.shape[0] != len(prompts):
        raise ValueError(f"encode_text returned {feats.shape[0]} rows for {len(prompts)} prompts")
    return ensemble_classifier(feats.reshape(len(class_names), len(templates), -1))


class ClassifierCache:
    """Zero-shot classifiers, built once per (model, eval set, classes, templates) and reused.

    In memory always; also on disk (``<directory>/<key>.npy``) when a directory is given, so a rerun
    of the same checkpoint does not re-encode thousands of prompts.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_id: str, eval_set: str, class_names: Sequence[str], templates: Sequence[str]) -> str:
        blob = json.dumps([model_id, eval_set, list(class_names), list(templates)], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get_or_build(self, model_id: str, eval_set: str, class_names: Sequence[str], templates: Sequence[str],
                     build: Callable[[], np.ndarray]) -> np.ndarray:
        key = self.key(model_id, eval_set, class_names, templates)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.directory / f"{key}.npy" if self.directory is not None else None
        if path is not None and path.exists():
            weights = np.load(path)
            if weights.shape[0] == len(class_names):
                self.hits += 1
                self._memory[key] = weights
                return weights
        self.misses += 1
        weights = np.asarray(build(), dtype=np.float32)
        if weights.ndim != 2 or weights.shape[0] != len(class_names):
            raise ValueError(f"classifier for {eval_set}: expected [{len(class_names)}, D], got {weights.shape}")
        self._memory[key] = weights
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, weights)
            tmp.replace(path)  # atomic: a reader never sees half a file
        return weights


def zeroshot_logits(image_features: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """Cosine similarity of each image to each class: ``[N, D] x [C, D] -> [N, C]``."""
    return l2_normalize(image_features) @ l2_normalize(classifier).T


# ------------------------------------------------------------------------------------------------
# Classification metrics
# ------------------------------------------------------------------------------------------------


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = DEFAULT_TOPK) -> dict[int, float]:
    """Fraction of rows whose label is among the ``k`` highest logits (k capped at the class count)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    if labels.size == 0:
        return {k: float("nan") for k in ks}
    # Rank of the true class = number of classes scored strictly higher (ties count in its favour).
    true_scores = logits[np.arange(len(labels)), labels]
    rank = (logits > true_scores[:, None]).sum(axis=1)
    return {k: float((rank < min(k, logits.shape[1])).mean()) for k in ks}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts; row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} do not match")
    bad = (labels < 0) | (labels >= num_classes) | (predictions < 0) | (predictions >= num_classes)
    if bad.any():
        raise ValueError(f"labels/predictions outside 0..{num_classes - 1}")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class from a confusion matrix (NaN where a class has no examples)."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                           ks: Sequence[int] = DEFAULT_TOPK) -> dict:
    """Top-k accuracy, per-class accuracy, confusion matrix and chance levels, as plain JSON data."""
    num_classes = len(class_names)
    logits = np.asarray(logits)
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} classes, class_names {num_classes}")
    labels = np.asarray(labels, dtype=np.int64)
    predictions = logits.argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    cm = confusion_matrix(labels, predictions, num_classes)
    per_class = per_class_accuracy(cm)
    topk = topk_accuracy(logits, labels, ks)
    support = cm.sum(axis=1)
    out: dict = {"n": int(len(labels)), "num_classes": num_classes}
    for k in ks:
        out[f"top{k}"] = topk[k]
        out[f"chance_top{k}"] = min(k, num_classes) / num_classes
    present = support > 0
    out["mean_per_class"] = float(np.nanmean(per_class[present])) if present.any() else float("nan")
    out["majority_baseline"] = float(support.max() / max(1, support.sum()))
    out["per_class"] = {name: (None if np.isnan(a) else float(a)) for name, a in zip(class_names, per_class)}
    out["support"] = {name: int(s) for name, s in zip(class_names, support)}
    out["confusion"] = cm.tolist()
    return out


def zeroshot_report(image_features: np.ndarray, labels: np.ndarray, classifiers: Mapping[str, np.ndarray],
                    class_names: Sequence[str], ks: Sequence[int] = DEFAULT_TOPK) -> dict[str, dict]:
    """``classification_metrics`` for each named classifier (e.g. bare name / one template / ensemble)."""
    return {variant: classification_metrics(zeroshot_logits(image_features, w), labels, class_names, ks)
            for variant, w in classifiers.items()}


# ------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------


def _chance_any_in_topk(num_items: int, num_correct: np.ndarray, k: int) -> float:
    """Expected recall@k of a random ranking: 1 - P(no correct item in k draws without replacement)."""
    k = min(k, num_items)
    miss = np.ones(len(num_correct), dtype=np.float64)
    for i in range(k):
        miss *= np.clip((num_items - num_correct - i) / (num_items - i), 0.0, 1.0)
    return float((1.0 - miss).mean()) if len(num_correct) else float("nan")


def retrieval_recall(image_features: np.ndarray, text_features: np.ndarray, text_to_image: np.ndarray,
                     ks: Sequence[int] = DEFAULT_RECALL_K) -> dict:
    """Recall@k both ways. ``text_to_image[j]`` is the image index of caption ``j`` (several
    captions may share an image). Image->text: an image hits if any of its captions is in its top k;
    text->image: a caption hits if its image is in its top k. Ties count in the item's favour."""
    img = l2_normalize(image_features)
    txt = l2_normalize(text_features)
    owner = np.asarray(text_to_image, dtype=np.int64)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if owner.shape != (n_txt,):
        raise ValueError(f"text_to_image: expected {n_txt} entries, got {owner.shape}")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError(f"text_to_image: indices outside 0..{n_img - 1}")
    sim = img @ txt.T  # [images, texts]
    # text -> image: rank of the caption's own image within its column.
    own = sim[owner, np.arange(n_txt)]
    t2i_rank = (sim > own[None, :]).sum(axis=0)
    # image -> text: rank of the best-scored correct caption within the image's row.
    correct = np.zeros_like(sim, dtype=bool)
    correct[owner, np.arange(n_txt)] = True
    best_correct = np.where(correct, sim, -np.inf).max(axis=1)
    has_caption = correct.any(axis=1)
    i2t_rank = (sim > best_correct[:, None]).sum(axis=1)[has_caption]
    captions_per_image = correct.sum(axis=1)[has_caption]
    out: dict = {"images": int(has_caption.sum()), "texts": int(n_txt)}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((i2t_rank < k).mean()) if len(i2t_rank) else float("nan")
        out[f"text_to_image_R@{k}"] = float((t2i_rank < k).mean()) if n_txt else float("nan")
        out[f"chance_image_to_text_R@{k}"] = _chance_any_in_topk(n_txt, captions_per_image, k)
        out[f"chance_text_to_image_R@{k}"] = min(k, n_img) / n_img if n_img else float("nan")
    return out


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, part): ``fraction`` of each class (at least one where the class has ≥2)
    goes to ``part``; deterministic for a seed."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    rest, part = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_part = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_part = min(max(n_part, 1), len(idx) - 1)
        else:
            n_part = 0
        part.append(idx[:n_part])
        rest.append(idx[n_part:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(part))


def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int, init=None):
    """L2 logistic regression at ``C=c``; ``init`` (a fitted model) warm-starts it from its weights."""
    # sklearn imports slowly; only when probing.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if init is not None:
        model = copy.deepcopy(init)
        model.set_params(C=c, warm_start=True)
    else:
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # Very weak regularisation on separable data never "converges"; the sweep judges it on val.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, cs: Sequence[float] = DEFAULT_PROBE_CS, val_fraction: float = 0.2,
                 refine_steps: int = 2, max_iter: int = 1000, seed: int = 0) -> dict:
    """CLIP's linear-probe protocol: L2-regularised logistic regression on frozen features; C swept
    (log-spaced) on a validation split of the training data, refined by bisection in log space around
    the best value, then refit on train+val and scored once on the test set."""
    from threadpoolctl import threadpool_limits

    # These fits are small; multi-threaded BLAS/OpenMP on a shared machine spends far more time
    # synchronising than computing (measured: 1.9 s single-threaded vs 33 s with 2 threads each).
    with threadpool_limits(limits=1):
        return _linear_probe(train_features, train_labels, test_features, test_labels, cs=cs,
                             val_fraction=val_fraction, refine_steps=refine_steps, max_iter=max_iter, seed=seed)


def _linear_probe(train_features, train_labels, test_features, test_labels, *, cs, val_fraction, refine_steps,
                  max_iter, seed) -> dict:
    x_all = np.asarray(train_features, dtype=np.float64)
    y_all = np.asarray(train_labels, dtype=np.int64)
    x_test = np.asarray(test_features, dtype=np.float64)
    y_test = np.asarray(test_labels, dtype=np.int64)
    if len(np.unique(y_all)) < 2:
        raise ValueError("linear probe: the training split needs at least two classes")
    fit_idx, val_idx = stratified_split(y_all, val_fraction, seed)
    if len(val_idx) == 0 or len(np.unique(y_all[fit_idx])) < 2:
        raise ValueError("linear probe: too few examples per class for a validation split")

    val_scores: dict[float, float] = {}
    fitted: dict[float, object] = {}

    def score(c: float) -> float:
        if c not in val_scores:
            # Continue the regularisation path from the nearest stronger-regularised fit: far fewer
            # iterations than a cold start at weak regularisation.
            weaker_than = [k for k in fitted if k < c]
            init = fitted[max(weaker_than)] if weaker_than else None
            m = _fit_logistic(x_all[fit_idx], y_all[fit_idx], c, max_iter, seed, init)
            fitted[c] = m
            val_scores[c] = float((m.predict(x_all[val_idx]) == y_all[val_idx]).mean())
        return val_scores[c]

    def pick() -> float:
        # Small validation sets tie often; the middle of the tied plateau is the choice least
        # sensitive to where its edges happen to fall.
        top = max(val_scores.values())
        tied = sorted(c for c, a in val_scores.items() if a == top)
        return tied[(len(tied) - 1) // 2]

    grid = sorted(float(c) for c in cs)
    if not grid or grid[0] <= 0:
        raise ValueError("linear probe: cs must be positive")
    for c in grid:
        score(c)
    # Bisection refinement (as CLIP's parametric search): probe the log-midpoints beside the best.
    step = (math.log10(grid[-1]) - math.log10(grid[0])) / max(1, len(grid) - 1)
    best = pick()
    for _ in range(refine_steps if len(grid) > 1 else 0):
        step /= 2
        for c in (best * 10 ** -step, best * 10 ** step):
            score(float(c))
        best = pick()

    final = _fit_logistic(x_all, y_all, best, max_iter, seed, fitted[best])
    # Classes missing from training cannot be predicted; scoring stays over the true test labels.
    test_accuracy = float((final.predict(x_test) == y_test).mean()) if len(y_test) else float("nan")
    classes = np.unique(np.concatenate([y_all, y_test]))
    return {
        "best_C": best,
        "val_accuracy": {f"{c:.3g}": a for c, a in sorted(val_scores.items())},
        "best_val_accuracy": val_scores[best],
        "top1": test_accuracy,
        "chance_top1": 1.0 / len(classes),
        "n_train": int(len(fit_idx)),
        "n_val": int(len(val_idx)),
        "n_test": int(len(y_test)),
    }
