"""Retrieval metrics: hand-checked cases, tie rule, and brute-force loop references (1e-6)."""

import jax.numpy as jnp
import numpy as np
import pytest

from xmr_jax.metrics import (
    caption_retrieval_metrics,
    coco_1k_metrics,
    format_metrics_table,
    person_retrieval_metrics,
)

CAPTION_KEYS = ["i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "rsum"]


# ----------------------------------------------------------------------------- references


def _ranked(scores):
    """Indices by descending score, ties by ascending index (python sort, explicit key)."""
    return sorted(range(len(scores)), key=lambda g: (-float(scores[g]), g))


def _person_ref(sim, q_pids, g_pids, ks=(1, 5, 10)):
    hits_at = {k: 0 for k in ks}
    aps, inps = [], []
    for q in range(sim.shape[0]):
        order = _ranked(sim[q])
        matches = [g_pids[g] == q_pids[q] for g in order]
        n_pos = sum(matches)
        for k in ks:
            hits_at[k] += any(matches[:k])
        found, ap, last = 0, 0.0, None
        for r, m in enumerate(matches, start=1):
            if m:
                found += 1
                ap += found / r
                last = r
        aps.append(ap / n_pos)
        inps.append(n_pos / last)
    out = {f"R{k}": 100.0 * hits_at[k] / sim.shape[0] for k in ks}
    out["mAP"] = 100.0 * np.mean(aps)
    out["mINP"] = 100.0 * np.mean(inps)
    return out


def _caption_ref(sim, text_to_image):
    n_img, n_txt = sim.shape
    i2t, t2i = [], []
    for i in range(n_img):
        order = _ranked(sim[i])
        i2t.append(min(order.index(j) for j in range(n_txt) if text_to_image[j] == i))
    for j in range(n_txt):
        t2i.append(_ranked(sim[:, j]).index(text_to_image[j]))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_R{k}"] = 100.0 * np.mean(np.array(ranks) < k)
    out["rsum"] = sum(out.values())
    return out


def _assert_metrics(got, expected, tol=1e-6):
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert isinstance(got[key], float), key
        np.testing.assert_allclose(got[key], value, rtol=tol, atol=tol, err_msg=key)


# ----------------------------------------------------------------------------- person retrieval


def test_person_hand_case():
    gallery_pids = np.array([1, 2, 1, 3])
    query_pids = np.array([1, 2, 3])
    sim = np.array([
        [0.9, 0.8, 0.7, 0.1],  # order g0 g1 g2 g3 -> matches 1 0 1 0: AP (1 + 2/3)/2, INP 2/3
        [0.5, 0.1, 0.6, 0.7],  # order g3 g2 g0 g1 -> match at rank 4: AP 1/4, INP 1/4
        [0.2, 0.9, 0.3, 0.8],  # order g1 g3 g2 g0 -> match at rank 2: AP 1/2, INP 1/2
    ], np.float32)
    got = person_retrieval_metrics(sim, query_pids, gallery_pids)
    _assert_metrics(got, {"R1": 100 / 3, "R5": 100.0, "R10": 100.0,
                          "mAP": 100 * 19 / 36, "mINP": 100 * 17 / 36})
    got2 = person_retrieval_metrics(sim, query_pids, gallery_pids, ks=(1, 2, 3))
    _assert_metrics(got2, {"R1": 100 / 3, "R2": 200 / 3, "R3": 200 / 3,
                           "mAP": 100 * 19 / 36, "mINP": 100 * 17 / 36})


def test_person_ties_rank_lower_gallery_index_first():
    sim = np.full((2, 3), 0.5, np.float32)
    # query 0 (pid 1): gallery pids 2 1 1 -> matches 0 1 1: R1 miss, AP (1/2 + 2/3)/2, INP 2/3
    # query 1 (pid 2): gallery item 0 has pid 2 -> rank 1: AP 1, INP 1
    got = person_retrieval_metrics(sim, [1, 2], [2, 1, 1], ks=(1, 2))
    _assert_metrics(got, {"R1": 50.0, "R2": 100.0, "mAP": 100 * (7 / 12 + 1) / 2,
                          "mINP": 100 * (2 / 3 + 1) / 2})
    # +0.0 and -0.0 are a tie as well.
    zeros = np.array([[0.0, -0.0]], np.float32)
    assert person_retrieval_metrics(zeros, [1], [2, 1], ks=(1,))["R1"] == 0.0
    assert person_retrieval_metrics(-zeros, [1], [1, 2], ks=(1,))["R1"] == 100.0


@pytest.mark.parametrize("seed", [0, 1])
def test_person_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_q, n_g, n_ids = 37, 53, 9
    gallery_pids = rng.integers(0, n_ids, n_g)
    gallery_pids[:n_ids] = np.arange(n_ids)  # every pid has a gallery item
    query_pids = rng.integers(0, n_ids, n_q)
    sim = np.round(rng.uniform(-1, 1, (n_q, n_g)), 1).astype(np.float32)  # many ties
    got = person_retrieval_metrics(sim, query_pids, gallery_pids, ks=(1, 5, 10))
    _assert_metrics(got, _person_ref(sim, query_pids, gallery_pids))


def test_person_chunked_path_and_jax_bf16_input(monkeypatch):
    import xmr_jax.metrics as metrics

    rng = np.random.default_rng(2)
    gallery_pids = np.repeat(np.arange(10), 3)
    query_pids = rng.integers(0, 10, 25)
    sim = rng.standard_normal((25, 30)).astype(np.float32)
    expected = _person_ref(sim, query_pids, gallery_pids)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 64)  # forces 13 chunks of 2 queries
    _assert_metrics(person_retrieval_metrics(sim, query_pids, gallery_pids), expected)
    bf = jnp.asarray(sim, jnp.bfloat16)
    got = person_retrieval_metrics(bf, query_pids, gallery_pids)
    _assert_metrics(got, _person_ref(np.asarray(bf.astype(jnp.float32)), query_pids,
                                     gallery_pids))


def test_person_errors():
    sim = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="query 1 .*no gallery item"):
        person_retrieval_metrics(sim, [1, 5], [1, 2, 3])
    with pytest.raises(ValueError, match="gallery_pids"):
        person_retrieval_metrics(sim, [1, 2], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        person_retrieval_metrics(np.full((2, 3), np.nan), [1, 2], [1, 2, 3])


# ----------------------------------------------------------------------------- caption retrieval


def test_caption_hand_case_with_last_ranked_match():
    n = 12  # one caption per image
    sim = np.eye(n, dtype=np.float32)
    sim[0, 0] = -1.0  # image 0's caption is last in row 0; image 0 is last in column 0
    sim[3, 7] = 2.0   # row 3: caption 7 beats caption 3 (rank 1); column 7: image 3 beats 7
    got = caption_retrieval_metrics(sim, captions_per_image=1)
    r1, r5 = 100 * 10 / 12, 100 * 11 / 12
    _assert_metrics(got, {"i2t_R1": r1, "i2t_R5": r5, "i2t_R10": r5,
                          "t2i_R1": r1, "t2i_R5": r5, "t2i_R10": r5,
                          "rsum": 2 * (r1 + r5 + r5)})


def test_caption_best_caption_rank_and_ties():
    # 2 images x 2 captions (captions 0,1 -> image 0; 2,3 -> image 1).
    sim = np.array([[0.1, 0.2, 0.9, 0.8],    # image 0: order t2 t3 t1 t0 -> best own rank 2
                    [0.5, 0.4, 0.3, 0.6]],   # image 1: order t3 t0 t1 t2 -> best own rank 0
                   np.float32)
    # t2i: every column ranks the other image first -> all ranks 1.
    got = caption_retrieval_metrics(sim, captions_per_image=2)
    _assert_metrics(got, {"i2t_R1": 50.0, "i2t_R5": 100.0, "i2t_R10": 100.0,
                          "t2i_R1": 0.0, "t2i_R5": 100.0, "t2i_R10": 100.0, "rsum": 450.0})
    ties = caption_retrieval_metrics(np.full((2, 2), 0.5, np.float32), captions_per_image=1)
    assert ties["i2t_R1"] == 50.0 and ties["t2i_R1"] == 50.0  # the lower index wins ties


def test_caption_matches_brute_force_and_explicit_mapping():
    rng = np.random.default_rng(3)
    sim = np.round(rng.uniform(-1, 1, (14, 70)), 1).astype(np.float32)
    t2i = np.arange(70) // 5
    got = caption_retrieval_metrics(sim, captions_per_image=5)
    _assert_metrics(got, _caption_ref(sim, t2i))
    _assert_metrics(caption_retrieval_metrics(sim, text_to_image=t2i), got)
    # general layout: uneven caption counts in shuffled order
    mapping = rng.permutation(np.concatenate([np.arange(14), rng.integers(0, 14, 56)]))
    _assert_metrics(caption_retrieval_metrics(sim, text_to_image=mapping),
                    _caption_ref(sim, mapping))


def test_caption_errors():
    with pytest.raises(ValueError, match="captions_per_image"):
        caption_retrieval_metrics(np.zeros((3, 10), np.float32), captions_per_image=5)
    with pytest.raises(ValueError, match="image 2 has no caption"):
        caption_retrieval_metrics(np.zeros((3, 4), np.float32), text_to_image=[0, 1, 1, 0])
    with pytest.raises(ValueError, match="text_to_image"):
        caption_retrieval_metrics(np.zeros((3, 4), np.float32), text_to_image=[0, 1, 2, 3])


# ----------------------------------------------------------------------------- COCO 1K


def test_coco_1k_fold_average():
    rng = np.random.default_rng(4)
    folds, fold_size, cpi = 3, 4, 2
    n_img = folds * fold_size
    sim = np.round(rng.uniform(-1, 1, (n_img, n_img * cpi)), 1).astype(np.float32)
    got = coco_1k_metrics(sim, captions_per_image=cpi, folds=folds, fold_size=fold_size)
    per_fold = []
    for f in range(folds):
        block = sim[f * fold_size:(f + 1) * fold_size, f * fold_size * cpi:(f + 1) * fold_size * cpi]
        per_fold.append(_caption_ref(block, np.arange(fold_size * cpi) // cpi))
    expected = {k: float(np.mean([m[k] for m in per_fold])) for k in CAPTION_KEYS}
    _assert_metrics(got, expected)
    np.testing.assert_allclose(got["rsum"], sum(got[k] for k in CAPTION_KEYS[:6]), rtol=1e-9)
    # Similarities across folds are never looked at.
    noisy = sim.copy()
    for f in range(folds):
        rows = slice(f * fold_size, (f + 1) * fold_size)
        mask = np.ones(n_img * cpi, bool)
        mask[f * fold_size * cpi:(f + 1) * fold_size * cpi] = False
        noisy[rows, mask] = 10.0
    _assert_metrics(coco_1k_metrics(noisy, cpi, folds=folds, fold_size=fold_size), got)
    # The fold split differs from scoring the whole matrix at once.
    assert caption_retrieval_metrics(sim, cpi)["rsum"] != pytest.approx(got["rsum"])
    with pytest.raises(ValueError, match="fold_size"):
        coco_1k_metrics(sim, cpi, folds=5, fold_size=1000)


# ----------------------------------------------------------------------------- table


def test_format_metrics_table():
    text = format_metrics_table({"R1": 73.384, "mAP": 66.1, "note": "ok"}, title="CUHK-PEDES")
    lines = text.splitlines()
    assert lines[0] == "CUHK-PEDES"
    assert len({len(line) for line in lines[1:]}) == 1  # aligned
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["R1", "mAP", "note"]
    assert "73.38" in lines[4] and "66.10" in lines[4] and "ok" in lines[4]
    assert not format_metrics_table({"R1": 1.0}).startswith("\n")
