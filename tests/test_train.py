"""Trainer: loss goes down, 8 devices == 1 device, resume == uninterrupted, SIGTERM, bad configs.

Runs the real train loop (`xmr_jax.train.train`) on deterministic synthetic numpy batches with a
tiny IRRA (sdm+id+mlm), so these tests need no TensorFlow.
"""

import os
import signal

import jax
import numpy as np
import pytest

from tests.train_fixtures import flat_params, iterator_from, tiny_config
from xmr_jax import checkpoints, train


def test_loss_decreases(tmp_path):
    config = tiny_config()
    config.num_epochs = 1
    config.log_every = 1
    pulled = []
    result = train.train(config, str(tmp_path), lambda s: iterator_from(s, pulled.append), steps_per_epoch=30)
    # batches are placed one step ahead, but never one beyond the last step
    assert pulled == list(range(1, 31))
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in open(tmp_path / "metrics.jsonl") if '"split": "train"' in line]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert int(result.state.step) == 30
    assert (tmp_path / "tensorboard").is_dir()


def test_eight_devices_equal_one_device(tmp_path):
    assert jax.device_count() == 8
    config = tiny_config()
    config.num_epochs = 1
    # IRRA's Adam eps (1e-3) keeps near-zero gradients from being blown up to +-lr by Adam's
    # normalization, so the comparison sees only the float32 rounding of the reductions.
    config.optim.eps = 1e-3
    one = train.train(config, str(tmp_path / "one"), iterator_from, steps_per_epoch=2, devices=jax.devices()[:1])
    eight = train.train(config, str(tmp_path / "eight"), iterator_from, steps_per_epoch=2)
    assert len(jax.tree.leaves(eight.state.params)[0].sharding.device_set) == 8
    # Same math, different reduction order across devices: float32 rounding only.
    np.testing.assert_allclose(flat_params(one.state), flat_params(eight.state), rtol=1e-4, atol=2e-6)


def test_resume_equals_uninterrupted(tmp_path):
    config = tiny_config()
    full = train.train(config, str(tmp_path / "full"), iterator_from, steps_per_epoch=4)

    def stop_at_5(step):
        if step == 5:
            checkpoints.request_stop()

    part_dir = str(tmp_path / "part")
    pulled = []
    first = train.train(config, part_dir, lambda s: iterator_from(s, lambda i: (pulled.append(i), stop_at_5(i))),
                        steps_per_epoch=4)
    # Batch 5 is pulled (stop requested) while step 4 runs; step 5 is the step running when the
    # stop is seen: it is the one saved, and no batch is pulled beyond it.
    assert first.stopped and int(first.state.step) == 5
    assert pulled == [1, 2, 3, 4, 5]
    assert checkpoints.Checkpointer(part_dir).all_steps() == [2, 4, 5]
    resumed = train.train(config, part_dir, iterator_from, steps_per_epoch=4)
    assert not resumed.stopped and int(resumed.state.step) == 8
    np.testing.assert_allclose(flat_params(full.state), flat_params(resumed.state), rtol=1e-6, atol=1e-7)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    def sigterm_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config()
    result = train.train(config, str(tmp_path), lambda s: iterator_from(s, sigterm_at_3), steps_per_epoch=4)
    assert result.stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert checkpoints.Checkpointer(str(tmp_path)).latest_step() == 3  # not only at log steps
    resumed = train.train(config, str(tmp_path), iterator_from, steps_per_epoch=4)
    assert int(resumed.state.step) == 8


def test_stop_before_the_first_step_saves_nothing(tmp_path):
    pulled = []
    checkpoints.request_stop()  # e.g. SIGTERM while the step was compiling
    result = train.train(tiny_config(), str(tmp_path), lambda s: iterator_from(s, pulled.append), steps_per_epoch=4)
    assert result.stopped and int(result.state.step) == 0 and pulled == []
    assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == []
    assert not checkpoints.stop_requested()  # the flag does not leak into the next run


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poisoned(start):
        for step, batch in enumerate(iterator_from(start), start=start + 1):
            if step >= 5:
                batch["images"] = np.full_like(batch["images"], np.nan)
            yield batch

    config = tiny_config()
    config.async_checkpoints = True  # the message waits for the pending save before it tells
    with pytest.raises(train.TrainingDiverged, match="NaN/Inf between steps 5 and 6.*last good checkpoint is step 4 in "):
        train.train(config, str(tmp_path), poisoned, steps_per_epoch=4)
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 4


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    def poisoned(start):
        for batch in iterator_from(start):
            batch["images"] = np.full_like(batch["images"], np.nan)
            yield batch

    with pytest.raises(train.TrainingDiverged) as err:
        train.train(tiny_config(), str(tmp_path), poisoned, steps_per_epoch=4)
    assert "No checkpoint was written" in str(err.value) and "last good" not in str(err.value)
    assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == []


def test_nonfinite_step_keeps_params_and_optimizer_state():
    """A NaN loss leaves params and opt_state bit for bit; step and the nonfinite count advance."""
    import optax

    from xmr_jax import optim
    from xmr_jax.models.families import get_family

    from tests.train_fixtures import batch_for_step

    config = tiny_config()
    config.optim.eps = 1e-3  # as the other exactness tests: no blow-up of near-zero gradients
    family = get_family(config.model_family)
    model = family.build(config)
    params = train.init_params(model, config, config.data.image_size, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=4)
    step = jax.jit(train.make_train_step(model, family.losses, tx, config))
    state, _ = step(train.create_train_state(params, tx), batch_for_step(1))
    bad = batch_for_step(2)
    bad["images"] = np.full_like(bad["images"], np.nan)
    after, metrics = step(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(state.step) + 1 == 2
    assert int(after.nonfinite) == int(state.nonfinite) + 1 == 1
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A finite step does update (and matches the plain, unguarded optax update).
    good, _ = step(state, batch_for_step(2))
    assert int(good.nonfinite) == 0

    @jax.jit
    def plain(state, batch):
        grads = jax.grad(lambda p: family.losses(model.apply({"params": p}, batch), batch, config)[0])(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    want, opt_state = plain(state, batch_for_step(2))
    for a, b in zip(jax.tree.leaves((want, opt_state)), jax.tree.leaves((good.params, good.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert not np.array_equal(flat_params(state), flat_params(good))


@pytest.mark.parametrize("field,value,message", [
    ("loss_names", "sdm+foo", "config.loss_names='sdm\\+foo'.*unknown loss \\['foo'\\]"),
    ("batch_size", 12, "config.batch_size=12 must be a positive multiple of the number of devices in the mesh \\(8"),
    ("precision", "fp8", "config.precision='fp8'"),
    ("model_family", "bert", "config.model_family='bert'"),
])
def test_bad_config_names_the_field(field, value, message):
    config = tiny_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        train.validate_config(config)


def test_missing_init_checkpoint_names_the_field(tmp_path):
    config = tiny_config()
    config.model.init_checkpoint = str(tmp_path / "ViT-B-16.pt")
    with pytest.raises(FileNotFoundError, match="config.model.init_checkpoint=.*ViT-B-16.pt.*does not exist"):
        train.validate_config(config)
