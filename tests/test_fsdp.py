"""FSDP: the real trainer with mesh.strategy="fsdp" equals pure data parallelism, and shards params.

8 simulated CPU devices (tests/conftest.py). Tiny IRRA (sdm+id) from tests/train_fixtures.py,
2 optimizer steps with IRRA's Adam eps (1e-3). Meshes: data=8 fsdp=1 with strategy "data"
(reference), data=1 fsdp=8 and data=2 fsdp=4 with strategy "fsdp". The only expected difference is
the float32 reduction order of the gathered/scattered gradients.

Sharded initialization (data=1 fsdp=8): every program the init runs (train.init_train_state and
train.train up to its first step) is compiled and inspected by _JitSpy: no argument or output is a
full copy of a large leaf on any device, and outputs + temporaries per device stay below the full
parameter bytes (XLA memory_analysis); CLIP weights from model.init_checkpoint are read from the
host slice by slice; resume restores straight into the shardings. The old path (jit(model.init)
with no out_shardings, then jit(create_train_state)) fails these checks (negative control).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.test_parallel import _RecordedReads
from tests.train_fixtures import flat_params, iterator_from, tiny_config
from xmr_jax import optim, parallel, train
from xmr_jax.models.families import get_family

RTOL, ATOL = 1e-4, 2e-6  # float32 reduction-order rounding after 2 Adam steps (as tests/test_train.py)


def _train(tmp_path, name, strategy, data, fsdp, train_iter_fn=iterator_from):
    config = tiny_config()
    config.num_epochs = 1
    config.optim.eps = 1e-3
    config.ckpt_every_steps = 10 ** 6  # final checkpoint only
    config.mesh.strategy, config.mesh.data, config.mesh.fsdp = strategy, data, fsdp
    return train.train(config, str(tmp_path / name), train_iter_fn, steps_per_epoch=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    assert jax.device_count() == 8
    return _train(tmp_path_factory.mktemp("data"), "data", "data", 8, 1)


# Each case trains twice (~40 s per training on 2 shared cores): the HSDP 2x4 mesh runs with -m slow.
@pytest.mark.parametrize("data,fsdp", [(1, 8), pytest.param(2, 4, marks=pytest.mark.slow)])
def test_fsdp_equals_data_parallel_and_shards_params(tmp_path, reference, data, fsdp, monkeypatch):
    # Every program train.train calls (the init; the step is compiled ahead of time through
    # `.lower`, which the spy passes through) is inspected: none has a full copy of a large
    # parameter as argument or output (see _JitSpy, tests below).
    spy = _JitSpy(monkeypatch)
    result = _train(tmp_path, "fsdp", "fsdp", data, fsdp)
    spy.check(sum(x.nbytes for x in jax.tree.leaves(result.state.params)) if fsdp == 8 else None)
    assert dict(result.mesh.shape) == {"data": data, "fsdp": fsdp}
    params = result.state.params
    # The largest kernel (the 49408 x 32 token embedding) is split over the fsdp axis ...
    emb = params["base_model"]["text"]["token_embedding"]["embedding"]
    assert emb.shape == (49408, 32)
    assert emb.sharding.spec == P("fsdp", None), emb.sharding.spec
    assert emb.addressable_shards[0].data.shape == (49408 // fsdp, 32)
    # ... and so is Adam's state for it (same shape -> same rule).
    specs = [x.sharding.spec for x in jax.tree.leaves(result.state.opt_state) if np.shape(x) == emb.shape]
    assert specs and all(s == P("fsdp", None) for s in specs), specs
    # Small leaves (biases, layer norms) stay replicated; the reference is fully replicated.
    ln = params["base_model"]["text"]["ln_final"]["scale"]
    assert ln.sharding.spec == P()
    assert all(x.sharding.spec == P() for x in jax.tree.leaves(reference.state.params))
    # The rule shards every leaf of >= 4096 elements with a dimension divisible by the fsdp size.
    expected = parallel.param_shardings(params, result.mesh, "fsdp")
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.sharding.spec == want.spec
    n_sharded = sum(x.sharding.spec != P() for x in jax.tree.leaves(params))
    assert n_sharded >= 5, n_sharded
    # Same training as pure data parallelism.
    assert int(result.state.step) == int(reference.state.step) == 2
    np.testing.assert_allclose(flat_params(result.state), flat_params(reference.state), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Sharded initialization: no device ever holds a full copy of a sharded parameter
# ----------------------------------------------------------------------------------------------


def _fsdp_config(data=1, fsdp=8):
    config = tiny_config()
    config.mesh.strategy, config.mesh.data, config.mesh.fsdp = "fsdp", data, fsdp
    return config


def _model_and_tx(config):
    model = get_family(config.model_family).build(config)
    tx, _ = optim.make_optimizer(config.optim, train.abstract_params(model, config), 2)
    return model, tx


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _full_copies(arrays, min_size=4096):
    """(shape, device) for every array of >= min_size elements that one device holds entirely.

    Under "fsdp" on 8 devices every leaf of the tiny IRRA with >= 4096 elements is sharded (checked
    below), so any hit is a full (replicated or single-device) copy.
    """
    hits = []
    for x in arrays:
        if x.size >= min_size and tuple(x.sharding.shard_shape(x.shape)) == tuple(x.shape):
            hits += [(tuple(x.shape), d) for d in x.sharding.device_set]
    return hits


class _JitSpy:
    """Stands in for jax.jit while active: every jitted program that runs is compiled explicitly so
    that its per-device memory (XLA memory_analysis) and the placement of its arguments and
    outputs are recorded. ``active`` can be switched off (later calls then pass straight through)."""

    def __init__(self, monkeypatch):
        self.runs, self.active = [], True
        real_jit = jax.jit

        def jit(fun, *args, **kwargs):
            jitted = real_jit(fun, *args, **kwargs)

            def call(*a, **k):
                if not self.active:
                    return jitted(*a, **k)
                arg_copies = _full_copies(x for x in jax.tree.leaves((a, k)) if isinstance(x, jax.Array))
                compiled = jitted.lower(*a, **k).compile()
                out = compiled(*a, **k)
                self.runs.append(dict(name=getattr(fun, "__qualname__", str(fun)),
                                      mem=parallel.memory_per_device(compiled), arg_copies=arg_copies,
                                      out_copies=_full_copies(jax.tree.leaves(out))))
                return out

            call.lower = jitted.lower  # ahead-of-time compiles pass through, unrecorded
            return call

        monkeypatch.setattr(jax, "jit", jit)

    def check(self, full_param_bytes=None):
        """No program ran with a full copy of a large leaf as argument or output, and (when
        full_param_bytes is given: on 8-way fsdp, where the sharded train state is 3/8 of the
        parameter bytes) none needed as many bytes per device (outputs + temporaries) as the
        full parameters."""
        assert self.runs
        for run in self.runs:
            assert not run["arg_copies"] and not run["out_copies"], run
            mem = run["mem"]
            assert mem is not None
            if full_param_bytes is not None:
                assert mem["output"] + mem["temp"] < 0.8 * full_param_bytes, (run, full_param_bytes)


def _param_bytes(init) -> int:
    return sum(_nbytes(a.shape, a.dtype) for a in jax.tree.leaves(init.abstract.params))


@pytest.fixture(scope="module")
def fsdp_init():
    """(config, model, tx, mesh, ShardedInit) for the tiny IRRA on mesh data=1 fsdp=8."""
    config = _fsdp_config()
    model, tx = _model_and_tx(config)
    mesh = parallel.make_mesh(1, 8)
    return config, model, tx, mesh, train.sharded_init(model, config, tx, mesh)


def test_sharded_init_never_holds_a_full_copy(fsdp_init, monkeypatch):
    config, model, tx, mesh, init = fsdp_init
    leaves = jax.tree.leaves(init.abstract)
    params = jax.tree.leaves(init.abstract.params)
    full_param_bytes = _param_bytes(init)
    big = [a for a in leaves if a.size >= 4096]
    assert big and all(a.sharding.spec != P() for a in big)  # every large leaf has a split dimension
    per_device = sum(_nbytes(a.sharding.shard_shape(a.shape), a.dtype) for a in leaves)
    assert per_device < 0.45 * full_param_bytes  # params + 2 Adam moments, 1/8 each (+ tiny leaves)

    # 1. The compiled init: its outputs are the shards, and its temporaries are small as well,
    #    so at no point of the init program does a device hold the full parameters.
    compiled = init.fn.lower(jax.random.PRNGKey(0), None).compile()
    out_sh = jax.tree.leaves(compiled.output_shardings)
    assert [s.spec for s in out_sh] == [a.sharding.spec for a in leaves]
    mem = parallel.memory_per_device(compiled)
    assert mem is not None, "this jaxlib gives no memory analysis on CPU"
    assert mem["output"] <= 1.05 * per_device + 4096, (mem, per_device)
    # A device holding a full copy of the parameters at some point of the program would need
    # output + temp >= full_param_bytes; here not even the largest leaf (the 49408 x 32 token
    # embedding, 97% of the bytes) is ever whole: the temporaries are the RNG's per-shard buffers.
    largest = max(_nbytes(a.shape, a.dtype) for a in params)
    assert mem["output"] + mem["temp"] < 0.8 * full_param_bytes, (mem, full_param_bytes)
    assert mem["temp"] < 0.5 * largest, (mem, largest)

    # 2. What init_train_state (the trainer's init) runs: every program, every array it passes.
    spy = _JitSpy(monkeypatch)
    state, shardings = train.init_train_state(model, config, tx, mesh, jax.random.PRNGKey(0))
    monkeypatch.undo()
    spy.check(full_param_bytes)
    # 3. Right after init: every large leaf is split 8 ways, one slice per device.
    assert _full_copies(jax.tree.leaves(state)) == []
    emb = state.params["base_model"]["text"]["token_embedding"]["embedding"]
    assert emb.shape == (49408, 32)
    assert sorted(s.data.shape for s in emb.addressable_shards) == [(49408 // 8, 32)] * 8
    assert len({s.device for s in emb.addressable_shards}) == 8
    for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert x.sharding == sh
    # Same values as the unsharded init (same rng): sharding changes only the placement.
    ref = train.create_train_state(train.init_params(model, config, jax.random.PRNGKey(0)), tx)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Negative control: the same checks catch the old path (jit(model.init) with no
    # out_shardings, then jit(create_train_state) with out_shardings): a full copy on one device.
    spy = _JitSpy(monkeypatch)
    params_old = train.init_params(model, config, jax.random.PRNGKey(0))
    jax.jit(lambda p: train.create_train_state(p, tx), out_shardings=shardings)(params_old)
    monkeypatch.undo()
    with pytest.raises(AssertionError):
        spy.check(full_param_bytes)
    assert spy.runs[0]["out_copies"] and spy.runs[0]["mem"]["output"] >= full_param_bytes
    assert spy.runs[1]["arg_copies"]


def test_init_checkpoint_is_placed_shard_by_shard(fsdp_init, tmp_path, monkeypatch):
    """CLIP towers from model.init_checkpoint: host numpy -> each device gets only its slices."""
    from xmr_jax import convert

    config, model, tx, mesh, init = fsdp_init
    clip = jax.device_get(train.init_params(model, config, jax.random.PRNGKey(7))["base_model"])
    convert.save_converted(model.base_model, clip, str(tmp_path / "clip"))
    config = _fsdp_config()
    config.model.init_checkpoint = str(tmp_path / "clip")
    reads = {}
    load = convert.load_clip

    def recording_load(*args, **kwargs):  # wraps the host leaves to record which slices are read
        clip_model, params = load(*args, **kwargs)

        def wrap(path, x):
            r = np.asarray(x).view(_RecordedReads)
            r.reads = reads.setdefault(jax.tree_util.keystr(path), [])
            return r

        return clip_model, jax.tree_util.tree_map_with_path(wrap, params)

    monkeypatch.setattr(convert, "load_clip", recording_load)
    spy = _JitSpy(monkeypatch)
    state, _ = train.init_train_state(model, config, tx, mesh, jax.random.PRNGKey(0))
    spy.active = False
    spy.check(_param_bytes(init))
    assert _full_copies(jax.tree.leaves(state)) == []
    for a, b in zip(jax.tree.leaves(clip), jax.tree.leaves(state.params["base_model"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    # the rest of the model is the random init; the optimizer state starts at zero
    ref = train.init_params(model, _fsdp_config(), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(ref["classifier"]["kernel"]),
                                  np.asarray(state.params["classifier"]["kernel"]))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state) if x.size > 1)
    # every large tower leaf was read from the host slice by slice, never whole
    big = jax.tree_util.tree_leaves_with_path(init.abstract.params["base_model"])
    big = [(jax.tree_util.keystr(p), a) for p, a in big if a.size >= 4096]
    assert big
    for name, a in big:
        shard = a.sharding.shard_shape(a.shape)
        assert reads[name], name
        assert all(np.empty(a.shape, np.bool_)[i].shape == shard for i in reads[name]), name
def test_resume_restores_into_the_shardings(fsdp_init, tmp_path):
    """checkpoints.restore with the ShapeDtypeStruct template of sharded_init (as train.train does)."""
    from xmr_jax import checkpoints

    config, model, tx, mesh, init = fsdp_init
    state, _ = train.init_train_state(model, config, tx, mesh, jax.random.PRNGKey(3))
    ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state)
    ckpt.wait()
    restored = ckpt.restore(init.abstract, step=1)
    ckpt.close()
    assert isinstance(restored, train.TrainState)
    assert _full_copies(jax.tree.leaves(restored)) == []
    for a, b, sh in zip(jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(init.shardings)):
        assert b.sharding == sh
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
