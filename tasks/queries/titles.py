"""Title queries: Wikipedia article names with enough page views, from pageviews files."""

from __future__ import annotations

import bz2
import gzip
import os
import re
import urllib.parse
from collections import Counter
from typing import Mapping, Sequence

from infra.funnel import Funnel
from tasks.queries.normalize import select_at_least
from tasks.queries.source import SourceResult, input_record

# English Wikipedia namespaces (and their aliases) as they prefix titles: "File:Foo.jpg".
WIKIPEDIA_NAMESPACES = frozenset(n.lower() for n in (
    "Talk", "User", "User talk", "Wikipedia", "Wikipedia talk", "WP", "WT", "Project", "Project talk",
    "File", "File talk", "Image", "Image talk", "Media", "MediaWiki", "MediaWiki talk", "Template",
    "Template talk", "Help", "Help talk", "Category", "Category talk", "Portal", "Portal talk",
    "Draft", "Draft talk", "TimedText", "TimedText talk", "Module", "Module talk", "Special",
    "Gadget", "Gadget talk", "Gadget definition", "Gadget definition talk", "Book", "Book talk",
    "Education Program", "Education Program talk", "Topic", "MOS", "CAT", "T", "H", "P", "MP",
    "Event", "Event talk",
))
# "en" is the desktop site, "en.m" the mobile site: the same articles, so their views are summed.
# Other "en.*" projects (en.b Wikibooks, en.d Wiktionary, en.q, en.s, en.voy, ...) are not Wikipedia.
TITLE_PROJECTS = ("en", "en.m")
_NON_ARTICLES = frozenset({"main page", "-", "search", "undefined", "null"})
_DISAMBIGUATION = re.compile(r"\s*\([^()]*\)$")


def clean_title(title: str) -> tuple[str | None, str | None]:
    """A pageview title as a plain article name, or ``(None, reason)``.

    Percent-escapes decoded, underscores -> spaces; ``namespace`` for titles in a namespace
    (:data:`WIKIPEDIA_NAMESPACES`), ``non_article`` for the main page and placeholders; a trailing
    disambiguator is removed (``Mercury (planet)`` -> ``Mercury``: captions never carry it).
    """
    if "%" in title:
        try:
            title = urllib.parse.unquote(title, errors="strict")
        except UnicodeDecodeError:
            return None, "bad_encoding"
    title = title.replace("_", " ").strip()
    if ":" in title and title.split(":", 1)[0].strip().lower() in WIKIPEDIA_NAMESPACES:
        return None, "namespace"
    if title.lower() in _NON_ARTICLES or not title:
        return None, "non_article"
    stripped = _DISAMBIGUATION.sub("", title)
    return (stripped or title), None


def count_pageviews_file(path: str | os.PathLike, views: Counter, stats: Counter,
                         projects: Sequence[str] = TITLE_PROJECTS) -> None:
    """Add one pageviews file's English-Wikipedia article views to ``views`` (title -> views).

    Lines are ``project title views bytes``. Other projects are skipped; malformed lines
    (wrong field count, non-integer views) are counted as ``bad_line``, not fatal.
    """
    prefixes = tuple(p + " " for p in projects)
    p = str(path)
    opener = gzip.open if p.endswith(".gz") else bz2.open if p.endswith(".bz2") else open
    with opener(p, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stats["lines"] += 1
            if not line.startswith(prefixes):
                stats["other_project"] += 1
                continue
            parts = line.split(" ")
            if len(parts) != 4:
                stats["bad_line"] += 1
                continue
            try:
                n = int(parts[2])
            except ValueError:
                stats["bad_line"] += 1
                continue
            if n < 0:
                stats["bad_line"] += 1
                continue
            title, reason = clean_title(parts[1])
            if title is None:
                stats[reason] += 1
                continue
            views[title] += n


def select_titles(views: Mapping[str, int], min_views: int, funnel: Funnel) -> dict[str, int]:
    """Title queries: normalised titles (variants summed) with summed views >= ``min_views``."""
    return select_at_least(views, min_views, "title", "below_min_views", funnel)


def title_source(pageviews: Sequence[str], min_views: int) -> SourceResult:
    """Title candidates: views summed over the ``pageviews`` files; none given: skipped, with a warning."""
    res = SourceResult("title", {})
    if not pageviews:
        res.warnings.append("titles skipped: no pageview files (queries.pageviews is empty)")
        return res
    views, stats, funnel = Counter(), Counter(), Funnel()
    for path in pageviews:
        count_pageviews_file(path, views, stats)
        res.inputs.append(input_record(path))
    res.entries = select_titles(views, min_views, funnel)
    res.report = {"min_views": min_views, "files": len(pageviews), "projects": list(TITLE_PROJECTS),
                  "lines": dict(stats), "funnel": funnel.to_dict()}
    return res
