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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from xmr_jax.similarity import (_check_tokens, _compute_dtype, _precision, global_similarity,
                                l2_normalize, local_similarity, local_similarity_candidates)

DEFAULT_CHUNK_BYTES = 256 * 2**20  # working-set bound per query chunk
DIRECTIONS = ("t2i", "i2t")

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


def exhaustive_global(query_global: jax.Array, gallery_global: jax.Array) -> jax.Array:
    """Cosine scores of every query [Nq, D] against every gallery item [Ng, D] -> [Nq, Ng]."""
    return global_similarity(query_global, gallery_global)


def exhaustive_local(query_tokens, query_mask, gallery_tokens, gallery_mask,
                     direction: str = "t2i", local_scale: float = 10.0, **block_kwargs):
    """Local similarity of every query against every gallery item -> float32 [Nq, Ng].

    t2i: query = texts [Nq, Lt, D], gallery = images [Ng, Li, D]; i2t: the other way round.
    ``block_kwargs`` go to :func:`xmr_jax.similarity.local_similarity` (tiling, compute dtype).
    """
    if _query_modality(direction) == "text":
        return local_similarity(gallery_tokens, gallery_mask, query_tokens, query_mask,
                                local_scale, **block_kwargs).T
    return local_similarity(query_tokens, query_mask, gallery_tokens, gallery_mask,
                            local_scale, **block_kwargs)


def exhaustive_two_stage_equivalent(query_global, query_tokens, query_mask, gallery_global,
                                    gallery_tokens, gallery_mask, direction="t2i",
                                    local_scale=10.0, **block_kwargs):
    """s_g + s_l for all pairs [Nq, Ng]: the ranking two-stage search gives with k >= Ng."""
    return (exhaustive_global(query_global, gallery_global)
            + exhaustive_local(query_tokens, query_mask, gallery_tokens, gallery_mask,
                               direction, local_scale, **block_kwargs))


# ----------------------------------------------------------------------------------------------
# Per-chunk kernel (runs on one device over the gallery it holds).


def _merge_topk(vals, idx, k, axis_name):
    """Global top-k from per-device top-k: vals/idx [c, k_loc] -> [c, k] (replicated)."""
    if axis_name is None:
        return vals, idx
    all_vals = jax.lax.all_gather(vals, axis_name, axis=1, tiled=True)
    all_idx = jax.lax.all_gather(idx, axis_name, axis=1, tiled=True)
    top_vals, pos = jax.lax.top_k(all_vals, k)
    return top_vals, jnp.take_along_axis(all_idx, pos, axis=1)


def _chunk_two_stage(q_glob, q_tok, q_mask, g_glob, g_tok, g_mask, g_valid, scale, *, k, k_loc,
                     modality, axis_name, out_k, dtype, precision):
    """One chunk of c queries against the local gallery (G_loc items).

    q_glob [c, D] normalized f32, g_glob [G_loc, D] normalized f32, g_valid [G_loc] bool.
    Returns (rows [c, G_loc] two-stage keys, or top-out_k (keys, global idx) when out_k),
    plus candidates sorted by s_g + s_l: (idx [c, k] global, scores [c, k]).
    """
    n_loc = g_glob.shape[0]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_loc
    s_g = jnp.matmul(q_glob, g_glob.T, precision=jax.lax.Precision.HIGHEST)
    s_g = jnp.where(g_valid[None, :], s_g, -jnp.inf)              # padding never selected
    vals, idx = jax.lax.top_k(s_g, k_loc)                          # local candidates
    if k_loc:
        cand_tok = jnp.take(g_tok, idx, axis=0)                    # [c, k_loc, L, D]
        cand_mask = jnp.take(g_mask, idx, axis=0)
        s_l = local_similarity_candidates(q_tok, q_mask, cand_tok, cand_mask, modality, scale,
                                          compute_dtype=dtype, precision=precision)
    else:
        s_l = jnp.zeros_like(vals)
    # Merge over devices: s_l rides along with its candidate (reranked where the tokens live).
    cand_idx, s_l_all, vals_all = idx + offset, s_l, vals
    if axis_name is not None:
        gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
        cand_idx, s_l_all, vals_all = gather(cand_idx), gather(s_l), gather(vals)
    top_vals, pos = jax.lax.top_k(vals_all, k)
    cand_idx = jnp.take_along_axis(cand_idx, pos, axis=1).astype(jnp.int32)   # [c, k] global
    s_l = jnp.take_along_axis(s_l_all, pos, axis=1)
    new = top_vals + s_l                                           # s_g + s_l  [c, k]
    # Candidates strictly above every non-candidate (all of which are <= the k-th s_g).
    shift = top_vals[:, -1] + 1.0 - jnp.min(new, axis=1)
    local_col = cand_idx - offset
    local_col = jnp.where((local_col >= 0) & (local_col < n_loc), local_col, n_loc)
    rows = s_g.at[jnp.arange(s_g.shape[0])[:, None], local_col].set(
        new + shift[:, None], mode="drop")
    order_scores, order = jax.lax.top_k(new, k)
    cand_sorted = jnp.take_along_axis(cand_idx, order, axis=1)
    if out_k is None:
        return rows, cand_sorted, order_scores
    kk = min(out_k, n_loc)
    keys, top_idx = jax.lax.top_k(rows, kk)
    keys, top_idx = _merge_topk(keys, top_idx + offset, out_k, axis_name)
    return (keys, top_idx), cand_sorted, order_scores


def _map_chunks(fn, chunk, *arrays):
    """Runs fn over row chunks of the (query) arrays with lax.map; pads and un-pads rows."""
    n = arrays[0].shape[0]
    pad = (-n) % chunk
    padded = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    stacked = [a.reshape(-1, chunk, *a.shape[1:]) for a in padded]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(stacked))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


@functools.partial(jax.jit, static_argnames=("k", "modality", "chunk", "mesh", "axis", "out_k",
                                             "dtype", "precision"))
def _two_stage_jit(q_glob, q_tok, q_mask, g_glob, g_tok, g_mask, g_valid, scale, *, k, modality,
                   chunk, mesh, axis, out_k, dtype, precision):
    q_glob = l2_normalize(q_glob)
    g_glob = l2_normalize(g_glob)
    n_dev = 1 if mesh is None else mesh.shape[axis]
    k_loc = min(k, g_glob.shape[0] // n_dev)

    def per_device(qg, qt, qm, gg, gt, gm, gv, sc):
        kernel = functools.partial(
            _chunk_two_stage, g_glob=gg, g_tok=gt, g_mask=gm, g_valid=gv, scale=sc, k=k,
            k_loc=k_loc, modality=modality, axis_name=None if mesh is None else axis,
            out_k=out_k, dtype=dtype, precision=precision)
        return _map_chunks(kernel, chunk, qg, qt, qm)

    if mesh is None:
        return per_device(q_glob, q_tok, q_mask, g_glob, g_tok, g_mask, g_valid, scale)
    rows_spec = P() if out_k is not None else P(None, axis)
    out_specs = ((P(), P()) if out_k is not None else rows_spec, P(), P())
    fn = _shard_map(per_device, mesh=mesh,
                    in_specs=(P(), P(), P(), P(axis), P(axis), P(axis), P(axis), P()),
                    out_specs=out_specs)
    return fn(q_glob, q_tok, q_mask, g_glob, g_tok, g_mask, g_valid, scale)


def _auto_chunk(n_query, n_gallery_local, k_loc, l_query, l_cand, dim, itemsize,
                budget=DEFAULT_CHUNK_BYTES):
    per_query = (3 * 4 * n_gallery_local                       # s_g, keys, where
                 + 2 * k_loc * l_cand * dim * max(itemsize, 4)  # gathered + normalized tokens
                 + 2 * 4 * k_loc * l_cand * l_query)            # cosines (+ masked copy)
    return int(max(1, min(n_query, budget // max(per_query, 1))))


def _run_two_stage(query_global, query_tokens, query_mask, gallery_global, gallery_tokens,
                   gallery_mask, k, direction, local_scale, query_chunk, mesh, axis, out_k,
                   compute_dtype, precision):
    modality = _query_modality(direction)
    query_tokens, gallery_tokens = jnp.asarray(query_tokens), jnp.asarray(gallery_tokens)
    query_mask = jnp.asarray(query_mask).astype(bool)
    gallery_mask = jnp.asarray(gallery_mask).astype(bool)
    query_global, gallery_global = jnp.asarray(query_global), jnp.asarray(gallery_global)
    _check_tokens(query_tokens, query_mask, "query")
    _check_tokens(gallery_tokens, gallery_mask, "gallery")
    n_q, n_g = query_global.shape[0], gallery_global.shape[0]
    if query_global.ndim != 2 or gallery_global.ndim != 2 or \
            query_global.shape[1] != gallery_global.shape[1]:
        raise ValueError(f"query_global [Nq,D] and gallery_global [Ng,D] must share D; got "
                         f"{tuple(query_global.shape)} and {tuple(gallery_global.shape)}")
    if query_tokens.shape[0] != n_q or gallery_tokens.shape[0] != n_g:
        raise ValueError(f"tokens must have one row per global feature: query_tokens "
                         f"{tuple(query_tokens.shape)} vs {n_q} queries, gallery_tokens "
                         f"{tuple(gallery_tokens.shape)} vs {n_g} gallery items")
    if query_tokens.shape[-1] != gallery_tokens.shape[-1]:
        raise ValueError(f"query_tokens and gallery_tokens must share D; got "
                         f"{query_tokens.shape[-1]} and {gallery_tokens.shape[-1]}")
    if int(k) < 1:
        raise ValueError(f"k (candidates reranked per query) must be >= 1; got {k}")
    if n_g == 0:
        raise ValueError("the gallery is empty")
    k = min(int(k), n_g)
    n_dev = 1
    if mesh is not None:
        if axis not in mesh.shape:
            raise ValueError(f"mesh has axes {tuple(mesh.shape)}; expected an axis {axis!r}")
        n_dev = mesh.shape[axis]
    g_valid = jnp.ones((n_g,), bool)
    pad = (-n_g) % n_dev
    if pad:  # entries that can never be selected (s_g = -inf, no valid tokens)
        padw = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        gallery_global, gallery_tokens, gallery_mask, g_valid = map(
            padw, (gallery_global, gallery_tokens, gallery_mask, g_valid))
    n_loc = gallery_global.shape[0] // n_dev
    dtype = _compute_dtype(compute_dtype, query_tokens, gallery_tokens)
    if query_chunk is None:
        query_chunk = _auto_chunk(n_q, n_loc, min(k, n_loc), query_tokens.shape[1],
                                  gallery_tokens.shape[1], gallery_tokens.shape[2],
                                  jnp.dtype(dtype).itemsize)
    query_chunk = max(1, min(int(query_chunk), max(n_q, 1)))
    out = _two_stage_jit(query_global, query_tokens, query_mask, gallery_global, gallery_tokens,
                         gallery_mask, g_valid, jnp.asarray(local_scale, jnp.float32), k=k,
                         modality=modality, chunk=query_chunk, mesh=mesh, axis=axis,
                         out_k=out_k, dtype=dtype, precision=_precision(precision, dtype))
    return out, n_g


def two_stage_scores(query_global, query_tokens, query_mask, gallery_global, gallery_tokens,
                     gallery_mask, k: int, direction: str = "t2i", local_scale: float = 10.0,
                     query_chunk: Optional[int] = None, mesh: Optional[Mesh] = None,
                     axis: str = "data", return_candidates: bool = False, compute_dtype=None,
                     precision=None):
    """Two-stage retrieval scores: float32 [Nq, Ng] whose row-wise descending order is the
    two-stage ranking (see module docstring).

    Args:
      query_global [Nq, D], gallery_global [Ng, D]: global features (unnormalized).
      query_tokens [Nq, Lq, D] / query_mask [Nq, Lq] bool; gallery_tokens [Ng, Lg, D] /
        gallery_mask [Ng, Lg] bool. t2i: queries are texts, gallery images; i2t: reverse.
      k: candidates reranked per query (t2i 100, i2t 50 in TGDT); k >= Ng reranks everything.
      local_scale: scale of the local similarity (10).
      query_chunk: queries per lax.map step (None: chosen to keep a chunk under ~256 MiB).
      mesh: optional jax.sharding.Mesh; the gallery is sharded over its axis ``axis``.
      return_candidates: also return (idx [Nq, k] int32, scores [Nq, k] = s_g + s_l), sorted.
      compute_dtype / precision: token matmul dtype (default: tokens' dtype) and precision.
    """
    (rows, cand_idx, cand_scores), n_g = _run_two_stage(
        query_global, query_tokens, query_mask, gallery_global, gallery_tokens, gallery_mask, k,
        direction, local_scale, query_chunk, mesh, axis, None, compute_dtype, precision)
    rows = rows[:, :n_g]
    return (rows, (cand_idx, cand_scores)) if return_candidates else rows


def sharded_two_stage_scores(*args, mesh: Mesh, axis: str = "data", **kwargs):
    """:func:`two_stage_scores` with the gallery sharded over ``mesh`` axis ``axis``."""
    return two_stage_scores(*args, mesh=mesh, axis=axis, **kwargs)


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
                axis: str = "data", compute_dtype=None, precision=None):
    """Top-``k`` gallery items per query -> (indices [Nq, k] int32, scores [Nq, k] float32).

    Global search when no tokens are given (scores = cosines). Two-stage search when tokens are
    given: the top ``rerank_k`` (default: max(k, 100 for t2i / 50 for i2t)) global candidates are
    reranked by s_g + s_l; returned scores are s_g + s_l for reranked items and s_g for the rest
    (which follow in global order). The full [Nq, Ng] matrix is never built without a mesh.
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
        chunk = query_chunk or max(1, min(q.shape[0], DEFAULT_CHUNK_BYTES // (8 * n_g)))
        return _global_topk_jit(q, g, k=k, chunk=int(chunk))
    if any(x is None for x in (query_tokens, query_mask, gallery_tokens, gallery_mask)):
        raise ValueError("two-stage topk_search needs query_tokens, query_mask, gallery_tokens "
                         "and gallery_mask (or none of them for global search)")
    if rerank_k is None:
        rerank_k = max(k, 100 if direction == "t2i" else 50)
    ((keys, idx), _, cand_scores), _ = _run_two_stage(
        query_global, query_tokens, query_mask, gallery_global, gallery_tokens, gallery_mask,
        rerank_k, direction, local_scale, query_chunk, mesh, axis, k, compute_dtype, precision)
    n_cand = min(k, int(rerank_k), n_g)
    scores = keys.at[:, :n_cand].set(cand_scores[:, :n_cand])
    return idx.astype(jnp.int32), scores
