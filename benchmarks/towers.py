"""CLIP towers fwd+bwd: xmr_jax (XLA) vs PyTorch (transformers CLIPVisionModel / CLIPTextModel).

  python benchmarks/towers.py                          # ViT-B/16 at 384x128 + text 512x12, batch 8, fp32 + bf16
  python benchmarks/towers.py --layers=2 --reps=3      # quicker: 2 blocks per tower (per-block rates are the same)
  python benchmarks/towers.py --towers=image --precisions=float32 --no-torch

Both sides compute loss = sum(image tokens after ln_post @ proj) + sum(text tokens after ln_final @
text_projection) and its gradient w.r.t. all parameters (no optimizer). bfloat16 = compute dtype bf16
with float32 params (xmr_jax `dtype=bfloat16`; torch `autocast(bfloat16)`). Times are medians of
`--reps` timed calls after one warm-up call, JAX and torch alternating in the same process, so the
ratio is meaningful on a shared machine; the load average is printed before and after.
GFLOP/s for JAX uses XLA's cost analysis of the compiled step (the same count is used for torch).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time(fn, reps: int, warmup: bool = True) -> tuple[float, float, int]:
    """(median wall seconds, CPU seconds (user+sys, all threads) per call, minor page faults per
    call) over `reps` calls after one warm-up call."""
    if warmup:
        fn()
    ts, r0 = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n = max(reps, 1)
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / n
    return float(np.median(ts)), cpu, (r1.ru_minflt - r0.ru_minflt) // n


def gemm_rates(m=1544, k=768, n=3072, reps=5) -> str:
    """The plain float32 GEMM rate of jax and torch right now (same shapes as a ViT-B MLP matmul)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    mm = jax.jit(jnp.matmul)
    tj = _time(lambda: mm(ja, jb).block_until_ready(), reps)[0]
    tt = _time(lambda: ta @ tb, reps)[0]
    f = 2 * m * k * n / 1e9
    return f"GEMM {m}x{k}x{n} f32: jax {f / tj:.0f} GFLOP/s, torch {f / tt:.0f} GFLOP/s"


def jax_step(args, precision):
    import jax
    import jax.numpy as jnp

    from xmr_jax.models.clip import clip_from_config, clip_param_shapes

    model = clip_from_config({"preset": "ViT-B/16", "image_size": (args.height, args.width), "dtype": precision,
                              "vision_layers": args.layers, "text_layers": args.layers})
    rng = np.random.default_rng(0)
    shapes = clip_param_shapes(model)
    keep = {"image": ("visual",), "text": ("text",), "both": ("visual", "text")}[args.towers]
    params = {k: jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), jnp.float32), v)
              for k, v in shapes.items() if k in keep}
    images = jnp.asarray(rng.standard_normal((args.batch, args.height, args.width, 3)), jnp.float32)
    ids = np.zeros((args.batch, 77), np.int32)
    ids[:, 0], ids[:, 1:20], ids[:, 20] = 49406, 1000, 49407
    ids = jnp.asarray(ids)

    def loss(p):
        total = 0.0
        if "visual" in p:
            total += jnp.sum(model.apply({"params": p}, images, method="encode_image")[1])
        if "text" in p:
            total += jnp.sum(model.apply({"params": p}, ids, method="encode_text")[1])
        return total

    step = jax.jit(jax.value_and_grad(loss))
    t = time.perf_counter()
    compiled = step.lower(params).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))

    def run():
        jax.block_until_ready(compiled(params))

    return run, flops, compile_s


def torch_step(args, precision):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    mods, fns = [], []
    if args.towers in ("image", "both"):
        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=args.layers,
                               num_attention_heads=12, image_size=(args.height, args.width), patch_size=16,
                               hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512)
        cfg.image_size = max(args.height, args.width)      # transformers' config only takes square sizes:
        vis = CLIPVisionModel(cfg)                            # give it a [1 + gh*gw, C] position table
        emb = next(m for n, m in vis.named_modules() if n.endswith("embeddings"))
        n_pos = 1 + (args.height // 16) * (args.width // 16)
        emb.position_embedding = torch.nn.Embedding(n_pos, 768)
        emb.register_buffer("position_ids", torch.arange(n_pos)[None], persistent=False)
        emb.interpolate_pos_encoding = lambda e, h, w: emb.position_embedding(emb.position_ids)
        post_ln = next(m for n, m in vis.named_modules() if n.endswith("post_layernorm"))
        proj = torch.nn.Linear(768, 512, bias=False)
        images = torch.randn(args.batch, 3, args.height, args.width)
        mods += [vis, proj]
        fns.append(lambda: proj(post_ln(vis(pixel_values=images, interpolate_pos_encoding=True)
                                        .last_hidden_state)).sum())
    if args.towers in ("text", "both"):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=args.layers,
                             num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5, eos_token_id=2, projection_dim=512)
        txt = CLIPTextModel(cfg)
        tproj = torch.nn.Linear(512, 512, bias=False)
        ids = torch.zeros(args.batch, 77, dtype=torch.long)
        ids[:, 0], ids[:, 1:20], ids[:, 20] = 49406, 1000, 49407
        mods += [txt, tproj]
        fns.append(lambda: tproj(txt(input_ids=ids).last_hidden_state).sum())
    params = [p for m in mods for p in m.parameters()]
    for m in mods:
        m.train()

    def run():
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = sum(f() for f in fns)
        loss.backward()

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--towers", default="both", choices=("image", "text", "both"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=12, help="blocks per tower (12 = ViT-B/16 / CLIP text)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--torch-reps", type=int, default=None, help="default: --reps (1 is enough for torch bf16 on "
                   "CPUs without native bf16 matmuls, where it is very slow)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-setup", action="store_true", help="skip xmr_jax.cpu_runtime.configure_cpu_runtime()")
    args = p.parse_args()

    setup = "skipped (--no-setup)"
    if not args.no_setup:
        from xmr_jax.cpu_runtime import configure_cpu_runtime
        setup = configure_cpu_runtime()   # may re-execute this script with GLIBC_TUNABLES set
    import jax
    import torch

    print(f"configure_cpu_runtime: {setup}")
    print(f"backend {jax.default_backend()}, torch threads {torch.get_num_threads()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"towers={args.towers} batch={args.batch} image {args.height}x{args.width} layers={args.layers}; "
          f"load average at start: {_load()}", flush=True)
    print(gemm_rates(), flush=True)
    for precision in args.precisions.split(","):
        run_j, flops, compile_s = jax_step(args, precision)
        tj, cj, fj = _time(run_j, args.reps)
        print(f"{precision:9s} jax   {tj:7.3f} s/step ({flops / tj / 1e9:5.1f} GFLOP/s; cpu {cj:6.2f} s/step, "
              f"{fj} minflt/step; {flops / 1e9:.0f} GFLOP, compile {compile_s:.0f} s)  load {_load()}", flush=True)
        if not args.no_torch:
            run_t = torch_step(args, precision)
            tt, ct, ft = _time(run_t, args.torch_reps or args.reps)
            print(f"{precision:9s} torch {tt:7.3f} s/step ({flops / tt / 1e9:5.1f} GFLOP/s; cpu {ct:6.2f} s/step, "
                  f"{ft} minflt/step)  load {_load()}", flush=True)
            tj2, cj2, _ = _time(run_j, 1, warmup=False)   # jax once more: the load may have changed meanwhile
            print(f"{precision:9s} torch/jax: wall {tt / min(tj, tj2):5.2f}x, cpu time {ct / min(cj, cj2):5.2f}x",
                  flush=True)
    print(gemm_rates())
    print(f"load average at end: {_load()}")


if __name__ == "__main__":
    main()
