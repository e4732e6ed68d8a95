"""An evaluation's results as files and tables: the one renderer for results.json, results.md, the
per-class plots and the rows of the run's table artifact."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from infra.storage import ObjectStore

RESULTS_NAME = "results.json"
MARKDOWN_NAME = "results.md"
PLOTS_DIR = "plots"
PREDICTIONS_DIR = "predictions"


def predictions_parquet(columns: dict[str, list]) -> bytes:
    """One eval set's per-image predictions (``id``: string, ``label`` and each variant: int32) as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: pa.array(values, pa.string() if name == "id" else pa.int32())
                      for name, values in columns.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal; ``n/a`` when missing or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


# Short headers, so the table fits the Prefect UI's artifact view; SET_LEGEND says what they mean.
SET_COLUMNS = ("eval set", "classes", "images", "chance", "bare", "photo", "ensemble (n)", "top-5",
               "probe (chance)")
SET_LEGEND = ('Zero-shot top-1 with the bare class name, with "a photo of a {}.", and with the ensemble of n '
              "templates (chance: 1/classes); the ensemble's top-5 (chance: 5/classes); a linear probe on "
              "frozen image features (chance: 1/the classes in its splits).")
RETRIEVAL_COLUMNS = ("direction", "R@1", "R@5", "R@10", "chance R@1 / R@10")
MEAN_PER_CLASS_COLUMNS = ("eval set", "K", "chance", "bare name", '"a photo of a {}."', "ensemble", "ensemble / chance")


def result_rows(results: dict) -> list[dict[str, Any]]:
    """One row per eval set (``SET_COLUMNS``): zero-shot top-1 by prompt variant beside chance, the
    ensemble's top-5 and the linear probe; the table of results.md and of the run's table artifact."""
    rows = []
    for name, r in results.get("eval_sets", {}).items():
        zs = r.get("zeroshot", {})
        ens = zs.get("ensemble", {})
        probe = r.get("linear_probe") or {}
        probe_cell = (f"{pct(probe['top1'])} ({pct(probe['chance_top1'])})" if "top1" in probe
                      else ("skipped" if probe else "-"))
        rows.append(dict(zip(SET_COLUMNS, (
            name, r["num_classes"], r["images"], pct(ens.get("chance_top1")),
            pct(zs["bare"].get("top1")) if "bare" in zs else "-",
            pct(zs["single"].get("top1")) if "single" in zs else "-",
            f"{pct(ens.get('top1'))} ({r['templates']['count']})",
            pct(ens.get("top5")), probe_cell))))
    return rows


def mean_per_class_rows(results: dict) -> list[dict[str, Any]]:
    """One row per eval set (``MEAN_PER_CLASS_COLUMNS``): zero-shot mean per-class accuracy by prompt
    variant, chance (1/K) and the ensemble's ratio to chance."""
    rows = []
    for name, r in results.get("eval_sets", {}).items():
        zs = r.get("zeroshot", {})
        if "ensemble" not in zs:
            continue
        chance = 1.0 / r["num_classes"]
        ens = zs["ensemble"].get("mean_per_class")
        rows.append(dict(zip(MEAN_PER_CLASS_COLUMNS, (
            name, r["num_classes"], pct(chance),
            *(pct(zs[v].get("mean_per_class")) if v in zs else "-" for v in ("bare", "single", "ensemble")),
            "n/a" if ens is None or math.isnan(ens) else f"{ens / chance:.2f}x"))))
    return rows


def retrieval_rows(retrieval: dict | None) -> list[dict[str, Any]]:
    """Recall@1/5/10 per direction beside chance (``RETRIEVAL_COLUMNS``); none when it was skipped."""
    if not retrieval or "skipped" in retrieval:
        return []
    return [dict(zip(RETRIEVAL_COLUMNS, (
        label, pct(retrieval[f"{d}_R@1"]), pct(retrieval[f"{d}_R@5"]), pct(retrieval[f"{d}_R@10"]),
        f"{pct(retrieval[f'chance_{d}_R@1'])} / {pct(retrieval[f'chance_{d}_R@10'])}")))
        for d, label in (("image_to_text", "image → text"), ("text_to_image", "text → image"))]


def _markdown(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    return (["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
            + ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows])


def markdown_table(results: dict) -> str:
    """The results as markdown: zero-shot (with chance) per eval set, the sets that could not be
    evaluated, then retrieval."""
    lines = ([f"### Evaluation of `{results.get('checkpoint', '?')}`", "", SET_LEGEND, ""]
             + _markdown(SET_COLUMNS, result_rows(results)))
    if mean_per_class_rows(results):
        lines += ["", "Zero-shot mean per-class accuracy (the mean over classes of each class's accuracy):", ""]
        lines += _markdown(MEAN_PER_CLASS_COLUMNS, mean_per_class_rows(results))
    errors = results.get("errors", {})
    if errors:
        lines += [""] + [f"- **{name}** not evaluated: {err.splitlines()[0][:200]}" for name, err in errors.items()]
    ret = results.get("retrieval")
    if retrieval_rows(ret):
        lines += ["", f"Retrieval on {ret['texts']} held-out pairs ({ret.get('source', '')}; "
                      f"excluded from training: {ret.get('excluded_from_training')}):", ""]
        lines += _markdown(RETRIEVAL_COLUMNS, retrieval_rows(ret))
    return "\n".join(lines) + "\n"


def per_class_plot(r: dict) -> bytes:
    """A PNG bar chart of per-class zero-shot accuracy (each variant) with the chance line."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in workers
    import matplotlib.pyplot as plt

    classes = r["classes"]
    variants = [v for v in ("bare", "single", "ensemble") if v in r["zeroshot"]]
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(classes) + 2), 4.0), dpi=100)
    xs = np.arange(len(classes))
    for i, v in enumerate(variants):
        per_class = r["zeroshot"][v]["per_class"]
        vals = [per_class[c] if per_class[c] is not None else 0.0 for c in classes]
        ax.bar(xs + (i - (len(variants) - 1) / 2) * width, vals, width, label=v)
    chance = r["zeroshot"][variants[-1]]["chance_top1"] if variants else 0.0
    ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance {chance:.1%}")
    ax.set_xticks(xs)
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("zero-shot accuracy")
    ax.set_title(f"{r['name']}: per-class zero-shot accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_outputs(store: ObjectStore, results: dict, predictions: dict[str, dict[str, list]] | None = None) -> dict:
    """Write ``results.json``, ``results.md``, ``plots/<set>.png`` and, for each set in
    ``predictions``, ``predictions/<set>.parquet`` (an image's id, label and predicted class per
    prompt variant; the input of ``python -m trainer.effect``), all atomically; return their URIs."""
    outputs = {"json": store.uri(RESULTS_NAME), "markdown": store.uri(MARKDOWN_NAME), "plots": {},
               "predictions": {}}
    for name, r in results.get("eval_sets", {}).items():
        if r.get("zeroshot"):
            key = f"{PLOTS_DIR}/{_safe_name(name)}.png"
            store.write_bytes(key, per_class_plot(r))
            outputs["plots"][name] = store.uri(key)
    for name, columns in (predictions or {}).items():
        key = predictions_key(name)
        store.write_bytes(key, predictions_parquet(columns))
        outputs["predictions"][name] = store.uri(key)
    store.write_text(MARKDOWN_NAME, markdown_table(results))
    store.write_text(RESULTS_NAME, json.dumps(_json_safe({**results, "outputs": outputs}), indent=2) + "\n")
    return outputs


def predictions_key(name: str) -> str:
    """Where an eval set's per-image predictions go, relative to the results."""
    return f"{PREDICTIONS_DIR}/{_safe_name(name)}.parquet"


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "eval_set"
