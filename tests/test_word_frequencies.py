"""The word-frequency index (tasks/word_frequencies.py): the same values as wordfreq's lists read
as dicts, built once per machine and then mapped, rebuilt when stale or damaged, kept in memory
where the cache cannot be written."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import time
import unicodedata

import pytest

from tasks import word_frequencies as wf
from tests.conftest import REPO_ROOT

LANGUAGES = ("it", "de")  # German: umlauts folded as vowel + e too


@pytest.fixture
def fresh():
    wf.frequency_index.cache_clear()
    yield
    wf.frequency_index.cache_clear()


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tasks.word_frequencies"]


def test_the_index_holds_exactly_the_lists_values(tmp_path, fresh):
    index = wf.frequency_index(LANGUAGES, True, str(tmp_path))
    english = wf.wordfreq_table("en")
    tables = [wf.wordfreq_table(lang) for lang in LANGUAGES]
    folded = [wf.folded_frequencies(t, umlauts=lang == "de") for t, lang in zip(tables, LANGUAGES)]
    only_folded = [w for w in folded[1] if w not in tables[1]]  # German words only as accentless spellings
    assert len(only_folded) > 1_000 and "betraegt" in only_folded  # "beträgt" with vowel + e
    words = sorted(set(english).union(*tables, *folded))
    assert index.words == len(words)
    sample = random.Random(0).sample(words, 60_000) + only_folded[:5_000] + ["qwzxv", "", "naïveté", "\ud800"]
    for word in sample:
        lists = [t.get(word, 0.0) for t in tables]
        spellings = [f.get(word, 0.0) for f in folded]
        want = (english.get(word, 0.0), max(lists), max(lists + spellings))
        assert index.frequencies(word) == want, word
        assert index.by_language(word) == [max(a, b) for a, b in zip(lists, spellings)], word
        assert index.english_and_languages(word) == (want[0], index.by_language(word))


def test_an_index_is_built_once_and_then_mapped(tmp_path, fresh, caplog):
    caplog.set_level(logging.INFO, "tasks.word_frequencies")
    caplog.clear()
    built = wf.frequency_index(("it",), True, str(tmp_path))
    assert _messages(caplog) == ["word frequency index built"]
    assert wf.frequency_index(("it",), True, str(tmp_path)) is built  # once per process
    wf.frequency_index.cache_clear()  # as another process would
    caplog.clear()
    mapped = wf.frequency_index(("it",), True, str(tmp_path))
    assert _messages(caplog) == ["word frequency index reused"] and mapped.path == built.path
    assert mapped.frequencies("gatto") == built.frequencies("gatto") and mapped.frequencies("gatto")[1] > 0
    assert _folders(tmp_path) == [built.path.name]  # no temp folder left
    # other languages or no folding: another index beside it, never this one
    wf.frequency_index(("it",), False, str(tmp_path))
    assert len(_folders(tmp_path)) == 2


def _folders(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@pytest.mark.parametrize("damage", ["truncated", "other code", "no meta"])
def test_a_damaged_or_stale_index_is_rebuilt(tmp_path, fresh, caplog, damage):
    first = wf.frequency_index(("it",), True, str(tmp_path))
    want = first.frequencies("gatto")
    folder = first.path
    wf.frequency_index.cache_clear()
    del first
    if damage == "truncated":
        path = folder / "lang_level.bin"
        path.write_bytes(path.read_bytes()[:-2])
        why = "lang_level.bin is"
    elif damage == "other code":
        meta = json.loads((folder / "meta.json").read_text())
        meta["identity"]["code"] = "0" * 16
        (folder / "meta.json").write_text(json.dumps(meta))
        why = "built from other lists, languages or code"
    else:
        (folder / "meta.json").unlink()
        why = "no readable meta.json"
    caplog.set_level(logging.INFO, "tasks.word_frequencies")
    caplog.clear()  # the first build's line too, where an earlier test left INFO on
    again = wf.frequency_index(("it",), True, str(tmp_path))
    built = [r for r in caplog.records if r.getMessage() == "word frequency index built"]
    assert len(built) == 1 and built[0].fields["why"].startswith(why), [r.__dict__.get("fields") for r in built]
    assert again.path == folder and again.frequencies("gatto") == want


def test_a_cache_that_cannot_be_written_keeps_the_index_in_memory(tmp_path, fresh, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    caplog.set_level(logging.INFO, "tasks.word_frequencies")
    index = wf.frequency_index(("it",), True, str(blocked))
    assert "word frequency index not stored: kept in memory" in _messages(caplog)
    assert index.path is None and index.frequencies("gatto")[1] > 0
    wf.frequency_index.cache_clear()
    assert wf.frequency_index(("it",), True, None).frequencies("gatto") == index.frequencies("gatto")


def test_a_second_index_written_beside_a_good_one_leaves_it(tmp_path, fresh):
    """Two processes that both found no index and built one: the second's rename finds the first's."""
    first = wf.frequency_index(("it",), True, str(tmp_path))
    identity = json.loads((first.path / "meta.json").read_text())["identity"]
    inode = (first.path / "keys.bin").stat().st_ino
    arrays, levels = wf.build_arrays(("it",), True)
    wf._write(first.path, identity, arrays, levels)
    assert (first.path / "keys.bin").stat().st_ino == inode  # the first stays: its readers are not disturbed
    assert _folders(tmp_path) == [first.path.name]


def test_workers_starting_at_once_build_the_index_once(tmp_path):
    """Two processes that find no index at the same moment: one builds it, the other waits for it
    and maps it. The test holds the build lock until both are waiting on it (/proc/locks)."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s %(fields)s', "
            "stream=sys.stdout); from tasks import word_frequencies as wf; "
            f"print(wf.frequency_index(('it',), True, {str(tmp_path)!r}).frequencies('gatto'))")
    folder = wf.index_folder(tmp_path, wf._source_identity(("it",), True))
    with wf._build_lock(tmp_path, folder.name):
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        deadline = time.monotonic() + 120
        while _lock_waiters({p.pid for p in procs}) < 2 and all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "the workers never waited for the lock"
            time.sleep(0.05)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = sorted(line.split(" {")[0] for out in outs for line in out.splitlines() if line.startswith("word frequency"))
    assert said == ["word frequency index built", "word frequency index reused"], outs
    assert "another process's build" in "".join(outs)
    assert outs[0].splitlines()[-1] == outs[1].splitlines()[-1]  # the same values
    assert _folders(tmp_path) == [folder.name]


def _lock_waiters(pids: set[int]) -> int:
    """How many of ``pids`` wait on an flock (/proc/locks: "N: -> FLOCK ADVISORY WRITE <pid> ...")."""
    waiting = 0
    for line in open("/proc/locks"):
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and int(fields[5]) in pids:
            waiting += 1
    return waiting


def test_fold_accents_is_nfkd_without_combining_marks_for_every_character():
    def reference(word: str) -> str:
        return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))

    chars = [chr(cp) for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF]
    words = ["côte", "Ärger", "ﬁle", "한국어", "e\u0301\u0323", "Ǆ", "straße"] + [
        "a" + c + "\u0301" + c for c in chars]  # each character among combining marks
    assert [wf.fold_accents(w) for w in words] == [reference(w) for w in words]


def test_the_command_builds_the_index_and_says_where(tmp_path, fresh, capsys):
    assert wf.main(["--languages", "it", "--cache-dir", str(tmp_path)]) == 0
    (folder,) = _folders(tmp_path)
    assert capsys.readouterr().out == f"{tmp_path / folder}: {wf.frequency_index(('it',), True, str(tmp_path)).words:,} " \
                                      "words, English and 1 languages\n"
