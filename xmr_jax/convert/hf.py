"""Hugging Face `transformers.CLIPModel` <-> our CLIP params.

HF layout: `vision_model.embeddings.{patch_embedding.weight, class_embedding,
position_embedding.weight}`, `vision_model.pre_layrnorm`, `vision_model.encoder.layers.N.{layer_norm1,
self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`, `vision_model.post_layernorm`,
`visual_projection.weight` [D, w]; `text_model.embeddings.{token_embedding, position_embedding}.weight`,
`text_model.encoder.layers.N.*`, `text_model.final_layer_norm`, `text_projection.weight` [D, w],
`logit_scale`. Supported: hidden_act "quick_gelu" (OpenAI CLIPs) or "gelu" (exact GELU: open_clip's
LAION / DataComp CLIPs as transformers folders), the same in both towers; MLP 4x width; LayerNorm eps
1e-5. The activation becomes the model's `activation` field and `to_hf_clip` writes it back.

Pooling: HF pools the text at argmax(ids) when text_config.eos_token_id == 2 (the legacy value of
the OpenAI checkpoints, which `to_hf_clip` writes) and at the first `eos_token_id` otherwise; both
equal our argmax pooling for CLIP-tokenized inputs (EOT = 49407 is the largest id).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from xmr_jax.convert.core import (CheckpointMismatchError, Entry, adapt_params, apply_table, canonical_params,
                                  flatten, inverse_transform, load_state_dict_file, square_grid)
from xmr_jax.convert.openai import _count_blocks, _model_from, _shape, check_recorded_activation
from xmr_jax.models.clip import CLIP
from xmr_jax.models.vit import as_hw

HF_IGNORED_SUFFIXES = ("position_ids", "logit_scale")
_HF_DEFAULT_HEADS = {"vision_config": 12, "text_config": 8}


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, (str, os.PathLike)):
        with open(config) as fh:
            return json.load(fh)
    return dict(config)


def _sub(cfg: dict, name: str) -> dict:
    sub = cfg.get(name) or {}
    return sub.to_dict() if hasattr(sub, "to_dict") else dict(sub)


HF_ACTIVATIONS = ("quick_gelu", "gelu")   # transformers' names = our CLIP `activation` values


def _check_supported(cfg: dict, name: str, width: int) -> str:
    """Raise ValueError for what our towers cannot express; return the tower's hidden_act."""
    sub = _sub(cfg, name)
    act = sub.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"HF CLIP config {name}.hidden_act = {act!r}: expected one of {HF_ACTIVATIONS} "
                         f"(OpenAI's QuickGELU or the exact GELU of open_clip's CLIPs)")
    inter = sub.get("intermediate_size", 4 * width)
    if inter != 4 * width:
        raise ValueError(f"HF CLIP config {name}.intermediate_size = {inter}: expected 4 * hidden_size = {4 * width}")
    eps = sub.get("layer_norm_eps", 1e-5)
    if eps is not None and abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"HF CLIP config {name}.layer_norm_eps = {eps}: only 1e-5 is supported")
    return act


def hf_fields(state_dict: Mapping[str, Any], config=None) -> dict:
    """CLIP fields from HF CLIP weights (shapes) and config (head counts; HF defaults if absent)."""
    sd, cfg = state_dict, _config_dict(config)
    vw, _, patch, _ = _shape(sd, "vision_model.embeddings.patch_embedding.weight")
    key = "vision_model.embeddings.position_embedding.weight"
    g = square_grid(_shape(sd, key)[0], key)
    vocab, tw = _shape(sd, "text_model.embeddings.token_embedding.weight")
    vision_act = _check_supported(cfg, "vision_config", vw)
    text_act = _check_supported(cfg, "text_config", tw)
    if vision_act != text_act:
        raise ValueError(f"HF CLIP config: vision_config.hidden_act = {vision_act!r} but text_config.hidden_act = "
                         f"{text_act!r}; xmr_jax's CLIP uses one activation for both towers")
    return dict(
        embed_dim=_shape(sd, "visual_projection.weight")[0],
        image_size=(g * patch, g * patch),
        patch_size=patch,
        vision_width=vw,
        vision_layers=_count_blocks(sd, "vision_model.encoder.layers."),
        vision_heads=_sub(cfg, "vision_config").get("num_attention_heads", _HF_DEFAULT_HEADS["vision_config"]),
        context_length=_shape(sd, "text_model.embeddings.position_embedding.weight")[0],
        vocab_size=vocab,
        text_width=tw,
        text_layers=_count_blocks(sd, "text_model.encoder.layers."),
        text_heads=_sub(cfg, "text_config").get("num_attention_heads", _HF_DEFAULT_HEADS["text_config"]),
        activation=vision_act,
    )


def _hf_block(src: str, dst: tuple, w: int) -> list:
    e = []
    for hf_ln, ln in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
        e.append(Entry(f"{src}{hf_ln}.weight", (w,), ((dst + (ln, "scale"), "id"),)))
        e.append(Entry(f"{src}{hf_ln}.bias", (w,), ((dst + (ln, "bias"), "id"),)))
    for hf_name, ours, shape in (("self_attn.q_proj", ("attn", "q_proj"), (w, w)),
                                 ("self_attn.k_proj", ("attn", "k_proj"), (w, w)),
                                 ("self_attn.v_proj", ("attn", "v_proj"), (w, w)),
                                 ("self_attn.out_proj", ("attn", "out_proj"), (w, w)),
                                 ("mlp.fc1", ("mlp", "c_fc"), (4 * w, w)),
                                 ("mlp.fc2", ("mlp", "c_proj"), (w, 4 * w))):
        e.append(Entry(f"{src}{hf_name}.weight", shape, ((dst + ours + ("kernel",), "T"),)))
        e.append(Entry(f"{src}{hf_name}.bias", (shape[0],), ((dst + ours + ("bias",), "id"),)))
    return e


def hf_table(fields: Mapping[str, Any], source_image_size) -> list:
    """Conversion table HF key -> our path for CLIP `fields` (pos embedding at `source_image_size`)."""
    f = fields
    vw, tw, d, p = f["vision_width"], f["text_width"], f["embed_dim"], f["patch_size"]
    h, w = as_hw(source_image_size)
    v, t = ("visual",), ("text",)
    table = [
        Entry("vision_model.embeddings.patch_embedding.weight", (vw, 3, p, p), ((v + ("conv1", "kernel"), "conv"),)),
        Entry("vision_model.embeddings.class_embedding", (vw,), ((v + ("class_embedding",), "id"),)),
        Entry("vision_model.embeddings.position_embedding.weight", (1 + (h // p) * (w // p), vw),
              ((v + ("positional_embedding",), "id"),)),
        Entry("visual_projection.weight", (d, vw), ((v + ("proj",), "T"),)),
        Entry("text_model.embeddings.token_embedding.weight", (f["vocab_size"], tw),
              ((t + ("token_embedding", "embedding"), "id"),)),
        Entry("text_model.embeddings.position_embedding.weight", (f["context_length"], tw),
              ((t + ("positional_embedding",), "id"),)),
        Entry("text_projection.weight", (d, tw), ((t + ("text_projection",), "T"),)),
    ]
    for src, dst, width in (("vision_model.pre_layrnorm", v + ("ln_pre",), vw),
                            ("vision_model.post_layernorm", v + ("ln_post",), vw),
                            ("text_model.final_layer_norm", t + ("ln_final",), tw)):
        table.append(Entry(f"{src}.weight", (width,), ((dst + ("scale",), "id"),)))
        table.append(Entry(f"{src}.bias", (width,), ((dst + ("bias",), "id"),)))
    for i in range(f["vision_layers"]):
        table += _hf_block(f"vision_model.encoder.layers.{i}.", v + ("transformer", f"resblocks_{i}"), vw)
    for i in range(f["text_layers"]):
        table += _hf_block(f"text_model.encoder.layers.{i}.", t + ("transformer", f"resblocks_{i}"), tw)
    return table


def hf_state_dict_to_params(state_dict: Mapping[str, Any], config=None, *, image_size=None, strict: bool = True,
                            **model_overrides):
    """HF CLIPModel state dict (+ config dict / CLIPConfig / path to config.json) -> (CLIP, params).

    image_size: (H, W) to run at (positional embedding resized bilinearly if it differs).
    model_overrides: CLIP fields (dtype="bfloat16", scan_layers=True, ...).
    Raises CheckpointMismatchError (ValueError) naming the key and shapes on any mismatch.
    """
    fields = hf_fields(state_dict, config)
    check_recorded_activation(fields["activation"], model_overrides, "the Hugging Face config's hidden_act")
    model, source = _model_from(fields, image_size, model_overrides)
    ignore = lambda k: k.endswith(HF_IGNORED_SUFFIXES)
    params = apply_table(state_dict, hf_table(model.fields(), source), ignore=ignore,
                         what="Hugging Face CLIP checkpoint", strict=strict)
    return model, adapt_params(params, source, model)


def load_hf_state_dict(folder: str) -> dict:
    """Weights of a HF model folder: model.safetensors (or sharded index) or pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return load_state_dict_file(path)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, name)
        if os.path.isfile(index):
            with open(index) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(load_state_dict_file(os.path.join(folder, shard)))
            return sd
    raise FileNotFoundError(
        f"{folder}: no Hugging Face weights found (expected model.safetensors, pytorch_model.bin or a "
        f"sharded *.index.json next to config.json)")


def load_hf_clip(folder: str, image_size=None, **model_overrides):
    """Load a HF CLIPModel folder (config.json + weights) -> (CLIP model, params)."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: missing config.json of a Hugging Face CLIPModel folder")
    return hf_state_dict_to_params(load_hf_state_dict(folder), cfg_path, image_size=image_size, **model_overrides)


def hf_config_dict(model: CLIP, logit_scale: float) -> dict:
    """config.json content of a transformers CLIPModel equivalent to `model` (square images only;
    hidden_act = model.activation in both towers)."""
    f = model.fields()
    h, w = f["image_size"]
    text = dict(model_type="clip_text_model", vocab_size=f["vocab_size"], hidden_size=f["text_width"],
                intermediate_size=4 * f["text_width"], projection_dim=f["embed_dim"],
                num_hidden_layers=f["text_layers"], num_attention_heads=f["text_heads"],
                max_position_embeddings=f["context_length"], hidden_act=f["activation"], layer_norm_eps=1e-5,
                attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
                pad_token_id=1, bos_token_id=f["vocab_size"] - 2,
                eos_token_id=2)  # 2 = legacy value: HF pools at argmax(ids), exactly like us
    vision = dict(model_type="clip_vision_model", hidden_size=f["vision_width"],
                  intermediate_size=4 * f["vision_width"], projection_dim=f["embed_dim"],
                  num_hidden_layers=f["vision_layers"], num_attention_heads=f["vision_heads"], num_channels=3,
                  image_size=h, patch_size=f["patch_size"], hidden_act=f["activation"], layer_norm_eps=1e-5,
                  attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0)
    return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=f["embed_dim"],
                logit_scale_init_value=float(logit_scale), initializer_factor=1.0, torch_dtype="float32",
                text_config=text, vision_config=vision)


def to_hf_clip(model: CLIP, params, out_dir: str, logit_scale: Optional[float] = None) -> str:
    """Write a transformers CLIPModel folder (config.json + model.safetensors) for `model`/`params`.

    logit_scale: the (log-space) logit scale parameter to store; None -> params["logit_scale"] if
    present, else log(1 / 0.07) (CLIP's initial value). Only square image sizes can be expressed in a
    HF CLIPVisionConfig; resize first for others. Returns out_dir.
    """
    from safetensors.numpy import save_file

    h, w = as_hw(model.image_size)
    if h != w:
        raise ValueError(f"to_hf_clip: HF CLIPVisionConfig only supports square images, model has {(h, w)}; "
                         f"convert at a square image_size (load_clip(..., image_size=S)) first")
    params = dict(params)
    if logit_scale is None:
        logit_scale = float(np.asarray(params.pop("logit_scale", math.log(1 / 0.07))))
    params.pop("logit_scale", None)
    flat = flatten(canonical_params(params))
    sd = {}
    for e in hf_table(model.fields(), (h, w)):
        (path, kind), = e.targets
        if path not in flat:
            raise CheckpointMismatchError(f"to_hf_clip: params lack '{'/'.join(path)}' (needed for {e.src})")
        arr = np.ascontiguousarray(inverse_transform(np.asarray(flat[path], np.float32), kind))
        if arr.shape != tuple(e.shape):
            raise CheckpointMismatchError(
                f"to_hf_clip: parameter '{'/'.join(path)}' gives {e.src} of shape {arr.shape}, "
                f"expected {tuple(e.shape)}")
        sd[e.src] = arr
    sd["logit_scale"] = np.asarray(logit_scale, np.float32)
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf_config_dict(model, logit_scale), fh, indent=2)
    return out_dir
