"""CLIP towers and shared layers: shapes, masks, pooling, init scheme, dtype, remat/scan equivalence.

Speed: full `model.init` compiles one threefry per parameter (slow on shared CPUs), so most tests use
numpy random params with the shapes of `clip_param_shapes` and jitted apply functions.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmr_jax.models import layers
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
    assert set(CLIP_PRESETS) == {"ViT-B/16", "ViT-B/32", "ViT-L/14", "ViT-B-16", "ViT-L-14", "tiny"}
    with pytest.raises(ValueError, match="unknown preset"):
        clip_from_config({"preset": "ViT-H/14"})
    with pytest.raises(ValueError, match="vision_widht"):
        clip_from_config({"preset": "tiny", "vision_widht": 3})
    with pytest.raises(ValueError, match="dtype"):
        clip_from_config({"preset": "tiny", "dtype": "float8"})


# ---------------------------------------------------------------- attention implementation / fast paths

def _has_cuda_gpu():
    try:
        return layers.default_backend_kind() == "cuda"
    except RuntimeError:
        return False


def test_attention_implementation_selection(monkeypatch):
    monkeypatch.delenv("XMR_ATTENTION_IMPL", raising=False)
    pick = layers.attention_implementation
    for backend in ("cuda", "gpu"):
        assert pick(jnp.bfloat16, backend) == "cudnn"
        assert pick(jnp.float16, backend) == "cudnn"
        assert pick(jnp.float32, backend) == "xla"          # cuDNN fused attention is 16-bit only
    for backend in ("cpu", "tpu", "rocm"):
        for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
            assert pick(dt, backend) == "xla"
    assert pick(jnp.bfloat16, "cuda", "xla") == "xla"       # explicit choices win
    assert pick(jnp.float32, "cpu", "cudnn") == "cudnn"
    monkeypatch.setenv("XMR_ATTENTION_IMPL", "xla")          # process-wide default
    assert pick(jnp.bfloat16, "cuda") == "xla"
    assert pick(jnp.bfloat16, "cuda", "auto") == "cudnn"
    with pytest.raises(ValueError, match="flash"):
        pick(jnp.bfloat16, "cuda", "flash")
    monkeypatch.delenv("XMR_ATTENTION_IMPL")
    if jax.default_backend() == "cpu":
        assert pick(jnp.bfloat16) == "xla"


def test_attention_auto_falls_back_to_xla(monkeypatch):
    """"auto" on a (pretend) CUDA backend picks cuDNN; where cuDNN cannot run, the result is XLA's."""
    if _has_cuda_gpu():
        pytest.skip("real GPU: covered by test_cudnn_attention_matches_xla")
    monkeypatch.setattr(layers, "default_backend_kind", lambda: "cuda")
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.bfloat16) for _ in range(3))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    out = layers.dot_product_attention(q, k, v, causal=True, implementation="auto")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    with pytest.raises(Exception):
        layers.dot_product_attention(q, k, v, causal=True, implementation="cudnn")


@pytest.mark.skipif(not _has_cuda_gpu(), reason="needs a CUDA GPU (cuDNN fused attention)")
@pytest.mark.parametrize("mode", ["self", "causal", "cross", "padding"])
def test_cudnn_attention_matches_xla(mode):
    """Both implementations in bfloat16 through MultiHeadAttention: outputs and gradients agree."""
    rng = np.random.default_rng(0)
    b, t, s, c, heads = 4, 77, 193, 512, 8
    x = jnp.asarray(rng.standard_normal((b, t, c)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((b, s, c)), jnp.float32) if mode == "cross" else None
    mask = None
    if mode == "padding":   # TGDT-style key padding mask [B, 1, 1, S]
        lengths = np.array([t, 40, 7, 1])
        mask = jnp.asarray(np.arange(t)[None, None, None, :] < lengths[:, None, None, None])
    mods = {impl: MultiHeadAttention(heads, jnp.bfloat16, attention_impl=impl) for impl in ("xla", "cudnn")}
    params = jax.jit(mods["xla"].init)(jax.random.key(0), x, kv)
    w = jnp.asarray(rng.standard_normal((b, t, c)), jnp.float32)

    def run(impl):
        def f(p, x):
            out = mods[impl].apply(p, x, kv, causal=mode == "causal", mask=mask)
            return jnp.sum(out.astype(jnp.float32) * w), out
        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
        return out, grads

    if mode != "cross":   # the cuDNN kernel must really be used
        hlo = jax.jit(lambda p: mods["cudnn"].apply(p, x, kv, causal=mode == "causal", mask=mask)).lower(
            params).compile().as_text()
        assert "cudnn" in hlo.lower()
    (o1, g1), (o2, g2) = run("xla"), run("cudnn")
    scale = float(jnp.max(jnp.abs(o1.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(o2, np.float32), np.asarray(o1, np.float32), atol=2e-2 * scale)
    for a, b_ in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        a, b_ = np.asarray(a, np.float32), np.asarray(b_, np.float32)
        np.testing.assert_allclose(b_, a, atol=3e-2 * max(np.abs(a).max(), 1e-6))


def test_dense_and_patch_embed_match_flax_layers():
    """layers.Dense == nn.Dense and vit.PatchEmbed == the strided nn.Conv: same params, same outputs."""
    import flax.linen as nn

    from xmr_jax.models.vit import PatchEmbed

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    ours, ref = layers.Dense(24, std=0.3), nn.Dense(24, kernel_init=nn.initializers.normal(0.3))
    p = ours.init(jax.random.key(1), x)
    assert jax.tree.map(np.shape, p) == jax.tree.map(np.shape, ref.init(jax.random.key(1), x))
    p = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), p)
    np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), atol=1e-5)

    images = jnp.asarray(rng.standard_normal((2, 32, 24, 3)), jnp.float32)
    pe = PatchEmbed(16, 8)
    conv = nn.Conv(16, (8, 8), strides=(8, 8), padding="VALID", use_bias=False)
    p_pe, p_conv = pe.init(jax.random.key(2), images), conv.init(jax.random.key(2), images)
    np.testing.assert_array_equal(p_pe["params"]["kernel"], p_conv["params"]["kernel"])   # same init
    np.testing.assert_allclose(pe.apply(p_pe, images), conv.apply(p_conv, images).reshape(2, 12, 16), atol=1e-5)


_FAULTS_SCRIPT = r"""
import resource, sys
from xmr_jax.cpu_runtime import configure_cpu_runtime
if sys.argv[1] != "off":
    done = configure_cpu_runtime(force=True, reexec=sys.argv[1] == "reexec")
    assert "GLIBC_TUNABLES" in done if sys.argv[1] == "reexec" else all(done["mallopt"].values()), done
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x), jnp.cos(x)))   # two fresh 128 MB output buffers per call
x = jnp.ones((4096, 8192), jnp.float32)
for _ in range(2):
    jax.block_until_ready(f(x))
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    jax.block_until_ready(f(x))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_configure_cpu_runtime_stops_page_faults_per_step():
    def faults(mode):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env["JAX_PLATFORMS"] = "cpu"
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    off, reexec = faults("off"), faults("reexec")
    assert off > 50000, off                  # 2 x 128 MB of fresh 4 KiB pages per call
    # Freed blocks are reused from the heap instead of fresh mmap()s; how many of the 6 buffers land
    # on reused pages depends on heap layout (measured 0-2/3 of `off`), so the bound is loose.
    assert reexec < 0.8 * off, (reexec, off)
    faults("mallopt")                        # the fallback path runs


# ---------------------------------------------------------------- MLP activation (QuickGELU / exact GELU)

def test_gelu_is_exact_erf_gelu():
    import math

    x = np.array([-3.0, -1.0, -0.25, 0.0, 0.5, 2.0], np.float32)
    want = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x], np.float32)
    np.testing.assert_allclose(layers.gelu(jnp.asarray(x)), want, rtol=1e-6, atol=1e-7)
    assert layers.activation_fn("quick_gelu") is quick_gelu and layers.activation_fn("gelu") is layers.gelu
    with pytest.raises(ValueError, match=r"activation: expected one of \('quick_gelu', 'gelu'\), got 'relu'"):
        layers.activation_fn("relu")


def test_mlp_activation_same_params_different_function():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 16)), jnp.float32)
    quick = layers.Mlp()
    exact = layers.Mlp(activation="gelu")
    params = quick.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, exact.init(jax.random.key(0), x)["params"]) == jax.tree.map(jnp.shape, params)
    h = np.asarray(x) @ np.asarray(params["c_fc"]["kernel"]) + np.asarray(params["c_fc"]["bias"])
    for mod, act in ((quick, quick_gelu), (exact, layers.gelu)):
        want = np.asarray(act(jnp.asarray(h))) @ np.asarray(params["c_proj"]["kernel"]) + np.asarray(
            params["c_proj"]["bias"])
        np.testing.assert_allclose(mod.apply({"params": params}, x), want, atol=1e-5)
    assert np.abs(quick.apply({"params": params}, x) - exact.apply({"params": params}, x)).max() > 1e-3


def test_clip_activation_threads_through_both_towers(tiny):
    model, params, images, ids = tiny
    assert model.activation == "quick_gelu"
    gelu_model = model.clone(activation="gelu")
    assert jax.tree.map(lambda s: s.shape, clip_param_shapes(gelu_model)) == jax.tree.map(
        lambda s: s.shape, clip_param_shapes(model))
    (ig, _, _), (tg, _, _) = run(model, params, images, ids)
    (gg, _, _), (gt, _, _) = run(gelu_model, params, images, ids)
    assert np.abs(ig - gg).max() > 1e-4 and np.abs(tg - gt).max() > 1e-4   # both towers changed
    # the text tower alone with gelu is the gelu CLIP's text tower
    from xmr_jax.models.text import TextTransformer

    f = gelu_model.fields()
    text = TextTransformer(context_length=77, vocab_size=49408, width=f["text_width"], layers=f["text_layers"],
                           heads=f["text_heads"], output_dim=f["embed_dim"], activation="gelu")
    np.testing.assert_allclose(jax.jit(text.apply)({"params": params["text"]}, ids)[0], gt, atol=1e-6)


def test_open_clip_presets_and_activation_errors():
    b16, ob16 = clip_from_config({"preset": "ViT-B/16"}), clip_from_config({"preset": "ViT-B-16"})
    assert b16.activation == "quick_gelu" and ob16.activation == "gelu"
    assert {k: v for k, v in ob16.fields().items() if k != "activation"} == {
        k: v for k, v in b16.fields().items() if k != "activation"}
    ol14 = clip_from_config({"preset": "ViT-L-14"})
    assert ol14.activation == "gelu" and ol14.vision_width == 1024 and ol14.patch_size == 14
    assert clip_from_config({"preset": "ViT-B-16", "activation": "quick_gelu"}).activation == "quick_gelu"
    with pytest.raises(ValueError, match="clip config: activation: expected one of"):
        clip_from_config({"preset": "tiny", "activation": "swish"})
    with pytest.raises(ValueError, match="activation"):
        clip_param_shapes(clip_from_config({"preset": "tiny"}).clone(activation="gelu_new"))
