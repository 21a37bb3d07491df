"""Tests for xmr_jax.optim: IRRA parameter groups, schedules, coupled-L2 Adam, AdamW, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xmr_jax import optim


def _irra_like_params():
    """A small tree with IRRA-style names (values are arbitrary but fixed)."""
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {
        "params": {
            "base_model": {
                "visual": {
                    "conv1": {"kernel": f(2, 2, 3, 4)},
                    "ln_post": {"scale": f(4), "bias": f(4)},
                    "proj": f(4, 3),
                },
                "text": {
                    "token_embedding": {"embedding": f(5, 3)},
                    "transformer": {"resblocks_0": {"attn": {"q_proj": {"kernel": f(3, 3), "bias": f(3)}}}},
                },
            },
            "cross_attn": {"out_proj": {"kernel": f(3, 3), "bias": f(3)}},
            "cross_modal_transformer": {"resblocks_0": {"mlp": {"c_fc": {"kernel": f(3, 6)}}}},
            "ln_pre_t": {"scale": f(3), "bias": f(3)},
            "ln_post": {"scale": f(3), "bias": f(3)},
            "mlm_head": {"dense": {"kernel": f(3, 3), "bias": f(3)}, "ln": {"scale": f(3)}},
            "classifier": {"kernel": f(3, 7), "bias": f(7)},
        }
    }


# Expected (lr, wd) per path name under IRRA's parameter groups (base lr 1e-5, wd 4e-5).
EXPECTED = {
    "params/base_model/visual/conv1/kernel": (1e-5, 4e-5),
    "params/base_model/visual/ln_post/scale": (1e-5, 4e-5),
    "params/base_model/visual/ln_post/bias": (2e-5, 0.0),
    "params/base_model/visual/proj": (1e-5, 4e-5),
    "params/base_model/text/token_embedding/embedding": (1e-5, 4e-5),
    "params/base_model/text/transformer/resblocks_0/attn/q_proj/kernel": (1e-5, 4e-5),
    "params/base_model/text/transformer/resblocks_0/attn/q_proj/bias": (2e-5, 0.0),
    "params/cross_attn/out_proj/kernel": (5e-5, 4e-5),
    "params/cross_attn/out_proj/bias": (2e-5, 0.0),
    "params/cross_modal_transformer/resblocks_0/mlp/c_fc/kernel": (5e-5, 4e-5),
    "params/ln_pre_t/scale": (1e-5, 4e-5),
    "params/ln_pre_t/bias": (2e-5, 0.0),
    "params/ln_post/scale": (1e-5, 4e-5),
    "params/ln_post/bias": (2e-5, 0.0),
    "params/mlm_head/dense/kernel": (5e-5, 4e-5),
    "params/mlm_head/dense/bias": (5e-5, 0.0),
    "params/mlm_head/ln/scale": (5e-5, 4e-5),
    "params/classifier/kernel": (5e-5, 4e-5),
    "params/classifier/bias": (5e-5, 0.0),
}


def _flat(tree):
    names = jax.tree.leaves(optim.param_path_names(tree))
    return dict(zip(names, jax.tree.leaves(tree)))


def _spec_factor(e, warmup=5, total=60, wf=0.1):
    if e < warmup:
        return wf + (1 - wf) * e / warmup
    return 0.5 * (1 + math.cos(math.pi * (e - warmup) / (total - warmup)))


def test_group_table_matches_spec_at_several_steps():
    cfg = optim.default_irra_optim_config()
    params = _irra_like_params()
    assert set(_flat(params)) == set(EXPECTED)
    # what make_optimizer builds the update from: per-parameter lr multipliers and weight decays
    # (the parameter groups) and the schedule factor; effective lr = lr * multiplier * factor
    mults, wds = map(_flat, optim.param_group_trees(cfg, params))
    spe = 7
    schedule = optim.schedule_factor(cfg, spe)
    for step in (0, 6, 7, 34, 35, 36 * 7 + 3, 59 * 7 + 6):
        lrs = {name: cfg.lr * m * float(schedule(step)) for name, m in mults.items()}
        f = _spec_factor(step // spe)
        for name, (lr, wd) in EXPECTED.items():
            # float32 schedule: factor exact to 1e-6 absolute
            assert lrs[name] == pytest.approx(lr * f, rel=1e-6, abs=lr * 1e-6), (name, step)
            assert wds[name] == wd, name


def test_rules_from_mappings_and_override_order():
    cfg = optim.default_irra_optim_config()
    cfg.param_groups = [
        {"contains": "bias", "weight_decay": 0.0, "lr_mult": 3.0},
        {"contains": ["kernel"], "lr_mult": 0.5},
    ]
    mults, wds = optim.param_group_trees(cfg, {"a": {"kernel": 1.0, "bias": 1.0, "scale": 1.0}})
    assert mults == {"a": {"kernel": 0.5, "bias": 3.0, "scale": 1.0}}
    assert wds == {"a": {"kernel": 4e-5, "bias": 0.0, "scale": 4e-5}}
    with pytest.raises(ValueError, match="param_groups\\[0\\]"):
        optim.parse_group_rules([("bias", 2.0)])
    with pytest.raises(ValueError, match="unknown"):
        optim.parse_group_rules([{"contains": "x", "lr": 1.0}])


def test_epoch_schedule_equals_formula_epochs_0_to_59():
    cfg = optim.default_irra_optim_config()
    spe = 10
    factor = optim.schedule_factor(cfg, spe)
    steps = np.arange(60 * spe)
    got = np.asarray(jax.jit(jax.vmap(factor))(steps))
    want = np.array([_spec_factor(s // spe) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Spot values of IRRA's warmup (factor 0.1, 5 epochs): epoch 0 -> 0.1, epoch 4 -> 0.82, epoch 5 -> 1.0.
    np.testing.assert_allclose(got[[0, 4 * spe, 5 * spe]], [0.1, 0.82, 1.0], rtol=1e-6)
    _, lr_fn = optim.make_optimizer(cfg, {"w": jnp.zeros(2)}, spe)
    assert float(lr_fn(5 * spe)) == pytest.approx(1e-5, rel=1e-6)


def test_step_schedules():
    cfg = optim.default_irra_optim_config()
    cfg.schedule = "step_warmup_cosine"
    spe = 4
    f = optim.schedule_factor(cfg, spe)
    for s in (0, 1, 3, 19, 20, 21, 100, 239):
        e = s / spe
        want = 0.1 + 0.9 * e / 5 if e < 5 else 0.5 * (1 + math.cos(math.pi * (e - 5) / 55))
        assert float(f(s)) == pytest.approx(want, rel=1e-5, abs=1e-7), s
    cfg = optim.default_tgdt_optim_config()
    f = optim.schedule_factor(cfg, spe)
    for s, want in ((0, 1.0), (79, 1.0), (80, 0.1), (159, 0.1), (160, 0.01), (239, 0.01)):
        assert float(f(s)) == pytest.approx(want, rel=1e-6), s
    cfg.warmup_steps = 10
    f = optim.schedule_factor(cfg, spe)
    assert float(f(0)) == pytest.approx(0.1)
    assert float(f(5)) == pytest.approx(0.55)
    assert float(f(10)) == pytest.approx(1.0)
    cfg.schedule = "constant"
    cfg.warmup_steps = 0
    assert float(optim.schedule_factor(cfg, spe)(12345)) == 1.0


def test_bad_config_errors():
    cfg = optim.default_irra_optim_config()
    cfg.schedule = "linear"
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optim.schedule_factor(cfg, 10)
    cfg = optim.default_irra_optim_config()
    cfg.name = "sgd"
    with pytest.raises(ValueError, match="config.optim.name"):
        optim.make_optimizer(cfg, {"w": jnp.zeros(2)}, 10)
    cfg = optim.default_irra_optim_config()
    cfg.warmup_epochs = 60
    with pytest.raises(ValueError, match="warmup_epochs"):
        optim.schedule_factor(cfg, 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.schedule_factor(optim.default_irra_optim_config(), 0)


def _numpy_adam_l2(params, grads_seq, lrs, wds, b1, b2, eps, clip=None):
    """Reference: torch.optim.Adam semantics with weight_decay (coupled L2), per-parameter lr/wd."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr_factor) in enumerate(grads_seq, start=1):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        if clip is not None:
            norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
            if norm > clip:
                g = {k: x * clip / norm for k, x in g.items()}
        for k in p:
            gk = g[k] + wds[k] * p[k]
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            mhat = m[k] / (1 - b1**t)
            vhat = v[k] / (1 - b2**t)
            p[k] = p[k] - lrs[k] * lr_factor * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("clip", [None, 0.5])
def test_adam_l2_matches_numpy(clip):
    cfg = optim.default_irra_optim_config()
    cfg.lr = 1e-2  # large enough that a wrong group/decay is visible at 1e-6
    cfg.weight_decay = 0.5
    cfg.grad_clip = clip
    cfg.eps = 1e-3
    rng = np.random.default_rng(1)
    params = {
        "enc": {
            "kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        },
        "cross_attn": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)},
        "classifier": {"bias": rng.normal(size=(2,)).astype(np.float32)},
    }
    spe = 1
    tx, _ = optim.make_optimizer(cfg, params, spe)
    p = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(p)

    @jax.jit
    def step(p, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    grads_seq = []
    for t in range(3):
        g = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        p, opt_state = step(p, opt_state, jax.tree.map(jnp.asarray, g))
        grads_seq.append((_flat(g), _spec_factor(t)))
    flat_p = _flat(params)
    lrs = {
        k: 1e-2 * {"enc/kernel": 1, "enc/bias": 2, "cross_attn/kernel": 5, "classifier/bias": 5}[k]
        for k in flat_p
    }
    wds = {"enc/kernel": 0.5, "enc/bias": 0.0, "cross_attn/kernel": 0.5, "classifier/bias": 0.0}
    want = _numpy_adam_l2(flat_p, grads_seq, lrs, wds, 0.9, 0.999, 1e-3, clip)
    got = _flat(jax.device_get(p))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
    # the bias with wd = 0 moved exactly as plain Adam (its decay term is absent): check by
    # re-running the reference with a non-zero bias wd and seeing a difference.
    wds_bad = dict(wds, **{"enc/bias": 0.5})
    bad = _numpy_adam_l2(flat_p, grads_seq, lrs, wds_bad, 0.9, 0.999, 1e-3, clip)
    assert np.abs(bad["enc/bias"] - got["enc/bias"]).max() > 1e-4


def test_adamw_is_decoupled():
    cfg = optim.default_irra_optim_config()
    cfg.name = "adamw"
    cfg.schedule = "constant"
    cfg.lr = 0.1
    cfg.weight_decay = 0.1
    cfg.param_groups = []
    p = {"w": jnp.array([2.0, -1.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    tx, _ = optim.make_optimizer(cfg, p, 1)
    upd, _ = tx.update(g, tx.init(p), p)
    # first Adam step direction is g / (|g| + eps); decay 0.1 * p added after Adam, times lr.
    adam = np.array([0.5, 0.25]) / (np.array([0.5, 0.25]) + 1e-3)
    want = -0.1 * (adam + 0.1 * np.array([2.0, -1.0]))
    # optax computes the bias correction 1 - b2**t in float32 (~1e-5 relative on 1 - 0.999)
    np.testing.assert_allclose(np.asarray(upd["w"]), want, rtol=0, atol=1e-6)
    # coupled decay would give a different answer: (g + wd p) / |g + wd p| = +-1 per element
    coupled = -0.1 * np.sign(np.array([0.5, 0.25]) + 0.1 * np.array([2.0, -1.0]))
    assert np.abs(np.asarray(upd["w"]) - coupled).max() > 1e-2


def test_works_on_abstract_params_and_eval_shape():
    cfg = optim.default_irra_optim_config()
    params = _irra_like_params()
    abstract = jax.eval_shape(lambda: params)
    tx, _ = optim.make_optimizer(cfg, abstract, 10)
    abstract_state = jax.eval_shape(tx.init, params)  # the trainer's jax.eval_shape(init) path
    concrete = tx.init(params)
    assert jax.tree.structure(abstract_state) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(concrete)):
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (c.shape, c.dtype)
