"""The one typed config of witflow.

Frozen dataclasses loaded from YAML. Unknown keys and wrong types are rejected with the dotted
key path in the message; cross-field checks run at load time (``__post_init__``); the resolved
config is written beside every output as ``config.resolved.yaml``. Only entrypoints (the CLI,
flows) read config; library code takes explicit arguments.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import SecretStr

RESOLVED_CONFIG_NAME = "config.resolved.yaml"
EXPORT_DIR = "export"  # the trained model (OpenAI-layout weights + configs), inside the training run
TRAIN_CACHE_DIR = Path("runs") / ".train-cache"  # local run directories of trainings bound for object storage
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin")  # a checkpoint path ending so is a weights file, else a directory


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


REDACTED = "***"  # what a secret is written as, wherever a config is written


class Secret(SecretStr):
    """A credential. It is shown as ``***`` wherever a config is written (``to_dict``: the resolved
    YAML, manifests, run configs, artifacts) and as ``**********`` in reprs and in Prefect's stored
    flow-run parameters (Prefect encodes pydantic secrets so); only :meth:`reveal` gives the value,
    to the one client that needs it. It pickles with its value: Ray workers need it too."""

    def reveal(self) -> str:
        return self.get_secret_value()


# --------------------------------------------------------------------------------------------
# Sections. Each stage owns one section; defaults are the documented recipe values.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageConfig:
    """Object storage. Credentials default to the standard AWS environment/profile chain."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 for an S3-compatible server
    region: str | None = None
    # Secrets (a str given here becomes one). Better kept out of config files and deployment
    # parameters altogether: the standard AWS environment/profile chain is used when these are null.
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    retries: int = 5
    backoff_s: float = 0.5  # first retry waits this long; doubles each time (with jitter)
    multipart_threshold_mb: int = 64

    def __post_init__(self) -> None:
        for name in ("access_key_id", "secret_access_key"):
            value = getattr(self, name)
            if isinstance(value, (str, SecretStr)) and not isinstance(value, Secret):
                value = Secret(value if isinstance(value, str) else value.get_secret_value())
                object.__setattr__(self, name, value)
            if value is not None and value.reveal() in (REDACTED, "**********"):
                raise ConfigError(f"storage.{name}: {value.reveal()!r} is a redacted value, not a credential; "
                                  "pass credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
        if self.retries < 0:
            raise ConfigError("storage.retries must be >= 0")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError("storage.access_key_id and storage.secret_access_key go together")

    def __repr__(self) -> str:  # never print secrets
        return (f"StorageConfig(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"access_key_id={'***' if self.access_key_id else None}, retries={self.retries})")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS if set, else a local ray.init()
    num_cpus: int | None = None  # local only; None lets Ray count the cores
    include_dashboard: bool = False  # the dashboard costs ~1 GiB on a small machine
    object_store_memory_mb: int | None = None
    # Joining a cluster: ship the project's packages to its workers (runtime_env py_modules), so they
    # need its Python environment but not this checkout; false when every node has the checkout.
    ship_code: bool = True


@dataclass(frozen=True)
class QueriesConfig:
    output: str = "queries"  # relative to Config.output unless it is a full URI
    unigram_counts: str | None = "pywordfreq"  # a `word count` file, or the packaged counts
    # enwiki-*-pages-articles*.xml.bz2 (multistream or not); when given, unigrams and bigrams are
    # counted from them (Ray map-reduce) and unigram_counts/bigram_counts are not used.
    wikipedia_dumps: tuple[str, ...] = ()
    # `w1 w2 count` file, or "wordsegment": the Google Web 1T bigram counts shipped in the
    # wordsegment package (not Wikipedia). PMI needs unigram counts and the token total of the same
    # corpus: packaged for "wordsegment"; for a file, bigram_unigram_counts (default: unigram_counts)
    # and bigram_total_tokens (default: the sum of those counts).
    bigram_counts: str | None = "wordsegment"
    bigram_unigram_counts: str | None = None
    bigram_total_tokens: int | None = None
    min_unigram_count: int = 100
    bigram_min_count: int = 100
    bigram_min_pmi: float = 4.907  # bits: log2(p(a,b) / (p(a) p(b))); 4.907 = log2(30), see tasks/queries/bigrams.py
    pageviews: tuple[str, ...] = ()  # pageviews-YYYYMMDD-HH0000.gz files
    min_title_views: int = 70
    wordnet_dir: str | None = "auto"  # WordNet 3.0 files (infra/wordnet.py); "auto": found or an error; None: none
    max_queries: int = 500_000
    priority: tuple[str, ...] = ("wordnet", "unigram", "bigram", "title")  # budget order
    work_dir: str | None = None  # local dir for dump-count spills (a rerun skips counted blocks); None: temp
    count_partitions: int = 16  # hash partitions of the dump counts (one reduce task each)
    count_max_entries: int = 2_000_000  # counts a worker holds before it spills to disk

    def __post_init__(self) -> None:
        if self.max_queries <= 0:
            raise ConfigError("queries.max_queries must be > 0")
        known = ("wordnet", "unigram", "bigram", "title")
        if any(p not in known for p in self.priority) or len(set(self.priority)) != len(self.priority):
            raise ConfigError(f"queries.priority: each of {list(known)} at most once, got {list(self.priority)}")
        if min(self.min_unigram_count, self.bigram_min_count, self.min_title_views) < 1:
            raise ConfigError("queries.min_unigram_count, bigram_min_count and min_title_views must be >= 1")
        if self.count_partitions < 1 or self.count_max_entries < 1:
            raise ConfigError("queries.count_partitions and count_max_entries must be >= 1")


# The named boilerplate patterns of tasks/captions.py (each a drop reason of the caption step).
CAPTION_PATTERNS = ("date_stamp", "collection_stamp", "author_credit", "email_address", "converted_from")


def caption_field_parts(name: str) -> tuple[str, ...]:
    """The fields a caption field name joins: "caption+keywords" -> ("caption", "keywords")."""
    return tuple(name.split("+"))


@dataclass(frozen=True)
class CaptionConfig:
    """How a source's caption is made from its text fields (tasks/captions.py): the first of
    ``fields`` that is not empty, not caught by a named pattern and not boilerplate, then each of
    ``append`` that passes the same checks and has at most ``append_max_chars`` characters.

    A name may join fields with ``+`` ("caption+keywords"): one field, the first one's text then
    the others' items (a list's elements) that neither repeat an earlier item nor, ignoring case,
    the first one's text, joined with ", "."""

    # "caption": the caption column; other names: keys of the row's meta; "a+b": joined (above)
    fields: tuple[str, ...] = ("caption",)
    append: tuple[str, ...] = ()
    append_max_chars: int = 120
    append_separator: str = ". "
    patterns: tuple[str, ...] = CAPTION_PATTERNS

    def text_fields(self) -> tuple[str, ...]:
        """Every field the policy reads (the parts of joined names too), once each, in order."""
        return tuple(dict.fromkeys(part for name in (*self.fields, *self.append) for part in caption_field_parts(name)))

    def __post_init__(self) -> None:
        if not self.fields:
            raise ConfigError("caption.fields must name at least one field")
        for name in (*self.fields, *self.append):
            if not all(part.strip() for part in caption_field_parts(name)):
                raise ConfigError(f"caption: field name {name!r} has an empty part (join fields as a+b)")
        unknown = sorted(set(self.patterns) - set(CAPTION_PATTERNS))
        if unknown:
            raise ConfigError(f"caption.patterns: unknown {unknown} (known: {list(CAPTION_PATTERNS)})")
        if self.append_max_chars < 1:
            raise ConfigError("caption.append_max_chars must be >= 1")


@dataclass(frozen=True)
class SourceConfig:
    """One input of (image, caption) pairs (tasks/readers.py)."""

    kind: Literal["parquet", "csv", "tsv", "jsonl", "webdataset", "directory", "openclipart", "emoji"]
    path: str  # a file, a folder of them, or a glob; relative to the working directory
    url_column: str = "url"  # also the URL key of WebDataset .json members
    caption_column: str = "caption"  # also the caption key of .json members and sidecars
    image_column: str | None = None  # inline image bytes (base64 text in CSV/JSONL)
    path_column: str | None = None  # local image path, relative to the manifest's folder
    id_column: str | None = None  # stable row ids (default: row number in the file)
    rows_per_input_shard: int = 2_000  # WebDataset: one input shard per tar instead
    # openclipart / emoji: a preset of ``caption``: its field "caption" (the title; emoji: the CLDR
    # name) becomes "caption+keywords" ("cat face, animal, cat, face, kitten"); false: the title alone
    caption_keywords: bool = False
    caption: CaptionConfig = field(default_factory=CaptionConfig)  # which text fields make the caption

    def __post_init__(self) -> None:
        if self.rows_per_input_shard <= 0:
            raise ConfigError(f"sources.{self.kind}:{self.path}: rows_per_input_shard must be > 0")
        if not self.path:
            raise ConfigError(f"sources.{self.kind}: path must not be empty")
        if self.caption_keywords and self.kind not in ("openclipart", "emoji"):
            raise ConfigError(f"sources.{self.kind}:{self.path}: caption_keywords is for kinds openclipart and emoji")
        if self.caption_keywords:  # the preset, resolved here: one caption mechanism downstream
            object.__setattr__(self, "caption", with_keywords(self.caption))


def with_keywords(policy: CaptionConfig) -> CaptionConfig:
    """The ``caption_keywords`` preset: the caption field is the caption then its keywords
    (idempotent: a resolved config loads to the same policy)."""
    def joined(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple("caption+keywords" if n == "caption" else n for n in names)

    return dataclasses.replace(policy, fields=joined(policy.fields), append=joined(policy.append))


@dataclass(frozen=True)
class GatherConfig:
    """HTTP fetching (tasks/gather.py). Timeouts apply per attempt; retries only on 429/5xx/connection errors."""

    concurrency: int = 64  # requests in flight per gather call
    per_host_concurrency: int = 16
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # longest silence between received chunks
    total_timeout_s: float = 30.0  # budget for one attempt: every redirect hop, headers and body
    max_bytes: int = 20_000_000  # enforced while streaming, not only from Content-Length
    retries: int = 2  # extra attempts after the first
    backoff_s: float = 0.5  # first retry waits this long; doubles each time (with jitter)
    max_backoff_s: float = 10.0  # also caps a server's Retry-After
    max_redirects: int = 5
    allow_private_addresses: bool = False  # private/reserved/link-local/loopback after DNS resolution
    allow_loopback: bool = False  # loopback only (tests and the demo's local server)
    honour_noai: bool = True
    noai_directives: tuple[str, ...] = ("noai", "noimageai")  # X-Robots-Tag opt-outs
    dedupe_urls: bool = True
    user_agent: str = "witflow/0.1 (+https://github.com/witflow/witflow)"

    def __post_init__(self) -> None:
        if self.concurrency <= 0 or self.per_host_concurrency <= 0:
            raise ConfigError("gather.concurrency and gather.per_host_concurrency must be > 0")
        if min(self.connect_timeout_s, self.read_timeout_s, self.total_timeout_s) <= 0:
            raise ConfigError("gather timeouts must be > 0")
        if self.max_bytes <= 0:
            raise ConfigError("gather.max_bytes must be > 0")
        if self.retries < 0 or self.max_redirects < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigError("gather.retries, max_redirects, backoff_s and max_backoff_s must be >= 0")


# wordfreq 3.x available_languages("best") written in the Latin alphabet (checked by script: >= 99.9%
# of the letters of each list's top 3,000 words are LATIN), English left out; "sh": Serbo-Croatian in
# Latin letters, "nb": Norwegian Bokmål, "fil": Filipino
LATIN_SCRIPT_WORDFREQ_LANGUAGES = ("ca", "cs", "da", "de", "es", "fi", "fil", "fr", "hu", "id", "is", "it", "lt", "lv",
                                   "ms", "nb", "nl", "pl", "pt", "ro", "sh", "sk", "sl", "sv", "tr", "vi")


@dataclass(frozen=True)
class TextFilterConfig:
    min_chars: int = 3
    max_chars: int = 1_000
    min_words: int = 1
    english: bool = True
    language_backend: Literal["langdetect", "langdetect-rs"] = "langdetect-rs"  # rs: same answers, ~50x faster
    language_seed: int = 0
    drop_machine_made: bool = True
    unescape_html: bool = True  # "&amp;" -> "&" once, before the filters
    # English policy (tasks/text_filter.py): captions of <= short_caption_words words are decided by
    # the evidence of their words (the short detector settles the mixed and unknown ones); longer
    # ones by the words when confident, else by the detector (langdetect).
    short_caption_words: int = 4
    english_min_coverage: float = 0.5  # short captions: share of words that must be English-known
    english_confident_coverage: float = 0.7  # long captions: English without asking the detector
    english_min_prob: float = 0.5  # long captions: the detector's minimum P(en)
    vocab_min_count: int = 10_000  # English-Wikipedia count that makes a word English-known
    wordnet_dir: str | None = "auto"  # WordNet for the English lexicon (infra/wordnet.py); None: counts only
    # Short captions by the evidence of their words (tasks/text_filter.ForeignWords): Zipf frequencies
    # (wordfreq) of English and of these languages; empty: the share of English-known words alone.
    # Default: every language of wordfreq's "best" lists written in the Latin alphabet, but English
    # (rounds 1-6 had it fr es pt de nl only: Swedish, Czech... words were no evidence).
    foreign_languages: tuple[str, ...] = LATIN_SCRIPT_WORDFREQ_LANGUAGES
    foreign_margin: float = 1.75  # an English-known word this much more frequent elsewhere is foreign...
    foreign_min_zipf: float = 3.5  # ...when it is this frequent there (a word not English-known: enough alone)
    english_common_zipf: float = 3.5  # ...and rarer than this in English ("sole", "corps" stay English)
    foreign_absent_min_zipf: float = 1.0  # a word English never uses, this frequent elsewhere, is foreign
    # ...and so is an English-known word (a compound, a name in Wikipedia) English never uses, when it
    # is this frequent elsewhere ("puntine": pun + tine); None: English-known words are exempt
    foreign_absent_known_min_zipf: float | None = 2.0
    # A word at least this much more frequent in English than in every foreign language is distinctly
    # English ("scissors", "bags"; not "figure", "protection"): a short caption with one is English even
    # beside foreign words (an English title with a gloss); None: mixed captions go to the detector
    english_lead_zipf: float | None = 0.5
    # ...and a word this frequent in a foreign language needs as much more lead for each Zipf above
    # it (French "issue" is not a gloss; "and", far more English, still is); None: the lead alone
    gloss_max_foreign_zipf: float | None = 4.3
    # A word no list has but one of foreign_languages uses at least this much, and foreign_margin more
    # than English, is foreign ("rondelle", "securite" without its accent); None: unknown, as before
    foreign_unknown_min_zipf: float | None = 2.5
    # English-known words shorter than this are English evidence only when English leads by
    # english_lead_zipf ("of", "uk"; not "bw", "cd", "ak": abbreviations every language uses); 1: all
    english_min_letters: int = 3
    # The accentless spelling of a word of foreign_languages is that word too ("entree", "telephone",
    # "eteindre" for entrée, téléphone, éteindre) where a margin rule guards it, and for the
    # distinctly-English lead; false: words are looked up as written
    foreign_fold_accents: bool = True
    # Where a machine keeps the word-frequency index of English and foreign_languages
    # (tasks/word_frequencies.py: built once, ~12 s and ~170 MB, then mapped by every worker):
    # "auto" is $XDG_CACHE_HOME/witflow (~/.cache/witflow); None: each process builds it in memory
    frequency_cache: str | None = "auto"
    # A word that is neither English nor foreign evidence and is used under this Zipf in English and
    # in every foreign language (made-up names, brands: "Kexi", "Perogies") is no evidence: a caption
    # turned down is judged again without such words (and place names), one of them only is English;
    # None: they go to the short detector as before
    neutral_max_zipf: float | None = 2.5
    # ...unless lingua (lingua-language-detector, its models in its wheel), over English and these
    # languages (ISO 639-1: languages no wordfreq list has, so their words are all "neutral", and
    # since round 9 Swedish, Danish and Norwegian Bokmål, whose compounds no list has: "brandslukker"),
    # is at least neutral_lid_min_prob confident that the caption's neutral words are one of them
    # rather than English: such a caption is not English ("lumememm", "llosgfynydd"); empty: off
    neutral_lid_languages: tuple[str, ...] = ("et", "ga", "cy", "eu", "sv", "da", "nb")
    neutral_lid_min_prob: float = 0.95
    # ...and lingua is asked only about the neutral words English uses less than this Zipf: one
    # English writes at least that often is a brand or a term, not a word of an unlisted language
    # ("gitlab", "winrar"); None: about every neutral word
    neutral_lid_max_english_zipf: float | None = 1.5
    # A word not English-known that English uses at least shared_word_min_zipf and no less than
    # shared_word_margin Zipf under any foreign language is English evidence: a brand, product,
    # loanword or slang every language writes or none lists ("reddit", "ubuntu", "github", "lol");
    # None: off (such a word is foreign evidence when a language uses it at foreign_min_zipf)
    shared_word_margin: float | None = 0.5
    shared_word_min_zipf: float = 2.5
    # A caption the rules turn down is English when it has exactly two segments (split at " - ", " / ",
    # commas, colons, brackets) and one is English evidence only, as many words as the other or more: a
    # gloss ("Cani e gatti, Cat and dog", "Lens, lente"); not a title + keywords ("Vacca pezzata, mammal")
    gloss_segments: bool = True
    # Long captions: the known-word share decides only while at most this share of the words is
    # foreign evidence, and no foreign evidence with english_min_coverage English words is English;
    # None: the known-word share alone (no word evidence for long captions)
    long_max_foreign_share: float | None = 0.25
    # Place names (ISO 3166 countries and subdivisions, from pycountry's data) are no evidence of a
    # language: their words that are not English evidence are left out of the verdict, and a caption
    # of names only is English ("Murcia", "Spain - Extremadura"). A name whose every word is at
    # least this many Zipf more frequent in a foreign language than in English reads as that
    # language ("Piemonte", "Bretagne", "Castilla y León") and is judged as before; None: off
    place_name_max_foreign_lead: float | None = 2.02
    # Settles short captions whose words disagree or are all unknown: fastText's lid.176 (it beat
    # langdetect, lingua, CLD2 and py3langid in that role: bench/language_id.py), or none
    short_detector: Literal["fasttext", "langdetect", "langdetect-rs", "none"] = "fasttext"
    short_detector_min_prob: float = 0.45
    # A caption (or caption field) on at least this many different images of the build is
    # boilerplate ("gramastar" on 1,375 stars): the field is skipped (tasks/captions.py); None: off
    boilerplate_min_images: int | None = 20

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ConfigError("text_filter: need 0 <= min_chars <= max_chars")
        if self.boilerplate_min_images is not None and self.boilerplate_min_images < 2:
            raise ConfigError("text_filter.boilerplate_min_images must be >= 2 (or null: off)")
        for name in ("english_min_coverage", "english_confident_coverage", "english_min_prob", "short_detector_min_prob",
                     "neutral_lid_min_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"text_filter.{name} must be in [0, 1]")
        if self.long_max_foreign_share is not None and not 0.0 <= self.long_max_foreign_share <= 1.0:
            raise ConfigError("text_filter.long_max_foreign_share must be in [0, 1] (or null: off)")
        if self.english_min_letters < 1:
            raise ConfigError("text_filter.english_min_letters must be >= 1 (1: every English-known word counts)")
        for name in ("english_lead_zipf", "foreign_absent_known_min_zipf", "gloss_max_foreign_zipf",
                     "foreign_unknown_min_zipf", "place_name_max_foreign_lead", "neutral_max_zipf",
                     "neutral_lid_max_english_zipf", "shared_word_margin", "shared_word_min_zipf"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 9.0:
                raise ConfigError(f"text_filter.{name} must be a Zipf value in [0, 9] (or null: off)")
        if self.neutral_max_zipf is not None and self.neutral_max_zipf > self.foreign_min_zipf:
            # a word that frequent in a foreign language is foreign evidence: "neutral" would be a contradiction
            raise ConfigError(f"text_filter.neutral_max_zipf ({self.neutral_max_zipf}) must be <= foreign_min_zipf "
                              f"({self.foreign_min_zipf})")
        bad = [code for code in self.neutral_lid_languages if not (len(code) == 2 and code.isalpha() and code.islower())
               or code == "en"]
        if bad:
            raise ConfigError(f"text_filter.neutral_lid_languages: {bad} are not ISO 639-1 codes of other languages "
                              "than English")


@dataclass(frozen=True)
class BalanceConfig:
    max_per_query: int = 20_000  # t
    # probability: MetaCLIP's keep-with-p = min(1, t/count), a pair kept if any entry keeps it;
    # exact: never more than t per entry (needs a second reduce: tasks.balance.CapHashes)
    mode: Literal["probability", "exact"] = "probability"
    seed: int = 0  # the per-(seed, sample_id, query_id) hash, not an RNG stream

    def __post_init__(self) -> None:
        if self.max_per_query <= 0:
            raise ConfigError("balance.max_per_query must be > 0")


@dataclass(frozen=True)
class ImageConfig:
    min_side: int = 16
    max_aspect_ratio: float = 5.0
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb limit
    resize_longest_side: int | None = 256  # downscale only; None keeps the size
    # keep: the original bytes when they already satisfy the rules (no resize, rotation or mode
    # change), else JPEG: bench/image_formats.py measured the training reader fastest on JPEG q95
    # and PNG ~3x dearer to encode.
    encode_format: Literal["JPEG", "PNG", "WEBP", "keep"] = "keep"
    encode_quality: int = 95
    # Downscaling filter, all antialiased; "box" averages areas like OpenCV's INTER_AREA (img2dataset's).
    resample: Literal["bicubic", "bilinear", "lanczos", "box"] = "bicubic"
    # Decoders Pillow may use; other formats (EPS runs Ghostscript, PSD, ICO, ...) are never decoded.
    allowed_formats: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")

    def __post_init__(self) -> None:
        if not 1 <= self.encode_quality <= 100:
            raise ConfigError("images.encode_quality must be in 1..100")
        if self.max_aspect_ratio < 1:
            raise ConfigError("images.max_aspect_ratio must be >= 1")
        if self.min_side < 1 or self.max_pixels < 1:
            raise ConfigError("images.min_side and images.max_pixels must be >= 1")
        if self.resize_longest_side is not None and self.resize_longest_side < 1:
            raise ConfigError("images.resize_longest_side must be >= 1 (or null)")
        if not self.allowed_formats:
            raise ConfigError("images.allowed_formats must not be empty")


@dataclass(frozen=True)
class EvalSetConfig:
    """One evaluation set; the same registry feeds decontamination and evaluation."""

    name: str
    kind: Literal["imagefolder", "parquet", "fashion-mnist", "mnist", "animal-mnist", "openclipart-heldout",
                  "openclipart-concepts", "openclipart-concepts-b", "openclipart-concepts-c",
                  "emoji-heldout"]
    path: str | None = None
    split: str = "test"
    classes: tuple[str, ...] = ()  # empty: taken from the source
    templates: tuple[str, ...] = ()  # empty: CLIP's default template family
    max_images: int | None = None
    image_column: str = "image"  # parquet: encoded bytes or a {bytes, path} struct
    label_column: str = "label"  # parquet: class index or class name
    id_column: str | None = None  # parquet: stable image ids (default: split-rownumber)

    def __post_init__(self) -> None:
        if self.max_images is not None and self.max_images <= 0:
            raise ConfigError(f"eval_sets.{self.name}.max_images must be > 0")
        if self.kind in ("imagefolder", "parquet") and not self.path:
            raise ConfigError(f"eval_sets.{self.name}: kind {self.kind} needs a path")


@dataclass(frozen=True)
class DedupConfig:
    hash_kind: Literal["phash", "dhash", "ahash", "whash"] = "phash"  # within-dataset dedup's hash
    within_radius: int = 4
    within_dataset: bool = True
    against_eval: bool = True
    verify_min_ncc: float = 0.98  # within-dataset pairs must also correlate this well pixel-wise (0 = off)
    low_info_max_std: float = 4.0  # images this flat (grey-level std) are never matched by hash
    # Decontamination (tasks/dedup/copy_detect.py; measured in bench/dedup_quality.py):
    eval_min_score: float = 0.90  # structure score after alignment at which a candidate copies an eval image
    eval_min_score_small: float = 0.98  # the same, for eval images under 32 px (little detail)
    eval_max_hue_shift: float = 0.1  # of the hue circle: a larger mean hue difference is a recolouring
    eval_neighbours: int = 10  # nearest eval images verified per candidate
    eval_views: bool = True  # index crops of each eval image too (cropped copies are found)
    # Within the dataset: hash groups up to this size compare all pairs; bigger ones are split by
    # sub-bands, and what cannot be split compares each row with this many neighbours (the cap).
    max_candidates: int = 16
    task_memory_mb: int = 1024  # memory one task of a global shuffle may use (this dedup, the URL dedup, the caps)

    def __post_init__(self) -> None:
        if not 0 <= self.within_radius <= 32:
            raise ConfigError("dedup.within_radius must be in 0..32")
        if self.max_candidates < 1 or self.task_memory_mb < 1:
            raise ConfigError("dedup.max_candidates and dedup.task_memory_mb must be >= 1")
        if not -1.0 <= self.verify_min_ncc <= 1.0:
            raise ConfigError("dedup.verify_min_ncc must be in [-1, 1]")
        for key in ("eval_min_score", "eval_min_score_small"):
            if not -1.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"dedup.{key} must be in [-1, 1]")
        if not 0.0 <= self.eval_max_hue_shift <= 0.5:
            raise ConfigError("dedup.eval_max_hue_shift must be in [0, 0.5] (a fraction of the hue circle)")
        if not 1 <= self.eval_neighbours <= 1000:
            raise ConfigError("dedup.eval_neighbours must be in 1..1000")


@dataclass(frozen=True)
class ShardConfig:
    output: str = "dataset"  # relative to Config.output unless it is a full URI
    rows_per_shard: int = 10_000
    max_bytes_per_shard: int = 512_000_000
    row_group_rows: int = 1_000
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    # Pairs held out for retrieval evaluation (holdout/; training never reads them): a uniform sample
    # of the deduplicated rows, chosen by a hash of their ids (tasks/shards.select_holdout).
    holdout_rows: int = 0

    def __post_init__(self) -> None:
        if self.rows_per_shard <= 0 or self.max_bytes_per_shard <= 0 or self.row_group_rows <= 0:
            raise ConfigError("shards.rows_per_shard, shards.max_bytes_per_shard and shards.row_group_rows must be > 0")
        if self.holdout_rows < 0:
            raise ConfigError("shards.holdout_rows must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    output: str = "train"  # relative to Config.output unless it is a full URI
    model: str = "tiny"  # a named model config (trainer/model_configs)
    zero_stage: Literal[0, 1, 2, 3] = 2
    # The ZeRO stage to run instead when training on one rank (world_size 1), where ZeRO partitions
    # nothing: 0 skips ZeRO-2's gradient buckets and second fp32 weight copy for the same maths
    # (bench/train.py); logged at start. None: zero_stage on any world size.
    single_rank_zero_stage: Literal[0] | None = None
    # ZeRO 1/2: the gradient norm in one foreach call (fp32 per tensor, as clip_grad_norm_ takes it,
    # not DeepSpeed's fp64 loop) and no all-reduce over a group of one rank (trainer/zero.py);
    # false: DeepSpeed's own code, as runs trained before these shortcuts did.
    zero_shortcuts: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch: int = 32
    grad_accum: int = 1
    world_size: int = 1
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 10
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_checkpointing: bool = False
    num_workers: int = 0
    shuffle_buffer: int = 1_000
    crop_scale: tuple[float, float] = (0.9, 1.0)  # random resized crop: area range (open_clip's default)
    # Each epoch, a random subset of a caption's comma-separated parts (title, keywords) in random order
    caption_sampling: bool = False
    # Sentence frames ("a picture of {}"): each epoch a sample's caption is put in a random one with
    # probability caption_frame_prob, so captions that are keyword lists also read as the sentences
    # web alt-texts are (and prompt templates are). Chosen per (seed, epoch, row); () = off.
    caption_frames: tuple[str, ...] = ()
    caption_frame_prob: float = 0.5
    seed: int = 0
    save_every_steps: int = 100
    log_every_steps: int = 10
    keep_checkpoints: int = 2  # older checkpoints are deleted once a newer one is complete
    # MetaCLIP's online balancing in the loader (trainer.data.OnlineBalance): each epoch redraws the
    # pairs with probability t/count per query, coins reseeded per epoch; None: every pair, every epoch.
    # Beside (not instead of) the build-time cap, balance.max_per_query.
    balance_online_t: int | None = None
    # Learning curve: zero-shot accuracy on these eval sets (names in eval_sets) every N steps; 0: off
    curve_every_steps: int = 0
    curve_eval_sets: tuple[str, ...] = ()
    # When train.output holds a run trained on another dataset (trainer/provenance.py): "refuse"
    # stops with an error; "restart" sets that run aside (superseded/) and trains afresh, logged.
    on_dataset_change: Literal["refuse", "restart"] = "refuse"

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError("train.crop_scale: need 0 < low <= high <= 1")
        if self.balance_online_t is not None and self.balance_online_t <= 0:
            raise ConfigError("train.balance_online_t must be > 0 (or null for no online balancing)")
        if self.curve_every_steps < 0:
            raise ConfigError("train.curve_every_steps must be >= 0")
        for frame in self.caption_frames:
            if not isinstance(frame, str) or frame.count("{}") != 1 or "{" in frame.replace("{}", ""):
                raise ConfigError(f"train.caption_frames: {frame!r} needs exactly one '{{}}' for the caption")
        if not 0 <= self.caption_frame_prob <= 1:
            raise ConfigError("train.caption_frame_prob must be in [0, 1]")
        if self.curve_every_steps and not self.curve_eval_sets:
            raise ConfigError("train.curve_every_steps needs train.curve_eval_sets (eval set names)")
        if self.curve_every_steps and self.zero_stage == 3:
            raise ConfigError("train.curve_every_steps: the curve scores rank 0's whole model, which ZeRO-3 "
                              "partitions; use zero_stage <= 2")
        if self.micro_batch <= 0 or self.grad_accum <= 0 or self.world_size <= 0:
            raise ConfigError("train.micro_batch, train.grad_accum and train.world_size must be > 0")
        if self.num_workers < 0 or self.save_every_steps <= 0 or self.log_every_steps <= 0:
            raise ConfigError("train.num_workers must be >= 0; train.save_every_steps and log_every_steps > 0")
        if self.keep_checkpoints < 1:
            raise ConfigError("train.keep_checkpoints must be >= 1")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError("train.max_steps must be > 0 (or null for train.epochs passes)")
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("train.lr must be > 0 and train.warmup_steps >= 0")

    @property
    def train_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def effective_zero_stage(self) -> int:
        """The ZeRO stage DeepSpeed runs: ``single_rank_zero_stage`` on one rank when set, else ``zero_stage``."""
        if self.world_size == 1 and self.single_rank_zero_stage is not None:
            return self.single_rank_zero_stage
        return self.zero_stage


@dataclass(frozen=True)
class EvalConfig:
    output: str = "eval"  # beside the checkpoint's weights (<export>/eval/) unless a full URI/absolute path
    batch_size: int = 256
    retrieval: bool = True  # image<->text recall on the build's held-out pairs (shards.holdout_rows)
    linear_probe: bool = True
    ensembles: bool = True  # also score the bare class name and "a photo of a {}." against the ensemble
    model_config: str | None = None  # for a bare OpenAI-layout state dict: a named model config or JSON path

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError("evaluate.batch_size must be > 0")


@dataclass(frozen=True)
class Config:
    """The whole of witflow's configuration."""

    name: str = "witflow"
    output: str = "runs/witflow"  # root URI (path, file://, s3://bucket/prefix) of every output
    seed: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    sources: tuple[SourceConfig, ...] = ()
    gather: GatherConfig = field(default_factory=GatherConfig)
    text_filter: TextFilterConfig = field(default_factory=TextFilterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    eval_sets: tuple[EvalSetConfig, ...] = ()
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        names = [e.name for e in self.eval_sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"eval_sets: duplicate names {dupes}")
        unknown = sorted(set(self.train.curve_eval_sets) - set(names))
        if unknown:
            raise ConfigError(f"train.curve_eval_sets: {unknown} not among eval_sets ({names})")

    def uri(self, sub: str) -> str:
        """Resolve a section's output (relative to ``output`` unless already absolute)."""
        if "://" in sub or sub.startswith("/"):
            return sub
        return self.output.rstrip("/") + "/" + sub

    # The output locations: these methods are their only definition.

    def queries_uri(self) -> str:
        """The query list's directory (queries.parquet, its manifest, the resolved config)."""
        return self.uri(self.queries.output)

    def dataset_uri(self) -> str:
        """The dataset's root: shards/, holdout/, reports/, work/, manifest.json."""
        return self.uri(self.shards.output)

    def manifest_uri(self) -> str:
        """The dataset's manifest."""
        from infra.manifest import MANIFEST_NAME  # infra.manifest imports this module

        return self.dataset_uri().rstrip("/") + "/" + MANIFEST_NAME

    def eval_index_uri(self) -> str:
        """The versioned perceptual-hash index of the eval sets."""
        return self.uri("eval_index")

    def train_uri(self) -> str:
        """Where the training run's outputs belong (a path or an object-storage URI)."""
        return self.uri(self.train.output)

    def train_dir(self) -> Path:
        """The local run directory (checkpoints, log, export): train.output when it is local, else a
        local cache named after the run (DeepSpeed writes files)."""
        uri = self.train_uri()
        if "://" in uri and not uri.startswith("file://"):
            return TRAIN_CACHE_DIR / self.name
        return Path(uri.removeprefix("file://"))

    def export_uri(self) -> str:
        """The trained model's export under train.output (in object storage a copy of train_dir()'s)."""
        return self.train_uri().rstrip("/") + "/" + EXPORT_DIR

    def eval_uri(self, checkpoint: str | None = None) -> str:
        """Where the evaluation of ``checkpoint`` (default: this run's export) goes: evaluate.output
        as is when it is a full URI or an absolute path, else beside the checkpoint's weights."""
        output = self.evaluate.output
        if "://" in output or output.startswith("/"):
            return output.rstrip("/")
        return checkpoint_dir(checkpoint or self.export_uri()).rstrip("/") + "/" + output.strip("/")


def checkpoint_dir(checkpoint: str) -> str:
    """The directory of a checkpoint: an export directory itself, or the folder of a weights file."""
    stripped = checkpoint.rstrip("/")
    if stripped.endswith(WEIGHTS_SUFFIXES):
        return stripped.rpartition("/")[0] or "."
    return stripped


# --------------------------------------------------------------------------------------------
# Loading: dict -> dataclass with key paths in every error.
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(errors) == 1 else
                          f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}.{i}") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{path}.{i}") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {k: _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept float literals written that way.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Secret:
        if isinstance(value, SecretStr):
            return Secret(value.get_secret_value())
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__}")
        return Secret(value)
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(f"{path}.{k}" if path else str(k) for k in unknown)
        raise ConfigError(f"unknown key(s): {keys} (known under {where}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A config (or part of one, or any record of dataclasses) as plain YAML/JSON-able data;
    an object with its own ``to_dict`` (a funnel) gives that. A secret is written as ``***``: the
    one redaction of every place a config is written (the resolved YAML, manifests, artifacts)."""
    if isinstance(obj, SecretStr):
        return REDACTED
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if callable(getattr(obj, "to_dict", None)):
        return obj.to_dict()
    return obj


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            idx = int(key)
            node = node[idx]
            continue
        if key not in node or node[key] is None:
            node[key] = [] if nxt.isdigit() else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx == len(node):
            node.append(value)
        else:
            node[idx] = value
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            _set_path(data, key, yaml.safe_load(raw) if raw != "" else "")
        except (IndexError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"override {key}: cannot set ({e})") from None
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    return _build(Config, data, "")


def config_from_dict(data: dict) -> Config:
    """Build a Config from plain data (e.g. the ``config`` saved in a manifest or checkpoint)."""
    return _build(Config, data, "")


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text (secrets redacted, as ``to_dict`` writes them)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
