"""NDCG@k with TERAN's relevance files (xmr_jax.metrics.ndcg_metrics / load_relevance) against a
brute-force per-query NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xmr_jax import metrics


def _ndcg_one(scores, rel, k):
    """One query, loops only: rank items by score (ties: lower index first), DCG of the top k over
    the DCG of the ideal order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]
    dcg = sum((2.0 ** rel[j] - 1) / math.log2(r + 2) for r, j in enumerate(order))
    ideal = sorted(rel, reverse=True)[:k]
    best = sum((2.0 ** v - 1) / math.log2(r + 2) for r, v in enumerate(ideal))
    return 0.0 if best == 0 else dcg / best


def _reference(sim, rel, k, cpi, folds):
    n_img, n_txt = sim.shape
    fi, ft = n_img // folds, n_txt // folds
    i2t_f, t2i_f = [], []
    for f in range(folds):
        imgs, caps = range(f * fi, (f + 1) * fi), range(f * ft, (f + 1) * ft)
        i2t = [_ndcg_one([sim[i, c] for c in caps], [rel[c, i] for c in caps], k) for i in imgs]
        t2i = [_ndcg_one([sim[i, c] for i in imgs], [rel[c, i] for i in imgs], k) for c in caps]
        nonzero = [v for v in i2t if v != 0]
        i2t_f.append(sum(nonzero) / len(nonzero))
        t2i_f.append(sum(t2i) / len(t2i))
    return sum(i2t_f) / folds, sum(t2i_f) / folds


def _data(n_img, cpi=5, seed=0):
    rng = np.random.default_rng(seed)
    sim = rng.normal(size=(n_img, n_img * cpi)).astype(np.float32)
    rel = rng.random((n_img * cpi, n_img)).astype(np.float32)
    rel[rel < 0.3] = 0.0
    rel[:, 3] = 0.0            # an image with no relevant caption -> i2t NDCG 0, left out of the mean
    rel[7] = 0.0               # a caption with no relevant image -> t2i NDCG 0, kept in the mean
    for i in range(n_img):     # the own image is the most relevant, as with ROUGE-L / SPICE
        rel[i * cpi:(i + 1) * cpi, i] = np.maximum(rel[i * cpi:(i + 1) * cpi, i], 0.9)
    rel[:, 3] = 0.0
    return sim, rel


@pytest.mark.parametrize("n_img,k,folds", [(12, 25, 1), (12, 4, 1), (30, 25, 5), (30, 3, 3)])
def test_matches_bruteforce(n_img, k, folds, monkeypatch):
    sim, rel = _data(n_img, seed=n_img + k)
    sim[2, 5] = sim[2, 6]  # a tie: lower index first in both
    sim[4, 10] = sim[6, 10]
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 64)  # several chunks per fold
    out = metrics.ndcg_metrics(sim, {"rougeL": rel, "spice": rel ** 2}, k=k, folds=folds)
    for name, r in (("rougeL", rel), ("spice", rel ** 2)):
        i2t, t2i = _reference(sim.astype(np.float64), r.astype(np.float64), k, 5, folds)
        assert out[f"i2t_ndcg_{name}"] == pytest.approx(i2t, abs=1e-9)
        assert out[f"t2i_ndcg_{name}"] == pytest.approx(t2i, abs=1e-9)
    assert set(out) == {"i2t_ndcg_rougeL", "t2i_ndcg_rougeL", "i2t_ndcg_spice", "t2i_ndcg_spice"}


def test_many_ties_at_the_cut(monkeypatch):
    """Scores from 3 values only: the top-k boundary falls inside a tie in most rows."""
    sim, rel = _data(20, seed=11)
    sim = np.round(np.random.default_rng(1).random(sim.shape) * 2).astype(np.float32)
    for k in (1, 4, 7, 25, 100):
        out = metrics.ndcg_metrics(sim, {"r": rel}, k=k)
        i2t, t2i = _reference(sim.astype(np.float64), rel.astype(np.float64), k, 5, 1)
        assert out["i2t_ndcg_r"] == pytest.approx(i2t, abs=1e-9), k
        assert out["t2i_ndcg_r"] == pytest.approx(t2i, abs=1e-9), k
    order = metrics._top_k_stable(sim, 9)
    np.testing.assert_array_equal(order, np.argsort(-sim, axis=1, kind="stable")[:, :9])


def test_ideal_ranking_scores_one_and_worse_is_lower():
    n_img = 6
    _, rel = _data(n_img, seed=3)
    rel[:, 3] = np.linspace(0.1, 0.6, 30)
    perfect = rel.T.copy()  # scoring by relevance itself gives the ideal order in both directions
    out = metrics.ndcg_metrics(perfect, {"r": rel}, k=25)
    assert out["i2t_ndcg_r"] == pytest.approx(1.0) and out["t2i_ndcg_r"] == pytest.approx(1.0)
    worst = metrics.ndcg_metrics(-perfect, {"r": rel}, k=3)
    assert worst["i2t_ndcg_r"] < 0.6 and worst["t2i_ndcg_r"] < 0.6


def test_teran_memmap_files(tmp_path):
    n_img = 10
    sim, rel = _data(n_img, seed=5)
    folder = tmp_path / "f30k" / "relevances"
    folder.mkdir(parents=True)
    # TERAN's compute_relevance.py: np.memmap(..., mode='w+', shape=(n_captions, n_images)), no header
    mm = np.memmap(metrics.relevance_path(folder, "f30k", "test", "rougeL"), np.float32, "w+", shape=rel.shape)
    mm[:] = rel
    mm.flush()
    del mm
    np.save(metrics.relevance_path(folder, "f30k", "test", "spice"), rel ** 2)  # a real .npy works too
    loaded = metrics.load_relevances(folder, "f30k", "test", 5 * n_img, n_img)
    assert isinstance(loaded["rougeL"], np.memmap) and loaded["rougeL"].shape == (50, 10)
    np.testing.assert_array_equal(loaded["spice"], rel ** 2)
    out = metrics.ndcg_metrics(sim, loaded)
    i2t, t2i = _reference(sim.astype(np.float64), rel.astype(np.float64), 25, 5, 1)
    assert out["i2t_ndcg_rougeL"] == pytest.approx(i2t, abs=1e-9)
    assert out["t2i_ndcg_rougeL"] == pytest.approx(t2i, abs=1e-9)


def test_errors(tmp_path):
    missing = metrics.relevance_path(tmp_path, "coco", "test", "spice")
    with pytest.raises(RelevanceError := metrics.RelevanceFileError, match=r"coco-test-spice.npy not found"):
        metrics.load_relevances(tmp_path, "coco", "test", 50, 10, methods=("spice",))
    assert issubclass(RelevanceError, FileNotFoundError)
    np.zeros((49, 10), np.float32).tofile(missing)
    with pytest.raises(metrics.RelevanceFileError, match=r"1960 bytes, expected 2000"):
        metrics.load_relevance(missing, 50, 10)
    np.save(tmp_path / "x.npy", np.zeros((10, 50), np.float32))
    with pytest.raises(metrics.RelevanceFileError, match=r"expected float32 \[50, 10\].*got float32 \[10, 50\]"):
        metrics.load_relevance(tmp_path / "x.npy", 50, 10)
    sim, rel = _data(10)
    with pytest.raises(ValueError, match=r"relevance 'r' has shape \(10, 50\); expected \(50, 10\)"):
        metrics.ndcg_metrics(sim, {"r": rel.T})
    with pytest.raises(ValueError, match="folds=3"):
        metrics.ndcg_metrics(sim, {"r": rel}, folds=3)
    with pytest.raises(ValueError, match=r"expected \[N_img, N_img \* 5\]"):
        metrics.ndcg_metrics(sim[:, :40], {"r": rel[:40]})
