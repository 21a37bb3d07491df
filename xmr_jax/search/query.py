"""Text queries against an index: tokenize, encode, rank (global cosine or two-stage).

Captions are tokenized with IRRA's mask-variant CLIP tokenizer (context length from the model),
encoded, and searched with `xmr_jax.retrieval.topk_search`: two-stage (global top `rerank_k`,
reranked by s_g + s_l, TGDT's rule) when the index holds tokens, else global cosine. Each result
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
from xmr_jax.search.index import ImageIndex, check_compatible


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


def query_token_counts(texts: Sequence[str], context_length: int) -> list[tuple[int, int]]:
    """(word tokens of the caption, word tokens kept: at most context_length - 2) per query."""
    from xmr_jax.tokenizer import default_tokenizer

    tok = default_tokenizer(mask_token=True, context_length=context_length)
    counts = [len(tok.bpe_ids(t)) for t in texts]
    return [(n, min(n, context_length - 2)) for n in counts]


def check_queries(texts: Sequence[str]) -> None:
    """Raises SearchError naming the first empty (or blank) query."""
    empty = [i + 1 for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise SearchError(f"query {empty[0]} of {len(texts)} is empty: give each --text (or line of "
                          "--queries_file) some words")


def encode_texts(enc: Encoders, texts: Sequence[str], batch_size: int = 64):
    """Tokenizes (IRRA mask variant) and encodes -> (global f32 [Q,D], tokens f32 [Q,T,D], mask [Q,T])."""
    from xmr_jax.tokenizer import default_tokenizer

    ids = default_tokenizer(mask_token=True, context_length=enc.context_length).encode(list(texts))
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


def search(index: ImageIndex, model, params, texts: Sequence[str], k: int = 10,
           rerank_k: int = 100, two_stage: Optional[bool] = None, check: bool = True,
           mesh=None) -> SearchResult:
    """Top-k images of the index for each text query.

    Args:
      index: an ImageIndex; model, params: the CLIP it was built with (or an `Encoders`).
      texts: Q query captions. k: results per query (capped at the index size).
      rerank_k: global candidates reranked by s_g + s_l in two-stage search.
      two_stage: None = two-stage iff the index holds tokens; True needs tokens; False = global.
      check: verify that the model matches the index (IndexMismatchError).
      mesh: optional jax.sharding.Mesh with a "data" axis: the gallery is sharded over it
        (two-stage search; same results as one device).
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
    k = min(int(k), len(index))
    q_glob, q_tok, q_mask = encode_texts(enc, texts)
    from xmr_jax.retrieval import topk_search

    if two_stage:
        if q_tok is None or q_mask is None:
            raise SearchError("the text encoder returns no token features/mask; use --global_only")
        rk = int(rerank_k)
        idx, scores = topk_search(q_glob, index.global_features, k, query_tokens=q_tok,
                                  query_mask=q_mask, gallery_tokens=index.tokens,
                                  gallery_mask=index.mask, rerank_k=rk, direction="t2i",
                                  mesh=mesh)
    else:
        rk = None
        idx, scores = topk_search(q_glob, index.global_features, k)
    idx, scores = np.asarray(idx, np.int32), np.asarray(scores, np.float32)
    paths = [[index.paths[j] for j in row] for row in idx]
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    gallery = unit(np.asarray(index.global_features, np.float32))
    cosine = np.einsum("qd,qkd->qk", unit(np.asarray(q_glob, np.float32)), gallery[idx]).astype(np.float32)
    return SearchResult(texts, idx, scores, paths, bool(two_stage), rk, cosine)

