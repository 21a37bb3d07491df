"""Import OpenAI CLIP checkpoints (TorchScript `ViT-B-16.pt` or a plain state dict).

Key layout (docs/semantics.md, section 'Checkpoints and file formats'): `visual.conv1.weight`
[w,3,p,p], `visual.class_embedding`, `visual.positional_embedding` [1+g*g, w], `visual.ln_pre.*`,
`visual.transformer.resblocks.N.*`, `visual.ln_post.*`, `visual.proj` [w, D];
`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.*`, `ln_final.*`,
`text_projection` [w, D]. Each block has `ln_1`,
`attn.in_proj_weight` [3w, w] (q, k, v stacked), `attn.in_proj_bias`, `attn.out_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`. Architecture is inferred from the shapes; heads = width // 64 as in
OpenAI's `build_model` (override with vision_heads= / text_heads=).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from xmr_jax.convert.core import CheckpointMismatchError, Entry, adapt_params, apply_table, source_hw
from xmr_jax.models.clip import CLIP, CLIP_FIELDS, parse_dtype
from xmr_jax.models.vit import as_hw

# Non-parameter entries of OpenAI checkpoints that are read but not converted.
OPENAI_IGNORED = ("logit_scale", "input_resolution", "context_length", "vocab_size")


def _shape(sd, key):
    if key not in sd:
        raise CheckpointMismatchError(
            f"CLIP checkpoint: missing key '{key}' (is this the right checkpoint format?)")
    return tuple(sd[key].shape)


def _count_blocks(sd, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def openai_fields(state_dict: Mapping[str, Any], prefix: str = "", source_image_size=None) -> dict:
    """CLIP fields of an OpenAI-format state dict (keys under `prefix`), inferred from weight shapes.

    The image size is the one the checkpoint's positional embedding was trained for (square grid,
    or `source_image_size` for a non-square one such as IRRA's 384x128).
    """
    sd = state_dict
    p = prefix
    vw, _, patch, _ = _shape(sd, f"{p}visual.conv1.weight")
    n_pos = _shape(sd, f"{p}visual.positional_embedding")[0]
    image_size = source_hw(n_pos, patch, f"{p}visual.positional_embedding", source_image_size)
    vocab, tw = _shape(sd, f"{p}token_embedding.weight")
    return dict(
        embed_dim=_shape(sd, f"{p}visual.proj")[1],
        image_size=image_size,
        patch_size=patch,
        vision_width=vw,
        vision_layers=_count_blocks(sd, f"{p}visual.transformer.resblocks."),
        vision_heads=max(vw // 64, 1),
        context_length=_shape(sd, f"{p}positional_embedding")[0],
        vocab_size=vocab,
        text_width=tw,
        text_layers=_count_blocks(sd, f"{p}transformer.resblocks."),
        text_heads=max(tw // 64, 1),
    )


def _block_entries(src: str, dst: tuple, w: int) -> list:
    e = []
    for ln in ("ln_1", "ln_2"):
        e.append(Entry(f"{src}{ln}.weight", (w,), ((dst + (ln, "scale"), "id"),)))
        e.append(Entry(f"{src}{ln}.bias", (w,), ((dst + (ln, "bias"), "id"),)))
    qkv = ("q_proj", "k_proj", "v_proj")
    e.append(Entry(f"{src}attn.in_proj_weight", (3 * w, w),
                   tuple((dst + ("attn", n, "kernel"), ("qkv_w", j)) for j, n in enumerate(qkv))))
    e.append(Entry(f"{src}attn.in_proj_bias", (3 * w,),
                   tuple((dst + ("attn", n, "bias"), ("qkv_b", j)) for j, n in enumerate(qkv))))
    for torch_name, ours, shape in (("attn.out_proj", ("attn", "out_proj"), (w, w)),
                                    ("mlp.c_fc", ("mlp", "c_fc"), (4 * w, w)),
                                    ("mlp.c_proj", ("mlp", "c_proj"), (w, 4 * w))):
        e.append(Entry(f"{src}{torch_name}.weight", shape, ((dst + ours + ("kernel",), "T"),)))
        e.append(Entry(f"{src}{torch_name}.bias", (shape[0],), ((dst + ours + ("bias",), "id"),)))
    return e


def openai_table(fields: Mapping[str, Any], source_image_size) -> list:
    """Conversion table for CLIP `fields`, with the positional embedding sized for `source_image_size`."""
    f = fields
    vw, tw, d, p = f["vision_width"], f["text_width"], f["embed_dim"], f["patch_size"]
    h, w = as_hw(source_image_size)
    n_pos = 1 + (h // p) * (w // p)
    v = ("visual",)
    t = ("text",)
    table = [
        Entry("visual.conv1.weight", (vw, 3, p, p), ((v + ("conv1", "kernel"), "conv"),)),
        Entry("visual.class_embedding", (vw,), ((v + ("class_embedding",), "id"),)),
        Entry("visual.positional_embedding", (n_pos, vw), ((v + ("positional_embedding",), "id"),)),
        Entry("visual.proj", (vw, d), ((v + ("proj",), "id"),)),
        Entry("token_embedding.weight", (f["vocab_size"], tw), ((t + ("token_embedding", "embedding"), "id"),)),
        Entry("positional_embedding", (f["context_length"], tw), ((t + ("positional_embedding",), "id"),)),
        Entry("text_projection", (tw, d), ((t + ("text_projection",), "id"),)),
    ]
    for src, dst, width in (("visual.ln_pre", v + ("ln_pre",), vw), ("visual.ln_post", v + ("ln_post",), vw),
                            ("ln_final", t + ("ln_final",), tw)):
        table.append(Entry(f"{src}.weight", (width,), ((dst + ("scale",), "id"),)))
        table.append(Entry(f"{src}.bias", (width,), ((dst + ("bias",), "id"),)))
    for i in range(f["vision_layers"]):
        table += _block_entries(f"visual.transformer.resblocks.{i}.", v + ("transformer", f"resblocks_{i}"), vw)
    for i in range(f["text_layers"]):
        table += _block_entries(f"transformer.resblocks.{i}.", t + ("transformer", f"resblocks_{i}"), tw)
    return table


def check_recorded_activation(recorded: str, overrides: Mapping[str, Any], where: str) -> None:
    """Raise ValueError when `overrides["activation"]` contradicts the activation a checkpoint records."""
    asked = overrides.get("activation")
    if asked is not None and asked != recorded:
        raise ValueError(f"activation={asked!r} was asked for but {where} is {recorded!r}: the weights were "
                         f"trained with it; ask for {recorded!r} (in a config: model.clip activation or preset) "
                         f"or load a checkpoint trained with {asked!r}")


def _model_from(fields: dict, image_size, overrides: Mapping[str, Any]) -> tuple[CLIP, tuple]:
    unknown = sorted(set(overrides) - set(CLIP_FIELDS))
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown}; expected any of {list(CLIP_FIELDS)}")
    source = as_hw(fields["image_size"])
    merged = {**fields, **{k: v for k, v in overrides.items() if v is not None}}
    if "dtype" in merged:
        merged["dtype"] = parse_dtype(merged["dtype"])
    merged["image_size"] = as_hw(image_size) if image_size is not None else source
    return CLIP(**merged), source


def openai_state_dict_to_params(state_dict: Mapping[str, Any], *, image_size=None, prefix: str = "",
                                source_image_size=None, strict: bool = True, **model_overrides):
    """OpenAI-format state dict (torch tensors or numpy) -> (CLIP model, float32 numpy params).

    image_size: (H, W) to run at; the positional embedding is bilinearly resized if it differs from
      the checkpoint's. prefix: key prefix of the CLIP weights (e.g. "base_model." for IRRA; keys
      outside the prefix are ignored). model_overrides: CLIP fields, e.g. vision_heads=4,
      dtype="bfloat16", scan_layers=True. strict: unexpected keys under the prefix are an error.
    Raises CheckpointMismatchError (ValueError) naming the key and shapes on any mismatch.
    """
    fields = openai_fields(state_dict, prefix, source_image_size)
    model, source = _model_from(fields, image_size, model_overrides)
    f = model.fields()
    ignore = lambda k: k in OPENAI_IGNORED or k.endswith("attn_mask")
    params = apply_table(state_dict, openai_table(f, source), prefix=prefix, ignore=ignore,
                         what="OpenAI CLIP checkpoint", strict=strict)
    return model, adapt_params(params, source, model)
