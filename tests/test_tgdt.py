"""TGDT family: train step, loss wiring, caption evaluation (5K and COCO-1K folds), configs."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tests import train_fixtures
from xmr_jax import evaluate, losses, metrics, optim, parallel, retrieval, similarity, train
from xmr_jax.models import tgdt
from xmr_jax.models.families import get_family

CAPTION_KEYS = {"i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "rsum"}
CONTEXT = train_fixtures.CONTEXT


def tiny_tgdt_config(**overrides):
    """tests/train_fixtures.tiny_config with the tgdt family (cmc, image-id positives)."""
    config = train_fixtures.tiny_config(model_family="tgdt", loss_names="cmc")
    config.tgdt = common.tgdt_defaults("image_id")
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    for key, value in overrides.items():
        config[key] = value
    return config


def duplicate_batch(seed: int = 0, n_images: int = 4, per_image: int = 2) -> dict:
    """n_images images, each appearing `per_image` times with a different caption.

    Returns images [B,16,16,3], text_ids [B,CONTEXT] (SOT, 6 words, EOT), pids / image_ids [B].
    """
    rng = np.random.default_rng(seed)
    b = n_images * per_image
    owner = np.tile(np.arange(n_images), per_image)
    base = rng.standard_normal((n_images, 16, 16, 3)).astype(np.float32)
    ids = np.zeros((b, CONTEXT), np.int32)
    ids[:, 0] = 49406
    words = rng.integers(1, 300, size=(n_images, 3))
    ids[:, 1:4] = words[owner]  # words shared by the captions of one image
    ids[:, 4:7] = rng.integers(300, 400, size=(b, 3))
    ids[:, 7] = 49407
    return {"images": base[owner], "text_ids": ids, "mlm_ids": ids, "mlm_labels": np.zeros_like(ids),
            "pids": owner.astype(np.int32), "image_ids": owner.astype(np.int32)}


def test_train_step_lowers_cmc_loss():
    config = tiny_tgdt_config()
    train.validate_config(config)
    family = get_family("tgdt")
    model = family.build(config)
    params = train.init_params(model, config, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=10)
    state = train.create_train_state(params, tx)
    step = jax.jit(train.make_train_step(model, family.loss_fn(config), tx))
    batches = [duplicate_batch(seed) for seed in range(2)]
    first = [float(step(state, b)[1]["loss"]) for b in batches]
    for i in range(20):
        state, m = step(state, batches[i % 2])
    last = [float(step(state, b)[1]["loss"]) for b in batches]
    assert np.all(np.isfinite(first + last))
    assert np.mean(last) < 0.5 * np.mean(first), (first, last)
    # Below the collapsed value (all similarities equal: 4 hinges of `margin` per row, B=8).
    assert max(last) < 4 * 8 * config.tgdt.margin, last


def _random_outputs(rng, b=6, l_img=5, l_txt=7, d=8):
    ti = rng.standard_normal((b, l_img, d)).astype(np.float32)
    tt = rng.standard_normal((b, l_txt, d)).astype(np.float32)
    mi = np.ones((b, l_img), bool)
    mi[:, 0] = False
    mt = rng.random((b, l_txt)) < 0.7
    mt[:, 0] = True
    return {"image_global": rng.standard_normal((b, d)).astype(np.float32),
            "text_global": rng.standard_normal((b, d)).astype(np.float32),
            "image_tokens": ti, "image_mask": mi, "text_tokens": tt, "text_mask": mt}


@pytest.mark.parametrize("positives", ["image_id", "pid"])
def test_compute_losses_matches_cmc_with_positive_mask(positives):
    rng = np.random.default_rng(1)
    out = _random_outputs(rng)
    batch = {"image_ids": np.array([0, 1, 0, 2, 3, 2]), "pids": np.array([5, 5, 6, 6, 7, 7])}
    config = tiny_tgdt_config()
    config.tgdt.positives = positives
    config.tgdt.local_scale = 7.0
    config.tgdt.margin = 0.3
    config.tgdt.slack = 0.1
    loss, parts = tgdt.compute_losses(out, batch, config)
    ids = batch["image_ids"] if positives == "image_id" else batch["pids"]
    local = similarity.local_similarity(out["image_tokens"], out["image_mask"], out["text_tokens"],
                                        out["text_mask"], scale=7.0)
    expected = losses.cmc_loss(out["image_global"], out["text_global"], local, margin=0.3, slack=0.1,
                               positive_mask=ids[:, None] == ids[None, :])
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(parts["cmc_loss"]), float(expected), rtol=1e-5)
    unmasked = losses.cmc_loss(out["image_global"], out["text_global"], local, margin=0.3, slack=0.1)
    assert abs(float(unmasked) - float(expected)) > 1e-3  # the duplicates do change the loss


def test_sum_negatives_matches_numpy():
    """tgdt.negatives="sum": hinges summed over all non-positive pairs (independent NumPy)."""
    rng = np.random.default_rng(2)
    out = _random_outputs(rng)
    batch = {"image_ids": np.array([0, 1, 0, 2, 3, 2]), "pids": np.zeros(6, np.int64)}
    config = tiny_tgdt_config()
    config.tgdt.negatives = "sum"
    loss, _ = tgdt.compute_losses(out, batch, config)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    v, t = unit(out["image_global"].astype(np.float64)), unit(out["text_global"].astype(np.float64))
    ti, tt = unit(out["image_tokens"].astype(np.float64)), unit(out["text_tokens"].astype(np.float64))
    b = len(v)
    local = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            a = ti[i][out["image_mask"][i]] @ tt[j][out["text_mask"][j]].T
            local[i, j] = 10.0 * a.max(axis=0).sum()
    ids = batch["image_ids"]
    neg = ids[:, None] != ids[None, :]

    def hinge(s):
        d = np.diag(s)
        return (np.maximum(0, 0.2 + s - d[:, None]) * neg).sum() + (np.maximum(0, 0.2 + s - d[None, :]) * neg).sum()

    intra = np.maximum(0, np.abs(t @ t.T - v @ v.T).max(axis=0) - 0.3).sum()
    expected = hinge(v @ t.T) + intra + hinge(local)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    config.tgdt.negatives = "hardest"
    assert abs(float(tgdt.compute_losses(out, batch, config)[0]) - expected) > 1e-2


def _hand_made(n_img=3, cpi=2, d=8, swap_global=False):
    """Image i: global e_i, tokens [CLS, e_i]; its captions: global e_i (or e_{i+1} with
    swap_global), word tokens [e_i, e_i]; gallery rows in reverse image-id order."""
    eye = np.eye(d, dtype=np.float32)
    owner = np.repeat(np.arange(n_img), cpi)
    gal_ids = np.arange(n_img)[::-1]
    gallery = {"global": eye[gal_ids], "tokens": np.stack([np.stack([eye[-1], eye[i]]) for i in gal_ids]),
               "mask": np.tile([[False, True]], (n_img, 1)), "image_ids": gal_ids, "pids": gal_ids}
    g_owner = (owner + 1) % n_img if swap_global else owner
    query = {"global": eye[g_owner], "tokens": np.stack([np.stack([eye[i], eye[i], eye[-2]]) for i in owner]),
             "mask": np.tile([[True, True, False]], (len(owner), 1)), "image_ids": owner, "pids": owner}
    return query, gallery


def test_caption_retrieval_keys_and_two_stage_rerank():
    query, gallery = _hand_made()
    result = evaluate.caption_retrieval(query, gallery, k_t2i=3, k_i2t=6)
    assert set(result) == {"global", "local", "two_stage"}
    for kind in result:
        assert set(result[kind]) == CAPTION_KEYS
        assert result[kind]["rsum"] == pytest.approx(600.0)
    # Globals point at the wrong image, tokens at the right one: local and two-stage (which
    # reranks the global top-k by s_g + s_l, local scale 10) recover it, global does not.
    query, gallery = _hand_made(swap_global=True)
    result = evaluate.caption_retrieval(query, gallery, k_t2i=3, k_i2t=6)
    assert result["global"]["t2i_R1"] == 0.0 and result["global"]["i2t_R1"] == 0.0
    assert result["local"]["t2i_R1"] == 100.0 and result["two_stage"]["t2i_R1"] == 100.0
    assert result["two_stage"]["i2t_R1"] == 100.0
    # k=1: no reranking possible, two-stage equals global.
    result = evaluate.caption_retrieval(query, gallery, k_t2i=1, k_i2t=1)
    assert result["two_stage"]["t2i_R1"] == 0.0


def _random_split(rng, n_img=12, cpi=2, d=8, l_img=4, l_txt=5):
    ids = rng.permutation(n_img) + 100  # shuffled gallery order, ids not starting at 0
    owner = np.repeat(np.arange(100, 100 + n_img), cpi)
    perm = rng.permutation(len(owner))
    gallery = {"global": rng.standard_normal((n_img, d)).astype(np.float32),
               "tokens": rng.standard_normal((n_img, l_img, d)).astype(np.float32),
               "mask": np.tile([False] + [True] * (l_img - 1), (n_img, 1)), "image_ids": ids, "pids": ids}
    img_g = {int(i): gallery["global"][n] for n, i in enumerate(ids)}
    query = {"global": np.stack([img_g[int(i)] for i in owner[perm]])
                       + 1.2 * rng.standard_normal((len(owner), d)).astype(np.float32),
             "tokens": rng.standard_normal((len(owner), l_txt, d)).astype(np.float32),
             "mask": rng.random((len(owner), l_txt)) < 0.8, "image_ids": owner[perm], "pids": owner[perm]}
    query["mask"][:, 1] = True
    return query, gallery


def test_coco_1k_folds_equal_per_fold_computation():
    rng = np.random.default_rng(3)
    query, gallery = _random_split(rng)
    folds, size, k_t2i, k_i2t = 3, 4, 2, 3
    result = evaluate.coco_1k_retrieval(query, gallery, folds, size, k_t2i=k_t2i, k_i2t=k_i2t, local_scale=10.0)

    # Independent: global / local via metrics.coco_1k_metrics on the full matrices in image-id order.
    order = np.argsort(gallery["image_ids"])
    g_ids = gallery["image_ids"][order]
    t2i = np.searchsorted(g_ids, query["image_ids"])
    s_g = np.asarray(similarity.global_similarity(gallery["global"][order], query["global"]))
    s_l = np.asarray(similarity.local_similarity(gallery["tokens"][order], gallery["mask"][order],
                                                 query["tokens"], query["mask"], scale=10.0))
    for kind, sim in (("global", s_g), ("local", s_l)):
        expected = metrics.coco_1k_metrics(sim, folds=folds, fold_size=size, text_to_image=t2i)
        for key in CAPTION_KEYS:
            assert result[kind][key] == pytest.approx(expected[key], abs=1e-6), (kind, key)

    # Two-stage per fold, candidates from the fold only.
    per_fold = []
    for f in range(folds):
        rows = order[f * size:(f + 1) * size]
        txt = np.flatnonzero((t2i >= f * size) & (t2i < (f + 1) * size))
        args_i = (gallery["global"][rows], gallery["tokens"][rows], gallery["mask"][rows])
        args_t = (query["global"][txt], query["tokens"][txt], query["mask"][txt])
        i2t = retrieval.two_stage_scores(*args_i, *args_t, k=k_i2t, direction="i2t")
        t2i_scores = retrieval.two_stage_scores(*args_t, *args_i, k=k_t2i, direction="t2i")
        owner = t2i[txt] - f * size
        a = metrics.caption_retrieval_metrics(np.asarray(i2t), text_to_image=owner)
        b = metrics.caption_retrieval_metrics(np.asarray(t2i_scores).T, text_to_image=owner)
        per_fold.append([a["i2t_R1"], a["i2t_R5"], b["t2i_R1"], b["t2i_R5"]])
    expected = np.mean(per_fold, axis=0)
    got = [result["two_stage"][k] for k in ("i2t_R1", "i2t_R5", "t2i_R1", "t2i_R5")]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert result["two_stage"]["rsum"] == pytest.approx(
        sum(v for k, v in result["two_stage"].items() if k != "rsum"))
    assert result["global"]["rsum"] < 600.0  # the case is not trivially perfect

    with pytest.raises(ValueError, match="config.tgdt.coco_1k_folds"):
        evaluate.coco_1k_retrieval(query, gallery, 5, size)


def test_evaluator_reports_5k_and_1k():
    config = tiny_tgdt_config(eval_batch_size=8)
    config.tgdt.coco_1k_folds = 2
    config.tgdt.coco_1k_fold_size = 6
    model = get_family("tgdt").build(config)
    params = train.init_params(model, config, jax.random.PRNGKey(0))
    mesh = parallel.make_mesh(-1, 1)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((12, 16, 16, 3)).astype(np.float32)
    texts = duplicate_batch(0, n_images=12, per_image=2)["text_ids"]
    owner = np.tile(np.arange(12), 2)

    def batches(n, make):
        for lo in range(0, n, 8):
            rows = np.arange(lo, lo + 8)
            valid = rows < n
            yield {**make(np.minimum(rows, n - 1)), "valid": valid}

    gallery_fn = lambda: batches(12, lambda r: {"images": images[r], "pids": r.astype(np.int32),
                                                "image_ids": r.astype(np.int32)})
    query_fn = lambda: batches(24, lambda r: {"text_ids": texts[r], "pids": owner[r].astype(np.int32),
                                              "image_ids": owner[r].astype(np.int32)})
    result = evaluate.Evaluator.for_config(model, mesh, gallery_fn, query_fn, config).run(params)
    expected_keys = {"global", "local", "two_stage", "coco_1k/global", "coco_1k/local", "coco_1k/two_stage"}
    assert expected_keys <= set(result)
    assert (result["num_queries"], result["num_gallery"]) == (24, 12)
    for key in expected_keys:
        assert set(result[key]) == CAPTION_KEYS
    flat = evaluate.flatten_metrics(result)
    assert "coco_1k/two_stage/rsum" in flat


def test_bad_tgdt_config_names_the_field():
    config = tiny_tgdt_config(loss_names="sdm")
    with pytest.raises(ValueError, match="config.loss_names"):
        train.validate_config(config)
    with pytest.raises(ValueError, match="config.loss_names"):
        tgdt.build_tgdt(config)
    config = tiny_tgdt_config()
    config.tgdt.positives = "foo"
    with pytest.raises(ValueError, match="config.tgdt.positives"):
        get_family("tgdt").build(config)
    config = tiny_tgdt_config()
    config.tgdt.negatives = "max"
    with pytest.raises(ValueError, match="config.tgdt.negatives"):
        tgdt.build_tgdt(config)
    config = tiny_tgdt_config()
    config.tgdt.k_t2i = 0
    with pytest.raises(ValueError, match="config.tgdt.k_t2i"):
        tgdt.build_tgdt(config)


@pytest.mark.parametrize("name", ["demo", "flickr30k", "coco"])
def test_tgdt_configs_load_and_validate(name):
    config = importlib.import_module(f"configs.tgdt.{name}").get_config()
    assert config.model_family == "tgdt" and config.loss_names == "cmc"
    tgdt.validate_tgdt_config(config)
    if name == "demo":
        train.validate_config(config)
        assert config.data.config_name == "five_captions" and config.tgdt.positives == "image_id"
        assert (config.tgdt.k_t2i, config.tgdt.k_i2t, config.tgdt.negatives) == (100, 50, "sum")
        return
    with pytest.raises(FileNotFoundError, match="config.model.init_checkpoint"):
        train.validate_config(config)
    config.model.init_checkpoint = ""
    train.validate_config(config)
    assert tuple(config.data.image_size) == (224, 224) and not config.data.augment
    assert config.precision == "bfloat16" and config.tgdt.negatives == "hardest"
    o = config.optim
    assert (o.lr, o.weight_decay, o.grad_clip, o.schedule, o.decay_epochs, o.decay_rate, o.num_epochs) == (
        1e-5, 0.0, 2.0, "step_decay", 20, 0.1, 60)
    if name == "flickr30k":
        assert (config.batch_size, o.warmup_steps, config.tgdt.coco_1k_folds) == (32, 1000, 0)
    else:
        assert (config.batch_size, o.warmup_steps, config.tgdt.coco_1k_folds) == (40, 0, 5)
