"""Gradient caching (xmr_jax.grad_cache): the micro-batched step is the full-batch step.

Tolerance (float32): every gradient entry of the micro-batched step is within GRAD_TOL x the
largest full-batch gradient entry, and the loss and its parts within LOSS_RTOL; the only
difference is the order of float32 sums (the parameter gradient is a sum over micro-batches, and
a micro-batch's text pass may run on a shorter length bucket). Measured on the demo towers:
7e-8 (sdm+id) and 1.5e-7 (sdm+id+mlm) with 4 micro-batches on one device, 2.4e-6 on 8 devices.

Cases: IRRA on the configs/demo.py towers (ViT 8x8 patches on 64x32, width 128, 3 layers; text
width 128, 3 layers, 48 tokens), batch 16, for sdm+id and sdm+id+mlm (MLM per micro-batch,
sparse chunks), on one device (4 micro-batches of 4) and on the 8 simulated devices of
tests/conftest.py (mesh data=4 x fsdp=2, sharded parameters, micro_batch_size=1: 2 micro-batches
per device) through `grad_cache.grad_fn_from_config`, as the trainer builds it; TGDT's CMC on the
tiny towers; the trainer end to end (train.train with config.micro_batch_size equals train.train
without); the config errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from tests import train_fixtures
from tests.test_tgdt import duplicate_batch, tiny_tgdt_config
from xmr_jax import grad_cache, parallel, train
from xmr_jax.models import families
from xmr_jax.models.families import get_family

GRAD_TOL = 2e-5  # max |g_micro - g_full| / max |g_full|
LOSS_RTOL = 1e-5
DEMO_BATCH = 16
DEMO_CONTEXT = 48


def demo_batch(seed: int = 0, b: int = DEMO_BATCH) -> dict:
    """A batch for the demo towers: images float32 [b,64,32,3]; captions of 4-40 tokens (so
    micro-batches pick different text length buckets) with ~25% MLM targets; pids with repeats."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, DEMO_CONTEXT), np.int32)
    ids[:, 0] = 49406
    for i, n in enumerate(rng.integers(4, 40, size=b)):
        ids[i, 1:n] = rng.integers(1, 5000, size=n - 1)
        ids[i, n] = 49407
    words = (ids > 0) & (ids < 49406)
    labels = np.where(words & (rng.random(ids.shape) < 0.25), ids, 0).astype(np.int32)
    labels[np.arange(b), 1] = ids[:, 1]  # at least one target per caption
    mlm_ids = np.where(labels > 0, 49405, ids).astype(np.int32)
    pids = rng.integers(0, b // 2, size=b).astype(np.int32)
    return {"images": rng.standard_normal((b, 64, 32, 3)).astype(np.float32), "text_ids": ids,
            "mlm_ids": mlm_ids, "mlm_labels": labels, "pids": pids, "image_ids": np.arange(b, dtype=np.int32)}


def demo_config(loss_names: str):
    config = demo.get_config(f"loss_names={loss_names},batch_size={DEMO_BATCH}")
    config.num_classes = DEMO_BATCH // 2
    return config


def _step_result(step_fn, state, batch):
    """(metrics, gradient) of one step with tx = sgd(1): the gradient is old - new params."""
    new_state, metrics = step_fn(state, batch)
    grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                         jax.device_get(state.params), jax.device_get(new_state.params))
    return jax.device_get(metrics), np.concatenate([g.ravel() for g in jax.tree.leaves(grads)])


def assert_same_step(got, want):
    (m_got, g_got), (m_want, g_want) = got, want
    for key in m_want:
        if key != "grad_norm":
            np.testing.assert_allclose(m_got[key], m_want[key], rtol=LOSS_RTOL, err_msg=key)
    err = np.max(np.abs(g_got - g_want)) / np.max(np.abs(g_want))
    assert err <= GRAD_TOL, f"max gradient difference {err:.2e} of the largest entry (> {GRAD_TOL})"
    np.testing.assert_allclose(m_got["grad_norm"], m_want["grad_norm"], rtol=GRAD_TOL)
    return err


def _temp_bytes(compiled) -> int | None:
    mem = parallel.memory_per_device(compiled)
    return None if mem is None else mem["temp"]


# Three demo-tower programs compiled per case (~1-2 min each on 2 busy cores).
@pytest.mark.slow
@pytest.mark.parametrize("loss_names", ["sdm+id", "sdm+id+mlm"])
def test_demo_towers_micro_batched_step_equals_full_batch_step(loss_names):
    config = demo_config(loss_names)
    family = get_family("irra")
    model = family.build(config)
    loss_fn = family.loss_fn(config)
    tx = optax.sgd(1.0)
    params = train.init_params(model, config, jax.random.PRNGKey(0))
    state = train.create_train_state(params, tx)
    batch = jax.tree.map(jnp.asarray, demo_batch())
    one_device = jax.devices()[0]
    state, batch = jax.device_put((state, batch), one_device)

    full = jax.jit(train.make_train_step(model, loss_fn, tx)).lower(state, batch).compile()
    want = _step_result(full, state, batch)

    # One device, 4 micro-batches of 4.
    grad_fn = grad_cache.make_grad_fn(model, loss_fn, family.micro_batch_outputs(config), n_micro=4)
    micro = jax.jit(train.make_train_step(model, loss_fn, tx, grad_fn)).lower(state, batch).compile()
    err = assert_same_step(_step_result(micro, state, batch), want)
    print(f"{loss_names}: one device, 4 micro-batches: max gradient difference {err:.1e} of the largest entry")
    # The micro-batched program keeps fewer temporaries (activations of 4 examples, not 16).
    t_full, t_micro = _temp_bytes(full), _temp_bytes(micro)
    if t_full is not None:
        print(f"{loss_names}: temporaries {t_full / 2**20:.1f} MiB full batch, {t_micro / 2**20:.1f} MiB micro-batched")
        assert t_micro < t_full

    # 8 devices (data=4 x fsdp=2, FSDP-sharded parameters), as train.train builds the step:
    # micro_batch_size=1 of a per-device batch of 2.
    config.mesh.data, config.mesh.fsdp, config.mesh.strategy = 4, 2, "fsdp"
    config.micro_batch_size = 1
    train.validate_config(config)
    mesh = parallel.make_mesh(4, 2)
    shardings = parallel.param_shardings(jax.eval_shape(lambda s: s, state), mesh, "fsdp")
    batch_sh = parallel.batch_sharding(mesh)
    grad_fn = grad_cache.grad_fn_from_config(model, family, config, mesh)
    assert grad_fn is not None
    sharded = jax.jit(train.make_train_step(model, loss_fn, tx, grad_fn), in_shardings=(shardings, batch_sh),
                      out_shardings=(shardings, None))
    state8 = jax.device_put(state, shardings)
    batch8 = jax.device_put(batch, batch_sh)
    assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in jax.tree.leaves(state8.params))
    err = assert_same_step(_step_result(sharded, state8, batch8), want)
    print(f"{loss_names}: 8 devices, 2 micro-batches each: max gradient difference {err:.1e} of the largest entry")


def test_tgdt_cmc_micro_batched_step_equals_full_batch_step():
    config = tiny_tgdt_config()
    family = get_family("tgdt")
    model = family.build(config)
    loss_fn = family.loss_fn(config)
    tx = optax.sgd(1.0)
    state = train.create_train_state(train.init_params(model, config, jax.random.PRNGKey(1)), tx)
    batch = jax.tree.map(jnp.asarray, duplicate_batch(seed=3, n_images=4, per_image=2))  # image-id positives
    full = jax.jit(train.make_train_step(model, loss_fn, tx))
    grad_fn = grad_cache.make_grad_fn(model, loss_fn, family.micro_batch_outputs(config), n_micro=4)
    micro = jax.jit(train.make_train_step(model, loss_fn, tx, grad_fn))
    want = _step_result(full, state, batch)
    assert want[0]["cmc_loss"] > 0
    assert_same_step(_step_result(micro, state, batch), want)

    # Negative control: plain gradient accumulation (CMC within each micro-batch of 2, averaged)
    # trains another objective, and the comparison above tells it apart.
    def accumulated(params, batch):
        def one(mb):
            return jax.value_and_grad(lambda p: loss_fn(model.apply({"params": p}, mb), mb), has_aux=True)(params)

        (loss, parts), grads = jax.lax.map(one, grad_cache.split_batch(batch, n_micro=4, shards=1))
        return (loss.mean(), jax.tree.map(lambda x: x.mean(0), parts)), jax.tree.map(lambda g: g.mean(0), grads)

    naive = jax.jit(train.make_train_step(model, loss_fn, tx, accumulated))
    with pytest.raises(AssertionError):
        assert_same_step(_step_result(naive, state, batch), want)


@pytest.mark.slow
def test_trainer_with_micro_batch_size_equals_trainer_without(tmp_path):
    """train.train (8 devices, global batch 16, sdm+id+mlm on the tiny towers, 2 Adam steps) with
    config.micro_batch_size=1 ends with the parameters of the full-batch run."""
    def run(name, micro):
        config = train_fixtures.tiny_config(loss_names="sdm+id+mlm", batch_size=16, num_epochs=1)
        config.optim.eps = 1e-3  # Adam's first steps divide by |g|: keep rounding from being amplified
        config.ckpt_every_steps = 10 ** 6
        config.param_table = False
        config.micro_batch_size = micro
        train.validate_config(config)
        return train.train(config, str(tmp_path / name),
                           lambda start: train_fixtures.iterator_from(start, batch_size=16), steps_per_epoch=2)

    want, got = run("full", 0), run("micro", 1)
    assert int(got.state.step) == 2
    np.testing.assert_allclose(train_fixtures.flat_params(got.state), train_fixtures.flat_params(want.state),
                               rtol=1e-4, atol=2e-6)


def test_micro_batches_off_on_and_errors():
    config = train_fixtures.tiny_config(batch_size=64)  # 8 per device on the 8 test devices
    assert grad_cache.micro_batches(config, 8) == 0  # unset (0)
    config.micro_batch_size = 8
    assert grad_cache.micro_batches(config, 8) == 0  # the whole per-device batch: the plain step
    config.micro_batch_size = 2
    assert grad_cache.micro_batches(config, 8) == 4
    train.validate_config(config)
    config.micro_batch_size = 3
    with pytest.raises(ValueError, match=r"^config.micro_batch_size=3 must be a positive integer dividing the "
                                         r"per-device batch 8 \(config.batch_size=64 over 8 devices\)$"):
        train.validate_config(config)
    config.micro_batch_size = -2
    with pytest.raises(ValueError, match="config.micro_batch_size=-2"):
        train.validate_config(config)


def test_family_without_micro_batch_outputs_is_refused():
    toy = families.register(train_fixtures.ToyFamily())
    try:
        config = train_fixtures.tiny_config(model_family="toy", batch_size=16)
        config.model.toy_width, config.model.toy_scale = 4, 1.0
        config.micro_batch_size = 1
        with pytest.raises(ValueError, match="config.micro_batch_size=1: model family 'toy' does not support "
                                             "micro-batches"):
            train.validate_config(config)
        mesh = parallel.make_mesh(-1, 1)
        with pytest.raises(ValueError, match="model family 'toy' does not support micro-batches"):
            grad_cache.grad_fn_from_config(toy.build(config), toy, config, mesh)
    finally:
        families.unregister("toy")
    with pytest.raises(ValueError, match="micro_batch_outputs must map output names to one of"):
        grad_cache.check_kinds({"image": "mean"}, "toy")


def test_split_and_merge_keep_batch_order_and_device_shares():
    x = jnp.arange(24).reshape(24, 1)
    micro = grad_cache.split_batch({"x": x}, n_micro=3, shards=4)["x"]
    assert micro.shape == (3, 8, 1)
    # micro-batch 1 = rows 2..3 of each device's 6-row share
    np.testing.assert_array_equal(micro[1, :, 0], [2, 3, 8, 9, 14, 15, 20, 21])
    np.testing.assert_array_equal(grad_cache.merge_rows(micro, shards=4), x)
