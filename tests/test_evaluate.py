"""Evaluation on the mesh: features stay on device and sharded, scores equal the host path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmr_jax import evaluate, metrics, parallel, similarity

N_IMG, CPI, L_IMG, L_TXT, D = 12, 2, 5, 9, 8
BATCH = 16                                  # does not divide 12 / 24: padded last batches


def _features(seed):
    """Image and caption features; captions: SOT, 2-5 words, then padding (compaction)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(N_IMG) + 100
    img = {"global": rng.standard_normal((N_IMG, D)).astype(np.float32),
           "tokens": rng.standard_normal((N_IMG, L_IMG, D)).astype(np.float32),
           "mask": np.tile([False] + [True] * (L_IMG - 1), (N_IMG, 1)), "ids": ids}
    owner = np.repeat(ids, CPI)[rng.permutation(N_IMG * CPI)]
    img_g = dict(zip(ids.tolist(), img["global"]))
    n_txt = len(owner)
    words = rng.integers(2, 6, size=n_txt)
    txt = {"global": np.stack([img_g[int(i)] for i in owner])
                     + 1.0 * rng.standard_normal((n_txt, D)).astype(np.float32),
           "tokens": rng.standard_normal((n_txt, L_TXT, D)).astype(np.float32),
           "mask": (np.arange(L_TXT)[None] >= 1) & (np.arange(L_TXT)[None] <= words[:, None]),
           "ids": owner}
    return img, txt


def _batches(feats, n_rows):
    def gen():
        for lo in range(0, n_rows, BATCH):
            rows = np.arange(lo, lo + BATCH)
            valid = rows < n_rows
            rows = np.minimum(rows, n_rows - 1)
            yield {"x": rows.astype(np.int32), "pids": feats["ids"][rows].astype(np.int32),
                   "image_ids": feats["ids"][rows].astype(np.int32), "valid": valid}
    return gen


def _encoder(feats, mesh, dtype=jnp.float32):
    """encode_fn(params, row ids) -> normalized (global, tokens, mask), like Evaluator's."""
    table = {k: jnp.asarray(feats[k]) for k in ("global", "tokens", "mask")}

    def encode(p, rows):
        return (similarity.l2_normalize(p["global"][rows]),
                similarity.normalize_tokens(p["tokens"][rows], dtype), p["mask"][rows])

    return jax.jit(encode, out_shardings=parallel.batch_sharding(mesh)), table


def _encode(feats, mesh, dtype=jnp.float32):
    fn, table = _encoder(feats, mesh, dtype)
    return evaluate.encode_split_on_device(fn, table, _batches(feats, len(feats["ids"]))(), "x",
                                           mesh, keep_tokens=True)


def _old_host_path(img, txt, k_t2i, k_i2t, scale=10.0):
    """Today's host scoring, independently: numpy features of the valid rows in data order,
    global / local similarity and a per-query NumPy two-stage ranking."""
    def norm(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    s_g = norm(img["global"]) @ norm(txt["global"]).T                     # [img, txt]
    s_l = np.asarray(similarity.local_similarity(img["tokens"], img["mask"], txt["tokens"],
                                                 txt["mask"], scale=scale), np.float64)

    def two_stage(s_g_q, s_l_q, k):                       # rows = queries
        out = np.empty_like(s_g_q)
        for q in range(s_g_q.shape[0]):
            order = np.argsort(-s_g_q[q], kind="stable")
            cand = order[:k]
            new = s_g_q[q, cand] + s_l_q[q, cand]
            ranked = np.concatenate([cand[np.argsort(-new, kind="stable")], order[k:]])
            out[q, ranked] = -np.arange(len(ranked))       # descending order = the ranking
        return out

    two_i2t = two_stage(s_g, s_l, k_i2t)
    two_t2i = two_stage(s_g.T, s_l.T, k_t2i).T
    index_of = {int(i): n for n, i in enumerate(img["ids"])}
    text_to_image = np.array([index_of[int(i)] for i in txt["ids"]])

    def report(a, b):
        i2t = metrics.caption_retrieval_metrics(a, text_to_image=text_to_image)
        t2i = metrics.caption_retrieval_metrics(b, text_to_image=text_to_image)
        merged = {k: v for k, v in i2t.items() if k.startswith("i2t")}
        merged.update({k: v for k, v in t2i.items() if k.startswith("t2i")})
        merged["rsum"] = sum(v for k, v in merged.items() if k != "rsum")
        return merged

    return {"global": report(s_g, s_g), "local": report(s_l, s_l),
            "two_stage": report(two_i2t, two_t2i)}


def _assert_same(a, b):
    assert set(a) == set(b)
    for kind in a:
        for key in a[kind]:
            assert a[kind][key] == pytest.approx(b[kind][key], abs=1e-9), (kind, key)


def test_features_stay_sharded_on_device():
    mesh = parallel.make_mesh(8, 1)
    img, txt = _features(0)
    split = _encode(txt, mesh)
    n_rows = 32                                             # 24 captions in batches of 16
    assert split.tokens.shape == (n_rows, 5, D)             # SOT column and padding compacted
    for arr in (split.global_features, split.tokens, split.mask):
        assert arr.sharding.is_equivalent_to(parallel.batch_sharding(mesh), arr.ndim)
        assert {s.data.shape[0] for s in arr.addressable_shards} == {n_rows // 8}
        assert len({s.device for s in arr.addressable_shards}) == 8
    assert split.tokens.dtype == jnp.float32
    assert len(split) == 24 and split.valid.sum() == 24
    np.testing.assert_array_equal(split.image_ids[split.rows], txt["ids"])   # data order back
    np.testing.assert_allclose(np.linalg.norm(np.asarray(split.tokens), axis=-1)[split.mask], 1.0,
                               rtol=1e-5)
    bf16 = _encode(txt, mesh, jnp.bfloat16)
    assert bf16.tokens.dtype == jnp.bfloat16
    # a COCO 1K-style fold selection keeps every device's rows on that device
    keep = np.isin(split.image_ids, img["ids"][:4]) & split.valid
    fold = evaluate.select_rows(split, keep)
    assert fold.tokens.sharding.is_equivalent_to(split.tokens.sharding, 3)
    assert len(fold) == int(keep.sum())
    np.testing.assert_array_equal(np.sort(fold.image_ids[fold.rows]),
                                  np.sort(split.image_ids[keep]))


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2)])
def test_sharded_caption_metrics_equal_single_device_and_old_host_path(mesh_shape):
    img, txt = _features(1)
    k_t2i, k_i2t = 4, 5
    mesh = parallel.make_mesh(*mesh_shape)
    one = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    got = {}
    for name, m in (("mesh", mesh), ("one", one)):
        gallery, query = _encode(img, m), _encode(txt, m)
        got[name] = evaluate.caption_retrieval(query, gallery, k_t2i=k_t2i, k_i2t=k_i2t, mesh=m)
    _assert_same(got["mesh"], got["one"])
    _assert_same(got["mesh"], _old_host_path(img, txt, k_t2i, k_i2t))
    # the numpy-dict API (encode_split's output) gives the same metrics
    as_dict = lambda f: {"global": f["global"], "tokens": f["tokens"], "mask": f["mask"],
                         "image_ids": f["ids"], "pids": f["ids"]}
    _assert_same(evaluate.caption_retrieval(as_dict(txt), as_dict(img), k_t2i=k_t2i,
                                            k_i2t=k_i2t), got["one"])
    assert got["mesh"]["two_stage"]["rsum"] != got["mesh"]["global"]["rsum"]   # not trivial


def test_local_exhaustive_switch_and_sharded_coco_1k():
    mesh = parallel.make_mesh(8, 1)
    img, txt = _features(2)
    gallery, query = _encode(img, mesh), _encode(txt, mesh)
    no_local = evaluate.caption_retrieval(query, gallery, k_t2i=3, k_i2t=4, mesh=mesh,
                                          local_exhaustive=False)
    assert set(no_local) == {"global", "two_stage"}
    as_dict = lambda f: {"global": f["global"], "tokens": f["tokens"], "mask": f["mask"],
                         "image_ids": f["ids"], "pids": f["ids"]}
    sharded = evaluate.coco_1k_retrieval(query, gallery, 3, 4, k_t2i=3, k_i2t=4, mesh=mesh)
    host = evaluate.coco_1k_retrieval(as_dict(txt), as_dict(img), 3, 4, k_t2i=3, k_i2t=4)
    _assert_same(sharded, host)


def test_person_metrics_on_the_mesh_equal_host():
    mesh = parallel.make_mesh(8, 1)
    img, txt = _features(3)
    gallery, query = _encode(img, mesh), _encode(txt, mesh)
    got = evaluate.person_retrieval(query, gallery, mesh=mesh)
    sim = similarity.global_similarity(txt["global"], img["global"])
    want = metrics.person_retrieval_metrics(np.asarray(sim), txt["ids"], img["ids"])
    assert got == pytest.approx(want, abs=1e-9)


def test_evaluator_specs_from_the_config():
    """config.evals: defaults from the family and the data config, kind settings over the family's,
    and one-line errors that name the field."""
    from configs import common
    from tests.train_fixtures import tiny_config

    config = tiny_config()
    config.eval_every_epochs = 2  # the default evaluator follows it
    (spec,) = evaluate.evaluator_specs(config)
    assert (spec.name, spec.kind, spec.split, spec.every_epochs, spec.prefix, dict(spec.settings)) == (
        "eval", "person", "test", 2, "eval", {})

    config = tiny_config(model_family="tgdt", loss_names="cmc")
    config.tgdt = common.tgdt_defaults("image_id")
    config.tgdt.k_t2i = 7
    config.evals.val = dict(kind="", split="val", every_epochs=1, prefix="val", coco_1k_folds=2, k_i2t=3)
    default, val = evaluate.evaluator_specs(config)
    assert default.kind == val.kind == "caption" and val.split == "val"
    assert default.settings["k_t2i"] == val.settings["k_t2i"] == 7            # config.tgdt
    assert (val.settings["k_i2t"], val.settings["coco_1k_folds"]) == (3, 2)   # the entry's own
    assert default.settings["coco_1k_folds"] == 0

    for entry, message in [
        (dict(kind="ranking"), "config.evals.bad.kind='ranking'"),
        (dict(every_epochs=-1), "config.evals.bad.every_epochs=-1"),
        (dict(prefix="eval"), "config.evals.eval.prefix='eval': config.evals.bad has it too"),
        (dict(prefix="x", kind="person", k_t2i=5), r"config.evals.bad: \['k_t2i'\] are not settings of kind 'person'"),
    ]:
        config = tiny_config()
        config.evals.bad = dict(dict(kind="", split="", every_epochs=0, prefix="other"), **entry)
        with pytest.raises(ValueError, match=message):
            evaluate.evaluator_specs(config)
