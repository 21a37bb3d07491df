"""Tests for xmr_jax.parallel on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from xmr_jax import parallel

needs8 = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (simulated) devices")


@needs8
def test_mesh_shapes_and_errors():
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert dict(parallel.make_mesh(data=2, fsdp=4).shape) == {"data": 2, "fsdp": 4}
    assert dict(parallel.make_mesh(data=-1, fsdp=8).shape) == {"data": 1, "fsdp": 8}
    assert dict(parallel.make_mesh(data=4, fsdp=-1).shape) == {"data": 4, "fsdp": 2}
    m = parallel.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    assert m.devices.size == 1
    assert all(t == jax.sharding.AxisType.Auto for t in parallel.make_mesh().axis_types)
    for bad in ((3, 1), (-1, 3), (4, 4), (-1, -1)):
        with pytest.raises(ValueError, match="device count|both be -1"):
            parallel.make_mesh(*bad)


def test_fsdp_rule_on_sample_shapes():
    spec = lambda shape, size=8, min_size=16: parallel.fsdp_spec(shape, size, min_size)
    assert spec((512, 2048)) == P(None, "fsdp")  # largest dim
    assert spec((2048, 512)) == P("fsdp", None)
    assert spec((512, 512)) == P("fsdp", None)  # tie -> earlier dim
    assert spec((49408, 512)) == P("fsdp", None)
    assert spec((7, 512)) == P(None, "fsdp")
    assert spec((1000, 12)) == P("fsdp", None)  # 1000 % 8 == 0
    assert spec((1001, 24)) == P(None, "fsdp")  # largest not divisible -> next largest
    assert spec((1001, 7)) == P()  # nothing divisible -> replicated
    assert spec((8,)) == P()  # below min_size -> replicated
    assert spec(()) == P()
    assert spec((16, 16, 3, 768)) == P(None, None, None, "fsdp")
    assert spec((512, 2048), size=1) == P()  # axis of size 1: nothing to shard


@needs8
def test_param_shardings_on_abstract_tree():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    tree = {
        "w": jax.ShapeDtypeStruct((64, 256), jnp.float32),
        "b": jax.ShapeDtypeStruct((256,), jnp.float32),
        "odd": jax.ShapeDtypeStruct((129, 129), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    sh = parallel.param_shardings(tree, mesh, "fsdp", min_size=1024)
    assert sh["w"].spec == P(None, "fsdp")
    assert sh["b"].spec == P() and sh["odd"].spec == P() and sh["step"].spec == P()
    sh_all = parallel.param_shardings(tree, mesh, "fsdp", min_size=1024, fsdp_axes=("data", "fsdp"))
    assert sh_all["w"].spec == P(None, ("data", "fsdp"))
    assert all(s.spec == P() for s in jax.tree.leaves(parallel.param_shardings(tree, mesh, "data")))
    with pytest.raises(ValueError, match="strategy"):
        parallel.param_shardings(tree, mesh, "zero")


@needs8
def test_global_batch_assembles_and_checks_divisibility():
    mesh = parallel.make_mesh(data=4, fsdp=2)
    local = {
        "images": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
        "pids": np.arange(16, dtype=np.int32),
    }
    g = parallel.global_batch(local, mesh)
    assert g["images"].shape == (16, 3) and g["pids"].dtype == jnp.int32
    assert g["images"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(g["images"]), local["images"])
    # each device holds 2 consecutive rows
    shards = sorted(g["pids"].addressable_shards, key=lambda s: s.index[0].start)
    assert [np.asarray(s.data).tolist() for s in shards] == [[2 * i, 2 * i + 1] for i in range(8)]
    with pytest.raises(ValueError, match="batch_size=12.*8 local devices"):
        parallel.global_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="different leading"):
        parallel.global_batch({"x": np.zeros((8, 2)), "y": np.zeros((16,))}, mesh)


@needs8
def test_prefetch_to_mesh_order_sharding_and_end():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    pulled = []

    def source(n):
        for i in range(n):
            pulled.append(i)
            yield {"x": np.full((8, 3), i, np.float32), "i": np.full((8,), i, np.int32)}

    it = parallel.prefetch_to_mesh(source(5), mesh, size=2)
    assert pulled == []  # lazy: nothing is pulled before the first next()
    first = next(it)
    assert pulled == [0, 1]  # size=2: one batch already placed beyond the one handed out
    got = [first] + list(it)  # ends cleanly when the source ends
    assert pulled == [0, 1, 2, 3, 4]
    assert [int(np.asarray(b["i"])[0]) for b in got] == [0, 1, 2, 3, 4]
    for b in got:
        for v in b.values():
            assert isinstance(v, jax.Array) and v.sharding == parallel.batch_sharding(mesh)
            assert len(v.sharding.device_set) == 8 and v.addressable_shards[0].data.shape[0] == 1
    with pytest.raises(StopIteration):
        next(it)
    # size=1 pulls a batch only when asked for it (what the training loop uses)
    pulled.clear()
    one = parallel.prefetch_to_mesh(source(3), mesh, size=1)
    next(one)
    assert pulled == [0]
    assert len(list(one)) == 2 and pulled == [0, 1, 2]
    assert list(parallel.prefetch_to_mesh(iter([]), mesh)) == []
    assert len(list(parallel.prefetch_to_mesh(source(1), mesh, size=4))) == 1
    with pytest.raises(ValueError, match="size"):
        next(parallel.prefetch_to_mesh(source(1), mesh, size=0))
    # a bad batch fails with global_batch's message
    with pytest.raises(ValueError, match="not divisible"):
        next(parallel.prefetch_to_mesh(iter([{"x": np.zeros((12, 2))}]), mesh))


class _RecordedReads(np.ndarray):
    """ndarray that records every index it is read at (to see what put_sharded copies)."""

    def __getitem__(self, index):
        self.reads.append(index)
        return np.asarray(super().__getitem__(index))


def _recorded(x):
    r = np.asarray(x).view(_RecordedReads)
    r.reads = []
    return r


@needs8
def test_put_sharded_reads_and_places_only_shards():
    mesh = parallel.make_mesh(data=1, fsdp=8)
    rng = np.random.default_rng(0)
    host = {"w": _recorded(rng.normal(size=(64, 256)).astype(np.float32)),
            "b": _recorded(rng.normal(size=(256,)).astype(np.float32))}
    sh = parallel.param_shardings(host, mesh, "fsdp", min_size=1024)
    assert sh["w"].spec == P(None, "fsdp") and sh["b"].spec == P()
    out = parallel.put_sharded(host, sh)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(host["w"]))
    assert out["w"].sharding == sh["w"] and out["b"].sharding == sh["b"]
    # every device got only its 64x32 slice, and only slices were read from the host array
    assert {s.data.shape for s in out["w"].addressable_shards} == {(64, 32)}
    assert len({s.device for s in out["w"].addressable_shards}) == 8
    assert host["w"].reads and all(np.asarray(host["w"])[i].shape == (64, 32) for i in host["w"].reads)
    assert out["b"].addressable_shards[0].data.shape == (256,)  # small leaf: replicated
    # put_sharded_like casts to the target dtype and uses the target sharding
    like = {"w": jax.ShapeDtypeStruct((64, 256), jnp.bfloat16, sharding=sh["w"]),
            "b": jax.ShapeDtypeStruct((256,), jnp.float32, sharding=sh["b"])}
    cast = parallel.put_sharded_like(host, like)
    assert cast["w"].dtype == jnp.bfloat16 and cast["w"].sharding == sh["w"]
    with pytest.raises(ValueError, match="shape"):
        parallel.put_sharded_like({"w": np.zeros((3, 3))}, {"w": like["w"]})
    # one sharding for all leaves
    rep = parallel.put_sharded({"a": np.arange(8.0)}, parallel.replicated(mesh))
    assert rep["a"].sharding.spec == P() and len(rep["a"].sharding.device_set) == 8


def _toy_problem():
    rng = np.random.default_rng(0)
    params = {
        "l1": {
            "kernel": rng.normal(size=(16, 64)).astype(np.float32) * 0.3,
            "bias": np.zeros(64, np.float32),
        },
        "l2": {"kernel": rng.normal(size=(64, 8)).astype(np.float32) * 0.3, "bias": np.zeros(8, np.float32)},
    }
    batches = [
        {"x": rng.normal(size=(32, 16)).astype(np.float32), "y": rng.normal(size=(32, 8)).astype(np.float32)}
        for _ in range(3)
    ]
    return params, batches


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["l1"]["kernel"] + params["l1"]["bias"])
    out = h @ params["l2"]["kernel"] + params["l2"]["bias"]
    return jnp.mean((out - batch["y"]) ** 2)


def _train(mesh, strategy, params, batches):
    tx = optax.adam(1e-2)
    state = (params, tx.init(params))
    state = parallel.shard_train_state(state, mesh, strategy, min_size=64)
    sh = jax.tree.map(lambda x: x.sharding, state)

    def step(state, batch):
        p, o = state
        loss, g = jax.value_and_grad(_loss)(p, batch)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), loss

    step = jax.jit(
        step, in_shardings=(sh, parallel.batch_sharding(mesh)), out_shardings=(sh, None), donate_argnums=0
    )
    for b in batches:
        state, _ = step(state, parallel.global_batch(b, mesh))
    return state, step


@needs8
def test_toy_train_step_same_under_fsdp_dp_and_one_device():
    params, batches = _toy_problem()
    one = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    ref, _ = _train(one, "data", params, batches)
    dp, _ = _train(parallel.make_mesh(data=8), "data", params, batches)
    fsdp, step = _train(parallel.make_mesh(data=2, fsdp=4), "fsdp", params, batches)
    # the big kernels really are sharded (per-device shard smaller than the array), Adam state too
    k = fsdp[0]["l1"]["kernel"]
    assert k.sharding.spec == P(None, "fsdp") and k.addressable_shards[0].data.shape == (16, 16)
    assert fsdp[1][0].mu["l1"]["kernel"].sharding.spec == P(None, "fsdp")
    # same numbers (float32; reductions are reordered across devices): atol 1e-6
    for other in (dp, fsdp):
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(other)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    batch = parallel.global_batch(batches[0], parallel.make_mesh(2, 4))
    mem = parallel.memory_per_device(step.lower(fsdp, batch).compile())
    # XLA's CPU backend reports the analysis: the arguments of one device are exactly its shards
    # of the state (FSDP: a quarter of each sharded leaf) and of the batch (1/8 of the rows).
    shard_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((fsdp, batch)))
    full_bytes = sum(x.nbytes for x in jax.tree.leaves((fsdp, batch)))
    assert mem is not None and mem["argument"] == shard_bytes < full_bytes / 3
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]


def test_memory_per_device_handles_missing_analysis():
    class NoAnalysis:
        def memory_analysis(self):
            return None

    class Raises:
        def memory_analysis(self):
            raise NotImplementedError

    assert parallel.memory_per_device(NoAnalysis()) is None
    assert parallel.memory_per_device(Raises()) is None


def test_initialize_distributed_is_noop_single_process(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(parallel, "_DISTRIBUTED_DONE", False)
    assert parallel.multihost_environment() is None
    assert parallel.initialize_distributed() is False
    assert calls == []
    # detection of launchers (not initialized here, only detected)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host0")
    assert parallel.multihost_environment() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host0,host1")
    assert parallel.multihost_environment() == "tpu"
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.multihost_environment() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.multihost_environment() == "slurm"
    # an explicit call initializes once, then is idempotent
    assert parallel.initialize_distributed("localhost:1234", 2, 0) is True
    assert parallel.initialize_distributed("localhost:1234", 2, 0) is True
    assert calls == [{"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 0}]
