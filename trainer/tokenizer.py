"""CLIP's byte-level BPE tokenizer (OpenAI's ``simple_tokenizer``), token for token.

The merges file ``bpe_simple_vocab_16e6.txt.gz`` (MIT, OpenAI) ships inside the installed
``open_clip_torch`` package; we find it on disk without importing ``open_clip`` (whose import pulls
in torchvision, which is absent here).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import ftfy
import regex
import torch

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408  # 256 bytes x2 (+ end-of-word) + 48,894 merges + start/end tokens
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"


def default_bpe_path() -> Path:
    """The merges file inside the installed ``open_clip`` package directory."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / BPE_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{BPE_FILENAME} not found: install open_clip_torch (pip install --no-deps "
                            "open_clip_torch); it ships CLIP's BPE vocabulary")


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (so BPE never sees whitespace/control bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clean_text(text: str) -> str:
    """CLIP's clean-up: ftfy, HTML unescape (twice), whitespace collapsed, lower-cased."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class Tokenizer:
    """CLIP's BPE. ``encode`` gives ids without start/end; ``__call__`` pads/truncates to a batch."""

    def __init__(self, bpe_path: str | Path | None = None):
        path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
        merges_text = gzip.open(path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1:49152 - 256 - 2 + 1]]
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        if len(vocab) != VOCAB_SIZE:
            raise ValueError(f"{path}: expected a vocabulary of {VOCAB_SIZE}, got {len(vocab)}")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self._cache: dict[str, list[int]] = {SOT_TOKEN: [self.sot_token_id], EOT_TOKEN: [self.eot_token_id]}
        self.pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)

    def _bpe(self, token: str) -> list[int]:
        """Ids of one pre-token (already byte-mapped), merging the lowest-ranked pair first."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[w] for w in word]
        if len(self._cache) < 1_000_000:  # bound memory on endless streams of unique words
            self._cache[token] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for token in self.pattern.findall(clean_text(text)):
            ids.extend(self._bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8"))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id  # keep EOT last: the text tower reads features there
            result[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return result


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer (loaded once per process)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids ``LongTensor[B, context_length]``: start, BPE ids, end, zero padding."""
    return get_tokenizer()(texts, context_length)
