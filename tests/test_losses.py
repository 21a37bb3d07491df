"""Losses against independent float64 NumPy loop implementations (rtol = atol = 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmr_jax import losses

TOL = dict(rtol=1e-5, atol=1e-5)
B, D, C = 8, 16, 11
REPEATED_PIDS = np.array([3, 3, 7, 1, 1, 1, 9, 4], np.int32)
UNIQUE_PIDS = np.arange(B, dtype=np.int32) * 2 + 1


def _feats(seed, b=B, d=D, scale=1.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((b, d))).astype(np.float32)


# ----------------------------------------------------------------------------- references


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax_row(row):
    row = np.asarray(row, np.float64)
    m = max(row)
    lse = m + np.log(sum(np.exp(v - m) for v in row))
    return np.array([v - lse for v in row])


def _matching_kl_ref(scores, q, eps):
    """mean_a sum_b p_ab (log p_ab - log(q_ab + eps)), written as loops."""
    total = 0.0
    for a in range(scores.shape[0]):
        log_p = _log_softmax_row(scores[a])
        for b in range(scores.shape[1]):
            total += np.exp(log_p[b]) * (log_p[b] - np.log(q[a, b] + eps))
    return total / scores.shape[0]


def _sdm_ref(img, txt, pids, scale=50.0, eps=1e-8):
    n = len(pids)
    labels = np.array([[float(pids[a] == pids[b]) for b in range(n)] for a in range(n)])
    # The reference divides by `labels.sum(dim=1)` broadcast over the LAST axis (column-wise);
    # labels are symmetric, so this is the row normalization the library implements.
    q = labels / labels.sum(axis=1)[None, :]
    t2i = scale * _unit(txt) @ _unit(img).T
    return _matching_kl_ref(t2i.T, q, eps) + _matching_kl_ref(t2i, q, eps)


def _cmpm_ref(img, txt, pids, eps=1e-8):
    n = len(pids)
    labels = np.array([[float(pids[a] == pids[b]) for b in range(n)] for a in range(n)])
    q = labels / np.sqrt((labels**2).sum(axis=1))[None, :]  # IRRA: divide by the row L2 norm
    img64, txt64 = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    i_proj_t = img64 @ _unit(txt).T
    t_proj_i = txt64 @ _unit(img).T
    return _matching_kl_ref(i_proj_t, q, eps) + _matching_kl_ref(t_proj_i, q, eps)


def _ce_ref(logits, target):
    return -_log_softmax_row(logits)[target]


def _id_ref(img_logits, txt_logits, pids):
    n = len(pids)
    ce_i = sum(_ce_ref(img_logits[a], pids[a]) for a in range(n)) / n
    ce_t = sum(_ce_ref(txt_logits[a], pids[a]) for a in range(n)) / n
    return (ce_i + ce_t) / 2


def _mlm_ref(logits, labels):
    logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    labels = np.asarray(labels).reshape(-1)
    terms = [_ce_ref(logits[r], labels[r]) for r in range(len(labels)) if labels[r] != 0]
    return sum(terms) / len(terms) if terms else 0.0


def _itc_ref(img, txt, scale=50.0):
    s = scale * _unit(img) @ _unit(txt).T
    n = s.shape[0]
    loss_i = sum(_ce_ref(s[a], a) for a in range(n)) / n
    loss_t = sum(_ce_ref(s.T[a], a) for a in range(n)) / n
    return (loss_i + loss_t) / 2


def _hinge_ref(s, positive, margin):
    n = s.shape[0]
    total = 0.0
    for i in range(n):  # image i as anchor: hardest negative text
        costs = [max(0.0, margin + s[i, j] - s[i, i]) for j in range(n)
                 if j != i and not positive[i, j]]
        total += max(costs) if costs else 0.0
    for j in range(n):  # text j as anchor: hardest negative image
        costs = [max(0.0, margin + s[i, j] - s[j, j]) for i in range(n)
                 if i != j and not positive[i, j]]
        total += max(costs) if costs else 0.0
    return total


def _cmc_ref(img, txt, local, margin=0.2, slack=0.3, positive=None):
    n = img.shape[0]
    positive = np.eye(n, dtype=bool) if positive is None else np.asarray(positive)
    v, t = _unit(img), _unit(txt)
    s_global = v @ t.T
    intra = 0.0
    for j in range(n):
        worst = max(abs(t[i] @ t[j] - v[i] @ v[j]) for i in range(n))
        intra += max(0.0, worst - slack)
    return (_hinge_ref(s_global, positive, margin) + intra
            + _hinge_ref(np.asarray(local, np.float64), positive, margin))


# ----------------------------------------------------------------------------- SDM / ID / MLM


@pytest.mark.parametrize("pids", [UNIQUE_PIDS, REPEATED_PIDS], ids=["unique", "repeated"])
def test_sdm_matches_reference(pids):
    img, txt = _feats(0), _feats(1)
    got = losses.sdm_loss(img, txt, pids)
    np.testing.assert_allclose(float(got), _sdm_ref(img, txt, pids), **TOL)
    got_scaled = losses.sdm_loss(img, txt, pids, logit_scale=10.0, eps=1e-6)
    np.testing.assert_allclose(float(got_scaled), _sdm_ref(img, txt, pids, 10.0, 1e-6), **TOL)


def test_sdm_is_sum_of_two_directions_and_small_for_aligned_pairs():
    img = _feats(2)
    # Aligned, distinct unit vectors: the predicted distribution is nearly one-hot on the match.
    aligned = losses.sdm_loss(np.eye(B, D, dtype=np.float32), np.eye(B, D, dtype=np.float32),
                              UNIQUE_PIDS)
    shuffled = losses.sdm_loss(img, img[::-1], UNIQUE_PIDS)
    assert float(aligned) < 1e-5
    assert float(shuffled) > 1.0


@pytest.mark.parametrize("pids", [UNIQUE_PIDS % C, REPEATED_PIDS], ids=["unique", "repeated"])
def test_id_matches_reference(pids):
    rng = np.random.default_rng(3)
    img_logits = (3 * rng.standard_normal((B, C))).astype(np.float32)
    txt_logits = (3 * rng.standard_normal((B, C))).astype(np.float32)
    got = losses.id_loss(img_logits, txt_logits, pids)
    np.testing.assert_allclose(float(got), _id_ref(img_logits, txt_logits, pids), **TOL)


def test_mlm_matches_reference_and_ignores_label_zero():
    rng = np.random.default_rng(4)
    logits = (2 * rng.standard_normal((3, 6, 13))).astype(np.float32)
    labels = np.zeros((3, 6), np.int32)
    labels[0, 1], labels[0, 4], labels[2, 2] = 5, 12, 1
    got = losses.mlm_loss(logits, labels)
    np.testing.assert_allclose(float(got), _mlm_ref(logits, labels), **TOL)
    # Changing logits at ignored positions does not change the loss.
    logits2 = logits.copy()
    logits2[1] += 100.0
    np.testing.assert_allclose(float(losses.mlm_loss(logits2, labels)), float(got), **TOL)


def test_mlm_all_ignored_is_zero_with_finite_grad():
    logits = np.random.default_rng(5).standard_normal((2, 4, 9)).astype(np.float32)
    labels = np.zeros((2, 4), np.int32)
    value, grad = jax.jit(jax.value_and_grad(losses.mlm_loss))(logits, labels)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


# ----------------------------------------------------------------------------- ITC / CMPM


def test_itc_matches_reference():
    img, txt = _feats(6), _feats(7)
    np.testing.assert_allclose(float(losses.itc_loss(img, txt)), _itc_ref(img, txt), **TOL)
    np.testing.assert_allclose(float(losses.itc_loss(img, txt, logit_scale=5.0)),
                               _itc_ref(img, txt, 5.0), **TOL)


@pytest.mark.parametrize("pids", [UNIQUE_PIDS, REPEATED_PIDS], ids=["unique", "repeated"])
def test_cmpm_matches_reference(pids):
    # Unnormalized features of moderate norm (projections are unnormalized logits).
    img, txt = _feats(8, scale=0.5), _feats(9, scale=0.5)
    got = losses.cmpm_loss(img, txt, pids)
    np.testing.assert_allclose(float(got), _cmpm_ref(img, txt, pids), **TOL)


def test_cmpm_l1_variant_differs_only_with_repeated_pids():
    img, txt = _feats(10, scale=0.5), _feats(11, scale=0.5)
    for pids, same in ((UNIQUE_PIDS, True), (REPEATED_PIDS, False)):
        l1 = float(losses.cmpm_loss(img, txt, pids, label_norm="l1"))
        l2 = float(losses.cmpm_loss(img, txt, pids))
        assert np.isclose(l1, l2, rtol=1e-6) == same
    with pytest.raises(ValueError, match="label_norm"):
        losses.cmpm_loss(img, txt, UNIQUE_PIDS, label_norm="l3")


# ----------------------------------------------------------------------------- CMC


def _local(seed, b=B):
    return np.random.default_rng(seed).uniform(-3.0, 3.0, (b, b)).astype(np.float32)


def test_cmc_identity_mask_matches_reference():
    img, txt, local = _feats(12), _feats(13), _local(14)
    got = losses.cmc_loss(img, txt, local)
    np.testing.assert_allclose(float(got), _cmc_ref(img, txt, local), **TOL)
    got2 = losses.cmc_loss(img, txt, local, margin=0.5, slack=0.1)
    np.testing.assert_allclose(float(got2), _cmc_ref(img, txt, local, 0.5, 0.1), **TOL)


def test_cmc_duplicates_are_never_negatives():
    image_ids = np.array([0, 0, 1, 2, 2, 2, 3, 4])
    rng = np.random.default_rng(15)
    base = rng.standard_normal((5, D)).astype(np.float32)
    # Duplicated images have identical features: as negatives they would violate the margin.
    img = base[image_ids]
    txt = (img + 0.3 * rng.standard_normal((B, D))).astype(np.float32)
    local = _local(16)
    mask = losses.positive_mask_from_ids(image_ids)
    expected_mask = image_ids[:, None] == image_ids[None, :]
    np.testing.assert_array_equal(np.asarray(mask), expected_mask)
    got = losses.cmc_loss(img, txt, local, positive_mask=mask)
    np.testing.assert_allclose(float(got), _cmc_ref(img, txt, local, positive=expected_mask),
                               **TOL)
    # Without the mask the duplicates count as negatives and the loss differs (is larger).
    unmasked = losses.cmc_loss(img, txt, local)
    np.testing.assert_allclose(float(unmasked), _cmc_ref(img, txt, local), **TOL)
    assert float(unmasked) > float(got) + 1e-3


def test_cmc_all_positive_batch_has_only_intra_term():
    img, txt = _feats(17, b=4), _feats(18, b=4)
    local = _local(19, b=4)
    got = losses.cmc_loss(img, txt, local, positive_mask=np.ones((4, 4), bool))
    v, t = _unit(img), _unit(txt)
    gap = np.abs(t @ t.T - v @ v.T)
    intra = np.maximum(gap.max(axis=0) - 0.3, 0.0).sum()
    np.testing.assert_allclose(float(got), intra, **TOL)


def test_cmc_hand_case():
    # 2 pairs, orthonormal features: S_global = I, intra gap = 0.
    img = np.eye(2, 4, dtype=np.float32)
    txt = np.eye(2, 4, dtype=np.float32)
    local = np.array([[1.0, 0.9], [0.0, 2.0]], np.float32)
    # global: each of 4 anchors: [0.2 + 0 - 1]_+ = 0.
    # local rows: i=0: [0.2 + 0.9 - 1]_+ = 0.1; i=1: [0.2 + 0 - 2]_+ = 0.
    # local cols: j=0: [0.2 + 0 - 1]_+ = 0; j=1: [0.2 + 0.9 - 2]_+ = 0.
    np.testing.assert_allclose(float(losses.cmc_loss(img, txt, local)), 0.1, **TOL)


def _sum_hinge_ref(s, positive, margin):
    """Hinge of every negative pair against both of its positives, written as loops."""
    n = s.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j and not positive[i, j]:
                total += max(0.0, margin + s[i, j] - s[i, i]) + max(0.0, margin + s[i, j] - s[j, j])
    return total


def test_cmc_sum_negatives_matches_reference():
    img, txt, local = _feats(30), _feats(31), _local(32)
    positive = REPEATED_PIDS[:, None] == REPEATED_PIDS[None, :]
    got = losses.cmc_loss(img, txt, local, margin=0.3, slack=0.1, positive_mask=positive, negatives="sum")
    v, t = _unit(img), _unit(txt)
    intra = _cmc_ref(img, txt, local, 0.3, 0.1, positive) - _hinge_ref(v @ t.T, positive, 0.3) - _hinge_ref(
        np.asarray(local, np.float64), positive, 0.3)
    want = _sum_hinge_ref(v @ t.T, positive, 0.3) + intra + _sum_hinge_ref(np.asarray(local, np.float64), positive, 0.3)
    np.testing.assert_allclose(float(got), want, **TOL)
    hardest = losses.cmc_loss(img, txt, local, margin=0.3, slack=0.1, positive_mask=positive)
    assert float(got) > float(hardest) + 1e-3  # summing over all negatives is a different loss
    with pytest.raises(ValueError, match="negatives"):
        losses.cmc_loss(img, txt, local, negatives="semi_hard")


def test_cmc_shape_errors():
    img, txt = _feats(20), _feats(21)
    with pytest.raises(ValueError, match="local_sim"):
        losses.cmc_loss(img, txt, np.zeros((B, B + 1), np.float32))
    with pytest.raises(ValueError, match="positive_mask"):
        losses.cmc_loss(img, txt, _local(22), positive_mask=np.ones((B, 2), bool))
    with pytest.raises(ValueError, match="image_global"):
        losses.cmc_loss(img[:, :4], txt, _local(22))


def test_shape_errors_name_the_argument():
    img, txt = _feats(23), _feats(24)
    with pytest.raises(ValueError, match="pids"):
        losses.sdm_loss(img, txt, UNIQUE_PIDS[:3])
    with pytest.raises(ValueError, match="text_feats"):
        losses.itc_loss(img, txt[:4])
    with pytest.raises(ValueError, match="labels"):
        losses.mlm_loss(np.zeros((2, 3, 5), np.float32), np.zeros((2, 4), np.int32))


# ----------------------------------------------------------------------------- jit, grad, dtype


def _all_losses(img, txt, pids, local, img_logits, txt_logits):
    mask = losses.positive_mask_from_ids(pids)
    return {
        "sdm": losses.sdm_loss(img, txt, pids),
        "id": losses.id_loss(img_logits, txt_logits, pids),
        "itc": losses.itc_loss(img, txt),
        "cmpm": losses.cmpm_loss(img, txt, pids),
        "cmc": losses.cmc_loss(img, txt, local, positive_mask=mask),
    }


def _inputs():
    rng = np.random.default_rng(25)
    img, txt = _feats(26), _feats(27)
    logits = (rng.standard_normal((2, B, C))).astype(np.float32)
    return img, txt, REPEATED_PIDS, _local(28), logits[0], logits[1]


def test_jit_and_grad_are_finite():
    img, txt, pids, local, il, tl = _inputs()
    eager = _all_losses(img, txt, pids, local, il, tl)

    def total(args):
        return sum(_all_losses(args[0], args[1], pids, args[2], args[3], args[4]).values())

    value, grads = jax.jit(jax.value_and_grad(total))((img, txt, local, il, tl))
    np.testing.assert_allclose(float(value), sum(float(v) for v in eager.values()), **TOL)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.any(np.asarray(g) != 0.0)
    # Zero feature rows do not produce NaN (the normalization is clamped).
    zero = np.zeros_like(img)
    g0 = jax.jit(jax.grad(lambda x: losses.sdm_loss(x, txt, pids)
                          + losses.cmc_loss(x, txt, local)))(zero)
    assert np.all(np.isfinite(np.asarray(g0)))


def test_bf16_inputs_are_computed_in_float32():
    img, txt, pids, local, il, tl = _inputs()
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (img, txt, local, il, tl)]
    rounded = [np.asarray(x.astype(jnp.float32)) for x in bf]
    got = _all_losses(bf[0], bf[1], pids, bf[2], bf[3], bf[4])
    ref = {
        "sdm": _sdm_ref(rounded[0], rounded[1], pids),
        "id": _id_ref(rounded[3], rounded[4], pids),
        "itc": _itc_ref(rounded[0], rounded[1]),
        "cmpm": _cmpm_ref(rounded[0], rounded[1], pids),
        "cmc": _cmc_ref(rounded[0], rounded[1], rounded[2],
                        positive=pids[:, None] == pids[None, :]),
    }
    for name, value in got.items():
        assert value.dtype == jnp.float32, name
        np.testing.assert_allclose(float(value), ref[name], err_msg=name, **TOL)
    logits = jnp.asarray(np.random.default_rng(29).standard_normal((2, 5, 7)), jnp.bfloat16)
    labels = np.array([[0, 3, 0, 6, 0], [1, 0, 0, 0, 2]], np.int32)
    mlm = losses.mlm_loss(logits, labels)
    assert mlm.dtype == jnp.float32
    np.testing.assert_allclose(float(mlm), _mlm_ref(np.asarray(logits.astype(jnp.float32)),
                                                    labels), **TOL)
