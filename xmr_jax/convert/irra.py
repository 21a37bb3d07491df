"""Import a PyTorch IRRA checkpoint (`best.pth`) as xmr_jax IRRA params.

Format: docs/semantics.md, section 'Checkpoints and file formats'.

    model, params = load_irra("best.pth")        # IRRA module + {"base_model", "cross_attn", ...}

The checkpoint is `{"model": state_dict}` (a bare state dict and DDP's `module.` prefix are also
accepted): the CLIP towers under `base_model.` (OpenAI names; Hugging Face names also work) and
the heads under the reference's names. The class count comes from `classifier.weight`, the
cross-modal depth from the number of `cross_modal_transformer.resblocks.N` blocks, so a checkpoint
trained on any data set loads without touching the config.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from xmr_jax.convert.core import CheckpointMismatchError, Entry, apply_table, load_state_dict_file
from xmr_jax.convert.openai import _block_entries

BASE = "base_model."


def unwrap_state_dict(checkpoint: Any, what: str) -> dict:
    """{"model": sd} / {"state_dict": sd} / sd, with DDP's `module.` prefix removed."""
    sd = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise CheckpointMismatchError(f"{what}: expected a state dict (or {{'model': state_dict}}), got {type(sd).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _shape(sd: Mapping, key: str, what: str) -> tuple:
    if key not in sd:
        raise CheckpointMismatchError(f"{what}: missing key {key!r} needed to read the head sizes")
    return tuple(sd[key].shape)


def head_sizes(sd: Mapping, what: str = "IRRA checkpoint") -> dict[str, Any]:
    """Reads width, class count, cross-modal depth, vocabulary and which heads exist."""
    sizes: dict[str, Any] = {"num_classes": 0, "cross_depth": 0, "has_mlm": "cross_attn.in_proj_weight" in sd}
    if "classifier.weight" in sd:
        sizes["num_classes"], sizes["width"] = _shape(sd, "classifier.weight", what)
    if sizes["has_mlm"]:
        sizes["width"] = _shape(sd, "cross_attn.in_proj_weight", what)[1]
        sizes["vocab_size"] = _shape(sd, "mlm_head.fc.weight", what)[0]
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"cross_modal_transformer\.resblocks\.(\d+)\.", k))}
        sizes["cross_depth"] = len(blocks)
    return sizes


def head_table(sizes: Mapping[str, Any]) -> list[Entry]:
    """Conversion table for the heads present in the checkpoint (cross-modal module, MLM, classifier)."""
    table: list[Entry] = []

    def linear(src: str, dst: tuple, out_dim: int, in_dim: int):
        table.append(Entry(f"{src}.weight", (out_dim, in_dim), ((dst + ("kernel",), "T"),)))
        table.append(Entry(f"{src}.bias", (out_dim,), ((dst + ("bias",), "id"),)))

    def layer_norm(src: str, dst: tuple, dim: int):
        table.append(Entry(f"{src}.weight", (dim,), ((dst + ("scale",), "id"),)))
        table.append(Entry(f"{src}.bias", (dim,), ((dst + ("bias",), "id"),)))

    if sizes["num_classes"]:
        linear("classifier", ("classifier",), sizes["num_classes"], sizes["width"])
    if sizes["has_mlm"]:
        w = sizes["width"]
        qkv = ("q_proj", "k_proj", "v_proj")
        table.append(Entry("cross_attn.in_proj_weight", (3 * w, w),
                           tuple((("cross_attn", n, "kernel"), ("qkv_w", j)) for j, n in enumerate(qkv))))
        table.append(Entry("cross_attn.in_proj_bias", (3 * w,),
                           tuple((("cross_attn", n, "bias"), ("qkv_b", j)) for j, n in enumerate(qkv))))
        linear("cross_attn.out_proj", ("cross_attn", "out_proj"), w, w)
        for i in range(sizes["cross_depth"]):
            table += _block_entries(f"cross_modal_transformer.resblocks.{i}.",
                                    ("cross_modal_transformer", f"resblocks_{i}"), w)
        for name in ("ln_pre_t", "ln_pre_i", "ln_post"):
            layer_norm(name, (name,), w)
        linear("mlm_head.dense", ("mlm_head", "dense"), w, w)
        layer_norm("mlm_head.ln", ("mlm_head", "ln"), w)
        linear("mlm_head.fc", ("mlm_head", "fc"), sizes["vocab_size"], w)
    return table


def irra_state_dict_to_params(checkpoint: Any, image_size=None, what: str = "IRRA checkpoint", **clip_overrides):
    """IRRA checkpoint (dict) -> (CLIP model, params dict, head sizes).

    params = {"base_model": CLIP params, and the heads present: "classifier", "cross_attn",
    "cross_modal_transformer", "ln_pre_t", "ln_pre_i", "ln_post", "mlm_head"}.
    image_size: (H, W) to run at (IRRA checkpoints are already at 384x128; resized if different).
    """
    from xmr_jax.convert import _detect_prefix, hf_state_dict_to_params, openai_state_dict_to_params

    sd = unwrap_state_dict(checkpoint, what)
    if not any(k.startswith(BASE) for k in sd):
        raise CheckpointMismatchError(f"{what}: no '{BASE}*' keys; this is not an IRRA checkpoint")
    base = {k[len(BASE):]: v for k, v in sd.items() if k.startswith(BASE)}
    style, prefix = _detect_prefix(base)
    if style == "openai":
        clip, clip_params = openai_state_dict_to_params(base, image_size=image_size, prefix=prefix, **clip_overrides)
    else:
        base = {k[len(prefix):]: v for k, v in base.items() if k.startswith(prefix)}
        clip, clip_params = hf_state_dict_to_params(base, None, image_size=image_size, **clip_overrides)
    sizes = head_sizes(sd, what)
    heads = apply_table(sd, head_table(sizes), ignore=lambda k: k.startswith(BASE), what=what)
    return clip, {"base_model": clip_params, **heads}, sizes


def load_irra(path: str, image_size=None, loss_names: tuple[str, ...] | None = None,
              cross_heads: int | None = None, **clip_overrides):
    """Reads an IRRA `best.pth` -> (xmr_jax IRRA model, params).

    loss_names default: sdm + the heads present in the checkpoint (id, mlm).
    cross_heads: heads of the cross-modal module (weights do not tell; default width // 64 = 8).
    """
    from xmr_jax.models.irra import IRRA

    clip, params, sizes = irra_state_dict_to_params(load_state_dict_file(path), image_size, what=str(path),
                                                    **clip_overrides)
    if loss_names is None:
        loss_names = ("sdm",) + (("id",) if sizes["num_classes"] else ()) + (("mlm",) if sizes["has_mlm"] else ())
    width = sizes.get("width", clip.embed_dim)
    model = IRRA(base_model=clip, loss_names=tuple(loss_names), num_classes=sizes["num_classes"],
                 cross_depth=sizes["cross_depth"] or 4, cross_heads=cross_heads or max(width // 64, 1),
                 dtype=clip.dtype)
    return model, params
