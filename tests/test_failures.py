"""Runs that fail well: a full disk, a failed save, divergence and signals each end the run with one
message and a distinct exit status, and leave the checkpoints usable.

In-process: the trainer (`xmr_jax.train.train`, tiny IRRA of tests/train_fixtures.py) on a 10 MiB
tmpfs (one ~9 MiB checkpoint fits, the second does not) and with a save that raises. Subprocesses:
`python -m xmr_jax.main` with tests/main_test_config.py (synthetic_people/tiny, 6 steps per epoch)
on a full tmpfs, with a diverging learning rate, and stopped by SIGTERM (exit status 75, then a
resubmission resumes). Mounting a tmpfs needs root; those tests are skipped otherwise.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.main_test_config import demo_config
from tests.train_fixtures import iterator_from, tiny_config
from xmr_jax import checkpoints, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MiB tmpfs (root only): one tiny-IRRA checkpoint (~7 MB, compressed, so its size moves
    with the trained values) fits, a second never does. Unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _leftovers(ckpt_dir: Path) -> list[str]:
    return sorted(os.listdir(ckpt_dir))


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_stops_training_and_keeps_the_last_checkpoint(small_disk, async_save):
    config = tiny_config()
    config.async_checkpoints = async_save
    workdir = small_disk / "run"
    pulled = []
    with pytest.raises(checkpoints.CheckpointSaveError) as err:
        train.train(config, str(workdir), lambda s: iterator_from(s, pulled.append), steps_per_epoch=16)
    message = str(err.value)
    assert f"could not save checkpoint step 4 in {workdir}/checkpoints: No space left on device (errno 28)" in message
    assert "the newest complete checkpoint is step 2" in message
    # Training stopped right away (the async failure is seen by the next step or the next save),
    # not after the 16 steps.
    assert max(pulled) <= 7, pulled
    # No half-written step folder; the older checkpoint restores.
    assert _leftovers(workdir / "checkpoints") == ["2"]
    params, step = checkpoints.load_params(str(workdir))
    assert step == 2 and np.isfinite(np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])).all()


def test_failed_save_is_one_error_naming_path_and_cause(tmp_path, monkeypatch):
    """A save that fails on the host side (here: permission denied on step 4, simulated)."""
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:
            os.makedirs(os.path.join(self.directory, "4.orbax-checkpoint-tmp-123"), exist_ok=True)
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(self.directory, "4"))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    pulled = []
    with pytest.raises(checkpoints.CheckpointSaveError, match=r"step 4 in .*/checkpoints: Permission denied \(errno 13\)"):
        train.train(tiny_config(), str(tmp_path), lambda s: iterator_from(s, pulled.append), steps_per_epoch=8)
    assert max(pulled) == 5  # batch 5 was already placed while step 4 ran; nothing after
    assert _leftovers(tmp_path / "checkpoints") == ["2"]


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """synthetic_people/tiny, built once here so the subprocesses' stderr holds only their own lines."""
    from data_pipelines import input_pipeline

    path = tmp_path_factory.mktemp("tfds")
    input_pipeline.from_config(demo_config(path))
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return env


def _main_cmd(data_dir, workdir, *args):
    return [sys.executable, "-m", "xmr_jax.main", f"--config={REPO}/tests/main_test_config.py:{data_dir}",
            f"--workdir={workdir}", *args]


def _stderr_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


def test_cli_full_disk_one_message_status_1(small_disk, data_dir):
    workdir = small_disk / "run"
    proc = subprocess.run(_main_cmd(data_dir, workdir, "--config.async_checkpoints=True"), env=_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = _stderr_lines(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) <= 3, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    prefix = "error: could not save checkpoint step "
    assert errors[0].startswith(prefix), errors
    failed = int(errors[0][len(prefix):].split()[0])
    assert f"step {failed} in {workdir}/checkpoints: No space left on device (errno 28)" in errors[0]
    kept = [str(s) for s in range(2, failed, 2)]
    assert kept and f"the newest complete checkpoint is step {kept[-1]}." in errors[0]
    assert sorted(_leftovers(workdir / "checkpoints"), key=int) == kept[-3:]  # keep 3; nothing unfinished


def test_cli_divergence_one_message_status_1(tmp_path, data_dir):
    """lr 1e30: once the warm-up lets the updates through, the loss becomes Inf/NaN within a few
    steps; with checkpoints every 1000 steps nothing was saved, and the message says so."""
    proc = subprocess.run(_main_cmd(data_dir, tmp_path, "--config.optim.lr=1e30", "--config.ckpt_every_steps=1000"),
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = _stderr_lines(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "loss became NaN/Inf" in errors[0], lines
    assert "No checkpoint was written" in errors[0] and "last good" not in errors[0]
    assert not (tmp_path / "checkpoints").exists() or os.listdir(tmp_path / "checkpoints") == []


def test_cli_sigterm_checkpoints_exits_75_and_resubmission_resumes(tmp_path, data_dir):
    workdir = tmp_path / "run"
    args = ["--config.num_epochs=1000", "--config.log_every=1", "--config.eval_every_epochs=0",
            "--config.ckpt_every_steps=1000"]
    proc = subprocess.Popen(_main_cmd(data_dir, workdir, *args), env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        metrics = workdir / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("Stopped by signal at step ")]
    assert len(stopped) == 1, out[-3000:]
    step = int(stopped[0].split("step ")[1].split(";")[0])
    assert step >= 3
    lines = _stderr_lines(err)
    assert lines[-1].startswith(f"stopped: training stopped by signal at step {step};") and \
        lines[-1].endswith("Exit status 75: resubmit the same command to resume."), lines
    assert "Traceback" not in err
    assert "This TensorFlow binary" not in err and "cpu_feature_guard" not in err  # no TF banner
    assert checkpoints.Checkpointer(str(workdir)).all_steps() == [step]
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step + 1))  # every step up to the saved one, logged once

    # Resubmitted (here with an end in reach): resumes from the saved step and finishes.
    epochs = step // 6 + 1
    done = subprocess.run(_main_cmd(data_dir, workdir, f"--config.num_epochs={epochs}", "--mode=train",
                                    "--config.log_every=1"),
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {step}." in done.stdout and "Resumed from" in done.stdout
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 6 * epochs + 1))
