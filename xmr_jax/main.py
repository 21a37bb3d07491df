r"""Entry point: `python -m xmr_jax.main --config=configs/demo.py --workdir=/tmp/demo`.

Config overrides: `--config.batch_size=32`, or big_vision style `--config=configs/demo.py:batch_size=32`.
Modes: train_and_eval (default), train, eval (the latest checkpoint in --workdir, --checkpoint=DIR,
or --checkpoint=best.pth: a PyTorch IRRA checkpoint, imported with its own class count). Multi-host: jax.distributed is initialized from the TPU / SLURM environment or
from --coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally with :key=value,...).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, config and metrics.")
flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train", "eval"], "What to run.")
flags.DEFINE_string("checkpoint", None, "eval mode: a workdir or checkpoints folder to evaluate (default "
                    "--workdir), or a PyTorch IRRA checkpoint file (best.pth) to import and evaluate.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def run_experiment(config, workdir: str, mode: str = "train_and_eval", checkpoint: str | None = None) -> dict:
    """Trains and/or evaluates; returns the evaluation result (empty dict in train mode)."""
    import jax

    from data_pipelines import input_pipeline
    from xmr_jax import checkpoints, evaluate, train
    from xmr_jax.logging_utils import MetricWriter
    from xmr_jax.models.families import get_family

    train.validate_config(config)
    data = input_pipeline.from_config(config, jax.process_index(), jax.process_count())
    if config.num_classes <= 0:
        config.num_classes = data.num_classes
    steps_per_epoch = data.steps_per_epoch
    train.write_config(config, workdir)

    kind = "caption" if config.model_family == "tgdt" else "person"
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)

    evaluators = {}  # one per (model, mesh): its jitted encoders compile once for all evaluations

    def evaluate_and_report(model, mesh, params, step: int) -> dict:
        if (model, mesh) not in evaluators:
            evaluators[model, mesh] = evaluate.Evaluator(model, mesh, kind, data.gallery_iter, data.query_iter, config)
        result = evaluators[model, mesh].run(params)
        table = evaluate.report(result, workdir, step, writer)
        writer.flush()
        if jax.process_index() == 0:
            print("\n" + table, flush=True)
        return result

    if mode in ("train", "train_and_eval"):
        trained = train.train(config, workdir, data.train_iter, steps_per_epoch,
                              periodic_eval=evaluate_and_report if mode == "train_and_eval" else None,
                              writer=writer)
        if mode == "train" or trained.stopped:
            return {}
        model, mesh, params = trained.model, trained.mesh, trained.state.params
        step = int(jax.device_get(trained.state.step))
    else:
        from xmr_jax import parallel

        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        if checkpoint and os.path.isfile(checkpoint):  # a PyTorch IRRA checkpoint (best.pth)
            from xmr_jax.convert.irra import load_irra

            model, params = load_irra(checkpoint, image_size=tuple(config.data.image_size),
                                      **dict(config.model.get("import_overrides", {})))
            step = 0
        else:
            model = get_family(config.model_family).build(config)
            params, step = checkpoints.load_params(checkpoint or os.path.join(workdir, "checkpoints"))

    result = evaluate_and_report(model, mesh, params, step)
    if jax.process_index() == 0:
        print(f"Metrics written to {os.path.join(workdir, 'eval_metrics.json')}", flush=True)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/xmr_demo")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not FLAGS["verbosity"].present:  # orbax/tfds INFO lines would bury the progress bar
        logging.set_verbosity(logging.WARNING)
    from xmr_jax import parallel

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        run_experiment(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.checkpoint)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
