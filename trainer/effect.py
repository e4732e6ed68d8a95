"""Is one prompt variant better than another? A paired, two-level bootstrap over evaluation runs.

CLIP's Fig. 4 effect (a prompt ensemble beats the bare class name) is a difference of two mean
per-class accuracies on the same images. What limits the evidence at witflow's scale is which
classes a set happens to hold, then which images each class has; so the interval resamples both:
classes (within each set, with replacement), then each drawn class's images (with replacement),
the same draws for both variants and for every run. Runs (seeds) are the units averaged, not
resampled: the interval is conditional on them.

Each run directory is an evaluation's output (``results.json`` beside ``predictions/<set>.parquet``,
written by ``witflow eval``). For every set the runs must hold the same images with the same labels.

    python -m trainer.effect runs/a/train/export/eval runs/b/train/export/eval \\
        --sets openclipart-concepts openclipart-concepts-final --a bare --b ensemble

prints, per set and pooled (every (set, class) one unit), the seed-mean mean per-class accuracy of
both variants, their difference with a 95% interval, the bootstrap share of draws at or below
zero, and in how many runs ``b`` is ahead.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from trainer.results import RESULTS_NAME, predictions_key


class EffectError(ValueError):
    """The runs cannot be compared; the message names the file."""


@dataclass(frozen=True)
class SetPredictions:
    """One eval set over R runs: labels (n,) and, per variant, predictions (R, n)."""

    name: str
    ids: tuple[str, ...]
    labels: np.ndarray
    predictions: dict[str, np.ndarray]


@dataclass(frozen=True)
class Effect:
    """``b`` − ``a`` in mean per-class accuracy (fractions), on one set or pooled."""

    name: str
    classes: int
    images: int
    runs: int
    a: float
    b: float
    diff: float
    low: float
    high: float
    share_at_or_below_zero: float
    runs_b_ahead: int
    runs_level: int


def load_predictions(run_dirs: Sequence[str | Path], set_name: str, variants: Sequence[str]) -> SetPredictions:
    """The runs' predictions for one set, aligned by image id; refuse runs that disagree on images or labels."""
    ids: tuple[str, ...] | None = None
    labels = None
    preds: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    models: dict[str, Path] = {}
    for run in run_dirs:
        results_path = Path(run) / RESULTS_NAME
        try:
            results = json.loads(results_path.read_text())
        except (OSError, ValueError) as e:
            raise EffectError(f"{results_path}: not an evaluation's results ({e})") from e
        model = results.get("model_id", "")
        if model in models:  # one model twice would count as two seeds
            raise EffectError(f"{results_path}: the same model ({model[:12]}) as {models[model]}")
        models[model] = results_path
        path = Path(run) / predictions_key(set_name)
        # Only what the latest evaluation listed: a file left by an earlier one is not its result.
        if set_name not in results.get("outputs", {}).get("predictions", {}) or not path.is_file():
            raise EffectError(f"{path}: no predictions for eval set {set_name!r} in {results_path} "
                              "(evaluate the run on that set with this witflow)")
        table = pq.read_table(path).to_pydict()
        missing = [c for c in ("id", "label", *variants) if c not in table]
        if missing:
            raise EffectError(f"{path}: no column {', '.join(missing)} (has {', '.join(table)})")
        order = np.argsort(np.asarray(table["id"], dtype=object), kind="stable")
        run_ids = tuple(table["id"][i] for i in order)
        run_labels = np.asarray(table["label"], np.int64)[order]
        if ids is None:
            ids, labels = run_ids, run_labels
        elif run_ids != ids or not np.array_equal(run_labels, labels):
            raise EffectError(f"{path}: other images or labels than {Path(run_dirs[0]) / predictions_key(set_name)}: "
                              "not the same eval set")
        for v in variants:
            preds[v].append(np.asarray(table[v], np.int64)[order])
    if ids is None:
        raise EffectError("no run directory given")
    return SetPredictions(set_name, ids, labels, {v: np.stack(p) for v, p in preds.items()})


def _class_differences(s: SetPredictions, a: str, b: str) -> list[np.ndarray]:
    """Per class (in label order, classes with images only): each image's b − a correctness, averaged over runs."""
    d = ((s.predictions[b] == s.labels).astype(np.float64) - (s.predictions[a] == s.labels)).mean(axis=0)
    return [d[s.labels == c] for c in np.unique(s.labels)]


def _mean_per_class(s: SetPredictions, variant: str) -> np.ndarray:
    """Per run, the mean over classes of the class's accuracy."""
    correct = s.predictions[variant] == s.labels
    return np.stack([correct[:, s.labels == c].mean(axis=1) for c in np.unique(s.labels)], axis=1).mean(axis=1)


def _draw_class_means(per_class: list[np.ndarray], draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, K): for each draw, K classes drawn with replacement, each the mean of its images drawn with replacement."""
    k = len(per_class)
    chosen = rng.integers(0, k, size=(draws, k))
    out = np.empty((draws, k))
    for c, d in enumerate(per_class):
        where = chosen == c
        n = int(where.sum())
        if n:
            out[where] = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return out


def paired_effects(sets: Sequence[SetPredictions], a: str = "bare", b: str = "ensemble", *, draws: int = 10_000,
                   seed: int = 0, level: float = 0.95) -> list[Effect]:
    """``b`` − ``a`` per set and pooled over every (set, class), with two-level bootstrap intervals."""
    if not sets:
        raise EffectError("no eval set given")
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    effects, pooled_draws, pooled_units = [], [], []

    def effect(name, classes, images, a_runs, b_runs, units, boot) -> Effect:
        runs_diff = b_runs - a_runs
        return Effect(name, classes, images, len(a_runs), float(a_runs.mean()), float(b_runs.mean()),
                      float(np.mean(units)), float(np.quantile(boot, lo_q)), float(np.quantile(boot, hi_q)),
                      float((boot <= 0).mean()), int((runs_diff > 1e-12).sum()), int((np.abs(runs_diff) <= 1e-12).sum()))

    a_pool, b_pool = [], []
    for s in sets:
        per_class = _class_differences(s, a, b)
        boot = _draw_class_means(per_class, draws, rng)
        units = [float(d.mean()) for d in per_class]
        a_runs, b_runs = _mean_per_class(s, a), _mean_per_class(s, b)
        effects.append(effect(s.name, len(per_class), len(s.ids), a_runs, b_runs, units, boot.mean(axis=1)))
        pooled_draws.append(boot)
        pooled_units.extend(units)
        a_pool.append(a_runs * len(per_class))
        b_pool.append(b_runs * len(per_class))
    if len(sets) > 1:
        runs = {len(s.predictions[a]) for s in sets}
        if len(runs) != 1:
            raise EffectError(f"the sets were evaluated by different numbers of runs ({sorted(runs)}): cannot pool")
        k = len(pooled_units)
        boot = np.concatenate(pooled_draws, axis=1).mean(axis=1)
        effects.append(effect("pooled", k, sum(len(s.ids) for s in sets), sum(a_pool) / k, sum(b_pool) / k,
                              pooled_units, boot))
    return effects


def format_effects(effects: Sequence[Effect], a: str, b: str) -> str:
    head = f"| set | classes | images | runs | {a} | {b} | {b} − {a} (95% interval) | share ≤ 0 | runs {b} ahead / level |"
    lines = [head, "|" + "---|" * 9]
    for e in effects:
        lines.append(f"| {e.name} | {e.classes} | {e.images} | {e.runs} | {100 * e.a:.1f}% | {100 * e.b:.1f}% | "
                     f"{100 * e.diff:+.1f} [{100 * e.low:+.1f}, {100 * e.high:+.1f}] | {100 * e.share_at_or_below_zero:.1f}% | "
                     f"{e.runs_b_ahead} / {e.runs_level} |")
    return "\n".join(lines)


def forest_plot(effects: Sequence[Effect], a: str, b: str) -> bytes:
    """Each set's and the pooled difference with its interval, as a PNG."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(effects) + 1.2))
    ys = np.arange(len(effects))[::-1]
    for y, e in zip(ys, effects):
        colour = "black" if e.name == "pooled" else "tab:blue"
        ax.errorbar(100 * e.diff, y, xerr=[[100 * (e.diff - e.low)], [100 * (e.high - e.diff)]], fmt="o",
                    color=colour, capsize=3)
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_yticks(ys, [f"{e.name} (K={e.classes})" for e in effects])
    ax.set_xlabel(f"{b} − {a}, mean per-class accuracy (points)\n95% two-level bootstrap (classes, then images)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.effect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Each RUN is an evaluation's output folder (results.json, predictions/).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="evaluation output folders, one per run (seed)")
    p.add_argument("--sets", nargs="+", required=True, help="eval-set names, pooled in that order")
    p.add_argument("--a", default="bare", help="the reference variant (default: bare)")
    p.add_argument("--b", default="ensemble", help="the variant compared with it (default: ensemble)")
    p.add_argument("--draws", type=int, default=10_000, help="bootstrap draws (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default: 0)")
    p.add_argument("--json", help="also write the effects as JSON here")
    p.add_argument("--plot", help="also write a forest plot PNG here")
    args = p.parse_args(argv)
    try:
        sets = [load_predictions(args.runs, name, (args.a, args.b)) for name in args.sets]
        effects = paired_effects(sets, args.a, args.b, draws=args.draws, seed=args.seed)
    except EffectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_effects(effects, args.a, args.b))
    if args.json:
        Path(args.json).write_text(json.dumps({"a": args.a, "b": args.b, "draws": args.draws, "seed": args.seed,
                                               "runs": list(args.runs), "effects": [asdict(e) for e in effects]},
                                              indent=2) + "\n")
    if args.plot:
        Path(args.plot).write_bytes(forest_plot(effects, args.a, args.b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
