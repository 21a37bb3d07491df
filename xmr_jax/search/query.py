"""Text queries against an index: tokenize, encode, rank (global cosine or two-stage).

Captions are tokenized with the model's text scheme (CLIP: IRRA's mask-variant CLIP tokenizer;
tgdt_regions: BERT WordPiece from the config's vocab; context length from the model), encoded, and searched: two-stage (global top `rerank_k`, reranked by s_g + s_l, TGDT's rule) when
the index holds tokens, else global cosine. An index folder is scanned chunk by chunk for the
global top candidates (exact, or jax.lax.approx_max_k), and only the candidates' tokens are read
for the rerank, done by `xmr_jax.retrieval.topk_search` on them; a .npz index is searched whole
in memory by `topk_search`. Both give the same ranking. Each result
also carries its global cosine, which (unlike s_g + s_l, a sum over the query's words) can be
compared across queries. Empty queries are rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import numpy as np

from xmr_jax.search.encoders import Encoders, as_encoders
from xmr_jax.search.errors import SearchError
from xmr_jax.search.index import check_compatible


@dataclasses.dataclass
class SearchResult:
    """indices int32 [Q, k] into the index; scores float32 [Q, k] (s_g + s_l for reranked
    items when two_stage, else cosine); paths: Q lists of k relative paths; cosine float32
    [Q, k]: the global cosine of each result (comparable across queries, unlike s_g + s_l)."""

    texts: list[str]
    indices: np.ndarray
    scores: np.ndarray
    paths: list[list[str]]
    two_stage: bool
    rerank_k: Optional[int]
    cosine: Optional[np.ndarray] = None


def query_token_counts(texts: Sequence[str], context_length: int, tokenizer=None) -> list[tuple[int, int]]:
    """(word tokens of the caption, word tokens kept: at most context_length - 2) per query;
    tokenizer: `Encoders.tokenizer()` (default IRRA's mask-variant CLIP BPE)."""
    if tokenizer is None:
        from xmr_jax.tokenizer import default_tokenizer

        tokenizer = default_tokenizer(mask_token=True, context_length=context_length)
    counts = [tokenizer.num_tokens(t) for t in texts]
    return [(n, min(n, context_length - 2)) for n in counts]


def check_queries(texts: Sequence[str]) -> None:
    """Raises SearchError naming the first empty (or blank) query."""
    empty = [i + 1 for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise SearchError(f"query {empty[0]} of {len(texts)} is empty: give each --text (or line of "
                          "--queries_file) some words")


def encode_texts(enc: Encoders, texts: Sequence[str], batch_size: int = 64):
    """Tokenizes with the encoders' text scheme (CLIP: IRRA's mask-variant BPE; tgdt_regions: BERT
    WordPiece) and encodes -> (global f32 [Q,D], tokens f32 [Q,T,D], mask [Q,T])."""
    ids = enc.tokenizer().encode(list(texts))
    bs = min(batch_size, 1 << max(0, (len(texts) - 1).bit_length()))  # few compiled shapes
    outs = []
    for b0 in range(0, len(ids), bs):
        chunk = ids[b0:b0 + bs]
        padded = np.zeros((bs, ids.shape[1]), np.int32)
        padded[:len(chunk)] = chunk
        g, t, m = enc.encode_text(padded)
        outs.append((np.asarray(g[:len(chunk)], np.float32), np.asarray(t[:len(chunk)], np.float32),
                     None if m is None else np.asarray(m[:len(chunk)], bool)))
    g, t, m = (np.concatenate([o[i] for o in outs]) if outs[0][i] is not None else None for i in range(3))
    return g, t, m


def _rerank_candidates(index, q_glob, q_tok, q_mask, k: int, rerank_k: int,
                       recall_target: Optional[float]):
    """Two-stage search reading only the candidates' tokens -> (indices [Q, k], scores [Q, k]).

    The global top max(k, rerank_k) of each query over the index's global chunks
    (store.chunked_topk: exact, or approx_max_k with `recall_target`); the union U of these
    candidates over the queries (sorted, so ties keep the gallery's order) is read (global rows
    and tokens) and searched with `xmr_jax.retrieval.topk_search` as a gallery of its own (padded
    to a power of two with invalid rows). Each
    query's global top max(k, rerank_k) lies in U, so with the exact first stage the ranking is
    the one topk_search gives on the whole gallery.
    """
    from xmr_jax.retrieval import topk_search
    from xmr_jax.search.store import chunked_topk

    n_first = min(len(index), max(k, rerank_k))
    first, _ = chunked_topk(q_glob, index.global_chunks(), n_first, recall_target=recall_target)
    union = np.unique(first)
    # Padded to a power of two with rows that are never selected (gallery_valid False), so
    # repeated searches reuse a few compiled shapes instead of one per candidate count.
    n_u, n_pad = len(union), 1 << max(0, (len(union) - 1).bit_length())
    pad = lambda x: np.concatenate([x, np.zeros((n_pad - n_u,) + x.shape[1:], x.dtype)])
    sub_glob = pad(index.global_rows(union))
    sub_tok, sub_mask = map(pad, index.token_rows(union))
    sub_idx, scores = topk_search(q_glob, sub_glob, k, query_tokens=q_tok, query_mask=q_mask,
                                  gallery_tokens=sub_tok, gallery_mask=sub_mask,
                                  rerank_k=rerank_k, direction="t2i",
                                  gallery_valid=np.arange(n_pad) < n_u)
    return union[np.asarray(sub_idx)], np.asarray(scores, np.float32)


def search_features(index, query_global, query_tokens=None, query_mask=None, k: int = 10,
                    rerank_k: int = 100, mesh=None, recall_target: Optional[float] = None):
    """Searches an index with encoded queries -> (indices int32 [Q, k], scores float32 [Q, k]).

    query_global f32 [Q, D]; query_tokens f32 [Q, T, D] + query_mask bool [Q, T] for two-stage
    search (None: global cosine). An IndexStore (or recall_target) is searched chunk by chunk:
    the global top max(k, rerank_k) of each query (`store.chunked_topk`), then only those
    candidates' rows are read and searched with `xmr_jax.retrieval.topk_search`; an in-memory
    ImageIndex without recall_target goes to topk_search whole (mesh: sharded over its "data"
    axis). Scores: s_g + s_l for reranked items, else the cosine. k <= len(index).
    """
    from xmr_jax.retrieval import topk_search
    from xmr_jax.search.store import IndexStore, chunked_topk

    two_stage = query_tokens is not None
    chunked = isinstance(index, IndexStore) or recall_target is not None
    if chunked and mesh is not None:
        raise SearchError("--shard_gallery shards a .npz index held in memory (exact search); an index "
                          "folder (or --approx_recall) is searched chunk by chunk on one device")
    if chunked and two_stage:
        idx, scores = _rerank_candidates(index, query_global, query_tokens, query_mask, k,
                                         int(rerank_k), recall_target)
    elif chunked:
        idx, scores = chunked_topk(query_global, index.global_chunks(), k, recall_target=recall_target)
    elif two_stage:
        idx, scores = topk_search(query_global, index.global_features, k, query_tokens=query_tokens,
                                  query_mask=query_mask, gallery_tokens=index.tokens,
                                  gallery_mask=index.mask, rerank_k=int(rerank_k), direction="t2i",
                                  mesh=mesh)
    else:
        idx, scores = topk_search(query_global, index.global_features, k)
    return np.asarray(idx, np.int32), np.asarray(scores, np.float32)


def search(index, model, params, texts: Sequence[str], k: int = 10,
           rerank_k: int = 100, two_stage: Optional[bool] = None, check: bool = True,
           mesh=None, recall_target: Optional[float] = None) -> SearchResult:
    """Top-k images of the index for each text query.

    Args:
      index: an IndexStore (index folder: only its global features are scanned, chunk by chunk;
        only the candidates' tokens are read) or an in-memory ImageIndex (.npz).
      model, params: the CLIP it was built with (or an `Encoders`).
      texts: Q query captions. k: results per query (capped at the index size).
      rerank_k: global candidates reranked by s_g + s_l in two-stage search.
      two_stage: None = two-stage iff the index holds tokens; True needs tokens; False = global.
      check: verify that the model matches the index (IndexMismatchError).
      mesh: optional jax.sharding.Mesh with a "data" axis: an in-memory ImageIndex's gallery is
        sharded over it (two-stage search; same results as one device).
      recall_target: None = exact global top-k; a float in (0, 1] = jax.lax.approx_max_k with
        this recall target for the global stage (approximate on TPU; XLA computes it exactly on
        CPU and GPU).
    Repeated calls: pass `model_encoders(model, params)` as `model` to reuse compiled encoders.
    """
    enc = as_encoders(model, params)
    texts = [str(t) for t in texts]
    if not texts:
        raise SearchError("no query texts given (use --text or --queries_file)")
    check_queries(texts)
    if check:
        check_compatible(index, enc)
    if two_stage is None:
        two_stage = index.has_tokens
    if two_stage and not index.has_tokens:
        raise SearchError("two-stage search needs token features, but the index was built with "
                          "--no_tokens; rebuild it with tokens or use --global_only")
    if k < 1:
        raise SearchError(f"--k must be >= 1, got {k}")
    if rerank_k < 1:
        raise SearchError(f"--rerank_k must be >= 1, got {rerank_k}")
    if recall_target is not None and not 0.0 < float(recall_target) <= 1.0:
        raise SearchError(f"--approx_recall must be in (0, 1], got {recall_target}")
    k = min(int(k), len(index))
    q_glob, q_tok, q_mask = encode_texts(enc, texts)
    if two_stage and (q_tok is None or q_mask is None):
        raise SearchError("the text encoder returns no token features/mask; use --global_only")
    idx, scores = search_features(index, q_glob, q_tok if two_stage else None,
                                  q_mask if two_stage else None, k, rerank_k, mesh=mesh,
                                  recall_target=recall_target)
    rk = int(rerank_k) if two_stage else None
    flat = index.paths_of(idx.reshape(-1))
    paths = [flat[q * k:(q + 1) * k] for q in range(len(texts))]
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    rows = unit(index.global_rows(idx.reshape(-1))).reshape(idx.shape + (-1,))
    cosine = np.einsum("qd,qkd->qk", unit(np.asarray(q_glob, np.float32)), rows).astype(np.float32)
    return SearchResult(texts, idx, scores, paths, bool(two_stage), rk, cosine)
