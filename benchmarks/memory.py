r"""Memory per device of the compiled IRRA train step under "data" vs "fsdp" sharding (no allocation).

  python benchmarks/memory.py                          # ViT-B/16 and ViT-L/14, data and fsdp
  python benchmarks/memory.py --models=vitb16 --strategies=fsdp --devices=8

Builds the IRRA (sdm+id+mlm, 11003 identities as CUHK-PEDES, exact MLM at all 77 positions,
bfloat16 compute, float32 params + Adam state) train step of xmr_jax.train, and compiles it with
jax.jit(...).lower(abstract state, abstract batch).compile() from jax.ShapeDtypeStruct inputs only
(parameters are never materialized), on a mesh of --devices simulated CPU devices (data=N for
"data", data=1 fsdp=N for "fsdp"). Prints XLA's memory_analysis() per device: arguments (state +
batch shard), outputs, temporaries, and total = argument + output + temp - alias (the donated
state aliases its output), in GiB, as a markdown table.

Models: ViT-B/16 at IRRA's 384x128; ViT-L/14 at 392x140 (patch 14 needs multiples of 14; 28x10
patches, the closest 14-multiple to 384x128). Global batch --batch (default 64). CPU compilation of
the sharded programs is what is measured; XLA's GPU/TPU compilers schedule differently, so treat
the numbers as the CPU compiler's estimate (the argument sizes are exact).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODELS = {
    # name: (CLIP preset, image size (H, W))
    "vitb16": ("ViT-B/16", (384, 128)),
    "vitl14": ("ViT-L/14", (392, 140)),
}
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vitb16,vitl14", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--strategies", default="data,fsdp")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (mesh size)")
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args(argv)
    for m in args.models.split(","):
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {sorted(MODELS)}")
    for s in args.strategies.split(","):
        if s not in ("data", "fsdp"):
            p.error(f"--strategies: unknown strategy {s!r}; choose data and/or fsdp")
    if args.batch % args.devices:
        p.error(f"--batch={args.batch} must be a multiple of --devices={args.devices}")
    return args


def model_config(name: str, batch: int, precision: str, strategy: str, devices: int):
    from configs.common import irra_config

    preset, image_size = MODELS[name]
    config = irra_config("cuhk_pedes", num_classes=11003, arg=f"batch_size={batch},init=,precision={precision}")
    config.model.clip = {"preset": preset, "image_size": image_size}
    config.data.image_size = image_size
    config.mesh.strategy = strategy
    config.mesh.data, config.mesh.fsdp = (devices, 1) if strategy == "data" else (1, devices)
    return config


def compile_step(config):
    """Compiles the sharded train step from abstract inputs; returns (compiled, n_params)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xmr_jax import optim, parallel, train
    from xmr_jax.models.families import get_family

    family = get_family(config.model_family)
    model = family.build(config)
    h, w = config.data.image_size
    b, t = config.batch_size, model.base_model.context_length
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    one = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    dummy = {"images": one((1, h, w, 3), jnp.float32), "text_ids": one((1, t), jnp.int32),
             "mlm_ids": one((1, t), jnp.int32), "mlm_labels": one((1, t), jnp.int32),
             "pids": one((1,), jnp.int32), "image_ids": one((1,), jnp.int32)}
    params = jax.eval_shape(lambda r, d: model.init(r, d)["params"], jax.random.PRNGKey(0), dummy)
    tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=1000)
    abstract_state = jax.eval_shape(lambda p: train.create_train_state(p, tx), params)
    state_sh = parallel.param_shardings(abstract_state, mesh, config.mesh.strategy)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
    batch_sh = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype, sharding=batch_sh) for k, v in dummy.items()}
    step = jax.jit(train.make_train_step(model, family.loss_fn(config), tx),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
    compiled = step.lower(state, batch).compile()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return compiled, n_params


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from xmr_jax import parallel

    if jax.device_count() != args.devices:
        raise SystemExit(f"expected {args.devices} devices, JAX sees {jax.device_count()} "
                         f"({jax.devices()[0].platform}); run with JAX_PLATFORMS=cpu")
    rows = []
    for name in args.models.split(","):
        for strategy in args.strategies.split(","):
            config = model_config(name, args.batch, args.precision, strategy, args.devices)
            t0 = time.perf_counter()
            compiled, n_params = compile_step(config)
            mem = parallel.memory_per_device(compiled)
            secs = time.perf_counter() - t0
            mesh = f"data={config.mesh.data} fsdp={config.mesh.fsdp}"
            h, w = config.data.image_size
            label = f"{MODELS[name][0]} {h}x{w} ({n_params / 1e6:.0f}M params)"
            print(f"compiled {label} {strategy} [{mesh}] in {secs:.0f} s: {mem}", file=sys.stderr, flush=True)
            rows.append((label, strategy, mesh, mem))
    print(f"\nIRRA sdm+id+mlm train step, global batch {args.batch}, {args.precision} compute, float32 "
          f"params + Adam; {args.devices} {jax.devices()[0].platform.upper()} devices; GiB per device "
          f"(XLA memory_analysis)\n")
    print("| model | strategy | mesh | argument | output | temp | total |")
    print("|---|---|---|---:|---:|---:|---:|")
    for label, strategy, mesh, mem in rows:
        if mem is None:
            print(f"| {label} | {strategy} | {mesh} | n/a | n/a | n/a | n/a |")
            continue
        g = {k: v / GIB for k, v in mem.items()}
        print(f"| {label} | {strategy} | {mesh} | {g['argument']:.2f} | {g['output']:.2f} | "
              f"{g['temp']:.2f} | {g['total']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
