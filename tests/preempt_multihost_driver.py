r"""One process of a 2-process training run in which ONE process receives SIGTERM.

  python tests/preempt_multihost_driver.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT_PREFIX SIGNAL_AT

Each process has 2 simulated CPU devices and joins jax.distributed on 127.0.0.1:PORT (gloo). The
tiny IRRA of tests/train_fixtures.py trains for 40 steps; the LAST process sends itself SIGTERM
when its input pipeline pulls batch SIGNAL_AT (while step SIGNAL_AT - 1 runs). Every process
writes OUT_PREFIX<process_id>.json: {"stopped": bool, "step": int}. tests/test_multihost.py's
setup (environment, ports) is reused by tests/test_preemption_multihost.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main(argv) -> int:
    pid, nproc, port = int(argv[1]), int(argv[2]), int(argv[3])
    workdir, out_prefix, signal_at = argv[4], argv[5], int(argv[6])
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax

    from tests import train_fixtures
    from xmr_jax import parallel, train

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    parallel.initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    config = train_fixtures.tiny_config()
    config.num_epochs = 1
    config.log_every = 1000  # the stop must not depend on log steps
    config.ckpt_every_steps = 1000
    config.mesh.data = -1

    def on_step(step):
        if pid == nproc - 1 and step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train.train(
        config, workdir,
        lambda start: train_fixtures.iterator_from(start, on_step, process_index=pid, process_count=nproc),
        steps_per_epoch=40)
    step = int(jax.device_get(result.state.step))
    with open(f"{out_prefix}{pid}.json", "w") as f:
        json.dump({"stopped": bool(result.stopped), "step": step}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
