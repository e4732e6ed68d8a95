"""trainer.tokenizer: token-for-token equality with OpenAI's tokenizer (open_clip's copy).

open_clip's ``tokenizer.py`` is OpenAI's ``simple_tokenizer`` (MIT) plus options we do not use. It is
loaded by file path so the ``open_clip`` package (which needs torchvision) is never imported.
"""

from __future__ import annotations

import importlib.util
import random

import pyarrow.parquet as pq
import pytest
import torch

from trainer.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, Tokenizer, clean_text, default_bpe_path, tokenize


@pytest.fixture(scope="module")
def reference():
    path = default_bpe_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_openai_reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path=str(default_bpe_path()))


TEXTS = [
    "a photo of a cat.", "A Photo Of A CAT!!!", "", "   ", "x", "it's we'll they'd I'M you've can't",
    "Héllo wörld — naïve café résumé", "日本語のテキストと漢字", "Ελληνικά κείμενα", "Русский текст, 123",
    "emoji 🐱🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵", "tabs\tand\nnewlines\r\n  collapse", "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;q&quot;",
    "mojibake: cafÃ© â€œquotedâ€\x9d", "numbers 3.14159 and 1,000,000 and 2026-11-23", "snake_case and kebab-case and CamelCase",
    "URL https://example.com/path?q=1&x=y#frag", "\u200bzero\u200bwidth\u00a0nbsp", "a" * 300,
    " ".join(["word"] * 200), "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "price: $9.99 / €7,50 / ¥1000", "C++ & C# & F#", "🙂" * 100,
]


def test_known_ids_for_a_fixed_string():
    # ids read off OpenAI's vocabulary: "a"=320, "photo"=1125, "of"=539, "cat"=2368, "."=269
    assert tokenize(["a photo of a cat."])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]


def test_equal_to_openai_tokenizer_on_tricky_texts(reference):
    ours = tokenize(TEXTS)
    theirs = reference(TEXTS, context_length=CONTEXT_LENGTH)
    for i, text in enumerate(TEXTS):
        assert ours[i].tolist() == theirs[i].tolist(), text


def test_equal_to_openai_tokenizer_on_sample_captions_and_random_unicode(reference, sample_parquet):
    table = pq.read_table(sample_parquet, columns=["title", "description"])
    texts = [t for t in table.column("title").to_pylist()[:400]]
    texts += [d for d in table.column("description").to_pylist()[:200] if d]
    rng = random.Random(0)
    alphabet = [chr(c) for c in list(range(32, 0x2FF)) + list(range(0x3040, 0x30FF)) + list(range(0x1F300, 0x1F64F))]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(300)]
    assert torch.equal(tokenize(texts), reference(texts))


def test_truncation_keeps_eot_last_and_padding_is_zero():
    long_text = " ".join(f"w{i}" for i in range(200))
    tokens = tokenize([long_text, "short"])
    assert tokens.shape == (2, CONTEXT_LENGTH) and tokens.dtype == torch.long
    assert tokens[0, 0] == 49406 and tokens[0, -1] == 49407 and (tokens[0] > 0).all()
    short = Tokenizer().encoder["short</w>"]
    assert tokens[1].tolist()[:4] == [49406, short, 49407, 0] and tokens[1, 3:].eq(0).all()
    assert tokenize(["short"], context_length=5).tolist() == [[49406, short, 49407, 0, 0]]
    assert int(tokens.max()) == VOCAB_SIZE - 1  # EOT is the largest id: the model finds it by argmax


def test_clean_text_and_decode():
    assert clean_text("  A&amp;amp;B\n\tC  ") == "a&b c"
    tokenizer = Tokenizer()
    ids = tokenizer.encode("Hello, wörld! 🐱")
    assert tokenizer.decode(ids).strip() == "hello , wörld ! 🐱"


def test_missing_vocabulary_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "nope.txt.gz")
