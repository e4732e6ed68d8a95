"""Unicode CLDR emoji names in many languages as a labelled set of short captions (English or not).

A check of the English filter on data it was never tuned on (bench/language_id.py ``--cldr``):
CLDR's annotations (npm ``cldr-annotations-full``, ``cldr-annotations-derived-full``; Unicode
License v3, :data:`infra.emoji.CLDR_LICENCE`) give each emoji and symbol a short name (``tts``) and
keywords in ~170 locales, translated by people, one to five words: the length of the captions the
filter finds hardest.

* Four disjoint parts (:data:`PARTS`): ``cldr-tune`` (draw 1, the set h22 scored once; tuned on since),
  ``cldr-fresh`` (draw 2, scored once at h23; tuned on since h24), ``cldr-fresh-2`` (draw 3, sized
  before h24 changed any rule, scored once at its end; tuned on since) and ``cldr-fresh-3`` (draw 4,
  sized before round 9 changed any rule, scored once at its end; tuning data since).
* English: the distinct ``tts`` names of the ``en`` locale (``english_tts``), and, reported apart,
  its distinct keywords (``english_keyword``), split in two halves by a hash of the emoji key
  (:func:`english_half`; a string on several emoji, as name or keyword, goes with its first key):
  one half per part, no English string in both. ``cldr-fresh-2`` holds English strings neither
  half has: the ``tts`` names (``english_tts``) and keywords of the ``en-*`` variants (en-001, en-AU,
  en-CA, en-GB, en-IN) whose folded form is no ``en`` string, base or derived ("aeroplane arrival",
  "drawing-pin"), and the English annotations of OpenMoji's own emoji (npm ``openmoji``,
  data/extras-*.csv, CC BY-SA 4.0; ``english_openmoji``: "nuclear power plant", "reusable bag"), less
  those equal to an ``en`` or variant string. ``cldr-fresh-3``'s English is the Unicode character
  names of the emoji and symbols ``en`` annotates (``english_unicode``, lowercased: "leftwards
  harpoon with barb upwards", "ear of maize", "womans sandal"; :func:`unicode_names`), less those
  that fold equal to a string an earlier part or source holds (:data:`HELD`: any ``en``/``en-*``
  string, base or derived; any OpenMoji annotation or tag; any hand-labelled Openclipart title),
  codepoint-style names (:data:`CODEPOINT_STYLE`: a digit, or "cjk"/"katakana"/"hiragana": "squared
  cjk unified ideograph-7121", "clock face one-thirty" stays), names of more than :data:`MAX_WORDS`
  words (:data:`LONG`) and keys with no name (:data:`UNNAMED`); no keywords.
* Other languages: :data:`PER_LOCALE` emoji drawn per locale of :data:`LOCALES` (Latin-script, no
  English variant) with ``random.Random(f"{seed}:{locale}")`` over the sorted emoji keys of the
  base annotations (draw 1), and for ``cldr-fresh`` with ``random.Random(f"{seed + 1}:{locale}")``
  over the sorted keys draw 1 did not pick (draw 2), for ``cldr-fresh-2`` with ``seed + 2`` over the
  keys draws 1 and 2 did not pick (draw 3), for ``cldr-fresh-3`` with ``seed + 3`` over the keys
  draws 1-3 did not pick (draw 4); their ``tts`` names. Dropped, and counted per locale and reason: a name that
  is English too (:data:`AMBIGUOUS`: case-folded and stripped of punctuation, it equals an English
  ``tts`` name or keyword of ``en`` or an ``en-*`` variant, base or derived: "pizza", "taxi", or
  CLDR's untranslated English; in ``cldr-fresh-3``, or a Unicode name of ``english_unicode``'s source), a name with a non-Latin letter (:data:`NON_LATIN`), a name the
  locale already gave a drawn emoji (:data:`REPEATED`; in a later draw, an emoji of an earlier draw too).

Names come from the base annotations only: the derived ones are templated sequences ("boy: medium
skin tone", "flag: France") that would repeat one pattern hundreds of times.

    python -m infra.cldr_names [--part cldr-tune|cldr-fresh|cldr-fresh-2|cldr-fresh-3]   # the sizes, per locale kept and dropped
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from infra.emoji import (CLDR_LICENCE, CLDR_PACKAGES, EMOJI_DATA_PACKAGE, NPM_ROOT, EmojiError, _emoji_data,
                         _package_dir, emoji_key, package_version, read_cldr_annotations)

# Latin-script locales of the package, none an English variant; "no" is Norwegian Bokmål's
# (CLDR has no "nb" annotations), "fil" Filipino (Tagalog).
LOCALES = ("fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "sk", "hu", "ro", "hr",
           "sl", "tr", "id", "vi", "ca", "et", "lv", "lt", "ga", "cy", "eu", "gl", "ms", "fil")
PER_LOCALE = 60
SEED = 0
ENGLISH = "en"
AMBIGUOUS, NON_LATIN, REPEATED = "ambiguous", "non_latin", "repeated"
DROP_REASONS = (AMBIGUOUS, NON_LATIN, REPEATED)
ENGLISH_TTS, ENGLISH_KEYWORD = "english_tts", "english_keyword"
ENGLISH_OPENMOJI, ENGLISH_UNICODE = "english_openmoji", "english_unicode"
# English names (recall); keywords are reported apart
ENGLISH_NAME_KINDS = (ENGLISH_TTS, ENGLISH_OPENMOJI, ENGLISH_UNICODE)
TUNE, FRESH, FRESH2, FRESH3 = "cldr-tune", "cldr-fresh", "cldr-fresh-2", "cldr-fresh-3"
PARTS = (TUNE, FRESH, FRESH2, FRESH3)
# the draw of other-language names each part holds (draw d: seed + d - 1, over the keys earlier draws left)
DRAWS = {None: 1, TUNE: 1, FRESH: 2, FRESH2: 3, FRESH3: 4}
# cldr-fresh-3's English drops (Unicode names), shown in its sizes table after DROP_REASONS
UNNAMED, HELD, CODEPOINT_STYLE, LONG = "unnamed", "held", "codepoint_style", "long"
UNICODE_DROP_REASONS = (UNNAMED, HELD, CODEPOINT_STYLE, LONG)
MAX_WORDS = 5  # the parts' kind of caption: one to five words
CODEPOINT_WORDS = frozenset({"cjk", "katakana", "hiragana"})  # names spelling a code point or a transliteration
UNICODE_NAMES_LICENCE = (f"names from npm {EMOJI_DATA_PACKAGE}'s emoji.json (MIT), else Python's "
                         "unicodedata.ucd_3_2_0 (Unicode data, Unicode License v3)")
OPENCLIPART_LABELS = Path(__file__).resolve().parent / "data" / "openclipart_lang_labels.tsv"
OPENMOJI_PACKAGE = "openmoji"
OPENMOJI_EXTRAS = ("extras-openmoji.csv", "extras-unicode.csv")  # OpenMoji's own emoji: not in CLDR
OPENMOJI_LICENCE = "CC BY-SA 4.0 (OpenMoji)"


@dataclass(frozen=True)
class NamedCaption:
    text: str
    english: bool
    locale: str  # "en" for the English ones
    kind: str  # ENGLISH_TTS, ENGLISH_OPENMOJI, ENGLISH_KEYWORD or "tts" (another language's name)


@dataclass(frozen=True)
class LanguageSet:
    """The captions, and per locale how many drawn names were kept and dropped (by reason)."""

    captions: tuple[NamedCaption, ...]
    drawn: dict[str, int]  # per locale; for English, per kind (ENGLISH_TTS, ENGLISH_KEYWORD): distinct strings
    dropped: dict[str, Counter]  # the same keys
    per_locale: int
    seed: int
    version: str
    part: str | None = None  # TUNE, FRESH, FRESH2, or None: draw 1 with every English name (the set h22 scored)

    def of_kind(self, *kinds: str) -> list[NamedCaption]:
        return [c for c in self.captions if c.kind in kinds]

    def kept(self, key: str) -> int:
        """How many captions of a locale (or of an English kind) are in the set."""
        return sum(c.kind == key if c.locale == ENGLISH else c.locale == key for c in self.captions)


def folded(text: str) -> str:
    """Case-folded, punctuation (and symbols) as spaces, whitespace collapsed: the form the
    ambiguity check compares ("T-Shirt" and "t shirt" are one)."""
    chars = (" " if unicodedata.category(ch)[0] in "PSZ" else ch for ch in text.casefold())
    return " ".join("".join(chars).split())


def has_non_latin_letter(text: str) -> bool:
    return any(ch.isalpha() and not unicodedata.name(ch, "").startswith("LATIN") for ch in text)


def _english_locales(npm_root: Path) -> list[str]:
    base = _package_dir(npm_root, CLDR_PACKAGES[0]) / "annotations"
    return sorted(p.name for p in base.iterdir() if p.name == ENGLISH or p.name.startswith(ENGLISH + "-"))


def english_strings(npm_root: Path, locales: Iterable[str] | None = None) -> frozenset[str]:
    """Every ``tts`` name and keyword of ``locales`` (default: ``en`` and its variants), base and
    derived, :func:`folded`."""
    out: set[str] = set()
    for locale in _english_locales(npm_root) if locales is None else locales:
        for package, top in zip(CLDR_PACKAGES, ("annotations", "annotationsDerived")):
            for entry in read_cldr_annotations(npm_root, package, top, locale, required=locale == ENGLISH).values():
                out.update(folded(s) for s in (*entry.get("tts", ()), *entry.get("default", ())))
    out.discard("")
    return frozenset(out)


def english_half(key: str) -> str:
    """The part (TUNE or FRESH) an English emoji's names belong to: the low bit of its key's SHA-256."""
    return (TUNE, FRESH)[hashlib.sha256(key.encode("utf-8")).digest()[0] & 1]


def _variant_strings(npm_root: Path, en_strings: frozenset[str]) -> tuple[set[str], set[str]]:
    """The ``tts`` names and keywords of the ``en-*`` variants (base annotations) whose folded form is
    no string of ``en`` (base or derived): English captions the parts before FRESH2 never held
    ("aeroplane arrival", "drawing-pin"). A keyword equal to a variant name once folded is a name."""
    names: dict[str, str] = {}
    keywords: dict[str, str] = {}
    for locale in _english_locales(npm_root):
        if locale == ENGLISH:
            continue
        table = read_cldr_annotations(npm_root, CLDR_PACKAGES[0], "annotations", locale, required=False)
        for key in sorted(table):
            for s in table[key].get("tts", ())[:1]:
                if folded(s) and folded(s) not in en_strings:  # "!" folds to nothing: no caption
                    names.setdefault(folded(s), s)
            for s in table[key].get("default", ()):
                if folded(s) and folded(s) not in en_strings:
                    keywords.setdefault(folded(s), s)
    return set(names.values()), {s for f, s in keywords.items() if f not in names}


def openmoji_extra_names(npm_root: Path) -> list[str]:
    """The English ``annotation`` of each of OpenMoji's own emoji (data/extras-openmoji.csv,
    extras-unicode.csv of npm ``openmoji``; written by OpenMoji's authors, not CLDR's), stripped."""
    out: list[str] = []
    for name in OPENMOJI_EXTRAS:
        path = _package_dir(npm_root, OPENMOJI_PACKAGE) / "data" / name
        try:
            with path.open(encoding="utf-8", newline="") as f:
                out.extend(row["annotation"].strip() for row in csv.DictReader(f))
        except (OSError, KeyError, csv.Error, UnicodeDecodeError) as e:
            raise EmojiError(f"{path}: unreadable OpenMoji extras ({type(e).__name__}: {e})") from None
    return out


def openmoji_strings(npm_root: Path) -> frozenset[str]:
    """Every OpenMoji string, :func:`folded`: the ``annotation``, ``tags`` and ``openmoji_tags``
    (comma-separated) of data/openmoji.csv, and the extras' annotations."""
    path = _package_dir(npm_root, OPENMOJI_PACKAGE) / "data" / "openmoji.csv"
    out = {folded(s) for s in openmoji_extra_names(npm_root)}
    try:
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                out.add(folded(row["annotation"]))
                out.update(folded(t) for field in ("tags", "openmoji_tags") for t in (row[field] or "").split(","))
    except (OSError, KeyError, csv.Error, UnicodeDecodeError) as e:
        raise EmojiError(f"{path}: unreadable OpenMoji data ({type(e).__name__}: {e})") from None
    out.discard("")
    return frozenset(out)


def openclipart_titles(path: Path = OPENCLIPART_LABELS) -> frozenset[str]:
    """The hand-labelled Openclipart titles (the filter's tuning data, any language), :func:`folded`."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    return frozenset(folded(ln.split("\t")[0]) for ln in lines[1:]) - {""}


def unicode_names(npm_root: Path, keys: Iterable[str]) -> dict[str, str]:
    """The Unicode character name of each emoji key, lowercased: emoji-datasource's ``name`` (npm
    :data:`~infra.emoji.EMOJI_DATA_PACKAGE`, pinned) for an emoji, else for a single code point
    ``unicodedata.ucd_3_2_0`` (frozen in every Python, unlike ``unicodedata``'s own version); a key
    with neither is left out."""
    data = _emoji_data(npm_root)
    out: dict[str, str] = {}
    for key in keys:
        chars = key.replace("\ufe0f", "")
        entry = data.get(emoji_key("-".join(f"{ord(ch):04X}" for ch in chars)))
        name = (entry or {}).get("name") or (unicodedata.ucd_3_2_0.name(chars, "") if len(chars) == 1 else "")
        if name:
            out[key] = name.lower()
    return out


def _unicode_english(names: dict[str, str], keys: Iterable[str], held: frozenset[str], dropped: Counter) -> list[str]:
    """cldr-fresh-3's English: the Unicode ``names`` of ``en``'s annotated ``keys``, less the drops
    (counted in ``dropped``, first reason wins): unnamed, held (folds equal to a string of ``held``:
    en/en-* strings, OpenMoji strings, labelled Openclipart titles), codepoint-style, long, and a
    repeat of a kept name."""
    kept: dict[str, str] = {}
    for key in sorted(keys):
        name = names.get(key)
        words = folded(name or "").split()
        reason = (UNNAMED if not words else HELD if folded(name) in held
                  else CODEPOINT_STYLE if any(ch.isdigit() for ch in name) or CODEPOINT_WORDS & set(words)
                  else LONG if len(name.split()) > MAX_WORDS else REPEATED if folded(name) in kept else None)
        if reason:
            dropped[reason] += 1
        else:
            kept[folded(name)] = name
    return sorted(kept.values())


def _english_names(english: dict[str, dict], field: str, first_only: bool, part: str | None) -> set[str]:
    """The distinct names of ``field`` ("tts": the first only; "default": keywords) in ``part`` (None:
    all). A string goes with the first emoji key (sorted) that has it as a name or a keyword, so the
    parts share no English string."""
    first: dict[str, str] = {}
    for key in sorted(english):
        for s in (*english[key].get("tts", ())[:1], *english[key].get("default", ())):
            first.setdefault(s, key)
    names = {s for e in english.values() for s in (e.get(field, ())[:1] if first_only else e.get(field, ()))}
    return {s for s in names if part is None or english_half(first[s]) == part}


def build_language_set(npm_root: Path = NPM_ROOT, locales: Iterable[str] = LOCALES, per_locale: int = PER_LOCALE,
                       seed: int = SEED, part: str | None = TUNE,
                       labels: Path | None = OPENCLIPART_LABELS) -> LanguageSet:
    """The labelled captions of ``part`` (one of :data:`PARTS`; None: draw 1 with every English name,
    the set h22 scored); deterministic: a function of the package files and the arguments.
    ``labels``: the Openclipart titles FRESH3's English leaves out (None: none)."""
    if part is not None and part not in PARTS:
        raise ValueError(f"part {part!r}: one of {PARTS} or None")
    locales = tuple(locales)
    if ENGLISH in locales or any(loc.startswith(ENGLISH + "-") for loc in locales):
        raise ValueError(f"{locales}: other-language locales must not be English or a variant of it")
    base_pkg = CLDR_PACKAGES[0]
    english = read_cldr_annotations(npm_root, base_pkg, "annotations", ENGLISH, required=True)
    captions: list[NamedCaption] = []
    drawn: dict[str, int] = {}
    dropped: dict[str, Counter] = {}
    ambiguous = english_strings(npm_root)
    if part == FRESH3:  # English no earlier part or source held: Unicode names
        names = unicode_names(npm_root, english)
        held = ambiguous | openmoji_strings(npm_root) | (openclipart_titles(labels) if labels is not None else set())
        unicode_dropped: Counter = Counter()
        unicode = _unicode_english(names, english, held, unicode_dropped)
        ambiguous |= {folded(s) for s in names.values()}
        english_kinds = ((ENGLISH_UNICODE, set(unicode)),)
    elif part == FRESH2:  # English strings no earlier part held: en-* variants' own names, OpenMoji's extras
        en_strings = english_strings(npm_root, (ENGLISH,))
        variant_names, variant_keywords = _variant_strings(npm_root, en_strings)
        held = en_strings | {folded(s) for s in variant_names | variant_keywords}
        extras: dict[str, str] = {}
        for s in openmoji_extra_names(npm_root):
            if folded(s) and folded(s) not in held:
                extras.setdefault(folded(s), s)
        english_kinds = ((ENGLISH_TTS, variant_names), (ENGLISH_OPENMOJI, set(extras.values())),
                         (ENGLISH_KEYWORD, variant_keywords))
    else:
        english_kinds = ((ENGLISH_TTS, _english_names(english, "tts", True, part)),
                         (ENGLISH_KEYWORD, _english_names(english, "default", False, part)))
    for kind, strings in english_kinds:
        drawn[kind], dropped[kind] = len(strings), Counter()
        if kind == ENGLISH_UNICODE:  # drawn: every en key, named or not
            drawn[kind], dropped[kind] = len(english), unicode_dropped
        for s in sorted(strings):
            if has_non_latin_letter(s):
                dropped[kind][NON_LATIN] += 1
            else:
                captions.append(NamedCaption(s, True, ENGLISH, kind))
    for locale in locales:
        table = read_cldr_annotations(npm_root, base_pkg, "annotations", locale, required=True)
        keys = sorted(k for k, e in table.items() if e.get("tts"))
        taken: set[str] = set()
        seen: set[str] = set()  # names of earlier draws count as repeated
        for draw in range(DRAWS[part]):
            seen |= {table[k]["tts"][0] for k in taken}
            rest = [k for k in keys if k not in taken]
            picked = random.Random(f"{seed + draw}:{locale}").sample(rest, min(per_locale, len(rest)))
            taken |= set(picked)
        drawn[locale], dropped[locale] = len(picked), Counter()
        for key in picked:
            name = table[key]["tts"][0]
            reason = (NON_LATIN if has_non_latin_letter(name) else AMBIGUOUS if folded(name) in ambiguous
                      else REPEATED if name in seen else None)
            seen.add(name)
            if reason:
                dropped[locale][reason] += 1
            else:
                captions.append(NamedCaption(name, False, locale, "tts"))
    version = package_version(npm_root, base_pkg)
    if part in (FRESH2, FRESH3):
        version += f"; {OPENMOJI_PACKAGE} {package_version(npm_root, OPENMOJI_PACKAGE)}"
    if part == FRESH3:
        version += (f"; {EMOJI_DATA_PACKAGE} {package_version(npm_root, EMOJI_DATA_PACKAGE)}; "
                    f"unicodedata.ucd_3_2_0 {unicodedata.ucd_3_2_0.unidata_version}")
    return LanguageSet(tuple(captions), drawn, dropped, per_locale, seed, version, part)


def sizes_report(data: LanguageSet) -> list[str]:
    """The set's sizes as lines: English names and keywords, then per locale drawn, kept, dropped."""
    others = [k for k in data.drawn if k not in (*ENGLISH_NAME_KINDS, ENGLISH_KEYWORD)]
    which = {None: "draw 1, every English name", TUNE: f"{TUNE}: draw 1, English half {TUNE}",
             FRESH: f"{FRESH}: draw 2 (seed {data.seed + 1}, keys draw 1 did not pick), English half {FRESH}",
             FRESH2: f"{FRESH2}: draw 3 (seed {data.seed + 2}, keys draws 1-2 did not pick); English: {ENGLISH_TTS} "
                     f"and {ENGLISH_KEYWORD} = en-* variants' names and keywords equal to no en string, "
                     f"{ENGLISH_OPENMOJI} = OpenMoji extras' annotations ({OPENMOJI_LICENCE})",
             FRESH3: f"{FRESH3}: draw 4 (seed {data.seed + 3}, keys draws 1-3 did not pick); English: "
                     f"{ENGLISH_UNICODE} = Unicode names of en's annotated emoji and symbols ({UNICODE_NAMES_LICENCE}), "
                     f"less those folding equal to an en/en-* string, an OpenMoji string ({OPENMOJI_LICENCE}) or a "
                     f"labelled Openclipart title, codepoint-style names and names over {MAX_WORDS} words"}
    # the Unicode names' own drops as columns only where a part has them (the older tables stay as printed)
    reasons = DROP_REASONS + tuple(r for r in UNICODE_DROP_REASONS if ENGLISH_UNICODE in data.drawn)
    lines = [f"CLDR annotations {data.version} ({CLDR_LICENCE}); {which[data.part]}; English: en; other languages: "
             f"{len(others)} locales, {data.per_locale} emoji drawn per locale (seed {data.seed})",
             "| names | drawn | kept | " + " | ".join(reasons) + " |",
             "|---|---:|---:|" + "---:|" * len(reasons)]
    total: Counter = Counter()
    for key, n in data.drawn.items():
        lines.append(f"| {key} | {n} | {data.kept(key)} | "
                     + " | ".join(str(data.dropped[key][r]) for r in reasons) + " |")
        if key in others:
            total.update(data.dropped[key])
    lines.append(f"| other languages | {sum(data.drawn[k] for k in others)} | {len(data.of_kind('tts'))} | "
                 + " | ".join(str(total[r]) for r in reasons) + " |")
    return lines


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.cldr_names", description=__doc__.split("\n")[0])
    parser.add_argument("--npm-root", type=Path, default=NPM_ROOT, help="node_modules folder (default: %(default)s)")
    parser.add_argument("--part", choices=PARTS, default=TUNE, help="which part (default: %(default)s)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        data = build_language_set(args.npm_root, part=args.part)
    except EmojiError as e:
        parser.exit(1, f"{e}\n")
    print("\n".join(sizes_report(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
