"""Exhaustive / two-stage / sharded retrieval against a straightforward NumPy per-query version."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from xmr_jax import retrieval
from xmr_jax.similarity import global_similarity, local_similarity


def _norm(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _np_local_pair(img, img_mask, txt, txt_mask, scale):
    cos = _norm(img) @ _norm(txt).T                              # [Li, Lt]
    if not img_mask.any():
        return 0.0
    best = cos[img_mask].max(axis=0)
    return scale * float(best[txt_mask].sum())


def _np_two_stage(qg, qt, qm, gg, gt, gm, k, direction, scale=10.0):
    """Per-query reference: global order, top-k rescored by s_g + s_l, rest in global order."""
    s_g = _norm(qg) @ _norm(gg).T
    rankings = []
    for q in range(qg.shape[0]):
        order = np.argsort(-s_g[q], kind="stable")
        cand, rest = order[:k], order[k:]
        new = []
        for g in cand:
            if direction == "t2i":
                s_l = _np_local_pair(gt[g], gm[g], qt[q], qm[q], scale)
            else:
                s_l = _np_local_pair(qt[q], qm[q], gt[g], gm[g], scale)
            new.append(s_g[q, g] + s_l)
        cand = cand[np.argsort(-np.asarray(new), kind="stable")]
        rankings.append(np.concatenate([cand, rest]))
    return np.stack(rankings), s_g


def _problem(seed, n_q, n_g, direction, d=8):
    rng = np.random.default_rng(seed)
    l_img, l_txt = 6, 5
    lq, lg = (l_txt, l_img) if direction == "t2i" else (l_img, l_txt)
    qg = rng.normal(size=(n_q, d)).astype(np.float32)
    gg = rng.normal(size=(n_g, d)).astype(np.float32)
    qt = rng.normal(size=(n_q, lq, d)).astype(np.float32)
    gt = rng.normal(size=(n_g, lg, d)).astype(np.float32)
    qm = rng.random((n_q, lq)) < 0.7
    gm = rng.random((n_g, lg)) < 0.7
    qm[:, 0] = True
    gm[:, 0] = True
    return qg, qt, qm, gg, gt, gm


def _exhaustive_two_stage(qg, qt, qm, gg, gt, gm, direction):
    """s_g + s_l for all pairs [Nq, Ng]: the ranking two-stage search gives with k >= Ng."""
    return (global_similarity(qg, gg)
            + retrieval.exhaustive_local(qt, qm, gt, gm, direction, local_scale=10.0))


def _ranking(scores):
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


# Shapes shared with the sharded test so the single-device compile is reused (fast tests).
@pytest.mark.parametrize("direction,n_g,k", [("t2i", 29, 6), ("i2t", 21, 5)])
def test_two_stage_matches_numpy_per_query(direction, n_g, k):
    qg, qt, qm, gg, gt, gm = _problem(0, 10, n_g, direction)
    want, s_g = _np_two_stage(qg, qt, qm, gg, gt, gm, k, direction)
    rows, (cidx, cscores) = retrieval.two_stage_scores(
        qg, qt, qm, gg, gt, gm, k=k, direction=direction, query_chunk=3, return_candidates=True)
    assert rows.shape == (10, n_g)
    np.testing.assert_array_equal(_ranking(rows), want)
    np.testing.assert_array_equal(np.asarray(cidx), want[:, :k])
    # rescored scores are s_g + s_l of the candidates, in descending order
    local = retrieval.exhaustive_local(qt, qm, gt, gm, direction)
    expect = np.take_along_axis(s_g + np.asarray(local), want[:, :k], axis=1)
    np.testing.assert_allclose(np.asarray(cscores), expect, rtol=1e-5, atol=1e-5)
    # outside the top k: exact global scores and global order (a miss stays a miss)
    rest = want[:, k:]
    np.testing.assert_allclose(np.take_along_axis(np.asarray(rows), rest, axis=1),
                               np.take_along_axis(s_g, rest, axis=1), atol=1e-6)
    global_order = np.argsort(-s_g, axis=1, kind="stable")
    np.testing.assert_array_equal(rest, global_order[:, k:])


def test_outside_topk_keeps_global_order_even_if_local_is_better():
    # Gallery item 2 is globally last but locally perfect: it must stay last for k=2.
    d = 4
    e = np.eye(d, dtype=np.float32)
    qg = e[:1]
    gg = np.stack([e[0], e[0] + 0.5 * e[1], -e[0]])
    qt = np.stack([e[0], e[1]])[None]                        # text query: two words
    qm = np.ones((1, 2), bool)
    gt = np.stack([np.stack([-e[2], -e[3]]), np.stack([-e[2], -e[3]]), np.stack([e[0], e[1]])])
    gm = np.ones((3, 2), bool)
    rows = retrieval.two_stage_scores(qg, qt, qm, gg, gt, gm, k=2, direction="t2i")
    np.testing.assert_array_equal(_ranking(rows)[0], [0, 1, 2])
    rows_all = retrieval.two_stage_scores(qg, qt, qm, gg, gt, gm, k=3, direction="t2i")
    assert _ranking(rows_all)[0, 0] == 2                     # reranked when in the pool


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_k_at_least_gallery_equals_exhaustive(direction):
    qg, qt, qm, gg, gt, gm = _problem(1, 9, 13, direction)
    exhaustive = _exhaustive_two_stage(qg, qt, qm, gg, gt, gm, direction)
    rows = retrieval.two_stage_scores(qg, qt, qm, gg, gt, gm, k=50, direction=direction)
    np.testing.assert_array_equal(_ranking(rows), _ranking(exhaustive))
    want, _ = _np_two_stage(qg, qt, qm, gg, gt, gm, 13, direction)
    np.testing.assert_array_equal(_ranking(exhaustive), want)


def test_exhaustive_local_direction():
    qg, qt, qm, gg, gt, gm = _problem(2, 4, 5, "t2i")
    t2i = retrieval.exhaustive_local(qt, qm, gt, gm, "t2i", local_scale=3.0)
    np.testing.assert_allclose(np.asarray(t2i), np.asarray(local_similarity(gt, gm, qt, qm, 3.0)).T)
    i2t = retrieval.exhaustive_local(gt, gm, qt, qm, "i2t", local_scale=3.0)
    np.testing.assert_allclose(np.asarray(i2t), np.asarray(t2i).T, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(global_similarity(qg, gg)), _norm(qg) @ _norm(gg).T, atol=1e-6)


@pytest.mark.parametrize("direction,n_g,k", [("t2i", 29, 6)])
def test_sharded_over_8_devices_equals_single_device(direction, n_g, k):
    assert len(jax.devices()) >= 8, "tests/conftest.py should give 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    qg, qt, qm, gg, gt, gm = _problem(3, 10, n_g, direction)
    rows, (ci, cs) = retrieval.two_stage_scores(qg, qt, qm, gg, gt, gm, k=k, direction=direction,
                                                return_candidates=True, query_chunk=3)
    srows, (sci, scs) = retrieval.two_stage_scores(
        qg, qt, qm, gg, gt, gm, k=k, direction=direction, mesh=mesh, return_candidates=True,
        query_chunk=3)
    assert srows.shape == (10, n_g)
    np.testing.assert_allclose(np.asarray(srows), np.asarray(rows), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sci), np.asarray(ci))
    np.testing.assert_allclose(np.asarray(scs), np.asarray(cs), rtol=1e-5, atol=1e-5)
    want, _ = _np_two_stage(qg, qt, qm, gg, gt, gm, k, direction)
    np.testing.assert_array_equal(_ranking(srows), want)
    idx, sc = retrieval.topk_search(qg, gg, k=8, query_tokens=qt, query_mask=qm, gallery_tokens=gt,
                                    gallery_mask=gm, rerank_k=k, direction=direction)
    sidx, ssc = retrieval.topk_search(qg, gg, k=8, query_tokens=qt, query_mask=qm,
                                      gallery_tokens=gt, gallery_mask=gm, rerank_k=k,
                                      direction=direction, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(idx), want[:, :8])
    np.testing.assert_array_equal(np.asarray(sidx), want[:, :8])
    np.testing.assert_allclose(np.asarray(ssc), np.asarray(sc), rtol=1e-5, atol=1e-5)


def test_topk_search_scores_global_and_two_stage():
    qg, qt, qm, gg, gt, gm = _problem(4, 7, 15, "t2i")
    s_g = _norm(qg) @ _norm(gg).T
    idx, sc = retrieval.topk_search(qg, gg, k=4, query_chunk=3)
    np.testing.assert_array_equal(np.asarray(idx), np.argsort(-s_g, axis=1)[:, :4])
    np.testing.assert_allclose(np.asarray(sc), np.sort(s_g, axis=1)[:, ::-1][:, :4], atol=1e-6)

    want, _ = _np_two_stage(qg, qt, qm, gg, gt, gm, 3, "t2i")
    idx, sc = retrieval.topk_search(qg, gg, k=6, query_tokens=qt, query_mask=qm,
                                    gallery_tokens=gt, gallery_mask=gm, rerank_k=3)
    np.testing.assert_array_equal(np.asarray(idx), want[:, :6])
    s_l = np.asarray(retrieval.exhaustive_local(qt, qm, gt, gm, "t2i"))
    natural = np.take_along_axis(s_g, want[:, :6], axis=1)
    natural[:, :3] += np.take_along_axis(s_l, want[:, :3], axis=1)   # reranked: s_g + s_l
    np.testing.assert_allclose(np.asarray(sc), natural, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    qg, qt, qm, gg, gt, gm = _problem(5, 3, 4, "t2i")
    with pytest.raises(ValueError, match="direction"):
        retrieval.two_stage_scores(qg, qt, qm, gg, gt, gm, k=2, direction="x2y")
    with pytest.raises(ValueError, match="k"):
        retrieval.two_stage_scores(qg, qt, qm, gg, gt, gm, k=0)
    with pytest.raises(ValueError, match="gallery_tokens"):
        retrieval.two_stage_scores(qg, qt, qm, gg, gt[:2], gm[:2], k=2)
    with pytest.raises(ValueError, match="k must be"):
        retrieval.topk_search(qg, gg, k=9)


# ----------------------------------------------------------------------------------------------
# Prepared features, compaction, validity masks, the candidate kernels and the sharded paths.

from xmr_jax import parallel, similarity  # noqa: E402


def _padded_problem(seed, n_q, n_g, direction, d=8):
    """_problem with token axes padded by always-masked positions at both ends (compaction)."""
    qg, qt, qm, gg, gt, gm = _problem(seed, n_q, n_g, direction, d)
    pad = lambda t, m: (np.pad(t, ((0, 0), (1, 3), (0, 0)), constant_values=5.0),
                        np.pad(m, ((0, 0), (1, 3))))
    return (qg, *pad(qt, qm), gg, *pad(gt, gm))


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_prepared_normalized_compacted_equals_exhaustive(direction):
    qg, qt, qm, gg, gt, gm = _padded_problem(6, 9, 13, direction)
    want = _exhaustive_two_stage(qg, qt, qm, gg, gt, gm, direction)
    q = retrieval.prepare_features(qg, qt, qm)
    g = retrieval.prepare_features(gg, gt, gm)
    assert q.tokens.shape[1] == qt.shape[1] - 4 and g.tokens.shape[1] == gt.shape[1] - 4
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q.tokens), axis=-1), 1.0, rtol=1e-5)
    rows = retrieval.two_stage_scores(*q, *g, k=50, direction=direction, normalized=True)
    np.testing.assert_array_equal(_ranking(rows), _ranking(want))
    plain = retrieval.two_stage_scores(qg, qt, qm, gg, gt, gm, k=4, direction=direction)
    prepared = retrieval.two_stage_scores(*q, *g, k=4, direction=direction, normalized=True)
    np.testing.assert_allclose(np.asarray(prepared), np.asarray(plain), rtol=1e-5, atol=1e-5)
    want4, _ = _np_two_stage(qg, qt, qm, gg, gt, gm, 4, direction)
    np.testing.assert_array_equal(_ranking(prepared), want4)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gallery_valid_items_are_never_retrieved(direction):
    qg, qt, qm, gg, gt, gm = _problem(7, 6, 11, direction)
    valid = np.ones(11, bool)
    valid[[1, 4, 10]] = False
    rows = np.asarray(retrieval.two_stage_scores(qg, qt, qm, gg, gt, gm, k=5, direction=direction,
                                                 gallery_valid=valid))
    assert np.all(np.isneginf(rows[:, ~valid]))
    want, _ = _np_two_stage(qg, qt, qm, gg[valid], gt[valid], gm[valid], 5, direction)
    np.testing.assert_array_equal(_ranking(rows[:, valid]), want)
    # fewer valid items than k: k is capped, nothing invalid becomes a candidate
    few = np.zeros(11, bool)
    few[[2, 3]] = True
    idx, sc = retrieval.topk_search(qg, gg, k=4, query_tokens=qt, query_mask=qm,
                                    gallery_tokens=gt, gallery_mask=gm, rerank_k=3,
                                    direction=direction, gallery_valid=few)
    assert set(np.asarray(idx)[:, :2].ravel()) <= {2, 3}
    assert np.all(np.isneginf(np.asarray(sc)[:, 2:]))


@pytest.mark.parametrize("rerank_k,k", [(3, 7), (6, 2), (5, 5)])
def test_topk_search_out_k_around_rerank_k(rerank_k, k):
    qg, qt, qm, gg, gt, gm = _problem(8, 5, 12, "t2i")
    want, s_g = _np_two_stage(qg, qt, qm, gg, gt, gm, rerank_k, "t2i")
    idx, sc = retrieval.topk_search(qg, gg, k=k, query_tokens=qt, query_mask=qm,
                                    gallery_tokens=gt, gallery_mask=gm, rerank_k=rerank_k)
    np.testing.assert_array_equal(np.asarray(idx), want[:, :k])
    n = min(k, rerank_k)
    rest = np.take_along_axis(s_g, want[:, n:k], axis=1)
    np.testing.assert_allclose(np.asarray(sc)[:, n:], rest, atol=1e-6)


def _cand_case(seed, n_q=7, n_g=9, k=5, l_img=6, l_txt=5, d=8):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n_g, l_img, d)).astype(np.float32)
    txt = rng.normal(size=(n_q, l_txt, d)).astype(np.float32)
    im = rng.random((n_g, l_img)) < 0.7
    tm = rng.random((n_q, l_txt)) < 0.7
    im[0] = False                               # an image with no valid token
    tm[1] = False                               # a text with no valid word
    cand = rng.integers(0, n_g, size=(n_q, k))
    cand[:, 0] = 3                              # a popular image (several segments)
    return img, im, txt, tm, cand


@pytest.mark.parametrize("rows,per_step,cpu", [(None, None, True), (1, 1, True), (3, 3, True),
                                               (7, 2, False), (5, None, False)])
def test_text_candidates_kernel_equals_gathered(monkeypatch, rows, per_step, cpu):
    monkeypatch.setattr(similarity, "_on_cpu", lambda: cpu)   # the accelerator (batched) path too
    img, im, txt, tm, cand = _cand_case(9)
    tm[2] = [False, True, False, True, True]                 # holes: words packed, not a window
    full = np.asarray(similarity.local_similarity(img, im, txt, tm, 7.0)).T   # [N_txt, N_img]
    want = np.take_along_axis(full, cand, axis=1)
    got = similarity.local_similarity_text_candidates(txt, tm, img, im, cand, 7.0,
                                                      segment_rows=rows,
                                                      segments_per_step=per_step)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[1] == 0) and np.all(np.asarray(got)[cand == 0] == 0)


@pytest.mark.parametrize("per_step,cpu", [(None, True), (3, True), (None, False), (2, False)])
def test_image_candidates_kernel_equals_gathered(monkeypatch, per_step, cpu):
    monkeypatch.setattr(similarity, "_on_cpu", lambda: cpu)
    img, im, txt, tm, cand = _cand_case(10, n_q=9, n_g=7)
    # roles swapped: image queries (the 7 "images" as queries need candidates into 9 texts)
    queries, q_mask = img, im
    cand = np.random.default_rng(1).integers(0, txt.shape[0], size=(img.shape[0], 4))
    full = np.asarray(similarity.local_similarity(queries, q_mask, txt, tm, 7.0))  # [N_img, N_txt]
    want = np.take_along_axis(full, cand, axis=1)
    got = similarity.local_similarity_image_candidates(queries, q_mask, txt, tm, cand, 7.0,
                                                       queries_per_step=per_step)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_sharded_2d_mesh_queries_sharded_equals_single_device(direction):
    mesh = parallel.make_mesh(4, 2)
    axis = ("data", "fsdp")
    qg, qt, qm, gg, gt, gm = _padded_problem(11, 13, 29, direction)
    q = retrieval.prepare_features(qg, qt, qm)
    g = retrieval.prepare_features(gg, gt, gm)
    base, (ci, cs) = retrieval.two_stage_scores(*q, *g, k=6, direction=direction,
                                                normalized=True, return_candidates=True)
    rows, (sci, scs) = retrieval.two_stage_scores(*q, *g, k=6, direction=direction,
                                                  normalized=True, return_candidates=True,
                                                  mesh=mesh, axis=axis, query_chunk=1)
    np.testing.assert_allclose(np.asarray(rows), np.asarray(base), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sci), np.asarray(ci))
    np.testing.assert_allclose(np.asarray(scs), np.asarray(cs), rtol=1e-5, atol=1e-5)
    s_g = retrieval.global_scores(qg, gg, mesh=mesh, axis=axis)
    np.testing.assert_allclose(np.asarray(s_g), _norm(qg) @ _norm(gg).T, atol=1e-6)
    local = retrieval.exhaustive_local(qt, qm, gt, gm, direction, mesh=mesh, axis=axis)
    np.testing.assert_allclose(np.asarray(local),
                               np.asarray(retrieval.exhaustive_local(qt, qm, gt, gm, direction)),
                               rtol=1e-5, atol=1e-5)


def test_sharded_inputs_stay_in_place_and_rows_come_back_sharded():
    mesh = parallel.make_mesh(8, 1)
    axis = ("data", "fsdp")
    qg, qt, qm, gg, gt, gm = _problem(12, 16, 24, "t2i")
    put = lambda x: jax.device_put(x, parallel.batch_sharding(mesh))
    q = retrieval.prepare_features(put(qg), put(qt), put(qm))
    g = retrieval.prepare_features(put(gg), put(gt), put(gm))
    assert q.tokens.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 3)
    assert {s.data.shape[0] for s in q.tokens.addressable_shards} == {2}
    rows = retrieval.two_stage_scores(*q, *g, k=5, normalized=True, mesh=mesh, axis=axis)
    assert {s.data.shape for s in rows.addressable_shards} == {(16, 3)}   # gallery columns
    want, _ = _np_two_stage(qg, qt, qm, gg, gt, gm, 5, "t2i")
    np.testing.assert_array_equal(_ranking(rows), want)
