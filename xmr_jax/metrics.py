"""Retrieval metrics: person retrieval (R@K, mAP, mINP), image-caption recall (R@K, rsum) and
image-caption NDCG@k with graded relevance files (TERAN's ROUGE-L / SPICE protocol).

All computations run in NumPy on the host (a stable sort in chunks of queries is faster on CPU
than on-device sorting and needs no recompilation per shape); inputs may be NumPy or JAX arrays of
any float dtype (bf16 is upcast to float32). Results are python floats in PERCENT, except NDCG
(a fraction in [0, 1], as TERAN and TGDT print it).

Tie rule (everywhere): gallery items with equal similarity are ranked by ascending gallery
index, i.e. the ranking is a stable descending sort. Ranks below are 0-based unless stated.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "person_retrieval_metrics",
    "caption_retrieval_metrics",
    "coco_1k_metrics",
    "format_metrics_table",
    "RelevanceFileError",
    "relevance_path",
    "load_relevance",
    "load_relevances",
    "ndcg_metrics",
]

_CHUNK_ELEMENTS = 1 << 22  # ~4M similarity entries per chunk (16 MB float32)


def _as_float_matrix(x, name: str, fn: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{fn}: `{name}` must be a 2-D matrix, got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize < 4:
        x = x.astype(np.float32)  # bf16 / fp16 / ints
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError(f"{fn}: `{name}` contains NaN or infinite values.")
    return x


def _as_ids(x, length: int, name: str, fn: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != (length,):
        raise ValueError(f"{fn}: `{name}` must have shape ({length},), got {x.shape}.")
    return x


def _chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _recall_at(ranks: np.ndarray, k: int) -> float:
    """Percentage of 0-based `ranks` below k."""
    return float(100.0 * np.mean(ranks < k))


# ----------------------------------------------------------------------------- person retrieval


def person_retrieval_metrics(
    similarity, query_pids, gallery_pids, ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """Text-to-image person retrieval metrics (IRRA protocol, docs/semantics.md, section 'Evaluation').

    Args:
      similarity: [Nq, Ng] scores, rows queries (captions), cols gallery images; higher = closer.
      query_pids: [Nq] int person ids of the queries.
      gallery_pids: [Ng] int person ids of the gallery items.
      ks: the K values of R@K.

    Returns:
      {"R1", "R5", "R10", "mAP", "mINP"} (keys follow `ks`) as python floats in percent:
      - R@K: % of queries with at least one same-pid item in the top K;
      - mAP: mean over queries of AP = sum_k match_k * hits(<=k) / k / #same-pid items;
      - mINP: mean over queries of #same-pid items / (1-based rank of the last same-pid item).
      Ranking: stable descending sort (ties -> lower gallery index first).

    Raises:
      ValueError: wrong shapes, non-finite scores, or a query without any same-pid gallery item
        (its AP / INP would be undefined).
    """
    fn = "person_retrieval_metrics"
    sim = _as_float_matrix(similarity, "similarity", fn)
    n_q, n_g = sim.shape
    q_pids = _as_ids(query_pids, n_q, "query_pids", fn)
    g_pids = _as_ids(gallery_pids, n_g, "gallery_pids", fn)
    ks = tuple(int(k) for k in ks)
    if n_q == 0 or n_g == 0:
        raise ValueError(f"{fn}: empty similarity matrix of shape {sim.shape}.")
    if any(k < 1 for k in ks):
        raise ValueError(f"{fn}: every K in `ks` must be >= 1, got {ks}.")

    first_hit = np.empty(n_q, np.int64)
    ap = np.empty(n_q, np.float64)
    inp = np.empty(n_q, np.float64)
    positions = np.arange(1, n_g + 1, dtype=np.float64)  # 1-based ranks
    for start, stop in _chunks(n_q, n_g):
        order = np.argsort(-sim[start:stop], axis=1, kind="stable")
        matches = g_pids[order] == q_pids[start:stop, None]  # [n, Ng] bool, ranked
        n_pos = matches.sum(axis=1)
        if np.any(n_pos == 0):
            bad = start + int(np.flatnonzero(n_pos == 0)[0])
            raise ValueError(
                f"{fn}: query {bad} (pid {q_pids[bad]!r}) has no gallery item with the same pid; "
                f"{int(np.sum(n_pos == 0))} such queries in rows {start}..{stop - 1}. Every query "
                "needs at least one match for mAP / mINP."
            )
        hits = np.cumsum(matches, axis=1)
        ap[start:stop] = np.sum(np.where(matches, hits / positions, 0.0), axis=1) / n_pos
        first_hit[start:stop] = np.argmax(matches, axis=1)
        last_hit = n_g - 1 - np.argmax(matches[:, ::-1], axis=1)
        inp[start:stop] = n_pos / (last_hit + 1.0)

    out = {f"R{k}": _recall_at(first_hit, k) for k in ks}
    out["mAP"] = float(100.0 * np.mean(ap))
    out["mINP"] = float(100.0 * np.mean(inp))
    return out


# ----------------------------------------------------------------------------- image-caption


def _text_to_image(n_img: int, n_txt: int, captions_per_image, text_to_image, fn: str):
    if text_to_image is None:
        cpi = int(captions_per_image)
        if cpi < 1 or n_txt != n_img * cpi:
            raise ValueError(
                f"{fn}: similarity has {n_img} images and {n_txt} texts, which does not match "
                f"captions_per_image={captions_per_image} (expected {n_img * max(cpi, 0)} texts, "
                "caption j belonging to image j // captions_per_image); pass `text_to_image` for "
                "other layouts."
            )
        return np.arange(n_txt) // cpi
    t2i = _as_ids(text_to_image, n_txt, "text_to_image", fn).astype(np.int64)
    if t2i.size and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(
            f"{fn}: `text_to_image` entries must be image indices in [0, {n_img}), got range "
            f"[{t2i.min()}, {t2i.max()}]."
        )
    return t2i


def _rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of column `target[r]` in each row r of `scores` under a stable descending sort.

    scores [n, m], target [n] -> [n]: #(scores > s_t) + #(scores == s_t at a lower index).
    """
    rows = np.arange(scores.shape[0])
    s_t = scores[rows, target][:, None]
    before = np.arange(scores.shape[1])[None, :] < target[:, None]
    return np.sum((scores > s_t) | ((scores == s_t) & before), axis=1)


def caption_retrieval_metrics(
    similarity_i2t, captions_per_image: int = 5, text_to_image=None
) -> dict:
    """Image <-> caption recall (Flickr30K / COCO protocol, docs/semantics.md, section 'Evaluation').

    Args:
      similarity_i2t: [N_img, N_txt] scores, rows images, cols captions.
      captions_per_image: caption j belongs to image j // captions_per_image (used when
        `text_to_image` is None; then N_txt must equal N_img * captions_per_image).
      text_to_image: optional [N_txt] int, the image index of every caption (general layout).

    Returns:
      {"i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "rsum"}, percent floats.
      i2t rank of an image = best (lowest) rank among its captions; t2i rank of a caption = rank
      of its image; rsum = sum of the six recalls. Ties: lower index first (stable sort).

    Raises:
      ValueError: bad shapes / indices, non-finite scores, or an image without captions.
    """
    fn = "caption_retrieval_metrics"
    sim = _as_float_matrix(similarity_i2t, "similarity_i2t", fn)
    n_img, n_txt = sim.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"{fn}: empty similarity matrix of shape {sim.shape}.")
    owner = _text_to_image(n_img, n_txt, captions_per_image, text_to_image, fn)
    counts = np.bincount(owner, minlength=n_img)
    if np.any(counts == 0):
        bad = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"{fn}: image {bad} has no caption in `text_to_image`.")

    # i2t: the best-ranked caption of image i is its highest-scoring one (lowest index on ties).
    i2t_rank = np.empty(n_img, np.int64)
    for start, stop in _chunks(n_img, n_txt):
        block = sim[start:stop]
        own = owner[None, :] == np.arange(start, stop)[:, None]
        best = np.argmax(np.where(own, block, -np.inf), axis=1)
        i2t_rank[start:stop] = _rank_of(block, best)

    # t2i: rank of the caption's image in its column.
    sim_t = sim.T
    t2i_rank = np.empty(n_txt, np.int64)
    for start, stop in _chunks(n_txt, n_img):
        t2i_rank[start:stop] = _rank_of(sim_t[start:stop], owner[start:stop])

    out = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in (1, 5, 10):
            out[f"{name}_R{k}"] = _recall_at(ranks, k)
    out["rsum"] = float(sum(out.values()))
    return out


def coco_1k_metrics(
    similarity_i2t,
    captions_per_image: int = 5,
    folds: int = 5,
    fold_size: int = 1000,
    text_to_image=None,
) -> dict:
    """MS-COCO 1K protocol: caption metrics on `folds` disjoint blocks of `fold_size` images.

    Fold f holds images [f * fold_size, (f + 1) * fold_size) and their captions (with the default
    layout: captions [f * fold_size * cpi, (f + 1) * fold_size * cpi)). Each metric, rsum
    included, is the mean over folds (rsum is NOT multiplied by the number of folds).

    Args:
      similarity_i2t: [N_img, N_txt] with N_img == folds * fold_size (5000 for COCO 5K test).
      captions_per_image, text_to_image: caption layout, as in `caption_retrieval_metrics`.
      folds, fold_size: number and size (in images) of the folds.

    Returns:
      the keys of `caption_retrieval_metrics`, fold-averaged, percent floats.
    """
    fn = "coco_1k_metrics"
    sim = _as_float_matrix(similarity_i2t, "similarity_i2t", fn)
    n_img, n_txt = sim.shape
    if folds < 1 or fold_size < 1 or n_img != folds * fold_size:
        raise ValueError(
            f"{fn}: similarity has {n_img} images but folds={folds} x fold_size={fold_size} "
            f"= {folds * fold_size} were requested."
        )
    owner = _text_to_image(n_img, n_txt, captions_per_image, text_to_image, fn)
    per_fold = []
    for f in range(folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        txt = np.flatnonzero((owner >= lo) & (owner < hi))
        per_fold.append(
            caption_retrieval_metrics(
                sim[lo:hi][:, txt], captions_per_image, text_to_image=owner[txt] - lo
            )
        )
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}


# ----------------------------------------------------------------------------- NDCG (TERAN)


class RelevanceFileError(ValueError, FileNotFoundError):
    """A relevance file is missing or does not hold a [n_captions, n_images] float32 matrix."""


def relevance_path(folder, name: str, split: str, method: str):
    """TERAN's relevance file name: ``{folder}/{name}-{split}-{method}.npy`` (method rougeL | spice),
    e.g. ``data/f30k/relevances/f30k-test-rougeL.npy``."""
    from pathlib import Path

    return Path(folder) / f"{name}-{split}-{method}.npy"


def load_relevance(path, n_captions: int, n_images: int) -> np.ndarray:
    """Memory-maps one relevance matrix, float32 [n_captions, n_images] (caption-major).

    Entry [q, i] is the relevance of image i (through its captions) to caption q, as TERAN's
    compute_relevance.py writes it: a raw float32 memmap without a header despite the ``.npy``
    name. A real ``.npy`` file (with its header) of that shape is accepted too. Nothing is read
    until it is sliced.

    Raises:
      RelevanceFileError: the file is missing, or its size / shape / dtype does not match.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise RelevanceFileError(
            f"relevance file {path} not found (NDCG needs a float32 [{n_captions} captions, {n_images} images] "
            f"memmap per method, as TERAN's evaluate_utils/compute_relevance.py writes)"
        )
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        rel = np.load(path, mmap_mode="r")
        if rel.shape != (n_captions, n_images) or rel.dtype != np.float32:
            raise RelevanceFileError(
                f"relevance file {path}: expected float32 [{n_captions}, {n_images}] (captions x images), "
                f"got {rel.dtype} {list(rel.shape)}"
            )
        return rel
    size = path.stat().st_size
    if size != 4 * n_captions * n_images:
        raise RelevanceFileError(
            f"relevance file {path}: {size} bytes, expected {4 * n_captions * n_images} "
            f"(raw float32 [{n_captions} captions, {n_images} images])"
        )
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n_captions, n_images))


def load_relevances(folder, name: str, split: str, n_captions: int, n_images: int,
                    methods: Sequence[str] = ("rougeL", "spice")) -> dict:
    """{method: load_relevance(relevance_path(folder, name, split, method), ...)} for each method."""
    return {m: load_relevance(relevance_path(folder, name, split, m), n_captions, n_images) for m in methods}


def _dcg(gains: np.ndarray) -> np.ndarray:
    """[n, k] gains (2^rel - 1, in rank order) -> [n] DCG with discounts log2(rank + 2)."""
    return gains @ (1.0 / np.log2(np.arange(gains.shape[1]) + 2.0))


def _top_k_stable(scores: np.ndarray, k: int) -> np.ndarray:
    """[n, m] -> [n, k] column indices of each row's first k items under a stable descending sort
    (ties: lower index first), without sorting whole rows: the k-th largest value v comes from a
    partition; every item above v is in, and the lowest-index items equal to v fill the rest."""
    n, m = scores.shape
    if k == m:
        return np.argsort(-scores, axis=1, kind="stable")
    v = np.partition(scores, m - k, axis=1)[:, m - k][:, None]
    above = scores > v
    equal = scores == v
    need = k - above.sum(axis=1, keepdims=True)
    chosen = above | (equal & (np.cumsum(equal, axis=1) <= need))
    idx = np.nonzero(chosen)[1].reshape(n, k)  # ascending column order within each row
    picked = np.take_along_axis(scores, idx, axis=1)
    return np.take_along_axis(idx, np.argsort(-picked, axis=1, kind="stable"), axis=1)


def _ndcg_rows(scores: np.ndarray, rel: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of each row: ranking by `scores` [n, m] (stable descending), relevances `rel` [n, m].

    Returns [n] float64; 0 where the ideal DCG is 0."""
    n, m = scores.shape
    k = min(k, m)
    order = _top_k_stable(scores, k)
    rel = rel.astype(np.float64)
    got = np.take_along_axis(rel, order, axis=1)
    ideal = -np.sort(-np.partition(rel, m - k, axis=1)[:, m - k:], axis=1)
    dcg, best = _dcg(np.exp2(got) - 1.0), _dcg(np.exp2(ideal) - 1.0)
    return np.where(best > 0, dcg / np.where(best > 0, best, 1.0), 0.0)


def ndcg_metrics(similarity_i2t, relevances: Mapping[str, np.ndarray], k: int = 25,
                 captions_per_image: int = 5, folds: int = 1) -> dict:
    """NDCG@k of image->text and text->image retrieval with graded relevances (TERAN / TGDT).

    For a query, the retrieved items are ranked by similarity (ties: lower index first); NDCG@k =
    sum over the top k of (2^rel - 1) / log2(rank + 2) (rank 0-based), divided by the same sum
    for the query's ideal ordering, and 0 when that ideal sum is 0.

    - t2i: query = caption q, items = the images of its fold, relevance = row q of the matrix.
      Averaged over all captions.
    - i2t: query = image i, items = the captions of its fold, relevance = column i. Averaged over
      the images whose NDCG is not 0 (TERAN's and TGDT's evaluation.py do exactly this for i2t,
      and average t2i over all captions).

    Args:
      similarity_i2t: [N_img, N_txt] scores (rows images, cols captions), caption j belongs to
        image j // captions_per_image, N_txt == N_img * captions_per_image.
      relevances: {method: [N_txt, N_img]} caption-major matrices (e.g. ``load_relevances``
        memmaps, read a block at a time), usually {"rougeL": ..., "spice": ...}.
      k: cut-off (25 in TERAN and TGDT).
      folds: 1, or the number of disjoint image blocks (COCO 1K: 5); fold f holds images
        [f N_img/folds, (f+1) N_img/folds) and their captions; each metric is the mean over folds
        of the per-fold value (TERAN's 5-fold protocol; the relevance matrix covers the whole split).

    Returns:
      {"i2t_ndcg_<method>", "t2i_ndcg_<method>"} for each method: python floats in [0, 1].
    """
    fn = "ndcg_metrics"
    sim = _as_float_matrix(similarity_i2t, "similarity_i2t", fn)
    n_img, n_txt = sim.shape
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{fn}: k must be a positive int, got {k!r}.")
    if n_img == 0 or n_txt != n_img * captions_per_image:
        raise ValueError(
            f"{fn}: similarity_i2t has shape {sim.shape}; expected [N_img, N_img * {captions_per_image}] "
            f"(captions of image i at columns [{captions_per_image} i, {captions_per_image} (i + 1)))."
        )
    if folds < 1 or n_img % folds:
        raise ValueError(f"{fn}: {n_img} images cannot be split into folds={folds} equal blocks.")
    if not relevances:
        raise ValueError(f"{fn}: no relevance matrix given (expected e.g. {{'rougeL': ..., 'spice': ...}}).")
    for method, rel in relevances.items():
        if tuple(np.shape(rel)) != (n_txt, n_img):
            raise ValueError(
                f"{fn}: relevance {method!r} has shape {tuple(np.shape(rel))}; expected ({n_txt}, {n_img}) "
                f"(captions x images, TERAN's layout)."
            )
    fi, ft = n_img // folds, n_txt // folds
    out: dict = {}
    for method, rel in relevances.items():
        i2t_folds, t2i_folds = [], []
        for f in range(folds):
            i0, t0 = f * fi, f * ft
            block = sim[i0:i0 + fi, t0:t0 + ft]
            t2i = np.concatenate([
                _ndcg_rows(block[:, a:b].T, np.asarray(rel[t0 + a:t0 + b, i0:i0 + fi]), k)
                for a, b in _chunks(ft, fi)
            ])
            i2t = np.concatenate([
                _ndcg_rows(block[a:b], np.asarray(rel[t0:t0 + ft, i0 + a:i0 + b]).T, k)
                for a, b in _chunks(fi, ft)
            ])
            t2i_folds.append(float(np.mean(t2i)))
            nonzero = i2t[i2t != 0]
            i2t_folds.append(float(np.mean(nonzero)) if nonzero.size else 0.0)
        out[f"i2t_ndcg_{method}"] = float(np.mean(i2t_folds))
        out[f"t2i_ndcg_{method}"] = float(np.mean(t2i_folds))
    return out


# ----------------------------------------------------------------------------- printing


def format_metrics_table(metrics: Mapping[str, float], title: str | None = None) -> str:
    """Formats `{name: value}` as an aligned two-row text table (floats with 2 decimals).

    Example:
      >>> print(format_metrics_table({"R1": 73.38, "mAP": 66.1}, title="CUHK-PEDES"))
      CUHK-PEDES
      +-------+-------+
      |   R1  |  mAP  |
      +-------+-------+
      | 73.38 | 66.10 |
      +-------+-------+
    """
    names = [str(k) for k in metrics]
    values = [f"{v:.2f}" if isinstance(v, (float, np.floating)) else str(v)
              for v in metrics.values()]
    widths = [max(len(n), len(v)) + 2 for n, v in zip(names, values)]
    rule = "+" + "+".join("-" * w for w in widths) + "+"
    header = "|" + "|".join(n.center(w) for n, w in zip(names, widths)) + "|"
    row = "|" + "|".join(v.center(w) for v, w in zip(values, widths)) + "|"
    lines = [title] if title else []
    lines += [rule, header, rule, row, rule]
    return "\n".join(lines)
