"""Merge the sources into the query table, under a budget.

The union of all sources is cut to ``max_queries`` in a fixed priority order
(:data:`DEFAULT_PRIORITY`: WordNet, then unigrams by count, bigrams by PMI, titles by views — the
order MetaCLIP merges its sources in); within a source, higher count/PMI/views first, ties by the
query string. A query found in several sources is attributed to the first source in that order, and
its row carries every value known for it (``count`` from the unigram or bigram counts, ``pmi``,
``views``). ``query_id`` is the rank of the query in the sorted (code point order) final list, so the
same inputs always give the same ids.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa

from infra.funnel import Funnel
from infra.schema import QUERY_SCHEMA, SCHEMA_VERSION
from tasks.queries.normalize import normalize_entries

SOURCES = ("wordnet", "unigram", "bigram", "title")
DEFAULT_PRIORITY: tuple[str, ...] = ("wordnet", "unigram", "bigram", "title")


def build_query_table(sources: Mapping[str, Mapping[str, Any]], *, max_queries: int = 500_000,
                      priority: Sequence[str] = DEFAULT_PRIORITY) -> tuple[pa.Table, dict]:
    """Merge per-source candidates into the query table (QUERY_SCHEMA) and its report.

    ``sources``: ``{"unigram": {q: count}, "bigram": {q: (count, pmi)}, "title": {q: views},
    "wordnet": {q: None}}`` (any subset; keys are re-normalised, which is idempotent). Dedupe,
    budget and ids as in the module docstring. The report has, per source: candidates, selected
    (attributed to it), already taken by an earlier source, and cut by the budget.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown query sources {sorted(unknown)} (known: {list(SOURCES)})")
    bad_priority = [s for s in priority if s not in SOURCES]
    if bad_priority or len(set(priority)) != len(priority):
        raise ValueError(f"priority {list(priority)}: each of {list(SOURCES)} at most once")
    funnel = Funnel()
    merge_fns: dict[str, Callable[[Any, Any], Any]] = {
        "bigram": lambda a, b: (a[0] + b[0], max(a[1], b[1])),
        "wordnet": lambda a, b: None,
    }
    normed = {s: normalize_entries(entries, f"renormalise_{s}", funnel, merge_fns.get(s))
              for s, entries in sources.items()}

    def rank_key(source: str) -> Callable[[tuple[str, Any]], tuple]:
        if source == "bigram":
            return lambda kv: (-kv[1][1], kv[0])
        if source == "wordnet":
            return lambda kv: (kv[0],)
        return lambda kv: (-kv[1], kv[0])

    chosen: dict[str, str] = {}
    report: dict[str, Any] = {"sources": {}, "max_queries": max_queries, "priority": list(priority)}
    order = [s for s in priority if s in normed] + sorted(s for s in normed if s not in priority)
    for source in order:
        entries = normed[source]
        taken_before = cut = selected = 0
        for query, _ in sorted(entries.items(), key=rank_key(source)):
            if query in chosen:
                taken_before += 1
            elif len(chosen) >= max_queries:
                cut += 1
            else:
                chosen[query] = source
                selected += 1
        report["sources"][source] = {"candidates": len(entries), "selected": selected,
                                     "already_in_list": taken_before, "cut_by_budget": cut}
    queries = sorted(chosen)
    uni, bi, ti = normed.get("unigram", {}), normed.get("bigram", {}), normed.get("title", {})
    counts = [uni.get(q, bi[q][0] if q in bi else None) for q in queries]
    table = pa.Table.from_arrays([
        pa.array(range(len(queries)), pa.int32()),
        pa.array(queries, pa.string()),
        pa.array([chosen[q] for q in queries], pa.string()),
        pa.array(counts, pa.int64()),
        pa.array([bi[q][1] if q in bi else None for q in queries], pa.float64()),
        pa.array([ti.get(q) for q in queries], pa.int64()),
    ], schema=QUERY_SCHEMA)
    report["total"] = len(queries)
    report["renormalisation"] = funnel.to_dict()
    report["schema_version"] = SCHEMA_VERSION
    return table, report
