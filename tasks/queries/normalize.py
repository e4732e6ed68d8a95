"""Query normalisation, applied to every entry of every source.

1. HTML entities decoded (``r&amp;b`` -> ``r&b``), Unicode NFKC, ``’`` -> ``'``;
2. underscores become spaces (WordNet lemma names, page titles), lower-cased, runs of whitespace
   collapsed to one space;
3. dropped, with the reason counted: ``markup`` (any of ``< > [ ] { } | =`` before stripping:
   remnants of wikitext/HTML), ``unprintable`` (control characters);
4. dropped: ``empty``; ``punctuation_only`` (no letter, no digit); ``numeric`` (digits but no
   letter: ``1990``, ``1,000``, ``3.5`` — numbers are not visual concepts and would match nearly
   every caption; MetaCLIP keeps 0..99, we do not);
5. brackets, quotes, commas and similar stripped from both ends (``"(foo)"`` -> ``foo``;
   ``.`` ``-`` ``+`` ``#`` ``&`` stay: ``e.g.``, ``c++``, ``c#``, ``at&t``); dropped if then
   ``too_long`` (over 256 characters, as MetaCLIP).

Entries that normalise to the same string are merged (counts and views summed, PMI maximum).
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

from infra.funnel import Funnel

MAX_QUERY_CHARS = 256

_WS = re.compile(r"\s+")
_MARKUP_CHARS = re.compile(r"[<>\[\]{}|=]")
_EDGE_CHARS = " \"'`“”‘’«»()[]{},;:!?*~^"


def normalize_query(text: str) -> tuple[str | None, str | None]:
    """``(normalised, None)`` or ``(None, drop_reason)``; the rules are in the module docstring."""
    s = html.unescape(text) if "&" in text else text
    s = unicodedata.normalize("NFKC", s).replace("’", "'").replace("_", " ").lower()
    s = _WS.sub(" ", s)
    if _MARKUP_CHARS.search(s):
        return None, "markup"
    if not s.isprintable():
        return None, "unprintable"
    s = s.strip()
    if not s:
        return None, "empty"
    if not any(c.isalpha() for c in s):
        return None, "numeric" if any(c.isdigit() for c in s) else "punctuation_only"
    s = s.strip(_EDGE_CHARS)  # cannot empty it: a letter is never an edge character
    if len(s) > MAX_QUERY_CHARS:
        return None, "too_long"
    return s, None


def normalize_entries(entries: Mapping[str, Any] | Iterable[str], stage: str, funnel: Funnel,
                      merge: Callable[[Any, Any], Any] | None = None) -> dict[str, Any]:
    """Normalise the keys of ``entries`` (a mapping key -> value, or plain strings with value None).

    Keys that normalise to the same query are merged with ``merge`` (default: sum); drops are
    counted in ``funnel`` under ``stage`` by reason.
    """
    items = entries.items() if isinstance(entries, Mapping) else ((k, None) for k in entries)
    out: dict[str, Any] = {}
    reasons: Counter = Counter()
    seen = 0
    merge = merge or (lambda a, b: a + b if a is not None and b is not None else a)
    for raw, value in items:
        seen += 1
        query, reason = normalize_query(raw)
        if query is None:
            reasons[reason] += 1
        elif query in out:
            out[query] = merge(out[query], value)
        else:
            out[query] = value
    merged = seen - sum(reasons.values()) - len(out)
    funnel.record(stage, seen, len(out), reasons.elements())
    if merged:
        funnel.stage(stage).dropped["merged_duplicate"] += merged
    return out


def select_at_least(counts: Mapping[str, int], minimum: int, source: str, reason: str,
                    funnel: Funnel) -> dict[str, int]:
    """Normalised entries (variants summed) whose summed value is >= ``minimum``; the rest counted."""
    normed = normalize_entries(counts, source, funnel)
    out = {q: n for q, n in normed.items() if n >= minimum}
    st = funnel.stage(source)
    st.dropped[reason] += len(normed) - len(out)
    st.rows_out = len(out)
    return out
