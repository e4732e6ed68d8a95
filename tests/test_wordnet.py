"""The one WordNet locator (infra/wordnet.py): where "auto" looks, its one-line error, the word list.

The WordNet directories here are hand-made (a few index and exception lines in WordNet's format),
so the tests run with or without a system WordNet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.wordnet import WORDNET_FILES, WordNetNotFound, locate_wordnet, wordnet_places, wordnet_words
from tasks.queries.wordnet import wordnet_source
from tasks.text_filter import EnglishVocab
from tests.conftest import REPO_ROOT

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by\n"
INDEX = {
    "noun": "dog n 7 5 @ ~ #m #p %p 7 1 02084071\nhot_dog n 2 3 @ ~ + 2 0 07697537\nx-ray n 2 1 @ 2 0 01\n",
    "verb": "run v 41 6 @ ~ $ * > + 41 0 01926311\n",
    "adj": "red a 3 2 ! & 3 2 00381097\n",
    "adv": "fast r 2 1 ! 2 1 00086000\n",
}
EXC = {"noun": "geese goose\n", "verb": "ran run\n", "adj": "", "adv": ""}


def make_wordnet(path: Path, crlf: bool = False) -> Path:
    path.mkdir(parents=True)
    for pos in ("noun", "verb", "adj", "adv"):
        files = {f"index.{pos}": LICENCE + INDEX[pos], f"data.{pos}": LICENCE, f"{pos}.exc": EXC[pos]}
        for name, text in files.items():
            (path / name).write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode())
    return path


def test_auto_takes_the_first_place_that_holds_wordnet(tmp_path):
    second = make_wordnet(tmp_path / "second")
    third = make_wordnet(tmp_path / "third")
    assert locate_wordnet("auto", places=[tmp_path / "missing", second, third]) == second
    assert locate_wordnet(str(third)) == third


def test_auto_without_wordnet_is_a_one_line_error_naming_the_places(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "index.noun").write_text(INDEX["noun"])  # not a database: 11 files missing
    places = [tmp_path / "missing", half]
    with pytest.raises(WordNetNotFound) as err:
        locate_wordnet("auto", key="text_filter.wordnet_dir", places=places)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("text_filter.wordnet_dir: auto found no WordNet 3.0 database in ")
    assert f"{tmp_path / 'missing'}, {half}" in message and "wordnet-base" in message and "null" in message


def test_explicit_path_names_the_missing_files_and_null_means_none(tmp_path):
    assert locate_wordnet(None) is None and locate_wordnet("") is None
    with pytest.raises(WordNetNotFound, match=r"queries.wordnet_dir '.*' is not a WordNet database directory "
                                              r"\(missing \['data.noun'"):
        locate_wordnet(str(tmp_path), key="queries.wordnet_dir")


def test_default_places_cover_debian_and_nltk():
    places = [str(p) for p in wordnet_places()]
    assert "/usr/share/wordnet" in places
    assert any(p.endswith("corpora/wordnet") for p in places)


@pytest.mark.parametrize("nltk_data", [None, "/opt/one:~/two"])
def test_nltk_data_path_is_nltks_own_without_importing_it(nltk_data):
    """infra.wordnet spells nltk's search path instead of importing nltk (~1 s, ~190 MB a worker):
    in a fresh process, the two lists agree and nltk was never imported by the locator."""
    code = ("import sys, json; from infra.wordnet import nltk_data_path, locate_wordnet; "
            "locate_wordnet('auto'); assert 'nltk' not in sys.modules, 'the locator imported nltk'; "
            "ours = [str(p) for p in nltk_data_path()]; import nltk.data; print(json.dumps([ours, nltk.data.path]))")
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    if nltk_data is not None:
        env["NLTK_DATA"] = nltk_data
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    ours, theirs = json.loads(done.stdout)
    assert ours == theirs and len(ours) >= 7


@pytest.mark.parametrize("crlf", [False, True])
def test_wordnet_words_single_word_lemmas_and_irregular_forms(tmp_path, crlf):
    words = wordnet_words(make_wordnet(tmp_path / "wn", crlf=crlf))
    # hot_dog and x-ray are not single words; "1" (the licence line) is skipped
    assert words == frozenset({"dog", "run", "red", "fast", "geese", "ran"})


def test_filter_and_query_list_read_the_same_wordnet(tmp_path):
    """Both consumers resolve a wordnet_dir the same way, and both refuse a directory that is not one."""
    wn = make_wordnet(tmp_path / "wn")
    vocab = EnglishVocab.load(str(wn), min_wiki_count=10**12)
    assert vocab.lexicon == wordnet_words(wn)
    with pytest.raises(WordNetNotFound, match="text_filter.wordnet_dir"):
        EnglishVocab.load(str(tmp_path))
    with pytest.raises(WordNetNotFound, match="queries.wordnet_dir"):
        wordnet_source(str(tmp_path))
    assert set(WORDNET_FILES) <= {p.name for p in wn.iterdir()}
