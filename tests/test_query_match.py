"""Query matching: whole-word, multi-word, normalised, ids kept on the row, misses dropped."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from infra.schema import QUERY_SCHEMA
from tasks.query_match import NO_QUERY_MATCH, QueryMatcher, normalise_texts


def query_table(queries: list[str], ids: list[int] | None = None) -> pa.Table:
    n = len(queries)
    return pa.Table.from_pydict({
        "query_id": ids if ids is not None else list(range(n)), "query": queries, "source": ["unigram"] * n,
        "count": [100] * n, "pmi": [None] * n, "views": [None] * n}, schema=QUERY_SCHEMA)


@pytest.fixture(scope="module")
def matcher() -> QueryMatcher:
    return QueryMatcher(query_table(["cat", "new york", "york", "t-shirt", "ice cream", "café", "c++", "über", "2001"]))


def ids_of(matcher: QueryMatcher, text: str | None) -> list[int]:
    return matcher.match([text]).to_pylist()[0]


def test_normalisation() -> None:
    assert normalise_texts(["Hello, World!", "  T-Shirt_x ", None, "Ça\u0301", "a…b"]) == [
        " hello world ", " t shirt x ", None, " \u00e7\u00e1 ", " a b "]
    assert normalise_texts(pa.array(["Cafe\u0301"])) == [" café "]  # NFC before matching
    assert normalise_texts(["हिन्दी भाषा"]) == [" हिन्दी भाषा "]  # combining vowel signs stay inside words
    assert normalise_texts(["A  b\t c!"], punctuation=False) == [" a b c! "]


def test_whole_words_only(matcher: QueryMatcher) -> None:
    assert ids_of(matcher, "A category of cats") == []  # neither "category" nor "cats" is "cat"
    assert ids_of(matcher, "concatenate") == []
    assert ids_of(matcher, "my cat") == [0]
    assert ids_of(matcher, "CAT!") == [0]
    assert ids_of(matcher, "cat/dog") == [0]


def test_multi_word_and_overlapping_queries(matcher: QueryMatcher) -> None:
    assert ids_of(matcher, "A cab in New-York City") == [1, 2]  # "new york" and "york" overlap
    assert ids_of(matcher, "York") == [2]
    assert ids_of(matcher, "new  yorker") == []
    assert ids_of(matcher, "Ice-cream and a cat in a T-shirt") == [0, 3, 4]


def test_unicode_and_punctuation_queries(matcher: QueryMatcher) -> None:
    assert ids_of(matcher, "Coffee at the Café de Flore") == [5]
    assert ids_of(matcher, "learning C++ today") == []  # "c++" would be " c ": left out
    assert ids_of(matcher, "vitamin c") == []
    assert ids_of(matcher, "Über alles") == [7]
    assert ids_of(matcher, "2001: a space odyssey") == [8]
    assert ids_of(matcher, "20010") == []
    assert ids_of(matcher, None) == [] and ids_of(matcher, "") == [] and ids_of(matcher, "!!!") == []


def test_camel_case_and_digit_boundaries_also_match() -> None:
    m = QueryMatcher(query_table(["blue", "man", "iphone", "phone", "button", "man 106", "red round"]))
    assert m.match(["BlueMan#106", "my iPhone", "button1", "redRoundButton", "blueman", "Cat"]).to_pylist() == [
        [0, 1, 5], [2, 3], [4], [4, 6], [], []]


def test_queries_sharing_a_normalised_text_are_one_entry() -> None:
    m = QueryMatcher(query_table(["t-shirt", "T Shirt", "t shirt", "!!!", "-a", "r&b", "-the", "•the"],
                                 ids=[10, 7, 3, 4, 5, 6, 8, 9]))
    # "!!!" and "-a" can match nothing; "-the"/"•the" are one entry, "T Shirt" stands for its aliases
    assert (m.num_queries, m.num_keys, m.num_unmatchable, m.num_aliases) == (11, 3, 2, 3)
    assert m.match(["a red T-Shirt", "r & b music", "a cat", "the end"]).to_pylist() == [[3], [6], [], [8]]


def test_table_gets_query_ids_and_misses_are_dropped(matcher: QueryMatcher) -> None:
    table = pa.table({"sample_id": ["a", "b", "c", "d"], "caption": ["my cat", "a dog", None, "new york cat"]})
    step = matcher(table)
    out, funnel = step.table, step.funnel
    assert out.column("sample_id").to_pylist() == ["a", "d"]
    assert out.schema.field("query_ids").type == pa.list_(pa.int32())
    assert out.column("query_ids").to_pylist() == [[0], [0, 1, 2]]
    stats = funnel.stages["query_match"]
    assert (stats.rows_in, stats.rows_out, dict(stats.dropped)) == (4, 2, {NO_QUERY_MATCH: 2})
    again = matcher(out).table  # a rerun replaces the column instead of adding a second one
    assert again.column_names.count("query_ids") == 1 and again.equals(out)


def test_chunked_and_large_string_columns(matcher: QueryMatcher) -> None:
    chunked = pa.chunked_array([pa.array(["cat"], pa.large_string()), pa.array(["dog", "york"], pa.large_string())])
    out = matcher(pa.table({"caption": chunked})).table
    assert out.column("query_ids").to_pylist() == [[0], [2]]


def test_automaton_is_built_once_and_not_pickled(matcher: QueryMatcher) -> None:
    matcher.match(["cat"])
    automaton = matcher.automaton
    matcher.match(["york"])
    assert matcher.automaton is automaton  # built once, reused across batches
    clone = pickle.loads(pickle.dumps(matcher))
    assert clone._automaton is None  # rebuilt lazily in the receiving process
    assert clone.match(["new york cat", "category"]).to_pylist() == [[0, 1, 2], []]


def test_bad_query_tables() -> None:
    with pytest.raises(ValueError, match="unique"):
        QueryMatcher(query_table(["a", "b"], ids=[1, 1]))
    with pytest.raises(ValueError, match=">= 0"):
        QueryMatcher(query_table(["a"], ids=[-1]))
    with pytest.raises(ValueError, match="no 'caption' column"):
        QueryMatcher(query_table(["cat"]))(pa.table({"text": ["a cat"]}))
    empty = QueryMatcher(query_table([]))
    step = empty(pa.table({"caption": ["a cat"]}))
    out, funnel = step.table, step.funnel
    assert empty.num_queries == 0 and out.num_rows == 0 and funnel.stages["query_match"].dropped[NO_QUERY_MATCH] == 1


def test_many_queries_and_captions() -> None:
    words = [f"w{i}" for i in range(5000)]
    m = QueryMatcher(query_table(words + ["w1 w2"]))
    captions = [f"w{i} and w{(i * 7) % 5000}" for i in range(2000)]
    got = m.match(captions).to_pylist()
    assert got == [sorted({i, (i * 7) % 5000}) for i in range(2000)]
    assert m.match(["w1 w2"]).to_pylist() == [[1, 2, 5000]]


def test_a_stored_matcher_carries_its_automaton(matcher: QueryMatcher) -> None:
    texts = ["new york cat", "category", "a Cat in NEW YORK"]
    loaded = QueryMatcher.from_bytes(matcher.to_bytes())
    assert loaded._automaton is not None  # nothing to build in the worker that loads it
    assert loaded.match(texts).to_pylist() == matcher.match(texts).to_pylist()
    assert (loaded.num_queries, loaded.num_keys, loaded.num_aliases) == (matcher.num_queries, matcher.num_keys,
                                                                         matcher.num_aliases)
