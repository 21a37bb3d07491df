"""launch/tpu_pod.sh, launch/gpu.sh (and local_multihost.sh's exit statuses): help, dry runs,
stubbed runs, error messages, and exit status 75 after a preemption.

`gcloud`, `nvidia-smi` and `python` are replaced by stub scripts that log their arguments, so the
tests check the exact commands the launchers would run without any cloud or GPU.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_pod.sh"
GPU = REPO / "launch" / "gpu.sh"
LOCAL = REPO / "launch" / "local_multihost.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _stub(bin_dir: Path, name: str, body: str) -> Path:
    """Writes an executable sh script `name` that logs `name args` to $STUB_LOG, then runs body."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$STUB_LOG"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


_TOOLS = ("bash", "sh", "env", "git", "dirname", "basename", "cat", "mkdir", "rm", "tar", "gzip")


@pytest.fixture(scope="module")
def tools_path(tmp_path_factory) -> str:
    """A PATH folder with only the basic tools the launchers use (no real gcloud / nvidia-smi)."""
    tools = tmp_path_factory.mktemp("tools")
    for name in _TOOLS:
        found = shutil.which(name)
        if found:
            (tools / name).symlink_to(found)
    return str(tools)


def _run(script: Path, args, env, cwd=REPO):
    return subprocess.run([shutil.which("bash"), str(script), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def tpu_env(tmp_path, tools_path):
    bin_dir = tmp_path / "bin"
    # describe succeeds (slice exists) when DESCRIBE_RC=0, fails otherwise.
    _stub(bin_dir, "gcloud", '[ "$4" = describe ] && { echo READY; exit "${DESCRIBE_RC:-1}"; }\nexit 0')
    log = tmp_path / "calls.log"
    log.touch()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{tools_path}",
        "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "STUB_LOG": str(log),
        "TPU_NAME": "xmr-test", "ZONE": "us-central2-b", "PROJECT": "proj-1",
        "CONFIG": "configs/demo.py", "WORKDIR": "gs://bucket/run1",
    }
    return env, log


def _lines(text: str, prefix: str = "+ "):
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


def test_tpu_help(tools_path):
    res = _run(TPU, ["--help"], {"PATH": tools_path})
    assert res.returncode == 0, res.stderr
    for word in ("Usage:", "TPU_NAME", "ZONE", "PROJECT", "WORKDIR", "CONFIG", "--dry-run"):
        assert word in res.stdout


def test_tpu_missing_variables(tpu_env):
    env, log = tpu_env
    for var in ("TPU_NAME", "PROJECT", "WORKDIR"):
        env.pop(var)
    res = _run(TPU, ["--dry-run"], env)
    assert res.returncode != 0
    assert "missing required variable(s): TPU_NAME PROJECT WORKDIR" in res.stderr
    assert log.read_text() == ""


def test_tpu_missing_gcloud(tpu_env, tools_path):
    env, log = tpu_env
    env["PATH"] = tools_path
    res = _run(TPU, [], env)
    assert res.returncode != 0
    assert "gcloud not found on PATH" in res.stderr


def test_tpu_bad_workdir_and_config(tpu_env):
    env, _ = tpu_env
    res = _run(TPU, ["--dry-run", "--workdir", "relative/dir"], env)
    assert res.returncode != 0 and "WORKDIR='relative/dir' must be gs://" in res.stderr
    res = _run(TPU, ["--dry-run", "--config", "configs/no_such.py"], env)
    assert res.returncode != 0 and "configs/no_such.py' not found" in res.stderr


def test_tpu_dry_run_prints_every_command_and_runs_none(tpu_env):
    env, log = tpu_env
    res = _run(TPU, ["--dry-run", "--accelerator-type", "v5p-64", "--spot", "--",
                     "--config.batch_size=256", "--config.data.data_dir=/mnt/data sets"], env)
    assert res.returncode == 0, res.stderr
    assert log.read_text() == "", "dry run must not call gcloud"
    cmds = _lines(res.stdout)
    common = "--zone=us-central2-b --project=proj-1"
    assert cmds[0] == f"gcloud compute tpus tpu-vm describe xmr-test {common} '--format=value(state)'"
    assert cmds[1] == (f"gcloud compute tpus tpu-vm create xmr-test {common} "
                       "--accelerator-type=v5p-64 --version=tpu-ubuntu2204-base --spot")
    assert cmds[2].startswith(f"git -C {REPO} archive --format=tar.gz")
    assert cmds[3].startswith("gcloud compute tpus tpu-vm scp ") and cmds[3].endswith("--worker=all")
    install, train = cmds[4], cmds[5]
    assert install.startswith(f"gcloud compute tpus tpu-vm ssh xmr-test {common} --worker=all")
    assert "tar -xzf ~/xmr_jax.tar.gz" in install and "pip install" in install and "jax\\[tpu\\]" in install
    assert train.startswith(f"gcloud compute tpus tpu-vm ssh xmr-test {common} --worker=all '--command=")
    assert ("python -m xmr_jax.main --config=configs/demo.py --workdir=gs://bucket/run1 "
            "--config.batch_size=256 --config.data.data_dir=/mnt/data\\ sets") in train
    assert len(cmds) == 6


def test_tpu_accepts_option_equals_value(tpu_env):
    """`--opt=value` works as `--opt value` (as in gpu.sh and local_multihost.sh)."""
    env, _ = tpu_env
    spaced = _run(TPU, ["--dry-run", "--accelerator-type", "v5p-64", "--workdir", "gs://b/r2"], env)
    equals = _run(TPU, ["--dry-run", "--accelerator-type=v5p-64", "--workdir=gs://b/r2"], env)
    assert spaced.returncode == 0 and equals.returncode == 0, equals.stderr
    drop_tarball = lambda cmds: [c for c in cmds if "xmr_jax_" not in c]  # temp file names differ
    assert drop_tarball(_lines(equals.stdout)) == drop_tarball(_lines(spaced.stdout))
    assert "--accelerator-type=v5p-64" in equals.stdout and "--workdir=gs://b/r2" in equals.stdout


@pytest.mark.parametrize("exists", [True, False])
def test_tpu_stubbed_run_reuses_or_creates(tpu_env, exists):
    env, log = tpu_env
    env["DESCRIBE_RC"] = "0" if exists else "1"
    res = _run(TPU, ["--git-url", "https://example.com/xmr_jax.git", "--extras", "test"], env)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("gcloud compute tpus tpu-vm describe xmr-test")
    created = [c for c in calls if " tpu-vm create " in c]
    assert len(created) == (0 if exists else 1)
    ssh = [c for c in calls if " tpu-vm ssh " in c]
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    assert "git clone --depth=1 https://example.com/xmr_jax.git" in ssh[0]
    assert "-e .\\[test\\]" in ssh[0]
    assert ssh[1].endswith("-m xmr_jax.main --config=configs/demo.py --workdir=gs://bucket/run1")
    assert not [c for c in calls if " scp " in c], "a --git-url install copies nothing"


def test_tpu_tarball_is_built_and_copied(tpu_env, tmp_path):
    """Runs in a throwaway clone (the launcher calls `git stash create`; the real repo is left alone)."""
    clone = tmp_path / "clone"
    res = subprocess.run(["git", "clone", "-q", "--depth=1", f"file://{REPO}", str(clone)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot clone the repository: {res.stderr[-300:]}")
    (clone / "launch").mkdir(exist_ok=True)
    shutil.copy(TPU, clone / "launch" / "tpu_pod.sh")  # the version under test
    (clone / "configs" / "demo.py").write_text("# edited, uncommitted\n" + (REPO / "configs" / "demo.py").read_text())
    env, log = tpu_env
    env["DESCRIBE_RC"] = "0"
    res = _run(clone / "launch" / "tpu_pod.sh", ["--tpu-name", "pod2"], env, cwd=clone)
    assert res.returncode == 0, res.stderr
    tarball = tmp_path / "xmr_jax_pod2.tar.gz"
    listing = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True).stdout.split()
    assert "configs/demo.py" in listing and "pyproject.toml" in listing
    shipped = subprocess.run(["tar", "-xzOf", str(tarball), "configs/demo.py"], capture_output=True, text=True)
    assert shipped.stdout.startswith("# edited, uncommitted"), "uncommitted edits of tracked files ship"
    scp = [c for c in log.read_text().splitlines() if " scp " in c]
    assert scp == [f"gcloud compute tpus tpu-vm scp {tarball} pod2:~/xmr_jax.tar.gz "
                   "--zone=us-central2-b --project=proj-1 --worker=all"]


@pytest.fixture
def gpu_env(tmp_path, tools_path):
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PATH": f"{bin_dir}{os.pathsep}{tools_path}", "HOME": str(tmp_path),
           "STUB_LOG": str(log), "WORKDIR": str(tmp_path / "run")}
    return env, log, bin_dir


def test_gpu_help(tools_path):
    res = _run(GPU, ["--help"], {"PATH": tools_path})
    assert res.returncode == 0
    for word in ("Usage:", "--profile", "profile_steps", "profile_dir", "log_every", "--dry-run"):
        assert word in res.stdout


def test_gpu_dry_run_debug_defaults_and_profile(gpu_env, tmp_path):
    env, log, bin_dir = gpu_env
    _stub(bin_dir, "nvidia-smi", "exit 0")
    res = _run(GPU, ["--dry-run", "--profile", "--", "--config.eval_every_epochs=1"], env)
    assert res.returncode == 0, res.stderr
    assert log.read_text() == ""
    run = tmp_path / "run"
    assert _lines(res.stdout)[-1] == (
        f"python -m xmr_jax.main --config=configs/demo.py --workdir={run} --config.log_every=10 "
        f"--config.profile_steps=10,20 --config.profile_dir={run}/profile --config.eval_every_epochs=1")
    res = _run(GPU, ["--dry-run", "--profile=3,5", "--log-every", "2"], env)
    assert "--config.log_every=2 --config.profile_steps=3,5" in res.stdout
    res = _run(GPU, ["--dry-run", "--profile=3"], env)
    assert res.returncode != 0 and "START,STOP" in res.stderr


def test_gpu_without_nvidia_smi_fails_clearly(gpu_env):
    env, _, _ = gpu_env
    res = _run(GPU, [], env)
    assert res.returncode != 0
    assert "nvidia-smi not found" in res.stderr and "ALLOW_NO_GPU=1" in res.stderr
    res = _run(GPU, ["--venv", "/no/such/venv"], {**env, "ALLOW_NO_GPU": "1"})
    assert res.returncode != 0 and "no venv at /no/such/venv" in res.stderr


def test_gpu_stubbed_run(gpu_env, tmp_path):
    """Full run path: nvidia-smi probe, venv activation, JAX GPU check, trainer command."""
    env, log, bin_dir = gpu_env
    _stub(bin_dir, "nvidia-smi", 'echo "0, Fake GPU, 80 GiB, 555.0"')
    venv_bin = tmp_path / "venv" / "bin"
    _stub(venv_bin, "python", "exit 0")
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    res = _run(GPU, ["--venv", str(tmp_path / "venv"), "--config", "configs/demo.py:batch_size=8"], env)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("nvidia-smi --query-gpu=")
    assert calls[1] == "python -c import jax; jax.devices('gpu')"
    assert calls[2] == (f"python -m xmr_jax.main --config=configs/demo.py:batch_size=8 "
                        f"--workdir={tmp_path / 'run'} --config.log_every=10")


# ----------------------------------------------------------------------------- exit status 75


def test_help_documents_the_exit_statuses(tools_path):
    for script in (GPU, TPU, LOCAL):
        res = _run(script, ["--help"], {"PATH": tools_path + os.pathsep + "/bin" + os.pathsep + "/usr/bin"})
        assert res.returncode == 0, res.stderr
        assert "75" in res.stdout and "EX_TEMPFAIL" in res.stdout and "resume" in res.stdout, script


def test_gpu_run_returns_the_trainer_status_and_passes_sigterm(gpu_env, tmp_path):
    """gpu.sh execs the trainer: its status (75 after a preemption) is the script's, and a SIGTERM
    sent to the script's pid reaches the trainer."""
    import signal
    import time

    env, log, bin_dir = gpu_env
    _stub(bin_dir, "nvidia-smi", 'echo "0, Fake GPU, 80 GiB, 555.0"')
    venv_bin = tmp_path / "venv" / "bin"
    # The stub trainer: the JAX check passes; the training command waits for SIGTERM -> exit 75.
    _stub(venv_bin, "python", '[ "$1" = -c ] && exit 0\ntrap "exit 75" TERM\necho ready > "$STUB_LOG.ready"\n'
                              'i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 0')
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    proc = subprocess.Popen([shutil.which("bash"), str(GPU), "--venv", str(tmp_path / "venv")], env={**env, "PATH": env["PATH"] + os.pathsep + "/bin:/usr/bin"},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = Path(str(log) + ".ready")
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate(timeout=5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, (out, err)


def _multihost_env(tmp_path, python_body):
    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "python", python_body)
    return {"PATH": f"{bin_dir}{os.pathsep}/bin{os.pathsep}/usr/bin", "HOME": str(tmp_path),
            "STUB_LOG": str(tmp_path / "calls.log"), "VENV": "none"}


@pytest.mark.parametrize("body,status,message", [
    ("exit 75", 75, "run the same command again to resume (exit status 75)"),
    ('case "$*" in *process_id=1*) exit 75 ;; esac\nexit 1', 1, "multi-host run failed"),
])
def test_local_multihost_status(tmp_path, body, status, message):
    env = _multihost_env(tmp_path, body)
    res = _run(LOCAL, [f"--workdir={tmp_path / 'w'}", "--port=4321"], env)
    assert res.returncode == status, (res.stdout, res.stderr)
    assert message in res.stderr


def test_tpu_gcs_workdir_installs_the_storage_client(tpu_env):
    """orbax lists checkpoint steps on gs:// through google-cloud-storage (bucket layout query)."""
    env, _ = tpu_env
    gcs = _run(TPU, ["--dry-run"], env)
    assert gcs.returncode == 0, gcs.stderr
    assert "google-cloud-storage" in _lines(gcs.stdout)[4]
    nfs = _run(TPU, ["--dry-run"], {**env, "WORKDIR": "/mnt/shared/run"})
    assert nfs.returncode == 0, nfs.stderr
    assert "google-cloud-storage" not in nfs.stdout
