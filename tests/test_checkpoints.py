"""Tests for xmr_jax.checkpoints: the trainer's own state (xmr_jax.train.TrainState of a tiny IRRA)
saved and restored exactly, keep-N, resharding, the reader (find_checkpoint / load_params /
save_params), preemption flag."""

import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_fixtures import tiny_config
from xmr_jax import checkpoints, optim, parallel, train
from xmr_jax.models.families import get_family

needs8 = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (simulated) devices")


@functools.lru_cache(maxsize=None)
def _trainer_init(classes: int):
    """The trainer's own state (xmr_jax.train.init_train_state) of a tiny IRRA, on one device."""
    config = tiny_config(num_classes=classes)
    model = get_family(config.model_family).build(config)
    tx, _ = optim.make_optimizer(config.optim, train.abstract_params(model, config), steps_per_epoch=10)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, _ = train.init_train_state(model, config, tx, mesh, jax.random.PRNGKey(0))
    return state


def _state(seed=0, classes=16):
    """The state the trainer saves (train.TrainState: step, params, Adam state, nonfinite), with
    random values in every leaf (moments, counters, step) so that a mix-up cannot pass."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(
            rng.integers(0, 100, size=x.shape) if x.dtype == jnp.int32 else rng.normal(size=x.shape), x.dtype
        ),
        _trainer_init(classes),
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
    assert isinstance(restored, train.TrainState)
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
            match=r"params/classifier/kernel: checkpoint \(32, 16\) vs model \(32, 11\)",
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
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    k = restored.params["classifier"]["kernel"]  # [32, 16]: split 4 ways over "fsdp"
    assert "fsdp" in k.sharding.spec and len(k.sharding.device_set) == 8
    assert k.addressable_shards[0].data.size == k.size // 4
    assert restored.opt_state[1].mu["classifier"]["kernel"].sharding == k.sharding
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
    assert all(x.sharding.device_set == {one} for x in jax.tree.leaves(back))


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
        assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))
    params, step = checkpoints.load_params(tmp_path / "checkpoints" / "5")
    assert step == 5
    _assert_equal(params, s5.params)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, _ = checkpoints.load_params(tmp_path, step=5, sharding=one)
    assert all(x.sharding == one for x in jax.tree.leaves(params))
    with pytest.raises(FileNotFoundError, match="step 6"):
        checkpoints.load_params(tmp_path, step=6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.load_params(tmp_path / "nope")


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_reader_resolves_paths_names_the_flag_and_writes_nothing(tmp_path):
    s4 = _state(seed=4)
    with checkpoints.Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(2, _state(seed=2))
        ck.save(4, s4, metadata={"note": "x"})
    # an unfinished save of a killed run is not a step, even though it holds a state folder
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-12" / "state").mkdir(parents=True)
    before = _listing(tmp_path)
    where = str(tmp_path / "checkpoints")
    for path in (tmp_path, tmp_path / "checkpoints"):
        assert checkpoints.find_checkpoint(path) == (os.path.join(where, "4"), 4)
    assert checkpoints.find_checkpoint(tmp_path, step=2) == (os.path.join(where, "2"), 2)
    assert checkpoints.find_checkpoint(tmp_path / "checkpoints" / "2") == (os.path.join(where, "2"), 2)
    params, step = checkpoints.load_params(tmp_path, host=True)  # numpy on the host, no devices
    assert step == 4 and all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    _assert_equal(params, s4.params)
    with pytest.raises(FileNotFoundError, match=r"^--checkpoint=.*: no checkpoint for step 6 in .*saved steps: \[2, 4\]"):
        checkpoints.find_checkpoint(tmp_path, step=6, flag="--checkpoint")
    with pytest.raises(FileNotFoundError, match=r"^--workdir=.*nope does not exist: expected a training workdir"):
        checkpoints.load_params(tmp_path / "nope", flag="--workdir")
    with pytest.raises(ValueError, match="is step 2, but step 4 was requested"):
        checkpoints.load_params(tmp_path / "checkpoints" / "2", step=4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file: expected a training workdir"):
        checkpoints.find_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint found in .*empty: expected step folders <step>/state"):
        checkpoints.find_checkpoint(tmp_path / "empty")
    assert _listing(tmp_path) == before + ["empty", "file"]  # reading created or removed nothing
    with checkpoints.Checkpointer(tmp_path) as ck:  # what the trainer resumes from is the same step
        assert ck.latest_step() == 4 and ck.restore_metadata() == {"note": "x"}


def test_save_params_round_trip(tmp_path):
    params = _state(seed=3).params
    step_dir = checkpoints.save_params(tmp_path / "out", params)
    assert step_dir == str(tmp_path / "out" / "checkpoints" / "0")
    for path in (tmp_path / "out", tmp_path / "out" / "checkpoints", step_dir):
        assert checkpoints.is_checkpoint_path(path)
    assert not checkpoints.is_checkpoint_path(tmp_path)
    loaded, step = checkpoints.load_params(tmp_path / "out", host=True)
    assert step == 0
    _assert_equal(loaded, params)
    with pytest.raises(FileExistsError, match="already holds checkpoint step 0"):
        checkpoints.save_params(tmp_path / "out", params)
    with checkpoints.Checkpointer(tmp_path / "out", async_save=False) as ck:
        ck.save(1, {"step": np.int32(1)})  # a state without params
    with pytest.raises(checkpoints.CheckpointMismatchError, match="has no 'params' entry"):
        checkpoints.load_params(tmp_path / "out")
