"""The main job end to end: tf.data on the tiny synthetic set -> train -> evaluate -> reload.

Uses `xmr_jax.main.run_experiment` (what `python -m xmr_jax.main` runs) with tiny towers on
synthetic_people/tiny (12 train ids, 6 test ids: 12 gallery images, 24 queries) for 2 epochs with
an evaluation after each, an eval batch that does not divide the gallery (ragged last batch), and checks the evaluation after training
equals a stand-alone evaluation from the saved checkpoint. Also: the same job on a gs:// workdir
(tests/fake_gcs.py), what --mode=eval writes, and the command line's one-line errors and exit
statuses (tests/test_failures.py has the signal, full-disk and divergence runs).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import fake_gcs
from tests.main_test_config import demo_config
from xmr_jax import main as main_lib
from xmr_jax.main import run_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    workdir = tmp_path_factory.mktemp("run")
    config = demo_config(data_dir)
    # A second evaluator, declared in the config: person retrieval on the training split after
    # every epoch, reported under its own prefix.
    config.evals.train_split = dict(kind="person", split="train", every_epochs=1, prefix="train_eval")
    results = run_experiment(config, str(workdir), "train_and_eval")
    assert sorted(results) == ["eval", "train_split"]
    return config, workdir, results


def test_train_and_eval_writes_everything(trained):
    config, workdir, results = trained
    result = results["eval"]
    assert config.num_classes == 12
    assert result["num_gallery"] == 12 and result["num_queries"] == 24
    # The reported metrics are those of the saved model, recomputed here another way: features of
    # the test split by a plain single-device model.apply, cosine scores in float64 and metrics
    # query by query from their definitions.
    assert _reference_eval(config, workdir) == pytest.approx(
        {k: result[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}, abs=1e-6)
    saved = json.load(open(workdir / "eval_metrics.json"))
    assert saved["step"] == 12 and saved["R1"] == pytest.approx(result["R1"])
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in logged if r["split"] == "eval"] == [6, 12]
    # The declared training-split evaluator: every image and caption of the training split.
    from data_pipelines import input_pipeline

    meta = input_pipeline.dataset_metadata(f"{config.data.name}/tiny", config.data.data_dir, "train")
    assert [r["step"] for r in logged if r["split"] == "train_eval"] == [6, 12]
    on_train = json.load(open(workdir / "train_eval_metrics.json"))
    assert (on_train["num_gallery"], on_train["num_queries"]) == (meta.num_images, meta.num_samples)
    assert on_train["R1"] == pytest.approx(results["train_split"]["R1"])
    assert json.load(open(workdir / "config.json"))["data"]["config_name"] == "tiny"
    assert os.listdir(workdir / "tensorboard")
    assert (workdir / "checkpoints" / "12").is_dir()
    # No config.select: no best checkpoint, and the report says the last epoch is what it gives.
    assert json.load(open(workdir / "selection.json")) == {
        "select": None, "last_step": 12,
        "note": "no model selection (config.select.eval is empty): the test metrics are those of the last epoch"}
    assert not (workdir / "best").exists() and "selection" not in results


def _reference_eval(config, workdir, steps: int = 12) -> dict:
    import jax

    from data_pipelines import input_pipeline
    from tests.train_fixtures import reference_person_metrics
    from xmr_jax import checkpoints
    from xmr_jax.models.families import get_family

    model = get_family(config.model_family).build(config)
    params, step = checkpoints.load_params(str(workdir / "checkpoints"), host=True)
    assert step == steps
    name, data_dir = f"{config.data.name}/{config.data.config_name}", config.data.data_dir

    def encode(batches, key, method):
        feats, pids = [], []
        for b in batches:
            g, _, _ = model.apply({"params": params}, b[key], method=method)
            feats.append(np.asarray(jax.device_get(g), np.float64)[b["valid"]])
            pids.append(b["pids"][b["valid"]])
        f = np.concatenate(feats)
        return f / np.linalg.norm(f, axis=1, keepdims=True), np.concatenate(pids)

    g, g_pids = encode(input_pipeline.eval_gallery(name, data_dir, "test", tuple(config.data.image_size), 8),
                       "images", "encode_image")
    q, q_pids = encode(input_pipeline.eval_queries(name, data_dir, "test", 8,
                                                   context_length=config.data.context_length),
                       "text_ids", "encode_text")
    assert (len(g), len(q)) == (12, 24)
    return reference_person_metrics(q @ g.T, q_pids, g_pids)


def test_eval_from_checkpoint_equals_eval_after_training_and_keeps_training_files(trained):
    config, workdir, results = trained
    result = results["eval"]
    before = {name: (workdir / name).read_bytes() for name in ("config.json", "metrics.jsonl", "eval_metrics.json")}
    tensorboard = sorted(os.listdir(workdir / "tensorboard"))
    eval_config = config.copy_and_resolve_references()
    eval_config.eval_batch_size = 16  # differs from training's: must not land in config.json
    again = run_experiment(eval_config, str(workdir), "eval")["eval"]
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        np.testing.assert_allclose(again[key], result[key], atol=1e-6)
    # The evaluation writes its own files, and none of the training run's.
    assert {name: (workdir / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(workdir / "tensorboard")) == tensorboard
    assert json.load(open(workdir / "eval_config.json"))["eval_batch_size"] == 16
    report = json.load(open(workdir / "eval_checkpoint_metrics.json"))
    assert report["step"] == 12 and report["checkpoint"] == str(workdir)
    assert report["R1"] == pytest.approx(result["R1"])
    on_train = json.load(open(workdir / "train_eval_checkpoint_metrics.json"))
    assert on_train["mAP"] == pytest.approx(results["train_split"]["mAP"], abs=1e-6)


def test_a_new_family_runs_through_the_main_job(trained, tmp_path):
    """A family registered at run time (tests/train_fixtures.ToyFamily: no CLIP, its own loss)
    goes through the unchanged main job: data with its text and image schemes, training, the
    evaluator it names; its metrics equal the recomputation from its saved checkpoint."""
    from tests.train_fixtures import TOY_WIDTH, ToyFamily
    from xmr_jax.models import families

    families.register(ToyFamily())
    try:
        config = demo_config(trained[0].data.data_dir)
        config.model_family, config.loss_names = "toy", "the toy's own"
        config.model.toy_width, config.model.toy_scale = TOY_WIDTH, 3.0
        config.num_epochs, config.eval_every_epochs = 1, 0
        workdir = tmp_path / "toy"
        result = run_experiment(config, str(workdir), "train_and_eval")["eval"]
        assert (result["num_gallery"], result["num_queries"]) == (12, 24)
        logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        assert [r["step"] for r in logged if r["split"] == "train" and "toy_loss" in r] == [2, 4, 6]
        assert _reference_eval(config, workdir, steps=6) == pytest.approx(
            {k: result[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}, abs=1e-6)
    finally:
        families.unregister("toy")


def test_eval_checks_the_checkpoint_before_writing(tmp_path, capsys):
    config = demo_config(tmp_path / "tfds")
    workdir = tmp_path / "empty"
    workdir.mkdir()
    assert main_lib.run_main(config, str(workdir), "eval") == main_lib.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --workdir={workdir}: holds no checkpoint"), err
    assert "--checkpoint=DIR" in err[0]
    assert os.listdir(workdir) == []  # nothing written, no data built
    random_file = tmp_path / "best.pth"
    random_file.write_bytes(os.urandom(64))
    assert main_lib.run_main(config, str(tmp_path / "out"), "eval", checkpoint=str(random_file)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--checkpoint={random_file}: not a checkpoint" in err[0], err
    assert "weights_only" not in err[0]
    assert not (tmp_path / "out").exists()
    # A family without a checkpoint import says so before anything is built or written.
    from configs import common

    config.model_family, config.loss_names, config.tgdt = "tgdt", "cmc", common.tgdt_defaults("image_id")
    zip_file = tmp_path / "model_best_rsum.pth.tar"
    zip_file.write_bytes(b"PK\x03\x04" + os.urandom(60))
    assert main_lib.run_main(config, str(tmp_path / "out2"), "eval", checkpoint=str(zip_file)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --checkpoint={zip_file}: config.model_family='tgdt' imports no checkpoint files; give a "
                   "training workdir, its checkpoints folder or one <step> folder"], err
    assert os.listdir(tmp_path / "out2") == []  # checked for writing only; no data built, nothing written


def test_main_job_on_a_gcs_workdir(tmp_path, monkeypatch):
    """gs://bucket/run (tests/fake_gcs.py: a local folder behind fsspec/epath, tensorstore on a
    file kvstore): every output lands in the bucket; nothing under ./gs:/ on local disk."""
    bucket_root = fake_gcs.fake_gcs(tmp_path / "gcs", monkeypatch)
    try:
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        config = demo_config(tmp_path / "tfds")
        config.num_epochs = 1
        config.eval_every_epochs = 0
        assert main_lib.run_main(config, "gs://bucket/run", "train_and_eval") == 0
        run = Path(bucket_root) / "bucket" / "run"
        assert json.loads((run / "config.json").read_text())["data"]["config_name"] == "tiny"
        assert (run / "config.txt").is_file()
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged if r["split"] == "train"] == [2, 4, 6]
        assert [r["step"] for r in logged if r["split"] == "eval"] == [6]
        assert json.loads((run / "eval_metrics.json").read_text())["step"] == 6
        events = os.listdir(run / "tensorboard")
        assert len(events) == 1 and (run / "tensorboard" / events[0]).stat().st_size > 0
        assert (run / "checkpoints" / "6" / "commit_success.txt").is_file()  # orbax's GCS commit marker
        # Evaluation of the gs:// checkpoint, again writing to the bucket.
        assert main_lib.run_main(config, "gs://bucket/run", "eval") == 0
        assert json.loads((run / "eval_checkpoint_metrics.json").read_text())["checkpoint"] == "gs://bucket/run"
        assert os.listdir(cwd) == []  # no ./gs:/bucket/run written through open()
    finally:
        fake_gcs.unregister()


def test_exit_statuses_and_one_line_errors(tmp_path, monkeypatch, capsys):
    from xmr_jax import checkpoints, train

    assert main_lib.EXIT_PREEMPTED == checkpoints.EXIT_PREEMPTED == 75

    def failing(error):
        def run(*args, **kwargs):
            raise error
        return run

    cases = [
        (train.TrainingDiverged("loss became NaN/Inf at step 2 (mean loss nan); training stopped. "
                                "No checkpoint was written"), 1, "No checkpoint was written"),
        (checkpoints.CheckpointSaveError(4, "/x/checkpoints", "No space left on device (errno 28)", [2]), 1,
         "could not save checkpoint step 4 in /x/checkpoints: No space left on device (errno 28)"),
        (main_lib.Preempted("training stopped by signal at step 3"), 75, "resubmit the same command"),
        (PermissionError(13, "Permission denied", "/x/metrics.jsonl"), 1,
         "could not write /x/metrics.jsonl: Permission denied (errno 13)"),
    ]
    for error, status, text in cases:
        monkeypatch.setattr(main_lib, "run_experiment", failing(error))
        assert main_lib.run_main(None, str(tmp_path / "w"), "train") == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0], err


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_read_only_workdir_is_named(tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert main_lib.run_main(None, str(mount / "run"), "train") == 2
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --workdir={mount / 'run'}: cannot create or write files there: "
                   "Read-only file system (errno 30)"], err


def _cli(*args, cwd=REPO, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "xmr_jax.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/nope.py"],
     "error: --config=configs/nope.py: no such file (expected a config file such as --config=configs/demo.py)"),
    (["--config=configs/demo.py", "--config.optim.lrr=1"],
     "error: --config.optim.lrr=1: config.optim has no field 'lrr'; did you mean --config.optim.lr?"),
    (["--config=configs/demo.py", "--config.optimm.lr", "1"],
     "error: --config.optimm.lr=1: config has no field 'optimm'; did you mean --config.optim?"),
    (["--config=configs/demo.py:epoch=1"],
     "error: --config=configs/demo.py:epoch=1: loading it failed: ValueError: config argument 'epoch' is not known"),
    (["--config=configs/demo.py", "--config.batch_size=abc"], "error: flag --config.batch_size=abc: invalid literal"),
    (["--config=configs/demo.py", "--workdir=/proc/forbidden"],
     "error: --workdir=/proc/forbidden: cannot create or write files there: No such file or directory"),
])
def test_cli_user_errors_are_one_line(args, message):
    if not any(a.startswith("--workdir") for a in args):
        args = [*args, "--workdir=/tmp/xmr_never_created"]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
    assert not os.path.exists("/tmp/xmr_never_created")


def test_cli_reports_bad_config_field(tmp_path):
    proc = _cli("--config=configs/demo.py:loss_names=sdm+foo", f"--workdir={tmp_path}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.loss_names='sdm+foo'" in proc.stderr
    assert "Traceback" not in proc.stderr
