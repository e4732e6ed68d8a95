"""Bigram queries: word pairs with a high pointwise mutual information."""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Mapping

from infra.funnel import Funnel
from tasks.queries.counts import read_counts_file, read_unigram_counts, read_wordsegment_counts
from tasks.queries.dump_counts import DumpCounts
from tasks.queries.normalize import normalize_entries
from tasks.queries.source import SourceResult, input_record


def pmi(bigram_count: int, count_a: int, count_b: int, total_tokens: int) -> float:
    """Pointwise mutual information in bits: ``log2( p(a,b) / (p(a) p(b)) )``.

    With ``p(a,b) = c(a,b) / N``, ``p(a) = c(a) / N``, ``p(b) = c(b) / N`` and ``N`` the corpus's
    token count (a corpus of N tokens has N-1 bigram positions; the difference is negligible):
    ``PMI = log2( c(a,b) * N / (c(a) * c(b)) )``. 0 means "as often as chance"; +1 twice as often.

    Why bits and what MetaCLIP's 30 means: MetaCLIP reports "PMI >= 30" but its public code does
    not show the computation. On a log scale 30 is almost unreachable (PMI <= log(N / c(a,b)):
    with N ~ 4e9 enwiki tokens, ln PMI <= 22 and log2 PMI >= 30 needs a pair whose words occur
    only a handful of times), so 30 is read here as the plain ratio p(a,b)/(p(a)p(b)) >= 30, i.e.
    ``log2(30) = 4.907`` bits, the default ``queries.bigram_min_pmi``.
    """
    return math.log2(bigram_count * total_tokens / (count_a * count_b))


def pmi_bigrams(bigrams: Mapping[str, int] | Iterable[tuple[str, int]], unigrams: Mapping[str, int],
                total_tokens: int, min_count: int, min_pmi: float, funnel: Funnel) -> dict[str, tuple[int, float]]:
    """Bigram queries ``"a b" -> (count, pmi)``: count >= ``min_count`` and :func:`pmi` >= ``min_pmi``.

    ``bigrams`` keys are ``"a b"`` in the corpus's token form (as ``unigrams`` keys); a bigram whose
    words are missing from ``unigrams`` is dropped (``unknown_unigram``).
    """
    items = bigrams.items() if isinstance(bigrams, Mapping) else bigrams
    raw: dict[str, tuple[int, float]] = {}
    reasons: Counter = Counter()
    seen = 0
    for key, n in items:
        seen += 1
        if n < min_count:
            reasons["below_min_count"] += 1
            continue
        parts = key.split(" ")
        if len(parts) != 2:
            reasons["not_two_words"] += 1
            continue
        ca, cb = unigrams.get(parts[0]), unigrams.get(parts[1])
        if not ca or not cb:
            reasons["unknown_unigram"] += 1
            continue
        score = pmi(n, ca, cb, total_tokens)
        if score < min_pmi:
            reasons["below_min_pmi"] += 1
            continue
        raw[key] = (n, score)
    funnel.record("bigram_pmi", seen, len(raw), reasons.elements())
    return normalize_entries(raw, "bigram", funnel, merge=lambda a, b: (a[0] + b[0], max(a[1], b[1])))


def bigram_source(dump_counts: DumpCounts | None, *, bigram_counts: str | None, bigram_unigram_counts: str | None,
                  unigram_counts: str | None, total_tokens: int | None, min_count: int,
                  min_pmi: float) -> SourceResult:
    """Bigram candidates with PMI computed within one corpus: the dumps when there are any; else
    ``bigram_counts`` ("wordsegment", or a counts file whose unigram counts are
    ``bigram_unigram_counts`` or ``unigram_counts`` and whose token total is ``total_tokens`` or
    their sum); neither: skipped, with a warning."""
    funnel, stats = Funnel(), Counter()
    res = SourceResult("bigram", {})
    bigrams: Mapping[str, int] | Iterable[tuple[str, int]]
    if dump_counts is not None:
        unigrams, bigrams, total = dump_counts.unigrams(), dump_counts.iter_bigrams(), dump_counts.total_tokens
        res.report["input"] = "wikipedia_dumps"
    elif bigram_counts == "wordsegment":
        src = read_wordsegment_counts(stats)
        unigrams, bigrams, total = src.unigrams, src.bigrams, src.total_tokens
        res.inputs = [input_record(f) for f in src.files]
        res.report["input"] = "wordsegment (Google Web 1T bigram/unigram counts; not Wikipedia)"
    elif bigram_counts:
        ref = bigram_unigram_counts or unigram_counts
        if not ref:
            raise ValueError("queries.bigram_counts is a file: PMI needs bigram_unigram_counts (or unigram_counts)")
        bigrams = read_counts_file(bigram_counts, stats)
        unigrams, ref_inputs = read_unigram_counts(ref, Counter())
        total = total_tokens or sum(unigrams.values())
        res.inputs = [input_record(bigram_counts)] + ref_inputs
        res.report["input"] = bigram_counts
        res.report["pmi_unigrams"] = ref
    else:
        res.warnings.append("bigrams skipped: no bigram_counts and no wikipedia_dumps")
        return res
    res.entries = pmi_bigrams(bigrams, unigrams, total, min_count, min_pmi, funnel)
    res.report.update({"min_count": min_count, "min_pmi_bits": min_pmi, "total_tokens": total,
                       "read": dict(stats), "funnel": funnel.to_dict()})
    return res
