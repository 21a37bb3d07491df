"""Checkpoints (orbax CheckpointManager) and preemption handling: the one place that reads and
writes them.

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``; ``state`` is the train state pytree
(``xmr_jax.train.TrainState(step, params, opt_state, nonfinite)``), ``meta`` an optional JSON dict
(config, data set sizes, ...). The newest ``keep`` checkpoints are kept.

Writing and resuming: ``Checkpointer`` (the trainer). Model selection: ``BestCheckpoint`` keeps the
parameters of the best validation result under ``<workdir>/best`` (never deleted by keep-N). Reading without the trainer (evaluation,
export, search, converted CLIP folders): ``find_checkpoint`` resolves a workdir, its checkpoints
folder or one step folder (plus an optional step) to one finished step, and ``load_params`` reads
only the ``params`` subtree of that step (no template, no optimizer state), onto devices or as
host numpy arrays. Both use the same orbax API as the trainer: a (read-only) CheckpointManager.

The trainer's loop (xmr_jax.train.train; every process runs the same code)::

    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    init = sharded_init(model, config, tx, mesh)   # init.abstract: ShapeDtypeStructs with shardings
    start = ckpt.latest_step() or 0
    state = ckpt.restore(init.abstract, step=start) if start else init_train_state(...)[0]
    install_signal_handlers()                      # SIGTERM/SIGINT -> flag, no exception
    poller = StopPoller()
    for step in range(start + 1, total_steps + 1):
      state, metrics = train_step(state, batch)    # train_step(state, batch) -> (state, metrics)
      stop = poller.poll()                         # a signal arrived (all processes agree)
      ckpt.check()                                 # a failed background save stops training here
      if stop or step % config.ckpt_every_steps == 0:
        ckpt.save(step, state)                     # async: returns after the device->host copy
      if stop:
        break
    ckpt.close()                                   # waits for pending async writes
    restore_signal_handlers()

``save`` returns once the arrays are copied off the devices, so the state may be donated to the
next step while the files are being written in the background.

Failures: a save that fails (disk full, permission denied, ...) raises ``CheckpointSaveError``
(message: the step, the folder and the cause) from ``save`` / ``check`` / ``wait``; its unfinished
step folder is removed, the older checkpoints stay as they were, and orbax's own multi-line error
logs for it are held back (shown with ``--verbosity=1``). ``check()`` costs nothing while no save is
pending and surfaces a background failure at the next step.

Preemption: SIGTERM / SIGINT set a flag (``install_signal_handlers``); ``StopPoller`` turns it
into a per-step decision that every process takes at the same step; the trainer then saves and
the main job exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "resubmit the same command").
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from xmr_jax import logging_utils

PyTree = Any
_log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; resubmit to resume


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree or shapes differ from the restore template."""


class CheckpointSaveError(RuntimeError):
    """Writing checkpoint `step` into `directory` failed; `cause` says why (one line)."""

    def __init__(self, step: int, directory: str, cause: str, kept: list[int]):
        self.step, self.directory, self.cause, self.kept = step, directory, cause, kept
        older = (f"the newest complete checkpoint is step {kept[-1]}" if kept
                 else "no complete checkpoint exists")
        super().__init__(f"could not save checkpoint step {step} in {directory}: {cause}; training "
                         f"stopped. The unfinished step was removed; {older}.")


class _HeldBackOrbaxErrors(logging.Filter):
    """Drops orbax's ERROR records (multi-line tracebacks from its background threads) while a
    Checkpointer turns the failure into one CheckpointSaveError; kept in `records` for debugging.
    Inactive when absl logs at DEBUG (--verbosity=1 or more)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
        if from_orbax and record.levelno >= logging.ERROR and logging.getLogger("absl").getEffectiveLevel() > logging.DEBUG:
            self.records = (self.records + [record])[-20:]
            return False
        return True


_ORBAX_ERRORS = _HeldBackOrbaxErrors()


class _ReadOnlyNotice(logging.Filter):
    """Drops orbax's 'Given directory is read only=...' warning, logged whenever a reader (a
    read-only CheckpointManager, see `_reader`) is opened: reading is all a reader does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Given directory is read only" not in str(record.getMessage())


_READ_ONLY_NOTICE = _ReadOnlyNotice()


def _hold_back_orbax_errors() -> None:
    absl_logger = logging.getLogger("absl")
    if _ORBAX_ERRORS not in absl_logger.filters:
        absl_logger.addFilter(_ORBAX_ERRORS)
    if not getattr(sys.unraisablehook, "_xmr_drops_closed_loop", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _drop_closed_loop_callbacks(previous):
    """After an async save fails, orbax's event loop is closed while tensorstore still completes
    the other writes of that save; each completion's callback then raises 'Event loop is closed'
    in a tensorstore thread (reported through sys.unraisablehook: a 6-line traceback per array,
    hundreds for a model). Those, and only those, are dropped: the failure itself is reported once
    as CheckpointSaveError."""

    def hook(unraisable):
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook._xmr_drops_closed_loop = True  # pylint: disable=protected-access
    return hook


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
        self.directory = logging_utils.join(workdir, "checkpoints")
        self._pending: int | None = None  # step of a save that may still be running
        self._failed: CheckpointSaveError | None = None
        _hold_back_orbax_errors()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args_type in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add("state", args_type, ocp.StandardCheckpointHandler)
        for args_type in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("meta", args_type, ocp.JsonCheckpointHandler)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep is None else int(keep),
            save_interval_steps=1,
            create=True,
            # Unfinished step folders of an earlier run (killed mid-save) never confuse a resume.
            cleanup_tmp_directories=True,
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
        self.wait()  # one save at a time; raises CheckpointSaveError for an earlier failed one
        if step in self._mngr.all_steps():
            _log.info("checkpoint for step %d already exists in %s; not saving again", step, self.directory)
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(metadata or {}))
        )
        self._pending = step
        try:
            saved = bool(self._mngr.save(step, args=args, force=True))
        except Exception as e:  # pylint: disable=broad-except
            raise self._fail(e) from None
        if not self._mngr.is_saving_in_progress():
            self.wait()  # a synchronous save: report its failure now
        return saved

    def check(self) -> None:
        """Raises CheckpointSaveError if a background save has failed; never blocks (call it
        every step)."""
        if self._failed is not None:
            raise self._failed
        if self._pending is not None and not self._mngr.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until pending async saves are written; raises CheckpointSaveError if one failed."""
        if self._failed is not None:
            raise self._failed
        try:
            self._mngr.wait_until_finished()
            self._mngr.check_for_errors()
        except Exception as e:  # pylint: disable=broad-except
            raise self._fail(e) from None
        self._pending = None

    def _fail(self, err: BaseException) -> CheckpointSaveError:
        """Removes the unfinished step, returns the one-line error (raised again by later calls)."""
        step = self._pending
        self._pending = None
        try:  # let orbax's writer threads end first, or they may recreate the step's tmp folder
            self._mngr.wait_until_finished()
        except Exception:  # pylint: disable=broad-except
            pass  # the same failure, reported below
        try:
            self._remove_unfinished(step)
        except Exception as cleanup_err:  # pylint: disable=broad-except
            _log.warning("could not remove the unfinished checkpoint step %s: %s", step, cleanup_err)
        try:
            self._mngr.reload()
            kept = sorted(self._mngr.all_steps())
        except Exception:  # pylint: disable=broad-except
            kept = []
        self._failed = CheckpointSaveError(step, self.directory, logging_utils.describe_os_error(err), kept)
        self._failed.__cause__ = err
        return self._failed

    def _remove_unfinished(self, step: int | None) -> None:
        if step is None or jax.process_index() != 0:
            return
        root = logging_utils.as_path(self.directory)
        if not root.exists():
            return
        unfinished = re.compile(rf"^{int(step)}(\.orbax-checkpoint-tmp.*)?$")
        for child in root.iterdir():
            if unfinished.match(child.name):
                child.rmtree() if child.is_dir() else child.unlink()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads. After a failed save it only
        releases (the failure was raised already)."""
        try:
            if self._failed is None:
                self.wait()
        finally:
            try:
                self._mngr.close()
            except Exception:  # pylint: disable=broad-except
                if self._failed is None:
                    raise
            if self._failed is not None:
                # orbax's threads are joined now: remove what they wrote after the failure.
                self._remove_unfinished(self._failed.step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restore ---------------------------------------------------------------------------------
    def _resolve_step(self, step: int | None) -> int:
        return _pick_step(self._mngr.all_steps(), step, self.directory)

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


class BestCheckpoint:
    """The parameters of the best evaluation so far (model selection), apart from the trainer's.

    Layout: ``<workdir>/best/checkpoints/<step>/state`` holds ``{"params": ...}`` of that step
    (the `save_params` layout: ``load_params(<workdir>/best)`` and ``--mode=eval
    --checkpoint=<workdir>/best`` read it) and ``<workdir>/best/best.json`` describes it:
    {"step", "eval", "metric", "mode", "value"}. Its own folder, so the trainer's keep-N never
    deletes it; only the newest best step is kept. The record survives a resume: a rerun compares
    against the best of the earlier run.

    Args:
      workdir: the run's work directory (local path or gs://...).
      eval_name / metric / mode: what selects (recorded, and checked against an existing record:
        a workdir selected by another rule raises ValueError); mode "max" or "min".
    """

    def __init__(self, workdir: str, eval_name: str, metric: str, mode: str):
        if mode not in ("max", "min"):
            raise ValueError(f"config.select.mode={mode!r}: expected 'max' or 'min'")
        self.directory = logging_utils.join(workdir, "best")
        self.eval_name, self.metric, self.mode = eval_name, metric, mode
        self._record_path = logging_utils.join(self.directory, "best.json")
        self.record = self._read_record()

    def _read_record(self) -> dict | None:
        import json

        path = logging_utils.as_path(self._record_path)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        rule = {"eval": self.eval_name, "metric": self.metric, "mode": self.mode}
        if {k: record.get(k) for k in rule} != rule:
            raise ValueError(
                f"{self._record_path} selects by {({k: record.get(k) for k in rule})}, but config.select says "
                f"{rule}; use a new --workdir or remove {self.directory}")
        return record

    def is_better(self, value: float) -> bool:
        """True when `value` beats the recorded best (ties keep the earlier step; NaN never wins)."""
        value = float(value)
        if not np.isfinite(value):
            return False
        if self.record is None:
            return True
        best = float(self.record["value"])
        return value > best if self.mode == "max" else value < best

    def offer(self, step: int, params: PyTree, value: float) -> bool:
        """Saves `params` as the best (synchronously, replacing the previous best) when `value`
        beats the record; returns whether it did."""
        import json

        if not self.is_better(value):
            return False
        with Checkpointer(self.directory, keep=1, async_save=False) as ckpt:
            if int(step) in ckpt.all_steps():  # the same step offered again (a rerun): keep it
                pass
            else:
                ckpt.save(int(step), {"params": params})
        self.record = {"step": int(step), "eval": self.eval_name, "metric": self.metric, "mode": self.mode,
                       "value": float(value)}
        if jax.process_index() == 0:
            logging_utils.write_text(self._record_path, json.dumps(self.record, indent=2))
        return True

    def load_params(self, like: PyTree | None = None) -> tuple[PyTree, int]:
        """(params, step) of the recorded best; FileNotFoundError when none was saved.

        like: a params tree (jax.Arrays, e.g. the trained ones) whose shardings the restored
        leaves take (no device holds more than its shards; jitted functions of the trained
        params run on them without recompiling); default: replicated over all devices.
        """
        if self.record is None:
            raise FileNotFoundError(f"{self.directory}: no best checkpoint was saved")
        step = int(self.record["step"])
        if like is None:
            return load_params(self.directory, step=step)
        item = abstract_like(like)
        args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), item)
        with _reader(logging_utils.join(self.directory, "checkpoints")) as mngr:
            out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": item}, restore_args={"params": args}, partial_restore=True)))
        return out["state"]["params"], step


# ----------------------------------------------------------------------------------------------
# Readers: one step resolver and one orbax API (a read-only CheckpointManager) for every tool that
# reads a checkpoint without the trainer (evaluation, export, search, converted CLIP folders).
# ----------------------------------------------------------------------------------------------

_EXPECTED = ("expected a training workdir (holding checkpoints/<step>/state), its checkpoints "
             "folder, or one checkpoints/<step> folder")


def _where(path: Any, flag: str | None) -> str:
    return f"{flag}={path}" if flag else f"checkpoint path {path}"


def _pick_step(steps: Iterable[int], step: int | None, directory: Any, flag: str | None = None,
               path: Any = None) -> int:
    """`step` if it is one of `steps`, the newest of `steps` when `step` is None; else
    FileNotFoundError naming the folder (and the flag and `path` it came from) and the saved steps."""
    steps = sorted(int(s) for s in steps)
    prefix = f"{flag}={path if path is not None else directory}: " if flag else ""
    if not steps:
        raise FileNotFoundError(f"{prefix}no checkpoint found in {directory}: expected step folders "
                                "<step>/state written by xmr_jax.checkpoints.Checkpointer")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise FileNotFoundError(f"{prefix}no checkpoint for step {step} in {directory}; saved steps: {steps}")
    return int(step)


def _checkpoints_folder(path: Any, step: int | None, flag: str | None) -> tuple[Any, int | None]:
    """(the checkpoints folder, the step a step-folder path names or `step`) for a workdir, its
    checkpoints folder or one step folder. Reads folder names only."""
    p = logging_utils.as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{_where(p, flag)} does not exist: {_EXPECTED}")
    if not p.is_dir():
        raise FileNotFoundError(f"{_where(p, flag)} is a file: {_EXPECTED}")
    if (p / "state").is_dir():  # one step folder
        if not p.name.isdigit():
            raise FileNotFoundError(f"{_where(p, flag)} holds a 'state' folder but is not named by a "
                                    f"step number: {_EXPECTED}")
        if step is not None and int(step) != int(p.name):
            raise ValueError(f"{_where(p, flag)} is step {p.name}, but step {step} was requested")
        return p.parent, int(p.name)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    return p, step


def is_checkpoint_path(path: Any) -> bool:
    """True when `path` is a folder that `find_checkpoint` would search: a workdir with a
    checkpoints folder, a checkpoints folder (holding <step>/state folders) or one <step> folder
    holding a 'state' item. Reads folder names only."""
    p = logging_utils.as_path(path)
    if not p.is_dir():
        return False
    if (p / "checkpoints").is_dir() or (p / "state").is_dir():
        return True
    return any(c.name.isdigit() and (c / "state").is_dir() for c in p.iterdir())


class _reader:  # pylint: disable=invalid-name
    """Context manager: a read-only orbax CheckpointManager on a checkpoints folder.

    Lists the finished steps exactly as the trainer's Checkpointer does (unfinished
    `*.orbax-checkpoint-tmp*` folders, and on object stores steps without a commit marker, are not
    steps) and restores any part of the ``state`` item (PyTreeRestore with partial_restore) or the
    ``meta`` item. Creates, removes and writes nothing.
    """

    def __init__(self, directory: Any):
        self.directory = directory

    def __enter__(self) -> ocp.CheckpointManager:
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
        registry.add("meta", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_READ_ONLY_NOTICE)
        try:
            self._mngr = ocp.CheckpointManager(logging_utils.path_str(self.directory), options=options,
                                              handler_registry=registry)
        finally:
            absl_logger.removeFilter(_READ_ONLY_NOTICE)
        return self._mngr

    def __exit__(self, *exc):
        self._mngr.close()


def find_checkpoint(path: Any, step: int | None = None, *, flag: str | None = None) -> tuple[str, int]:
    """The one step resolver: (step folder, step) of the checkpoint `load_params` reads.

    path: a training workdir (``<path>/checkpoints/<step>/state``), its ``checkpoints`` folder, or
    one ``<step>`` folder; step: which step (default the newest finished one; with a step folder
    it must be None or that folder's step). flag: the command-line flag `path` came from (e.g.
    "--checkpoint"), named in the error. Reads no array. Raises FileNotFoundError saying what was
    found and what was expected.
    """
    directory, step = _checkpoints_folder(path, step, flag)
    with _reader(directory) as mngr:
        step = _pick_step(mngr.all_steps(), step, directory, flag, path)
    return logging_utils.join(directory, str(step)), step


def _restore_args(meta: PyTree, sharding, host: bool) -> tuple[PyTree, PyTree]:
    """(item, restore_args) trees for a PyTreeRestore of the tree described by `meta`."""
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    if host:
        item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta, is_leaf=is_leaf)
        return item, jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    if sharding is None:
        sharding = _replicated_all()
    pick = sharding if callable(sharding) else (lambda shape: sharding)
    item = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=pick(tuple(m.shape))),
        meta, is_leaf=is_leaf)
    args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), item)
    return item, args


def load_params(path: Any, step: int | None = None, sharding=None, *, host: bool = False,
                flag: str | None = None) -> tuple[PyTree, int]:
    """Reads only the ``params`` subtree of a saved train state (no template, no optimizer state).

    path, step, flag: as `find_checkpoint` (the same resolver). sharding: a
    jax.sharding.Sharding for every leaf, or a callable (shape -> Sharding); default replicated
    over all devices. host: return numpy arrays on the host instead (no device placement, so a
    checkpoint written on any mesh loads in a single CPU process; `sharding` is then unused).
    Returns (params as a nested dict of jax.Array or numpy arrays, step).
    """
    directory, step = _checkpoints_folder(path, step, flag)
    with _reader(directory) as mngr:
        step = _pick_step(mngr.all_steps(), step, directory, flag, path)
        meta = mngr.item_metadata(step)["state"]
        meta = getattr(meta, "tree", meta)
        if not isinstance(meta, Mapping) or "params" not in meta:
            raise CheckpointMismatchError(
                f"checkpoint {logging_utils.join(directory, str(step), 'state')} "
                "has no 'params' entry at its top level")
        item, restore_args = _restore_args(meta["params"], sharding, host)
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": item}, restore_args={"params": restore_args}, partial_restore=True)))
    return out["state"]["params"], step


def save_params(workdir: Any, params: PyTree, step: int = 0, metadata: Mapping[str, Any] | None = None) -> str:
    """Writes ``{"params": params}`` as checkpoint `step` of ``<workdir>/checkpoints`` (the
    trainer's layout, read back by `load_params`); synchronous. Returns the step folder."""
    with Checkpointer(workdir, keep=None, async_save=False) as ckpt:
        if not ckpt.save(step, {"params": params}, metadata=metadata):
            raise FileExistsError(f"{ckpt.directory} already holds checkpoint step {step}")
        return logging_utils.join(ckpt.directory, str(step))


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


def install_signal_handlers(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> bool:
    """Makes SIGTERM / SIGINT set the stop flag (``should_stop()``) instead of killing the process.

    Must be called from the main thread. A second SIGINT raises KeyboardInterrupt. Undo with
    ``restore_signal_handlers()``. Returns False (and changes nothing) when they are installed
    already, so a caller nested in another that installed them leaves them to that caller.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers() must be called from the main thread")
    if _PREVIOUS_HANDLERS:
        return False
    for sig in signals:
        _PREVIOUS_HANDLERS[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)
    return True


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


def stop_requested() -> bool:
    """This process's flag (no communication)."""
    return _STOP.is_set()


def should_stop() -> bool:
    """True once a stop was requested on ANY process (blocking).

    Single process: reads the local flag. Several processes: an all-gather of the flags (a
    collective: every process must call it at the same point), so that all processes agree.
    In the train loop use ``StopPoller``, which costs nothing per step.
    """
    local = _STOP.is_set()
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    flags = multihost_utils.process_allgather(np.asarray([local], dtype=np.int32))
    return bool(np.asarray(flags).any())


class StopPoller:
    """The per-step stop decision of the train loop, the same on every process.

    One process: ``poll()`` reads the local flag (free), so a signal stops training at the step
    that is running when it arrives. Several processes: every ``poll()`` dispatches an
    asynchronous max-reduction of all processes' flags (a scalar per device, queued behind the
    step just dispatched) and decides on the reduction dispatched by the previous ``poll()``,
    whose result is ready or nearly so: no host round trip is added to the step, and all
    processes, which call ``poll()`` once per step, see the same value at the same call.
    """

    def __init__(self):
        self._multi = jax.process_count() > 1
        self._pending = None
        if self._multi:  # every device, each process's devices contiguous
            devices = np.asarray(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
            flat = jax.sharding.Mesh(devices, ("all",))
            self._sharding = NamedSharding(flat, P("all"))
            self._n_local = sum(d.process_index == jax.process_index() for d in devices)
            self._reduce = jax.jit(lambda f: f.max(), out_shardings=NamedSharding(flat, P()))

    def first(self) -> bool:
        """Before the first step: a blocking agreement (once)."""
        return should_stop()

    def poll(self) -> bool:
        if not self._multi:
            return _STOP.is_set()
        local = np.full((self._n_local,), int(_STOP.is_set()), np.int32)
        flags = jax.make_array_from_process_local_data(self._sharding, local)
        previous, self._pending = self._pending, self._reduce(flags)
        return previous is not None and bool(jax.device_get(previous))
