"""CLIP towers and shared layers: shapes, masks, pooling, init scheme, dtype, remat/scan equivalence.

Speed: full `model.init` compiles one threefry per parameter (slow on shared CPUs), so most tests use
numpy random params with the shapes of `clip_param_shapes` and jitted apply functions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmr_jax.models.clip import CLIP_PRESETS, clip_from_config, clip_param_shapes, init_clip_params
from xmr_jax.models.layers import (MultiHeadAttention, ResidualBlock, Transformer, quick_gelu, stack_resblocks,
                                   unstack_resblocks)

SOT, EOT = 49406, 49407


def _ids():
    ids = np.zeros((3, 77), np.int32)
    for b, n in enumerate((1, 5, 20)):
        ids[b, 0] = SOT
        ids[b, 1:1 + n] = np.arange(1, n + 1) * (b + 7)
        ids[b, 1 + n] = EOT
    return jnp.asarray(ids)


def random_params(model, seed=0):
    """Float32 numpy params with the model's tree/shapes (normal * 0.05; LayerNorm scales ~1)."""
    rng = np.random.default_rng(seed)
    shapes = clip_param_shapes(model)

    def draw(path, s):
        x = 0.05 * rng.standard_normal(s.shape).astype(np.float32)
        return x + 1.0 if path[-1].key == "scale" else x

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def run(model, params, images, ids):
    """Both towers, jitted once per model."""
    return model.apply({"params": params}, images, ids)


@pytest.fixture(scope="module")
def tiny():
    model = clip_from_config({"preset": "tiny", "image_size": [48, 32], "vocab_size": 49408})
    params = random_params(model)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 48, 32, 3)), jnp.float32)
    return model, params, images, _ids()


def test_quick_gelu_values():
    x = jnp.array([-2.0, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(quick_gelu(x), np.array(x) / (1 + np.exp(-1.702 * np.array(x))), rtol=1e-6)


def _ref_attention(x, kv, p, heads, causal):
    def proj(z, name):
        return z @ np.asarray(p[name]["kernel"]) + np.asarray(p[name]["bias"])

    b, t, c = x.shape
    h = c // heads
    q = proj(x, "q_proj").reshape(b, t, heads, h)
    k = proj(kv, "k_proj").reshape(b, kv.shape[1], heads, h)
    v = proj(kv, "v_proj").reshape(b, kv.shape[1], heads, h)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(h)
    if causal:
        logits = np.where(np.tril(np.ones((t, kv.shape[1]), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", w, v).reshape(b, t, c)
    return proj(out, "out_proj")


@pytest.mark.parametrize("mode", ["self", "causal", "cross"])
def test_attention_matches_numpy(mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    kv = rng.standard_normal((2, 7, 16)).astype(np.float32) if mode == "cross" else None
    mha = MultiHeadAttention(num_heads=4)
    shapes = jax.eval_shape(lambda: mha.init(jax.random.key(0), x, kv))["params"]
    params = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), shapes)
    out = jax.jit(functools.partial(mha.apply, causal=(mode == "causal")))({"params": params}, x, kv)
    ref = _ref_attention(x, x if kv is None else kv, params, 4, mode == "causal")
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_openai_init_scheme():
    w, layers = 256, 2
    model = clip_from_config({"preset": "tiny", "vision_width": w, "vision_heads": 4, "text_width": w,
                              "text_heads": 4, "vocab_size": 4096, "vision_layers": layers, "text_layers": 1})
    p = jax.jit(init_clip_params, static_argnums=0)(model, jax.random.key(3, impl="rbg"))  # cheap to compile
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    np.testing.assert_allclose(np.std(p["text"]["token_embedding"]["embedding"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(p["text"]["positional_embedding"]), 0.01, rtol=0.05)
    np.testing.assert_allclose(np.std(p["text"]["text_projection"]), w ** -0.5, rtol=0.1)
    np.testing.assert_allclose(np.std(p["visual"]["proj"]), w ** -0.5, rtol=0.1)
    np.testing.assert_allclose(np.std(p["visual"]["positional_embedding"]), w ** -0.5, rtol=0.1)
    for tower, n in (("visual", layers), ("text", 1)):
        blk = p[tower]["transformer"][f"resblocks_{n - 1}"]
        np.testing.assert_allclose(np.std(blk["attn"]["q_proj"]["kernel"]), w ** -0.5, rtol=0.05)
        proj_std = w ** -0.5 * (2 * n) ** -0.5
        np.testing.assert_allclose(np.std(blk["attn"]["out_proj"]["kernel"]), proj_std, rtol=0.05)
        np.testing.assert_allclose(np.std(blk["mlp"]["c_proj"]["kernel"]), proj_std, rtol=0.05)
        np.testing.assert_allclose(np.std(blk["mlp"]["c_fc"]["kernel"]), (2 * w) ** -0.5, rtol=0.05)
        assert not np.any(blk["attn"]["q_proj"]["bias"]) and np.all(blk["ln_1"]["scale"] == 1)


def test_explicit_block_stds():
    """IRRA's cross-modal module passes its own stds: they must be honoured."""
    w = 128
    p = jax.jit(ResidualBlock(w, 4, attn_std=0.5, out_std=0.25, fc_std=0.125).init)(
        jax.random.key(0, impl="rbg"), jnp.zeros((1, 2, w)))["params"]
    np.testing.assert_allclose(np.std(p["attn"]["k_proj"]["kernel"]), 0.5, rtol=0.05)
    np.testing.assert_allclose(np.std(p["attn"]["out_proj"]["kernel"]), 0.25, rtol=0.05)
    np.testing.assert_allclose(np.std(p["mlp"]["c_proj"]["kernel"]), 0.25, rtol=0.05)
    np.testing.assert_allclose(np.std(p["mlp"]["c_fc"]["kernel"]), 0.125, rtol=0.05)


def test_shapes_masks_and_pooling(tiny):
    model, params, images, ids = tiny
    (g, tok, mask), text_out = run(model, params, images, ids)
    assert g.shape == (2, 32) and tok.shape == (2, 1 + 6 * 4, 32) and mask.shape == (2, 25)
    assert g.dtype == tok.dtype == jnp.float32 and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(g, tok[:, 0])
    assert not mask[:, 0].any() and mask[:, 1:].all()
    g, tok, mask = text_out
    assert g.shape == (3, 32) and tok.shape == (3, 77, 32)
    eot = np.argmax(np.asarray(ids) == EOT, axis=1)
    np.testing.assert_array_equal(g, tok[np.arange(3), eot])
    np.testing.assert_array_equal(mask, (ids > 0) & (ids < EOT) & (ids != SOT))
    assert mask.sum(1).tolist() == [1, 5, 20]


def test_text_is_causal_and_image_size_checked(tiny):
    model, params, images, ids = tiny
    _, (_, tok, _) = run(model, params, images, ids)
    ids2 = ids.at[2, 10].set(123)
    _, (_, tok2, _) = run(model, params, images, ids2)
    np.testing.assert_allclose(tok[2, :10], tok2[2, :10], atol=1e-6)
    assert np.abs(tok[2, 10:] - tok2[2, 10:]).max() > 1e-4
    with pytest.raises(ValueError, match=r"\[B, 48, 32, 3\]"):
        jax.eval_shape(functools.partial(model.apply, method="encode_image"), {"params": params},
                       jnp.zeros((1, 32, 32, 3)))


def test_bf16_compute_keeps_float32_params(tiny):
    model, params, images, ids = tiny
    bf = model.clone(dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(clip_param_shapes(bf)))
    for out32, out16 in zip(run(model, params, images, ids), run(bf, params, images, ids)):
        (g32, t32, _), (g16, t16, _) = out32, out16
        assert g16.dtype == jnp.float32 and np.isfinite(np.asarray(t16)).all()
        rel = np.abs(np.asarray(t16) - np.asarray(t32)).max() / np.abs(np.asarray(t32)).max()
        assert rel < 0.05, rel


def test_scan_layers_match_plain_stack(tiny):
    model, params, images, ids = tiny
    stacked = stack_resblocks(params)
    assert stacked["visual"]["transformer"]["resblocks"]["ln_1"]["scale"].shape == (2, 64)
    assert jax.tree.structure(unstack_resblocks(stacked)) == jax.tree.structure(params)
    ref = run(model, params, images, ids)
    # scanned init produces exactly the stacked layout
    scan_model = model.clone(scan_layers=True)
    shapes = jax.tree.map(lambda s: s.shape, clip_param_shapes(scan_model))
    assert shapes == jax.tree.map(np.shape, stacked)
    out = run(scan_model, stacked, images, ids)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_scanned_remat_transformer_gradients_match():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    plain = Transformer(32, 3, 4, causal=True)
    scanned = Transformer(32, 3, 4, causal=True, scan_layers=True, remat=True)
    shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x))["params"]
    params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32), shapes)

    def grads(module, p):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x)))))(p)

    v_ref, g_ref = grads(plain, params)
    v, g = grads(scanned, stack_resblocks(params))
    remat_out = jax.jit(Transformer(32, 3, 4, causal=True, remat=True).apply)({"params": params}, x)
    np.testing.assert_allclose(remat_out, jax.jit(plain.apply)({"params": params}, x), atol=1e-6)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(stack_resblocks(g_ref))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_presets_and_config_errors():
    m = clip_from_config({"preset": "ViT-B/16", "image_size": [384, 128], "dtype": "bfloat16"})
    shapes = clip_param_shapes(m)
    assert shapes["visual"]["positional_embedding"].shape == (1 + 24 * 8, 768)
    assert shapes["visual"]["proj"].shape == (768, 512)
    assert shapes["text"]["text_projection"].shape == (512, 512)
    assert m.dtype == jnp.bfloat16 and m.image_size == (384, 128)
    assert CLIP_PRESETS["ViT-L/14"] == dict(
        embed_dim=768, image_size=(224, 224), patch_size=14, vision_width=1024, vision_layers=24,
        vision_heads=16, context_length=77, vocab_size=49408, text_width=768, text_layers=12, text_heads=12)
    assert CLIP_PRESETS["ViT-B/32"]["patch_size"] == 32
    assert set(CLIP_PRESETS) == {"ViT-B/16", "ViT-B/32", "ViT-L/14", "tiny"}
    with pytest.raises(ValueError, match="unknown preset"):
        clip_from_config({"preset": "ViT-H/14"})
    with pytest.raises(ValueError, match="vision_widht"):
        clip_from_config({"preset": "tiny", "vision_widht": 3})
    with pytest.raises(ValueError, match="dtype"):
        clip_from_config({"preset": "tiny", "dtype": "float8"})
