r"""One process of a multi-process (or single-process) run of the real trainer on CPU.

  python tests/multihost_driver.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS WORKDIR OUT.npz \
      [--steps=6] [--strategy=data|fsdp] [--fsdp=1]

Each process gets DEVICES_PER_PROCESS simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count, set here before jax is imported) and, when
NUM_PROCESSES > 1, joins the job through jax.distributed (coordinator 127.0.0.1:PORT, CPU
collectives over gloo). It trains the tiny IRRA of tests/train_fixtures.py (sdm+id, global
batch 8, Adam eps 1e-3) for --steps steps with log_every=1, feeding process i rows
[i*8/N, (i+1)*8/N) of each step's deterministic global batch; the trainer saves the final orbax
checkpoint from all processes into WORKDIR/checkpoints and process 0 writes WORKDIR/metrics.jsonl.
Process 0 then writes OUT.npz: losses float64 [steps] (from metrics.jsonl), params float32 [P]
(all parameters flattened in jax.tree.leaves order), step int [].

Run every process of a job (same PORT, WORKDIR, OUT) concurrently; launch/local_multihost.sh
--compare and tests/test_multihost.py do that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("process_id", type=int)
    p.add_argument("num_processes", type=int)
    p.add_argument("port", type=int)
    p.add_argument("devices_per_process", type=int)
    p.add_argument("workdir")
    p.add_argument("out", help="output .npz (written by process 0)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--strategy", default="data", choices=("data", "fsdp"))
    p.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp size (mesh.data = the rest)")
    args = p.parse_args(argv)
    if not 0 <= args.process_id < args.num_processes:
        p.error(f"process_id={args.process_id} must be in [0, num_processes={args.num_processes})")
    if args.devices_per_process < 1:
        p.error(f"devices_per_process={args.devices_per_process} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before jax is imported: this process's simulated CPU devices, CPU only.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={args.devices_per_process}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from tests import train_fixtures
    from xmr_jax import parallel, train

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in jax 0.10
        parallel.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    assert jax.process_count() == args.num_processes, (jax.process_count(), args.num_processes)
    assert jax.local_device_count() == args.devices_per_process, jax.local_devices()

    config = train_fixtures.tiny_config()
    config.num_epochs = 1
    config.log_every = 1
    config.ckpt_every_steps = 10 ** 6  # only the final checkpoint
    config.optim.eps = 1e-3  # IRRA's Adam eps: no amplification of rounding in tiny gradients
    config.mesh.strategy = args.strategy
    config.mesh.fsdp = args.fsdp
    config.mesh.data = -1
    train.validate_config(config)

    pid, nproc = jax.process_index(), jax.process_count()
    result = train.train(
        config, args.workdir,
        lambda start: train_fixtures.iterator_from(start, process_index=pid, process_count=nproc),
        steps_per_epoch=args.steps)

    # Global values on every process (a collective: all processes call it).
    leaves = [multihost_utils.process_allgather(x, tiled=True) for x in jax.tree.leaves(result.state.params)]
    step = int(multihost_utils.process_allgather(result.state.step, tiled=True))
    if pid == 0:
        with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        losses = [r["loss"] for r in records if r.get("split") == "train"]
        params = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in leaves])
        np.savez(args.out, losses=np.asarray(losses, np.float64), params=params, step=step)
        print(f"process 0: {len(losses)} losses {np.round(losses, 5).tolist()}, {params.size} params "
              f"-> {args.out}", flush=True)
    multihost_utils.sync_global_devices("multihost_driver done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
