"""BERT WordPiece tokenization (bert-base-uncased rules) from a local ``vocab.txt``, no hub access.

The text tower of TGDT-as-published (``xmr_jax.models.bert``) reads BERT ids:
``[CLS] wordpieces [SEP]`` followed by zeros (id 0 = ``[PAD]`` = padding; the model derives its
mask from ``ids != 0``). This module builds exactly those ids with the Rust ``tokenizers`` fast
tokenizer:

- normalizer: BERT's (control characters removed, whitespace unified, spaces around CJK
  characters, lowercase and accents stripped, as ``do_lower_case=True`` in bert-base-uncased);
- pre-tokenizer: split on whitespace and punctuation;
- model: greedy longest-match-first WordPiece with ``##`` continuations, ``[UNK]`` for a word that
  cannot be covered (or longer than 100 characters);
- post-processor: ``[CLS] ... [SEP]``.

Rows longer than ``max_length`` are cut to ``max_length`` with ``[SEP]`` kept as the last token
and reported in ``Encoded.truncated``. With ``max_length=None`` every row is padded to the longest
row of the call (TGDT pads per batch to the longest caption and never truncates).

The vocabulary file is BERT's: one token per line, the id of a token is its 0-based line number;
it must hold ``[PAD]`` at id 0, ``[UNK]``, ``[CLS]`` and ``[SEP]``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["WordPieceTokenizer", "Encoded", "WordPieceVocabError"]

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"


class WordPieceVocabError(ValueError):
    """The vocabulary file is missing or is not a usable BERT vocab.txt."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A batch of encoded captions.

    ids:       int32 [N, L]: [CLS] wordpieces [SEP], then 0 (padding).
    lengths:   int32 [N]: tokens per row, [CLS] and [SEP] included (after truncation).
    truncated: bool [N]: the row was cut to L tokens (its last token is still [SEP]).
    """

    ids: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray

    @property
    def num_truncated(self) -> int:
        return int(np.sum(self.truncated))


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """BERT vocab.txt -> {token: id} (id = line number). Errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise WordPieceVocabError(f"WordPiece vocab file {path} not found (expected BERT's vocab.txt, one token per line)")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise WordPieceVocabError(f"WordPiece vocab file {path} is not UTF-8 text ({e})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        token = line.rstrip("\r")
        if not token.strip():
            raise WordPieceVocabError(f"WordPiece vocab file {path}: line {i + 1} is empty (every line must hold one token)")
        if token in vocab:
            raise WordPieceVocabError(
                f"WordPiece vocab file {path}: token {token!r} on line {i + 1} already on line {vocab[token] + 1}"
            )
        vocab[token] = i
    missing = [t for t in (PAD, UNK, CLS, SEP) if t not in vocab]
    if missing:
        raise WordPieceVocabError(f"WordPiece vocab file {path} lacks the special token(s) {missing}")
    if vocab[PAD] != 0:
        raise WordPieceVocabError(
            f"WordPiece vocab file {path}: [PAD] must be id 0 (first line; 0 = padding), it is on line {vocab[PAD] + 1}"
        )
    return vocab


class WordPieceTokenizer:
    """bert-base-uncased tokenization from a vocab file.

    Args:
      vocab_path: BERT ``vocab.txt`` (e.g. the one in a Hugging Face bert-base-uncased folder).
      max_length: default row length of ``encode`` (tokens, [CLS]/[SEP] included); None pads to
        the longest row of each call.
      lowercase: lowercase and strip accents (True for the uncased models TGDT uses).
    """

    def __init__(self, vocab_path: str | os.PathLike, max_length: int | None = None, lowercase: bool = True):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

        if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 2):
            raise ValueError(f"WordPieceTokenizer: max_length must be None or an int >= 2 ([CLS] + [SEP]), got {max_length!r}")
        self.source = Path(vocab_path)
        self.max_length = None if max_length is None else int(max_length)
        self.lowercase = bool(lowercase)
        vocab = read_vocab(self.source)
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix="##",
                                         max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=self.lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.cls_id, self.sep_id, self.unk_id, self.pad_id = vocab[CLS], vocab[SEP], vocab[UNK], vocab[PAD]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", special_tokens=[(CLS, self.cls_id), (SEP, self.sep_id)]
        )
        self._tokenizer = tok
        self.vocab_size = len(vocab)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tokenizer.id_to_token(int(idx))

    def wordpieces(self, text: str) -> list[str]:
        """The wordpiece strings of one caption, without [CLS]/[SEP]."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def num_tokens(self, text: str) -> int:
        """Word tokens of one caption (its wordpieces without [CLS]/[SEP]), before any truncation."""
        return len(self.wordpieces(text))

    def encode_batch(self, texts: Sequence[str] | str, max_length: int | None = -1) -> Encoded:
        """Encode captions (a single str counts as one).

        max_length: row length L; -1 (default) uses the tokenizer's ``max_length``; None pads to
        the longest row of this call. Returns ``Encoded`` (ids int32 [N, L], lengths, truncated).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"WordPieceTokenizer.encode: texts[{k}] must be a str, got {type(t).__name__}")
        length = self.max_length if max_length == -1 else max_length
        if length is not None and (not isinstance(length, (int, np.integer)) or length < 2):
            raise ValueError(f"WordPieceTokenizer.encode: max_length must be None or an int >= 2, got {length!r}")
        rows = [enc.ids for enc in self._tokenizer.encode_batch(texts, add_special_tokens=True)]
        full = np.array([len(r) for r in rows], np.int32)
        width = int(length) if length is not None else int(full.max(initial=2))
        ids = np.zeros((len(rows), width), np.int32)
        truncated = full > width
        for row, r, cut in zip(ids, rows, truncated):
            if cut:
                row[:] = r[:width]
                row[-1] = self.sep_id
            else:
                row[:len(r)] = r
        return Encoded(ids=ids, lengths=np.minimum(full, width).astype(np.int32), truncated=truncated)

    def encode(self, texts: Sequence[str] | str, max_length: int | None = -1) -> np.ndarray:
        """Encode captions -> int32 [N, L] ids ([CLS] ... [SEP], 0-padded); see ``encode_batch``."""
        return self.encode_batch(texts, max_length).ids

    __call__ = encode

    def decode(self, ids) -> str:
        """1-D ids -> text (special tokens and padding dropped, ## pieces joined)."""
        from tokenizers import decoders

        ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in (self.pad_id, self.cls_id, self.sep_id)]
        return decoders.WordPiece(prefix="##").decode([self._tokenizer.id_to_token(i) for i in ids])

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer({str(self.source)!r}, vocab_size={self.vocab_size}, "
                f"max_length={self.max_length}, lowercase={self.lowercase})")
