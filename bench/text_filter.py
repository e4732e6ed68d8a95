"""The whole text stage (filters + English policy + query match) vs langdetect alone, captions/s/core.

Input: the bundled Openclipart sample as the readers give it (titles as captions, held-out ids
left out); queries: the demo query list (runs/demo/queries/queries.parquet, or --queries; without
one, a stand-in of pywordfreq unigrams with count >= 100 is built). Both sides run in this one
process, single-threaded, on the same captions, in the same run, interleaved; rates are per
CPU-second of the process (captions/s/core), so a busy machine does not skew them. Also printed: langdetect-rs's agreement
with langdetect, the English policy on the hand-labelled titles, and the stage's funnel on the sample
with examples per drop reason.

    .venv/bin/python bench/text_filter.py [--quick] [--queries PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core for langdetect-rs too
os.environ.setdefault("WITFLOW_PROGRESS", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

SAMPLE = REPO / "infra" / "data" / "openclipart_sample.parquet"
DEMO_QUERIES = REPO / "runs" / "demo" / "queries" / "queries.parquet"
LABELS = REPO / "infra" / "data" / "openclipart_lang_labels.tsv"


def load_candidates() -> pa.Table:
    try:
        from infra.config import SourceConfig
        from tasks.readers import plan_input_shards, read_input_shard

        shards = plan_input_shards([SourceConfig(kind="openclipart", path=str(SAMPLE), rows_per_input_shard=100_000)])
        return pa.concat_tables([read_input_shard(s) for s in shards])
    except ImportError:  # readers not there: the titles straight from the sample
        t = pq.read_table(SAMPLE, columns=["id", "title"])
        return pa.table({"sample_id": t.column("id"), "caption": t.column("title")})


def load_queries(path: str | None) -> tuple[pa.Table, str]:
    p = Path(path) if path else DEMO_QUERIES
    if p.exists():
        return pq.read_table(p), str(p.relative_to(REPO) if p.is_relative_to(REPO) else p)
    from infra.funnel import Funnel
    from tasks.queries.counts import read_pywordfreq_counts
    from tasks.queries.merge import build_query_table
    from tasks.queries.unigrams import select_unigrams

    table, _ = build_query_table({"unigram": select_unigrams(read_pywordfreq_counts(), 100, Funnel())})
    return table, "stand-in: pywordfreq unigrams >= 100"


def cpu_seconds(fn) -> float:
    # CPU time of this process: captions per CPU-second is captions/s/core, and it does not
    # depend on how busy the (shared) machine is. Both sides are single-threaded.
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer captions for the baseline, one repeat")
    ap.add_argument("--queries", help="queries.parquet (default: the demo's)")
    args = ap.parse_args()

    from infra.config import TextFilterConfig
    from tasks.query_match import QueryMatcher
    from tasks.step import run_steps
    from tasks.text_filter import (NOT_ENGLISH, EnglishVocab, LanguageDetector, TextFilter, clean_caption,
                                   english_verdict, reason_examples)

    candidates = load_candidates()
    queries, queries_name = load_queries(args.queries)
    cfg = TextFilterConfig()
    t0 = time.perf_counter()
    vocab = EnglishVocab.load(cfg.wordnet_dir, cfg.vocab_min_count)
    # The build's text steps (tasks/build/jobs.py filter_shard): text filters, then the query match.
    text_filter, matcher = TextFilter(cfg, vocab), QueryMatcher(queries)
    steps = [text_filter, matcher]
    matcher.automaton  # noqa: B018 - built once per worker, not per batch: not timed
    setup_s = time.perf_counter() - t0
    captions = candidates.column("caption").to_pylist()
    table = candidates.select(["sample_id", "caption"])
    n = table.num_rows
    repeats = 2 if args.quick else 3
    print(f"captions: {n} (Openclipart sample titles); queries: {queries.num_rows} ({queries_name}); "
          f"worker setup {setup_s:.1f}s (vocabulary, detector, automaton)")

    def ours() -> None:
        vocab._cache.clear()  # a cold word cache each time: no help from the previous pass
        run_steps(table, steps)

    import langdetect
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
    from langdetect.lang_detect_exception import LangDetectException

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(cfg.language_seed)
    base_n = min(n, 300) if args.quick else n
    base_texts = [c or "" for c in captions[:base_n]]

    def langdetect_alone() -> None:
        for text in base_texts:
            d = factory.create()
            d.append(text)
            try:
                d.detect()
            except LangDetectException:
                pass

    ours_best = base_best = float("inf")
    for _ in range(repeats):  # interleaved, best of each
        ours_best = min(ours_best, cpu_seconds(ours))
        base_best = min(base_best, cpu_seconds(langdetect_alone))
    ours_rate, base_rate = n / ours_best, base_n / base_best

    # langdetect-rs: the same answers? (every title of the sample, full probability lists)
    py, rs = LanguageDetector("langdetect", cfg.language_seed), LanguageDetector("langdetect-rs", cfg.language_seed)
    texts = sorted({clean_caption(c) for c in captions if c})
    t0 = time.process_time()
    rs_out = [rs.detect_langs(t) for t in texts]
    rs_rate = len(texts) / (time.process_time() - t0)
    py_out = [py.detect_langs(t) for t in texts] if not args.quick else None
    if py_out is not None:
        same_top = sum((a[:1] or [("",)])[0][0] == (b[:1] or [("",)])[0][0] for a, b in zip(py_out, rs_out))
        same_all = sum(a == b for a, b in zip(py_out, rs_out))
        print(f"langdetect-rs vs langdetect ({langdetect.__name__} 1.0.9), {len(texts)} distinct titles: "
              f"same top language {same_top}/{len(texts)}, identical probability lists {same_all}/{len(texts)}; "
              f"langdetect-rs {rs_rate:,.0f} captions/s")

    # the English policy on the hand-labelled titles
    tp = fp = fn = tn = det_tp = 0
    for line in LABELS.read_text(encoding="utf-8").splitlines()[1:]:
        if line.startswith("#") or line.startswith("title\t"):
            continue
        title, lang, part = line.split("\t")[:3]
        if not part.startswith("tuning"):  # fresh parts: scored by bench/language_id.py, apart
            continue
        cleaned, reason = text_filter.check(title)
        if lang == "neutral" or reason not in (None, NOT_ENGLISH):
            continue
        keep = reason is None
        tp, fp = tp + (keep and lang == "en"), fp + (keep and lang != "en")
        fn, tn = fn + (not keep and lang == "en"), tn + (not keep and lang != "en")
        if lang == "en":
            top = rs.detect_langs(clean_caption(title))
            det_tp += bool(top) and top[0][0] == "en"
    print(f"English policy on {tp + fp + fn + tn} labelled titles: precision {tp / (tp + fp):.3f} recall "
          f"{tp / (tp + fn):.3f}; other-language titles dropped {tn}/{tn + fp}; langdetect alone recall "
          f"{det_tp / (tp + fn):.3f}")

    # the funnel on the sample, with examples
    funnel = run_steps(table, steps).funnel
    reasons = text_filter.reasons(captions)
    kept_text = [c for c, r in zip(captions, reasons) if r is None]
    unmatched = [c for c, ids in zip(kept_text, matcher.match([clean_caption(c) for c in kept_text]).to_pylist())
                 if not ids]
    detector_calls = sum(english_verdict(clean_caption(c), vocab, text_filter.detector, cfg).decided_by == "detector"
                         for c, r in zip(captions, reasons) if r in (None, NOT_ENGLISH))
    print(funnel.to_markdown())
    examples = reason_examples(captions, reasons, per_reason=6)
    examples["no_query_match"] = list(dict.fromkeys(unmatched))[:6]
    for reason, ex in examples.items():
        print(f"  {reason}: " + " | ".join(repr(e) for e in ex))
    print(f"detector calls: {detector_calls} of {n} captions (the rest decided by the vocabulary or earlier filters)")
    print(f"langdetect alone: {base_rate:,.0f} captions/s/core ({base_n} captions)")
    print(f"text stage (filters + English + query match, {queries.num_rows} queries): {ours_rate:,.0f} captions/s/core "
          f"({n} captions)")
    if not args.quick:  # what `witflow plan` projects the text stage from
        sys.path.insert(0, str(REPO / "bench"))
        from rates import record

        record("text_stage", ours_rate, "candidates/s/core",
               f"bench/text_filter.py: filters + English + query match ({queries.num_rows} queries), one core")
    print(f"text_filter: ours={ours_rate:,.0f} captions/s/core langdetect={base_rate:,.0f} captions/s/core "
          f"ratio={ours_rate / base_rate:.1f}")


if __name__ == "__main__":
    main()
