"""Import open_clip CLIP state dicts (LAION / DataComp CLIPs, and OpenAI's weights as open_clip saves them).

open_clip's plain `CLIP` (a ViT image tower and a causal text transformer) keeps OpenAI's key names
(see openai.py): `visual.conv1.weight` [w, 3, p, p] (no bias), `visual.class_embedding` [w],
`visual.positional_embedding` [1 + gh*gw, w], `visual.ln_pre.*`, `visual.transformer.resblocks.N.{ln_1,
attn.in_proj_weight [3w, w] (q, k, v stacked), attn.in_proj_bias [3w], attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}`, `visual.ln_post.*`, `visual.proj` [w, D]; `token_embedding.weight` [V, t],
`positional_embedding` [context, t], `transformer.resblocks.N.*`, `ln_final.*`, `text_projection`
[t, D] (a matrix, no bias) and `logit_scale`. The text tower is causal and pools at argmax(ids), as
ours; older open_clip versions also saved the causal `attn_mask` buffer [context, context], which is
skipped. Widths, depths, patch, image and vocabulary sizes come from the shapes.

Two things the weights do not record:

* the MLP activation: open_clip's own architectures (ViT-B-16, ViT-L-14, ViT-H-14, ...) use the exact
  GELU (`nn.GELU`), its `*-quickgelu` ones and OpenAI's weights QuickGELU. It is read from
  `activation=`, else from the model's `open_clip_config.json` (`model_cfg.quick_gelu`, as the
  Hugging Face hub stores open_clip models: open_clip_config.json next to open_clip_pytorch_model.bin
  / open_clip_model.safetensors); with neither, loading stops and asks for it.
* head counts: vision heads = width // head_width (config `vision_cfg.head_width`; else open_clip's
  default 64, or 80 / 88 / 104 for the 1280 / 1408 / 1664 wide ViT-H / g / bigG towers), text heads =
  config `text_cfg.heads`, else width // 64. `vision_heads=` / `text_heads=` override both.

Other open_clip towers (timm or Hugging Face text encoders, attentional pooling, layer scale, CoCa,
SigLIP) have other keys or config options and are refused with an error naming them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from xmr_jax.convert.core import CheckpointMismatchError, adapt_params, apply_table, load_state_dict_file
from xmr_jax.convert.openai import (OPENAI_IGNORED, _model_from, _shape, check_recorded_activation, openai_fields,
                                    openai_table)
from xmr_jax.models.vit import as_hw

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Vision widths whose open_clip configs use a head width other than 64 (ViT-H-14, ViT-g-14, ViT-bigG-14).
_VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
_ANY = object()
# Config options our towers implement: name -> accepted values (_ANY: any value; shapes decide).
_MODEL_OPTIONS = {"embed_dim": _ANY, "quick_gelu": _ANY, "vision_cfg": _ANY, "text_cfg": _ANY,
                  "init_logit_scale": _ANY, "cast_dtype": _ANY, "custom_text": (False, None)}
_VISION_OPTIONS = {"image_size": _ANY, "layers": _ANY, "width": _ANY, "patch_size": _ANY, "head_width": _ANY,
                   "patch_dropout": _ANY, "output_tokens": _ANY, "mlp_ratio": (4, 4.0),
                   "ls_init_value": (None,), "global_average_pool": (False,), "attentional_pool": (False,),
                   "no_ln_pre": (False,), "pool_type": ("tok",), "final_ln_after_pool": (False,),
                   "input_patchnorm": (False,), "timm_model_name": (None,)}
_TEXT_OPTIONS = {"context_length": _ANY, "vocab_size": _ANY, "width": _ANY, "heads": _ANY, "layers": _ANY,
                 "output_tokens": _ANY, "mlp_ratio": (4, 4.0), "ls_init_value": (None,),
                 "hf_model_name": (None,), "hf_tokenizer_name": _ANY, "embed_cls": (False,), "pad_id": (0,),
                 "no_causal_mask": (False,), "final_ln_after_pool": (False,), "pool_type": ("argmax",),
                 "proj_type": ("linear",), "proj_bias": (False,)}


def find_open_clip_config(path: str) -> Optional[str]:
    """The open_clip_config.json of a weights file (next to it) or a folder (inside it), or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidate = os.path.join(folder, CONFIG_FILE)
    return candidate if os.path.isfile(candidate) else None


def find_open_clip_weights(folder: str) -> Optional[str]:
    """open_clip_model.safetensors or open_clip_pytorch_model.bin inside `folder`, or None."""
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def is_open_clip_file(path: str) -> bool:
    """True for a weights file open_clip's hub layout names (open_clip_*.bin / .safetensors) or one
    with an open_clip_config.json next to it."""
    return os.path.basename(path).startswith("open_clip") or find_open_clip_config(path) is not None


def _model_cfg(config) -> tuple[dict, str]:
    """(model_cfg dict, name for messages) of a config path / dict (hub file or bare model config)."""
    where = "open_clip config"
    if isinstance(config, (str, os.PathLike)):
        where = os.fspath(config)
        with open(config) as fh:
            config = json.load(fh)
    config = dict(config)
    if "model_cfg" in config:
        return dict(config["model_cfg"]), f"{where}: model_cfg"
    return config, where


def _check_options(cfg: Mapping, options: Mapping, where: str) -> None:
    for key, value in cfg.items():
        if key not in options:
            raise ValueError(f"{where}.{key} = {value!r}: this open_clip option is not supported "
                             f"(supported: {sorted(options)})")
        accepted = options[key]
        if accepted is not _ANY and value not in accepted:
            raise ValueError(f"{where}.{key} = {value!r}: not supported; expected one of {list(accepted)}")


def _config_fields(config, found: dict, source_image_size) -> tuple[dict, Optional[str], str]:
    """Fields the config adds (heads) after checking it against the shapes; its activation; its name."""
    cfg, where = _model_cfg(config)
    _check_options(cfg, _MODEL_OPTIONS, where)
    vision, text = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    _check_options(vision, _VISION_OPTIONS, f"{where}.vision_cfg")
    _check_options(text, _TEXT_OPTIONS, f"{where}.text_cfg")
    for name, value, field in (("embed_dim", cfg.get("embed_dim"), "embed_dim"),
                               ("vision_cfg.width", vision.get("width"), "vision_width"),
                               ("vision_cfg.layers", vision.get("layers"), "vision_layers"),
                               ("vision_cfg.patch_size", vision.get("patch_size"), "patch_size"),
                               ("text_cfg.width", text.get("width"), "text_width"),
                               ("text_cfg.layers", text.get("layers"), "text_layers"),
                               ("text_cfg.context_length", text.get("context_length"), "context_length"),
                               ("text_cfg.vocab_size", text.get("vocab_size"), "vocab_size")):
        if value is not None and value != found[field]:
            raise CheckpointMismatchError(f"{where}.{name} = {value} but the weights have {field} = {found[field]}")
    if source_image_size is None and vision.get("image_size") is not None:
        size = as_hw(vision["image_size"])
        if size != as_hw(found["image_size"]):
            raise CheckpointMismatchError(f"{where}.vision_cfg.image_size = {vision['image_size']} but the weights' "
                                          f"positional embedding is for {as_hw(found['image_size'])}")
    extra = {}
    if vision.get("head_width"):
        extra["vision_heads"] = found["vision_width"] // int(vision["head_width"])
    if text.get("heads"):
        extra["text_heads"] = int(text["heads"])
    activation = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    return extra, activation, where


def _image_size_from_config(config) -> Optional[tuple]:
    if config is None:
        return None
    vision = _model_cfg(config)[0].get("vision_cfg") or {}
    return as_hw(vision["image_size"]) if vision.get("image_size") is not None else None


def open_clip_fields(state_dict: Mapping[str, Any], config=None, prefix: str = "",
                     source_image_size=None) -> tuple[dict, Optional[str]]:
    """(CLIP fields, activation or None) of an open_clip state dict (keys under `prefix`).

    config: open_clip_config.json path, its dict, or a bare model config dict ({"embed_dim",
    "vision_cfg", "text_cfg", "quick_gelu"?}); None: heads from open_clip's defaults and no activation.
    """
    if source_image_size is None:
        size = _image_size_from_config(config)
        n_pos = _shape(state_dict, f"{prefix}visual.positional_embedding")[0]
        patch = _shape(state_dict, f"{prefix}visual.conv1.weight")[2]
        if size is not None and size[0] != size[1] and 1 + (size[0] // patch) * (size[1] // patch) == n_pos:
            source_image_size = size   # a non-square open_clip model: its grid comes from the config
    fields = openai_fields(state_dict, prefix, source_image_size)
    vw = fields["vision_width"]
    fields["vision_heads"] = vw // _VISION_HEAD_WIDTH.get(vw, 64) if vw >= 64 else 1
    if config is None:
        return fields, None
    extra, activation, _ = _config_fields(config, fields, source_image_size)
    fields.update(extra)
    return fields, activation


def open_clip_state_dict_to_params(state_dict: Mapping[str, Any], *, config=None, image_size=None,
                                   prefix: str = "", source_image_size=None, strict: bool = True,
                                   what: str = "open_clip checkpoint", **model_overrides):
    """open_clip CLIP state dict (torch tensors or numpy) -> (CLIP model, float32 numpy params).

    config: the model's open_clip_config.json (path or dict; see :func:`open_clip_fields`), which gives
      the activation and head counts. model_overrides: CLIP fields; `activation` ("gelu" | "quick_gelu")
      is required when there is no config, and must agree with the config's when there is one.
    image_size: (H, W) to run at (positional embedding resized bilinearly). prefix: key prefix of the
      CLIP weights (e.g. "module."). strict: unexpected keys under the prefix are an error.
    Raises CheckpointMismatchError (ValueError) naming the key and shapes on any mismatch.
    """
    fields, activation = open_clip_fields(state_dict, config, prefix, source_image_size)
    if activation is not None:
        check_recorded_activation(activation, model_overrides, f"{_model_cfg(config)[1]}'s activation")
        fields["activation"] = activation
    elif model_overrides.get("activation") is None:
        raise ValueError(
            f"{what}: open_clip weights do not record the MLP activation; pass activation='gelu' (open_clip's "
            f"ViT-B-16, ViT-L-14, ... ) or activation='quick_gelu' (OpenAI weights, *-quickgelu models), "
            f"or put the model's {CONFIG_FILE} next to the weights")
    model, source = _model_from(fields, image_size, model_overrides)
    ignore = lambda k: k in OPENAI_IGNORED or k.endswith("attn_mask")
    params = apply_table(state_dict, openai_table(model.fields(), source), prefix=prefix, ignore=ignore,
                         what=what, strict=strict)
    return model, adapt_params(params, source, model)


def load_open_clip(path: str, image_size=None, config=None, **model_overrides):
    """Load open_clip weights -> (CLIP model, params).

    path: a .bin/.pt/.pth (read with torch.load(weights_only=True)) or .safetensors state dict, or a
      folder holding open_clip_model.safetensors / open_clip_pytorch_model.bin. config: its
      open_clip_config.json (path or dict); None = the one next to the weights, if any.
    model_overrides: as :func:`open_clip_state_dict_to_params` (activation=, vision_heads=, dtype=, ...).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = find_open_clip_weights(path)
        if weights is None:
            raise FileNotFoundError(f"{path}: no open_clip weights (expected one of {list(WEIGHT_FILES)})")
    else:
        weights = path
    if config is None:
        config = find_open_clip_config(path)
    sd = load_state_dict_file(weights)
    prefix = ""
    for key in sd:
        if key.endswith("visual.conv1.weight"):
            prefix = key[: -len("visual.conv1.weight")]
            break
    else:
        raise CheckpointMismatchError(f"{weights}: not an open_clip CLIP state dict (no '*visual.conv1.weight'; "
                                      f"timm / Hugging Face text towers and CustomTextCLIP are not supported)")
    return open_clip_state_dict_to_params(sd, config=config, image_size=image_size, prefix=prefix,
                                          what=f"open_clip checkpoint {weights}", **model_overrides)
