"""Precision and recall of eval-set decontamination on Fashion-MNIST.

Eval set: Fashion-MNIST test. Candidates: Fashion-MNIST train images (distinct photos; a few are
genuine near-copies of test images, counted as false positives all the same) mixed with transformed
copies of test images — JPEG re-encoded (q30–90), resized (0.5–2×), cropped (≤5%), brightness-shifted
(±40 grey levels). For each radius r it reports recall (copies dropped), the false-positive rate
(train images dropped) and what each matching step buys: crop variants in the index, low-information
exclusion, pixel verification (NCC of thumbnails, sharp or reduced to the pair's common detail).

    .venv/bin/python bench/dedup_quality.py            # 10k eval, 20k train, 2k copies (several minutes)
    .venv/bin/python bench/dedup_quality.py --quick    # 2k eval, 4k train, 800 copies

The last line is the headline at the default settings (r=4, ncc ≥ 0.98, as configs/demo.yaml):
recall and false-positive rate of the chosen configuration and, as ``ratio``, its precision ÷
plain pHash's precision at the same radius.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.config import EvalSetConfig  # noqa: E402
from infra.eval_sets import load_eval_set  # noqa: E402
from tasks.dedup.eval_index import EvalIndex  # noqa: E402
from tasks.dedup.hashing import hash_table  # noqa: E402
from tasks.dedup.verify import pair_ncc, thumbs_of  # noqa: E402

TRANSFORMS = ("jpeg", "resize", "crop", "brightness")


def transform(png: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """One of the issue's changes, with a random strength."""
    img = Image.open(io.BytesIO(png)).convert("L")
    w, h = img.size
    buf = io.BytesIO()
    if kind == "jpeg":
        img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(30, 91)))
        return buf.getvalue()
    if kind == "resize":
        s = float(rng.uniform(0.5, 2.0))
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    elif kind == "crop":
        f = float(rng.uniform(0.0, 0.05))
        cw, ch = round(w * f), round(h * f)
        x, y = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
        img = img.crop((x, y, w - (cw - x), h - (ch - y)))
    elif kind == "brightness":
        shift = float(rng.uniform(15, 40)) * (1 if rng.random() < 0.5 else -1)
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) + shift, 0, 255).astype(np.uint8))
    img.save(buf, "PNG")
    return buf.getvalue()


def make_candidates(test_set, train_set, n_copies: int, seed: int = 0) -> tuple[pa.Table, np.ndarray, list[str]]:
    """Train images + transformed test copies; returns (table, source eval row per row or -1, kind per row)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(test_set.ids), size=n_copies, replace=False)
    kinds = [TRANSFORMS[i % len(TRANSFORMS)] for i in range(n_copies)]
    copies = [transform(test_set.images[s], k, rng) for s, k in zip(src, kinds)]
    ids = [f"train/{i}" for i in train_set.ids] + [f"copy/{k}/{test_set.ids[s]}" for s, k in zip(src, kinds)]
    table = pa.table({"sample_id": ids, "image": pa.array(list(train_set.images) + copies, pa.binary())})
    source = np.r_[np.full(len(train_set.ids), -1), src]
    return table, source, ["train"] * len(train_set.ids) + kinds


def without_variants(index: EvalIndex) -> EvalIndex:
    keep = index.entry_variant == 0
    return EvalIndex(kind=index.kind, version=index.version + "-novariants", set_names=index.set_names,
                     image_set=index.image_set, image_ids=index.image_ids, image_labels=index.image_labels,
                     image_low_info=index.image_low_info, thumbs=index.thumbs, image_sides=index.image_sides,
                     entry_image=index.entry_image[keep],
                     entry_variant=index.entry_variant[keep], entry_codes=index.entry_codes[keep], params=index.params)


def measure(table: pa.Table, index: EvalIndex, radius: int, use_low_info: bool, use_detail_match: bool = True) -> dict:
    """Candidate pairs with their NCC, before any threshold."""
    codes = table.column(index.kind).to_numpy().astype(np.uint64)
    usable = np.ones(len(codes), bool)
    if use_low_info:
        usable &= ~table.column("low_info").to_numpy(zero_copy_only=False).astype(bool)
    rows = np.flatnonzero(usable)
    qi, img, var, dist = index.lookup(codes[rows], radius)
    rows = rows[qi]
    sides = np.minimum(table.column("min_side").take(pa.array(rows)).to_numpy(), index.image_sides[img])
    ncc = pair_ncc(thumbs_of(table.column("thumb").take(pa.array(rows))), index.thumbs[img], var.astype(np.int64),
                   sides if use_detail_match else None)
    return {"rows": rows, "img": img, "ncc": ncc}


def score(pairs: dict, source: np.ndarray, kinds: np.ndarray, min_ncc: float) -> dict:
    ok = pairs["ncc"] >= min_ncc
    dropped = np.zeros(len(source), bool)
    dropped[pairs["rows"][ok]] = True
    copies, train = source >= 0, source < 0
    tp, fp = int(dropped[copies].sum()), int(dropped[train].sum())
    out = {"recall": dropped[copies].mean(), "fp_rate": dropped[train].mean(),
           "precision": tp / max(tp + fp, 1), "fp": fp}
    for k in TRANSFORMS:
        out[k] = dropped[kinds == k].mean()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eval", type=int, default=10_000)
    ap.add_argument("--train", type=int, default=20_000)
    ap.add_argument("--copies", type=int, default=2_000)
    ap.add_argument("--radii", default="4,6,8")
    ap.add_argument("--chosen-radius", type=int, default=4)
    ap.add_argument("--chosen-ncc", type=float, default=0.98)
    args = ap.parse_args()
    if args.quick:
        args.eval, args.train, args.copies = 2_000, 4_000, 800
    t0 = time.perf_counter()
    test = load_eval_set(EvalSetConfig(name="fashion-mnist", kind="fashion-mnist", split="test"), max_images=args.eval)
    train = load_eval_set(EvalSetConfig(name="fashion-mnist-train", kind="fashion-mnist", split="train"),
                          max_images=args.train)
    table, source, kinds = make_candidates(test, train, args.copies)
    kinds = np.asarray(kinds)
    index = EvalIndex.build([test], "phash")
    plain = without_variants(index)
    table = hash_table(table, "phash")
    print(f"# eval={len(test)} train={len(train)} copies={args.copies} low_info(eval)={int(index.image_low_info.sum())} "
          f"low_info(candidates)={int(np.asarray(table.column('low_info')).sum())} setup={time.perf_counter() - t0:.0f}s")
    header = "config".ljust(48) + "recall  fp_rate  precision  " + "  ".join(k[:6].rjust(6) for k in TRANSFORMS)
    print(header)
    chosen = baseline = None
    for r in [int(x) for x in args.radii.split(",")]:
        steps = [("phash", plain, False, -1.0, False), ("+ crop variants", index, False, -1.0, False),
                 ("+ low-info excluded", index, True, -1.0, False),
                 ("+ verify ncc>=0.98, sharp thumbnails", index, True, 0.98, False)]
        steps += [(f"+ verify ncc>={t}, detail-matched", index, True, t, True) for t in (0.95, 0.97, 0.98, 0.99)]
        cache: dict = {}
        for name, idx, low, t, detail in steps:
            key = (id(idx), low, detail)
            if key not in cache:
                cache[key] = measure(table, idx, r, low, detail)
            s = score(cache[key], source, kinds, t)
            print(f"r={r} {name}".ljust(48) + f"{s['recall']:.4f}  {s['fp_rate']:.4f}   {s['precision']:.4f}     "
                  + "  ".join(f"{s[k]:.3f}".rjust(6) for k in TRANSFORMS))
            if r == args.chosen_radius and name == "phash":
                baseline = s
            if r == args.chosen_radius and abs(t - args.chosen_ncc) < 1e-9 and detail:
                chosen = s
    if chosen is None or baseline is None:
        raise SystemExit("the chosen radius/ncc must be among those measured")
    print(f"dedup quality (Fashion-MNIST, r={args.chosen_radius}, ncc>={args.chosen_ncc}): recall={chosen['recall']:.4f} "
          f"fp_rate={chosen['fp_rate']:.4f} precision={chosen['precision']:.4f} vs pHash alone "
          f"precision={baseline['precision']:.4f} ratio={chosen['precision'] / max(baseline['precision'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
