"""Text filters: every reason, hostile inputs, and the English policy on hand-labelled titles."""

from __future__ import annotations

import pickle
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from infra.config import ConfigError, TextFilterConfig
from infra.emoji import CLDR_PACKAGES, NPM_ROOT
from tasks.captions import policy_field_text
from tasks.text_filter import (BAD_UTF8, CONTROL_CHARS, EMPTY, ENGLISH, FOREIGN, MACHINE_MADE, NOT_ENGLISH,
                               TOO_FEW_WORDS, TOO_LONG, TOO_SHORT, UNKNOWN, EnglishVocab, FastTextLID,
                               LanguageDetector, NeutralWordsLID, PlaceNames, TextFilter, caption_words,
                               clean_caption,
                               english_segment, english_verdict, machine_made, reason_examples,
                               short_caption_detector)

LABELS = Path(__file__).resolve().parent.parent / "infra" / "data" / "openclipart_lang_labels.tsv"


@pytest.fixture(scope="module")
def vocab() -> EnglishVocab:
    return EnglishVocab.load()


@pytest.fixture(scope="module")
def text_filter(vocab: EnglishVocab) -> TextFilter:
    return TextFilter(TextFilterConfig(), vocab)


@pytest.fixture(scope="module")
def six_filter(vocab: EnglishVocab) -> TextFilter:
    """The policy with the six foreign_languages of rounds 1-6: the rule tests whose example words
    collide in one of the 26 ("snail", "and" and "cedric" are common in Filipino or Malay lists,
    "kexi" is Icelandic) show each rule's mechanics on it."""
    return TextFilter(replace(TextFilterConfig(), foreign_languages=("it", "fr", "es", "pt", "de", "nl")), vocab)


TUNING = tuple(f"tuning-{i}" for i in range(1, 8))  # no fresh part now: fresh-4 is tuning-7


def load_labels(parts: tuple[str, ...] = TUNING) -> list[tuple[str, str]]:
    """(title, lang) of the labelled titles in ``parts`` (a fresh part, when there is one, is scored
    only by bench/language_id.py, once)."""
    lines = [line for line in LABELS.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    assert header[:3] == ["title", "lang", "part"]
    return [(r[0], r[1]) for r in rows if r[2] in parts]


# --- each reason ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, reason", [
    (None, EMPTY), ("", EMPTY), ("   \n\t ", EMPTY),
    (b"caf\xe9 latte", BAD_UTF8),  # Latin-1 bytes
    (b"\xed\xa0\x80 half a surrogate pair", BAD_UTF8),  # CESU-8 surrogate
    ("lone \ud800 surrogate", BAD_UTF8),
    (b"\xff\xfe\x00", BAD_UTF8),
    ("a cat\x00 on a mat", CONTROL_CHARS), ("ring the bell\x07", CONTROL_CHARS), ("C1 \x85 control", CONTROL_CHARS),
    ("mis\ufffddecoded text", CONTROL_CHARS),
    ("ab", TOO_SHORT), ("x" * 1001, TOO_LONG),
    ("IMG_1234", MACHINE_MADE),
    ("!!! ??? ...", TOO_FEW_WORDS), ("12 34", TOO_FEW_WORDS), ("🐱🐶🐭🐹", TOO_FEW_WORDS),
    ("Orologio da parete", NOT_ENGLISH),
])
def test_each_reason(text_filter: TextFilter, raw, reason: str) -> None:
    assert text_filter.check(raw) == (None, reason)


def test_kept_captions_are_cleaned(text_filter: TextFilter) -> None:
    assert text_filter.check("  A red\n\n car &amp; a  blue bike ") == ("A red car & a blue bike", None)
    assert text_filter.check(b"A caf\xc3\xa9 in Paris with tables") == ("A café in Paris with tables", None)
    # NFD input comes out NFC
    assert text_filter.check("A cafe\u0301 in Paris with tables")[0] == "A caf\u00e9 in Paris with tables"


def test_length_limits_follow_config(vocab: EnglishVocab) -> None:
    tf = TextFilter(TextFilterConfig(min_chars=10, max_chars=20), vocab)
    assert tf.check("red car")[1] == TOO_SHORT
    assert tf.check("a red car on a road")[1] is None
    assert tf.check("a red car on a long road")[1] == TOO_LONG
    assert TextFilter(TextFilterConfig(min_words=3), vocab).check("red car")[1] == TOO_FEW_WORDS


@pytest.mark.parametrize("caption", [
    "20160716_113957.JPG", "20160716_113957", "IMG_1234", "IMG_1234 (2).jpg", "img-20190302-wa0007.jpg",
    "DSC01234.jpg", "DSCN0042", "_MG_0057.CR2", "PXL_20210101_123456789.jpg", "P1010001.JPG", "GOPR0042.MP4",
    "3f2504e0-4f89-11d3-9a0c-0305e82c3301", "d41d8cd98f00b204e9800998ecf8427e.png", "a1b2c3d4e5f6",
    "Screenshot 2021-03-04 at 10.22.33.png", "WhatsApp Image 2021-01-01 at 12.00.00", "2019-07-04 18.22.05",
    "Canon EOS 5D f/2.8 1/200s ISO 100", "NIKON D750 50mm f/1.8 ISO 200", "1/250 sec, f/8, ISO 400, 35mm",
    "http://example.com/photos/cat.jpg", "https://flic.kr/p/abc123", "www.example.org", "someone@example.com",
    "holiday-photo.jpg", "DCIM/100CANON/IMG_0001.JPG", "books-aj.svg",
])
def test_machine_made_captions(caption: str) -> None:
    assert machine_made(caption) == MACHINE_MADE


@pytest.mark.parametrize("caption", [
    "A cat on a mat", "Switch_Cisco_3750_2", "burkina_faso", "button1", "Elefante02", "M16 rifle", "Route 66 sign",
    "Mercedes 300SL from 1955", "Sunset over the lake with a 50mm lens", "1920s fashion on 35mm film",
    "Canon camera on a wooden table", "F1 car on a race track", "cafe", "face of a deadbeat",
    "Golden retriever puppy playing with a ball in the garden, shot at f/2.8",
])
def test_human_captions_are_not_machine_made(caption: str) -> None:
    assert machine_made(caption) is None


# --- hostile inputs --------------------------------------------------------------------------------


def test_hostile_table_costs_only_its_rows(text_filter: TextFilter) -> None:
    ten_mb = "a dog " * (10 * 1024 * 1024 // 6)
    captions = [b"A dog running on the beach", b"\xff\xfe\xfd", ten_mb.encode(), b"", None, b"\xd8\xa7\xd9\x84\xd9\x82\xd8\xb7",
                "🐱🐶🐭".encode(), b"!!!???...", "A cat 🐱 on the sofa".encode(), "כלב על החוף".encode(), b"IMG_0001.JPG"]
    table = pa.table({"sample_id": [f"s{i}" for i in range(len(captions))], "caption": pa.array(captions, pa.binary()),
                      "extra": list(range(len(captions)))})
    step = text_filter(table)
    out, funnel = step.table, step.funnel
    assert out.column("caption").to_pylist() == ["A dog running on the beach", "A cat 🐱 on the sofa"]
    assert out.column("extra").to_pylist() == [0, 8]
    assert out.schema.field("caption").type == pa.string()
    stats = funnel.stages["text_filter"]
    assert (stats.rows_in, stats.rows_out) == (11, 2)
    assert dict(stats.dropped) == {BAD_UTF8: 1, TOO_LONG: 1, EMPTY: 2, NOT_ENGLISH: 2, TOO_FEW_WORDS: 2,
                                   MACHINE_MADE: 1}
    kept, rejects, _ = text_filter.split(table)
    assert kept.equals(out)
    assert rejects.column("extra").to_pylist() == [1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert rejects.column("reason").to_pylist() == [BAD_UTF8, TOO_LONG, EMPTY, EMPTY, NOT_ENGLISH, TOO_FEW_WORDS,
                                                    TOO_FEW_WORDS, NOT_ENGLISH, MACHINE_MADE]
    shown = rejects.column("caption").to_pylist()
    assert shown[0] == "\ufffd\ufffd\ufffd" and len(shown[1]) == 1000 and shown[3] is None and shown[8] == "IMG_0001.JPG"
    pa.Table.from_pylist(rejects.to_pylist()).validate(full=True)  # a side file of rejects is valid UTF-8


def test_string_columns_and_invalid_utf8_inside_arrow_strings(text_filter: TextFilter) -> None:
    # An Arrow string column can carry invalid UTF-8 (built from raw buffers without validation).
    data = [b"A red car on the road", b"bad \xc3\x28 bytes"]
    binary = pa.array(data, pa.binary())
    smuggled = pa.Array.from_buffers(pa.string(), 2, binary.buffers())
    for column in (smuggled, pa.array(["A red car on the road", None], pa.large_string())):
        out, rejects, funnel = text_filter.split(pa.table({"caption": column}))
        assert out.column("caption").to_pylist() == ["A red car on the road"]
        assert funnel.stages["text_filter"].rows_out == 1
        assert rejects.column("reason").to_pylist() == [BAD_UTF8 if column is smuggled else EMPTY]
        rejects.validate(full=True)


def test_empty_table_and_missing_column(text_filter: TextFilter) -> None:
    step = text_filter(pa.table({"caption": pa.array([], pa.string())}))
    out, funnel = step.table, step.funnel
    assert out.num_rows == 0 and funnel.stages["text_filter"].rows_in == 0
    with pytest.raises(ValueError, match="no 'caption' column"):
        text_filter(pa.table({"text": ["a cat"]}))


def test_right_to_left_and_other_scripts_are_not_english(text_filter: TextFilter) -> None:
    for caption in ("قطة على الأريكة", "כלב על החוף", "一只猫在沙发上", "Собака на пляже", "ネコ"):
        assert text_filter.check(caption)[1] in (NOT_ENGLISH, TOO_SHORT), caption


# --- the English policy ----------------------------------------------------------------------------


def test_caption_words() -> None:
    assert caption_words("BlueMan#109 see https://x.org/a mail me@x.org") == ["blue", "man", "see", "mail"]
    assert caption_words("Pacco_regalo-02") == ["pacco", "regalo"]


def test_vocabulary(vocab: EnglishVocab) -> None:
    for word in ("card", "cactus", "mug", "lasagna", "strawberries", "running", "the", "with", "meatgrinder"):
        assert vocab.is_english_word(word), word
    for word in ("pomodori", "orologio", "della", "di", "und", "het", "libellula", "herbaty"):
        assert not vocab.is_english_word(word), word
    assert vocab.coverage(["a", "red", "e", "pomodori"]) == (1, 3)  # "a" skipped, "e" counts (Italian "and")
    clone = pickle.loads(pickle.dumps(vocab))
    assert clone.is_english_word("cactus") and clone.lexicon == vocab.lexicon


def test_vocabulary_from_query_counts() -> None:
    queries = pa.table({"query_id": pa.array([0, 1, 2], pa.int32()), "query": ["zebra", "quokka", "red car"],
                        "source": ["unigram", "unigram", "bigram"], "count": [50_000, 20, 900_000],
                        "pmi": [None, None, 40.0], "views": pa.array([None] * 3, pa.int64())})
    vocab = EnglishVocab.from_queries(queries, wordnet_dir=None, min_wiki_count=1_000)
    assert vocab.is_english_word("zebra")
    assert not vocab.is_english_word("quokka")  # under the count
    assert not vocab.is_english_word("car")  # bigram rows are not word counts


def test_short_captions_use_the_vocabulary_not_the_detector(text_filter: TextFilter) -> None:
    detector = LanguageDetector("langdetect-rs", 0)
    for caption in ("card", "Cactus", "Bunny", "Blue Vacuum Cleaner"):
        assert detector.detect_langs(caption)[0][0] != "en"  # the detector alone gets these wrong
        verdict = _verdict(text_filter, caption)
        assert verdict.english and verdict.decided_by == "vocab" and verdict.p_english is None
    for caption in ("Pescetto arancione", "Gatto", "Signore"):  # only foreign evidence
        verdict = _verdict(text_filter, caption)
        assert not verdict.english and verdict.decided_by == "vocab" and verdict.foreign >= 1, caption
    for caption in ("direction à suivre", "protection obligatoire pieds"):  # mixed: the short detector says no
        verdict = _verdict(text_filter, caption)
        assert not verdict.english and verdict.decided_by == "short_detector", caption


def _verdict(text_filter: TextFilter, caption: str):
    return english_verdict(caption, text_filter.vocab, text_filter.detector, text_filter.cfg,
                           foreign=text_filter.foreign, short_detector=text_filter.short_detector,
                           names=text_filter.names, neutral_lid=text_filter.neutral_lid)


def test_foreign_word_evidence(text_filter: TextFilter) -> None:
    vocab, foreign = text_filter.vocab, text_filter.foreign
    cases = {"apple": ENGLISH, "xylophone": ENGLISH, "sole": ENGLISH, "corps": ENGLISH, "direction": ENGLISH,
             "signore": FOREIGN, "glace": FOREIGN, "gatto": FOREIGN, "frontale": FOREIGN, "ramarro": FOREIGN,
             "della": FOREIGN, "manuscriot": UNKNOWN, "bowsaw": UNKNOWN}
    assert {w: foreign.evidence(w, vocab.is_english_word(w)) for w in cases} == cases
    english, italian = foreign.zipf("gatto")
    assert italian > 4 > english
    clone = pickle.loads(pickle.dumps(foreign))
    assert clone._freq is None and clone.zipf("gatto") == (english, italian)
    assert clone._freq is foreign._freq  # one set of tables per process, shared by every filter


def test_mixed_and_unknown_short_captions_go_to_the_short_detector(text_filter: TextFilter) -> None:
    for caption, english in [("Paesaggio marino", False), ("Nonno sport", False), ("Squeek!", True),
                             ("telephone sauvetage", False)]:
        verdict = _verdict(text_filter, caption)
        assert verdict.decided_by == "short_detector" and verdict.english is english, (caption, verdict)
        assert verdict.p_english == text_filter.short_detector.english_probability(caption)


def test_a_distinctly_english_word_beside_foreign_ones_is_a_gloss(six_filter: TextFilter, vocab: EnglishVocab) -> None:
    text_filter = six_filter
    foreign = text_filter.foreign
    assert foreign.distinctly_english("teapot") and foreign.distinctly_english("snail")
    for word in ("figure", "protection", "france", "teiera", "qwzx"):  # shared, foreign or absent
        assert not foreign.distinctly_english(word), word
    for caption in ("Teiera teapot", "Lumaca - snail"):
        verdict = _verdict(text_filter, caption)
        assert verdict.english and verdict.decided_by == "vocab" and verdict.foreign == 1, (caption, verdict)
    # only shared words beside the foreign one: no gloss, the short detector decides (and says no)
    verdict = _verdict(text_filter, "protection obligatoire figure")
    assert verdict.decided_by == "short_detector", verdict
    # the rule switched off: the mixed caption goes to the short detector again
    off = TextFilter(replace(TextFilterConfig(), english_lead_zipf=None), vocab)
    assert not off.foreign.distinctly_english("teapot")
    assert _verdict(off, "Teiera teapot").decided_by == "short_detector"


def test_a_word_common_in_a_foreign_language_is_no_gloss(six_filter: TextFilter, vocab: EnglishVocab) -> None:
    """French "issue" (exit) leads French by 0.6 Zipf but is common there (4.6): no gloss, so a
    French sign title with it goes to the short detector; "and" is common in foreign text too but
    English leads it by far more than the cap asks, so it stays distinctly English."""
    text_filter = six_filter
    foreign = text_filter.foreign
    english, french = foreign.zipf("issue")
    assert english - french >= 0.5 and french >= text_filter.cfg.gloss_max_foreign_zipf
    assert not foreign.distinctly_english("issue")
    assert foreign.distinctly_english("and") and foreign.distinctly_english("teapot")
    verdict = _verdict(text_filter, "sortie issue secours")
    assert verdict.decided_by == "short_detector" and verdict.foreign == 2, verdict
    # switched off: the lead alone makes "issue" a gloss and the French title English
    off = TextFilter(replace(TextFilterConfig(), gloss_max_foreign_zipf=None), vocab)
    assert off.foreign.distinctly_english("issue")
    verdict = _verdict(off, "sortie issue secours")
    assert verdict.english and verdict.decided_by == "vocab", verdict


def test_a_word_no_list_has_but_a_foreign_language_uses_is_foreign(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """"rondelle" (a slice) is neither English-known nor in French at min_zipf, but French uses it
    2 Zipf more than English: foreign, so beside the shared "orange" the short detector decides;
    a name no language uses ("bowsaw", "manuscriot") stays unknown."""
    foreign = text_filter.foreign
    assert not vocab.is_english_word("rondelle")
    english, french = foreign.zipf("rondelle")
    assert 2.5 <= french < 3.5 and french - english >= 1.75
    assert foreign.evidence("rondelle", False) == FOREIGN
    assert foreign.evidence("bowsaw", False) == UNKNOWN and foreign.evidence("manuscriot", False) == UNKNOWN
    assert _verdict(text_filter, "Rondelle orange").decided_by == "short_detector"
    off = TextFilter(replace(TextFilterConfig(), foreign_unknown_min_zipf=None), vocab)
    assert off.foreign.evidence("rondelle", False) == UNKNOWN
    verdict = _verdict(off, "Rondelle orange")
    assert verdict.english and verdict.decided_by == "vocab", verdict  # one English word of two: kept


def test_two_letter_words_are_english_evidence_only_when_english_leads(six_filter: TextFilter,
                                                                        vocab: EnglishVocab) -> None:
    """"bw" (black and white) is English-known but German uses it more: an abbreviation, no
    English evidence, so "glace bw" has foreign evidence only; "of" still counts; digits and
    underscores are word breaks, so "glace_06_bw" is the same caption."""
    text_filter = six_filter
    foreign = text_filter.foreign
    assert vocab.is_english_word("bw") and not foreign.leads("bw") and foreign.leads("of")
    assert caption_words("glace_06_bw") == ["glace", "bw"]
    for caption in ("glace bw", "glace_06_bw"):
        verdict = _verdict(text_filter, caption)
        assert not verdict.english and verdict.decided_by == "vocab" and verdict.foreign == 1, (caption, verdict)
    verdict = _verdict(text_filter, "mug of tea")
    assert verdict.english and verdict.decided_by == "vocab", verdict
    # switched off (every English-known word counts): English against foreign, no longer foreign evidence
    # only: the short detector decides, or "bw" leading French makes it a gloss (_glossed)
    off = _verdict(TextFilter(replace(TextFilterConfig(), english_min_letters=1), vocab), "glace bw")
    assert off.english or off.decided_by == "short_detector", off


def test_english_known_words_english_never_uses_are_foreign(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """"lattine" (cans) is English-known only as a split (lat + tine), absent from English's word
    frequencies and used in Italian, though too rarely for the margin rule: foreign; a compound
    English does not use elsewhere either ("meatgrinder") stays English."""
    english, italian = text_filter.foreign.zipf("lattine")
    assert vocab.is_english_word("lattine") and english == 0.0 and 2.0 <= italian < 3.5
    assert text_filter.foreign.evidence("lattine", True) == FOREIGN
    assert text_filter.foreign.evidence("meatgrinder", vocab.is_english_word("meatgrinder")) == ENGLISH
    off = TextFilter(replace(TextFilterConfig(), foreign_absent_known_min_zipf=None), vocab)
    assert off.foreign.evidence("lattine", True) == ENGLISH


def test_accentless_spellings_of_foreign_words_are_those_words(six_filter: TextFilter, vocab: EnglishVocab) -> None:
    """French "entrée" written "entree" leans French by the margin: foreign; "telephone" (French
    "téléphone") is no longer distinctly English, so beside a French word it is no gloss; a name
    every language writes ("cedric", French "cédric") gains no foreign evidence; German umlauts
    written as vowel + e ("gruene") are folded too."""
    text_filter = six_filter
    foreign = text_filter.foreign
    english, plain = foreign.zipf("entree")
    assert foreign.folded_zipf("entree") - english >= text_filter.cfg.foreign_margin > plain - english
    assert foreign.evidence("entree", vocab.is_english_word("entree")) == FOREIGN
    assert not foreign.distinctly_english("telephone") and foreign.distinctly_english("teapot")
    assert foreign.evidence("cedric", vocab.is_english_word("cedric")) != FOREIGN
    assert foreign.folded_zipf("gruene") > foreign.zipf("gruene")[1] + 1
    assert foreign.folded_zipf("qwzx") == 0.0
    assert text_filter.check("entree interdite")[1] == NOT_ENGLISH
    verdict = _verdict(text_filter, "telephone sauvetage")
    assert not verdict.english and verdict.decided_by == "short_detector", verdict
    clone = pickle.loads(pickle.dumps(foreign))
    assert clone._freq is None and clone.folded_zipf("entree") == foreign.folded_zipf("entree")
    # switched off: words as written, "entree" is English, "telephone" a gloss again
    off = TextFilter(replace(TextFilterConfig(), foreign_fold_accents=False), vocab)
    assert off.foreign.folded_zipf("entree") == off.foreign.zipf("entree")[1]
    assert off.foreign.evidence("entree", True) == ENGLISH and off.foreign.distinctly_english("telephone")
    assert off.check("entree interdite")[1] is None
    assert _verdict(off, "telephone sauvetage").decided_by == "vocab"


def test_words_no_language_uses_are_neutral(six_filter: TextFilter, vocab: EnglishVocab) -> None:
    """Made-up names and brands ("Kexi", "Perogies", "joypad", "CFbulb-notlit") are in no list and
    rare in every language: fastText turns them down, the second pass leaves them out and keeps a
    caption of them only; beside foreign words they decide nothing ("Gatto kexi" is Italian); a
    word a foreign language uses, or two German words run together, is not neutral."""
    text_filter = six_filter
    foreign = text_filter.foreign
    for caption in ("Kexi", "Perogies", "joypad", "CFbulb-notlit"):
        assert text_filter.short_detector.english_probability(caption) < text_filter.cfg.short_detector_min_prob
        verdict = _verdict(text_filter, caption)
        if caption == "Kexi":  # lingua reads "kexi" as Estonian (0.985): the neutral-LID rule's cost
            assert not verdict.english and verdict.decided_by == "neutral_lid" and verdict.neutral == 1, verdict
            continue
        assert verdict.english and verdict.decided_by == "names" and verdict.neutral >= 1, (caption, verdict)
    verdict = _verdict(text_filter, "Gatto kexi")
    assert not verdict.english and verdict.neutral == 1 and verdict.foreign == 1, verdict
    assert not foreign.neutral("gatto", UNKNOWN)  # frequent in Italian
    assert not foreign.neutral("kexi", ENGLISH)  # only words that are no evidence either way
    assert not foreign.neutral("القط", UNKNOWN) and text_filter.check("القط")[1] == NOT_ENGLISH  # another script
    assert foreign.compound("ampelfrau") and not foreign.compound("joypad")  # ampel + frau; joy + pad is English
    assert foreign.neutral("kexi", UNKNOWN) and not foreign.neutral("ampelfrau", UNKNOWN)
    assert text_filter.check("Ampelfrau")[1] == NOT_ENGLISH
    # switched off: the short detector's no stands
    off = TextFilter(replace(TextFilterConfig(), neutral_max_zipf=None), vocab)
    assert not off.foreign.neutral("kexi", UNKNOWN)
    for caption in ("Kexi", "Perogies"):
        assert off.check(caption)[1] == NOT_ENGLISH, caption
    with pytest.raises(ConfigError, match="neutral_max_zipf .* foreign_min_zipf"):
        TextFilterConfig(neutral_max_zipf=4.0, foreign_min_zipf=3.5)
    with pytest.raises(ConfigError, match="neutral_max_zipf"):
        TextFilterConfig(neutral_max_zipf=-1.0)


def test_neutral_words_lingua_calls_estonian_welsh_basque_are_not_english(text_filter: TextFilter,
                                                                           vocab: EnglishVocab) -> None:
    """Words of a language no wordfreq list has are rare in every list, so the neutral-word rule
    kept them (cldr-tune: "llosgfynydd", Welsh volcano; "hiruhortza", Basque toothbrush;
    "kõrvitsalatern", Estonian jack-o'-lantern); lingua over English and et/ga/cy/eu (and sv/da/nb
    since round 9) tells them from made-up English names, which stay ("Perogies", "joypad",
    "CFbulb-notlit"; "xbill" is lost since round 9: lingua reads it as Scandinavian)."""
    lid = text_filter.neutral_lid
    assert isinstance(lid, NeutralWordsLID) and lid.languages == TextFilterConfig().neutral_lid_languages
    off = TextFilter(replace(TextFilterConfig(), neutral_lid_languages=()), vocab)
    assert off.neutral_lid is None
    for caption in ("llosgfynydd", "hiruhortza", "kõrvitsalatern"):
        before = _verdict(off, caption)
        assert before.english and before.decided_by == "names" and before.neutral == 1, (caption, before)
        verdict = _verdict(text_filter, caption)
        assert not verdict.english and verdict.decided_by == "neutral_lid", (caption, verdict)
        assert lid.foreign_probability(caption) >= text_filter.cfg.neutral_lid_min_prob
        assert text_filter.check(caption)[1] == NOT_ENGLISH and off.check(caption)[1] is None
    for caption in ("Perogies", "joypad", "CFbulb-notlit"):
        verdict = _verdict(text_filter, caption)
        assert verdict.english and verdict.decided_by == "names", (caption, verdict)
        assert lid.foreign_probability(caption.lower()) < text_filter.cfg.neutral_lid_min_prob
    # the threshold is the switch's other half: at 1.0 (never reached by a mixed confidence) nothing changes
    lax = TextFilter(replace(TextFilterConfig(), neutral_lid_min_prob=1.0), vocab)
    assert _verdict(lax, "hiruhortza").english
    # no neutral-word rule: no lingua either
    assert TextFilter(replace(TextFilterConfig(), neutral_max_zipf=None), vocab).neutral_lid is None
    assert not _verdict(text_filter, "xbill").english  # round 9's cost (sv/da/nb in lingua's set)
    clone = pickle.loads(pickle.dumps(lid))  # a worker rebuilds the detector
    # the same answer but for the last bits (with seven languages, two detectors of the same languages
    # were seen to differ by an ulp)
    assert clone.languages == lid.languages and clone.foreign_probability("llosgfynydd") == \
        pytest.approx(lid.foreign_probability("llosgfynydd"), abs=1e-12)


def test_scandinavian_compounds_no_list_has_are_not_english(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """Round 9: Swedish, Danish and Norwegian compounds are in no wordfreq list ("brandslukker",
    Danish fire extinguisher; "boxningshandske", Swedish boxing glove; "vibreringsmodus", Norwegian
    vibrate mode: cldr-fresh-2's names), so their words were neutral and a caption of them English;
    lingua's set now holds sv, da and nb (``neutral_lid_languages``) and reads them."""
    assert {"sv", "da", "nb"} <= set(TextFilterConfig().neutral_lid_languages)
    round_8 = TextFilter(replace(TextFilterConfig(), neutral_lid_languages=("et", "ga", "cy", "eu")), vocab)
    for caption in ("brandslukker", "boxningshandske", "vibreringsmodus"):
        before = _verdict(round_8, caption)
        assert before.english and before.decided_by == "names" and before.neutral == 1, (caption, before)
        verdict = _verdict(text_filter, caption)
        assert not verdict.english and verdict.decided_by == "neutral_lid", (caption, verdict)
    for caption in ("Perogies", "joypad", "gitlab"):  # made-up English names and brands stay
        assert _verdict(text_filter, caption).english, caption


def test_neutral_words_english_writes_are_not_asked_about(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """Round 9: brands and terms English writes, if rarely ("gitlab", "winrar", "wikidata": Zipf 1.6-2.0
    in English), are neutral words too, and lingua called them Estonian or Welsh; lingua is now asked
    only about the neutral words under ``neutral_lid_max_english_zipf`` (1.5) in English, so these stay
    English and the words of languages no list has (never in English: "llosgfynydd") are still read."""
    cfg = text_filter.cfg
    assert cfg.neutral_lid_max_english_zipf == 1.5
    every = TextFilter(replace(TextFilterConfig(), neutral_lid_max_english_zipf=None), vocab)
    for caption in ("gitlab", "winrar", "wikidata"):
        assert text_filter.foreign.zipf(caption)[0] >= cfg.neutral_lid_max_english_zipf
        verdict = _verdict(text_filter, caption)
        assert verdict.english and verdict.decided_by == "names" and verdict.neutral == 1, (caption, verdict)
        before = _verdict(every, caption)
        assert not before.english and before.decided_by == "neutral_lid", (caption, before)
    for tf in (text_filter, every):
        assert _verdict(tf, "llosgfynydd").decided_by == "neutral_lid"
    with pytest.raises(ConfigError, match="neutral_lid_max_english_zipf"):
        TextFilterConfig(neutral_lid_max_english_zipf=-1.0)


def test_words_english_writes_as_much_as_any_language_are_english(text_filter: TextFilter,
                                                                    vocab: EnglishVocab) -> None:
    """Round 9: a word no dictionary or Wikipedia count makes English-known, but English writes at
    least ``shared_word_min_zipf`` and no less than ``shared_word_margin`` under any foreign language
    (brands, software, slang: "github", "reddit", "ubuntu", "lol"), is English evidence
    (``ForeignWords.shared``); before, it was foreign when a language used it at ``foreign_min_zipf``
    ("reddit": Swedish 3.6 against English 3.7) or went to fastText ("github": P(en) 0.0)."""
    off = TextFilter(replace(TextFilterConfig(), shared_word_margin=None), vocab)
    for caption in ("github", "reddit", "ubuntu", "lol"):
        assert not vocab.is_english_word(caption) and text_filter.foreign.shared(caption), caption
        assert not off.foreign.shared(caption)
        assert text_filter.check(caption)[1] is None and off.check(caption)[1] == NOT_ENGLISH, caption
    # a word a foreign language writes far more stays foreign: "gatto" (it 4.5, en 2.3), "barista"
    # (it 3.8, en 3.0: beyond the margin); and one English writes under shared_word_min_zipf decides nothing
    for caption in ("gatto", "barista"):
        assert not text_filter.foreign.shared(caption) and text_filter.check(caption)[1] == NOT_ENGLISH
    assert not text_filter.foreign.shared("gitlab")  # English Zipf 1.9
    assert text_filter.foreign.evidence("github", False) == ENGLISH and off.foreign.evidence("reddit", False) == FOREIGN
    for bad in ({"shared_word_margin": -0.5}, {"shared_word_min_zipf": 10.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TextFilterConfig(**bad)


CLDR_READY = all((NPM_ROOT / p / "package.json").is_file() for p in CLDR_PACKAGES)


@pytest.mark.skipif(not CLDR_READY, reason="npm cldr-annotations-* not in .venv/npm (infra/setup.sh installs them)")
def test_policy_on_the_cldr_tuning_parts(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """cldr-tune, cldr-fresh (tuned on since h24) and cldr-fresh-2 (since round 9;
    bench/cldr_language_check.md): h24 measures R 0.992 / 0.989, rejected 0.918 / 0.919, et ga cy eu
    gl 0.856 / 0.854; without lingua on the neutral words (h23) 0.836 / 0.838 and 0.450 / 0.476.
    Round 9: R 0.993 / 0.989 / 0.977, rejected 0.923 / 0.925 / 0.928. The floors leave room for a few
    errors (cldr-fresh-2's English is brand and regional names: its own recall floor)."""
    from infra.cldr_names import ENGLISH_NAME_KINDS, FRESH, FRESH2, TUNE, build_language_set

    off = TextFilter(replace(TextFilterConfig(), neutral_lid_languages=()), vocab)
    for part in (TUNE, FRESH, FRESH2):
        captions = [c for c in build_language_set(part=part).captions if c.kind in (*ENGLISH_NAME_KINDS, "tts")]
        scored = {}
        for name, tf in (("on", text_filter), ("off", off)):
            seen = [(c, r is None) for c in captions for r in [tf.check(c.text)[1]] if r in (None, NOT_ENGLISH)]
            english = [k for c, k in seen if c.english]
            other = [(c.locale, k) for c, k in seen if not c.english]
            no_list = [k for loc, k in other if loc in ("et", "ga", "cy", "eu", "gl")]
            scored[name] = (sum(english) / len(english), 1 - sum(k for _, k in other) / len(other),
                            1 - sum(no_list) / len(no_list))
        recall, rejected, no_list_rejected = scored["on"]
        assert recall >= (0.97 if part == FRESH2 else 0.985), (part, scored)
        assert rejected >= 0.915 and no_list_rejected >= 0.8, (part, scored)
        assert scored["off"][2] < 0.6 and scored["off"][1] < rejected and scored["off"][0] >= recall, (part, scored)


def test_neutral_lid_languages_fail_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="lingua has no language 'gl'") as e:  # Galician: not in lingua
        NeutralWordsLID(("et", "gl"))
    assert "\n" not in str(e.value)
    for bad in (("en",), ("EU",), ("est",)):
        with pytest.raises(ConfigError, match="neutral_lid_languages"):
            TextFilterConfig(neutral_lid_languages=bad)
    with pytest.raises(ConfigError, match="neutral_lid_min_prob"):
        TextFilterConfig(neutral_lid_min_prob=1.5)
    monkeypatch.setitem(sys.modules, "lingua", None)  # not installed
    with pytest.raises(ValueError, match="needs lingua-language-detector") as e:
        NeutralWordsLID(("et",))
    assert "\n" not in str(e.value)


def test_an_english_segment_is_a_gloss(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """A caption turned down of exactly two segments, one of English evidence only and at least as
    long as the other, is English ("Cani e gatti , Cat and dog", "Lens, lente", "France -
    Picardie"); one segment, foreign segments, a segment with a foreign word in it, or an English
    segment shorter than the other, and it stays turned down."""
    for caption in ("Cani e gatti , Cat and dog", "Lens, lente", "France - Picardie",
                    "Forbici e pettine - scissors and comb"):
        verdict = _verdict(text_filter, caption)
        assert verdict.english and verdict.decided_by == "gloss" and verdict.foreign >= 1, (caption, verdict)
        assert english_segment(caption, vocab, text_filter.foreign, 0.5), caption
    for caption in ("Bicicletta Cycle", "Tazza di caffe - tazza", "Gatto, black gatto", "Gatto - a", "Pomodori",
                    "Gatto nero - animal"):
        assert not english_segment(caption, vocab, text_filter.foreign, 0.5), caption
    for caption in ("Tazza di caffe - tazza", "Gatto, black gatto", "Gatto - a", "Pomodori"):
        assert text_filter.check(caption)[1] == NOT_ENGLISH, caption
    # no segment gloss, but an English word leading the foreign word's language (_glossed, h23): English
    # ("Bicicletta Cycle" is labelled English in Openclipart; "Gatto nero - animal" is a cost of it)
    for caption in ("Bicicletta Cycle", "Gatto nero - animal"):
        assert text_filter.check(caption)[1] is None, caption
    off = TextFilter(replace(TextFilterConfig(), gloss_segments=False), vocab)
    for caption in ("Cani e gatti , Cat and dog", "Lens, lente"):
        assert off.check(caption)[1] == NOT_ENGLISH, caption


def test_keywords_after_a_foreign_title_are_no_gloss(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """The zero-shot build judges title + keywords captions (tasks/captions.py joins them with ", "):
    English keywords after a foreign title are no gloss of it, one keyword or several. Round 6's
    rule (any segment of English evidence) kept these; over the full Openclipart it let all but 8
    of 202 such foreign captions through."""
    cases = [("Vacca pezzata rossa valdostana", ["mammal"]), ("direction à suivre 1", ["symbol", "sign", "arrow"]),
             ("Cani e gatti", ["cat", "dog", "pet"]), ("Gatto nero", ["animal"])]
    for title, keywords in cases:
        caption = policy_field_text({"caption": title, "keywords": keywords}, "caption+keywords")
        assert caption.startswith(f"{title}, "), caption
        assert text_filter.check(caption)[1] == NOT_ENGLISH, caption
        assert not english_segment(caption, vocab, text_filter.foreign, 0.5), caption
    # a two-segment gloss stays English when composed with nothing to add, and so does an English title
    assert text_filter.check(policy_field_text({"caption": "Cani e gatti, Cat and dog"}, "caption+keywords"))[1] is None
    english = policy_field_text({"caption": "Red cow", "keywords": ["mammal", "farm"]}, "caption+keywords")
    assert text_filter.check(english)[1] is None, english


def test_long_captions_use_word_evidence(six_filter: TextFilter, vocab: EnglishVocab) -> None:
    text_filter = six_filter
    # no foreign evidence and at least half English words: English, without langdetect
    verdict = _verdict(text_filter, "Kowalski Nowak and the blue kettle")
    assert verdict.english and verdict.decided_by == "vocab" and verdict.p_english is None, verdict
    # most words English-known, but a third of them foreign evidence: langdetect decides (no)
    caption = "Stemma comune Saint Vincent Valle Italy"
    assert vocab.coverage(caption_words(caption)) == (6, 6)
    verdict = _verdict(text_filter, caption)
    assert not verdict.english and verdict.decided_by == "detector" and verdict.foreign == 2, verdict
    # switched off: the known-word share alone, as before
    off = TextFilter(replace(TextFilterConfig(), long_max_foreign_share=None), vocab)
    assert _verdict(off, caption).english and _verdict(off, caption).decided_by == "vocab"
    assert _verdict(off, "Kowalski Nowak and the blue kettle").decided_by == "detector"


def test_place_names_are_found_as_words(text_filter: TextFilter) -> None:
    """ISO 3166 names from pycountry, looked up with case, accents, ``_``/``-`` and apostrophes
    (as breaks or left out) ignored, the longest name first; ISO 3166-2's "Name, Type" and
    "Name [Other name]" forms are both found."""
    names = text_filter.names
    assert len(names) > 4_000
    assert names.spans(caption_words("cote_divoire")) == [(0, 2)]
    assert names.spans(caption_words("Côte d'Ivoire")) == [(0, 3)]
    assert names.spans(caption_words("Map of Papua New Guinea")) == [(2, 5)]
    assert names.spans(caption_words("baden_wurttemberg")) == [(0, 2)]
    assert names.spans(caption_words("Baden-Württemberg")) == [(0, 2)]
    assert names.spans(caption_words("Región de Murcia")) == [(0, 3)]  # ISO 3166-2: "Murcia, Región de"
    assert names.spans(caption_words("Cataluña")) == names.spans(caption_words("Catalunya")) == [(0, 1)]
    assert names.spans(caption_words("a red apple on a table")) == []
    clone = pickle.loads(pickle.dumps(names))
    assert clone.spans(caption_words("Côte d'Ivoire")) == [(0, 3)] and len(clone) == len(names)


def test_place_names_are_no_language_evidence(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """A caption of place names only is English (usable as a caption, as the labels have it); a
    name beside other words leaves them to decide, so a foreign sentence with a name in it is
    still foreign; a name English writes otherwise ("Piemonte" for Piedmont) stays foreign."""
    for caption in ("Extremadura", "Murcia", "Niue", "Navarra"):
        verdict = _verdict(text_filter, caption)
        assert verdict.english and verdict.decided_by == "names" and verdict.names >= 1, (caption, verdict)
        assert text_filter.check(caption) == (caption, None)
    for caption in ("Baden-Württemberg", "El Salvador"):  # "baden", "salvador" stay, decide
        verdict = _verdict(text_filter, caption)
        assert verdict.english and verdict.decided_by == "vocab" and verdict.names == 1, (caption, verdict)
    verdict = _verdict(text_filter, "cote_divoire")  # "cote" is French "côte" (accents folded): a name's word too
    assert verdict.english and verdict.decided_by == "names" and verdict.names == 2, verdict
    verdict = _verdict(text_filter, "France - Provence Alpes Cote d'Azur")
    assert verdict.english and verdict.decided_by == "vocab" and verdict.names == 4, verdict  # alpes, cote, d, azur left out
    for caption in ("Bandiera di Murcia", "Mapa de Extremadura", "Karte von Niue",
                    "Una foto della cattedrale di Murcia al tramonto"):
        assert text_filter.check(caption)[1] == NOT_ENGLISH, caption
    # a cost of _glossed (h23): "france" leads French more than "carte" is French evidence
    assert text_filter.check("Carte de la France")[1] is None
    assert _verdict(text_filter, "Bandiera di Murcia").names == 1  # judged again without "murcia": still foreign
    foreign = text_filter.foreign
    for caption in ("Piemonte", "Bretagne", "Castilla y León"):
        assert text_filter.names.reads_foreign(caption_words(caption), foreign), caption
        assert text_filter.check(caption)[1] == NOT_ENGLISH, caption
    assert not text_filter.names.reads_foreign(caption_words("Baden-Württemberg"), foreign)  # "baden" is not
    # names only ever rescue: an English caption with a name is decided as before, without the lookup
    verdict = _verdict(text_filter, "Map of Extremadura with its provinces and main roads")
    assert verdict.english and verdict.names == 0, verdict
    # switched off: the names are foreign words again
    off = TextFilter(replace(TextFilterConfig(), place_name_max_foreign_lead=None), vocab)
    assert off.names is None
    for caption in ("Extremadura", "Murcia", "cote_divoire", "El Salvador"):
        assert off.check(caption)[1] == NOT_ENGLISH, caption
    table = pa.table({"caption": ["Murcia", "Bandiera di Murcia", "Niue"]})
    assert text_filter(table).table.column("caption").to_pylist() == ["Murcia", "Niue"]


def test_place_names_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no place names"):
        PlaceNames([], 2.0)
    with pytest.raises(ValueError, match="no place names"):
        PlaceNames(["Ao", "Ré"], 2.0)  # two letters: too short to tell from a word
    monkeypatch.setitem(sys.modules, "pycountry", None)  # not installed
    with pytest.raises(ModuleNotFoundError, match="place names need pycountry"):
        PlaceNames.load(2.0)
    with pytest.raises(ModuleNotFoundError, match="pycountry"):
        TextFilter(TextFilterConfig())
    assert TextFilter(replace(TextFilterConfig(), place_name_max_foreign_lead=None)).names is None


def test_fasttext_lid176_is_offline_and_reads_lower_case_words() -> None:
    lid = FastTextLID()
    assert lid.english_probability("Woman Nurse") > 0.5  # lower-cased first: capitalised, the model shows its prior
    assert lid.english_probability("Il gatto dorme sul divano") < 0.1
    assert pickle.loads(pickle.dumps(lid)).english_probability("woman_nurse") == lid.english_probability("woman nurse")
    assert isinstance(short_caption_detector("langdetect-rs"), LanguageDetector)
    assert short_caption_detector("none") is None
    with pytest.raises(ValueError, match="unknown short-caption detector"):
        short_caption_detector("cld3")


def test_without_word_frequencies_short_captions_follow_the_known_share(vocab: EnglishVocab) -> None:
    plain = TextFilter(replace(TextFilterConfig(), foreign_languages=(), short_detector="none"), vocab)
    assert plain.foreign is None and plain.short_detector is None
    assert plain.check("Signore")[1] is None  # a WordNet lemma: the share rule alone keeps it
    assert plain.check("Gatto nero")[1] is None  # 1 of 2 known
    assert plain.check("Pescetto arancione")[1] == NOT_ENGLISH


EN_SENTENCES = [
    "A photo of a dog running on the beach at sunset",
    "Portrait of Leonardo da Vinci painted in oil",
    "Logo of the Los Angeles Lakers basketball team",
    "Clipart by Nicu Buculei - sailor monkey with a hat",
]
FOREIGN_SENTENCES = [
    "Una foto di un cane che corre sulla spiaggia al tramonto",
    "Gros plan de fraises fraîches dans un bol blanc",
    "Primer plano de fresas frescas en un cuenco blanco",
    "Nahaufnahme von frischen Erdbeeren in einer weißen Schüssel",
    "Close-up van verse aardbeien in een witte kom",
    "Dois meninos jogando futebol no parque",
]


def test_long_captions(text_filter: TextFilter) -> None:
    for caption in EN_SENTENCES:
        assert text_filter.check(caption)[1] is None, caption
    for caption in FOREIGN_SENTENCES:
        verdict = english_verdict(caption, text_filter.vocab, text_filter.detector, text_filter.cfg)
        assert not verdict.english and verdict.decided_by == "detector", caption


def _policy_scores(text_filter: TextFilter, labels: list[tuple[str, str]]) -> tuple[float, float, float]:
    """Precision and recall of "keep as English", and the share of other-language titles dropped,
    over the titles the language check sees."""
    tp = fp = fn = tn = 0
    for title, lang in labels:
        cleaned, reason = text_filter.check(title)
        if lang == "neutral" or reason not in (None, NOT_ENGLISH):
            continue  # the language check never sees captions an earlier filter drops
        keep = reason is None
        tp += keep and lang == "en"
        fp += keep and lang != "en"
        fn += (not keep) and lang == "en"
        tn += (not keep) and lang != "en"
    return tp / (tp + fp), tp / (tp + fn), tn / (tn + fp)


# The policy before round 6 (accent folding, neutral words, gloss segments, fastText at 0.45), and earlier
ROUND_5 = dict(foreign_fold_accents=False, neutral_max_zipf=None, gloss_segments=False, short_detector_min_prob=0.3)
ROUND_4 = dict(ROUND_5, place_name_max_foreign_lead=None)
ROUND_3 = dict(ROUND_4, gloss_max_foreign_zipf=None, foreign_unknown_min_zipf=None, english_min_letters=1)
ROUND_2 = dict(ROUND_3, foreign_margin=2.0, english_lead_zipf=None, foreign_absent_known_min_zipf=None,
               long_max_foreign_share=None)


def test_policy_on_hand_labelled_openclipart_titles(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    """The tuning parts tuning-1..7 (2,700 titles, 2,269 English and 394 other-language ones the
    language check sees): the policy measures P 0.984, R 0.984, 357 of 394 dropped (0.906), the
    issue's goal (R >= 0.98 at >= 90% dropped). The floors leave room for ~3 more errors either
    way. Round 5 (no accent folding, neutral words or gloss segments, fastText at 0.3) measures
    P 0.981, R 0.978, 352 dropped (0.893): net, the neutral words and two-segment glosses keep more
    English titles (Kexi, joypad, Perogies, "Cani e gatti , Cat and dog", "France - Nivernais" ...),
    and accents and the threshold drop more foreign ones ("entree interdite", "defense de fumer").
    Round 4 (no place names) measures R 0.971; round 3 drops 335 of 394 (0.850); round 2 measures
    R 0.962; the share-of-known-words rule alone drops 0.619, and langdetect alone keeps 36% of
    English. tuning-7 was fresh-4, scored once with round 6 (P 0.977, R 0.986, 60 of 70 dropped);
    the gloss rule changed after that, so it is tuning data now (the two-segment rule changes none
    of its verdicts)."""
    labels = load_labels()
    precision, recall, rejected = _policy_scores(text_filter, labels)
    # h23 (26 foreign_languages, English country names, _glossed): P 0.985, R 0.981, 360 of 394 dropped;
    # round 9 (shared words: "Ours", French bear, is as English as French now): R 0.981, 359 dropped (0.911)
    assert precision >= 0.98 and recall >= 0.98 and rejected >= 0.91, (precision, recall, rejected)
    round_5 = _policy_scores(TextFilter(replace(TextFilterConfig(), **ROUND_5), vocab), labels)
    assert round_5[1] < recall and round_5[2] < rejected  # what round 6 adds: both
    round_4, round_3, round_2 = (_policy_scores(TextFilter(replace(TextFilterConfig(), **r), vocab), labels)
                                 for r in (ROUND_4, ROUND_3, ROUND_2))
    assert round_4[1] < round_5[1]  # what the place names add: recall
    assert round_3[2] < round_4[2]  # what round 4's rules add: rejection
    assert round_2[1] < round_3[1]  # what round 3's margins and English lead add: recall
    share_only = TextFilter(replace(TextFilterConfig(), foreign_languages=(), short_detector="none"), vocab)
    assert _policy_scores(share_only, labels)[2] < round_2[2]  # what the word evidence and fastText add
    detector = LanguageDetector("langdetect-rs", 0)
    english = [t for t, lang in labels if lang == "en"]
    detector_tp = sum(bool(langs) and langs[0][0] == "en"
                      for langs in (detector.detect_langs(clean_caption(t)) for t in english))
    assert detector_tp / len(english) < 0.6  # the problem the policy exists for


def test_langdetect_rs_matches_langdetect_on_the_labelled_titles() -> None:
    py, rs = LanguageDetector("langdetect", 0), LanguageDetector("langdetect-rs", 0)
    titles = [clean_caption(t) for t, _ in load_labels(("tuning-1",))]
    assert [py.detect_langs(t) for t in titles] == [rs.detect_langs(t) for t in titles]


def test_detector_is_deterministic_and_order_free() -> None:
    texts = ["Il gatto dorme sul divano", "Der Hund schläft", "A cat sleeps on the sofa", "Bunny"]
    a = [LanguageDetector("langdetect-rs", 0).detect_langs(t) for t in texts]
    det = LanguageDetector("langdetect-rs", 0)
    b = [det.detect_langs(t) for t in reversed(texts)][::-1]
    assert a == b
    assert pickle.loads(pickle.dumps(det)).detect_langs(texts[0]) == a[0]
    with pytest.raises(ValueError, match="unknown language backend"):
        LanguageDetector("cld3")


def test_switches_and_config_checks(vocab: EnglishVocab) -> None:
    lenient = TextFilter(replace(TextFilterConfig(), english=False, drop_machine_made=False), vocab)
    assert lenient.check("Orologio da parete")[1] is None
    assert lenient.check("IMG_1234")[1] is None
    with pytest.raises(ConfigError):
        TextFilterConfig(min_chars=10, max_chars=5)
    with pytest.raises(ConfigError):
        TextFilterConfig(english_min_prob=1.5)
    with pytest.raises(ConfigError):
        TextFilterConfig(short_detector_min_prob=-0.1)
    with pytest.raises(ConfigError, match="long_max_foreign_share"):
        TextFilterConfig(long_max_foreign_share=1.5)
    with pytest.raises(ConfigError, match="english_lead_zipf"):
        TextFilterConfig(english_lead_zipf=-0.5)
    with pytest.raises(ConfigError, match="foreign_absent_known_min_zipf"):
        TextFilterConfig(foreign_absent_known_min_zipf=12.0)
    with pytest.raises(ConfigError, match="gloss_max_foreign_zipf"):
        TextFilterConfig(gloss_max_foreign_zipf=-1.0)
    with pytest.raises(ConfigError, match="foreign_unknown_min_zipf"):
        TextFilterConfig(foreign_unknown_min_zipf=10.0)
    with pytest.raises(ConfigError, match="english_min_letters"):
        TextFilterConfig(english_min_letters=0)
    with pytest.raises(ConfigError, match="place_name_max_foreign_lead"):
        TextFilterConfig(place_name_max_foreign_lead=-1.0)
    # None turns each rule off: accepted at load (the loop above shows a bad value is not)
    TextFilterConfig(english_lead_zipf=None, foreign_absent_known_min_zipf=None, long_max_foreign_share=None)


def test_pickled_filter_gives_the_same_answers(text_filter: TextFilter) -> None:
    clone = pickle.loads(pickle.dumps(text_filter))
    captions = ["card", "IMG_1234", "Pomodori", "A cat on a mat", "Una foto di un cane che corre sulla spiaggia"]
    assert clone.reasons(captions) == text_filter.reasons(captions)


def test_reason_examples() -> None:
    examples = reason_examples(["a", "b", "a", "c", "x" * 300], ["r1", "r1", "r1", None, "r2"], per_reason=5)
    assert examples == {"r1": ["a", "b"], "r2": ["x" * 117 + "..."]}


def test_place_names_pass_does_not_ask_the_detector_again(text_filter: TextFilter) -> None:
    class Counting:
        def __init__(self, inner: object) -> None:
            self.inner, self.asked = inner, []

        def english_probability(self, caption: str) -> float:
            self.asked.append(caption)
            return self.inner.english_probability(caption)

    cfg, vocab = text_filter.cfg, text_filter.vocab
    caption = "Una foto della cattedrale di Murcia al tramonto"  # long: the long-caption detector decides
    detector = Counting(text_filter.detector)
    with_names = english_verdict(caption, vocab, detector, cfg, foreign=text_filter.foreign,
                                 short_detector=text_filter.short_detector, names=text_filter.names)
    assert with_names.names > 0 and not with_names.english  # judged twice: with and without "Murcia"
    assert detector.asked == [caption]  # one question for the two passes
    without = english_verdict(caption, vocab, text_filter.detector, cfg, foreign=text_filter.foreign,
                              short_detector=text_filter.short_detector)
    assert with_names.p_english == without.p_english


def test_languages_beyond_the_six_are_foreign_evidence(text_filter: TextFilter, vocab: EnglishVocab) -> None:
    # rounds 1-6 knew it fr es pt de nl only (and no lingua): these were neutral words, so English
    six = TextFilter(replace(TextFilterConfig(), foreign_languages=("it", "fr", "es", "pt", "de", "nl"),
                             neutral_lid_languages=()), vocab)
    for caption in ("tandborste", "gravid kvinna", "blyertspenna", "hammasharja"):
        assert six.check(caption)[1] is None, caption
        assert text_filter.check(caption)[1] == NOT_ENGLISH, caption
    for caption in ("toothbrush", "pregnant woman", "pencil", "a red apple on a table"):
        assert text_filter.check(caption)[1] is None, caption


def test_english_country_names_never_read_foreign(text_filter: TextFilter) -> None:
    # Romanian, Finnish, Catalan use these far more than English, but they are English's names
    for caption in ("Moldova", "Oman", "Andorra", "Palau", "flag of Moldova"):
        assert text_filter.check(caption)[1] is None, caption
    foreign = text_filter.foreign
    assert text_filter.names.reads_foreign(["piemonte"], foreign) and not text_filter.names.reads_foreign(["moldova"], foreign)


def test_a_gloss_leads_in_the_languages_of_the_foreign_words(text_filter: TextFilter) -> None:
    foreign = text_filter.foreign
    # "cat" is not distinctly English among 26 languages (Romanian "cât" folds to it), but it leads Italian
    assert not foreign.distinctly_english("cat")
    italian = foreign.home_languages("gatto")
    assert italian == {foreign.languages.index("it")} and foreign.leads_in("cat", italian)
    for caption in ("Gatto Cat", "Valigie bags", "heart-ballons"):
        assert text_filter.check(caption)[1] is None, caption
    assert foreign.home_languages("qwzxq") == frozenset() and foreign.language_zipfs("gatto")[foreign.languages.index("it")] > 4
