"""CLIP byte-level BPE tokenizer (OpenAI / IRRA vocabulary) and IRRA's MLM masking rule.

Tokenizer: the BPE itself runs in the Hugging Face ``tokenizers`` library (Rust); text cleaning
(ftfy, HTML unescape twice, whitespace collapse, strip, lowercase) is done in Python first, as in
OpenAI CLIP and IRRA. Vocabulary layout (docs/semantics.md, section 'Tokenizer'), 49408 entries:

    0..255        the 256 byte symbols (GPT-2 byte -> printable character map, in its order)
    256..511      the same symbols followed by ``</w>``
    512..49405    the first 48894 merges of ``bpe_simple_vocab_16e6.txt.gz``
    49406, 49407  ``<|startoftext|>`` (SOT), ``<|endoftext|>`` (EOT)

With ``mask_token=True`` (IRRA) the last merge entry (``jekyll</w>``) is removed together with
its merge rule and ``<|mask|>`` takes its id 49405.

``encode(texts) -> int32 [N, context_length]``: ``[SOT] + bpe + [EOT]`` padded with 0; longer
sequences are cut to ``context_length`` with the last token set to EOT. As in OpenAI CLIP (and
Hugging Face), a literal ``<|startoftext|>`` / ``<|endoftext|>`` inside a caption becomes the
special id; a literal ``<|mask|>`` is ordinary text.

MLM masking (docs/semantics.md, section 'IRRA model') is written once in :func:`apply_mlm_rule` as
a function of uniform draws and an array namespace ``xp`` (numpy or
``tensorflow.experimental.numpy``), so the numpy path (:func:`mlm_mask`) and a tf.data path give
identical results for identical draws. This module never imports TensorFlow.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # `regex` gives Unicode-aware \s like OpenAI's tokenizer; stdlib `re` is close enough.
    import regex as _re
except ImportError:  # pragma: no cover - regex ships with transformers
    import re as _re

__all__ = [
    "SOT_ID", "EOT_ID", "MASK_ID", "VOCAB_SIZE", "CONTEXT_LENGTH", "NUM_MERGES",
    "SOT_TOKEN", "EOT_TOKEN", "MASK_TOKEN", "DEFAULT_BPE_PATH", "TokenizerFileError",
    "ClipTokenizer", "default_tokenizer", "clean_text", "byte_symbols",
    "apply_mlm_rule", "mlm_mask",
]

SOT_ID = 49406
EOT_ID = 49407
MASK_ID = 49405
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
NUM_MERGES = 48894  # VOCAB_SIZE - 2 * 256 - 2
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
END_OF_WORD = "</w>"
DEFAULT_BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# CLIP's pre-tokenization pattern: specials, English contractions, letter runs, single digits,
# runs of other non-space characters. Applied to already lowercased text.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_WHITESPACE = _re.compile(r"\s+")


class TokenizerFileError(ValueError):
    """A vocabulary / merges file exists but does not have the expected content."""


# ----------------------------------------------------------------------------- vocabulary

@functools.lru_cache(maxsize=1)
def _byte_order() -> tuple[int, ...]:
    """Byte values in vocabulary order: printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ')
    first, then all other bytes (controls, space, ...), each group in byte order."""
    return tuple(sorted(range(256), key=lambda b: (not _is_printable_byte(b), b)))


def _is_printable_byte(b: int) -> bool:
    return 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF


@functools.lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """The 256 printable stand-ins for bytes, in vocabulary order (GPT-2/CLIP byte encoder).

    A printable Latin-1 byte stands for itself; the k-th other byte becomes chr(256 + k).
    Returns: tuple of 256 one-character strings; entry k is the symbol of vocabulary id k.
    """
    order = _byte_order()
    n_printable = sum(map(_is_printable_byte, order))
    return tuple(chr(b) if k < n_printable else chr(256 + k - n_printable) for k, b in enumerate(order))


def clean_text(text: str) -> str:
    """OpenAI/IRRA caption cleaning: ftfy.fix_text, html.unescape twice, collapse whitespace,
    strip, lowercase. Returns the cleaned string."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r:.80}")
    import ftfy  # local import keeps module import light

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _read_bpe_gz(path: Path) -> list[tuple[str, str]]:
    """First NUM_MERGES merge pairs of an OpenAI ``bpe_simple_vocab_16e6.txt.gz``-style file."""
    expected = (f"a gzip text file like OpenAI's bpe_simple_vocab_16e6.txt.gz: one header line, then "
                f"at least {NUM_MERGES} lines 'left right' (one BPE merge each)")
    if not path.is_file():
        raise FileNotFoundError(f"BPE vocabulary file not found: {path} (expected {expected})")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"cannot read BPE vocabulary file {path}: {e} (expected {expected})") from e
    merge_lines = lines[1:1 + NUM_MERGES]
    if len(merge_lines) < NUM_MERGES:
        raise TokenizerFileError(
            f"BPE vocabulary file {path} has only {max(len(lines) - 1, 0)} merge lines after the header "
            f"(expected {expected})")
    merges = []
    for k, line in enumerate(merge_lines):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(
                f"BPE vocabulary file {path}, line {k + 2}: {line!r:.80} is not a merge 'left right' "
                f"(expected {expected})")
        merges.append((parts[0], parts[1]))
    return merges


def _vocab_from_merges(merges: list[tuple[str, str]], mask_token: bool) -> tuple[dict, list]:
    """Vocabulary dict (token -> id) and merge list for the OpenAI layout (see module doc)."""
    base = list(byte_symbols())
    tokens = base + [s + END_OF_WORD for s in base] + [a + b for a, b in merges]
    if mask_token:  # IRRA: `jekyll</w>` (entry and rule) makes room for <|mask|>
        tokens, merges = tokens[:-1] + [MASK_TOKEN], merges[:-1]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _read_hf_folder(folder: Path, mask_token: bool) -> tuple[dict, list]:
    """Vocabulary and merges from a Hugging Face CLIP tokenizer folder (vocab.json + merges.txt)."""
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    expected = "a Hugging Face CLIP tokenizer folder with vocab.json (token -> id) and merges.txt"
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder} (expected {expected})")
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise FileNotFoundError(f"missing {f.name} in tokenizer folder {folder} (expected {expected})")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{vocab_file} is not valid JSON: {e} (expected a token -> id object)") from e
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerFileError(f"{vocab_file} must be a JSON object mapping token strings to integer ids")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise TokenizerFileError(f"{vocab_file}: ids must be unique and cover 0..{len(ids) - 1}")
    for special in (SOT_TOKEN, EOT_TOKEN):
        if special not in vocab:
            raise TokenizerFileError(f"{vocab_file} has no {special!r} entry (expected a CLIP vocabulary)")
    merges = []
    for k, line in enumerate(merges_file.read_text(encoding="utf-8").split("\n")):
        if not line.strip() or (k == 0 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(f"{merges_file}, line {k + 1}: {line!r:.80} is not a merge 'left right'")
        if parts[0] + parts[1] not in vocab:
            raise TokenizerFileError(
                f"{merges_file}, line {k + 1}: merge result {parts[0] + parts[1]!r} is not in {vocab_file}")
        merges.append((parts[0], parts[1]))
    if mask_token and MASK_TOKEN not in vocab:
        mask_id = vocab[SOT_TOKEN] - 1
        victim = next((t for t, i in vocab.items() if i == mask_id), None)
        if not merges or victim != merges[-1][0] + merges[-1][1]:
            raise TokenizerFileError(
                f"mask_token=True needs the entry just before {SOT_TOKEN!r} (id {mask_id}, here {victim!r}) "
                f"to be the result of the last merge in {merges_file} (IRRA's layout); it is not")
        del vocab[victim]
        vocab[MASK_TOKEN] = mask_id
        merges = merges[:-1]
    return vocab, merges


# ----------------------------------------------------------------------------- tokenizer

class ClipTokenizer:
    """CLIP byte-level BPE tokenizer with OpenAI/IRRA cleaning and id layout.

    Args:
      vocab_path: OpenAI-style ``bpe_simple_vocab_16e6.txt.gz`` (default: the packaged copy).
      hf_dir: alternatively, a Hugging Face tokenizer folder with vocab.json + merges.txt.
      mask_token: IRRA's variant with ``<|mask|>`` = 49405 replacing ``jekyll</w>``.
      context_length: length of the encoded rows (77 for CLIP).
    """

    def __init__(self, vocab_path: str | os.PathLike | None = None, hf_dir: str | os.PathLike | None = None,
                 mask_token: bool = False, context_length: int = CONTEXT_LENGTH):
        from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

        if vocab_path is not None and hf_dir is not None:
            raise ValueError("ClipTokenizer: give either vocab_path (a .txt.gz BPE file) or hf_dir, not both")
        if not isinstance(context_length, (int, np.integer)) or context_length < 2:
            raise ValueError(f"ClipTokenizer: context_length must be an int >= 2 (SOT + EOT), got {context_length!r}")
        self.context_length = int(context_length)
        self.mask_token = bool(mask_token)
        if hf_dir is not None:
            self.source = Path(hf_dir)
            vocab, merges = _read_hf_folder(self.source, self.mask_token)
        else:
            self.source = Path(vocab_path) if vocab_path is not None else DEFAULT_BPE_PATH
            vocab, merges = _vocab_from_merges(_read_bpe_gz(self.source), self.mask_token)

        try:
            model = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD,
                               continuing_subword_prefix="", fuse_unk=False)
        except Exception as e:  # tokenizers raises a plain Exception on inconsistent files
            raise TokenizerFileError(f"cannot build a BPE tokenizer from {self.source}: {e}") from e
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        # Literal <|startoftext|>/<|endoftext|> in a caption map to their ids, as in OpenAI CLIP.
        tok.add_special_tokens([AddedToken(t, normalized=False) for t in (SOT_TOKEN, EOT_TOKEN)])
        self._tokenizer = tok
        self._vocab_size = len(vocab)
        self._sot_id, self._eot_id = vocab[SOT_TOKEN], vocab[EOT_TOKEN]
        self._mask_id = vocab.get(MASK_TOKEN)
        id_to_token = [""] * len(vocab)
        for t, i in vocab.items():
            id_to_token[i] = t
        if self._mask_id is not None:
            id_to_token[self._mask_id] = MASK_TOKEN + END_OF_WORD  # decodes as a separate word
        self._id_to_token = id_to_token
        self._byte_of = {s: b for s, b in zip(byte_symbols(), _byte_order())}

    # -- properties
    @property
    def sot_id(self) -> int:
        return self._sot_id

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def mask_id(self) -> int | None:
        """Id of ``<|mask|>`` (49405) when built with mask_token=True, else None."""
        return self._mask_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Vocabulary id of a token string (e.g. ``"dog</w>"``), or None if absent."""
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, idx: int) -> str:
        return self._tokenizer.id_to_token(int(idx))

    # -- encoding
    def bpe_ids(self, text: str) -> list[int]:
        """BPE ids of one cleaned caption, without SOT/EOT, padding or truncation."""
        return self._tokenizer.encode(clean_text(text), add_special_tokens=False).ids

    def num_tokens(self, text: str) -> int:
        """Word tokens of one caption (its BPE ids without SOT/EOT), before any truncation."""
        return len(self.bpe_ids(text))

    def encode(self, texts: Sequence[str] | str) -> np.ndarray:
        """Encode captions. texts: list of N strings (a single str counts as N=1).

        Returns int32 [N, context_length]: [SOT] + bpe + [EOT], zero padded; rows longer than
        context_length are cut to it with the last token set to EOT.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"ClipTokenizer.encode: texts[{k}] must be a str, got {type(t).__name__}")
        out = np.zeros((len(texts), self.context_length), np.int32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        keep = self.context_length - 2
        for row, enc in zip(out, encodings):
            ids = enc.ids[:keep]
            row[0] = self._sot_id
            row[1:1 + len(ids)] = ids
            row[1 + len(ids)] = self._eot_id
        return out

    def encode_one(self, text: str) -> np.ndarray:
        """Encode one caption -> int32 [context_length]."""
        return self.encode([text])[0]

    __call__ = encode

    # -- decoding
    def decode(self, ids: Any) -> str | list[str]:
        """Ids -> text. 1-D ids give a str, 2-D [N, L] a list of N str.

        SOT is skipped and decoding stops at the first EOT (so padding is ignored); ``</w>``
        becomes a space; the mask token reads ``<|mask|>``.
        """
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(r) for r in arr]
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ClipTokenizer.decode: expected 1-D or 2-D integer ids, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self._vocab_size)]
        if bad.size:
            raise ValueError(f"ClipTokenizer.decode: id {int(bad[0])} outside the vocabulary [0, {self._vocab_size})")
        pieces = []
        for i in arr.tolist():
            if i == self._eot_id:
                break
            if i != self._sot_id:
                pieces.append(self._id_to_token[i])
        raw = bytes(self._byte_of[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __repr__(self) -> str:
        return (f"ClipTokenizer(source={str(self.source)!r}, mask_token={self.mask_token}, "
                f"context_length={self.context_length}, vocab_size={self.vocab_size})")


@functools.lru_cache(maxsize=None)
def default_tokenizer(mask_token: bool = False, context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
    """Cached tokenizer from the packaged OpenAI BPE file (mask_token=True: IRRA's variant)."""
    return ClipTokenizer(mask_token=mask_token, context_length=context_length)


# ----------------------------------------------------------------------------- MLM masking

def apply_mlm_rule(token_ids, u_select, u_action, random_ids, mask_prob=0.15, mask_id=MASK_ID,
                   vocab_limit=MASK_ID, xp=np):
    """IRRA's MLM corruption as a pure function of random draws (numpy or TF, via ``xp``).

    Args:
      token_ids:  int [..., L] caption ids (L >= 2).
      u_select:   float [..., L] uniform [0, 1) draws; a position is selected iff eligible
                  (0 < id < vocab_limit) and u_select < mask_prob.
      u_action:   float [..., L] uniform [0, 1) draws; selected -> mask_id if u_action < 0.8,
                  -> random_ids if 0.8 <= u_action < 0.9, unchanged otherwise.
      random_ids: int [..., L] replacement ids, uniform in [1, vocab_limit), same dtype as token_ids.
      xp:         ``numpy`` or ``tensorflow.experimental.numpy`` (works inside tf.data / tf.function).
    Rows with nothing selected get position 1 selected and set to mask_id.

    Returns: (masked_ids, labels), both [..., L] with token_ids' dtype; labels hold the original
    id at selected positions and 0 elsewhere (0 = ignore).
    """
    eligible = (token_ids > 0) & (token_ids < vocab_limit)
    selected = eligible & (u_select < mask_prob)
    position = xp.cumsum(xp.ones_like(token_ids), axis=-1) - 1
    fallback = xp.logical_not(xp.any(selected, axis=-1, keepdims=True)) & (position == 1)
    to_mask = (selected & (u_action < 0.8)) | fallback
    to_random = selected & (u_action >= 0.8) & (u_action < 0.9)
    zeros = xp.zeros_like(token_ids)
    masked = xp.where(to_mask, zeros + mask_id, xp.where(to_random, random_ids, token_ids))
    labels = xp.where(selected | fallback, token_ids, zeros)
    return masked, labels


def mlm_mask(token_ids, rng: np.random.Generator | int, mask_prob: float = 0.15, mask_id: int = MASK_ID,
             vocab_limit: int = MASK_ID) -> tuple[np.ndarray, np.ndarray]:
    """Seeded numpy MLM masking (docs/semantics.md, 'IRRA model') of token_ids [N, L] or [L].

    rng: a numpy Generator or an int seed. Draw order (per call): u_select = rng.random(shape,
    float32), u_action = rng.random(shape, float32), random_ids = rng.integers(1, vocab_limit, shape).
    Returns (masked_ids int32, labels int32), same shape as token_ids; see apply_mlm_rule.
    """
    ids = np.asarray(token_ids)
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"mlm_mask: token_ids must be an integer array [N, L] or [L], got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if ids.shape[-1] < 2:
        raise ValueError(f"mlm_mask: token_ids length must be >= 2 (position 1 is the fallback), got {ids.shape}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mlm_mask: mask_prob must be in [0, 1], got {mask_prob}")
    if not 1 < vocab_limit:
        raise ValueError(f"mlm_mask: vocab_limit must be > 1, got {vocab_limit}")
    if not isinstance(rng, np.random.Generator):
        if isinstance(rng, (bool, np.bool_)) or not isinstance(rng, (int, np.integer)):
            raise TypeError(f"mlm_mask: rng must be a numpy Generator or an int seed, got {type(rng).__name__}")
        rng = np.random.default_rng(int(rng))
    ids = ids.astype(np.int32)
    u_select = rng.random(ids.shape, dtype=np.float32)
    u_action = rng.random(ids.shape, dtype=np.float32)
    random_ids = rng.integers(1, vocab_limit, size=ids.shape, dtype=np.int32)
    masked, labels = apply_mlm_rule(ids, u_select, u_action, random_ids, mask_prob=mask_prob,
                                    mask_id=mask_id, vocab_limit=vocab_limit, xp=np)
    return masked.astype(np.int32), labels.astype(np.int32)
