"""Query matching: which entries of the query list a caption contains (MetaCLIP's substring match).

Captions and queries get the same normalisation (NFC, lower-case, every run of characters that are
not letters, marks or digits -> one space, padded with a space on each side) and the padded
queries go into one Aho–Corasick automaton, so a match is always whole words: " cat " is not
inside " category ", and " new york " is inside " a cab in new york city ". Each caption gets the
sorted ids of all the queries it contains (overlapping matches included) as ``query_ids``
(list<int32>); captions with none are dropped (``no_query_match``). Beyond MetaCLIP, a caption
with camelCase or letter/digit boundaries ("BlueMan#106", "button1") is also matched split at them
and gets the union; the two forms are joined with a double space, so no multi-word query spans them.

Normalisation is one precompiled regex pass per caption and the automaton walk is in C.
The automaton is built lazily, once per process: pickling a ``QueryMatcher`` sends its key table,
not the automaton. A build makes the matcher once and stores :meth:`QueryMatcher.to_bytes` (key
table and automaton): a worker loads that in ~0.3 CPU-s instead of normalising 410k queries and
building the automaton again (~2 CPU-s per worker process).
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.funnel import Funnel
from tasks.step import StepOutput

STAGE = "query_match"
NO_QUERY_MATCH = "no_query_match"
QUERY_IDS = "query_ids"
QUERY_IDS_TYPE = pa.list_(pa.int32())


@functools.lru_cache(maxsize=1)
def _non_word() -> re.Pattern:
    """Runs of characters that are not letters, marks or digits (Unicode categories L, M, N).

    Python's ``\\W`` would also split at combining marks (Devanagari vowel signs); Arrow's RE2
    has the classes but recompiles them on every call (~10 ms a batch). Built once per process.
    """
    ranges, start = [], None
    for cp in range(sys.maxunicode + 1):
        word = unicodedata.category(chr(cp))[0] in "LMN"
        if word and start is None:
            start = cp
        elif not word and start is not None:
            ranges.append((start, cp - 1))
            start = None
    if start is not None:
        ranges.append((start, sys.maxunicode))
    members = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return re.compile(f"[^{members}]+")


# camelCase (Latin letters) and letter/digit boundaries
_PARTS = re.compile(r"(?<=[a-zß-öø-ÿ])(?=[A-ZÀ-ÖØ-Þ])|(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])")
_SPACES = re.compile(r"\s+")


def _texts(texts: pa.Array | pa.ChunkedArray | Iterable[str | None]) -> list[str | None]:
    return texts.to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else list(texts)


def normalise_text(text: str, punctuation: bool = True) -> str:
    """NFC, lower-case, non-(letter|mark|digit) runs -> one space, padded: " a red car ".

    ``punctuation=False`` collapses only whitespace (to see what the punctuation rule changed).
    """
    text = unicodedata.normalize("NFC", text).lower()
    return " " + (_non_word() if punctuation else _SPACES).sub(" ", text).strip() + " "


def normalise_texts(texts: pa.Array | pa.ChunkedArray | Iterable[str | None], punctuation: bool = True) -> list[str | None]:
    """``normalise_text`` over many texts (None stays None)."""
    return [None if t is None else normalise_text(t, punctuation) for t in _texts(texts)]


def split_word_parts(text: str) -> str:
    """A space at camelCase and letter/digit boundaries: "redRoundButton2" -> "red Round Button 2"."""
    return _PARTS.sub(" ", unicodedata.normalize("NFC", text))


class QueryMatcher:
    """A step ``table -> StepOutput`` (the table gains ``query_ids``) over a QUERY_SCHEMA table.

    ``query_id`` values must be unique and >= 0; ``num_queries`` (max id + 1) sizes the counts
    that balancing sums. Queries that normalise to the same text are one entry: matches carry the
    id of the one written that way (the lowest such id; else the lowest id), the others are
    aliases (``num_aliases``) — otherwise a pair would get one balancing coin per spelling.
    """

    def __init__(self, queries: pa.Table, column: str = "caption") -> None:
        ids = queries.column("query_id").to_numpy(zero_copy_only=False).astype(np.int64)
        if ids.size and ids.min() < 0:
            raise ValueError("query_id values must be >= 0")
        if np.unique(ids).size != ids.size:
            raise ValueError("query_id values must be unique")
        self.column = column
        self.num_queries = int(ids.max()) + 1 if ids.size else 0
        texts = queries.column("query")
        keys = normalise_texts(texts)
        plain = normalise_texts(texts, punctuation=False)
        by_key: dict[str, tuple[bool, int]] = {}  # key -> (not written that way, id): min() picks
        unmatchable = candidates = 0
        for key, same, qid in zip(keys, plain, ids.tolist()):
            # A query of only punctuation can match nothing; one the punctuation rule leaves at two
            # characters or fewer ("c++" -> "c", "-a" -> "a") would match every caption with that
            # letter: both are left out (``num_unmatchable``).
            if key is None or not key.strip() or (key != same and len(key) <= 4):  # " ab "
                unmatchable += 1
                continue
            candidates += 1
            rank = (key != same, qid)
            by_key[key] = min(by_key.get(key, rank), rank)
        self._keys = {key: qid for key, (_, qid) in by_key.items()}
        self.num_keys = len(by_key)
        self.num_unmatchable = unmatchable
        self.num_aliases = candidates - len(by_key)
        self._automaton = None

    def to_bytes(self) -> bytes:
        """The matcher with its built automaton, for :meth:`from_bytes` in another process."""
        import pickle

        return pickle.dumps((self.__getstate__(), self.automaton), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_bytes(cls, data: bytes) -> "QueryMatcher":
        """A matcher from :meth:`to_bytes` (same pyahocorasick: a build's work directory is its own)."""
        import pickle

        state, automaton = pickle.loads(data)
        matcher = cls.__new__(cls)
        matcher.__dict__.update(state)
        matcher._automaton = automaton
        return matcher

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_automaton"] = None  # rebuilt lazily where it is used
        return state

    @property
    def automaton(self):
        if self._automaton is None:
            import ahocorasick

            automaton = ahocorasick.Automaton()
            for key, qid in self._keys.items():
                automaton.add_word(key, qid)
            automaton.make_automaton()
            self._automaton = automaton
        return self._automaton

    def match_normalised(self, padded: Iterable[str | None]) -> pa.ListArray:
        """query_ids for already-normalised, padded texts."""
        automaton = self.automaton
        offsets = [0]
        values: list[int] = []
        if self.num_keys == 0:
            padded = [None for _ in padded]
        for text in padded:
            if text:
                found = {v for _, v in automaton.iter(text)}
                if found:
                    values.extend(sorted(found))
            offsets.append(len(values))
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))

    def match(self, texts: pa.Array | pa.ChunkedArray | Iterable[str | None]) -> pa.ListArray:
        """query_ids (sorted, unique) per text; empty lists where nothing matches.

        A text with camelCase or letter/digit boundaries is matched as written and split at them,
        and gets the union: "BlueMan#106" matches "blue" and "man", "iPhone" still "iphone".
        """
        padded = []
        for text in _texts(texts):
            if text is None:
                padded.append(None)
                continue
            plain = normalise_text(text)
            if _PARTS.search(text):
                split = normalise_text(split_word_parts(text))
                if split != plain:
                    plain += split  # " a "+" b " -> a double space: no query spans the two
            padded.append(plain)
        return self.match_normalised(padded)

    def __call__(self, table: pa.Table) -> StepOutput:
        if self.column not in table.column_names:
            raise ValueError(f"{STAGE}: the table has no {self.column!r} column (it has {table.column_names})")
        query_ids = self.match(table.column(self.column))
        if QUERY_IDS in table.column_names:
            table = table.drop_columns([QUERY_IDS])
        table = table.append_column(pa.field(QUERY_IDS, QUERY_IDS_TYPE), query_ids)
        funnel = Funnel()
        keep = pc.greater(pc.list_value_length(query_ids), 0)
        return StepOutput(funnel.apply_mask(STAGE, table, keep, NO_QUERY_MATCH), funnel)
