"""Peak RSS of a process that builds the English filter (``TextFilter(TextFilterConfig())``) and
checks a few captions, so every word list, table and model it needs is loaded: what one worker holds.

    .venv/bin/python bench/text_filter_memory.py [--languages it fr es pt de nl] [--no-neutral-lid]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--languages", nargs="*", help="foreign_languages instead of the default")
    ap.add_argument("--no-neutral-lid", action="store_true", help="neutral_lid_languages: [] (no lingua)")
    args = ap.parse_args()
    from infra.config import TextFilterConfig
    from tasks.text_filter import TextFilter

    cfg = TextFilterConfig()
    if args.languages is not None:
        cfg = replace(cfg, foreign_languages=tuple(args.languages))
    if args.no_neutral_lid:
        cfg = replace(cfg, neutral_lid_languages=())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    tf = TextFilter(cfg)
    for caption in ("a red apple", "tandborste", "Cani e gatti, Cat and dog", "ampelmaennchen", "Extremadura",
                    "llosgfynydd"):
        tf.check(caption)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"text_filter_memory: {len(cfg.foreign_languages)} foreign_languages ({' '.join(cfg.foreign_languages)}), "
          f"neutral_lid_languages ({' '.join(cfg.neutral_lid_languages) or 'none'}): "
          f"peak RSS {peak / 1024:,.0f} MiB (ru_maxrss; {before / 1024:,.0f} MiB after imports); "
          f"built in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
