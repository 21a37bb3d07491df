"""Gradient caching: the full-batch gradient of a contrastive objective, computed in micro-batches.

SDM, ITC and CMC compare every image with every caption of the batch, so accumulating the
gradients of micro-batch losses (each over its own micro-batch) trains another objective. Gradient
caching (GradCache, Gao et al. 2021) keeps the objective and bounds the activation memory by one
micro-batch:

  1. forward every micro-batch without keeping activations (`lax.map`); keep only the outputs
     the loss reads (the cache: embeddings [B, D], ID logits [B, C], MLM CE sums);
  2. run the family's loss on the whole batch of cached outputs, and differentiate it with
     respect to those outputs -> (loss, parts) and d loss / d outputs;
  3. re-run each micro-batch's forward with `jax.vjp` and pull its slice of d loss / d outputs
     back to the parameters (`lax.scan`, one micro-batch's activations live at a time); the sum
     over micro-batches is the full-batch gradient (chain rule, exact up to float rounding).

What the family declares (`Family.micro_batch_outputs(config)`): for each output the loss reads,
how the full batch's value is made from the micro-batches' values:
  "rows": the leading axis is the example (embeddings, token features and their masks, ID
    logits): concatenated in batch order;
  "sum": a float32 [] that adds up over examples (IRRA's MLM CE sum over masked tokens and their
    count): summed. The MLM loss is CE sum / count over the whole batch, so step 3 gives each
    micro-batch's CE sum the weight d loss / d CE sum = 1 / (the batch's count): the per-sample
    branch runs per micro-batch and its gradient carries the full-batch weight.
Non-float outputs (masks) are cached and passed to the loss, never differentiated.

Micro-batches and devices: the batch is sharded over the mesh's batch axes (device s holds rows
[s*P, (s+1)*P), P = per-device batch). Micro-batch k takes rows [k*m, (k+1)*m) of every device's
share (m = config.micro_batch_size, per device), so no row moves between devices; the merged
outputs are put back in batch order before the loss.

Cost: the towers' forward runs twice (steps 1 and 3); memory holds one micro-batch's
activations plus the cache and one gradient accumulator. On a mesh of several devices XLA
all-reduces each micro-batch's parameter gradient inside the loop of step 3 (n_micro gradient
all-reduces per step instead of one; seen in the compiled HLO of an 8-device step). Randomness: the module is applied without rngs (no dropout), so the
two forwards agree.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROWS = "rows"
SUM = "sum"
KINDS = (ROWS, SUM)

GradFn = Callable[[Any, Mapping[str, jax.Array]], tuple[tuple[jax.Array, dict], Any]]


def check_kinds(kinds: Mapping[str, str], family: str) -> dict[str, str]:
    """The family's {output name: "rows" | "sum"}; anything else raises naming the family."""
    bad = {k: v for k, v in kinds.items() if v not in KINDS}
    if not kinds or bad:
        raise ValueError(f"model family {family!r}: micro_batch_outputs must map output names to one of "
                         f"{KINDS}, got {dict(kinds) if not bad else bad}")
    return dict(kinds)


def split_batch(batch: Mapping[str, jax.Array], n_micro: int, shards: int, mesh=None) -> dict:
    """[B, ...] -> [n_micro, B / n_micro, ...]: micro-batch k is rows [k*m, (k+1)*m) of each of the
    `shards` contiguous device shares (m = B / (shards * n_micro)), shares in device order."""
    def one(x):
        b = x.shape[0]
        if b % (shards * n_micro):
            raise ValueError(f"batch of {b} rows does not split into {shards} device shares of "
                             f"{n_micro} micro-batches (config.micro_batch_size)")
        m = b // (shards * n_micro)
        y = x.reshape((shards, n_micro, m) + x.shape[1:]).swapaxes(0, 1)
        y = y.reshape((n_micro, shards * m) + x.shape[1:])
        return _constrain(y, mesh, 1)

    return jax.tree.map(one, dict(batch))


def merge_rows(x: jax.Array, shards: int, mesh=None) -> jax.Array:
    """Inverse of `split_batch` for one array: [n_micro, shards * m, ...] -> [B, ...] in batch order."""
    n_micro, sm = x.shape[:2]
    m = sm // shards
    y = x.reshape((n_micro, shards, m) + x.shape[2:]).swapaxes(0, 1)
    return _constrain(y.reshape((shards * n_micro * m,) + x.shape[2:]), mesh, 0)


def _constrain(x, mesh, axis: int):
    if mesh is None:
        return x
    from xmr_jax.parallel import BATCH_AXES

    spec = [None] * x.ndim
    spec[axis] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def make_grad_fn(model, loss_fn: Callable, kinds: Mapping[str, str], n_micro: int, shards: int = 1,
                 mesh=None, family: str = "") -> GradFn:
    """`grad_fn(params, batch) -> ((loss, parts), grads)`, the full-batch value and gradient of
    `loss_fn(model.apply({"params": params}, batch), batch)`, computed in n_micro micro-batches.

    Args:
      model: the family's module; `apply(variables, batch)` -> outputs dict.
      loss_fn: the family's `loss(outputs, batch) -> (total float32 [], {name: float32 []})`.
      kinds: {output name: "rows" | "sum"} (`Family.micro_batch_outputs`); outputs not named are
        not cached (the loss must not read them).
      n_micro: micro-batches per step (per-device batch / per-device micro-batch size).
      shards: how many devices the batch is split over (the mesh's batch axes); 1 without a mesh.
      mesh: when given, the micro-batches and merged outputs are constrained to stay split over
        its batch axes.
    """
    kinds = check_kinds(kinds, family)

    def forward(params, micro):
        # Declared outputs that this configuration does not produce (e.g. ID logits without the
        # id loss) are simply absent.
        out = model.apply({"params": params}, micro)
        cached = {k: v for k, v in out.items() if k in kinds}
        bad = [k for k in cached if kinds[k] == SUM and jnp.ndim(cached[k]) != 0]
        if bad:
            raise ValueError(f"model family {family!r}: outputs {bad} are declared 'sum' "
                             "(micro_batch_outputs) but are not scalars")
        return cached

    def grad_fn(params, batch):
        micro = split_batch(batch, n_micro, shards, mesh)
        # 1. forward only, every micro-batch; nothing but the cached outputs is kept.
        stacked = jax.lax.map(lambda mb: forward(params, mb), micro)
        outputs = {k: merge_rows(v, shards, mesh) if kinds[k] == ROWS else jnp.sum(v, axis=0)
                   for k, v in stacked.items()}
        diff = {k: v for k, v in outputs.items() if _is_float(v)}
        const = {k: v for k, v in outputs.items() if k not in diff}

        # 2. the loss on the whole batch and its gradient with respect to the cached outputs.
        def objective(d):
            return loss_fn({**const, **d}, batch)

        (loss, parts), g_out = jax.value_and_grad(objective, has_aux=True)(diff)
        g_micro = {k: split_batch({k: g}, n_micro, shards, mesh)[k] if kinds[k] == ROWS
                   else jnp.broadcast_to(g, (n_micro,) + g.shape) for k, g in g_out.items()}

        # 3. each micro-batch again, its slice of the output gradient pulled back to the params.
        def body(acc, xs):
            mb, g = xs
            _, pullback = jax.vjp(lambda p: {k: v for k, v in forward(p, mb).items() if k in g}, params)
            (grads,) = pullback(g)
            return jax.tree.map(jnp.add, acc, grads), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(body, zeros, (micro, g_micro))
        return (loss, parts), grads

    return grad_fn


def micro_batches(config, n_shards: int) -> int:
    """Micro-batches per step for config.micro_batch_size (per device), or 0 when it is off
    (unset, 0, or not smaller than the per-device batch config.batch_size / n_shards).

    Raises a ValueError naming config.micro_batch_size when it is negative or does not divide
    the per-device batch.
    """
    size = config.get("micro_batch_size", None)
    if not size:
        return 0
    per_device = int(config.batch_size) // n_shards
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or per_device % size:
        raise ValueError(f"config.micro_batch_size={size!r} must be a positive integer dividing the per-device "
                         f"batch {per_device} (config.batch_size={config.batch_size} over {n_shards} devices)")
    return per_device // size if size < per_device else 0


def grad_fn_from_config(model, family, config, mesh) -> GradFn | None:
    """The gradient-caching grad_fn for `train.make_train_step`, or None when
    config.micro_batch_size is off (see `micro_batches`)."""
    from xmr_jax.parallel import BATCH_AXES

    shards = 1
    for axis in BATCH_AXES:
        shards *= mesh.shape[axis]
    n_micro = micro_batches(config, shards)
    if not n_micro:
        return None
    kinds = family.micro_batch_outputs(config)
    if kinds is None:
        raise ValueError(f"config.micro_batch_size={config.micro_batch_size}: model family {family.name!r} "
                         "does not support micro-batches (its micro_batch_outputs is None); unset it")
    return make_grad_fn(model, family.loss_fn(config), kinds, n_micro, shards, mesh, family.name)
