"""Wikitext to plain text, and the tokenizer that counts unigrams and bigrams (segments bigrams do
not cross)."""

from __future__ import annotations

import html
import re
from collections import Counter
from typing import Callable

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_ELEMENTS = re.compile(
    r"<(math|chem|ce|gallery|timeline|syntaxhighlight|source|pre|score|graph|hiero|imagemap|"
    r"templatedata|code|nowiki|poem|mapframe)\b[^>]*>.*?</\1\s*>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_URL = re.compile(r"https?://\S+")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_LINE_MARKERS = re.compile(r"^[*#:;]+\s*|^-{4,}\s*$", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
# Link targets whose text is not article prose: media, categories, interlanguage links.
_DROP_LINK_PREFIX = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(?:-[a-z]+)?)\s*:", re.I)


def _link_text(m: re.Match) -> str:
    inner = m.group(1)
    if _DROP_LINK_PREFIX.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1] if "|" in inner else inner.split("#", 1)[0]


def _remove_nested(pattern: re.Pattern, text: str, repl: str | Callable = "", max_passes: int = 20) -> str:
    # Innermost-first removal, repeated: handles nesting without a parser.
    for _ in range(max_passes):
        text, n = pattern.subn(repl, text)
        if not n:
            break
    return text


def strip_wikitext(text: str) -> str:
    """Plain text from wikitext, by regular expressions (fast, approximate).

    Drops comments, references, templates, tables, media/category/interlanguage links, maths and
    code; keeps link and external-link labels, heading and list text.
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    if "{{" in text:
        text = _remove_nested(_TEMPLATE, text)
    if "{|" in text:
        text = _remove_nested(_TABLE, text)
    if "[[" in text:
        text = _remove_nested(_LINK, text, _link_text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _LINE_MARKERS.sub("", text)
    return _MAGIC.sub("", text)


# A word: letters/digits, joined by single inner ' - . & (don't, well-known, u.s, at&t).
_WORD = re.compile(r"[^\W_]+(?:['.\-&][^\W_]+)*")
# Bigrams never span these: sentence ends, clause punctuation, brackets, quotes, line breaks.
_SEGMENT_BREAK = re.compile(r"[.!?;:]+(?=\s|$)|[,()\[\]{}\"“”«»|\n\t/]+")


def tokenize(text: str) -> list[list[str]]:
    """Lower-cased word tokens, grouped into segments that bigrams do not cross."""
    text = text.lower().replace("’", "'")
    return [toks for seg in _SEGMENT_BREAK.split(text) if (toks := _WORD.findall(seg))]


def count_tokens(text: str, unigrams: Counter, bigrams: Counter) -> int:
    """Add ``text``'s unigram and bigram counts (bigram keys ``"a b"``); returns the token count."""
    n = 0
    for seg in tokenize(text):
        unigrams.update(seg)
        n += len(seg)
        if len(seg) > 1:
            bigrams.update([a + " " + b for a, b in zip(seg, seg[1:])])
    return n
