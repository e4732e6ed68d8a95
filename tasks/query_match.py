"""Query matching: which entries of the query list a caption contains (MetaCLIP's substring match).

Captions and queries get the same normalisation (NFC, lower-case, every run of characters that are
not letters, marks or digits -> one space, padded with a space on each side) and the padded
queries go into one Aho–Corasick automaton, so a match is always whole words: " cat " is not
inside " category ", and " new york " is inside " a cab in new york city ". Each caption gets the
sorted ids of all the queries it contains (overlapping matches included) as ``query_ids``
(list<int32>); captions with none are dropped (``no_query_match``).

The normalisation runs vectorised in Arrow; only the automaton walk is per caption (in C).
The automaton is built lazily, once per process: pickling a ``QueryMatcher`` (to a Ray worker)
sends the query table, not the automaton, and the worker builds it on first use.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.funnel import Funnel

STAGE = "query_match"
NO_QUERY_MATCH = "no_query_match"
QUERY_IDS = "query_ids"
QUERY_IDS_TYPE = pa.list_(pa.int32())


def normalise_texts(texts: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.ChunkedArray:
    """NFC, lower-case, non-(letter|mark|digit) runs -> one space, padded: " a red car "."""
    if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = pa.array(texts, pa.string())
    if pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.string())
    texts = pc.utf8_normalize(texts, form="NFC")
    texts = pc.utf8_lower(texts)
    texts = pc.replace_substring_regex(texts, r"[^\p{L}\p{M}\p{N}]+", " ")
    texts = pc.utf8_trim_whitespace(texts)
    padded = pc.binary_join_element_wise(" ", texts, " ", "")
    return padded if isinstance(padded, pa.ChunkedArray) else pa.chunked_array([padded])


class QueryMatcher:
    """Callable ``table -> (table + query_ids, Funnel)`` over a QUERY_SCHEMA table.

    ``query_id`` values must be unique and >= 0; ``num_queries`` (max id + 1) sizes the counts
    that balancing sums. Several queries that normalise to the same text all match.
    """

    def __init__(self, queries: pa.Table, column: str = "caption") -> None:
        ids = queries.column("query_id").to_numpy(zero_copy_only=False).astype(np.int64)
        if ids.size and ids.min() < 0:
            raise ValueError("query_id values must be >= 0")
        if np.unique(ids).size != ids.size:
            raise ValueError("query_id values must be unique")
        self.column = column
        self.num_queries = int(ids.max()) + 1 if ids.size else 0
        keys = normalise_texts(queries.column("query")).to_pylist()
        by_key: dict[str, list[int]] = {}
        for key, qid in zip(keys, ids.tolist()):
            if key is None or not key.strip():  # a query of only punctuation can match nothing
                continue
            by_key.setdefault(key, []).append(qid)
        self._keys = by_key
        self.num_keys = len(by_key)
        self._automaton = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_automaton"] = None  # rebuilt lazily where it is used
        return state

    @property
    def automaton(self):
        if self._automaton is None:
            import ahocorasick

            automaton = ahocorasick.Automaton()
            # value: the query id, or a tuple of ids when several queries share one normalised text
            for key, qids in self._keys.items():
                automaton.add_word(key, qids[0] if len(qids) == 1 else tuple(sorted(qids)))
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
                    ids: set[int] = set()
                    for v in found:
                        if isinstance(v, tuple):
                            ids.update(v)
                        else:
                            ids.add(v)
                    values.extend(sorted(ids))
            offsets.append(len(values))
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))

    def match(self, texts: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.ListArray:
        """query_ids (sorted, unique) per text; empty lists where nothing matches."""
        return self.match_normalised(normalise_texts(texts).to_pylist())

    def __call__(self, table: pa.Table) -> tuple[pa.Table, Funnel]:
        query_ids = self.match(table.column(self.column))
        if QUERY_IDS in table.column_names:
            table = table.drop_columns([QUERY_IDS])
        table = table.append_column(pa.field(QUERY_IDS, QUERY_IDS_TYPE), query_ids)
        funnel = Funnel()
        keep = pc.greater(pc.list_value_length(query_ids), 0)
        return funnel.apply_mask(STAGE, table, keep, NO_QUERY_MATCH), funnel
