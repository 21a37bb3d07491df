"""Hugging Face `transformers.SiglipModel` folders -> our SigLIP (xmr_jax.models.siglip) params.

    model, params = load_hf_siglip("siglip-base-patch16-224/", image_size=(384, 128))

HF layout: `vision_model.embeddings.{patch_embedding.{weight,bias}, position_embedding.weight}`,
`vision_model.encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1,
mlp.fc2}`, `vision_model.post_layernorm`, `vision_model.head.{probe, attention.{in_proj_weight,
in_proj_bias, out_proj}, layernorm, mlp.fc1, mlp.fc2}`; `text_model.embeddings.{token_embedding,
position_embedding}.weight`, `text_model.encoder.layers.N.*`, `text_model.final_layer_norm`,
`text_model.head` [D, w]; `logit_scale`, `logit_bias` [1]. The config gives head counts, the
activation (hidden_act, one for both towers), layer_norm_eps and the text pad_token_id.
Only the SiglipModel with the vision pooling head (vision_use_head, the default) is supported.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from xmr_jax.convert.core import CheckpointMismatchError, Entry, apply_table, flatten
from xmr_jax.convert.hf import _config_dict, _sub, load_hf_state_dict
from xmr_jax.convert.openai import _count_blocks, _shape
from xmr_jax.convert.posembed import resize_positional_embedding
from xmr_jax.models.siglip import SIGLIP_FIELDS, SigLIP, siglip_from_config, siglip_param_shapes
from xmr_jax.models.vit import as_hw, grid_size

_IGNORED = ("position_ids", "logit_scale", "logit_bias")


def _mlp(src: str, dst: tuple, w: int, mlp: int) -> list:
    return [Entry(f"{src}fc1.weight", (mlp, w), ((dst + ("fc1", "kernel"), "T"),)),
            Entry(f"{src}fc1.bias", (mlp,), ((dst + ("fc1", "bias"), "id"),)),
            Entry(f"{src}fc2.weight", (w, mlp), ((dst + ("fc2", "kernel"), "T"),)),
            Entry(f"{src}fc2.bias", (w,), ((dst + ("fc2", "bias"), "id"),))]


def _ln(src: str, dst: tuple, w: int) -> list:
    return [Entry(f"{src}.weight", (w,), ((dst + ("scale",), "id"),)),
            Entry(f"{src}.bias", (w,), ((dst + ("bias",), "id"),))]


def _block(src: str, dst: tuple, w: int, mlp: int) -> list:
    e = _ln(f"{src}layer_norm1", dst + ("layer_norm1",), w) + _ln(f"{src}layer_norm2", dst + ("layer_norm2",), w)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        e.append(Entry(f"{src}self_attn.{name}.weight", (w, w), ((dst + ("self_attn", name, "kernel"), "T"),)))
        e.append(Entry(f"{src}self_attn.{name}.bias", (w,), ((dst + ("self_attn", name, "bias"), "id"),)))
    return e + _mlp(f"{src}mlp.", dst + ("mlp",), w, mlp)


def siglip_table(f: Mapping[str, Any], source_image_size) -> list:
    """Conversion table HF key -> our path for SigLIP fields `f` (positions at `source_image_size`)."""
    vw, tw, p, d = f["vision_width"], f["text_width"], f["patch_size"], f["embed_dim"]
    gh, gw = grid_size(as_hw(source_image_size), p)
    v, t, head = ("vision",), ("text",), ("vision", "head")
    att = "vision_model.head.attention."
    table = [
        Entry("vision_model.embeddings.patch_embedding.weight", (vw, 3, p, p),
              ((v + ("patch_embedding", "kernel"), "conv"),)),
        Entry("vision_model.embeddings.patch_embedding.bias", (vw,), ((v + ("patch_bias",), "id"),)),
        Entry("vision_model.embeddings.position_embedding.weight", (gh * gw, vw), ((v + ("position_embedding",), "id"),)),
        Entry("vision_model.head.probe", (1, 1, vw), ((head + ("probe",), "id"),)),
        Entry(att + "in_proj_weight", (3 * vw, vw),
              tuple((head + ("attention", n, "kernel"), ("qkv_w", j)) for j, n in enumerate(("q_proj", "k_proj", "v_proj")))),
        Entry(att + "in_proj_bias", (3 * vw,),
              tuple((head + ("attention", n, "bias"), ("qkv_b", j)) for j, n in enumerate(("q_proj", "k_proj", "v_proj")))),
        Entry(att + "out_proj.weight", (vw, vw), ((head + ("attention", "out_proj", "kernel"), "T"),)),
        Entry(att + "out_proj.bias", (vw,), ((head + ("attention", "out_proj", "bias"), "id"),)),
        Entry("text_model.embeddings.token_embedding.weight", (f["vocab_size"], tw),
              ((t + ("token_embedding", "embedding"), "id"),)),
        Entry("text_model.embeddings.position_embedding.weight", (f["context_length"], tw),
              ((t + ("position_embedding",), "id"),)),
        Entry("text_model.head.weight", (d, tw), ((t + ("head", "kernel"), "T"),)),
        Entry("text_model.head.bias", (d,), ((t + ("head", "bias"), "id"),)),
    ]
    table += _ln("vision_model.post_layernorm", v + ("post_layernorm",), vw)
    table += _ln("vision_model.head.layernorm", head + ("layernorm",), vw)
    table += _mlp("vision_model.head.mlp.", head + ("mlp",), vw, f["vision_mlp_dim"])
    table += _ln("text_model.final_layer_norm", t + ("final_layer_norm",), tw)
    for i in range(f["vision_layers"]):
        table += _block(f"vision_model.encoder.layers.{i}.", v + ("encoder", f"layers_{i}"), vw, f["vision_mlp_dim"])
    for i in range(f["text_layers"]):
        table += _block(f"text_model.encoder.layers.{i}.", t + ("encoder", f"layers_{i}"), tw, f["text_mlp_dim"])
    return table


def siglip_fields(state_dict: Mapping[str, Any], config) -> tuple[dict, tuple[int, int]]:
    """(SigLIP fields, source image size) from HF SigLIP weights (shapes) and config.json (heads,
    activation, eps, pad id)."""
    sd, cfg = state_dict, _config_dict(config)
    vcfg, tcfg = _sub(cfg, "vision_config"), _sub(cfg, "text_config")
    if "vision_model.embeddings.patch_embedding.weight" not in sd:
        raise CheckpointMismatchError("not a Hugging Face SiglipModel state dict: no "
                                      "'vision_model.embeddings.patch_embedding.weight'")
    if vcfg.get("vision_use_head", True) is False:
        raise ValueError("HF SigLIP config vision_config.vision_use_head = false: xmr_jax's SigLIP needs the "
                         "attention pooling head (the image embedding)")
    vw, _, patch, _ = _shape(sd, "vision_model.embeddings.patch_embedding.weight")
    key = "vision_model.embeddings.position_embedding.weight"
    n = _shape(sd, key)[0]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise CheckpointMismatchError(f"'{key}' has {n} rows, not a square patch grid")
    vocab, tw = _shape(sd, "text_model.embeddings.token_embedding.weight")
    acts = {vcfg.get("hidden_act", "gelu_pytorch_tanh"), tcfg.get("hidden_act", "gelu_pytorch_tanh")}
    if len(acts) != 1:
        raise ValueError(f"HF SigLIP config: vision_config.hidden_act and text_config.hidden_act differ ({sorted(acts)}); "
                         "xmr_jax's SigLIP uses one activation for both towers")
    epss = {float(vcfg.get("layer_norm_eps", 1e-6)), float(tcfg.get("layer_norm_eps", 1e-6))}
    if len(epss) != 1:
        raise ValueError(f"HF SigLIP config: the towers' layer_norm_eps differ ({sorted(epss)})")
    fields = dict(
        patch_size=patch, vision_width=vw, vision_layers=_count_blocks(sd, "vision_model.encoder.layers."),
        vision_heads=vcfg.get("num_attention_heads", 12),
        vision_mlp_dim=_shape(sd, "vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        context_length=_shape(sd, "text_model.embeddings.position_embedding.weight")[0], vocab_size=vocab,
        text_width=tw, text_layers=_count_blocks(sd, "text_model.encoder.layers."),
        text_heads=tcfg.get("num_attention_heads", 12),
        text_mlp_dim=_shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        embed_dim=_shape(sd, "text_model.head.weight")[0], activation=acts.pop(), layer_norm_eps=epss.pop(),
        pad_id=int(tcfg.get("pad_token_id", 1) if tcfg.get("pad_token_id") is not None else 1),
    )
    return fields, (g * patch, g * patch)


def _scalar(sd, key: str, default: float) -> np.ndarray:
    if key not in sd:
        return np.asarray(default, np.float32)
    arr = np.asarray(sd[key].detach().cpu().numpy() if hasattr(sd[key], "detach") else sd[key], np.float32)
    if arr.size != 1:
        raise CheckpointMismatchError(f"'{key}' has shape {arr.shape}, expected one value")
    return arr.reshape(())


def siglip_state_dict_to_params(state_dict: Mapping[str, Any], config, *, image_size=None, **model_overrides):
    """HF SiglipModel state dict + config (dict / SiglipConfig / path) -> (SigLIP, float32 numpy params).

    image_size: (H, W) to run at (the patch position embeddings are resized bilinearly if the grid
    differs). model_overrides: SigLIP fields such as dtype="bfloat16", remat=True.
    """
    fields, source = siglip_fields(state_dict, config)
    unknown = sorted(set(model_overrides) - set(SIGLIP_FIELDS))
    if unknown:
        raise ValueError(f"unknown SigLIP override(s) {unknown}; expected any of {list(SIGLIP_FIELDS)}")
    for k in ("activation", "layer_norm_eps"):
        if model_overrides.get(k) is not None and model_overrides[k] != fields[k]:
            raise ValueError(f"the Hugging Face SigLIP config records {k}={fields[k]!r} but {k}="
                             f"{model_overrides[k]!r} was asked for")
    fields.update({k: v for k, v in model_overrides.items() if v is not None})
    fields["image_size"] = as_hw(image_size) if image_size is not None else source
    model = siglip_from_config(fields)
    params = apply_table(state_dict, siglip_table(fields, source), ignore=lambda k: k.endswith(_IGNORED),
                         what="Hugging Face SigLIP checkpoint")
    params["logit_scale"] = _scalar(state_dict, "logit_scale", np.log(10.0))
    params["logit_bias"] = _scalar(state_dict, "logit_bias", -10.0)
    old, new = grid_size(source, model.patch_size), grid_size(model.image_size, model.patch_size)
    if old != new:
        pos = params["vision"]["position_embedding"]
        with_row = np.concatenate([np.zeros_like(pos[:1]), pos], axis=0)  # the resize keeps a leading CLS row
        params["vision"]["position_embedding"] = resize_positional_embedding(with_row, old, new)[1:]
    check_siglip_params(params, model, what="Hugging Face SigLIP checkpoint")
    return model, params


def check_siglip_params(params, model: SigLIP, what: str = "params") -> None:
    """Raise CheckpointMismatchError unless `params` has exactly the tree and shapes `model` expects."""
    expected = {k: tuple(v.shape) for k, v in flatten(siglip_param_shapes(model)).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    missing = sorted("/".join(k) for k in set(expected) - set(got))
    extra = sorted("/".join(k) for k in set(got) - set(expected))
    if missing or extra:
        raise CheckpointMismatchError(f"{what}: parameter tree differs from the SigLIP model: missing {missing[:8]}, "
                                      f"unexpected {extra[:8]}")
    bad = [f"{'/'.join(k)}: {got[k]} vs expected {expected[k]}" for k in expected if got[k] != expected[k]]
    if bad:
        raise CheckpointMismatchError(f"{what}: wrong shapes: {'; '.join(bad[:8])}")


def load_hf_siglip(folder: str, image_size=None, **model_overrides):
    """A transformers SiglipModel folder (config.json + model.safetensors / pytorch_model.bin) ->
    (SigLIP, float32 numpy params)."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: missing config.json of a Hugging Face SiglipModel folder")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    if cfg.get("model_type") not in (None, "siglip"):
        raise ValueError(f"{cfg_path}: model_type={cfg.get('model_type')!r}, expected 'siglip' (a SiglipModel folder)")
    return siglip_state_dict_to_params(load_hf_state_dict(folder), cfg, image_size=image_size, **model_overrides)
