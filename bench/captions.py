"""Captions of a build vs its title-only twin: rows kept, distinct captions, boilerplate share.

Reads the Openclipart table as read (every image's title) and two built datasets of it — the
baseline (captions: the title alone, no boilerplate detection) and ours (composed captions with
the named patterns and the repeated-caption count) — and prints, for each: rows, distinct
captions (normalised as the count normalises them), the share of rows whose caption is on at least
``--min-images`` different images of that set (different by pixels: the bytes digest as read, the
perceptual hash in the outputs) and the share caught by a named pattern; then ours' most repeated
captions as its report gives them (what happened to each). Last line: distinct captions per row,
ours ÷ baseline (``ratio=``, higher is better).

    .venv/bin/python bench/captions.py --table runs/sources/openclipart_full.parquet \\
        --baseline runs/h9-title/dataset --ours runs/h9-composed/dataset
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402


def caption_stats(captions: list[str | None], images: list[object], min_images: int) -> dict:
    from infra.config import CAPTION_PATTERNS
    from tasks.captions import apply_patterns, normalise

    seen: dict[str, set] = defaultdict(set)
    values = [normalise(c) if c else "" for c in captions]
    for v, img in zip(values, images):
        seen[v].add(img)
    repeated = sum(1 for v in values if len(seen[v]) >= min_images)
    patterned = sum(1 for c in captions if c and apply_patterns(c, CAPTION_PATTERNS)[1] is not None)
    n = len(captions)
    return {"rows": n, "distinct": len(seen), "repeated": repeated / max(n, 1), "patterned": patterned / max(n, 1)}


def dataset_rows(root: Path) -> tuple[list[str | None], list[object]]:
    captions: list[str | None] = []
    images: list[object] = []
    for part in sorted((root / "shards").glob("part-*.parquet")):
        t = pq.read_table(part, columns=["caption", "phash"])
        captions += t.column("caption").to_pylist()
        images += t.column("phash").to_pylist()
    return captions, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, required=True, help="the Openclipart table the builds read")
    ap.add_argument("--baseline", type=Path, required=True, help="dataset root of the title-only build")
    ap.add_argument("--ours", type=Path, required=True, help="dataset root of the composed build")
    ap.add_argument("--min-images", type=int, default=20)
    args = ap.parse_args()

    from infra.openclipart import is_heldout

    t = pq.read_table(args.table, columns=["id", "title", "image"])
    keep = [not is_heldout(i) for i in t.column("id").to_pylist()]
    titles = [x for x, k in zip(t.column("title").to_pylist(), keep) if k]
    digests = [hashlib.blake2b(b, digest_size=8).digest() for b, k in zip(t.column("image").to_pylist(), keep) if k]
    sets = {"as read (title, training ids)": caption_stats(titles, digests, args.min_images),
            "baseline: title-only build": caption_stats(*dataset_rows(args.baseline), args.min_images),
            "ours: composed build": caption_stats(*dataset_rows(args.ours), args.min_images)}
    print(f"| set | rows | distinct captions | on >= {args.min_images} different images | named pattern |")
    print("|---|---:|---:|---:|---:|")
    for name, s in sets.items():
        print(f"| {name} | {s['rows']:,} | {s['distinct']:,} | {s['repeated']:.1%} | {s['patterned']:.1%} |")
    report = args.ours / "reports" / "repeated_captions.parquet"
    if report.exists():
        print("\nours: the most repeated captions of the source (different images) and what happened to them")
        print("| # | caption | rows | images | boilerplate | what the rows got instead | rows recaptioned | images by hash in the output |")
        print("|---:|---|---:|---:|---|---|---:|---:|")
        for r in pq.read_table(report).to_pylist():
            print(f"| {r['rank']} | {r['caption'][:70]} | {r['rows']:,} | {r['images']:,} | {'yes' if r['boilerplate'] else 'no'} "
                  f"| {r['outcome']} | {r['rows_out'] if r['rows_out'] is not None else '-'} | {r['images_by_hash']} |")
    base, ours = sets["baseline: title-only build"], sets["ours: composed build"]
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    print(f"captions: ours distinct/row={ours['distinct'] / max(ours['rows'], 1):.3f} baseline distinct/row="
          f"{base['distinct'] / max(base['rows'], 1):.3f} ratio="
          f"{(ours['distinct'] / max(ours['rows'], 1)) / max(base['distinct'] / max(base['rows'], 1), 1e-9):.2f}")


if __name__ == "__main__":
    main()
