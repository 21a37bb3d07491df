"""TGDT as published (region features + BERT): parity with a torch transcription of TGDT's modules
(tests/torch_tgdt_reference.py) through a checkpoint written in TGDT's `.pth.tar` layout, both token
sets and the globals (float32, max abs diff <= 1e-5); the detach; padding behaviour; importer errors.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.torch_tgdt_reference import TGDTReference, save_tgdt_checkpoint, tiny_sizes  # noqa: E402
from xmr_jax.convert.core import CheckpointMismatchError  # noqa: E402
from xmr_jax.convert.tgdt import load_tgdt, read_tgdt_checkpoint  # noqa: E402
from xmr_jax.models.tgdt_regions import (TGDTRegions, init_tgdt_regions_params, text_word_mask,  # noqa: E402
                                         tgdt_regions_from_config)
from xmr_jax.similarity import l2_normalize  # noqa: E402

ATOL = 1e-5
SIZES = tiny_sizes()
B, N = 3, 5
LENGTHS = [7, 4, 5]          # caption lengths with [CLS] and [SEP]; padded to 7
CLS, SEP = 1, 2


class UnknownToUnpickler:
    """A class torch.load(weights_only=True) refuses."""


def make_inputs(seed=0, lengths=LENGTHS, pad_to=None):
    rng = np.random.default_rng(seed)
    regions = rng.normal(size=(B, N, SIZES["region_dim"])).astype(np.float32)
    xy = rng.uniform(0, 0.6, size=(B, N, 2))
    wh = rng.uniform(0.05, 0.4, size=(B, N, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    s = pad_to or max(lengths)
    ids = np.zeros((B, s), np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = CLS, SEP
        ids[i, 1:n - 1] = rng.integers(3, SIZES["vocab"], size=n - 2)
    return regions, boxes, ids


def with_zero_row(regions, boxes):
    """TGDT's collate: one all-zero row in front of the regions and the boxes."""
    z = lambda a: np.concatenate([np.zeros_like(a[:, :1]), a], axis=1)  # noqa: E731
    return z(regions), z(boxes)


@pytest.fixture(scope="module")
def reference():
    return TGDTReference(SIZES, seed=0)


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tgdt") / "model_best_rsum.pth.tar")
    save_tgdt_checkpoint(reference, path)
    return path


@pytest.fixture(scope="module")
def imported(checkpoint):
    return load_tgdt(checkpoint, text_heads=SIZES["bert_heads"])


def encode(model, params, regions, boxes, ids, token_set):
    img = jax.jit(lambda p, r, b: model.apply({"params": p}, r, b, method="encode_image", token_set=token_set))
    txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text", token_set=token_set))
    return ([np.asarray(x) for x in img(params, regions, boxes)],
            [np.asarray(x) for x in txt(params, jnp.asarray(ids, jnp.int32))])


def test_import_reads_sizes_and_defaults_to_test_token_set(imported):
    model, params = imported
    assert isinstance(model, TGDTRegions)
    assert model.token_set == "test" and model.detach is True and model.stage2_mask is False
    assert (model.embed_dim, model.region_dim, model.region_layers, model.region_mlp_dim) == (
        SIZES["embed"], SIZES["region_dim"], SIZES["region_layers"], SIZES["region_ffn"])
    assert (model.stage1_layers, model.stage2_layers, model.mlp_dim) == (SIZES["layers"], SIZES["layers"], SIZES["ffn"])
    assert (model.vocab_size, model.text_width, model.text_layers, model.text_mlp_dim) == (
        SIZES["vocab"], SIZES["bert_width"], SIZES["bert_layers"], SIZES["bert_ffn"])
    assert sorted(params) == ["bert", "cap_proj", "image_stage1", "image_stage2", "img_proj", "region_mlp_in",
                              "region_mlp_out", "region_transformer", "text_stage1", "text_stage2"]


@pytest.mark.parametrize("token_set", ["train", "test"])
def test_matches_torch_transcription(reference, imported, token_set):
    model, params = imported
    regions, boxes, ids = make_inputs()
    r37, b37 = with_zero_row(regions, boxes)
    want = reference(r37, b37, [N + 1] * B, ids, LENGTHS, test=token_set == "test")
    (ig, itok, imask), (tg, ttok, tmask) = encode(model, params, regions, boxes, ids, token_set)

    assert itok.shape == (B, N + 1, SIZES["embed"]) and ttok.shape == (B, ids.shape[1], SIZES["embed"])
    np.testing.assert_allclose(np.asarray(l2_normalize(ig)), want["img_global"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(l2_normalize(tg)), want["cap_global"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(itok, want["img_tokens"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(ttok, want["cap_tokens"], atol=ATOL, rtol=0)
    # Masks: image rows 1..N; words between [CLS] and [SEP].
    assert imask.tolist() == [[False] + [True] * N] * B
    assert tmask.tolist() == [[0 < j < n - 1 for j in range(ids.shape[1])] for n in LENGTHS]


def test_token_sets_differ_and_share_row0_and_globals(imported):
    model, params = imported
    regions, boxes, ids = make_inputs(seed=1)
    (ig_tr, itok_tr, _), (tg_tr, ttok_tr, _) = encode(model, params, regions, boxes, ids, "train")
    (ig_te, itok_te, _), (tg_te, ttok_te, _) = encode(model, params, regions, boxes, ids, "test")
    np.testing.assert_array_equal(ig_tr, ig_te)
    np.testing.assert_array_equal(tg_tr, tg_te)
    np.testing.assert_allclose(itok_te[:, 0], np.asarray(l2_normalize(ig_te)), atol=1e-7)
    np.testing.assert_allclose(ttok_tr[:, 0], np.asarray(l2_normalize(tg_tr)), atol=1e-7)
    assert np.abs(itok_tr[:, 1:] - itok_te[:, 1:]).max() > 1e-2
    assert np.abs(ttok_tr[:, 1:] - ttok_te[:, 1:]).max() > 1e-2
    np.testing.assert_allclose(np.linalg.norm(itok_tr, axis=-1), 1.0, atol=1e-5)
    # The module field selects the same sets as the per-call argument.
    (_, itok_field, _), _ = encode(model.clone(token_set="train"), params, regions, boxes, ids, None)
    np.testing.assert_array_equal(itok_field, itok_tr)


def test_stage2_sees_padding_unless_masked(imported):
    """As published, stage 2 has no padding mask: padding a caption further changes its global (TGDT
    pads per batch); stage1 tokens of real positions do not change; stage2_mask=True removes the effect."""
    model, params = imported
    regions, boxes, ids7 = make_inputs(seed=2)
    _, _, ids9 = make_inputs(seed=2, pad_to=9)
    np.testing.assert_array_equal(ids9[:, :7], ids7)
    for masked in (False, True):
        m = model.clone(stage2_mask=masked)
        _, (g7, tok7, _) = encode(m, params, regions, boxes, ids7, "test")
        _, (g9, tok9, _) = encode(m, params, regions, boxes, ids9, "test")
        np.testing.assert_allclose(tok9[:, 1:7], tok7[:, 1:], atol=1e-5)   # stage-1 tokens (masked attention)
        diff = np.abs(g9 - g7).max()
        assert (diff < 1e-5) if masked else (diff > 1e-3), (masked, diff)


def test_region_mask_excludes_regions(imported):
    model, params = imported
    regions, boxes, _ = make_inputs(seed=3)
    region_mask = np.ones((B, N), bool)
    region_mask[1, 3:] = False
    g, tok, mask = model.apply({"params": params}, regions, boxes, jnp.asarray(region_mask), method="encode_image")
    assert np.asarray(mask).tolist()[1] == [False, True, True, True, False, False]
    # The masked rows change nothing in stage 1 (keys masked): their values are irrelevant there.
    regions2 = regions.copy()
    regions2[1, 3:] = 100.0
    _, tok2, _ = model.apply({"params": params}, regions2, boxes, jnp.asarray(region_mask), method="encode_image")
    np.testing.assert_allclose(np.asarray(tok2)[:, 1:4], np.asarray(tok)[:, 1:4], atol=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_stops_gradients_before_stage2(detach):
    model = tgdt_regions_from_config({"preset": "tiny", "region_dim": SIZES["region_dim"], "vocab_size": SIZES["vocab"],
                                      "max_position_embeddings": 16, "detach": detach})
    params = init_tgdt_regions_params(model, jax.random.key(0))
    regions, boxes, ids = make_inputs(seed=4)
    batch = {"regions": jnp.asarray(regions), "boxes": jnp.asarray(boxes), "text_ids": jnp.asarray(ids, jnp.int32)}

    def loss(p):
        out = model.apply({"params": p}, batch)
        return jnp.sum(out["image_global"] * out["text_global"]) + jnp.sum(out["image_tokens"] ** 3) \
            + jnp.sum(out["text_tokens"] ** 3)

    grads = jax.jit(jax.grad(loss))(params)
    norms = {k: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(v))) for k, v in grads.items()}
    for k in ("image_stage2", "text_stage2"):
        assert norms[k] > 0, k
    for k in ("bert", "region_mlp_in", "region_transformer", "img_proj", "cap_proj", "image_stage1", "text_stage1"):
        assert (norms[k] == 0) if detach else (norms[k] > 0), (k, norms[k])


def test_bfloat16_compute_close_to_float32(imported):
    model, params = imported
    regions, boxes, ids = make_inputs(seed=5)
    (g32, _, _), (t32, _, _) = encode(model, params, regions, boxes, ids, "test")
    (g16, _, _), (t16, _, _) = encode(model.clone(dtype=jnp.bfloat16), params, regions, boxes, ids, "test")
    assert g16.dtype == np.float32
    cos = lambda a, b: np.sum(np.asarray(l2_normalize(a)) * np.asarray(l2_normalize(b)), -1)  # noqa: E731
    assert cos(g16, g32).min() > 0.98 and cos(t16, t32).min() > 0.98


def test_text_word_mask():
    ids = jnp.array([[101, 7, 8, 102, 0], [101, 102, 0, 0, 0], [101, 5, 6, 7, 102]])
    assert np.asarray(text_word_mask(ids)).tolist() == [
        [False, True, True, False, False], [False] * 5, [False, True, True, True, False]]


def test_bad_inputs_named(imported):
    model, params = imported
    regions, boxes, ids = make_inputs()
    with pytest.raises(ValueError, match="boxes must be"):
        model.apply({"params": params}, regions, boxes[:, :2], method="encode_image")
    with pytest.raises(ValueError, match=r"regions must be \[B, N, 16\]"):
        model.apply({"params": params}, regions[..., :8], boxes, method="encode_image")
    with pytest.raises(ValueError, match="token_set='eval'"):
        model.apply({"params": params}, ids, method="encode_text", token_set="eval")
    with pytest.raises(ValueError, match="unknown field"):
        tgdt_regions_from_config({"preset": "tiny", "layers": 3})


# ---------------------------------------------------------------------------------------------
# Importer


def _resave(reference, tmp_path, edit):
    sd = dict(reference.state_dict())
    edit(sd)
    path = str(tmp_path / "edited.pth.tar")
    torch.save({"model": sd, "opt": argparse.Namespace(x=1)}, path)
    return path


def test_checkpoint_holds_unused_params_that_are_skipped(checkpoint):
    sd = read_tgdt_checkpoint(checkpoint)
    for key in ("img_first_emb.weight", "cap_first_emb.bias", "img_txt_enc.text_agg_emb.0.weight",
                "img_txt_enc.img_agg_emb.4.bias", "img_txt_enc.txt_enc.map.weight", "img_txt_enc.img_enc.fc.weight",
                "img_txt_enc.txt_enc.word_embeddings.weight", "img_txt_enc.txt_enc.bert_model.pooler.dense.weight"):
        assert key in sd, key


def test_wrong_shape_names_key_and_shapes(reference, tmp_path):
    key = "img_txt_enc.transformer_encoder_img.layers.1.linear1.weight"
    path = _resave(reference, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(5, SIZES["embed"])))
    with pytest.raises(CheckpointMismatchError, match=rf"{key}.*expected \({SIZES['ffn']}, {SIZES['embed']}\), "
                                                      rf"got \(5, {SIZES['embed']}\)"):
        load_tgdt(path, text_heads=2)


def test_missing_and_unexpected_keys_named(reference, tmp_path):
    key = "img_txt_enc.img_enc.pos_encoding_image.map.2.bias"
    path = _resave(reference, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointMismatchError, match=f"missing key.*{key}"):
        load_tgdt(path, text_heads=2)
    path = _resave(reference, tmp_path, lambda sd: sd.__setitem__("img_txt_enc.image_aggregation.gate_fn.0.weight",
                                                                  torch.zeros(3, 3)))
    with pytest.raises(CheckpointMismatchError, match="unexpected key.*image_aggregation.gate_fn.0.weight"):
        load_tgdt(path, text_heads=2)


def test_shared_stage1_and_dataparallel_prefix(reference, imported, tmp_path):
    def edit(sd):
        for k in [k for k in sd if k.startswith("img_txt_enc.transformer_encoder_2.")]:
            sd.pop(k)
        for k in list(sd):
            sd["module." + k] = sd.pop(k)

    model, params = load_tgdt(_resave(reference, tmp_path, edit), text_heads=2)
    np.testing.assert_array_equal(params["image_stage1"]["layers_0"]["linear1"]["kernel"],
                                  imported[1]["text_stage1"]["layers_0"]["linear1"]["kernel"])


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="TGDT checkpoint not found"):
        load_tgdt(str(tmp_path / "nope.pth.tar"))
    path = str(tmp_path / "other.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointMismatchError, match="not a TGDT"):
        load_tgdt(path)
    path = str(tmp_path / "pickled.pth.tar")
    torch.save({"model": {}, "extra": UnknownToUnpickler()}, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        read_tgdt_checkpoint(path)


def test_outputs_feed_the_projects_cmc_loss():
    """TGDTRegions.__call__ returns what xmr_jax.models.tgdt.compute_losses reads; with the detach the
    loss gradient reaches the stage-2 transformers only."""
    import ml_collections

    from xmr_jax.models.tgdt import compute_losses

    config = ml_collections.ConfigDict({"tgdt": {"local_scale": 10.0, "positives": "image_id", "margin": 0.2,
                                                 "slack": 0.3, "negatives": "hardest"}})
    model = tgdt_regions_from_config({"preset": "tiny", "region_dim": SIZES["region_dim"], "vocab_size": SIZES["vocab"],
                                      "max_position_embeddings": 16})
    params = init_tgdt_regions_params(model, jax.random.key(1))
    regions, boxes, ids = make_inputs(seed=6)
    batch = {"regions": jnp.asarray(regions), "boxes": jnp.asarray(boxes), "text_ids": jnp.asarray(ids, jnp.int32),
             "image_ids": jnp.arange(B, dtype=jnp.int32)}

    def loss(p):
        return compute_losses(model.apply({"params": p}, batch), batch, config)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value)) and float(value) > 0
    touched = sorted(k for k, v in grads.items() if any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(v)))
    assert touched == ["image_stage2", "text_stage2"]
