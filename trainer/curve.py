"""The learning curve: zero-shot accuracy on held-out eval sets every N training steps.

The eval sets' images are transformed once (the eval transform) and kept as one tensor per set;
each point encodes them and the class prompts (bare name, "a photo of a {}.", the set's ensemble)
with the model being trained and records top-1 and mean per-class accuracy. Rank 0 computes it;
the points go to ``curve.jsonl`` beside the training log, and :func:`render_curve` draws them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainer.eval import build_zeroshot_classifier, confusion_matrix, l2_normalize, per_class_accuracy, zeroshot_logits
from trainer.templates import BARE_TEMPLATE, SINGLE_TEMPLATE, templates_for
from trainer.tokenizer import tokenize

CURVE_NAME = "curve.jsonl"
CURVE_PLOT_NAME = "learning_curve.png"
VARIANTS = ("bare", "single", "ensemble")


@dataclass(frozen=True)
class CurveSet:
    """One eval set ready for repeated scoring: transformed images, labels, classes, templates."""

    name: str
    images: torch.Tensor  # [N, 3, H, W], eval transform applied
    labels: np.ndarray
    classes: tuple[str, ...]
    templates: tuple[str, ...]  # the ensemble

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)


def prepare_curve_set(eval_set: Any, kind: str | None, image_size: int) -> CurveSet:
    """Decode and transform an ``infra.eval_sets.EvalSet``'s images once, as evaluation does."""
    from trainer.data import eval_image, image_transform

    transform = image_transform(image_size, train=False)
    images = torch.stack([transform(eval_image(data)) for data in eval_set.images])
    family = templates_for(eval_set.name, kind, tuple(eval_set.templates or ()))
    return CurveSet(eval_set.name, images, np.asarray(eval_set.labels, np.int64), tuple(eval_set.classes), family)


def load_curve_sets(config: Any) -> list[CurveSet]:
    """The learning curve's eval sets (``train.curve_eval_sets`` of a whole Config), loaded and
    transformed once; none when the curve is off."""
    from infra.eval_sets import load_eval_set
    from trainer.model import load_model_config

    if not config.train.curve_every_steps:
        return []
    image_size = load_model_config(config.train.model).image_size
    by_name = {e.name: e for e in config.eval_sets}
    return [prepare_curve_set(load_eval_set(by_name[n]), by_name[n].kind, image_size)
            for n in config.train.curve_eval_sets]


def mean_per_class_accuracy(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """The mean over classes present of each class's recall (balanced accuracy)."""
    per_class = per_class_accuracy(confusion_matrix(labels, predictions, num_classes))
    return float(np.nanmean(per_class))


@torch.no_grad()
def score(model: torch.nn.Module, curve_set: CurveSet, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Top-1 and mean per-class zero-shot accuracy of ``model`` on ``curve_set`` for each variant."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        context = model.config.context_length
        feats = torch.cat([model.encode_image(curve_set.images[i:i + batch_size].to(device)).float().cpu()
                           for i in range(0, len(curve_set.images), batch_size)]).numpy()
        feats = l2_normalize(feats)

        def encode_text(texts: list[str]) -> np.ndarray:
            return model.encode_text(tokenize(texts, context).to(device)).float().cpu().numpy()

        out: dict[str, dict[str, float]] = {}
        for variant, templates in zip(VARIANTS, (BARE_TEMPLATE, SINGLE_TEMPLATE, curve_set.templates)):
            classifier = build_zeroshot_classifier(encode_text, curve_set.classes, templates, batch_size)
            predictions = zeroshot_logits(feats, classifier).argmax(axis=1)
            out[variant] = {"top1": float((predictions == curve_set.labels).mean()),
                            "mean_per_class": mean_per_class_accuracy(curve_set.labels, predictions,
                                                                      len(curve_set.classes))}
        return out
    finally:
        model.train(was_training)


def curve_point(model: torch.nn.Module, sets: Sequence[CurveSet], step: int) -> dict[str, Any]:
    """One point of the curve: every set's scores at ``step``."""
    return {"step": step, "sets": {s.name: {**score(model, s), "chance": s.chance, "images": len(s.labels)}
                                   for s in sets}}


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The points of ``curve.jsonl`` by step (a resumed run's repeated step keeps its latest point)."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            point = json.loads(line)
            by_step[point["step"]] = point
    return [by_step[s] for s in sorted(by_step)]


def render_curve(points: Sequence[dict[str, Any]]) -> bytes:
    """PNG: mean per-class zero-shot accuracy against steps, one panel per set, chance dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global figure state
    from matplotlib.figure import Figure

    names = list(points[0]["sets"]) if points else []
    fig = Figure(figsize=(4.5 * max(1, len(names)), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    steps = [p["step"] for p in points]
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for variant in VARIANTS:
            ax.plot(steps, [100 * p["sets"][name][variant]["mean_per_class"] for p in points], marker=".",
                    label={"bare": "bare name", "single": '"a photo of a {}."', "ensemble": "ensemble"}[variant])
        chance = 100 * points[0]["sets"][name]["chance"]
        ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance {chance:.1f}%")
        ax.axhline(3 * chance, color="grey", linestyle=":", linewidth=1, label="3 x chance")
        ax.set_title(f"{name} ({points[0]['sets'][name]['images']} images)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("zero-shot mean per-class accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
