r"""Seconds per IRRA train step (sdm+id+mlm, Adam): xmr_jax's compiled step vs the same step in PyTorch.

  python benchmarks/train_step.py                                   # tiny and ViT-B/16, float32 and bfloat16
  python benchmarks/train_step.py --cases=vitb16_b64 --precisions=bfloat16 --steps=20   # on a GPU

Synthetic batches (no TensorFlow needed, so it also runs on the GPU machines): 30-word captions,
15% of the words masked. The PyTorch side is transformers' CLIPModel towers with IRRA's heads and
losses (tests/torch_irra.py, also the parity tests' reference), same sizes, same Adam (eps 1e-3,
L2 4e-5), computing the 49408-way MLM output at every position as IRRA does; on a GPU in the same precision
(bfloat16 = torch autocast), on CPU always in float32 (torch's fastest CPU path). The xmr_jax side runs the
configs as shipped: the MLM output only at masked positions (exact, `model.mlm_chunk`) and the
unmasked captions' text pass on the shortest length bucket (`model.text_length_buckets`). The two
sides are timed step by step in alternation, so a load change on a shared machine hits both
alike; prints the median step time of each side, their ratio and the load average; on a GPU also
the MFU of the compiled step from XLA's FLOP count (cost_analysis) against
the chip's peak bf16 FLOP/s (--peak_tflops).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from xmr_jax.cpu_runtime import configure_cpu_runtime  # noqa: E402  (imports no jax)

# Before jax is imported: on CPU this re-executes the script with glibc malloc settings that keep
# XLA:CPU from faulting in fresh pages for every temporary (xmr_jax/cpu_runtime.py). The torch side
# runs in the same process, under the same settings. --no_cpu_setup measures without them.
CPU_SETUP = ("skipped (--no_cpu_setup or imported)" if "--no_cpu_setup" in sys.argv or __name__ != "__main__"
             else configure_cpu_runtime())

import jax  # noqa: E402
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import demo
from configs.common import irra_config
from xmr_jax import optim, train
from xmr_jax.models.clip import CLIP_PRESETS
from xmr_jax.models.families import get_family


def case_config(name: str, precision: str):
    """The benchmark cases, built from the shipped configs (only sizes overridden).

    tiny: IRRA's recipe (configs/irra, sdm+id+mlm, 11003 ids, batch 64, Adam with IRRA's groups)
      on tiny towers: 64x32 images, 8x8 patches, width 128, 2 + 2 layers, 128-d embeddings.
    vitb16: the shipped CUHK-PEDES config as is (ViT-B/16 at 384x128) at batch 8.
    demo: configs/demo.py with the full IRRA objective.
    """
    if name == "tiny":
        config = irra_config("cuhk_pedes", num_classes=11003, arg="batch_size=64,init=")
        config.model.clip = ml_collections.ConfigDict(dict(
            preset="tiny", image_size=(64, 32), patch_size=8, vision_width=128, vision_layers=2,
            vision_heads=4, text_width=128, text_layers=2, text_heads=4, embed_dim=128))
        config.data.image_size = (64, 32)
    elif name == "vitb16":
        config = irra_config("cuhk_pedes", num_classes=11003, arg="batch_size=8,init=")
    elif name.startswith("vitb16_b"):
        config = irra_config("cuhk_pedes", num_classes=11003, arg=f"batch_size={int(name[8:])},init=")
    elif name == "demo":
        config = demo.get_config("loss_names=sdm+id+mlm")  # the demo towers with the full IRRA objective
        config.num_classes = 1500
    else:
        raise ValueError(f"unknown case {name!r}; use tiny, vitb16, vitb16_bN (batch N) or demo")
    config.precision = precision
    return config


def synthetic_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    b = config.batch_size
    h, w = config.data.image_size
    context = config.data.get("context_length", 77)
    n_words = min(30, context - 2)  # typical caption length
    ids = np.zeros((b, context), np.int32)
    ids[:, 0], ids[:, n_words + 1] = 49406, 49407
    ids[:, 1:n_words + 1] = rng.integers(1, 49405, size=(b, n_words))
    labels = np.where(rng.random((b, context)) < 0.15, ids, 0) * ((ids > 0) & (ids < 49405))
    labels[:, 1] = np.where(labels.sum(1) == 0, ids[:, 1], labels[:, 1])
    mlm_ids = np.where(labels > 0, 49405, ids).astype(np.int32)
    return {
        "images": rng.standard_normal((b, h, w, 3)).astype(np.float32),
        "text_ids": ids, "mlm_ids": mlm_ids, "mlm_labels": labels.astype(np.int32),
        "pids": rng.integers(0, config.num_classes, size=b).astype(np.int32),
        "image_ids": np.arange(b, dtype=np.int32),
    }


def _interleaved_medians(runners, steps: int, warmup: int) -> list[float]:
    """Median wall seconds per call of each `run()` in `runners`, timed in alternation (one call of
    each per round), so that a load change on a shared machine hits every side alike. Each run()
    blocks until its step is done."""
    for _ in range(warmup):
        for run in runners:
            run()
    times = [[] for _ in runners]
    for _ in range(steps):
        for run, ts in zip(runners, times):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def compile_step(config, batch):
    """(compiled train step, its initial state, the batch on device) for `config`."""
    family = get_family(config.model_family)
    model = family.build(config)
    params = train.init_params(model, config, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=1000)
    state = train.create_train_state(params, tx)
    step = jax.jit(train.make_train_step(model, family.loss_fn(config), tx), donate_argnums=(0,))
    batch = jax.device_put(batch)
    return step.lower(state, batch).compile(), state, batch


def executed_flops(config, batch) -> float | None:
    """XLA's FLOP count of the path a step on `batch` runs. cost_analysis() adds up every branch
    of a lax.cond / lax.switch, so this lowers the same step with one MLM pass and the text pass
    already cut to the bucket the batch selects (valid when no caption holds more than
    `mlm_chunk` targets, as in the synthetic batch)."""
    config = ml_collections.ConfigDict(config.to_dict())
    batch = dict(batch)
    buckets = sorted(int(b) for b in (config.model.get("text_length_buckets") or ()))
    needed = int(np.max(np.argmax(batch["text_ids"], axis=1))) + 1
    length = next((b for b in buckets if needed <= b < batch["text_ids"].shape[1]), None)
    if length:
        batch["text_ids"] = batch["text_ids"][:, :length]
    config.model.text_length_buckets = ()
    if config.model.get("mlm_chunk"):
        assert int((batch["mlm_labels"] != 0).sum(1).max()) <= config.model.mlm_chunk
        config.model.mlm_max_passes = 1
    compiled, _, _ = compile_step(config, batch)
    try:
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        return float(analysis.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort on some backends
        return None


def jax_runner(config, batch):
    """(run: one blocking call of the compiled, donated train step; executed XLA FLOPs per step;
    loss(): the last step's loss)."""
    flops = executed_flops(config, batch)
    compiled, state, batch = compile_step(config, batch)
    holder = {"state": state}

    def run():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        jax.block_until_ready(holder["metrics"])

    return run, flops, lambda: float(holder["metrics"]["loss"])


def torch_runner(config, batch, precision: str):
    """(run: one blocking IRRA train step in torch; loss(): the last step's loss)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from tests.torch_irra import TorchIRRA, irra_loss

    clip = dict(CLIP_PRESETS[config.model.clip.preset])
    clip.update({k: v for k, v in config.model.clip.items() if k != "preset"})
    h, w = config.data.image_size
    hf_config = CLIPConfig(
        text_config=dict(vocab_size=clip.get("vocab_size", 49408), hidden_size=clip["text_width"],
                         intermediate_size=4 * clip["text_width"], num_hidden_layers=clip["text_layers"],
                         num_attention_heads=clip["text_heads"], max_position_embeddings=77,
                         hidden_act="quick_gelu", eos_token_id=49407),
        vision_config=dict(hidden_size=clip["vision_width"], intermediate_size=4 * clip["vision_width"],
                           num_hidden_layers=clip["vision_layers"], num_attention_heads=clip["vision_heads"],
                           image_size=max(h, w), patch_size=clip["patch_size"], hidden_act="quick_gelu"),
        projection_dim=clip["embed_dim"],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = CLIPModel(hf_config)
    # Non-square input: a positional table with one row per patch of the (h/p) x (w/p) grid.
    n_pos = (h // clip["patch_size"]) * (w // clip["patch_size"]) + 1
    base.vision_model.embeddings.position_embedding = torch.nn.Embedding(n_pos, clip["vision_width"])
    model = TorchIRRA(base, config.num_classes, config.model.cross_depth, config.model.cross_heads).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-3, weight_decay=4e-5)
    tb = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    images = tb["images"].permute(0, 3, 1, 2).contiguous()
    ids, mlm_ids = tb["text_ids"].long(), tb["mlm_ids"].long()
    pids, labels = tb["pids"].long(), tb["mlm_labels"].long()
    # On CPU the reference runs float32 for both rows: torch's bfloat16 autocast on this CPU was
    # 13x slower than its float32 (97 s vs 7.2 s per tiny step), so float32 is its best time.
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16" and device == "cuda")

    holder = {}

    def run():
        opt.zero_grad(set_to_none=True)
        with autocast:
            holder["loss"], _ = irra_loss(model(images, ids, mlm_ids), pids, labels)
        holder["loss"].backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run, lambda: float(holder["loss"].detach())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny,vitb16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side, xmr_jax and torch alternating (the medians are reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precisions", default=None,
                        help="comma list of float32,bfloat16 (default: bfloat16 on GPU, both on CPU)")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100/H200 SXM: 989)")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--no_cpu_setup", action="store_true", help="skip xmr_jax.cpu_runtime.configure_cpu_runtime()")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    precisions = (args.precisions or ("bfloat16" if on_gpu else "float32,bfloat16")).split(",")
    device = jax.devices()[0].device_kind
    print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}, {os.cpu_count()} CPUs, "
          f"median of {args.steps} timed steps after {args.warmup} warm-up; load average at start "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; cpu runtime: {CPU_SETUP}", flush=True)
    rows = []
    for name in args.cases.split(","):
        for precision in precisions:
            config = case_config(name, precision)
            batch = synthetic_batch(config, np.random.default_rng(0))
            run_jax, flops, loss_jax = jax_runner(config, batch)
            runners, s_torch, loss_torch = [run_jax], None, None
            if not args.no_torch:
                run_torch, loss_torch = torch_runner(config, batch, precision)
                runners.append(run_torch)
            seconds = _interleaved_medians(runners, args.steps, args.warmup)
            s_jax, loss_jax = seconds[0], loss_jax()
            if not args.no_torch:
                s_torch, loss_torch = seconds[1], loss_torch()
            mfu = (flops / s_jax / (args.peak_tflops * 1e12)) if (on_gpu and flops) else None
            rows.append((name, precision, config.batch_size, s_jax, s_torch, flops, mfu))
            print(f"# {name} {precision}: xmr_jax {s_jax:.4f} s/step (loss {loss_jax:.3f}), torch "
                  f"{s_torch if s_torch is None else round(s_torch, 4)} s/step (loss {loss_torch}); steps interleaved; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print("\n| case | precision | batch | xmr_jax s/step | img/s | PyTorch s/step | img/s | PyTorch/xmr_jax | GFLOP/step (XLA) | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, precision, b, sj, st, flops, mfu in rows:
        ts = f"{st:.3f} | {b / st:.1f} | {st / sj:.2f}x" if st else "- | - | -"
        print(f"| {name} | {precision} | {b} | {sj:.3f} | {b / sj:.1f} | {ts} | "
              f"{flops / 1e9 if flops else float('nan'):.1f} | {f'{100 * mfu:.1f}%' if mfu else '-'} |")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
