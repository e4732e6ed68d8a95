"""Decontamination quality under the CLIP-paper alteration families, on two kinds of eval set.

Kinds: **clip art** (Openclipart PNGs: ``--openclipart`` = the full Debian-built table, e.g.
``python -m infra.openclipart --full runs/openclipart_full.parquet``; the bundled sample otherwise)
and **Fashion-MNIST** (test images as the eval set, train images as distinct candidates).

Candidates per kind, all scored by the production path (``hash_table`` → ``EvalIndex`` →
``eval_overlap.candidate_scores``):

- **copies** of eval images under each family of :mod:`tasks.dedup.alterations` (crop + zoom,
  aspect, rescale, rotation, JPEG, HSV jitter, combined): recall per family. Eval images that are
  blank inside their border (white-on-white clip art) are not copied: nothing tells their copies
  from any other blank page; the count is printed;
- **identical**: pixel-identical re-encodes of eval images (another PNG encoding, another name):
  must all be found;
- **distinct** images: the false-positive rate (share wrongly dropped);
- **look-alikes** (clip art): other members of an eval image's *group*, reported apart. A group is
  a name family (the file name's first word that is not a colour: ``star_90pt07step`` → ``star``,
  ``arrow-right-red`` → ``arrow``), joined with unaltered near-identical pictures; Openclipart holds
  generated families (hundreds of ``star_*`` rings) and recoloured sets that are neither copies nor
  fairly "distinct".

Splits: every group (clip art) or image (Fashion-MNIST) falls by a stable hash into ``tune`` or
``heldout``. Settings were tuned on ``tune`` only; ``heldout`` is reported once, at the end.

For each kind: recall per family and FP rate at the default settings, the curve over the decision
threshold (PNG at ``--plot``), and naive pHash (64-bit pHash of the grey image, nearest eval image
by Hamming distance, no crops, no verification) at FP ≤ 1%. Last line: recall at FP ≤ 1% (both
kinds averaged) ÷ naive pHash's recall at FP ≤ 1%, as ``ratio``.

    .venv/bin/python bench/dedup_quality.py --openclipart runs/openclipart_full.parquet   # ~15 min on 1 core
    .venv/bin/python bench/dedup_quality.py --quick                                       # the bundled sample, small
    .venv/bin/python bench/dedup_quality.py --split heldout ...                           # once, at the end
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.config import EvalSetConfig  # noqa: E402
from infra.eval_sets import EvalSet, load_eval_set  # noqa: E402
from infra.openclipart import SAMPLE_PATH  # noqa: E402
from tasks.dedup.alterations import FAMILIES, alter  # noqa: E402
from tasks.dedup.copy_detect import DEFAULT_MIN_SCORE, DEFAULT_MIN_SCORE_SMALL, copy_features_from_bytes  # noqa: E402
from tasks.dedup.eval_index import EvalIndex  # noqa: E402
from tasks.dedup.eval_overlap import candidate_scores, pair_thresholds  # noqa: E402
from tasks.dedup.hashing import hash_code, hash_table  # noqa: E402

COLOUR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "gray", "pink",
                "brown", "seagreen", "cyan", "magenta", "violet", "gold", "silver", "dark", "light"}
NEAR_IDENTICAL_MAD = 6.0  # mean |ΔRGB| of unaltered 32-px thumbnails: the same picture under two names
FP_TARGET = 0.01


def name_family(image_id: str) -> str:
    """The first word of a file name that is not a colour (``star_90pt07step.svg`` → ``star``)."""
    stem = image_id.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()
    words = [w for w in re.split(r"[^a-z]+", stem) if w and w not in COLOUR_WORDS]
    return words[0] if words else stem


def _stable(key: str, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).digest(), "big")


def clipart_groups(ids: list[str], images: list[bytes]) -> np.ndarray:
    """Group id per image: name families joined with unaltered near-identical pictures."""
    feats = [copy_features_from_bytes(b) for b in images]
    thumbs = np.stack([f.thumb for f in feats]).astype(np.float32)
    desc = np.stack([f.descriptor for f in feats])
    parent = list(range(len(ids)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, key in enumerate(name_family(x) for x in ids):
        union(i, first.setdefault(key, i))
    for lo in range(0, len(ids), 512):
        sim = desc[lo:lo + 512] @ desc.T
        top = np.argpartition(-sim, 6, axis=1)[:, :6]
        for r, row in enumerate(top):
            i = lo + r
            for j in row:
                if j != i and np.abs(thumbs[i] - thumbs[j]).mean() <= NEAR_IDENTICAL_MAD:
                    union(i, int(j))
    return np.array([find(i) for i in range(len(ids))])


@dataclass
class Bench:
    """One kind's eval set and labelled candidates."""

    kind: str
    eval_set: EvalSet
    candidates: pa.Table  # sample_id, image
    bucket: np.ndarray  # per candidate: a family name, "identical", "distinct" or "lookalike"
    source: np.ndarray  # per candidate: the eval image it was made from (−1 for others)


def _identical_copy(png: bytes) -> bytes:
    """The same pixels in another encoding (RGB PNG at another compression level)."""
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        out = io.BytesIO()
        im.convert("RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()


BLANK_STD = 1.0  # grey levels: an eval image this flat inside its border has nothing to recognise


def content_rows(eval_set: EvalSet) -> np.ndarray:
    """Eval images with visible content: a white-on-white drawing (7% of Openclipart once
    composited onto white) looks like every other blank page, so its altered copies are not made."""
    thumbs = np.stack([copy_features_from_bytes(b).thumb for b in eval_set.images]).astype(np.float32)
    inner = thumbs[:, 3:-3, 3:-3].reshape(len(thumbs), -1, 3).std(axis=1).max(axis=1)
    return np.flatnonzero(inner >= BLANK_STD)


def _make(kind: str, eval_set: EvalSet, distinct: list[bytes], lookalike: list[bytes], per_family: int,
          rng: np.random.Generator) -> Bench:
    n = len(eval_set.ids)
    rows, buckets, sources = [], [], []
    sources_pool = content_rows(eval_set)
    print(f"# {kind}: {n - len(sources_pool)} of {n} eval images are blank inside their border (not copied)")
    for family in FAMILIES:
        for s in rng.choice(sources_pool, size=min(per_family, len(sources_pool)), replace=False):
            rows.append(alter(eval_set.images[s], family, rng)), buckets.append(family), sources.append(int(s))
    for s in rng.choice(n, size=min(per_family, n), replace=False):
        rows.append(_identical_copy(eval_set.images[s])), buckets.append("identical"), sources.append(int(s))
    for data in distinct:
        rows.append(data), buckets.append("distinct"), sources.append(-1)
    for data in lookalike:
        rows.append(data), buckets.append("lookalike"), sources.append(-1)
    table = pa.table({"sample_id": [f"{kind}/{b}/{i:06d}" for i, b in enumerate(buckets)],
                      "image": pa.array(rows, pa.binary())})
    return Bench(kind, eval_set, table, np.asarray(buckets), np.asarray(sources))


def clipart_bench(path: Path, split: str, n_eval: int, n_distinct: int, per_family: int) -> Bench:
    table = pq.read_table(path, columns=["id", "category", "image"])
    ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
    groups = clipart_groups(ids, images)
    in_split = np.array([(_stable(str(g), "split") % 2 == 0) == (split == "tune") for g in groups])
    eval_side = np.array([_stable(str(g), "side") % 2 == 0 for g in groups])
    rng = np.random.default_rng(0 if split == "tune" else 1)
    pool = np.flatnonzero(in_split & eval_side)
    # At most 60% of the pool: the rest of the chosen images' groups are the look-alikes.
    chosen = np.sort(rng.choice(pool, size=min(n_eval, int(0.6 * len(pool))), replace=False))
    chosen_groups = set(groups[chosen].tolist())
    rest = np.setdiff1d(pool, chosen)
    lookalike = [i for i in rest if groups[i] in chosen_groups]
    distinct_pool = np.flatnonzero(in_split & ~eval_side)
    distinct = rng.choice(distinct_pool, size=min(n_distinct, len(distinct_pool)), replace=False)
    eval_digests = {copy_features_from_bytes(images[i]).rgb_sha256 for i in chosen}
    # A look-alike with the very pixels of an eval image is a copy under another name: "identical".
    look_rows, identical_rows = [], []
    for i in lookalike:
        (identical_rows if copy_features_from_bytes(images[i]).rgb_sha256 in eval_digests else look_rows).append(i)
    categories = sorted(set(table.column("category").to_pylist()))
    labels = np.array([categories.index(c) for c in table.column("category").to_pylist()])
    es = EvalSet("clipart", categories, (), [ids[i] for i in chosen], [images[i] for i in chosen], labels[chosen])
    bench = _make("clipart", es, [images[i] for i in distinct], [images[i] for i in look_rows[:n_distinct]],
                  per_family, rng)
    if identical_rows:
        extra = pa.table({"sample_id": [f"clipart/renamed/{k:06d}" for k in range(len(identical_rows))],
                          "image": pa.array([images[i] for i in identical_rows], pa.binary())})
        bench.candidates = pa.concat_tables([bench.candidates, extra])
        bench.bucket = np.r_[bench.bucket, np.full(len(identical_rows), "identical")]
        bench.source = np.r_[bench.source, np.full(len(identical_rows), -1)]
    return bench


def fashion_bench(split: str, n_eval: int, n_distinct: int, per_family: int) -> Bench:
    def half(s: EvalSet, salt: str, limit: int) -> EvalSet:
        keep = [i for i, x in enumerate(s.ids) if (_stable(x, salt) % 2 == 0) == (split == "tune")][:limit]
        return EvalSet(s.name, s.classes, (), [s.ids[i] for i in keep], [s.images[i] for i in keep], s.labels[keep])

    test = half(load_eval_set(EvalSetConfig(name="fashion-mnist", kind="fashion-mnist", split="test")), "test", n_eval)
    train = half(load_eval_set(EvalSetConfig(name="fashion-train", kind="fashion-mnist", split="train"),
                               max_images=4 * n_distinct), "train", n_distinct)
    return _make("fashion", test, list(train.images), [], per_family, np.random.default_rng(2 if split == "tune" else 3))


def best_scores(bench: Bench, index: EvalIndex) -> tuple[np.ndarray, float]:
    """Best decision value per candidate (−1: nothing to verify) and the CPU seconds it took.

    The value is the score less the pair's threshold above ``min_score`` (eval images under 32 px need
    ``min_score_small``), so one sweep over the threshold moves both as the defaults do."""
    t = time.process_time()
    table = hash_table(bench.candidates)
    pairs = candidate_scores(table, index)
    p = index.params
    value = pairs["score"] - (pair_thresholds(pairs, p["min_score"], p["min_score_small"]) - p["min_score"])
    value[pairs["identical"]] = 1.0
    best = np.full(table.num_rows, -1.0, np.float32)
    np.maximum.at(best, pairs["row"], value)
    return best, time.process_time() - t


def phash_distances(bench: Bench) -> tuple[np.ndarray, float]:
    """Naive pHash: each candidate's Hamming distance to its nearest eval image, and the CPU
    seconds the candidates' decode + pHash took (the lookup is left out: it favours pHash)."""
    def codes(images: list[bytes]) -> np.ndarray:
        out = []
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                out.append(hash_code(im.convert("L")))
        return np.asarray(out, np.uint64)

    ev = codes(bench.eval_set.images)
    t = time.process_time()
    cand = codes(bench.candidates.column("image").to_pylist())
    cpu = time.process_time() - t
    return np.array([int(np.bitwise_count(c ^ ev).min()) for c in cand]), cpu


def rates(hit: np.ndarray, bucket: np.ndarray) -> dict[str, float]:
    out = {f: float(hit[bucket == f].mean()) for f in (*FAMILIES, "identical", "distinct", "lookalike")
           if (bucket == f).any()}
    out["recall"] = float(hit[np.isin(bucket, FAMILIES)].mean())
    return out


def at_fp(hits_by_threshold: list[tuple[float, dict]]) -> tuple[float, dict] | None:
    """The operating point of highest recall whose FP rate (distinct) is ≤ FP_TARGET."""
    ok = [(t, r) for t, r in hits_by_threshold if r["distinct"] <= FP_TARGET]
    return max(ok, key=lambda x: x[1]["recall"]) if ok else None


def line(name: str, r: dict) -> str:
    fams = " ".join(f"{f}={r[f]:.2f}" for f in FAMILIES)
    extra = f" lookalike_fp={r['lookalike']:.3f}" if "lookalike" in r else ""
    return (f"{name}: recall={r['recall']:.3f} fp={r['distinct']:.4f}{extra} identical={r.get('identical', 1):.2f} | "
            f"{fams}")


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5))
    for ax, (kind, (ours, phash)) in zip(np.atleast_1d(axes), curves.items()):
        for label, pts, style in (("copy detector (threshold on score)", ours, "-o"), ("naive pHash (radius)", phash, "--s")):
            ax.plot([r["distinct"] for _, r in pts], [r["recall"] for _, r in pts], style, ms=3, label=label)
        ax.axvline(FP_TARGET, color="grey", lw=0.8)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlim(0, 1)
        ax.set_xlabel("false-positive rate (distinct images dropped)")
        ax.set_ylabel("recall (altered copies found)")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--openclipart", type=Path, default=None, help="Openclipart table (default: the bundled sample)")
    ap.add_argument("--split", choices=("tune", "heldout"), default="tune")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--distinct", type=int, default=2000)
    ap.add_argument("--per-family", type=int, default=150)
    ap.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE)
    ap.add_argument("--min-score-small", type=float, default=DEFAULT_MIN_SCORE_SMALL)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.eval, args.distinct, args.per_family = 400, 500, 30
    path = args.openclipart or SAMPLE_PATH
    plot_path = args.plot or Path("runs/bench") / f"dedup_quality_{args.split}.png"
    thresholds = sorted({*np.round(np.arange(0.80, 1.0001, 0.005), 4).tolist(), args.min_score})
    curves, summary = {}, {}
    for kind in ("clipart", "fashion"):
        t0 = time.perf_counter()
        bench = (clipart_bench(path, args.split, args.eval, args.distinct, args.per_family) if kind == "clipart"
                 else fashion_bench(args.split, args.eval, args.distinct, args.per_family))
        counts = {b: int((bench.bucket == b).sum()) for b in ("distinct", "lookalike", "identical")}
        print(f"# {kind} split={args.split}: eval={len(bench.eval_set)} copies={int(np.isin(bench.bucket, FAMILIES).sum())} "
              f"distinct={counts['distinct']} lookalike={counts['lookalike']} identical={counts['identical']} "
              f"({path.name if kind == 'clipart' else 'Fashion-MNIST test/train'}, set-up {time.perf_counter() - t0:.0f}s)",
              flush=True)
        index = EvalIndex.build([bench.eval_set], min_score=args.min_score, min_score_small=args.min_score_small)
        best, cpu = best_scores(bench, index)
        ours = [(t, rates(best >= t, bench.bucket)) for t in thresholds]
        dist, phash_cpu = phash_distances(bench)
        n = bench.candidates.num_rows
        print(f"# {kind}: cost per candidate, one core: copy detector {1e3 * cpu / n:.2f} ms (decode, pHash + copy "
              f"features, lookup, verification) vs pHash alone {1e3 * phash_cpu / n:.2f} ms (decode + pHash)", flush=True)
        phash = [(r, rates(dist <= r, bench.bucket)) for r in range(0, 33)]
        default = dict(ours)[args.min_score]
        print(line(f"{kind} copy detector, default min_score={args.min_score} (eval images under 32 px: "
                   f"{args.min_score_small})", default))
        best_ours, best_phash = at_fp(ours), at_fp(phash)
        if best_ours:
            shift = best_ours[0] - args.min_score
            print(line(f"{kind} copy detector at FP<=1% (min_score={best_ours[0]:.3f}, eval under 32 px "
                       f"{args.min_score_small + shift:.3f})", best_ours[1]))
        if best_phash:
            print(line(f"{kind} naive pHash at FP<=1% (radius {best_phash[0]})", best_phash[1]))
        for t, r in ours[::4]:
            print(f"  curve {kind} min_score={t:.3f}: recall={r['recall']:.3f} fp={r['distinct']:.4f}"
                  + (f" lookalike_fp={r['lookalike']:.3f}" if "lookalike" in r else ""))
        curves[kind] = (ours, phash)
        summary[kind] = (default, best_ours[1] if best_ours else None, best_phash[1] if best_phash else None)
    plot(curves, plot_path)
    ours_r = np.mean([s[1]["recall"] if s[1] else 0.0 for s in summary.values()])
    phash_r = np.mean([s[2]["recall"] if s[2] else 0.0 for s in summary.values()])
    default_r = np.mean([s[0]["recall"] for s in summary.values()])
    default_fp = max(s[0]["distinct"] for s in summary.values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# curve: {plot_path}  peak RSS {rss:.0f} MiB")
    print(f"dedup quality (clip art + Fashion-MNIST, split={args.split}): default min_score={args.min_score} "
          f"recall={default_r:.3f} fp<={default_fp:.4f}; at FP<=1% recall={ours_r:.3f} vs naive pHash "
          f"recall={phash_r:.3f} ratio={ours_r / max(phash_r, 1e-9):.2f}")


if __name__ == "__main__":
    main()
