"""Global (cosine) and local (token-level, TGDT) similarities, batched and tiled on device.

Local similarity ("max over image tokens, sum over words"), for one image i and one text t:

    A       = R_i @ W_t.T                      [L_img, L_txt] cosines of L2-normalized tokens
    s_l     = scale * sum_{valid words w} max_{valid image tokens r} A[r, w]

A masked image token never wins the max (it is excluded before the max, so it cannot win even
when every valid cosine is negative); a masked word adds 0; there is no length normalization.
An image with no valid token at all contributes 0 for every word.

Everything here is a pure jnp function, jit-compatible, with float32 results. Token matmuls run in
the compute dtype (the token dtype by default, e.g. bfloat16) and accumulate in float32. Float32
matmuls use ``Precision.HIGHEST`` unless told otherwise, so TPU/GPU results match CPU.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Memory bound for one tile of the [image_block, L_img, text_block, L_txt] cosine tensor.
DEFAULT_TILE_BYTES = 128 * 2**20
_NEG = float(jnp.finfo(jnp.float32).min)  # "never wins the max" (finite: no inf arithmetic)


NORM_EPS = 1e-12  # l2_normalize's lower bound on the norm (torch.nn.functional.normalize's eps)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
    """L2-normalizes ``x`` [..., D] along ``axis`` in float32 -> float32 [..., D].

    ``x / max(||x||, eps)`` as torch.nn.functional.normalize (eps 1e-12 on the NORM, i.e. 1e-24 on
    the squared norm): rows with norm >= eps get unit norm, smaller rows are divided by eps, so a
    zero row stays zero instead of becoming NaN. The one normalization of the library: the losses
    (training) and the similarities / retrieval (evaluation, search) all use it. The clamp is
    applied before the square root, so the gradient stays finite at a zero row.
    """
    x = jnp.asarray(x, jnp.float32)
    sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def resolve_compute_dtype(compute_dtype, *arrays) -> jnp.dtype:
    """The token matmuls' dtype: ``compute_dtype`` if given, else the arrays' common floating
    dtype (float32 for integer input)."""
    if compute_dtype is not None:
        return jnp.dtype(compute_dtype)
    dtype = jnp.result_type(*[a.dtype for a in arrays])
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def resolve_precision(precision, dtype):
    """``precision`` if given, else HIGHEST for float32 compute (TPU/GPU then match CPU) and
    DEFAULT for lower-precision compute."""
    if precision is not None:
        return precision
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def normalize_tokens(tokens: jax.Array, dtype=None, normalized: bool = False) -> jax.Array:
    """L2-normalizes token features [..., L, D] along D (in float32) and stores them in ``dtype``.

    ``dtype``: the compute dtype of the token matmuls (default: the tokens' own floating dtype,
    float32 for integer input). Do this ONCE when features are encoded and pass
    ``normalized=True`` to the similarity / retrieval functions, which then use the tokens as
    they are (no per-call or per-query re-normalization, no float32 copy of bfloat16 tokens).
    ``normalized=True`` here: the tokens are unit already; they are only cast to ``dtype``.
    """
    tokens = jnp.asarray(tokens)
    dtype = resolve_compute_dtype(dtype, tokens)
    if normalized:
        return tokens if tokens.dtype == dtype else tokens.astype(dtype)
    return l2_normalize(tokens).astype(dtype)


def token_window(mask) -> Optional[tuple[int, int]]:
    """(lo, hi): the smallest range of token positions holding every valid token of ``mask``
    [..., L] (over all rows), or None when ``mask`` is traced (inside jit) and cannot be read.

    Positions outside the window are masked in every row, so slicing tokens and mask to it gives
    exactly the same similarities (a masked word adds 0, a masked image token never wins the
    max) with no work on padding. Computed on device: only an [L] bool vector reaches the host.
    No valid token at all: (0, 1) (one all-masked position keeps the shapes non-empty).
    """
    if isinstance(mask, jax.core.Tracer):
        return None
    mask = jnp.asarray(mask)
    any_valid = np.asarray(jax.device_get(_any_valid(mask)))
    pos = np.flatnonzero(any_valid)
    if pos.size == 0:
        return 0, 1
    return int(pos[0]), int(pos[-1]) + 1


@jax.jit
def _any_valid(mask):
    return jnp.any(mask.astype(bool).reshape(-1, mask.shape[-1]), axis=0)


def compact_tokens(tokens, mask, window: Optional[tuple[int, int]] = None):
    """Slices tokens [..., L, D] and mask [..., L] to ``window`` (default: ``token_window(mask)``)
    -> (tokens [..., L', D], mask [..., L']). Exact (see :func:`token_window`); a no-op under jit
    or when the window is already the full length."""
    if window is None:
        window = token_window(mask)
    if window is None or window == (0, mask.shape[-1]):
        return tokens, mask
    lo, hi = window
    return tokens[..., lo:hi, :], mask[..., lo:hi]


def check_tokens(tokens, mask, name: str, batch_dims: int = 1) -> None:
    """ValueError naming ``{name}_tokens`` / ``{name}_mask`` unless tokens is [*batch, L, D]
    (``batch_dims`` leading dims) and mask [*batch, L]."""
    ndim = batch_dims + 2
    if tokens.ndim != ndim:
        raise ValueError(
            f"{name}_tokens must have {ndim} dims [{'N,' * batch_dims}L,D]; got shape {tokens.shape}")
    if tuple(mask.shape) != tuple(tokens.shape[:-1]):
        raise ValueError(
            f"{name}_mask must have shape {tuple(tokens.shape[:-1])} (= {name}_tokens without D); "
            f"got {tuple(mask.shape)}")


def _reduce_tokens(cosines, image_valid, text_valid, image_axis, scale):
    """cosines (float32) with image tokens on ``image_axis`` and words on the last axis;
    image_valid broadcastable to cosines, text_valid to cosines without ``image_axis``."""
    cosines = jnp.where(image_valid, cosines.astype(jnp.float32), _NEG)
    best = jnp.max(cosines, axis=image_axis)                      # [..., L_txt]
    any_image = jnp.any(image_valid, axis=image_axis)             # "no valid token" -> 0
    best = jnp.where(text_valid & any_image, best, 0.0)
    return scale * jnp.sum(best, axis=-1)


def global_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity of a [Na, D] and b [Nb, D] (unnormalized) -> float32 [Na, Nb]."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"global_similarity expects a [Na,D] and b [Nb,D] with equal D; "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return jnp.matmul(l2_normalize(a), l2_normalize(b).T, precision=jax.lax.Precision.HIGHEST)


def auto_blocks(n_img: int, n_txt: int, l_img: int, l_txt: int,
                tile_bytes: int = DEFAULT_TILE_BYTES) -> tuple[int, int]:
    """Image/text block sizes so one float32 [bi, L_img, bt, L_txt] tile stays under
    ``tile_bytes`` (counting two live copies: the cosines and their masked version)."""
    pairs = max(1, tile_bytes // (2 * 4 * max(1, l_img) * max(1, l_txt)))
    bi = max(1, min(n_img, math.isqrt(pairs)))
    bt = max(1, min(n_txt, pairs // bi))
    if bt == n_txt:  # texts fit in one block: give the spare budget to images
        bi = max(1, min(n_img, pairs // max(1, n_txt)))
    return bi, bt


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("image_block", "text_block", "dtype", "precision",
                                             "normalized"))
def local_similarity_tiled(image_tokens, image_mask, text_tokens, text_mask, scale, *, image_block,
                           text_block, dtype, precision, normalized=False):
    """The jitted kernel of :func:`local_similarity` with every choice made by the caller:
    image_tokens [N_img, L_img, D] / text_tokens [N_txt, L_txt, D] with bool masks, float32 scalar
    ``scale``, tile sizes, compute ``dtype``, matmul ``precision`` (all static) -> float32
    [N_img, N_txt]. No shape checks and no compaction (use it inside jit, e.g. per query chunk)."""
    n_img, n_txt = image_tokens.shape[0], text_tokens.shape[0]
    # Normalize once (unless the caller did); padded rows have mask False and are sliced off.
    img = _pad_rows(normalize_tokens(image_tokens, dtype, normalized), image_block)
    imk = _pad_rows(image_mask.astype(bool), image_block)
    txt = _pad_rows(normalize_tokens(text_tokens, dtype, normalized), text_block)
    txk = _pad_rows(text_mask.astype(bool), text_block)
    img = img.reshape(-1, image_block, *img.shape[1:])
    imk = imk.reshape(-1, image_block, imk.shape[-1])
    txt = txt.reshape(-1, text_block, *txt.shape[1:])
    txk = txk.reshape(-1, text_block, txk.shape[-1])

    def image_step(image_args):
        ib, ibm = image_args                                   # [bi, Li, D], [bi, Li]

        def text_step(text_args):
            tb, tbm = text_args                                # [bt, Lt, D], [bt, Lt]
            # One flat matmul [bi*Li, D] x [D, bt*Lt] -> cosines [bi, Li, bt, Lt].
            cos = jnp.einsum("ild,tjd->iltj", ib, tb, precision=precision,
                             preferred_element_type=jnp.float32)
            return _reduce_tokens(cos, ibm[:, :, None, None], tbm[None, :, :], 1, scale)

        out = jax.lax.map(text_step, (txt, txk))              # [nbt, bi, bt]
        return jnp.swapaxes(out, 0, 1).reshape(ib.shape[0], -1)

    out = jax.lax.map(image_step, (img, imk))                 # [nbi, bi, Nt_pad]
    return out.reshape(-1, out.shape[-1])[:n_img, :n_txt]


def local_similarity(image_tokens: jax.Array, image_mask: jax.Array, text_tokens: jax.Array,
                     text_mask: jax.Array, scale: float = 10.0,
                     image_block: Optional[int] = None, text_block: Optional[int] = None,
                     compute_dtype=None, precision=None,
                     tile_bytes: int = DEFAULT_TILE_BYTES, normalized: bool = False) -> jax.Array:
    """All-pairs local similarity -> float32 [N_img, N_txt].

    Args:
      image_tokens: [N_img, L_img, D] image tokens (e.g. CLS + patches).
      image_mask: [N_img, L_img] bool, True for tokens that take part (patches, not CLS).
      text_tokens: [N_txt, L_txt, D] text tokens.
      text_mask: [N_txt, L_txt] bool, True for words (not SOT/EOT/padding).
      scale: multiplier of the summed maxima (TGDT: 10).
      image_block, text_block: tile sizes (None: chosen so a tile stays under ``tile_bytes``).
        The [N_img, N_txt, L_img, L_txt] tensor is never materialized; tiles run sequentially.
      compute_dtype: dtype of the token matmul (default: the tokens' dtype); accumulation float32.
      precision: matmul precision (default HIGHEST for float32 compute).
      normalized: the tokens are already L2-normalized (:func:`normalize_tokens`); they are
        used as they are instead of being normalized here.
    Outside jit, both token axes are first sliced to the positions that hold a valid token in
    some row (:func:`compact_tokens`; exact): no work on padding.
    """
    image_tokens, text_tokens = jnp.asarray(image_tokens), jnp.asarray(text_tokens)
    image_mask, text_mask = jnp.asarray(image_mask), jnp.asarray(text_mask)
    check_tokens(image_tokens, image_mask, "image")
    check_tokens(text_tokens, text_mask, "text")
    if image_tokens.shape[-1] != text_tokens.shape[-1]:
        raise ValueError(f"image_tokens and text_tokens must share the feature dim D; got "
                         f"{image_tokens.shape[-1]} and {text_tokens.shape[-1]}")
    n_img, n_txt = image_tokens.shape[0], text_tokens.shape[0]
    if n_img == 0 or n_txt == 0:
        return jnp.zeros((n_img, n_txt), jnp.float32)
    image_tokens, image_mask = compact_tokens(image_tokens, image_mask)
    text_tokens, text_mask = compact_tokens(text_tokens, text_mask)
    l_img, l_txt = image_tokens.shape[1], text_tokens.shape[1]
    auto_bi, auto_bt = auto_blocks(n_img, n_txt, l_img, l_txt, tile_bytes)
    bi = auto_bi if image_block is None else int(image_block)
    bt = auto_bt if text_block is None else int(text_block)
    if bi < 1 or bt < 1:
        raise ValueError(f"image_block and text_block must be >= 1; got {bi}, {bt}")
    bi, bt = min(bi, max(n_img, 1)), min(bt, max(n_txt, 1))
    dtype = resolve_compute_dtype(compute_dtype, image_tokens, text_tokens)
    return local_similarity_tiled(image_tokens, image_mask, text_tokens, text_mask,
                        jnp.asarray(scale, jnp.float32), image_block=bi, text_block=bt,
                        dtype=dtype, precision=resolve_precision(precision, dtype),
                        normalized=bool(normalized))


def _segment_rows(n_rows_bound: int, n_images: int) -> int:
    """Word rows per image segment: large matmuls (up to 1024 rows), little padding (the last
    segment of each image is partly empty: at most 1/4 of the mean rows per image)."""
    mean = n_rows_bound / max(n_images, 1)
    for rows in (1024, 512, 256, 128, 64, 32):
        if mean >= 4 * rows:
            return rows
    return 16


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _per_step(requested: Optional[int], accelerator_default: int) -> int:
    """Independent matmuls per loop step. On CPU one per two cores (at most 8), each a plain
    matmul chain that XLA:CPU runs on its own thread (a batched dot_general runs well below the
    plain-matmul rate there, and one such matmul uses one thread; on a 2-core machine a second
    concurrent chain measured no faster, as both compete for memory bandwidth). Batched on
    accelerators."""
    if requested:
        return max(1, int(requested))
    if _on_cpu():
        return max(1, min((os.cpu_count() or 1) // 2, 8))
    return accelerator_default


def _words_vs_images(txt, txm, rows, images, image_valid, scale, precision):
    """Texts ``rows`` [B, n] (indices into txt [N, Lt, D] / txm [N, Lt]), group b against the
    one image images[b] [Li, D] (image_valid [B, Li]) -> float32 [B, n].

    Cosines [n * Lt, Li] (max over the contiguous image axis), masked as in _reduce_tokens. On
    CPU the B groups are independent gather + plain matmul chains (XLA:CPU runs them on separate
    threads; a batched dot_general runs well below the plain-matmul rate there); elsewhere one
    batched gather and matmul.
    """
    n_b, n = rows.shape
    l_txt, d = txt.shape[1:]

    def reduce(cos, word_valid, image_valid):
        best = jnp.max(jnp.where(image_valid[..., None, :], cos, _NEG), axis=-1)
        best = best.reshape(*word_valid.shape)
        valid = word_valid & jnp.any(image_valid, axis=-1)[..., None, None]
        return scale * jnp.sum(jnp.where(valid, best, 0.0), axis=-1)

    if _on_cpu():
        out = []
        for i in range(n_b):
            words = jnp.take(txt, rows[i], axis=0, mode="clip").reshape(n * l_txt, d)
            cos = jnp.matmul(words, images[i].T, precision=precision,
                             preferred_element_type=jnp.float32)
            out.append(reduce(cos, jnp.take(txm, rows[i], axis=0, mode="clip"),
                              image_valid[i]))
        return jnp.stack(out)
    words = jnp.take(txt, rows, axis=0, mode="clip").reshape(n_b, n * l_txt, d)
    cos = jnp.einsum("bmd,bld->bml", words, images, precision=precision,
                     preferred_element_type=jnp.float32)
    return reduce(cos, jnp.take(txm, rows, axis=0, mode="clip"), image_valid)


def local_similarity_text_candidates(text_tokens: jax.Array, text_mask: jax.Array,
                                     image_tokens: jax.Array, image_mask: jax.Array,
                                     candidates: jax.Array, scale: float = 10.0,
                                     compute_dtype=None, precision=None, normalized: bool = False,
                                     segment_rows: Optional[int] = None,
                                     segments_per_step: Optional[int] = None) -> jax.Array:
    """Each text against its own candidate images, given as indices -> float32 [N_txt, K].

    Args:
      text_tokens [N_txt, L_txt, D] / text_mask [N_txt, L_txt]: the texts (e.g. t2i queries).
      image_tokens [N_img, L_img, D] / image_mask [N_img, L_img]: the image set (gallery).
      candidates: int [N_txt, K], indices into the image set (K candidates per text).
      segment_rows: word rows per matmul (default: from the number of pairs per image).
      segments_per_step: segments per loop step (default: one per two CPU cores, 32 on
        accelerators).

    Same values as ``local_similarity(image_tokens, image_mask, text_tokens, text_mask).T`` at
    ``[i, candidates[i]]``, computed image-major and on real words only: the (text, image) pairs are sorted by image, the VALID words of an
    image's pairs are packed one after the other, and each segment of ``segment_rows`` packed
    words is one [segment_rows, D] x [D, L_img] matmul against that image (max over the
    contiguous image axis), the per-word maxima summed into their pairs (a pair may span two
    segments). No multiply-add is spent on masked words, only the words are gathered (never the
    candidates' image tokens), and memory stays O(segment_rows * D) per segment.
    """
    check_tokens(text_tokens, text_mask, "text")
    check_tokens(image_tokens, image_mask, "image")
    n_txt, k = candidates.shape
    n_img = image_tokens.shape[0]
    l_txt, d = text_tokens.shape[1:]
    dtype = resolve_compute_dtype(compute_dtype, text_tokens, image_tokens)
    prec = resolve_precision(precision, dtype)
    txt = normalize_tokens(text_tokens, dtype, normalized).reshape(n_txt * l_txt, d)
    img = normalize_tokens(image_tokens, dtype, normalized)
    txm, imm = text_mask.astype(bool), image_mask.astype(bool)
    n_pairs = n_txt * k
    if n_pairs == 0:
        return jnp.zeros((n_txt, k), jnp.float32)
    rows = int(segment_rows) if segment_rows else _segment_rows(n_pairs * l_txt, n_img)
    per_step = _per_step(segments_per_step, 32)
    # Valid word positions of each text, valid ones first; words per text.
    word_pos = jnp.argsort(~txm, axis=1, stable=True).astype(jnp.int32)     # [N_txt, L_txt]
    n_words = jnp.sum(txm, axis=1, dtype=jnp.int32)
    # Pairs grouped by image; their words packed in that order.
    pair_img = candidates.reshape(n_pairs).astype(jnp.int32)
    order = jnp.argsort(pair_img, stable=True).astype(jnp.int32)
    pair_txt = order // k                                            # text of each sorted pair
    pair_end = jnp.cumsum(n_words[pair_txt])                         # packed word end per pair
    img_pairs = jnp.zeros((n_img,), jnp.int32).at[pair_img].add(1)
    img_pair_end = jnp.cumsum(img_pairs)
    img_end = jnp.where(img_pair_end > 0, pair_end[jnp.maximum(img_pair_end - 1, 0)], 0)
    img_start = jnp.concatenate([jnp.zeros((1,), img_end.dtype), img_end[:-1]])
    n_seg = (img_end - img_start + rows - 1) // rows
    seg_end = jnp.cumsum(n_seg)
    bound = -(-(n_pairs * l_txt // rows + n_img) // per_step) * per_step   # static bound
    seg = jnp.arange(bound, dtype=jnp.int32)
    seg_img = jnp.minimum(jnp.searchsorted(seg_end, seg, side="right"), n_img - 1)
    seg_pos = img_start[seg_img] + (seg - (seg_end[seg_img] - n_seg[seg_img])) * rows
    seg_stop = jnp.where(seg < seg_end[-1], img_end[seg_img], 0)
    offsets = jnp.arange(rows, dtype=jnp.int32)
    # Every packed word row, computed once (2 x N_txt * K * L_txt int32): its sorted pair and
    # its row in the flattened text tokens.
    n_rows = n_pairs * l_txt
    row_pair = jnp.repeat(jnp.arange(n_pairs, dtype=jnp.int32), n_words[pair_txt],
                          total_repeat_length=n_rows)
    row_txt = pair_txt[row_pair]
    row_word = jnp.clip(jnp.arange(n_rows, dtype=jnp.int32)
                        - (pair_end - n_words[pair_txt])[row_pair], 0, l_txt - 1)
    row_src = jnp.pad(row_txt * l_txt + word_pos[row_txt, row_word], (0, rows))
    row_pair = jnp.pad(row_pair, (0, rows))
    any_img = jnp.any(imm, axis=1)
    scale = jnp.asarray(scale, jnp.float32)

    def body(step, out):
        ids = step * per_step + jnp.arange(per_step, dtype=jnp.int32)
        im = seg_img[ids]
        p = seg_pos[ids][:, None] + offsets                                   # [B, rows]
        valid = p < seg_stop[ids][:, None]
        pair, src = row_pair[p], row_src[p]
        best = _rows_vs_images(txt, src, jnp.take(img, im, axis=0, mode="clip"),
                               jnp.take(imm, im, axis=0, mode="clip"), prec)  # [B, rows]
        best = jnp.where(valid & any_img[im][:, None], best, 0.0)
        return out.at[jnp.where(valid, pair, n_pairs)].add(scale * best, mode="drop")

    steps = (seg_end[-1] + per_step - 1) // per_step
    out = jax.lax.fori_loop(0, steps, body, jnp.zeros((n_pairs,), jnp.float32))
    return jnp.zeros((n_pairs,), jnp.float32).at[order].set(out).reshape(n_txt, k)


def _rows_vs_images(txt_rows, src, images, image_valid, precision):
    """Word rows txt_rows[src[b]] [B, R, D] against image b [Li, D] each -> [B, R] maxima over
    the valid image tokens (_NEG where none); on CPU B independent gather + matmul chains."""
    def best(cos, valid):
        return jnp.max(jnp.where(valid[..., None, :], cos, _NEG), axis=-1)

    if _on_cpu():
        return jnp.stack([
            best(jnp.matmul(jnp.take(txt_rows, src[i], axis=0, mode="clip"), images[i].T,
                            precision=precision, preferred_element_type=jnp.float32),
                 image_valid[i]) for i in range(src.shape[0])])
    words = jnp.take(txt_rows, src, axis=0, mode="clip")                      # [B, R, D]
    cos = jnp.einsum("brd,bld->brl", words, images, precision=precision,
                     preferred_element_type=jnp.float32)
    return best(cos, image_valid)


def local_similarity_image_candidates(image_tokens: jax.Array, image_mask: jax.Array,
                                      text_tokens: jax.Array, text_mask: jax.Array,
                                      candidates: jax.Array, scale: float = 10.0,
                                      compute_dtype=None, precision=None,
                                      normalized: bool = False,
                                      queries_per_step: Optional[int] = None) -> jax.Array:
    """Each image against its own candidate texts, given as indices -> float32 [N_img, K].

    image_tokens [N_img, L_img, D] / image_mask (e.g. i2t queries); text_tokens [N_txt, L_txt, D]
    / text_mask (the gallery); candidates int [N_img, K] into the texts. Per image one gather of
    its candidates' words and one [K * L_txt, D] x [D, L_img] matmul (``queries_per_step``
    images per loop step: default one per two CPU cores, all at once on accelerators).
    """
    check_tokens(image_tokens, image_mask, "image")
    check_tokens(text_tokens, text_mask, "text")
    n_q, k = candidates.shape
    dtype = resolve_compute_dtype(compute_dtype, text_tokens, image_tokens)
    prec = resolve_precision(precision, dtype)
    img = normalize_tokens(image_tokens, dtype, normalized)
    txt = normalize_tokens(text_tokens, dtype, normalized)
    imm, txm = image_mask.astype(bool), text_mask.astype(bool)
    scale = jnp.asarray(scale, jnp.float32)
    per_step = min(_per_step(queries_per_step, max(n_q, 1)), max(n_q, 1))

    def step(args):
        q, qm, cand = args
        return _words_vs_images(txt, txm, cand, q, qm, scale, prec)

    if per_step >= n_q:
        return step((img, imm, candidates))
    pad = (-n_q) % per_step
    args = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (img, imm, candidates)]
    args = tuple(x.reshape(-1, per_step, *x.shape[1:]) for x in args)
    return jax.lax.map(step, args).reshape(-1, k)[:n_q]
