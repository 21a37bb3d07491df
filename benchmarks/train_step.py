r"""Seconds per IRRA train step (sdm+id+mlm, Adam): xmr_jax's compiled step vs the same step in PyTorch.

  python benchmarks/train_step.py                       # demo config and ViT-B/16 384x128 batch 8
  python benchmarks/train_step.py --cases=demo --steps=20

Synthetic batches (no TensorFlow needed, so it also runs on the GPU machines). The PyTorch side is
transformers' CLIPModel towers with IRRA's heads and losses (benchmarks/torch_irra.py), same sizes,
same Adam (eps 1e-3, L2 4e-5). The MLM head runs where each config says: the demo computes the
49408-way logits at up to 6 masked positions per caption (model.mlm_max_predictions), the ViT-B/16
case at every position like the reference; the PyTorch side always at every position. On a GPU it also prints the MFU of the compiled step from XLA's FLOP
count (cost_analysis) against the chip's peak bf16 FLOP/s (--peak_tflops).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from configs import demo
from configs.common import irra_config
from xmr_jax import optim, train
from xmr_jax.models.clip import CLIP_PRESETS
from xmr_jax.models.families import get_family


def case_config(name: str, precision: str):
    if name == "demo":
        config = demo.get_config("loss_names=sdm+id+mlm")  # the demo towers with the full IRRA objective
        config.num_classes = 1500
    elif name == "vitb16":
        config = irra_config("cuhk_pedes", num_classes=11003, arg="batch_size=8,init=")
    else:
        raise ValueError(f"unknown case {name!r}; use demo or vitb16")
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


def time_jax(config, batch, steps: int, warmup: int):
    family = get_family(config.model_family)
    model = family.build(config)
    params = train.init_params(model, config, config.data.image_size, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=1000)
    state = train.create_train_state(params, tx)
    step = jax.jit(train.make_train_step(model, family.losses, tx, config), donate_argnums=(0,))
    batch = jax.device_put(batch)
    compiled = step.lower(state, batch).compile()
    flops = None
    try:
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        flops = float(analysis.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort on some backends
        pass
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps, flops, float(metrics["loss"])


def time_torch(config, batch, steps: int, warmup: int, precision: str):
    import torch
    from transformers import CLIPConfig, CLIPModel

    from benchmarks.torch_irra import TorchIRRA, irra_loss

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
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = irra_loss(model(images, ids, mlm_ids), pids, labels)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, float(loss.detach())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="demo,vitb16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default=None, help="float32|bfloat16 (default: bf16 on GPU, f32 on CPU)")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--no_torch", action="store_true")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    precision = args.precision or ("bfloat16" if on_gpu else "float32")
    device = jax.devices()[0].device_kind
    print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}, precision {precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    rows = []
    for name in args.cases.split(","):
        config = case_config(name, precision)
        batch = synthetic_batch(config, np.random.default_rng(0))
        s_jax, flops, _ = time_jax(config, batch, args.steps, args.warmup)
        s_torch = None if args.no_torch else time_torch(config, batch, args.steps, args.warmup, precision)[0]
        mfu = (flops / s_jax / (args.peak_tflops * 1e12)) if (on_gpu and flops) else None
        rows.append((name, config.batch_size, s_jax, s_torch, flops, mfu))
    print("\n| case | batch | xmr_jax s/step | img/s | PyTorch s/step | img/s | PyTorch/xmr_jax | GFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, b, sj, st, flops, mfu in rows:
        ts = f"{st:.4f} | {b / st:.1f} | {st / sj:.2f}x" if st else "- | - | -"
        print(f"| {name} | {b} | {sj:.4f} | {b / sj:.1f} | {ts} | "
              f"{flops / 1e9 if flops else float('nan'):.1f} | {f'{100 * mfu:.1f}%' if mfu else '-'} |")


if __name__ == "__main__":
    main()
