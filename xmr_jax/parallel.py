"""Parallelism plumbing: multi-host init, the device mesh, global batches, parameter sharding rules.

One mesh with axes ("data", "fsdp") over all devices of all processes:
  * the batch's leading dimension is split over BOTH axes (every device gets B / n_devices rows);
  * strategy "data": parameters and optimizer state replicated (pure data parallelism);
  * strategy "fsdp": each large leaf split along one dimension over the "fsdp" axis (ZeRO-3 style;
    with mesh data=D, fsdp=F, parameters are replicated over D groups of F devices = HSDP);
  * sharding rules (config.mesh.rules): ordered (regex, spec) pairs that override the strategy for
    the leaves whose path name they match (`sharding_rule_specs`).
The train step is plain jax.jit with in/out shardings; XLA inserts the collectives. The state is
created directly in its shardings (no device ever holds a full replicated copy under "fsdp"):

    mesh = make_mesh(data=-1, fsdp=1)
    abstract = jax.eval_shape(lambda r: create_train_state(model.init(r, dummy)["params"], tx), rng)
    state_sh = param_shardings(abstract, mesh, strategy)
    state = jax.jit(init_fn, out_shardings=state_sh)(rng)      # init_fn(rng) -> TrainState
    step = jax.jit(train_step, in_shardings=(state_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, None), donate_argnums=0)
    for batch in prefetch_to_mesh(numpy_batches, mesh):         # global batches, placed ahead
        state, metrics = step(state, batch)                     # train_step(state, batch)

(xmr_jax.train.sharded_init does the init part, including the model family's host-loaded
pretrained weights, which are placed shard by shard with ``put_sharded``.)
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("data", "fsdp")

_log = logging.getLogger(__name__)
_DISTRIBUTED_DONE = False


# ----------------------------------------------------------------------------------------------
# Multi-host initialization
# ----------------------------------------------------------------------------------------------


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def multihost_environment() -> str | None:
    """Names the detected multi-process launcher ("explicit-env", "tpu", "slurm", "ompi") or None.

    Detected: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES / JAX_PROCESS_ID, as written by
    launch/local_multihost.sh); a Cloud TPU slice with several workers (TPU_WORKER_HOSTNAMES or
    TPU_PROCESS_ADDRESSES listing more than one host, or a multislice MEGASCALE_COORDINATOR_ADDRESS);
    SLURM with SLURM_NTASKS > 1; Open MPI with OMPI_COMM_WORLD_SIZE > 1.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit-env"
    for var in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        hosts = [h for h in os.environ.get(var, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return "tpu"
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if os.environ.get("SLURM_JOB_ID") and (_int_env("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    return None


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Calls jax.distributed.initialize() when running multi-process; otherwise does nothing.

    Must run before anything touches the devices (jax.devices(), any computation). Explicit
    arguments win; else the launcher is detected from the environment (``multihost_environment``)
    and JAX's own cluster detection fills in the addresses. Idempotent: later calls are no-ops.
    Returns True when the distributed runtime is (now) initialized.
    """
    global _DISTRIBUTED_DONE
    is_init = getattr(jax.distributed, "is_initialized", lambda: False)
    if _DISTRIBUTED_DONE or is_init():
        _DISTRIBUTED_DONE = True
        return True
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    env = multihost_environment()
    if not explicit and env is None:
        return False
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    elif env == "explicit-env":
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=_int_env("JAX_NUM_PROCESSES"),
            process_id=_int_env("JAX_PROCESS_ID"),
        )
    _log.info("jax.distributed.initialize (%s) %s", env or "explicit", kwargs)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    _DISTRIBUTED_DONE = True
    return True


# ----------------------------------------------------------------------------------------------
# Mesh and batches
# ----------------------------------------------------------------------------------------------


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """Mesh of shape (data, fsdp), axis names ("data", "fsdp"), over all (or the given) devices.

    One of the sizes may be -1 (= all remaining devices). The product must equal the device count.
    Axis types are Auto (sharding propagated by XLA), not jax.make_mesh's Explicit default.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = int(data), int(fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1:
        if fsdp <= 0 or n % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} must divide the device count {n}")
        data = n // fsdp
    elif fsdp == -1:
        if data <= 0 or n % data:
            raise ValueError(f"mesh.data={data} must divide the device count {n}")
        fsdp = n // data
    if data <= 0 or fsdp <= 0 or data * fsdp != n:
        raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} must equal the device count {n}")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ("data", "fsdp"); other dimensions not split."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _local_device_count(mesh: Mesh) -> int:
    pid = jax.process_index()
    return sum(1 for d in mesh.devices.flat if d.process_index == pid)


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global jax.Arrays sharded by ``batch_sharding``.

    local_batch: {name: array [B_local, ...]} (this process's rows; all processes pass the same
    B_local). Returns {name: jax.Array [B_local * process_count, ...]}.
    """
    if not local_batch:
        raise ValueError("global_batch: the batch dict is empty")
    sharding = batch_sharding(mesh)
    n_local = _local_device_count(mesh)
    sizes = {}
    for k, v in local_batch.items():
        shape = np.shape(v)
        if len(shape) == 0:
            raise ValueError(
                f"global_batch: batch['{k}'] is a scalar; every entry needs a leading batch dimension"
            )
        sizes[k] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"global_batch: entries have different leading (batch) sizes: {sizes}")
    b = next(iter(sizes.values()))
    if b % n_local:
        raise ValueError(
            f"per-process batch_size={b} is not divisible by the {n_local} local devices of this "
            f"process (global batch_size must be a multiple of the total device count "
            f"{mesh.devices.size}); change batch_size or mesh"
        )
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
    }


def prefetch_to_mesh(batches: Iterable[Mapping[str, Any]], mesh: Mesh, size: int = 2) -> Iterator[dict]:
    """Yields ``global_batch(b, mesh)`` for each per-process numpy batch b of ``batches``, in order.

    JAX does not wait for the host-to-device copies to finish, and a step is dispatched without
    waiting for it to run, so a loop that calls ``next()`` right after dispatching a step builds
    and transfers the next batch while the step runs. ``size`` (>= 1) is how many placed batches exist at the moment one is handed out: the
    first ``next()`` pulls ``size`` host batches; every later one pulls exactly one more. size=1
    pulls each batch only when it is asked for (the training loop's choice, so the iterator is
    consumed exactly as far as the steps that ran); size=k keeps k-1 further batches on the devices.
    Ends (StopIteration) after the last batch when ``batches`` ends; errors of the source iterator
    and of ``global_batch`` propagate.
    """
    if int(size) < 1:
        raise ValueError(f"prefetch_to_mesh: size must be >= 1, got {size}")
    source = iter(batches)
    queue: collections.deque = collections.deque()

    def fill(n: int) -> None:
        for local in itertools.islice(source, n):
            queue.append(global_batch(local, mesh))

    fill(int(size) - 1)
    while True:
        fill(1)
        if not queue:
            return
        yield queue.popleft()


def put_sharded(host_tree: PyTree, shardings: PyTree) -> PyTree:
    """Places host (numpy) leaves onto the devices directly in their target shardings.

    Each device receives only its own slice (``jax.make_array_from_callback`` reads
    ``leaf[index]`` per addressable device), so no device, and no intermediate replicated array,
    ever holds a full copy of a sharded leaf. Works multi-process when every process holds the
    same host values. ``shardings``: a pytree of Sharding with the structure of ``host_tree`` (e.g.
    from ``param_shardings``), or one Sharding for every leaf. Leaves keep their dtype (see
    ``put_sharded_like`` to cast to a target dtype).
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, host_tree)
    return jax.tree.map(_put_leaf, host_tree, shardings)


def put_sharded_like(host_tree: PyTree, abstract: PyTree) -> PyTree:
    """``put_sharded`` with each leaf cast to the dtype of, and placed with the ``.sharding`` of, the
    matching jax.ShapeDtypeStruct in ``abstract`` (shapes must match)."""

    def one(x, a):
        if tuple(np.shape(x)) != tuple(a.shape):
            raise ValueError(f"put_sharded_like: shape {tuple(np.shape(x))} != target {tuple(a.shape)}")
        return _put_leaf(x, a.sharding, a.dtype)

    return jax.tree.map(one, host_tree, abstract)


def _put_leaf(x, sharding, dtype=None):
    if not isinstance(x, np.ndarray):  # jax.Array / python scalar / list: to the host first
        x = np.asarray(x)
    dtype = np.dtype(dtype) if dtype is not None else x.dtype
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x[index], dtype))


# ----------------------------------------------------------------------------------------------
# Parameter sharding rules
# ----------------------------------------------------------------------------------------------


def fsdp_spec(
    shape: tuple[int, ...], axis_size: int, min_size: int = 2**12, axis: str | tuple[str, ...] = "fsdp"
) -> P:
    """PartitionSpec for one leaf under the fsdp rule.

    Shard along the LARGEST dimension whose size is divisible by ``axis_size``; on ties the EARLIER
    dimension wins. Leaves with fewer than ``min_size`` elements, scalars, or with no divisible
    dimension are replicated (P()).
    """
    if axis_size <= 1 or len(shape) == 0 or math.prod(shape) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])  # stable: earlier dim first on ties
    for i in order:
        if shape[i] % axis_size == 0:
            spec = [None] * len(shape)
            spec[i] = axis
            return P(*spec)
    return P()


def path_name(path) -> str:
    """A pytree key path as "a/b/c" (dict keys, attribute names and sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def parse_sharding_rules(rules, where: str = "config.mesh.rules") -> list[tuple[Any, Any]]:
    """Checks ``rules``: a sequence of (regex, spec) pairs -> [(compiled regex, spec)].

    spec: "replicated" (P()), "fsdp" (the shape rule ``fsdp_spec``) or a sequence with one entry
    per dimension of the leaf, each None or mesh axis name(s) (a PartitionSpec's entries).
    """
    import re

    out = []
    for i, rule in enumerate(rules or ()):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"{where}[{i}] = {rule!r}: expected (regex, spec), spec 'replicated', 'fsdp' or a "
                             "tuple of mesh axis names / None per dimension")
        pattern, spec = rule
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{where}[{i}]: {pattern!r} is not a regular expression ({e})") from e
        if isinstance(spec, str):
            if spec not in ("replicated", "fsdp"):
                raise ValueError(f"{where}[{i}]: spec {spec!r}; expected 'replicated', 'fsdp' or a tuple of mesh "
                                 "axis names / None per dimension")
        elif isinstance(spec, (tuple, list)):
            spec = tuple(tuple(s) if isinstance(s, list) else s for s in spec)
        else:
            raise ValueError(f"{where}[{i}]: spec {spec!r}; expected 'replicated', 'fsdp' or a tuple")
        out.append((regex, spec))
    return out


def _rule_spec(spec, shape: tuple[int, ...], mesh: Mesh, fsdp_rule, name: str, where: str) -> P:
    if spec == "replicated":
        return P()
    if spec == "fsdp":
        return fsdp_rule(shape)
    if len(spec) != len(shape):
        raise ValueError(f"{where}: spec {spec} for {name} of shape {shape}: needs one entry per dimension")
    for dim, axes in zip(shape, spec):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        unknown = [a for a in names if a not in mesh.shape]
        if unknown:
            raise ValueError(f"{where}: spec {spec} for {name}: {unknown} not mesh axes {tuple(mesh.shape)}")
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            raise ValueError(f"{where}: spec {spec} for {name} of shape {shape}: dimension {dim} is not "
                             f"divisible by {size} devices")
    return P(*spec)


def sharding_rule_specs(tree: PyTree, mesh: Mesh, strategy: str, rules, fsdp_rule,
                        where: str = "config.mesh.rules") -> PyTree:
    """PartitionSpec per leaf: the first rule whose regex `re.search`-es the leaf's path name
    (`path_name`, e.g. "params/base_model/visual/conv1/kernel" or "opt_state/1/0/mu/base_model/...")
    decides; a leaf no rule matches follows the strategy."""
    parsed = parse_sharding_rules(rules, where)
    default = (lambda shape: P()) if strategy == "data" else fsdp_rule

    def one(path, x):
        name, shape = path_name(path), tuple(np.shape(x))
        for i, (regex, spec) in enumerate(parsed):
            if regex.search(name):
                return _rule_spec(spec, shape, mesh, fsdp_rule, name, f"{where}[{i}]")
        return default(shape)

    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(
    tree: PyTree,
    mesh: Mesh,
    strategy: str = "data",
    min_size: int = 2**12,
    fsdp_axes: str | tuple[str, ...] = "fsdp",
    rules=(),
) -> PyTree:
    """Pytree of NamedSharding (structure of ``tree``) for params / optimizer state / train state.

    tree: leaves are arrays, jax.ShapeDtypeStruct (e.g. from jax.eval_shape) or python scalars.
    strategy "data": all replicated. "fsdp": ``fsdp_spec`` over ``fsdp_axes`` (default the "fsdp"
    axis; pass ("data", "fsdp") to shard over every device). Adam's mu/nu get the same sharding as
    their parameter because the rule only depends on the shape.
    rules: ordered (regex, spec) pairs that override the strategy where they match (see
    ``sharding_rule_specs``; spec "replicated", "fsdp" or per-dimension mesh axes). A regex that
    names a parameter without anchoring matches its optimizer moments too.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "data" and not rules:
        return jax.tree.map(lambda _: replicated(mesh), tree)
    axes = (fsdp_axes,) if isinstance(fsdp_axes, str) else tuple(fsdp_axes)
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"fsdp axis {a!r} is not a mesh axis {tuple(mesh.shape)}")
    axis_size = math.prod(mesh.shape[a] for a in axes)
    axis = axes[0] if len(axes) == 1 else axes
    fsdp_rule = lambda shape: fsdp_spec(shape, axis_size, min_size, axis)  # noqa: E731
    specs = sharding_rule_specs(tree, mesh, strategy, rules, fsdp_rule)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def shard_train_state(state: PyTree, mesh: Mesh, strategy: str = "data", min_size: int = 2**12) -> PyTree:
    """device_put every leaf of ``state`` with ``param_shardings`` (same values, new placement)."""
    return jax.device_put(state, param_shardings(state, mesh, strategy, min_size))


def memory_per_device(compiled) -> dict[str, int] | None:
    """Bytes per device from ``jax.jit(f).lower(...).compile().memory_analysis()``.

    Returns {"argument", "output", "temp", "alias", "generated_code", "total"} (total = argument +
    output + temp - alias), or None when the backend gives no analysis (some CPU builds).
    """
    try:
        ma = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if ma is None:
        return None
    if isinstance(ma, (list, tuple)):  # older jax: one per device/program
        if not ma:
            return None
        ma = ma[0]
    get = lambda name: int(getattr(ma, name, 0) or 0)
    out = {
        "argument": get("argument_size_in_bytes"),
        "output": get("output_size_in_bytes"),
        "temp": get("temp_size_in_bytes"),
        "alias": get("alias_size_in_bytes"),
        "generated_code": get("generated_code_size_in_bytes"),
    }
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out
