"""Unigram queries: words with a count at or above the threshold."""

from __future__ import annotations

from collections import Counter
from typing import Mapping

from infra.funnel import Funnel
from tasks.queries.counts import read_unigram_counts
from tasks.queries.dump_counts import DumpCounts
from tasks.queries.normalize import select_at_least
from tasks.queries.source import SourceResult


def select_unigrams(counts: Mapping[str, int], min_count: int, funnel: Funnel) -> dict[str, int]:
    """Unigram queries: normalised words (case variants summed) with count >= ``min_count``."""
    return select_at_least(counts, min_count, "unigram", "below_min_count", funnel)


def unigram_source(dump_counts: DumpCounts | None, unigram_counts: str | None, min_count: int) -> SourceResult:
    """Unigram candidates, counted from the dumps when there are any, else read from
    ``unigram_counts`` ("pywordfreq" or a counts file); neither: skipped, with a warning."""
    funnel, stats = Funnel(), Counter()
    res = SourceResult("unigram", {})
    if dump_counts is not None:
        counts = dump_counts.unigrams()
        res.report["input"] = "wikipedia_dumps"
        if unigram_counts:
            res.warnings.append(f"unigram_counts {unigram_counts!r} not used: counted from wikipedia_dumps")
    elif unigram_counts:
        counts, res.inputs = read_unigram_counts(unigram_counts, stats)
        res.report["input"] = unigram_counts
    else:
        res.warnings.append("unigrams skipped: no unigram_counts and no wikipedia_dumps")
        return res
    res.entries = select_unigrams(counts, min_count, funnel)
    res.report.update({"min_count": min_count, "read": dict(stats), "funnel": funnel.to_dict()})
    return res
