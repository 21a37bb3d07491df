r"""Entry point: `python -m xmr_jax.main --config=configs/demo.py --workdir=/tmp/demo`.

Config overrides: `--config.batch_size=32`, or big_vision style `--config=configs/demo.py:batch_size=32`.
Modes: train_and_eval (default), train, eval (the latest checkpoint in --workdir, --checkpoint=DIR,
or --checkpoint=FILE: a reference implementation's checkpoint that the config's model family
imports, e.g. IRRA's best.pth with its own class count). Multi-host: jax.distributed is
initialized from the TPU / SLURM environment or from --coordinator_address/--num_processes/--process_id.
What the model is, its loss, its evaluator and its text inputs come from the config's model
family (xmr_jax.models.families); this file holds nothing specific to one.

--workdir may be local or on any filesystem etils.epath knows (gs://bucket/run, ...): config,
metrics.jsonl, TensorBoard, evaluation reports and checkpoints all go there.
Training writes config.json/.txt, metrics.jsonl, tensorboard/, eval_metrics.json, checkpoints/.
Model selection (config.select, e.g. eval="val", metric="R1", mode="max"): the parameters of the
best result of that evaluator are kept in best/ (apart from checkpoints/, which keeps the newest
N); after training every other evaluator also runs on them ({prefix}_best_metrics.json), and
selection.json gives the test metrics at the best and at the last epoch (or says that there is no
selection: config.select.eval "" reports the last epoch, e.g. ICFG-PEDES, which has no val split).
Several seeds: --seeds=1,2,3 trains and evaluates in WORKDIR/seed_N for each, then writes
seeds.md / seeds.json (mean ± std of every metric, at the last epoch and, with selection, at the
best checkpoint: rows "eval" and "eval@best"). A rerun skips finished seeds.
--mode=eval checks the checkpoint before it writes anything, then writes only its own files:
eval_config.json/.txt and eval_checkpoint_metrics.json (never the training run's config.json).

Exit status:
  0   finished.
  1   failed while running: a checkpoint could not be saved (disk full, permissions), the loss
      diverged (NaN/Inf), or another file could not be written; one line on stderr says which.
  2   bad command line, config, workdir or checkpoint; one line on stderr names the flag or file.
  75  (EX_TEMPFAIL) stopped by SIGTERM/SIGINT: the step running when the signal arrived was
      checkpointed (if training had begun); resubmit the same command to resume.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import signal
import sys
from contextlib import contextmanager

# Before anything can import TensorFlow (a config file, the data pipeline): no C++ INFO banner.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL; = xmr_jax.checkpoints.EXIT_PREEMPTED (not imported: it pulls in jax)

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally with :key=value,...).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, config and metrics (local or gs://...).")
flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train", "eval"], "What to run.")
flags.DEFINE_string("checkpoint", None, "eval mode: a workdir or checkpoints folder to evaluate (default "
                    "--workdir), or a reference checkpoint file the model family imports (IRRA: best.pth).")
flags.DEFINE_string("seeds", None, "Train and evaluate once per seed (comma-separated, e.g. 1,2,3) in "
                    "WORKDIR/seed_N each, then write WORKDIR/seeds.md and seeds.json: mean +- std of the "
                    "metrics. A rerun skips finished seeds and resumes an unfinished one.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


class UserError(ValueError):
    """A flag, file or config value the user gave cannot be used (message names it)."""


class Preempted(Exception):
    """SIGTERM/SIGINT ended the run; training state up to the last step is checkpointed."""


# ----------------------------------------------------------------------------- the experiment


def run_experiment(config, workdir: str, mode: str = "train_and_eval", checkpoint: str | None = None) -> dict:
    """Trains and/or evaluates; returns {evaluator name: its final result} for the evaluators of
    config.evals (empty dict in train mode).

    Each evaluator runs after training (train_and_eval) or on the checkpoint (eval), and every
    `every_epochs` epochs during training; it writes {prefix}_metrics.json ({prefix}_checkpoint_...
    in eval mode) and logs under its prefix.

    Raises Preempted when a signal stopped training (after its checkpoint was saved).
    """
    import jax

    from data_pipelines import input_pipeline
    from xmr_jax import checkpoints, evaluate, logging_utils, train
    from xmr_jax.logging_utils import MetricWriter
    from xmr_jax.models.families import get_family

    workdir = logging_utils.path_str(workdir)
    train.validate_config(config)
    family = get_family(config.model_family)
    specs = evaluate.evaluator_specs(config)
    rule = evaluate.selection_rule(config, specs) if mode == "train_and_eval" else None
    best = checkpoints.BestCheckpoint(workdir, rule.spec.name, rule.metric, rule.mode) if rule else None
    import_file = None
    if mode == "eval":  # find what to evaluate before anything is built or written
        source = checkpoint or workdir
        if _is_file(source):
            if not family.checkpoint_format:
                raise UserError(f"--checkpoint={source}: config.model_family={family.name!r} imports no checkpoint "
                                "files; give a training workdir, its checkpoints folder or one <step> folder")
            import_file = source
        else:
            checkpoints.find_checkpoint(source)
    data = input_pipeline.from_config(config, jax.process_index(), jax.process_count(), text=family.text(config),
                                      images=family.images(config))
    family.complete_config(config, data.train_meta)
    steps_per_epoch = data.steps_per_epoch
    is_chief = jax.process_index() == 0
    train.write_config(config, workdir, name="eval_config" if mode == "eval" else "config")

    # Evaluation of a given checkpoint writes no training logs (metrics.jsonl, TensorBoard).
    writer = MetricWriter(workdir, enabled=is_chief) if mode != "eval" else None
    report_names = {spec.name: spec.prefix + ("_checkpoint" if mode == "eval" else "") for spec in specs}
    evaluated = {}  # eval mode: which checkpoint, recorded in the report
    splits = {spec.name: data.eval_iters(spec.split) for spec in specs}  # checks every split first

    evaluators = {}  # one per (evaluator, model, mesh): its jitted encoders compile once for all runs

    def evaluate_and_report(spec, model, mesh, params, step: int, name: str | None = None, extra=None) -> dict:
        if (spec.name, model, mesh) not in evaluators:
            evaluators[spec.name, model, mesh] = evaluate.Evaluator.for_config(model, mesh, *splits[spec.name],
                                                                               config, spec=spec)
        result = evaluators[spec.name, model, mesh].run(params)
        table = write_report(result, workdir, step, writer, name or report_names[spec.name],
                             extra=extra if extra is not None else evaluated)
        if writer is not None:
            writer.flush()
        if is_chief:
            print("\n" + table, flush=True)
        if best is not None and spec == rule.spec:  # model selection: keep the best parameters
            value = evaluate.selected_value(rule, result)
            if best.offer(step, params, value) and is_chief:
                print(f"New best {rule.spec.prefix} {rule.metric} = {value:.2f} at step {step}: parameters "
                      f"kept in {best.directory}", flush=True)
        return result

    def periodic_eval(model, mesh, params, step: int) -> None:
        epoch = step // steps_per_epoch
        for spec in specs:
            if spec.every_epochs and epoch % spec.every_epochs == 0:
                evaluate_and_report(spec, model, mesh, params, step)

    try:
        if mode in ("train", "train_and_eval"):
            trained = train.train(config, workdir, data.train_iter, steps_per_epoch,
                                  periodic_eval=periodic_eval if mode == "train_and_eval" else None,
                                  writer=writer)
            if trained.stopped:
                step = int(jax.device_get(trained.state.step))
                where = logging_utils.join(workdir, "checkpoints")
                raise Preempted(f"training stopped by signal at step {step}; checkpoints in {where}" if step else
                                "training stopped by signal before its first step (nothing to save)")
            if mode == "train":
                return {}
            model, mesh, params = trained.model, trained.mesh, trained.state.params
            step = int(jax.device_get(trained.state.step))
        else:
            from xmr_jax import parallel

            mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
            if import_file:  # a reference checkpoint file, e.g. IRRA's best.pth
                model, params = _import_checkpoint(family, import_file, config)
                step = 0
            else:
                model = family.build(config)
                params, step = checkpoints.load_params(checkpoint or logging_utils.join(workdir, "checkpoints"))
            evaluated["checkpoint"] = logging_utils.path_str(checkpoint or workdir)

        results = {spec.name: evaluate_and_report(spec, model, mesh, params, step) for spec in specs}
        if mode == "train_and_eval":
            selection = _report_selection(config, rule, best, specs, results, step, workdir, params,
                                          lambda spec, p, s, name, extra: evaluate_and_report(
                                              spec, model, mesh, p, s, name, extra))
            if rule is not None:
                results["selection"] = selection
    finally:
        if writer is not None:
            writer.close()
    if is_chief:
        for spec in specs:
            print(f"Metrics written to {logging_utils.join(workdir, report_names[spec.name] + '_metrics.json')}",
                  flush=True)
    return results


def _report_selection(config, rule, best, specs, results: dict, step: int, workdir: str, params,
                      evaluate_at) -> dict:
    """After train_and_eval: the test metrics at the best-on-validation checkpoint and at the last
    epoch. Writes WORKDIR/selection.json and, for each evaluator but the selecting one,
    WORKDIR/{prefix}_best_metrics.json; prints a summary. Without a rule (config.select.eval is
    "", e.g. ICFG-PEDES, which has no validation split) selection.json says so and that the last
    epoch is reported.

    params: the last epoch's (the best ones are restored into their shardings).
    evaluate_at(spec, params, step, report name, extra) -> result. Returns the selection.json
    content: {"select", "best_step", "best_value", "last_step", "at_best": {evaluator: result},
    "at_last": {evaluator: result}} (or {"select": None, "note", "last_step"}).
    """
    import json

    import jax

    from xmr_jax import evaluate, logging_utils

    is_chief = jax.process_index() == 0
    if rule is None:
        note = config.get("select", {}).get("note", "") or "config.select.eval is empty"
        summary = {"select": None, "note": f"no model selection ({note}): the test metrics are those of the "
                   "last epoch", "last_step": step}
    elif best.record is None:  # the selection metric was never finite
        summary = {"select": {"eval": rule.spec.name, "metric": rule.metric, "mode": rule.mode},
                   "note": f"no finite {rule.metric} on config.evals.{rule.spec.name}: no best checkpoint; the "
                   "test metrics are those of the last epoch", "last_step": step}
    else:
        best_step = int(best.record["step"])
        others = [spec for spec in specs if spec != rule.spec]
        extra = {"selected_by": f"{rule.spec.prefix} {rule.metric} ({rule.mode})", "best_step": best_step,
                 "best_value": best.record["value"]}
        if best_step == step:  # the last epoch is the best: its results are those already computed
            at_best = {spec.name: results[spec.name] for spec in others}
            for spec in others:
                write_report(results[spec.name], workdir, step, None, spec.prefix + "_best", extra=extra)
        else:
            params, _ = best.load_params(like=params)
            at_best = {spec.name: evaluate_at(spec, params, best_step, spec.prefix + "_best", extra)
                       for spec in others}
        summary = {"select": {"eval": rule.spec.name, "metric": rule.metric, "mode": rule.mode},
                   "best_step": best_step, "best_value": best.record["value"], "last_step": step,
                   "at_best": at_best, "at_last": {spec.name: results[spec.name] for spec in others}}
    if is_chief:
        logging_utils.write_text(logging_utils.join(workdir, "selection.json"), json.dumps(summary, indent=2))
        if "at_best" in summary:
            lines = [f"Model selection by {rule.spec.prefix} {rule.metric} ({rule.mode}): best step "
                     f"{summary['best_step']} ({rule.metric} = {summary['best_value']:.2f}), last step {step}"]
            for name, result in summary["at_best"].items():
                flat, last = evaluate.flatten_metrics(result), evaluate.flatten_metrics(summary["at_last"][name])
                keys = [k for k in flat if not k.split("/")[-1].startswith("num_")]
                lines.append(f"  {name} at best: " + ", ".join(f"{k} {flat[k]:.2f}" for k in keys))
                lines.append(f"  {name} at last: " + ", ".join(f"{k} {last[k]:.2f}" for k in keys))
            print("\n".join(lines), flush=True)
        else:
            print(summary["note"][:1].upper() + summary["note"][1:] + ".", flush=True)
    return summary


def write_report(result, workdir: str, step: int, writer=None, name: str = "eval", extra=None) -> str:
    """Writes WORKDIR/{name}_metrics.json through the path layer (+ scalars via writer); returns the
    printed table (the tables of `xmr_jax.evaluate.report`)."""
    import json
    from collections.abc import Mapping

    import jax

    from xmr_jax import evaluate, logging_utils
    from xmr_jax import metrics as metrics_lib

    title = "eval" if name == "eval" else name.replace("_", " ")
    nested = {k: v for k, v in result.items() if isinstance(v, Mapping)}
    if nested:
        tables = [metrics_lib.format_metrics_table(v, title=f"{title} @ step {step}: {k}") for k, v in nested.items()]
    else:
        scalars = {k: v for k, v in result.items() if not k.startswith("num_")}
        tables = [metrics_lib.format_metrics_table(scalars, title=f"{title} @ step {step}")]
    if jax.process_index() == 0:
        logging_utils.write_text(logging_utils.join(workdir, f"{name}_metrics.json"),
                                 json.dumps({"step": step, **(extra or {}), **result}, indent=2))
        if writer is not None:
            writer.scalars(step, evaluate.flatten_metrics(result), prefix=name)
    return "\n".join(tables)


def _is_file(path: str) -> bool:
    from xmr_jax import logging_utils

    p = logging_utils.as_path(path)
    return p.exists() and not p.is_dir()


def _import_checkpoint(family, path: str, config):
    """family.import_checkpoint(path, config) -> (model, params); its errors as one UserError line."""
    try:
        return family.import_checkpoint(path, config)
    except ValueError as e:
        cause = e.__cause__
        if cause is not None:  # torch's own text (advice on weights_only=False) is not for this case
            raise UserError(f"--checkpoint={path}: could not be read as {family.checkpoint_format} "
                            f"(torch.load, weights only: {type(cause).__name__})") from e
        raise UserError(f"--checkpoint={path}: {e}") from e


# ----------------------------------------------------------------------------- several seeds


SEED_RESULTS = "seed_results.json"  # in WORKDIR/seed_N once that seed's run has finished


def parse_seeds(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3]; UserError (one line, naming --seeds) for anything else: empty items,
    non-integers, negative or repeated seeds."""
    items = [t.strip() for t in str(text).split(",")]
    usage = "expected distinct integers >= 0 separated by commas, e.g. --seeds=1,2,3"
    if not items or any(not t for t in items):
        raise UserError(f"--seeds={text}: empty seed; {usage}")
    seeds = []
    for t in items:
        try:
            seed = int(t)
        except ValueError:
            raise UserError(f"--seeds={text}: {t!r} is not an integer; {usage}") from None
        if seed < 0:
            raise UserError(f"--seeds={text}: {seed} is negative; {usage}")
        if seed in seeds:
            raise UserError(f"--seeds={text}: {seed} is repeated; {usage}")
        seeds.append(seed)
    return seeds


def seed_rows(results: dict) -> dict:
    """run_experiment's results -> {row: result} for the seeds table: each evaluator at the last
    epoch under its name, and with model selection each other evaluator at the best checkpoint as
    "{name}@best"."""
    rows = {name: r for name, r in results.items() if name != "selection"}
    rows.update({f"{name}@best": r for name, r in results.get("selection", {}).get("at_best", {}).items()})
    return rows


def run_seeds(config, workdir: str, seeds: list[int]) -> dict:
    """train_and_eval once per seed (config.seed = N) in WORKDIR/seed_N, then writes
    WORKDIR/seeds.json (`evaluate.summarize_seeds`: mean, std and values per row and metric) and
    WORKDIR/seeds.md (its table). A seed whose WORKDIR/seed_N/seed_results.json exists is finished
    and not run again (remove the folder to rerun it); an unfinished one resumes from its
    checkpoints. Preempted (exit 75) stops at the seed running; returns the summary."""
    import json

    import jax

    from xmr_jax import evaluate, logging_utils

    is_chief = jax.process_index() == 0
    per_seed = {}
    for seed in seeds:
        seed_dir = logging_utils.join(workdir, f"seed_{seed}")
        done = logging_utils.as_path(logging_utils.join(seed_dir, SEED_RESULTS))
        if done.exists():
            per_seed[seed] = json.loads(done.read_text())["rows"]
            if is_chief:
                print(f"seed {seed}: finished earlier ({done}); not run again", flush=True)
            continue
        if is_chief:
            print(f"seed {seed}: training in {seed_dir}", flush=True)
        seeded = config.copy_and_resolve_references()
        seeded.seed = seed
        try:
            results = run_experiment(seeded, seed_dir, "train_and_eval")
        except Preempted as e:
            raise Preempted(f"seed {seed}: {e}") from e
        per_seed[seed] = seed_rows(results)
        if is_chief:
            logging_utils.write_text(str(done), json.dumps({"seed": seed, "rows": per_seed[seed]}, indent=2))
    summary = evaluate.summarize_seeds(per_seed)
    table = evaluate.seeds_table(summary)
    if is_chief:
        logging_utils.write_text(logging_utils.join(workdir, "seeds.json"), json.dumps(summary, indent=2))
        logging_utils.write_text(logging_utils.join(workdir, "seeds.md"), table)
        print("\n" + table + f"Written to {logging_utils.join(workdir, 'seeds.md')} and seeds.json", flush=True)
    return summary


# ----------------------------------------------------------------------------- cheap checks


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archive; legacy pickle


def check_inputs(workdir: str, mode: str, checkpoint: str | None) -> str:
    """The checks that need no jax: the checkpoint to evaluate exists and looks like one, and the
    workdir can be written. Returns the workdir as the path layer prints it. Raises UserError."""
    from xmr_jax import logging_utils

    if mode == "eval":
        source = checkpoint or workdir
        flag = "--checkpoint" if checkpoint else "--workdir"
        p = logging_utils.as_path(source)
        if not p.exists():
            raise UserError(f"{flag}={source}: does not exist (--mode=eval needs a training workdir, its "
                            "checkpoints folder, one <step> folder, or a checkpoint file the model family "
                            "imports, e.g. IRRA's best.pth)")
        if not p.is_dir():
            with p.open("rb") as f:
                head = f.read(16)
            if not (head.startswith(_TORCH_MAGIC) or source.endswith(".safetensors")):
                raise UserError(f"{flag}={source}: not a checkpoint (expected a PyTorch .pth/.pt file, which is "
                                "a zip archive or a pickle, or a folder written by training)")
        elif not _has_step_folder(p):
            raise UserError(
                f"{flag}={source}: holds no checkpoint (expected <step>/state folders under it or under its "
                "checkpoints/ folder, written by training)"
                + ("; pass --checkpoint=DIR or --checkpoint=best.pth" if not checkpoint else ""))
    try:
        return logging_utils.check_writable_dir(workdir, "--workdir")
    except logging_utils.PathCheckError as e:
        raise UserError(str(e)) from e


def _has_step_folder(p) -> bool:
    if (p / "state").is_dir():
        return True
    for root in (p / "checkpoints", p):
        if root.is_dir() and any(c.name.isdigit() and (c / "state").is_dir() for c in root.iterdir()):
            return True
    return False


def _config_spec(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def precheck_argv(argv) -> str | None:
    """A problem with the command line that needs no imports (the config file), or None."""
    spec = _config_spec(argv)
    if spec is None:
        return None
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "no such file"
        return f"--config={spec}: {what} (expected a config file such as --config=configs/demo.py)"
    return None


def _load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_xmr_main_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _overrides(argv):
    for i, arg in enumerate(argv):
        if arg.startswith("--config.") and len(arg) > len("--config."):
            name, eq, value = arg[len("--config."):].partition("=")
            if not eq and i + 1 < len(argv):
                value = argv[i + 1]
            yield name, value


def explain_config_error(argv, err: BaseException) -> str:
    """One line for an error raised while absl parsed --config / --config.* (names the flag and,
    for an unknown field, the close matches)."""
    spec = _config_spec(argv)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if spec is None:
        return first
    try:
        config = _load_config(spec)
    except Exception as e:  # pylint: disable=broad-except
        line = (str(e).strip().splitlines() or [""])[0]
        return f"--config={spec}: loading it failed: {type(e).__name__}: {line}"
    for name, value in _overrides(argv):
        node, parts = config, name.split(".")
        for i, part in enumerate(parts):
            where = "config" + "".join("." + p for p in parts[:i])
            if not hasattr(node, "keys"):
                return f"--config.{name}={value}: {where} is a {type(node).__name__} and has no field {part!r}"
            keys = [str(k) for k in node.keys()]
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
                prefix = "--config." + "".join(p + "." for p in parts[:i])
                hint = (f"; did you mean {' or '.join(prefix + c for c in close)}?" if close
                        else f"; its fields: {', '.join(sorted(keys))}")
                return f"--config.{name}={value}: {where} has no field {part!r}{hint}"
            node = node[part]
    return f"--config={spec}: {type(err).__name__}: {first}"


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:
        text = str(e).strip()
        if "Traceback" in text:  # the config file's get_config raised: say what it raised
            _exit_usage(explain_config_error(argv, e))
        _exit_usage(text.splitlines()[0] if text else type(e).__name__)
    except Exception as e:  # pylint: disable=broad-except  # the config file or an override
        _exit_usage(explain_config_error(argv, e))


def _exit_usage(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------- running


@contextmanager
def _signals_stop_with_preempted():
    """Outside the train loop (data build, compilation, evaluation), SIGTERM/SIGINT raise
    Preempted at once (there is nothing to save); inside it the trainer's handlers save first."""

    def handler(signum, frame):
        del frame
        raise Preempted(f"received {signal.Signals(signum).name} outside the train loop")

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def run_main(config, workdir: str, mode: str = "train_and_eval", checkpoint: str | None = None,
             distributed: tuple | None = None, seeds: list[int] | None = None) -> int:
    """What `python -m xmr_jax.main` does after flag parsing; returns the exit status and prints
    one line on stderr for every failure (no traceback). seeds: run `run_seeds` instead of one
    run (train_and_eval only)."""
    try:
        if seeds is not None and mode != "train_and_eval":
            raise UserError(f"--seeds needs --mode=train_and_eval (got --mode={mode}): each seed is trained "
                            "and evaluated")
        workdir = check_inputs(workdir, mode, checkpoint)
        with _signals_stop_with_preempted():
            if distributed is not None:
                from xmr_jax import parallel

                parallel.initialize_distributed(*distributed)
            if seeds is not None:
                run_seeds(config, workdir, seeds)
            else:
                run_experiment(config, workdir, mode, checkpoint)
        return 0
    except Preempted as e:
        print(f"stopped: {e}. Exit status {EXIT_PREEMPTED}: resubmit the same command to resume.",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except Exception as e:  # pylint: disable=broad-except
        status, message = _classify(e)
        if status is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return status


def _classify(err: BaseException) -> tuple[int | None, str]:
    """(exit status, one-line message) for the failures main reports without a traceback."""
    from xmr_jax import checkpoints, logging_utils, train

    if isinstance(err, (checkpoints.CheckpointSaveError, train.TrainingDiverged)):
        return EXIT_FAILURE, str(err)
    if isinstance(err, (UserError, ValueError, KeyError, FileNotFoundError)):
        return EXIT_USAGE, str(err)
    if isinstance(err, OSError):  # writing config, metrics, TensorBoard or a report failed
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        return EXIT_FAILURE, f"could not write{where}: {logging_utils.describe_os_error(err)}"
    return None, ""


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/xmr_demo")
    if not FLAGS["verbosity"].present:  # orbax/tfds INFO lines would bury the progress bar
        logging.set_verbosity(logging.WARNING)
    distributed = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    seeds = None
    if FLAGS.seeds is not None:
        try:
            seeds = parse_seeds(FLAGS.seeds)
        except UserError as e:
            _exit_usage(str(e))
    return run_main(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.checkpoint, distributed=distributed,
                    seeds=seeds)


def run(argv=None):
    argv = list(sys.argv if argv is None else argv)
    problem = precheck_argv(argv)
    if problem:
        _exit_usage(problem)
    # On CPU, re-executes this command once with glibc malloc settings that spare XLA:CPU a page
    # fault per fresh page of every step's temporaries (the demo: 299 -> 26 s of kernel time).
    from xmr_jax.cpu_runtime import configure_cpu_runtime
    configure_cpu_runtime()
    app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
