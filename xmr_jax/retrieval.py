"""Exhaustive and two-stage (global top-k, then local rerank) retrieval, batched on device.

Two-stage ranking of one query (TGDT inference):
  1. rank the whole gallery by the global cosine s_g;
  2. take the top ``k`` (t2i: 100 images; i2t: 50 captions) and rescore them by s_g + s_l;
  3. the candidates come first, ordered by s_g + s_l; everything outside the top k keeps its
     global order after them. A ground truth outside the pool stays where s_g puts it (a miss
     stays a miss).

``two_stage_scores`` returns a full float32 [Nq, Ng] matrix whose descending order per row IS the
two-stage ranking, so the usual metrics apply unchanged: non-candidates keep s_g, candidates get
``s_g + s_l + shift`` with a per-query shift putting the weakest candidate 1.0 above the k-th
global score (a per-row translation, so no precision is lost the way a huge constant would).

Direction decides which side is the image for the local similarity (max over image tokens, sum
over words): "t2i" = text queries against an image gallery, "i2t" = image queries against a text
gallery. Queries are processed in chunks under ``jax.lax.map`` inside one jitted function (no
per-query Python loop). With ``mesh``, the gallery is sharded over the mesh axis ``axis``
("data"): each device scores and reranks its own shard's top-k, the per-device candidates are
all-gathered and merged by a second top-k; the result equals the single-device one.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from xmr_jax.similarity import (auto_blocks, check_tokens, compact_tokens, l2_normalize, local_similarity,
                                local_similarity_image_candidates, local_similarity_text_candidates,
                                local_similarity_tiled, normalize_tokens, resolve_compute_dtype,
                                resolve_precision)

DEFAULT_CHUNK_BYTES = 256 * 2**20  # working-set bound per query chunk (all devices' queries)
DIRECTIONS = ("t2i", "i2t")
Axis = Union[str, Sequence[str]]

try:  # jax >= 0.7 spells it jax.shard_map (check_vma); older: jax.experimental (check_rep)
    _shard_map = functools.partial(jax.shard_map, check_vma=False)
except AttributeError:  # pragma: no cover - old jax
    from jax.experimental.shard_map import shard_map as _old_shard_map
    _shard_map = functools.partial(_old_shard_map, check_rep=False)


def _query_modality(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 't2i' (text queries, image gallery) or 'i2t' "
                         f"(image queries, text gallery); got {direction!r}")
    return "text" if direction == "t2i" else "image"


class Features(NamedTuple):
    """One side of a search (queries or gallery), prepared once by :func:`prepare_features`.

    global_features [N, D] float32 and tokens [N, L, D] L2-normalized, tokens in the compute
    dtype, mask [N, L] bool, token axis compacted to the valid window. Unpacks as
    (global, tokens, mask), the positional arguments of the search functions; pass
    ``normalized=True`` with it.
    """
    global_features: jax.Array
    tokens: Optional[jax.Array] = None
    mask: Optional[jax.Array] = None


@functools.partial(jax.jit, static_argnames=("dtype",))
def _prepare_jit(global_features, tokens, *, dtype):
    tokens = None if tokens is None else normalize_tokens(tokens, dtype)
    return l2_normalize(global_features), tokens


def prepare_features(global_features, tokens=None, mask=None, compute_dtype=None,
                     compact: bool = True) -> Features:
    """Normalizes global features (float32) and tokens (stored in ``compute_dtype``, default the
    tokens' dtype) once, and slices the token axis to its valid window (``compact``, exact).
    Elementwise on device: a sharded input stays sharded. Use with ``normalized=True``."""
    if tokens is None:
        return Features(_prepare_jit(jnp.asarray(global_features), None, dtype=None)[0])
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask).astype(bool)
    check_tokens(tokens, mask, "")
    if compact:
        tokens, mask = compact_tokens(tokens, mask)
    dtype = resolve_compute_dtype(compute_dtype, tokens)
    g, t = _prepare_jit(jnp.asarray(global_features), tokens, dtype=dtype)
    return Features(g, t, mask)


def exhaustive_local(query_tokens, query_mask, gallery_tokens, gallery_mask,
                     direction: str = "t2i", local_scale: float = 10.0, mesh: Optional[Mesh] = None,
                     axis: Axis = "data", gallery_valid=None, query_chunk: Optional[int] = None,
                     **block_kwargs):
    """Local similarity of every query against every gallery item -> float32 [Nq, Ng].

    t2i: query = texts [Nq, Lt, D], gallery = images [Ng, Li, D]; i2t: the other way round.
    ``block_kwargs`` go to :func:`xmr_jax.similarity.local_similarity` (tiling, compute dtype,
    ``normalized``). With ``mesh``: gallery and queries sharded over ``axis``, queries gathered a
    chunk at a time; the result is sharded over the gallery (columns); invalid gallery columns
    (``gallery_valid`` False) hold -inf. Cost: all pairs x all valid tokens (Nq x Ng x Lq x Lg x
    D multiply-adds) -- e.g. ~10^15 at COCO-5K size.
    """
    if mesh is not None:
        kw = {k: block_kwargs.pop(k) for k in ("compute_dtype", "precision", "normalized")
              if k in block_kwargs}
        if block_kwargs:
            raise ValueError(f"with mesh, exhaustive_local takes no {sorted(block_kwargs)}")
        rows, n_q, n_g = _run_search(
            "local", None, query_tokens, query_mask, None, gallery_tokens, gallery_mask,
            gallery_valid, 1, direction, local_scale, query_chunk, mesh, axis, None,
            kw.get("compute_dtype"), kw.get("precision"), kw.get("normalized", False))
        return _unpad(rows, n_q, n_g)
    if _query_modality(direction) == "text":
        return local_similarity(gallery_tokens, gallery_mask, query_tokens, query_mask,
                                local_scale, **block_kwargs).T
    return local_similarity(query_tokens, query_mask, gallery_tokens, gallery_mask,
                            local_scale, **block_kwargs)


# ----------------------------------------------------------------------------------------------
# Per-chunk kernels (run on one device over the gallery shard it holds). Inputs are normalized:
# q_glob [c, D] / g_glob [G_loc, D] float32, tokens in the compute dtype, masks bool.


def _offset(axis_name, n_loc):
    return 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_loc


def _global_rows(q_glob, g_glob, g_valid):
    s_g = jnp.matmul(q_glob, g_glob.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(g_valid[None, :], s_g, -jnp.inf)              # invalid: never selected


def _chunk_global(q_glob, q_tok, q_mask, *, g_glob, g_valid, **_):
    return _global_rows(q_glob, g_glob, g_valid)


def _chunk_local(q_glob, q_tok, q_mask, *, g_tok, g_mask, g_valid, scale, modality, precision,
                 **_):
    """All-pairs local similarity of the chunk against the local gallery -> [c, G_loc]."""
    if modality == "text":
        img, imk, txt, txk = g_tok, g_mask, q_tok, q_mask
    else:
        img, imk, txt, txk = q_tok, q_mask, g_tok, g_mask
    bi, bt = auto_blocks(img.shape[0], txt.shape[0], img.shape[1], txt.shape[1])
    out = local_similarity_tiled(img, imk, txt, txk, scale, image_block=bi, text_block=bt,
                                 dtype=img.dtype, precision=precision, normalized=True)
    out = out.T if modality == "text" else out
    return jnp.where(g_valid[None, :], out, -jnp.inf)


def _chunk_two_stage(q_glob, q_tok, q_mask, *, g_glob, g_tok, g_mask, g_valid, scale, k, k_loc,
                     modality, axis_name, out_k, precision):
    """One chunk of c queries against the local gallery (G_loc items).

    Returns (rows [c, G_loc] two-stage keys, or top-out_k (keys, global idx) when out_k),
    plus candidates sorted by s_g + s_l: (idx [c, k] global, scores [c, k]).
    """
    n_loc = g_glob.shape[0]
    offset = _offset(axis_name, n_loc)
    s_g = _global_rows(q_glob, g_glob, g_valid)
    k_sel = k if out_k is None else max(k, out_k)       # global top k_sel: candidates + rest
    vals, idx = jax.lax.top_k(s_g, min(k_sel, n_loc))   # local, sorted
    cand = idx[:, :k_loc]                                # the local top k_loc are reranked
    if modality == "text":
        # t2i: pairs grouped by image, [segment * words, D] x [D, image tokens] matmuls; only
        # the queries' words are gathered, never the candidates' image tokens.
        s_l = local_similarity_text_candidates(q_tok, q_mask, g_tok, g_mask, cand, scale,
                                               compute_dtype=g_tok.dtype, precision=precision,
                                               normalized=True)
    else:
        # i2t: per query image one gather of its candidate captions' words and one
        # [k_loc * Lc, D] x [D, image tokens] matmul, max/sum fused with it.
        s_l = local_similarity_image_candidates(q_tok, q_mask, g_tok, g_mask, cand, scale,
                                                compute_dtype=g_tok.dtype, precision=precision,
                                                normalized=True)
    s_l = jnp.pad(s_l, ((0, 0), (0, vals.shape[1] - k_loc)))
    # Merge over devices: s_l rides along with its candidate (reranked where the tokens live);
    # every global top-k item is in its own device's local top k_loc.
    top_vals, top_idx = vals, (idx + offset).astype(jnp.int32)
    if axis_name is not None:
        gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
        top_vals, pos = jax.lax.top_k(gather(vals), k_sel)
        top_idx = jnp.take_along_axis(gather(top_idx), pos, axis=1)
        s_l = jnp.take_along_axis(gather(s_l), pos, axis=1)
    # (Only [:, :k] slices and whole-array uses of top_k results below: a slice at an offset
    # makes XLA:CPU replace its TopK by a full sort of the [c, G_loc] scores.)
    new = top_vals[:, :k] + s_l[:, :k]                   # s_g + s_l of the k candidates
    order_scores, order = jax.lax.top_k(new, k)
    cand_sorted = jnp.take_along_axis(top_idx[:, :k], order, axis=1)
    # Candidates strictly above every non-candidate (all of which are <= the k-th s_g).
    shift = jnp.min(top_vals[:, :k], axis=1) + 1.0 - jnp.min(order_scores, axis=1)
    if out_k is None:
        local_col = top_idx[:, :k] - offset
        local_col = jnp.where((local_col >= 0) & (local_col < n_loc), local_col, n_loc)
        rows = s_g.at[jnp.arange(s_g.shape[0])[:, None], local_col].set(
            new + shift[:, None], mode="drop")
        return rows, cand_sorted, order_scores
    # Top out_k of the two-stage order: the reranked candidates, then global order.
    first = jnp.arange(k_sel) < k
    pad = ((0, 0), (0, k_sel - k))
    keys = jnp.where(first, jnp.pad(order_scores + shift[:, None], pad), top_vals)
    ranked = jnp.where(first, jnp.pad(cand_sorted, pad), top_idx)
    return (keys[:, :out_k], ranked[:, :out_k]), cand_sorted, order_scores


_KERNELS = {"two_stage": _chunk_two_stage, "global": _chunk_global, "local": _chunk_local}


def _stack_chunks(chunk, arrays):
    n = next(a for a in arrays if a is not None).shape[0]
    pad = (-n) % chunk
    padded = [None if a is None else jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
              for a in arrays]
    return n, tuple(None if a is None else a.reshape(-1, chunk, *a.shape[1:]) for a in padded)


def _map_chunks(fn, chunk, *arrays):
    """Runs fn over row chunks of the (query) arrays with lax.map; pads and un-pads rows."""
    n, stacked = _stack_chunks(chunk, arrays)
    out = jax.lax.map(lambda xs: fn(*xs), stacked)
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def _map_gathered_chunks(fn, chunk, axis_name, n_dev, *arrays):
    """Like _map_chunks over this device's query rows, but each step all-gathers one chunk from
    every device, so fn sees [n_dev * chunk] queries (the whole query set never is gathered).
    Outputs come back in global query order: rows of device d are [d * n_local, (d+1) * n_local).
    """
    n, stacked = _stack_chunks(chunk, arrays)
    gather = lambda x: None if x is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
    out = jax.lax.map(lambda xs: fn(*map(gather, xs)), stacked)   # [steps, n_dev * chunk, ...]

    def unstack(o):
        o = o.reshape(o.shape[0], n_dev, chunk, *o.shape[2:])
        o = jnp.swapaxes(o, 0, 1).reshape(n_dev, -1, *o.shape[3:])[:, :n]
        return o.reshape(n_dev * n, *o.shape[2:])

    return jax.tree.map(unstack, out)


def _axis_tuple(axis: Axis) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _axis_size(mesh: Mesh, axis: Axis) -> int:
    axes = _axis_tuple(axis)
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"mesh has axes {tuple(mesh.shape)}; expected an axis {a!r}")
    return math.prod(mesh.shape[a] for a in axes)


@functools.partial(jax.jit, static_argnames=("mode", "k", "modality", "chunk", "mesh", "axis",
                                             "out_k", "dtype", "precision", "normalized"))
def _search_jit(q_glob, q_tok, q_mask, g_glob, g_tok, g_mask, g_valid, scale, *, mode, k,
                modality, chunk, mesh, axis, out_k, dtype, precision, normalized):
    # Normalized once here (elementwise: sharded inputs stay sharded), never per query chunk.
    norm_glob = (lambda x: x.astype(jnp.float32)) if normalized else l2_normalize
    q_glob = None if q_glob is None else norm_glob(q_glob)
    g_glob = None if g_glob is None else norm_glob(g_glob)
    if q_tok is not None:
        q_tok = normalize_tokens(q_tok, dtype, normalized)
        g_tok = normalize_tokens(g_tok, dtype, normalized)
    n_dev = 1 if mesh is None else _axis_size(mesh, axis)
    n_loc = g_valid.shape[0] // n_dev
    axis_name = None if mesh is None else axis

    def per_device(qg, qt, qm, gg, gt, gm, gv, sc):
        kernel = functools.partial(
            _KERNELS[mode], g_glob=gg, g_tok=gt, g_mask=gm, g_valid=gv, scale=sc, k=k,
            k_loc=min(k, n_loc), modality=modality, axis_name=axis_name, out_k=out_k,
            precision=precision)
        if axis_name is None:
            return _map_chunks(kernel, chunk, qg, qt, qm)
        return _map_gathered_chunks(kernel, chunk, axis_name, n_dev, qg, qt, qm)

    args = (q_glob, q_tok, q_mask, g_glob, g_tok, g_mask, g_valid, scale)
    if mesh is None:
        return per_device(*args)
    rows_spec = P(None, axis)                         # [Nq, Ng] sharded over the gallery
    if mode != "two_stage":
        out_specs = rows_spec
    else:
        out_specs = ((P(), P()) if out_k is not None else rows_spec, P(), P())
    fn = _shard_map(per_device, mesh=mesh, in_specs=(P(axis),) * 7 + (P(),),
                    out_specs=out_specs)
    return fn(*args)


def _auto_chunk(mode, modality, n_query, n_dev, n_gallery_local, k_loc, l_query, l_cand, dim,
                itemsize, budget=DEFAULT_CHUNK_BYTES):
    """Queries per device per step so that one step (n_dev * chunk queries) fits ``budget``."""
    per_query = 3 * 4 * n_gallery_local                          # s_g, keys, rows
    if n_dev > 1:                                                 # all-gathered query features
        per_query += l_query * dim * itemsize + 4 * dim
    if mode == "two_stage" and modality == "text":
        per_query += k_loc * (32 + 12 * l_query)                 # pair / packed-word tables
    elif mode == "two_stage":
        per_query += 16 * k_loc                                   # candidates + scores
        if jax.default_backend() != "cpu":                        # batched over the chunk
            per_query += (k_loc * l_cand * dim * itemsize          # gathered candidate words
                          + 4 * k_loc * l_cand * l_query)         # float32 cosines
    elif mode == "local":
        per_query += 4 * n_gallery_local                          # + tiles bounded by tile_bytes
    return int(max(1, min(n_query, budget // max(n_dev * per_query, 1))))


def _pad_rows_to(x, multiple):
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def _run_search(mode, query_global, query_tokens, query_mask, gallery_global, gallery_tokens,
                gallery_mask, gallery_valid, k, direction, local_scale, query_chunk, mesh, axis,
                out_k, compute_dtype, precision, normalized):
    """Validates, compacts the token axes (host: only [L] bools come back), pads rows for the
    mesh and runs _search_jit. Returns (outputs with padded rows/cols, n_queries, n_gallery)."""
    modality = _query_modality(direction)
    use_global = mode in ("two_stage", "global")
    use_tokens = mode in ("two_stage", "local")
    if use_global:
        query_global, gallery_global = jnp.asarray(query_global), jnp.asarray(gallery_global)
        if query_global.ndim != 2 or gallery_global.ndim != 2 or \
                query_global.shape[1] != gallery_global.shape[1]:
            raise ValueError(f"query_global [Nq,D] and gallery_global [Ng,D] must share D; got "
                             f"{tuple(query_global.shape)} and {tuple(gallery_global.shape)}")
        n_q, n_g = query_global.shape[0], gallery_global.shape[0]
    else:
        query_global = gallery_global = None
    if use_tokens:
        query_tokens, gallery_tokens = jnp.asarray(query_tokens), jnp.asarray(gallery_tokens)
        query_mask = jnp.asarray(query_mask).astype(bool)
        gallery_mask = jnp.asarray(gallery_mask).astype(bool)
        check_tokens(query_tokens, query_mask, "query")
        check_tokens(gallery_tokens, gallery_mask, "gallery")
        if not use_global:
            n_q, n_g = query_tokens.shape[0], gallery_tokens.shape[0]
        if query_tokens.shape[0] != n_q or gallery_tokens.shape[0] != n_g:
            raise ValueError(f"tokens must have one row per global feature: query_tokens "
                             f"{tuple(query_tokens.shape)} vs {n_q} queries, gallery_tokens "
                             f"{tuple(gallery_tokens.shape)} vs {n_g} gallery items")
        if query_tokens.shape[-1] != gallery_tokens.shape[-1]:
            raise ValueError(f"query_tokens and gallery_tokens must share D; got "
                             f"{query_tokens.shape[-1]} and {gallery_tokens.shape[-1]}")
        # No work on padding: slice both token axes to their valid windows (exact).
        query_tokens, query_mask = compact_tokens(query_tokens, query_mask)
        gallery_tokens, gallery_mask = compact_tokens(gallery_tokens, gallery_mask)
        dtype = resolve_compute_dtype(compute_dtype, query_tokens, gallery_tokens)
    else:
        query_tokens = query_mask = gallery_tokens = gallery_mask = None
        dtype = jnp.dtype(jnp.float32)
    if int(k) < 1:
        raise ValueError(f"k (candidates reranked per query) must be >= 1; got {k}")
    n_valid = n_g
    if gallery_valid is None:
        g_valid = jnp.ones((n_g,), bool)
    else:
        g_valid = jnp.asarray(gallery_valid).astype(bool)
        if g_valid.shape != (n_g,):
            raise ValueError(f"gallery_valid must have shape ({n_g},); got {g_valid.shape}")
        n_valid = int(jax.device_get(jnp.sum(g_valid)))      # candidates only among valid items
    if n_valid == 0:
        raise ValueError("the gallery is empty")
    k = min(int(k), n_valid)
    n_dev = 1 if mesh is None else _axis_size(mesh, axis)
    # Rows that can never be selected (s_g = -inf, no valid tokens) so every device holds as
    # many; queries padded likewise with a mesh (their rows are sliced off). No-op when divisible.
    gallery_global, gallery_tokens, gallery_mask, g_valid = (
        None if a is None else _pad_rows_to(a, n_dev)
        for a in (gallery_global, gallery_tokens, gallery_mask, g_valid))
    query_global, query_tokens, query_mask = (
        None if a is None else _pad_rows_to(a, n_dev)
        for a in (query_global, query_tokens, query_mask))
    n_loc = g_valid.shape[0] // n_dev
    n_q_loc = -(-n_q // n_dev)
    if query_chunk is None:
        l_q = 0 if query_tokens is None else query_tokens.shape[1]
        l_c = 0 if gallery_tokens is None else gallery_tokens.shape[1]
        d = (query_global if query_tokens is None else query_tokens).shape[-1]
        query_chunk = _auto_chunk(mode, modality, n_q_loc, n_dev, n_loc, min(k, n_loc), l_q, l_c, d,
                                  jnp.dtype(dtype).itemsize)
    query_chunk = max(1, min(int(query_chunk), max(n_q_loc, 1)))
    if n_q_loc:                                                   # equal steps: least padding
        query_chunk = -(-n_q_loc // -(-n_q_loc // query_chunk))
    out = _search_jit(query_global, query_tokens, query_mask, gallery_global, gallery_tokens,
                      gallery_mask, g_valid, jnp.asarray(local_scale, jnp.float32), mode=mode,
                      k=k, modality=modality, chunk=query_chunk, mesh=mesh,
                      axis=None if mesh is None else _axis_tuple(axis), out_k=out_k,
                      dtype=jnp.dtype(dtype), precision=resolve_precision(precision, dtype),
                      normalized=bool(normalized))
    return out, n_q, n_g


def _unpad(x, n_rows, n_cols=None):
    """Drops padded rows (and columns); no slicing (which would re-layout a sharded result)
    when nothing was padded."""
    if x.shape[0] != n_rows:
        x = x[:n_rows]
    if n_cols is not None and x.shape[1] != n_cols:
        x = x[:, :n_cols]
    return x


def two_stage_scores(query_global, query_tokens, query_mask, gallery_global, gallery_tokens,
                     gallery_mask, k: int, direction: str = "t2i", local_scale: float = 10.0,
                     query_chunk: Optional[int] = None, mesh: Optional[Mesh] = None,
                     axis: Axis = "data", return_candidates: bool = False, compute_dtype=None,
                     precision=None, normalized: bool = False, gallery_valid=None):
    """Two-stage retrieval scores: float32 [Nq, Ng] whose row-wise descending order is the
    two-stage ranking (see module docstring).

    Args:
      query_global [Nq, D], gallery_global [Ng, D]: global features.
      query_tokens [Nq, Lq, D] / query_mask [Nq, Lq] bool; gallery_tokens [Ng, Lg, D] /
        gallery_mask [Ng, Lg] bool. t2i: queries are texts, gallery images; i2t: reverse.
      k: candidates reranked per query (t2i 100, i2t 50 in TGDT); k >= Ng reranks everything.
      local_scale: scale of the local similarity (10).
      query_chunk: queries per lax.map step (per device with a mesh; None: chosen to keep a
        step under ~256 MiB).
      mesh: optional jax.sharding.Mesh; gallery and queries are sharded over its axis (or tuple
        of axes) ``axis``; the result is sharded over the gallery (columns).
      return_candidates: also return (idx [Nq, k] int32, scores [Nq, k] = s_g + s_l), sorted.
      compute_dtype / precision: token matmul dtype (default: tokens' dtype) and precision.
      normalized: inputs already L2-normalized (tokens in the compute dtype), e.g. from
        :func:`prepare_features`: used as they are.
      gallery_valid: optional [Ng] bool; False items (e.g. padding) are never candidates and
        score -inf.
    """
    (rows, cand_idx, cand_scores), n_q, n_g = _run_search(
        "two_stage", query_global, query_tokens, query_mask, gallery_global, gallery_tokens,
        gallery_mask, gallery_valid, k, direction, local_scale, query_chunk, mesh, axis, None,
        compute_dtype, precision, normalized)
    rows, cand_idx, cand_scores = _unpad(rows, n_q, n_g), _unpad(cand_idx, n_q), _unpad(
        cand_scores, n_q)
    if return_candidates:
        return rows, (cand_idx, cand_scores)
    return rows


def global_scores(query_global, gallery_global, mesh: Optional[Mesh] = None, axis: Axis = "data",
                  query_chunk: Optional[int] = None, normalized: bool = False,
                  gallery_valid=None) -> jax.Array:
    """Cosine scores [Nq, Ng] (:func:`xmr_jax.similarity.global_similarity`), sharded like :func:`two_stage_scores`
    with ``mesh`` (queries gathered a chunk at a time); invalid gallery items score -inf."""
    rows, n_q, n_g = _run_search("global", query_global, None, None, gallery_global, None, None,
                                 gallery_valid, 1, "t2i", 0.0, query_chunk, mesh, axis, None,
                                 None, None, normalized)
    return _unpad(rows, n_q, n_g)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _global_topk_jit(q, g, *, k, chunk):
    g = l2_normalize(g)

    def kernel(qc):
        s = jnp.matmul(l2_normalize(qc), g.T, precision=jax.lax.Precision.HIGHEST)
        vals, idx = jax.lax.top_k(s, k)
        return idx, vals

    return _map_chunks(kernel, chunk, q)


def topk_search(query_global, gallery_global, k: int = 10, query_tokens=None, query_mask=None,
                gallery_tokens=None, gallery_mask=None, rerank_k: Optional[int] = None,
                direction: str = "t2i", local_scale: float = 10.0,
                query_chunk: Optional[int] = None, mesh: Optional[Mesh] = None,
                axis: Axis = "data", compute_dtype=None, precision=None,
                normalized: bool = False, gallery_valid=None):
    """Top-``k`` gallery items per query -> (indices [Nq, k] int32, scores [Nq, k] float32).

    Global search when no tokens are given (scores = cosines). Two-stage search when tokens are
    given: the top ``rerank_k`` (default: max(k, 100 for t2i / 50 for i2t)) global candidates are
    reranked by s_g + s_l; returned scores are s_g + s_l for reranked items and s_g for the rest
    (which follow in global order). The full [Nq, Ng] matrix is never built. ``normalized`` /
    ``gallery_valid``: as in :func:`two_stage_scores`.
    """
    k = int(k)
    n_g = jnp.shape(gallery_global)[0]
    if k < 1 or k > n_g:
        raise ValueError(f"k must be in [1, number of gallery items = {n_g}]; got {k}")
    if query_tokens is None and gallery_tokens is None:
        q, g = jnp.asarray(query_global), jnp.asarray(gallery_global)
        if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
            raise ValueError(f"query_global [Nq,D] and gallery_global [Ng,D] must share D; got "
                             f"{tuple(q.shape)} and {tuple(g.shape)}")
        if gallery_valid is not None:
            raise ValueError("gallery_valid needs the two-stage path (pass tokens)")
        chunk = query_chunk or max(1, min(q.shape[0], DEFAULT_CHUNK_BYTES // (8 * n_g)))
        return _global_topk_jit(q, g, k=k, chunk=int(chunk))
    if any(x is None for x in (query_tokens, query_mask, gallery_tokens, gallery_mask)):
        raise ValueError("two-stage topk_search needs query_tokens, query_mask, gallery_tokens "
                         "and gallery_mask (or none of them for global search)")
    if rerank_k is None:
        rerank_k = max(k, 100 if direction == "t2i" else 50)
    ((keys, idx), _, cand_scores), n_q, _ = _run_search(
        "two_stage", query_global, query_tokens, query_mask, gallery_global, gallery_tokens,
        gallery_mask, gallery_valid, rerank_k, direction, local_scale, query_chunk, mesh, axis,
        k, compute_dtype, precision, normalized)
    n_cand = min(k, cand_scores.shape[1])           # rerank_k, capped by the valid items
    scores = keys.at[:, :n_cand].set(cand_scores[:, :n_cand])
    return _unpad(idx, n_q).astype(jnp.int32), _unpad(scores, n_q)
