"""Tests for xmr_jax.checkpoints: orbax save/restore, keep-N, resharding, preemption flag."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xmr_jax import checkpoints, optim, parallel

needs8 = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (simulated) devices")


def _state(seed=0, classes=16):
    rng = np.random.default_rng(seed)
    params = {
        "enc": {
            "kernel": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
        },
        "classifier": {"kernel": jnp.asarray(rng.normal(size=(64, classes)), jnp.float32)},
    }
    tx, _ = optim.make_optimizer(optim.default_irra_optim_config(), params, steps_per_epoch=10)
    state = optim.create_train_state(params, tx)
    # random values in every leaf (Adam moments, counters, step) so a mix-up cannot pass
    return jax.tree.map(
        lambda x: jnp.asarray(
            rng.integers(0, 100, size=x.shape) if x.dtype == jnp.int32 else rng.normal(size=x.shape), x.dtype
        ),
        state,
    )


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact_latest_and_metadata(tmp_path):
    state = _state()
    ck = checkpoints.Checkpointer(tmp_path, keep=3)
    assert ck.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.restore(state)
    assert ck.save(10, state, metadata={"config": {"lr": 1e-5}})
    assert not ck.save(10, state, force=True)  # an existing step is never overwritten
    ck.wait()
    assert ck.latest_step() == 10
    restored = ck.restore(jax.tree.map(jnp.zeros_like, state))
    _assert_equal(restored, state)
    assert isinstance(restored, optim.TrainState)
    assert ck.restore_metadata() == {"config": {"lr": 1e-5}}
    ck.close()
    # a fresh Checkpointer (new process after preemption) sees and restores the same checkpoint
    ck2 = checkpoints.Checkpointer(tmp_path)
    assert ck2.latest_step() == 10
    _assert_equal(ck2.restore(jax.eval_shape(lambda: state)), state)
    with pytest.raises(FileNotFoundError, match="step 7"):
        ck2.restore(state, step=7)
    ck2.close()


def test_keep_n_and_async_wait(tmp_path):
    ck = checkpoints.Checkpointer(tmp_path, keep=2, async_save=True)
    states = {}
    for step in (1, 2, 3, 4):
        states[step] = _state(seed=step)
        ck.save(step, states[step])
    ck.wait()
    assert ck.all_steps() == [3, 4]
    assert sorted(os.listdir(ck.directory)) == ["3", "4"]
    _assert_equal(ck.restore(states[4]), states[4])
    _assert_equal(ck.restore(states[3], step=3), states[3])
    ck.close()


def test_mismatch_names_parameter_and_shapes(tmp_path):
    with checkpoints.Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(5, _state(classes=16))
        with pytest.raises(
            checkpoints.CheckpointMismatchError,
            match=r"params/classifier/kernel: checkpoint \(64, 16\) vs model \(64, 11\)",
        ):
            ck.restore(_state(classes=11))
        other = _state()
        other = other.replace(params={**other.params, "extra": jnp.zeros(3)})
        with pytest.raises(checkpoints.CheckpointMismatchError, match="params/extra"):
            ck.check_compatible(other)


@needs8
def test_restore_onto_different_sharding(tmp_path):
    one = jax.devices()[0]
    state = jax.device_put(_state(), one)  # saved from a single device
    with checkpoints.Checkpointer(tmp_path) as ck:
        ck.save(3, state)
        ck.wait()
        mesh = parallel.make_mesh(data=2, fsdp=4)
        abstract = jax.eval_shape(lambda: state)
        shardings = parallel.param_shardings(abstract, mesh, "fsdp", min_size=256)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        restored = ck.restore(target)
    _assert_equal(restored, state)
    k = restored.params["enc"]["kernel"]
    assert k.sharding.spec == P(None, "fsdp") and len(k.sharding.device_set) == 8
    assert k.addressable_shards[0].data.shape == (32, 16)
    assert restored.opt_state[1].mu["enc"]["kernel"].sharding.spec == P(None, "fsdp")
    # and back: a sharded state restores onto one device
    with checkpoints.Checkpointer(tmp_path / "b") as ck:
        ck.save(4, restored)
        ck.wait()
        back = ck.restore(
            jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(one)
                ),
                abstract,
            )
        )
    _assert_equal(back, state)
    assert back.params["enc"]["kernel"].sharding.device_set == {one}


def test_sigterm_sets_stop_flag():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    checkpoints.reset_stop()
    try:
        checkpoints.install_signal_handlers()
        assert not checkpoints.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled synchronously in the main thread
        assert checkpoints.should_stop()
        checkpoints.reset_stop()
        os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: flag only, no KeyboardInterrupt
        assert checkpoints.should_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # second Ctrl-C: give up
    finally:
        checkpoints.restore_signal_handlers()
        checkpoints.reset_stop()
    assert {s: signal.getsignal(s) for s in before} == before


@needs8
def test_load_params_without_template(tmp_path):
    s5, s9 = _state(seed=5), _state(seed=9)
    with checkpoints.Checkpointer(tmp_path) as ck:
        ck.save(5, s5)
        ck.save(9, s9)
    for path in (tmp_path, tmp_path / "checkpoints"):
        params, step = checkpoints.load_params(path)
        assert step == 9
        _assert_equal(params, s9.params)
        assert len(params["enc"]["kernel"].sharding.device_set) == 8
    params, step = checkpoints.load_params(tmp_path / "checkpoints" / "5")
    assert step == 5
    _assert_equal(params, s5.params)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, _ = checkpoints.load_params(tmp_path, step=5, sharding=one)
    assert params["enc"]["kernel"].sharding == one
    with pytest.raises(FileNotFoundError, match="step 6"):
        checkpoints.load_params(tmp_path, step=6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.load_params(tmp_path / "nope")
