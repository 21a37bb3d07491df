"""The main job end to end: tf.data on the tiny synthetic set -> train -> evaluate -> reload.

Uses `xmr_jax.main.run_experiment` (what `python -m xmr_jax.main` runs) with tiny towers on
synthetic_people/tiny (12 train ids, 6 test ids: 12 gallery images, 24 queries) for 2 epochs with
an evaluation after each, an eval batch that does not divide the gallery (ragged last batch), and checks the evaluation after training
equals a stand-alone evaluation from the saved checkpoint.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.train_fixtures import tiny_config
from xmr_jax.main import run_experiment


def demo_config(data_dir):
    config = tiny_config(batch_size=8)
    config.num_classes = 0  # taken from the data set (12 training identities)
    config.num_epochs = 2
    config.eval_every_epochs = 1  # a periodic evaluation after epoch 1 (step 6), then the final one
    config.data.update(dict(config_name="tiny", data_dir=str(data_dir), image_size=(64, 32)))
    config.model.clip.update(dict(image_size=(64, 32), patch_size=16))
    config.eval_batch_size = 8  # 12 images = 8 + a ragged 4
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    workdir = tmp_path_factory.mktemp("run")
    config = demo_config(data_dir)
    result = run_experiment(config, str(workdir), "train_and_eval")
    return config, workdir, result


def test_train_and_eval_writes_everything(trained):
    config, workdir, result = trained
    assert config.num_classes == 12
    assert result["num_gallery"] == 12 and result["num_queries"] == 24
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert 0.0 <= result[key] <= 100.0
    assert result["R10"] >= result["R5"] >= result["R1"]
    saved = json.load(open(workdir / "eval_metrics.json"))
    assert saved["step"] == 12 and saved["R1"] == pytest.approx(result["R1"])
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in logged if r["split"] == "eval"] == [6, 12]
    assert json.load(open(workdir / "config.json"))["data"]["config_name"] == "tiny"
    assert os.listdir(workdir / "tensorboard")
    assert (workdir / "checkpoints" / "12").is_dir()


def test_eval_from_checkpoint_equals_eval_after_training(trained):
    config, workdir, result = trained
    again = run_experiment(config, str(workdir), "eval")
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        np.testing.assert_allclose(again[key], result[key], atol=1e-6)


def test_cli_reports_bad_config_field(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xmr_jax.main", "--config=configs/demo.py:loss_names=sdm+foo",
         f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.loss_names='sdm+foo'" in proc.stderr
    assert "Traceback" not in proc.stderr
