"""wordfreq's frequencies of English and of the foreign languages, as one read-only index that every
worker of a machine maps from one file, instead of each rebuilding them as Python dicts.

What the English filter reads (``tasks.text_filter.ForeignWords``): per word, its frequency in
English, the highest in the languages' lists, the highest counting accentless spellings too, and
each language's (its list's or its accentless spellings', the larger). Built from the lists in
wordfreq's wheel, 26 Latin-script languages are 5.0M words; as dicts they cost every worker
process ~7 CPU-s and ~850 MB. The index holds the same values exactly (each value is one of
wordfreq's centibel frequencies, stored as an index into the table of those that occur) in flat
arrays — 168 MB on disk, mapped and shared through the page cache by every process that opens it:

* the words (UTF-8, one blob and their offsets), ordered by a CRC-32 bucket with a pointer per
  bucket (2^k buckets for n words, n <= 2^k < 2n: one or two words to compare a lookup);
* per word, English's, the lists' highest and the highest with accentless spellings (uint16 levels);
* per word, the languages that have it and their level there (a CSR list).

A machine builds it once, into ``cache_dir`` (``text_filter.frequency_cache``: "auto" is
``$XDG_CACHE_HOME/witflow`` or ``~/.cache/witflow``), in a folder named by what it is built from:
the languages, accent folding, wordfreq's version and list files, and this module's code. It is
reused only when its ``meta.json`` says exactly that and every file has the size it names;
otherwise it is rebuilt (the log says which). The build writes a hidden temp folder, fsyncs it and
renames it into place, so a reader never sees half an index; it runs under a file lock, so the
workers of a machine that start together build it once (the others wait, then map it). Where the
cache cannot be written the index is built in memory, as the dicts were, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from infra.log import log_event

log = logging.getLogger(__name__)

FORMAT = 1
# file -> array type code (memoryview.cast) of each array the index maps
_ARRAYS = {"keys": "B", "offsets": "I", "buckets": "I", "english": "H", "foreign": "H", "folded": "H",
           "lang_ptr": "I", "lang_id": "B", "lang_level": "H"}
_DTYPES = {"B": np.uint8, "I": np.uint32, "H": np.uint16}


# ------------------------------------------------------------------------------------------------
# wordfreq's lists as dicts (what the index is built from)
# ------------------------------------------------------------------------------------------------


class _Folds(dict):
    """code point -> its NFKD decomposition without combining marks, filled as characters are met.
    Per character is exact: NFKD decomposes each character on its own, and its one reordering
    (canonical order) moves only combining marks, which folding drops."""

    def __missing__(self, code: int) -> str:
        folded = "".join(c for c in unicodedata.normalize("NFKD", chr(code)) if not unicodedata.combining(c))
        self[code] = folded
        return folded


_FOLDS = _Folds()


def fold_accents(word: str) -> str:
    """``word`` without combining marks ("côte" -> "cote"): NFKD, marks left out (one
    ``str.translate``: ~3x the per-character ``unicodedata`` loop)."""
    if word.isascii():
        return word
    return word.translate(_FOLDS)


_UMLAUTS = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss"})


def wordfreq_table(language: str) -> dict[str, float]:
    """word -> frequency of wordfreq's "best" list of ``language`` (the large one where it has one,
    else the small one: Filipino, Malay...), read from its file in the wheel without wordfreq's
    caches (``get_frequency_dict`` keeps every list it ever read: 26 of them are over a GB)."""
    import wordfreq

    path = wordfreq.available_languages("best").get(language)
    if path is None:
        raise ValueError(f"text_filter.foreign_languages: wordfreq has no list for {language!r}")
    table: dict[str, float] = {}
    for index, bucket in enumerate(wordfreq.read_cBpack(str(path))):
        frequency = wordfreq.cB_to_freq(-index)  # one float per centibel bucket, shared by its words
        for word in bucket:
            table[word] = frequency
    return table


def folded_frequencies(table: Mapping[str, float], umlauts: bool) -> dict[str, float]:
    """The ASCII spellings of a table's other words -> the highest frequency of a word spelt so:
    accents left out ("entree" -> French "entrée") and, with ``umlauts`` (German), umlauts as
    vowel + e too ("gruene", "maennchen")."""
    folded: dict[str, float] = {}
    for word, frequency in table.items():
        if not word.isascii():
            keys = {fold_accents(word), fold_accents(word.translate(_UMLAUTS))} if umlauts else {fold_accents(word)}
            for key in keys:
                if key != word and frequency > folded.get(key, 0.0):
                    folded[key] = frequency
    return folded


# ------------------------------------------------------------------------------------------------
# The index
# ------------------------------------------------------------------------------------------------


class FrequencyIndex:
    """Read-only lookups over the arrays of one index (mapped files, or bytes built in memory).
    Frequencies are wordfreq's (occurrences per word); 0.0 where a list lacks the word."""

    def __init__(self, buffers: Mapping[str, object], languages: Sequence[str], levels: Sequence[float],
                 path: Path | None = None) -> None:
        self.languages, self.path = tuple(languages), path
        self._buffers = buffers  # keeps the maps open as long as the views
        self._keys = buffers["keys"]  # mmap or bytes: slicing gives bytes
        view = {name: memoryview(buffers[name]).cast(code) for name, code in _ARRAYS.items() if name != "keys"}
        self._offsets, self._buckets = view["offsets"], view["buckets"]
        self._english, self._foreign, self._folded = view["english"], view["foreign"], view["folded"]
        self._lang_ptr, self._lang_id, self._lang_level = view["lang_ptr"], view["lang_id"], view["lang_level"]
        self._levels = tuple(float(v) for v in levels)
        self._mask = len(self._buckets) - 2  # 2^k buckets and one end pointer
        self.words = len(self._offsets) - 1

    def find(self, word: str) -> int:
        """The word's row, or -1 when no list has it."""
        key = word.encode("utf-8", "surrogatepass")
        bucket = zlib.crc32(key) & self._mask
        offsets, keys = self._offsets, self._keys
        for row in range(self._buckets[bucket], self._buckets[bucket + 1]):
            if keys[offsets[row]:offsets[row + 1]] == key:
                return row
        return -1

    def frequencies(self, word: str) -> tuple[float, float, float]:
        """(English's, the languages' lists' highest, the highest counting accentless spellings)."""
        row = self.find(word)
        if row < 0:
            return 0.0, 0.0, 0.0
        levels = self._levels
        return levels[self._english[row]], levels[self._foreign[row]], levels[self._folded[row]]

    def by_language(self, word: str) -> list[float]:
        """Each language's frequency of ``word`` (its list's or its accentless spellings', the larger)."""
        return self.english_and_languages(word)[1]

    def english_and_languages(self, word: str) -> tuple[float, list[float]]:
        """English's frequency of ``word`` and :meth:`by_language`'s, from one lookup."""
        out = [0.0] * len(self.languages)
        row = self.find(word)
        if row < 0:
            return 0.0, out
        levels, ids, lvl = self._levels, self._lang_id, self._lang_level
        for j in range(self._lang_ptr[row], self._lang_ptr[row + 1]):
            out[ids[j]] = levels[lvl[j]]
        return levels[self._english[row]], out


def _source_identity(languages: Sequence[str], fold: bool) -> dict:
    """What an index is built from: the languages, folding, wordfreq's version and list files, this code."""
    import wordfreq

    files = wordfreq.available_languages("best")
    lists = {}
    for language in ("en", *languages):
        path = files.get(language)
        if path is None:
            raise ValueError(f"text_filter.foreign_languages: wordfreq has no list for {language!r}")
        lists[language] = [Path(path).name, os.path.getsize(path)]
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]  # any change to this module rebuilds
    from importlib.metadata import version

    return {"format": FORMAT, "languages": list(languages), "fold_accents": fold, "wordfreq": version("wordfreq"),
            "lists": lists, "code": code}


def build_arrays(languages: Sequence[str], fold: bool) -> tuple[dict[str, np.ndarray], list[float]]:
    """The index's arrays and its levels (the distinct frequencies, 0.0 first) from wordfreq's lists.

    Every (word, list, frequency) entry goes into columns; Arrow's dictionary encoding gives each
    word its row and numpy does the rest (no Python lookup per entry: ~12M of them)."""
    import pyarrow as pa

    words: list[str] = []
    freqs: list[np.ndarray] = []
    kinds: list[np.ndarray] = []  # 0: English; 1 + 2l: language l's list; 2 + 2l: its accentless spellings
    for kind, table in _tables(languages, fold):
        words.extend(table)
        freqs.append(np.fromiter(table.values(), np.float64, len(table)))
        kinds.append(np.full(len(table), kind, np.uint8))
    freq, kind = np.concatenate(freqs), np.concatenate(kinds)
    encoded = pa.array(words, pa.large_string()).dictionary_encode()
    del words
    unique = encoded.dictionary
    first_row = np.asarray(encoded.indices, np.int64)
    n = len(unique)
    offsets = np.frombuffer(unique.buffers()[1], np.int64, n + 1, unique.offset * 8)
    data = memoryview(unique.buffers()[2])
    size = 1 << max(1, (n - 1).bit_length())  # n <= 2^k < 2n
    bucket = np.fromiter((zlib.crc32(data[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())),
                         np.uint32, n) & np.uint32(size - 1)
    order = np.argsort(bucket, kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    row = rank[first_row]  # each entry's row in bucket order
    ordered = unique.take(pa.array(order))
    keys_offsets = np.frombuffer(ordered.buffers()[1], np.int64, n + 1, ordered.offset * 8)
    keys = np.frombuffer(ordered.buffers()[2], np.uint8)[keys_offsets[0]:keys_offsets[-1]]
    keys_offsets = keys_offsets - keys_offsets[0]
    if keys_offsets[-1] >= 2**32:
        raise ValueError("word frequency index: the words exceed 4 GiB")
    buckets = np.searchsorted(bucket[order], np.arange(size + 1, dtype=np.int64)).astype(np.uint32)

    levels = np.unique(np.concatenate([[0.0], freq]))
    if levels[0] != 0.0 or len(levels) >= 2**16:
        raise ValueError(f"word frequency index: {len(levels)} distinct frequencies (at most 65,535)")
    level = np.searchsorted(levels, freq).astype(np.uint16)  # levels ascend: the larger level, the larger frequency

    def highest(mask: np.ndarray) -> np.ndarray:
        out = np.zeros(n, np.uint16)
        np.maximum.at(out, row[mask], level[mask])
        return out

    foreign = kind > 0
    arrays = {"keys": keys, "offsets": keys_offsets.astype(np.uint32), "buckets": buckets,
              "english": highest(kind == 0), "foreign": highest(foreign & (kind % 2 == 1)),
              "folded": highest(foreign)}
    r, lang, lv = row[foreign], ((kind[foreign] - 1) // 2).astype(np.uint8), level[foreign]
    sort = np.lexsort((lang, r))  # by row, then language; a word in a list and as an accentless spelling: twice
    r, lang, lv = r[sort], lang[sort], lv[sort]
    if len(r):
        start = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]) | (lang[1:] != lang[:-1])])
        lv = np.maximum.reduceat(lv, start)
        r, lang = r[start], lang[start]
    arrays["lang_ptr"] = np.searchsorted(r, np.arange(n + 1, dtype=np.int64)).astype(np.uint32)
    arrays["lang_id"], arrays["lang_level"] = lang, lv.astype(np.uint16)
    return arrays, levels.tolist()


def _tables(languages: Sequence[str], fold: bool):
    """(kind, word -> frequency) of English (0), then each language l's list (1 + 2l) and its
    accentless spellings (2 + 2l), one at a time."""
    yield 0, wordfreq_table("en")
    for l, language in enumerate(languages):
        table = wordfreq_table(language)
        yield 1 + 2 * l, table
        if fold:
            yield 2 + 2 * l, folded_frequencies(table, umlauts=language == "de")


def resolve_cache_dir(cache_dir: str | None) -> Path | None:
    """``text_filter.frequency_cache``: "auto" -> ``$XDG_CACHE_HOME/witflow`` (``~/.cache/witflow``);
    None -> no cache (each process builds its index in memory)."""
    if cache_dir is None:
        return None
    if cache_dir == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "witflow"
    return Path(cache_dir).expanduser()


def _from_memory(arrays: Mapping[str, np.ndarray], languages: Sequence[str], levels: Sequence[float]) -> FrequencyIndex:
    return FrequencyIndex({name: np.ascontiguousarray(arrays[name], _DTYPES[code]).tobytes()
                           for name, code in _ARRAYS.items()}, languages, levels)


def _open(folder: Path, identity: dict) -> FrequencyIndex | str:
    """The index in ``folder``, or why it cannot be used."""
    if not folder.exists():
        return "none cached"
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable meta.json ({type(e).__name__})"
    if meta.get("identity") != identity:
        return "built from other lists, languages or code"
    buffers: dict[str, object] = {}
    for name in _ARRAYS:
        path = folder / f"{name}.bin"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path.name} missing"
        if size != meta["sizes"].get(name):
            return f"{path.name} is {size} bytes, meta.json says {meta['sizes'].get(name)}"
        if size == 0:
            buffers[name] = b""
            continue
        with open(path, "rb") as f:
            buffers[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return FrequencyIndex(buffers, identity["languages"], meta["levels"], folder)


def _write(folder: Path, identity: dict, arrays: Mapping[str, np.ndarray], levels: Sequence[float]) -> None:
    """Write the index to a hidden temp folder beside ``folder``, fsync it, rename it into place
    (if another process got there first, its index stays and ours is removed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        sizes = {}
        for name in _ARRAYS:
            data = np.ascontiguousarray(arrays[name], _DTYPES[_ARRAYS[name]])
            with open(tmp / f"{name}.bin", "wb") as f:
                f.write(data.tobytes())
                f.flush()
                os.fsync(f.fileno())
            sizes[name] = data.nbytes
        with open(tmp / "meta.json", "w") as f:
            json.dump({"identity": identity, "levels": list(levels), "sizes": sizes}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if folder.exists():
            if isinstance(_open(folder, identity), FrequencyIndex):  # another process renamed its index first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(folder, ignore_errors=True)  # stale: replaced (a process that mapped it keeps its copy)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its index in between
            shutil.rmtree(tmp, ignore_errors=True)
            return
        fd = os.open(folder.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@functools.lru_cache(maxsize=2)
def frequency_index(languages: tuple[str, ...], fold: bool, cache_dir: str | None) -> FrequencyIndex:
    """The index of English and ``languages`` (accentless spellings with ``fold``), one per process
    for each argument set: mapped from ``cache_dir``'s copy when it is there and current, else
    built (and stored there, unless ``cache_dir`` is None or cannot be written)."""
    identity = _source_identity(languages, fold)
    root = resolve_cache_dir(cache_dir)
    if root is not None:
        folder = index_folder(root, identity)
        opened = _open(folder, identity)
        if isinstance(opened, FrequencyIndex):
            log_event(log, "word frequency index reused", path=str(folder), words=opened.words)
            return opened
        with _build_lock(root, folder.name):  # the machine's other workers wait for one build
            opened = _open(folder, identity)
            if isinstance(opened, FrequencyIndex):
                log_event(log, "word frequency index reused", path=str(folder), words=opened.words,
                          waited_for="another process's build")
                return opened
            return _build(languages, fold, identity, folder, why=opened)
    return _build(languages, fold, identity, None, why="no cache")


def index_folder(root: Path, identity: dict) -> Path:
    """Where under ``root`` the index of ``identity`` (:func:`_source_identity`) lives."""
    return root / f"wordfreq-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock (flock) on ``root/.name.lock`` while held; none where it cannot be made."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _build(languages: tuple[str, ...], fold: bool, identity: dict, folder: Path | None, why: str) -> FrequencyIndex:
    start = time.perf_counter()
    arrays, levels = build_arrays(languages, fold)
    built = round(time.perf_counter() - start, 1)
    if folder is None:
        log_event(log, "word frequency index built in memory", languages=len(languages), seconds=built)
        return _from_memory(arrays, languages, levels)
    try:
        _write(folder, identity, arrays, levels)
    except OSError as e:
        log_event(log, "word frequency index not stored: kept in memory", logging.WARNING, path=str(folder),
                  error=f"{type(e).__name__}: {e}")
        return _from_memory(arrays, languages, levels)
    del arrays
    opened = _open(folder, identity)
    if not isinstance(opened, FrequencyIndex):
        raise RuntimeError(f"word frequency index {folder}: unreadable right after it was written ({opened})")
    log_event(log, "word frequency index built", path=str(folder), words=opened.words, seconds=built, why=why)
    return opened


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or check) this machine's index for the default filter config, e.g. in a node image."""
    import argparse

    from infra.config import TextFilterConfig

    defaults = TextFilterConfig()
    ap = argparse.ArgumentParser(prog="python -m tasks.word_frequencies",
                                 description="Build this machine's word-frequency index (or find it current) "
                                             "for the English filter, and print where it is.")
    ap.add_argument("--languages", nargs="*", default=list(defaults.foreign_languages),
                    help="text_filter.foreign_languages (default: the config's %(default)s)")
    ap.add_argument("--no-fold-accents", action="store_true", help="text_filter.foreign_fold_accents: false")
    ap.add_argument("--cache-dir", default=defaults.frequency_cache,
                    help='text_filter.frequency_cache (default "%(default)s": $XDG_CACHE_HOME/witflow)')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s %(fields)s")
    index = frequency_index(tuple(args.languages), not args.no_fold_accents, args.cache_dir)
    print(f"{index.path or 'in memory (no cache)'}: {index.words:,} words, English and {len(index.languages)} languages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
