"""The trainer: one jitted, donated train step over a device mesh, and the loop around it.

Everything model-specific comes from the config's model family (`xmr_jax.models.families`): the
module, the init batch, the loss (one signature: `loss(outputs, batch) -> (total, parts)`), the
pretrained weights of the init checkpoint and the family's own config checks.
Init: the train state (parameters + optimizer state) is created directly in its shardings
(`sharded_init`: one jit with out_shardings from `parallel.param_shardings`; the family's
host-loaded pretrained weights are placed shard by shard), or restored into them on resume; no
device holds a full copy.
Start-up: the first batch is pulled, then the step compiles on it (lowered on the abstract state) in
a thread while the state is initialized or restored.
Loop: dispatch `train_step` (compiled once) on batch s, then build and transfer batch s+1 while it
runs -> metrics kept on device and fetched every `log_every` steps (the only host sync in the
loop) -> orbax checkpoints every `ckpt_every_steps`.
Stops: SIGTERM/SIGINT -> checkpoint of the step running when the signal arrived (every process
agrees on it, `checkpoints.StopPoller`), then `TrainResult.stopped`. A failed save raises
`checkpoints.CheckpointSaveError` at the next step (its unfinished folder removed). A step whose
loss is NaN/Inf does not change the parameters or optimizer state; the loop stops at the next log
point with `TrainingDiverged`, whose message says which checkpoint (if any) is on disk: a diverged
state is never saved.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from xmr_jax import checkpoints, grad_cache, logging_utils, optim, parallel
from xmr_jax.logging_utils import MetricWriter, ProgressBar
from xmr_jax.models.families import get_family


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


class TrainResult(NamedTuple):
    state: "TrainState"
    model: Any
    mesh: Any
    stopped: bool  # True when a SIGTERM/SIGINT ended training early (a checkpoint was saved)


@flax.struct.dataclass
class TrainState:
    """step int32 [], params (float32 master weights), opt_state, nonfinite int32 [] (skipped steps)."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array


def create_train_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        nonfinite=jnp.zeros((), jnp.int32),
    )


def make_train_step(model, loss_fn: Callable, tx: optax.GradientTransformation,
                    grad_fn: Callable | None = None, dropout_rng: jax.Array | None = None) -> Callable:
    """Returns `train_step(state, batch) -> (state, metrics)` (pure; jit it with shardings).

    loss_fn(outputs, batch) -> (total float32 [], {name: float32 []}) is the family's
    `loss_fn(config)`; outputs = model.apply({"params": params}, batch). metrics: loss, the parts,
    grad_norm. grad_fn(params, batch) -> ((loss, parts), grads) replaces the one-pass
    `jax.value_and_grad` of that objective (`xmr_jax.grad_cache`: the same gradient computed in
    micro-batches). dropout_rng: with it, the one-pass objective runs the model with
    `rngs={"dropout": fold_in(dropout_rng, step)}` (a fresh mask every step; models without
    dropout ignore it; a grad_fn does not receive it).

    A step whose loss is NaN/Inf keeps params and opt_state bit for bit (step still advances and
    `nonfinite` counts it). The optimizer update runs inside `lax.cond` on the loss being finite,
    so a skipped step copies nothing: a `jnp.where(finite, new, old)` over params and optimizer
    state instead materializes the new state as temporaries (IRRA ViT-B/16, batch 8, one CPU
    device, XLA memory_analysis: temp 4460 MiB with the where, 4028 MiB with the cond, 4006 MiB
    with no guard at all).
    """

    def apply_update(operands):
        grads, params, opt_state = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def keep(operands):
        _, params, opt_state = operands
        return params, opt_state

    def full_batch_grad(params, batch, step):
        rngs = None if dropout_rng is None else {"dropout": jax.random.fold_in(dropout_rng, step)}

        def objective(params):
            outputs = model.apply({"params": params}, batch, rngs=rngs)
            return loss_fn(outputs, batch)

        return jax.value_and_grad(objective, has_aux=True)(params)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        # train_step int32 [B]: the state's step on every row, for losses scheduled by step
        batch = {**batch, "train_step": jnp.full(jax.tree.leaves(batch)[0].shape[:1], state.step, jnp.int32)}
        if grad_fn is None:
            (loss, parts), grads = full_batch_grad(state.params, batch, state.step)
        else:
            (loss, parts), grads = grad_fn(state.params, batch)
        finite = jnp.isfinite(loss)
        # A non-finite step leaves the state untouched, so what gets saved is always good.
        params, opt_state = jax.lax.cond(finite, apply_update, keep, (grads, state.params, state.opt_state))
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads)}
        return new_state, metrics

    return train_step


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the field, before any data or device work.

    Here: model_family, precision, batch sizes against the mesh, micro_batch_size, the
    parameter-group rules (config.optim.param_groups) and the sharding rules (config.mesh.rules);
    the family's own fields (loss names, model, init checkpoint) in its `validate`.
    """
    family = get_family(config.model_family)
    if config.precision not in ("float32", "bfloat16"):
        raise ValueError(f"config.precision={config.precision!r}: expected 'float32' or 'bfloat16'")
    n_dev = jax.device_count() if -1 in (config.mesh.data, config.mesh.fsdp) else config.mesh.data * config.mesh.fsdp
    for field in ("batch_size", "eval_batch_size"):
        size = config.get(field, n_dev)
        if size <= 0 or size % n_dev:
            raise ValueError(
                f"config.{field}={size} must be a positive multiple of the number of devices in the mesh "
                f"({n_dev}; config.mesh.data={config.mesh.data}, config.mesh.fsdp={config.mesh.fsdp})"
            )
    if grad_cache.micro_batches(config, n_dev) and family.micro_batch_outputs(config) is None:
        raise ValueError(f"config.micro_batch_size={config.micro_batch_size}: model family {family.name!r} "
                         "does not support micro-batches (its micro_batch_outputs is None); unset it")
    optim.parse_group_rules(config.optim.get("param_groups"))
    parallel.parse_sharding_rules(config.mesh.get("rules", ()))
    family.validate(config)


def _random_params(model, batch, rng) -> dict:
    return model.init(rng, batch)["params"]


def abstract_params(model, config) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct (nothing is computed or allocated)."""
    batch = get_family(config.model_family).init_batch(config)
    return jax.eval_shape(lambda r: _random_params(model, batch, r), jax.random.PRNGKey(0))


def init_params(model, config, rng) -> dict:
    """Random init of the whole model, then the family's pretrained subtrees (init checkpoint).

    Unsharded (default device): for single-device tools and tests. The trainer uses
    `sharded_init`, which never materializes this full copy.
    """
    family = get_family(config.model_family)
    batch = family.init_batch(config)
    params = jax.jit(lambda r: _random_params(model, batch, r))(rng)
    pretrained = family.pretrained(model, config)
    if pretrained:
        params = {**params, **jax.tree.map(jnp.asarray, pretrained)}
    return params


class ShardedInit(NamedTuple):
    """How `sharded_init` creates the train state.

    abstract: TrainState of jax.ShapeDtypeStruct carrying their target `.sharding` (also the
      template for `checkpoints.Checkpointer.restore`).
    shardings: TrainState of NamedSharding (`parallel.param_shardings` of the abstract state).
    fn: jax.jit(init, out_shardings=shardings, donate_argnums=1): (rng, pretrained) -> TrainState,
      where pretrained is None (all random) or {top-level parameter name: subtree} already placed
      with their target shardings (e.g. {"base_model": CLIP towers}; they are donated and replace
      those subtrees of the random init).
    """

    abstract: Any
    shardings: Any
    fn: Callable


def sharded_init(model, config, tx: optax.GradientTransformation, mesh, strategy: str | None = None) -> ShardedInit:
    """The train state's shardings and a jitted init that creates it directly in them (no compute)."""
    strategy = config.mesh.strategy if strategy is None else strategy
    batch = get_family(config.model_family).init_batch(config)

    def init(rng, pretrained):
        params = _random_params(model, batch, rng)
        if pretrained:  # the random subtrees they replace are dead code, removed by XLA
            params = {**params, **pretrained}
        return create_train_state(params, tx)

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0), None)
    shardings = parallel.param_shardings(abstract, mesh, strategy, rules=config.mesh.get("rules", ()) or ())
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    fn = jax.jit(init, out_shardings=shardings, donate_argnums=(1,))
    return ShardedInit(abstract, shardings, fn)


def init_train_state(model, config, tx: optax.GradientTransformation, mesh, rng,
                     strategy: str | None = None) -> tuple[TrainState, Any]:
    """Creates the train state directly in its shardings -> (state, state shardings).

    Random parameters are generated shard by shard inside one jit with out_shardings. The family's
    pretrained subtrees (e.g. CLIP towers from `config.model.init_checkpoint`) are read on the host
    (numpy) and each leaf is placed with its target sharding (`parallel.put_sharded_like`: every
    device receives only its slice); they never exist as a replicated device copy.
    """
    init = sharded_init(model, config, tx, mesh, strategy)
    pretrained = get_family(config.model_family).pretrained(model, config)
    placed = None
    if pretrained:
        unknown = sorted(set(pretrained) - set(init.abstract.params))
        if unknown:
            raise ValueError(f"config.model_family={config.model_family!r}: pretrained weights for {unknown}, "
                             f"which the model does not have (its parameters: {sorted(init.abstract.params)})")
        placed = {name: parallel.put_sharded_like(tree, init.abstract.params[name])
                  for name, tree in pretrained.items()}
        del pretrained
    return init.fn(rng, placed), init.shardings


def _spec_text(spec) -> str:
    if all(s is None for s in spec):
        return "replicated"
    return "(" + ", ".join("-" if s is None else s if isinstance(s, str) else "+".join(s) for s in spec) + ")"


def param_table(config, params, shardings) -> str:
    """Which parameter got which learning rate, weight decay and sharding, as a printable table.

    params: the parameter tree (arrays or jax.ShapeDtypeStruct); shardings: its NamedSharding tree.
    The lr multiplier and weight decay come from config.optim (base lr, weight_decay and the
    param_groups rules, `optim.param_group_trees`); the sharding from config.mesh (strategy and
    rules, `parallel.param_shardings`). Layers that differ only in their index (resblocks_0,
    resblocks_1, ...) and agree on everything else share a row (`_*`, count in the last column).
    """
    import re

    lr_mults, wds = optim.param_group_trees(config.optim, params)
    rows: dict[tuple, int] = {}
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (path, x), mult, wd, sh in zip(leaves, jax.tree.leaves(lr_mults), jax.tree.leaves(wds),
                                       jax.tree.leaves(shardings)):
        name = re.sub(r"_\d+(?=/)", "_*", parallel.path_name(path))
        key = (name, "x".join(map(str, x.shape)) or "scalar", f"{mult:g}", f"{wd:g}", _spec_text(sh.spec))
        rows[key] = rows.get(key, 0) + 1
    header = ("parameter", "shape", "lr_mult", "weight_decay", "sharding", "n")
    body = [key + (str(n),) for key, n in rows.items()]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    n_values = sum(int(np.prod(x.shape)) for _, x in leaves)
    title = (f"Parameters: {len(leaves)} arrays, {n_values:,} values; lr = {float(config.optim.lr):g} x lr_mult x "
             f"schedule; mesh {dict(jax.tree.leaves(shardings)[0].mesh.shape)}, strategy {config.mesh.strategy!r}")
    return "\n".join([title, line(header)] + [line(r) for r in body])


def _stack_mean(history: list[dict]) -> dict[str, float]:
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
    return {k: float(np.mean(v)) for k, v in stacked.items()}


def train(config: ml_collections.ConfigDict, workdir: str, train_iter_fn: Callable[[int], Iterator],
          steps_per_epoch: int, devices=None, periodic_eval: Callable | None = None,
          writer: MetricWriter | None = None) -> TrainResult:
    """Trains `config.num_epochs` epochs (resuming from the latest checkpoint in `workdir`).

    Args:
      train_iter_fn: start_step -> iterator of per-process numpy batches beginning at that step.
      steps_per_epoch: optimizer steps per epoch (global batch).
      devices: the mesh's devices (default: all devices of all processes).
      periodic_eval: called as periodic_eval(model, mesh, params, step) at the end of every epoch
        but the last (it decides what runs then; main runs the evaluators of config.evals that
        are due).
      writer: where scalars go (default: a new MetricWriter on `workdir`, chief process only).
    Returns: TrainResult(state, model, mesh, stopped).
    """
    family = get_family(config.model_family)
    model = family.build(config)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    total_steps = int(config.num_epochs * steps_per_epoch)
    is_chief = jax.process_index() == 0

    tx, lr_schedule = optim.make_optimizer(config.optim, abstract_params(model, config), steps_per_epoch)
    init = sharded_init(model, config, tx, mesh)
    state_shardings = init.shardings
    if is_chief and config.get("param_table", True):
        print(param_table(config, init.abstract.params, init.shardings.params), flush=True)

    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    start_step = ckpt.latest_step() or 0

    # config.micro_batch_size < per-device batch: the same step with gradient caching.
    grad_fn = grad_cache.grad_fn_from_config(model, family, config, mesh)
    step_fn = jax.jit(
        make_train_step(model, family.loss_fn(config), tx, grad_fn,
                        dropout_rng=jax.random.PRNGKey(config.seed + 1)),
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
    # One step ahead: batch s+1 is pulled, assembled and sent to the devices right after step s
    # is dispatched, while step s runs. The source iterator is consumed exactly as far as the
    # steps that run (never past the last step, nor past a step where training stops).
    # The first batch is pulled now (unless a stop came first) and the step compiles on it in a
    # thread while the state is initialized or restored.
    batches = parallel.prefetch_to_mesh(train_iter_fn(start_step), mesh, size=1)
    batch = next(batches) if start_step < total_steps and not checkpoints.stop_requested() else None
    compiled_step = _compile_in_background(step_fn, init.abstract, batch) if batch is not None else None
    if start_step:  # read straight into the target shardings; nothing is initialized first
        state = ckpt.restore(init.abstract, step=start_step)
        print(f"Resumed from {ckpt.directory} at step {start_step}.", flush=True)
    else:
        state, _ = init_train_state(model, config, tx, mesh, jax.random.PRNGKey(config.seed))
    writer = writer or MetricWriter(workdir, enabled=is_chief)
    progress = ProgressBar(total_steps, start_step, enabled=is_chief and config.progress_bar)
    # A stop requested before this point (e.g. by a signal during compilation) is honoured before
    # the first step; the flag is cleared when train() returns.
    installed_handlers = checkpoints.install_signal_handlers()
    poller = checkpoints.StopPoller()
    profile = tuple(config.get("profile_steps", ()) or ())
    last_saved = start_step

    def save(step: int):
        nonlocal last_saved
        if int(jax.device_get(state.nonfinite)):
            return  # never overwrite a good checkpoint with a diverged state
        ckpt.save(step, state)
        last_saved = step

    history: list[dict] = []
    t_last, step_last = time.time(), start_step
    step = start_step
    try:
        if start_step < total_steps and poller.first():
            print(f"Stopped by signal before step {start_step + 1}; nothing new to save.", flush=True)
            return TrainResult(state, model, mesh, stopped=True)
        if compiled_step is not None:
            step_fn = compiled_step.result()
        elif start_step < total_steps:
            batch = next(batches)
        for step in range(start_step + 1, total_steps + 1):
            if profile and step == profile[0]:
                jax.profiler.start_trace(config.get("profile_dir") or logging_utils.join(workdir, "profile"))
            state, metrics = step_fn(state, batch)  # asynchronous dispatch
            history.append(metrics)
            # Every step: a signal stops training at the step running when it arrives (all
            # processes agree on the step, see checkpoints.StopPoller), before the next batch.
            stop = poller.poll()
            if step < total_steps and not stop:
                batch = next(batches)
            if profile and step == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            ckpt.check()  # a background save that failed stops training here, not later
            if stop or step % config.log_every == 0 or step == total_steps:
                summary = _stack_mean(history)
                first = step - len(history) + 1
                history.clear()
                if not np.isfinite(summary["loss"]) or int(jax.device_get(state.nonfinite)):
                    raise TrainingDiverged(_diverged_message(ckpt, first, step, summary["loss"]))
                now = time.time()
                summary["steps_per_sec"] = (step - step_last) / max(now - t_last, 1e-9)
                summary["lr"] = float(lr_schedule(step - 1))
                summary["epoch"] = (step - 1) // steps_per_epoch
                t_last, step_last = now, step
                writer.scalars(step, summary)
                progress.update(step, summary)
            if stop:
                save(step)
                ckpt.wait()
                progress.close()
                print(f"Stopped by signal at step {step}; checkpoint saved in {ckpt.directory}.", flush=True)
                return TrainResult(state, model, mesh, stopped=True)
            if step % config.ckpt_every_steps == 0:
                save(step)
            if periodic_eval and step % steps_per_epoch == 0 and step != total_steps:
                periodic_eval(model, mesh, state.params, step)
        if step != last_saved:
            save(step)
        ckpt.wait()
    finally:
        _quietly(ckpt.close, progress.close, writer.flush)
        if installed_handlers:
            checkpoints.restore_signal_handlers()
        checkpoints.reset_stop()
    return TrainResult(state, model, mesh, stopped=False)


def _compile_in_background(step_fn, abstract_state, batch) -> concurrent.futures.Future:
    """Future of `step_fn` compiled for (abstract_state, batch), compiled in a thread.

    Lowered on the abstract state (shapes and shardings only), so the compile overlaps the state's
    init or restore, which compiles and runs its own program. (The input pipeline stays on the
    calling thread: a tf.data iterator created in another thread took 30-50 s to delete at the
    end of training.) Compile errors are raised by `.result()`.
    """
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xmr-compile")
    try:
        return pool.submit(lambda: step_fn.lower(abstract_state, batch).compile())
    finally:
        pool.shutdown(wait=False)


def _quietly(*closers: Callable[[], Any]) -> None:
    """Runs every closer; while an exception propagates, their own errors do not replace it."""
    import sys

    propagating = sys.exc_info()[1] is not None
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # pylint: disable=broad-except
            first = first or e
    if first is not None and not propagating:
        raise first


def _diverged_message(ckpt: checkpoints.Checkpointer, first: int, last: int, loss: float) -> str:
    """What happened and the true state of the checkpoints (after pending saves finish)."""
    try:
        ckpt.wait()
    except checkpoints.CheckpointSaveError:
        pass  # its step was removed; all_steps() below tells what is on disk
    steps = ckpt.all_steps()
    span = f"at step {last}" if first == last else f"between steps {first} and {last}"
    if steps:
        where = (f"The last good checkpoint is step {steps[-1]} in {ckpt.directory} (a diverged state "
                 "is never saved); a rerun resumes from it.")
    else:
        where = f"No checkpoint was written ({ckpt.directory} is empty); a rerun starts from scratch."
    return (f"loss became NaN/Inf {span} (mean loss {loss}); training stopped. {where} "
            "Lower optim.lr, enable optim.grad_clip, or use precision=float32.")


def write_config(config: ml_collections.ConfigDict, workdir: str, name: str = "config") -> None:
    """Writes {name}.json (and the readable {name}.txt) into the workdir (any epath filesystem),
    on the chief process only."""
    if jax.process_index() != 0:
        return
    logging_utils.write_text(logging_utils.join(workdir, f"{name}.json"), config.to_json_best_effort(indent=2))
    logging_utils.write_text(logging_utils.join(workdir, f"{name}.txt"), str(config))
