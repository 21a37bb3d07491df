"""Checkpointing (orbax CheckpointManager) and preemption handling.

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``; ``state`` is the train state pytree
(xmr_jax.optim.TrainState(step, params, opt_state)), ``meta`` an optional JSON dict (config, data
set sizes, ...). The newest ``keep`` checkpoints are kept.

Intended trainer loop (every process runs the same code)::

    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    install_signal_handlers()                      # SIGTERM/SIGINT -> flag, no exception
    abstract = jax.eval_shape(init_state)          # ShapeDtypeStruct tree
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_shardings)
    state = ckpt.restore(abstract) if ckpt.latest_step() is not None else jitted_init(rng)
    for step in range(int(state.step), total_steps):
      state, metrics = train_step(state, batch, rng)
      if (step + 1) % config.ckpt_every == 0:
        ckpt.save(step + 1, state)                 # async: returns after the device->host copy
      if should_stop():                            # a signal arrived (all processes agree)
        ckpt.save(step + 1, state, force=True)
        break
    ckpt.close()                                   # waits for pending async writes
    restore_signal_handlers()

``save`` returns once the arrays are copied off the devices, so the state may be donated to the
next step while the files are being written in the background.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any
_log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree or shapes differ from the restore template."""


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_by_name(tree: PyTree, is_leaf=None) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _replicated_all() -> NamedSharding:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return NamedSharding(mesh, P())


def abstract_like(template: PyTree) -> PyTree:
    """ShapeDtypeStruct tree (with shardings) from arrays / ShapeDtypeStructs / numpy / scalars.

    jax.Array leaves keep their sharding; leaves without one are replicated over all devices.
    """

    def one(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            sharding = _replicated_all()
        return jax.ShapeDtypeStruct(
            np.shape(x), getattr(x, "dtype", None) or np.asarray(x).dtype, sharding=sharding
        )

    return jax.tree.map(one, template)


class Checkpointer:
    """Saves / restores the train state under ``<workdir>/checkpoints`` (orbax, async by default).

    Args:
      workdir: the run's work directory (local path or gs://...).
      keep: how many of the newest checkpoints to keep (None = all).
      async_save: write in a background thread (``wait()``/``close()`` block until done).
    """

    def __init__(self, workdir: str, keep: int | None = 3, async_save: bool = True):
        if keep is not None and int(keep) < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 or None, got {keep}")
        path = str(workdir)
        if "://" not in path:
            path = os.path.abspath(path)
        self.directory = os.path.join(path, "checkpoints")
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args_type in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add("state", args_type, ocp.StandardCheckpointHandler)
        for args_type in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("meta", args_type, ocp.JsonCheckpointHandler)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep is None else int(keep),
            save_interval_steps=1,
            create=True,
            enable_async_checkpointing=bool(async_save),
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # -- queries ---------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """Newest saved step (finished or still being written by this process), or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    # -- save ------------------------------------------------------------------------------------
    def save(
        self, step: int, state: PyTree, force: bool = False, metadata: Mapping[str, Any] | None = None
    ) -> bool:
        """Starts saving ``state`` as checkpoint ``step``; returns False if that step already exists.

        ``force`` is accepted for loop readability (every call saves: the trainer decides when);
        metadata: JSON-serializable dict stored next to the state.
        """
        del force  # save_interval_steps is 1; orbax never overwrites an existing step
        step = int(step)
        if step in self._mngr.all_steps():
            _log.info("checkpoint for step %d already exists in %s; not saving again", step, self.directory)
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(metadata or {}))
        )
        return bool(self._mngr.save(step, args=args, force=True))

    def wait(self) -> None:
        """Blocks until pending async saves are written."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restore ---------------------------------------------------------------------------------
    def _resolve_step(self, step: int | None) -> int:
        steps = self._mngr.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
            return max(steps)
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: {sorted(steps)}"
            )
        return int(step)

    def check_compatible(self, template: PyTree, step: int | None = None) -> None:
        """Raises CheckpointMismatchError naming parameters whose presence or shape differs."""
        step = self._resolve_step(step)
        saved = self._mngr.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        saved = _flat_by_name(saved, is_leaf=lambda x: hasattr(x, "shape"))
        saved = {k: tuple(v.shape) for k, v in saved.items() if v is not None}
        wanted = {k: tuple(np.shape(v)) for k, v in _flat_by_name(template).items()}
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        where = os.path.join(self.directory, str(step))
        if missing or extra:
            raise CheckpointMismatchError(
                f"checkpoint {where} does not match the model/optimizer: missing in checkpoint "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; not in the model "
                f"{extra[:10]}{' ...' if len(extra) > 10 else ''}"
            )
        bad = [(k, saved[k], wanted[k]) for k in sorted(wanted) if saved[k] != wanted[k]]
        if bad:
            lines = "; ".join(f"{k}: checkpoint {s} vs model {w}" for k, s, w in bad[:10])
            raise CheckpointMismatchError(f"checkpoint {where} has different shapes: {lines}")

    def restore(self, template: PyTree, step: int | None = None) -> PyTree:
        """Restores checkpoint ``step`` (default: the latest) into the structure/shardings of template.

        template: the train state as arrays (their shardings are used) or as jax.ShapeDtypeStruct
        with ``.sharding`` (e.g. from jax.eval_shape + param_shardings). The checkpoint may have been
        written under any other mesh/sharding/device count. Raises FileNotFoundError when there is no
        such checkpoint and CheckpointMismatchError when names or shapes differ.
        """
        step = self._resolve_step(step)
        self.check_compatible(template, step)
        abstract = abstract_like(template)
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return out["state"]

    def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata dict saved with checkpoint ``step`` (default: the latest)."""
        step = self._resolve_step(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})


def _resolve_step_dir(path: str, step: int | None) -> tuple[str, int]:
    """Accepts a step folder (<..>/checkpoints/<step>), a checkpoints folder, or a workdir."""
    path = str(path)
    if "://" not in path:
        path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if os.path.isdir(os.path.join(path, "state")):
        name = os.path.basename(os.path.normpath(path))
        if not name.isdigit():
            raise FileNotFoundError(f"{path} holds a 'state' folder but is not named by a step number")
        if step is not None and int(step) != int(name):
            raise ValueError(f"checkpoint path {path} is step {name}, but step={step} was requested")
        return path, int(name)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = sorted(
        int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n, "state"))
    )
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {path}: expected step folders <step>/state written by "
            "xmr_jax.checkpoints.Checkpointer"
        )
    if step is None:
        step = steps[-1]
    elif int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {path}; saved steps: {steps}")
    return os.path.join(path, str(int(step))), int(step)


def load_params(path: str, step: int | None = None, sharding=None) -> tuple[PyTree, int]:
    """Reads only the ``params`` subtree of a saved train state (no template, no optimizer state).

    path: a workdir, its ``checkpoints`` folder, or one step folder; step: default the latest.
    sharding: a jax.sharding.Sharding for every leaf, or a callable (shape -> Sharding);
    default replicated over all devices. Returns (params as a nested dict of jax.Array, step).
    """
    step_dir, step = _resolve_step_dir(path, step)
    state_dir = os.path.join(step_dir, "state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(state_dir)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    if not isinstance(meta, Mapping) or "params" not in meta:
        raise CheckpointMismatchError(f"checkpoint {state_dir} has no 'params' entry at its top level")
    if sharding is None:
        sharding = _replicated_all()
    pick = sharding if callable(sharding) else (lambda shape: sharding)
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=pick(tuple(m.shape))),
        meta["params"],
        is_leaf=is_leaf,
    )
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract
    )
    out = checkpointer.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True
        ),
    )
    return out["params"], step


# ----------------------------------------------------------------------------------------------
# Preemption: signals -> a flag the trainer polls
# ----------------------------------------------------------------------------------------------

_STOP = threading.Event()
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def _on_signal(signum, frame):
    del frame
    if _STOP.is_set() and signum == signal.SIGINT:
        # second Ctrl-C: give up on a clean stop
        restore_signal_handlers()
        raise KeyboardInterrupt
    _log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
    _STOP.set()


def install_signal_handlers(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Makes SIGTERM / SIGINT set the stop flag (``should_stop()``) instead of killing the process.

    Must be called from the main thread. A second SIGINT raises KeyboardInterrupt. Undo with
    ``restore_signal_handlers()``.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers() must be called from the main thread")
    for sig in signals:
        if sig not in _PREVIOUS_HANDLERS:
            _PREVIOUS_HANDLERS[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)


def restore_signal_handlers() -> None:
    """Puts back the handlers that were active before ``install_signal_handlers``."""
    for sig, handler in list(_PREVIOUS_HANDLERS.items()):
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        del _PREVIOUS_HANDLERS[sig]


def request_stop() -> None:
    """Sets the stop flag programmatically (as a signal would)."""
    _STOP.set()


def reset_stop() -> None:
    _STOP.clear()


def should_stop() -> bool:
    """True once a stop was requested on ANY process.

    Single process: reads the local flag. Several processes: an all-gather of the flags (a
    collective: every process must call it at the same steps, e.g. every ``log_every`` steps), so
    that all processes save the same step and stop together.
    """
    local = _STOP.is_set()
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    flags = multihost_utils.process_allgather(np.asarray([local], dtype=np.int32))
    return bool(np.asarray(flags).any())
