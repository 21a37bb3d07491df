"""Global / local similarity against independent NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmr_jax import similarity as sim


def _np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _np_local_pair(img, img_mask, txt, txt_mask, scale):
    """Plain loops: for each valid word, the best valid image token; summed; times scale."""
    img, txt = _np_normalize(img), _np_normalize(txt)
    total = 0.0
    for j in range(txt.shape[0]):
        if not txt_mask[j]:
            continue
        best = None
        for r in range(img.shape[0]):
            if img_mask[r]:
                c = float(img[r] @ txt[j])
                best = c if best is None else max(best, c)
        total += 0.0 if best is None else best
    return scale * total


def _np_local(img, img_mask, txt, txt_mask, scale=10.0):
    out = np.zeros((img.shape[0], txt.shape[0]))
    for i in range(img.shape[0]):
        for t in range(txt.shape[0]):
            out[i, t] = _np_local_pair(img[i], img_mask[i], txt[t], txt_mask[t], scale)
    return out


def _random_case(rng, n_img=5, n_txt=7, l_img=6, l_txt=5, d=8):
    img = rng.normal(size=(n_img, l_img, d)).astype(np.float32)
    txt = rng.normal(size=(n_txt, l_txt, d)).astype(np.float32)
    img_mask = rng.random((n_img, l_img)) < 0.7
    txt_mask = rng.random((n_txt, l_txt)) < 0.6
    img_mask[:, 0] = False            # CLS-like token excluded
    img_mask[0] = False               # an image with no valid token at all
    img_mask[0, 0] = False
    txt_mask[1] = False               # a text with no valid word
    img_mask[2] = False
    img_mask[2, 3] = True             # exactly one valid image token
    return img, img_mask, txt, txt_mask


def test_global_similarity_is_cosine():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 6)).astype(np.float32) * 3
    b = rng.normal(size=(5, 6)).astype(np.float32)
    want = _np_normalize(a) @ _np_normalize(b).T
    got = sim.global_similarity(a, b)
    assert got.dtype == jnp.float32 and got.shape == (4, 5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_local_similarity_matches_numpy_loop():
    rng = np.random.default_rng(1)
    img, im, txt, tm = _random_case(rng)
    want = _np_local(img, im, txt, tm, 10.0)
    got = sim.local_similarity(img, im, txt, tm, scale=10.0)
    assert got.shape == (5, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[:, 1] == 0.0)       # no valid word -> 0
    assert np.all(np.asarray(got)[0] == 0.0)          # no valid image token -> 0


def test_masked_image_token_never_wins_when_all_cosines_negative():
    # One valid image token anti-aligned with every word; a masked token aligned with them.
    d = 4
    word = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    img = np.stack([word * 5.0, -word + np.array([0, 0.5, 0, 0], np.float32)])[None]  # [1,2,4]
    img_mask = np.array([[False, True]])
    txt = np.stack([word, word * 2.0, np.ones(d, np.float32)])[None]                     # [1,3,4]
    txt_mask = np.array([[True, True, False]])
    got = float(sim.local_similarity(img, img_mask, txt, txt_mask, scale=10.0)[0, 0])
    valid = _np_normalize(img[0, 1])
    want = 10.0 * 2 * float(valid @ word)
    assert want < 0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, _np_local(img, img_mask, txt, txt_mask)[0, 0], rtol=1e-6)


@pytest.mark.parametrize("blocks", [(1, 1), (2, 3), (4, 7)])
def test_block_tiling_equals_untiled(blocks):
    rng = np.random.default_rng(2)
    img, im, txt, tm = _random_case(rng, n_img=5, n_txt=7)
    full = sim.local_similarity(img, im, txt, tm, image_block=5, text_block=7)
    tiled = sim.local_similarity(img, im, txt, tm, image_block=blocks[0], text_block=blocks[1])
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(full), rtol=1e-6, atol=1e-6)


def test_auto_blocks_bound_memory_and_tile():
    bi, bt = sim.auto_blocks(5000, 25000, 197, 77, tile_bytes=64 * 2**20)
    assert 2 * 4 * bi * bt * 197 * 77 <= 64 * 2**20 and bi >= 1 and bt >= 1
    rng = np.random.default_rng(3)
    img, im, txt, tm = _random_case(rng, n_img=9, n_txt=11)
    # A tiny tile budget forces many non-divisible blocks; result must not change.
    small = sim.local_similarity(img, im, txt, tm, tile_bytes=2 * 4 * 6 * 5 * 6)
    np.testing.assert_allclose(np.asarray(small), _np_local(img, im, txt, tm), rtol=1e-5,
                               atol=1e-5)


def test_local_similarity_jit_bf16_and_grad():
    rng = np.random.default_rng(4)
    img, im, txt, tm = _random_case(rng)
    f = jax.jit(lambda a, b: sim.local_similarity(a, im, b, tm, 10.0, image_block=2, text_block=3))
    np.testing.assert_allclose(np.asarray(f(img, txt)), _np_local(img, im, txt, tm), rtol=1e-5,
                               atol=1e-5)
    bf = sim.local_similarity(jnp.asarray(img, jnp.bfloat16), im, jnp.asarray(txt, jnp.bfloat16),
                              tm)
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf), _np_local(img, im, txt, tm), atol=0.15)
    g = jax.grad(lambda a: jnp.sum(sim.local_similarity(a, im, txt, tm)))(jnp.asarray(img))
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~im] == 0)            # masked image tokens get no gradient


def test_candidate_kernels_match_all_pairs():
    rng = np.random.default_rng(5)
    img, im, txt, tm = _random_case(rng, n_img=6, n_txt=6)
    full = _np_local(img, im, txt, tm, 7.0)          # [N_img, N_txt]
    cand = rng.integers(0, 6, size=(6, 3))           # each query's own candidate set
    t2i = sim.local_similarity_text_candidates(txt, tm, img, im, cand, scale=7.0)
    np.testing.assert_allclose(np.asarray(t2i), full[cand, np.arange(6)[:, None]], rtol=1e-5,
                               atol=1e-5)
    i2t = sim.local_similarity_image_candidates(img, im, txt, tm, cand, scale=7.0)
    np.testing.assert_allclose(np.asarray(i2t), full[np.arange(6)[:, None], cand], rtol=1e-5,
                               atol=1e-5)


def test_bad_shapes_raise_clear_errors():
    img = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="image_mask"):
        sim.local_similarity(img, np.ones((2, 4), bool), img, np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="feature dim"):
        sim.local_similarity(img, np.ones((2, 3), bool), np.zeros((2, 3, 5)), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="text_mask"):
        sim.local_similarity_text_candidates(img, np.ones((2, 4), bool), img, np.ones((2, 3), bool),
                                             np.zeros((2, 1), np.int32))


def test_l2_normalize_clamps_the_norm_like_torch():
    torch = pytest.importorskip("torch")
    # norms 5 and 1e-8 (above the 1e-12 clamp), 1e-13 (below it) and a zero row
    x = np.array([[3.0, 4.0], [6e-9, 8e-9], [6e-14, 8e-14], [0.0, 0.0]], np.float32)
    want = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()  # eps 1e-12 on the norm
    got = np.asarray(sim.l2_normalize(x))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got[:2], [[0.6, 0.8], [0.6, 0.8]], rtol=1e-6)  # unit rows
    np.testing.assert_allclose(got[2], [0.06, 0.08], rtol=1e-5)  # divided by eps, not by its norm
    assert not got[3].any()
    g = jax.grad(lambda a: sim.l2_normalize(a).sum())(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_normalize_tokens_dtype_and_zero_rows():
    x = np.array([[[3.0, 4.0], [0.0, 0.0]]], np.float32)
    out = sim.normalize_tokens(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), [[[0.6, 0.8], [0.0, 0.0]]], atol=1e-7)
    assert sim.normalize_tokens(x, jnp.bfloat16).dtype == jnp.bfloat16
    assert sim.normalize_tokens(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_token_window_and_compaction_are_exact():
    rng = np.random.default_rng(6)
    img, im, txt, tm = _random_case(rng)
    pad_t = lambda t, m, a, b: (np.pad(t, ((0, 0), (a, b), (0, 0)), constant_values=9.0),
                                np.pad(m, ((0, 0), (a, b))))
    img2, im2 = pad_t(img, im, 2, 3)
    txt2, tm2 = pad_t(txt, tm, 1, 4)
    lo, hi = sim.token_window(im2)
    assert lo >= 2 and hi <= 2 + img.shape[1] and im2[:, lo:hi].sum() == im2.sum()
    assert sim.token_window(np.zeros((2, 5), bool)) == (0, 1)
    ct, cm = sim.compact_tokens(txt2, tm2)
    assert cm.shape[1] < tm2.shape[1] and int(cm.sum()) == int(tm2.sum())
    np.testing.assert_allclose(np.asarray(sim.local_similarity(img2, im2, txt2, tm2)),
                               _np_local(img, im, txt, tm), rtol=1e-5, atol=1e-5)
    # under jit (traced mask) nothing is sliced and the result is the same
    f = jax.jit(lambda a, b, c, d: sim.local_similarity(a, b, c, d))
    np.testing.assert_allclose(np.asarray(f(img2, im2, txt2, tm2)), _np_local(img, im, txt, tm),
                               rtol=1e-5, atol=1e-5)


def test_normalized_flag_uses_tokens_as_given():
    rng = np.random.default_rng(7)
    img, im, txt, tm = _random_case(rng)
    ni, nt = sim.normalize_tokens(img), sim.normalize_tokens(txt)
    np.testing.assert_allclose(np.asarray(sim.local_similarity(ni, im, nt, tm, normalized=True)),
                               _np_local(img, im, txt, tm), rtol=1e-5, atol=1e-5)
    # normalized=True really skips the normalization: scaled tokens scale the result
    twice = sim.local_similarity(2 * ni, im, nt, tm, normalized=True)
    np.testing.assert_allclose(np.asarray(twice), 2 * _np_local(img, im, txt, tm), rtol=1e-5,
                               atol=1e-5)
