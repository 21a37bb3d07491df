"""Multi-host on CPU: 2 processes x 2 devices == 1 process x 4 devices, and the checkpoint restores.

The real trainer runs in subprocesses (tests/multihost_driver.py; jax.distributed on
127.0.0.1:<free port>, gloo collectives) without this test session's 8-device XLA_FLAGS: the tiny
IRRA of tests/train_fixtures.py, 6 steps, global batch 8 (each process feeds its contiguous half),
Adam eps 1e-3. Expected difference: float32 reduction order only (observed ~1e-7 on params).
The launcher's --help / --dry-run / argument errors are checked without running anything.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from xmr_jax import checkpoints

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "multihost_driver.py"
LAUNCHER = REPO / "launch" / "local_multihost.sh"
STEPS = 6
RTOL, ATOL = 1e-5, 1e-6  # params and losses: 2x2 vs 1x4 devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_PROCESSES",
                                                             "JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_job(num_processes: int, devices: int, workdir: Path, timeout: float = 600) -> dict:
    """Runs all processes of one driver job concurrently; returns process 0's out.npz."""
    port, out = _free_port(), workdir / "out.npz"
    logs = [workdir.parent / f"{workdir.name}_process_{i}.log" for i in range(num_processes)]
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, str(DRIVER), str(i), str(num_processes), str(port), str(devices),
               str(workdir), str(out), f"--steps={STEPS}"]
        procs.append(subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=open(logs[i], "w"),
                                      stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} of {num_processes} failed:\n{logs[i].read_text()[-4000:]}"
    return dict(np.load(out))


@pytest.mark.slow
def test_two_processes_equal_one_process_and_checkpoint_restores(tmp_path):
    single = _run_job(1, 4, tmp_path / "single")
    multi = _run_job(2, 2, tmp_path / "multi")
    assert len(multi["losses"]) == len(single["losses"]) == STEPS
    assert int(multi["step"]) == int(single["step"]) == STEPS
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=RTOL, atol=ATOL)
    assert multi["params"].size == single["params"].size > 1_000_000
    np.testing.assert_allclose(multi["params"], single["params"], rtol=RTOL, atol=ATOL)
    # Training moved the parameters (the comparison is not of two untouched inits).
    assert not np.allclose(multi["losses"][0], multi["losses"][-1])

    # The orbax checkpoint written jointly by the two processes restores in this single process
    # (8 devices here), bit-exactly equal to the params process 0 gathered at the end of training.
    assert checkpoints.Checkpointer(str(tmp_path / "multi")).all_steps() == [STEPS]
    params, step = checkpoints.load_params(str(tmp_path / "multi"))
    assert step == STEPS
    restored = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(params)])
    np.testing.assert_array_equal(restored, multi["params"])


def test_driver_rejects_bad_arguments(tmp_path):
    bad = subprocess.run([sys.executable, str(DRIVER), "2", "2", "1234", "2", str(tmp_path), "o.npz"],
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "process_id=2 must be in [0, num_processes=2)" in bad.stderr


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _launch(*args):
    return subprocess.run(["bash", str(LAUNCHER), *args], env=_env(), cwd="/", capture_output=True,
                          text=True, timeout=60)


@needs_bash
def test_launcher_help_and_dry_run(tmp_path):
    helped = _launch("--help")
    assert helped.returncode == 0 and "--compare" in helped.stdout and "--dry-run" in helped.stdout
    dry = _launch("--dry-run", f"--workdir={tmp_path}", "--port=4321", "--", "--config.num_epochs=1")
    assert dry.returncode == 0, dry.stderr
    lines = [l for l in dry.stdout.splitlines() if l.startswith("+ ")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in line
        assert "-m xmr_jax.main --config=configs/demo.py" in line
        assert f"--workdir={tmp_path} --coordinator_address=127.0.0.1:4321 --num_processes=2 --process_id={i}" in line
        assert line.endswith(f"--config.num_epochs=1 > {tmp_path}/logs/process_{i}.log 2>&1 &")
    assert not (tmp_path / "logs").exists()  # nothing ran
    cmp = _launch("--dry-run", "--compare", f"--workdir={tmp_path}", "--num-processes=2",
                  "--devices-per-process=2", "--port=4321")
    assert cmp.returncode == 0, cmp.stderr
    assert f"multihost_driver.py 1 2 4321 2 {tmp_path}/compare_multi" in cmp.stdout
    assert f"device_count=4 JAX_PLATFORMS=cpu python tests/multihost_driver.py 0 1 4321 4 {tmp_path}/compare_single" in cmp.stdout


@needs_bash
@pytest.mark.parametrize("args,message", [
    (["--num-processes=0"], "--num-processes='0' must be a positive integer"),
    (["--devices-per-process=two"], "--devices-per-process='two' must be a positive integer"),
    (["--config=configs/nope.py"], "config file 'configs/nope.py' not found"),
    (["--bogus"], "unknown option '--bogus'"),
    (["--compare", "--dry-run", "--", "--config.x=1"], "--compare runs tests/multihost_driver.py"),
])
def test_launcher_errors_name_the_option(args, message):
    res = _launch(*args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
