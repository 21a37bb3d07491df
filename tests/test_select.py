"""Model selection on a validation evaluator (config.select): the best checkpoint kept apart from
the trainer's keep-N, and the test metrics reported at it and at the last epoch.

The synthetic data set has no val split, so the end-to-end run declares its selecting evaluator on
the training split (what is selected on does not change the mechanics): tiny towers, 2 epochs of 6
steps, that evaluator after each epoch, keep_checkpoints=1.
"""

import json

import numpy as np
import pytest

from tests.main_test_config import demo_config
from xmr_jax import checkpoints, evaluate
from xmr_jax.main import run_experiment

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def _params(value: float) -> dict:
    return {"w": np.full((3, 2), value, np.float32), "b": np.arange(2, dtype=np.float32) + value}


def test_best_checkpoint_keeps_only_the_best_and_survives_a_rerun(tmp_path):
    best = checkpoints.BestCheckpoint(str(tmp_path), "val", "R1", "max")
    assert best.record is None
    assert best.offer(2, _params(1.0), 10.0)
    assert not best.offer(4, _params(2.0), 5.0)       # worse
    assert not best.offer(5, _params(2.0), 10.0)      # a tie keeps the earlier step
    assert not best.offer(6, _params(2.0), float("nan"))
    assert best.offer(8, _params(3.0), 20.0)
    assert sorted(p.name for p in (tmp_path / "best" / "checkpoints").iterdir()) == ["8"]
    params, step = best.load_params()
    assert step == 8
    np.testing.assert_array_equal(np.asarray(params["w"]), _params(3.0)["w"])
    # Restored into the shardings of a given tree (the trained params): w split over 2 devices.
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
    like = {"w": jax.device_put(np.zeros((3, 2), np.float32), NamedSharding(mesh, P(None, "data"))),
            "b": jax.device_put(np.zeros(2, np.float32), NamedSharding(mesh, P()))}
    placed, step = best.load_params(like=like)
    assert step == 8 and placed["w"].sharding == like["w"].sharding
    assert [s.data.shape for s in placed["w"].addressable_shards] == [(3, 1), (3, 1)]
    np.testing.assert_array_equal(np.asarray(placed["b"]), _params(3.0)["b"])
    assert json.load(open(tmp_path / "best" / "best.json")) == {
        "step": 8, "eval": "val", "metric": "R1", "mode": "max", "value": 20.0}
    # A rerun (resume) compares against the earlier run's best.
    again = checkpoints.BestCheckpoint(str(tmp_path), "val", "R1", "max")
    assert again.record["step"] == 8 and not again.is_better(19.9) and again.is_better(20.1)
    with pytest.raises(ValueError, match=r"config.select says .*'metric': 'mAP'.* use a new --workdir"):
        checkpoints.BestCheckpoint(str(tmp_path), "val", "mAP", "max")
    low = checkpoints.BestCheckpoint(str(tmp_path / "min"), "val", "loss", "min")
    assert low.offer(1, _params(0.0), 3.0) and low.offer(2, _params(0.0), 1.0) and not low.offer(3, _params(0.0), 2.0)
    with pytest.raises(ValueError, match="config.select.mode='best'"):
        checkpoints.BestCheckpoint(str(tmp_path / "x"), "val", "R1", "best")


def _select_config(data_dir, **select):
    config = demo_config(data_dir)
    config.evals.val = dict(kind="", split="train", every_epochs=1, prefix="val")
    config.evals.eval = dict(kind="", split="", every_epochs=0, prefix="eval")  # test: after training only
    config.select.update(select)
    return config


@pytest.mark.parametrize("select,message", [
    (dict(eval="nope"), "config.select.eval='nope': expected one of config.evals (['eval', 'val'])"),
    (dict(eval="val", mode="best"), "config.select.mode='best': expected 'max' or 'min'"),
    (dict(eval="val", metric="R2"), "config.select.metric='R2': person retrieval reports"),
    (dict(eval="eval"), "config.select.eval='eval': config.evals.eval.every_epochs is 0"),
])
def test_selection_rule_errors_name_the_field(tmp_path, select, message):
    config = _select_config(tmp_path, **select)
    with pytest.raises(ValueError) as err:
        evaluate.selection_rule(config, evaluate.evaluator_specs(config))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_irra_configs_select_on_val_where_the_data_set_has_one():
    from configs.irra import cuhk_pedes, icfg_pedes, rstpreid

    for module in (cuhk_pedes, rstpreid):
        config = module.get_config()
        specs = {s.name: s for s in evaluate.evaluator_specs(config)}
        assert (specs["val"].split, specs["val"].every_epochs, specs["eval"].every_epochs) == ("val", 1, 0)
        rule = evaluate.selection_rule(config, list(specs.values()))
        assert (rule.spec.name, rule.metric, rule.mode) == ("val", "R1", "max")
        config.eval_every_epochs = 5  # the val evaluator follows it
        assert {s.name: s.every_epochs for s in evaluate.evaluator_specs(config)} == {"eval": 0, "val": 5}
    config = icfg_pedes.get_config()
    assert [s.name for s in evaluate.evaluator_specs(config)] == ["eval"]
    assert evaluate.selection_rule(config, evaluate.evaluator_specs(config)) is None
    assert config.select.note == "icfg_pedes has no validation split"


def test_train_and_eval_reports_test_at_the_best_and_at_the_last_epoch(tmp_path):
    from tests.test_main import _reference_eval

    # mode "min": the worse of the two epochs on the selecting split, most likely the first, so
    # the best is not the last checkpoint; whichever it is, the checks below follow the log.
    config = _select_config(tmp_path / "tfds", eval="val", metric="mAP", mode="min")
    config.keep_checkpoints = 1
    workdir = tmp_path / "run"
    results = run_experiment(config, str(workdir), "train_and_eval")
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    val = {r["step"]: r["mAP"] for r in logged if r["split"] == "val"}
    assert sorted(val) == [6, 12]
    best_step = 6 if val[6] <= val[12] else 12
    assert [r["step"] for r in logged if r["split"] == "eval"] == [12]  # the test split is not selected on
    selection = json.load(open(workdir / "selection.json"))
    assert selection["select"] == {"eval": "val", "metric": "mAP", "mode": "min"}
    assert (selection["best_step"], selection["last_step"]) == (best_step, 12)
    assert selection["best_value"] == pytest.approx(val[best_step])
    assert results["selection"]["best_step"] == best_step
    # keep_checkpoints=1 left only the last training checkpoint; the best is kept apart.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12"]
    assert sorted(p.name for p in (workdir / "best" / "checkpoints").iterdir()) == [str(best_step)]
    # At the last epoch: the usual report. At the best: the test metrics of the best parameters,
    # recomputed from the best folder by a plain single-device evaluation.
    last = json.load(open(workdir / "eval_metrics.json"))
    assert selection["at_last"]["eval"]["R1"] == pytest.approx(last["R1"]) == pytest.approx(results["eval"]["R1"])
    at_best = json.load(open(workdir / "eval_best_metrics.json"))
    assert at_best["step"] == best_step and at_best["best_step"] == best_step
    assert _reference_eval(config, workdir / "best", steps=best_step) == pytest.approx(
        {k: at_best[k] for k in METRICS}, abs=1e-6)
    assert {k: selection["at_best"]["eval"][k] for k in METRICS} == pytest.approx({k: at_best[k] for k in METRICS})
    # The best folder is what --mode=eval --checkpoint=WORKDIR/best evaluates.
    again = run_experiment(config, str(tmp_path / "eval_best"), "eval", checkpoint=str(workdir / "best"))["eval"]
    assert {k: again[k] for k in METRICS} == pytest.approx({k: at_best[k] for k in METRICS}, abs=1e-6)
    assert json.load(open(tmp_path / "eval_best" / "eval_checkpoint_metrics.json"))["step"] == best_step
