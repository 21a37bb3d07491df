"""Several seeds in one command (--seeds=1,2,3): a run per seed in WORKDIR/seed_N, then mean ± std
tables (seeds.md, seeds.json); bad --seeds values; a preempted seed resumes on rerun while finished
seeds are skipped."""

import json

import numpy as np
import pytest

from tests.main_test_config import demo_config
from xmr_jax import checkpoints, evaluate
from xmr_jax import main as main_lib

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


@pytest.mark.parametrize("text,message", [
    ("1,x", "--seeds=1,x: 'x' is not an integer; expected distinct integers >= 0 separated by commas"),
    ("1,,2", "--seeds=1,,2: empty seed;"),
    ("", "--seeds=: empty seed;"),
    ("3,-1", "--seeds=3,-1: -1 is negative;"),
    ("2,2", "--seeds=2,2: 2 is repeated;"),
])
def test_bad_seeds_are_one_line_errors(text, message):
    with pytest.raises(main_lib.UserError) as err:
        main_lib.parse_seeds(text)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert main_lib.parse_seeds(" 3, 1,2 ") == [3, 1, 2]


def test_cli_bad_seeds_exit_2_with_one_line(tmp_path):
    from tests.test_main import _cli

    proc = _cli("--config=configs/demo.py", f"--workdir={tmp_path / 'w'}", "--seeds=1,one")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --seeds=1,one: 'one' is not an integer; expected distinct integers >= 0 separated by commas, "
        "e.g. --seeds=1,2,3"]
    assert not (tmp_path / "w").exists()
    assert main_lib.run_main(None, str(tmp_path / "w"), "eval", seeds=[1]) == 2


def test_summary_mean_and_sample_std():
    per_seed = {1: {"eval": {"R1": 10.0, "mAP": 1.0, "num_queries": 24}, "eval@best": {"R1": 1.0}},
                2: {"eval": {"R1": 20.0, "mAP": 2.0, "num_queries": 24}},
                3: {"eval": {"R1": 30.0, "mAP": 6.0, "num_queries": 24}}}
    summary = evaluate.summarize_seeds(per_seed)
    assert summary["seeds"] == [1, 2, 3]
    assert list(summary["rows"]) == ["eval"]          # a row not every seed has is left out
    assert summary["rows"]["eval"]["R1"] == {"mean": 20.0, "std": 10.0, "values": [10.0, 20.0, 30.0]}
    assert summary["rows"]["eval"]["mAP"]["std"] == pytest.approx(np.sqrt(7.0))  # (4 + 1 + 9) / 2
    assert "num_queries" not in summary["rows"]["eval"]
    table = evaluate.seeds_table(summary)
    assert "| eval | R1 | mAP |" in table and "| mean ± std | 20.00 ± 10.00 | 3.00 ± 2.65 |" in table
    assert "| seed 2 | 20.00 | 2.00 |" in table
    caption = evaluate.summarize_seeds({4: {"eval": {"two_stage": {"rsum": 300.0}, "num_gallery": 5}}})
    assert caption["rows"]["eval"] == {"two_stage/rsum": {"mean": 300.0, "std": None, "values": [300.0]}}
    assert "| mean ± std | 300.00 |" in evaluate.seeds_table(caption)


def test_rows_are_each_evaluator_at_the_last_epoch_and_the_others_at_the_best():
    results = {"eval": {"R1": 1.0}, "val": {"R1": 2.0},
               "selection": {"best_step": 6, "at_best": {"eval": {"R1": 3.0}}, "at_last": {"eval": {"R1": 1.0}}}}
    assert main_lib.seed_rows(results) == {"eval": {"R1": 1.0}, "val": {"R1": 2.0}, "eval@best": {"R1": 3.0}}
    assert main_lib.seed_rows({"eval": {"R1": 1.0}}) == {"eval": {"R1": 1.0}}


def test_seeds_run_summarize_and_resume_after_preemption(tmp_path, monkeypatch, capsys):
    config = demo_config(tmp_path / "tfds")
    config.num_epochs, config.eval_every_epochs = 1, 0  # 6 steps, one evaluation per seed
    workdir = tmp_path / "run"
    real_run, real_poll = main_lib.run_experiment, checkpoints.StopPoller.poll
    calls, polls = [], []

    def run_experiment(seeded, seed_dir, mode):
        calls.append(seeded.seed)
        return real_run(seeded, seed_dir, mode)

    def poll(self):  # a SIGTERM during seed 2's third step, the first time it runs
        polls.append(1)
        if calls == [1, 2] and len(polls) == 6 + 3:
            checkpoints.request_stop()
        return real_poll(self)

    monkeypatch.setattr(main_lib, "run_experiment", run_experiment)
    monkeypatch.setattr(checkpoints.StopPoller, "poll", poll)
    assert main_lib.run_main(config, str(workdir), seeds=[1, 2]) == main_lib.EXIT_PREEMPTED
    assert "seed 2: training stopped by signal at step 3" in capsys.readouterr().err
    assert (workdir / "seed_1" / main_lib.SEED_RESULTS).exists()
    assert not (workdir / "seed_2" / main_lib.SEED_RESULTS).exists() and not (workdir / "seeds.md").exists()
    assert sorted(p.name for p in (workdir / "seed_2" / "checkpoints").iterdir()) == ["2", "3"]

    # The same command again: seed 1 is not run again, seed 2 resumes from its step 3.
    assert main_lib.run_main(config, str(workdir), seeds=[1, 2]) == 0
    out = capsys.readouterr().out
    assert calls == [1, 2, 2]
    assert "seed 1: finished earlier" in out and "Resumed from" in out and "at step 3" in out
    per_seed = {s: json.load(open(workdir / f"seed_{s}" / "eval_metrics.json")) for s in (1, 2)}
    assert {s: json.load(open(workdir / f"seed_{s}" / "config.json"))["seed"] for s in (1, 2)} == {1: 1, 2: 2}
    assert per_seed[1]["step"] == per_seed[2]["step"] == 6
    summary = json.load(open(workdir / "seeds.json"))
    assert summary["seeds"] == [1, 2] and list(summary["rows"]) == ["eval"]
    for key in METRICS:
        values = [per_seed[1][key], per_seed[2][key]]
        row = summary["rows"]["eval"][key]
        assert row["values"] == pytest.approx(values)
        assert (row["mean"], row["std"]) == pytest.approx((np.mean(values), np.std(values, ddof=1)))
    table = (workdir / "seeds.md").read_text()
    assert table == evaluate.seeds_table(summary) and "| eval | R1 | R5 | R10 | mAP | mINP |" in table
