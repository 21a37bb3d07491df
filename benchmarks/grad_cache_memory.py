r"""Memory per device of the IRRA train step with and without gradient caching (compile only).

  python benchmarks/grad_cache_memory.py                       # ViT-B/16 384x128, batch 64, micro 8
  python benchmarks/grad_cache_memory.py --batch=128 --micro=16 --devices=1

Compiles xmr_jax.train's step for IRRA (sdm+id+mlm, 11003 identities as CUHK-PEDES, the recipe's
sparse MLM and text length buckets, float32 params + Adam) from jax.ShapeDtypeStruct inputs
(nothing is allocated or run), once as the full-batch step and once with config.micro_batch_size
= --micro (xmr_jax.grad_cache), on --devices simulated CPU devices (data parallel; --batch is the
global batch). Prints XLA's memory_analysis() per device in GiB as a markdown table: arguments
(state + batch shard), temporaries (activations, gradients, the cache), total = argument +
output + temp - alias (the donated state aliases its output). CPU compilation is what is
measured; GPU/TPU compilers schedule differently (the argument sizes are exact).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--micro", type=int, default=8, help="config.micro_batch_size (examples per device)")
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (data parallel)")
    p.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--loss_names", default="sdm+id+mlm")
    args = p.parse_args(argv)
    if args.batch % args.devices or (args.batch // args.devices) % args.micro:
        p.error(f"--micro={args.micro} must divide the per-device batch --batch/--devices")
    return args


def compile_step(config):
    """The jitted train step as train.train builds it, compiled from abstract inputs."""
    import jax

    from xmr_jax import grad_cache, optim, parallel, train
    from xmr_jax.models.families import get_family

    family = get_family(config.model_family)
    model = family.build(config)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    params = train.abstract_params(model, config)
    tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=1000)
    abstract_state = jax.eval_shape(lambda p: train.create_train_state(p, tx), params)
    state_sh = parallel.param_shardings(abstract_state, mesh, config.mesh.strategy)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
    batch_sh = parallel.batch_sharding(mesh)
    one = family.init_batch(config)
    batch = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype, sharding=batch_sh)
             for k, v in one.items()}
    grad_fn = grad_cache.grad_fn_from_config(model, family, config, mesh)
    step = jax.jit(train.make_train_step(model, family.loss_fn(config), tx, grad_fn),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
    return step.lower(state, batch).compile()


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from configs.common import irra_config
    from xmr_jax import parallel

    rows = []
    for micro in (0, args.micro):
        config = irra_config("cuhk_pedes", num_classes=11003,
                             arg=f"batch_size={args.batch},init=,precision={args.precision},"
                                 f"loss_names={args.loss_names}")
        config.mesh.data, config.mesh.fsdp = args.devices, 1
        config.micro_batch_size = micro
        t0 = time.perf_counter()
        mem = parallel.memory_per_device(compile_step(config))
        print(f"compiled micro_batch_size={micro} in {time.perf_counter() - t0:.0f} s: {mem}",
              file=sys.stderr, flush=True)
        rows.append((micro, mem))
    per_device = args.batch // args.devices
    print(f"\nIRRA {args.loss_names} train step, ViT-B/16 384x128, global batch {args.batch} "
          f"({per_device} per device), {args.precision} compute, float32 params + Adam; "
          f"{args.devices} {jax.devices()[0].platform.upper()} device(s); GiB per device (XLA memory_analysis)\n")
    print("| micro_batch_size | argument | output | temp | total |")
    print("|---|---:|---:|---:|---:|")
    for micro, mem in rows:
        label = f"{micro} ({per_device // micro} micro-batches)" if micro else "off (full batch)"
        if mem is None:
            print(f"| {label} | n/a | n/a | n/a | n/a |")
            continue
        g = {k: v / GIB for k, v in mem.items()}
        print(f"| {label} | {g['argument']:.2f} | {g['output']:.2f} | {g['temp']:.2f} | {g['total']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
