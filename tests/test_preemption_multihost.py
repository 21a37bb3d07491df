"""SIGTERM on one process of a 2-process job: both processes stop after the same step and save it.

tests/preempt_multihost_driver.py runs the real trainer in 2 processes x 2 CPU devices
(jax.distributed, gloo); process 1 alone receives SIGTERM while step 4 runs (when batch 5 is
pulled). The per-step agreement (xmr_jax.checkpoints.StopPoller: a max-reduction of the flags
dispatched with each step, read at the next step) carries the flag into the reduction of step 5,
read by both processes at step 6: both stop after step 6 and save it together (one process alone
would stop after step 5: its own flag needs no agreement).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from xmr_jax import checkpoints

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "preempt_multihost_driver.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_on_one_process_stops_all_at_the_same_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_PROCESSES",
                                                             "JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    port, workdir, out = _free_port(), tmp_path / "run", str(tmp_path / "out_")
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(DRIVER), str(i), "2", str(port), str(workdir), out, "5"],
                              env=env, cwd=REPO, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, code in enumerate(codes):
        assert code == 0, f"process {i}:\n{logs[i].read_text()[-4000:]}"
    results = [json.load(open(f"{out}{i}.json")) for i in range(2)]
    assert results == [{"stopped": True, "step": 6}] * 2, results
    assert checkpoints.Checkpointer(str(workdir)).all_steps() == [6]
