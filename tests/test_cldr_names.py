"""The CLDR emoji-name language set (infra/cldr_names.py): deterministic, drops English-equal,
non-Latin and repeated names, fails in one line without its npm packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra import cldr_names
from infra.emoji import CLDR_PACKAGES, NPM_ROOT, EmojiError

FR = {  # emoji key -> tts name
    "\U0001F355": "Pizza!",  # English too ("pizza"): ambiguous
    "\U0001F431": "chat",  # "chat" is an English *keyword* of the fake en: ambiguous
    "\U0001F436": "chien",
    "\U0001F98A": "renard",
    "\U0001F41F": "poisson",
    "\U0001F426": "oiseau",
    "\U0001F40E": "cheval",
    "\U0001F410": "chèvre",
    "\U0001F3B2": "dé à jouer",
    "\u03A9": "oméga Ω",  # a Greek letter: non-Latin
    "\U0001F40F": "chèvre",  # the locale's name of another emoji: repeated
    "\U0001F697": "T-Shirt",  # equals en-GB's keyword "t shirt" once folded: ambiguous
}
DE = {"\U0001F355": "Pizza", "\U0001F436": "Hund", "\U0001F431": "Katze"}


def _write(nm: Path, package: str, top: str, locale: str, table: dict[str, dict]) -> None:
    path = nm / package / top / locale / "annotations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    (nm / package / "package.json").write_text(json.dumps({"name": package, "version": "48.2.0",
                                                           "license": "Unicode-3.0"}))
    path.write_text(json.dumps({top: {"identity": {"language": locale}, "annotations": table}}))


def fake_cldr(root: Path) -> Path:
    nm = root / "node_modules"
    base, derived = zip(CLDR_PACKAGES, ("annotations", "annotationsDerived"))
    english = {"\U0001F355": {"tts": ["pizza"], "default": ["pizza", "slice"]},
               "\U0001F431": {"tts": ["cat face"], "default": ["cat", "chat", "face"]},
               "\U0001F436": {"tts": ["dog face"], "default": ["dog", "face"]},
               "\u03A9": {"tts": ["omega"], "default": ["Ω", "omega"]}}
    _write(nm, *base, "en", english)
    _write(nm, *base, "en-GB", {"\U0001F697": {"default": ["t shirt"]},  # a variant: keywords only
                                "\u2708": {"tts": ["aeroplane"], "default": ["aeroplane", "flight", "Cat"]},
                                "\U0001F436": {"tts": ["Dog face"], "default": ["dog"]}})  # = en's names
    _write(nm, *derived, "en", {"\U0001F44B\U0001F3FB": {"tts": ["waving hand: light skin tone"],
                                                          "default": ["hand", "wave"]}})
    _write(nm, *base, "fr", {k: {"tts": [v], "default": [v]} for k, v in FR.items()})
    _write(nm, *base, "de", {k: {"tts": [v], "default": [v]} for k, v in DE.items()})
    openmoji = nm / "openmoji"
    (openmoji / "data").mkdir(parents=True)
    (openmoji / "package.json").write_text(json.dumps({"name": "openmoji", "version": "17.0.0"}))
    header = "emoji,hexcode,group,subgroups,annotation,openmoji_tags\n"
    (openmoji / "data" / "extras-openmoji.csv").write_text(
        header + ",E000,extras-openmoji,x,github ,\n,E001,extras-openmoji,x,dog face,\n"
        ",E002,extras-openmoji,x,Aeroplane,\n,E003,extras-openmoji,x,Ω sign,\n,E004,extras-openmoji,x,github,\n")
    (openmoji / "data" / "extras-unicode.csv").write_text(header + ",E100,extras-unicode,x,texas flag,\n")
    (openmoji / "data" / "openmoji.csv").write_text(
        "emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags\n"
        ",1F46F,people,x,people with bunny ears,\"bunny, Woman with bunny ears\",\n")
    data = nm / "emoji-datasource-google"
    data.mkdir()
    (data / "package.json").write_text(json.dumps({"name": "emoji-datasource-google", "version": "16.0.0",
                                                   "license": "MIT"}))
    (data / "emoji.json").write_text(json.dumps([{"unified": u, "non_qualified": None, "name": n} for u, n in (
        ("1F355", "SLICE OF PIZZA"), ("1F431", "CAT FACE"), ("1F3FB", "EMOJI MODIFIER FITZPATRICK TYPE-1-2"),
        ("1F22F", "SQUARED CJK UNIFIED IDEOGRAPH-6307"), ("1F46F", "WOMAN WITH BUNNY EARS"),
        ("23ED-FE0F", "BLACK RIGHT-POINTING DOUBLE TRIANGLE WITH VERTICAL BAR"), ("2795", "HEAVY PLUS SIGN"),
        ("2796", "Heavy plus-sign"), ("1F550", "CLOCK FACE ONE OCLOCK"))]))
    return nm


# en keys cldr-fresh-3 names (the fake en's four plus these): emoji.json's name, else unicodedata 3.2's
UNICODE_EN = {"\u2190": "left arrow",  # U+2190 LEFTWARDS ARROW (3.2): kept
              "\u2192": "right arrow",  # RIGHTWARDS ARROW: an Openclipart title below: held
              "\U0001F3FB": "light skin tone",  # a digit: codepoint_style
              "\U0001F22F": "Japanese “reserved” button",  # CJK: codepoint_style
              "\U0001F46F": "people with bunny ears",  # an OpenMoji tag: held
              "\u23ED\ufe0f": "next track button",  # seven words: long
              "\u2795": "plus", "\u2796": "minus",  # one name once folded: the second repeated
              "\U0001F550": "one o’clock",  # kept
              "\U0001FAE8": "shaking face"}  # not in emoji.json, newer than Unicode 3.2: unnamed


def test_builder_is_deterministic_and_labels_english_and_other(tmp_path: Path) -> None:
    nm = fake_cldr(tmp_path)
    a = cldr_names.build_language_set(nm, ("fr", "de"), per_locale=20, seed=3, part=None)
    assert a == cldr_names.build_language_set(nm, ("fr", "de"), per_locale=20, seed=3, part=None)
    english = a.of_kind(cldr_names.ENGLISH_TTS)
    assert [c.text for c in english] == ["cat face", "dog face", "omega", "pizza"] and all(c.english for c in english)
    # keywords apart; "Ω" has a non-Latin letter
    assert [c.text for c in a.of_kind(cldr_names.ENGLISH_KEYWORD)] == ["cat", "chat", "dog", "face", "omega",
                                                                       "pizza", "slice"]
    assert a.dropped[cldr_names.ENGLISH_KEYWORD] == {cldr_names.NON_LATIN: 1}
    other = a.of_kind("tts")
    assert not any(c.english for c in other) and {c.locale for c in other} == {"fr", "de"}
    # a smaller draw is seeded per locale over the sorted keys: the same for the same seed
    small = [c.text for c in cldr_names.build_language_set(nm, ("fr",), per_locale=5, seed=3).of_kind("tts")]
    assert small == [c.text for c in cldr_names.build_language_set(nm, ("fr",), per_locale=5, seed=3).of_kind("tts")]
    assert len(small) <= 5


def test_builder_drops_english_equal_non_latin_and_repeated_names(tmp_path: Path) -> None:
    data = cldr_names.build_language_set(fake_cldr(tmp_path), ("fr", "de"), per_locale=20, part=None)
    fr = sorted(c.text for c in data.captions if c.locale == "fr")
    assert fr == sorted(["chien", "renard", "poisson", "oiseau", "cheval", "chèvre", "dé à jouer"])
    assert data.drawn["fr"] == len(FR) and data.kept("fr") == 7
    assert data.dropped["fr"] == {cldr_names.AMBIGUOUS: 3, cldr_names.NON_LATIN: 1, cldr_names.REPEATED: 1}
    assert data.dropped["de"] == {cldr_names.AMBIGUOUS: 1}  # "Pizza"
    lines = cldr_names.sizes_report(data)
    assert "| fr | 12 | 7 | 3 | 1 | 1 |" in lines and lines[-1] == "| other languages | 15 | 9 | 4 | 1 | 1 |"
    with pytest.raises(ValueError, match="English"):
        cldr_names.build_language_set(fake_cldr(tmp_path / "b"), ("fr", "en-GB"))


def test_tune_and_fresh_parts_are_disjoint_and_split_english_by_emoji(tmp_path: Path) -> None:
    nm = fake_cldr(tmp_path)
    everything = cldr_names.build_language_set(nm, ("fr", "de"), per_locale=20, part=None)
    tune = cldr_names.build_language_set(nm, ("fr", "de"), per_locale=5)
    assert tune.part == cldr_names.TUNE
    fresh = cldr_names.build_language_set(nm, ("fr", "de"), per_locale=5, part=cldr_names.FRESH)
    for kind in (cldr_names.ENGLISH_TTS, cldr_names.ENGLISH_KEYWORD):  # the halves partition English
        a, b = {c.text for c in tune.of_kind(kind)}, {c.text for c in fresh.of_kind(kind)}
        assert not a & b and a | b == {c.text for c in everything.of_kind(kind)}
    assert {c.text for c in tune.of_kind("tts")} == {c.text for c in cldr_names.build_language_set(
        nm, ("fr", "de"), per_locale=5, part=None).of_kind("tts")}  # draw 1 is the tuning part's
    assert not {(c.locale, c.text) for c in tune.of_kind("tts")} & {(c.locale, c.text) for c in fresh.of_kind("tts")}
    assert fresh.drawn["fr"] == 5 and fresh.drawn["de"] == 0  # de has 3 emoji, all drawn in draw 1
    assert {cldr_names.english_half(k) for k in ("a", "b", "c", "d", "e", "f")} == {cldr_names.TUNE, cldr_names.FRESH}
    with pytest.raises(ValueError, match="part"):
        cldr_names.build_language_set(nm, ("fr",), part="fresh")


def test_fresh_2_is_a_third_draw_with_english_no_earlier_part_held(tmp_path: Path) -> None:
    nm = fake_cldr(tmp_path)
    parts = {p: cldr_names.build_language_set(nm, ("fr", "de"), per_locale=5, part=p) for p in cldr_names.PARTS}
    fresh2 = parts[cldr_names.FRESH2]
    assert fresh2 == cldr_names.build_language_set(nm, ("fr", "de"), per_locale=5, part=cldr_names.FRESH2)
    # draw 3: the 2 keys of fr's 12 that draws 1 and 2 left; de's 3 were all drawn in draw 1
    assert fresh2.drawn["fr"] == 2 and fresh2.drawn["de"] == 0
    other = {p: {(c.locale, c.text) for c in d.of_kind("tts")} for p, d in parts.items()}
    assert not other[cldr_names.FRESH2] & (other[cldr_names.TUNE] | other[cldr_names.FRESH])
    # English: the variant's own name (not "Dog face": en has it) and keyword (not "Cat", "dog"),
    # OpenMoji's extras stripped, once, less those equal to an en or variant string; "Ω sign" non-Latin
    assert [c.text for c in fresh2.of_kind(cldr_names.ENGLISH_TTS)] == ["aeroplane"]
    assert [c.text for c in fresh2.of_kind(cldr_names.ENGLISH_KEYWORD)] == ["flight", "t shirt"]
    assert [c.text for c in fresh2.of_kind(cldr_names.ENGLISH_OPENMOJI)] == ["github", "texas flag"]
    assert fresh2.dropped[cldr_names.ENGLISH_OPENMOJI] == {cldr_names.NON_LATIN: 1}
    earlier = {cldr_names.folded(c.text) for p in (cldr_names.TUNE, cldr_names.FRESH) for c in parts[p].captions
               if c.english}
    assert not earlier & {cldr_names.folded(c.text) for c in fresh2.captions if c.english}
    lines = cldr_names.sizes_report(fresh2)
    assert "openmoji 17.0.0" in lines[0] and "| english_openmoji | 3 | 2 | 0 | 1 | 0 |" in lines
    # English kinds are not other languages: 2 drawn, in fr
    assert lines[-1].startswith(f"| other languages | 2 | {len(fresh2.of_kind('tts'))} | ")


def test_fresh_2_without_openmoji_fails_in_one_line_naming_the_file(tmp_path: Path) -> None:
    nm = fake_cldr(tmp_path)
    (nm / "openmoji" / "data" / "extras-unicode.csv").unlink()
    cldr_names.build_language_set(nm, ("fr",), per_locale=5)  # the earlier parts do not read OpenMoji
    with pytest.raises(EmojiError, match=r"extras-unicode\.csv: unreadable OpenMoji extras") as e:
        cldr_names.build_language_set(nm, ("fr",), per_locale=5, part=cldr_names.FRESH2)
    assert "\n" not in str(e.value)


def test_missing_package_fails_in_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(EmojiError, match=f"npm package {CLDR_PACKAGES[0]} not found under .*nowhere") as e:
        cldr_names.build_language_set(tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    nm = fake_cldr(tmp_path)
    (nm / CLDR_PACKAGES[0] / "annotations" / "fr" / "annotations.json").unlink()
    with pytest.raises(EmojiError, match=r"fr/annotations\.json: unreadable"):
        cldr_names.build_language_set(nm, ("fr",))
    with pytest.raises(SystemExit) as exit_:
        cldr_names.main(["--npm-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "nowhere" in err


@pytest.mark.skipif(not all((NPM_ROOT / p / "package.json").is_file() for p in CLDR_PACKAGES),
                    reason="npm cldr-annotations-full / cldr-annotations-derived-full not in .venv/npm "
                           "(infra/setup.sh installs them)")
def test_real_packages_licence_and_a_full_draw() -> None:
    for package in CLDR_PACKAGES:
        assert json.loads((NPM_ROOT / package / "package.json").read_text())["license"] == "Unicode-3.0"
    data = cldr_names.build_language_set()
    fresh = cldr_names.build_language_set(part=cldr_names.FRESH)
    fresh2 = cldr_names.build_language_set(part=cldr_names.FRESH2)
    fresh3 = cldr_names.build_language_set(part=cldr_names.FRESH3)
    parts = (data, fresh, fresh2, fresh3)
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert not {(c.locale, c.text) for c in a.captions} & {(c.locale, c.text) for c in b.captions}
    for a in parts[:3]:  # fresh-3's English folds equal to no English string of an earlier part
        assert not ({cldr_names.folded(c.text) for c in a.captions if c.english}
                    & {cldr_names.folded(c.text) for c in fresh3.captions if c.english})
    assert all(p.drawn[loc] == cldr_names.PER_LOCALE for p in (fresh, fresh2, fresh3) for loc in cldr_names.LOCALES)
    assert len(fresh2.of_kind(*cldr_names.ENGLISH_NAME_KINDS)) > 500  # sized before scoring: 685
    assert len(fresh3.of_kind(cldr_names.ENGLISH_UNICODE)) > 300  # sized before scoring: 383
    assert fresh3 == cldr_names.build_language_set(part=cldr_names.FRESH3)
    assert set(data.drawn) == {cldr_names.ENGLISH_TTS, cldr_names.ENGLISH_KEYWORD, *cldr_names.LOCALES}
    assert all(data.drawn[loc] == cldr_names.PER_LOCALE for loc in cldr_names.LOCALES)
    english = cldr_names.english_strings(NPM_ROOT)
    assert not any(cldr_names.folded(c.text) in english for c in data.of_kind("tts"))
    assert data == cldr_names.build_language_set()


def _fresh3_npm(root: Path) -> tuple[Path, Path]:
    nm = fake_cldr(root)
    en = json.loads((nm / CLDR_PACKAGES[0] / "annotations" / "en" / "annotations.json").read_text())
    table = en["annotations"]["annotations"]
    table.update({k: {"tts": [v], "default": [v]} for k, v in UNICODE_EN.items()})
    _write(nm, CLDR_PACKAGES[0], "annotations", "en", table)
    labels = root / "labels.tsv"
    labels.write_text("# comment\ntitle\tlang\tpart\tnote\nRightwards_Arrow\ten\ttuning-1\t\nPomodori\tit\ttuning-1\t\n")
    return nm, labels


def test_fresh_3_unicode_names_and_their_drop_reasons(tmp_path: Path) -> None:
    nm, labels = _fresh3_npm(tmp_path)
    fresh3 = cldr_names.build_language_set(nm, ("fr", "de"), per_locale=3, part=cldr_names.FRESH3, labels=labels)
    assert fresh3 == cldr_names.build_language_set(nm, ("fr", "de"), per_locale=3, part=cldr_names.FRESH3,
                                                   labels=labels)  # deterministic
    # "slice of pizza" (emoji.json), "greek capital letter omega" (unicodedata 3.2 for Ω), "leftwards arrow",
    # "clock face one oclock", "heavy plus sign" (its folded twin "heavy plus-sign" repeated)
    assert [c.text for c in fresh3.of_kind(cldr_names.ENGLISH_UNICODE)] == [
        "clock face one oclock", "greek capital letter omega", "heavy plus sign", "leftwards arrow", "slice of pizza"]
    assert all(c.english and c.locale == "en" for c in fresh3.of_kind(cldr_names.ENGLISH_UNICODE))
    assert fresh3.drawn[cldr_names.ENGLISH_UNICODE] == 4 + len(UNICODE_EN)  # every en key
    # unnamed: 🐶 and the shaking face (no emoji.json entry, not in Unicode 3.2); held: "cat face" (en),
    # "woman with bunny ears" (an OpenMoji tag), "rightwards arrow" (an Openclipart title)
    assert fresh3.dropped[cldr_names.ENGLISH_UNICODE] == {
        cldr_names.UNNAMED: 2, cldr_names.HELD: 3, cldr_names.CODEPOINT_STYLE: 2, cldr_names.LONG: 1,
        cldr_names.REPEATED: 1}
    assert not fresh3.of_kind(cldr_names.ENGLISH_KEYWORD, cldr_names.ENGLISH_TTS, cldr_names.ENGLISH_OPENMOJI)
    without_labels = cldr_names.build_language_set(nm, ("fr",), per_locale=3, part=cldr_names.FRESH3, labels=None)
    assert "rightwards arrow" in {c.text for c in without_labels.of_kind(cldr_names.ENGLISH_UNICODE)}
    lines = cldr_names.sizes_report(fresh3)
    assert lines[1] == "| names | drawn | kept | ambiguous | non_latin | repeated | unnamed | held | codepoint_style | long |"
    assert "| english_unicode | 14 | 5 | 0 | 0 | 1 | 2 | 3 | 2 | 1 |" in lines
    assert "emoji-datasource-google 16.0.0" in lines[0] and "unicodedata.ucd_3_2_0 3.2.0" in lines[0]
    # the earlier parts' tables keep their three drop columns
    assert cldr_names.sizes_report(cldr_names.build_language_set(nm, ("fr",), per_locale=3))[1] == \
        "| names | drawn | kept | ambiguous | non_latin | repeated |"


def test_fresh_3_is_a_fourth_draw_disjoint_from_every_part(tmp_path: Path) -> None:
    nm, labels = _fresh3_npm(tmp_path)
    parts = {p: cldr_names.build_language_set(nm, ("fr", "de"), per_locale=3, part=p, labels=labels)
             for p in cldr_names.PARTS}
    assert parts[cldr_names.FRESH3].drawn["fr"] == 3  # 12 keys: draws 1-3 took 9
    assert parts[cldr_names.FRESH3].drawn["de"] == 0  # 3 keys, all in draw 1
    other = {p: {(c.locale, c.text) for c in d.of_kind("tts")} for p, d in parts.items()}
    english = {p: {cldr_names.folded(c.text) for c in d.captions if c.english} for p, d in parts.items()}
    for p in (cldr_names.TUNE, cldr_names.FRESH, cldr_names.FRESH2):
        assert not other[cldr_names.FRESH3] & other[p]
        assert not english[cldr_names.FRESH3] & english[p]
    # the other-language side of a fourth draw: the same drops, and a name equal to a Unicode name is ambiguous
    assert not {cldr_names.folded(t) for _, t in other[cldr_names.FRESH3]} & english[cldr_names.FRESH3]


def test_fresh_3_without_emoji_datasource_fails_in_one_line_naming_it(tmp_path: Path) -> None:
    nm, labels = _fresh3_npm(tmp_path)
    (nm / "emoji-datasource-google" / "emoji.json").unlink()
    cldr_names.build_language_set(nm, ("fr",), per_locale=3, part=cldr_names.FRESH2)  # not read before FRESH3
    with pytest.raises(EmojiError, match=r"emoji\.json: unreadable") as e:
        cldr_names.build_language_set(nm, ("fr",), per_locale=3, part=cldr_names.FRESH3, labels=labels)
    assert "\n" not in str(e.value)
