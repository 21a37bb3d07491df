"""Checkpoint import/export for the CLIP towers.

    model, params = load_clip("ViT-B-16.pt", image_size=(384, 128))      # OpenAI TorchScript / state dict
    model, params = load_clip("hf_clip_folder/", dtype="bfloat16")        # transformers CLIPModel folder
    model, params = load_clip("open_clip_pytorch_model.bin")              # open_clip (config.json next to it)
    model, params = load_clip("laion_b16.safetensors", activation="gelu") # open_clip / OpenAI key layout
    model, params = load_clip("converted/")                               # output of `python -m xmr_jax.convert`
    to_hf_clip(model, params, "out_hf/")                                  # back to a transformers folder

Errors about a wrong checkpoint are `CheckpointMismatchError` (a ValueError) naming key and shapes.
torch is only imported to read .pt/.pth/.bin files.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from xmr_jax.convert.core import (CheckpointMismatchError, adapt_params, canonical_params, check_params,
                                  load_state_dict_file)
from xmr_jax.convert.hf import hf_state_dict_to_params, load_hf_clip, to_hf_clip
from xmr_jax.convert.open_clip import (find_open_clip_config, find_open_clip_weights, is_open_clip_file,
                                      load_open_clip, open_clip_state_dict_to_params)
from xmr_jax.convert.openai import check_recorded_activation, openai_fields, openai_state_dict_to_params
from xmr_jax.convert.posembed import resize_positional_embedding
from xmr_jax.models.clip import CLIP, CLIP_FIELDS, parse_dtype
from xmr_jax.models.vit import as_hw

__all__ = ["CheckpointMismatchError", "load_clip", "save_converted", "openai_state_dict_to_params",
           "hf_state_dict_to_params", "open_clip_state_dict_to_params", "load_open_clip", "to_hf_clip",
           "resize_positional_embedding", "openai_fields", "check_params"]

META_FILE = "xmr_clip.json"
FORMAT_NAME = "xmr_jax.clip"
_RUNTIME_FIELDS = ("dtype", "remat", "scan_layers")
_HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")


def save_converted(model: CLIP, params, out_dir: str, fmt: str = "msgpack") -> str:
    """Write `params` (canonical: float32, unstacked) + xmr_clip.json (model fields) to `out_dir`.

    fmt "msgpack": params.msgpack (flax.serialization); "orbax": checkpoints/0/ (the trainer's
    checkpoint layout, written by `xmr_jax.checkpoints.save_params` as {"params": params}).
    Read back with `load_clip(out_dir)`. Returns out_dir.
    """
    if fmt not in ("msgpack", "orbax"):
        raise ValueError(f"format must be 'msgpack' or 'orbax', got {fmt!r}")
    check_params(params, model)
    params = canonical_params(params)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    fields = {k: v for k, v in model.fields().items() if k not in _RUNTIME_FIELDS}
    fields["image_size"] = list(fields["image_size"])
    if fmt == "msgpack":
        from flax import serialization

        with open(os.path.join(out_dir, "params.msgpack"), "wb") as fh:
            fh.write(serialization.msgpack_serialize(params))
    else:
        from xmr_jax import checkpoints

        old = os.path.join(out_dir, "checkpoints")
        if os.path.isdir(old):  # replaced, as params.msgpack is, when it is an earlier conversion's
            if not os.path.isfile(os.path.join(out_dir, META_FILE)):
                raise FileExistsError(f"{out_dir} holds a checkpoints folder that no conversion wrote "
                                      f"(no {META_FILE}); choose another output folder")
            shutil.rmtree(old)
        checkpoints.save_params(out_dir, params)
    with open(os.path.join(out_dir, META_FILE), "w") as fh:
        json.dump({"format": FORMAT_NAME, "version": 1, "params_format": fmt, "fields": fields}, fh, indent=2)
    return out_dir


def _load_converted(folder: str, image_size, overrides):
    with open(os.path.join(folder, META_FILE)) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT_NAME or "fields" not in meta:
        raise ValueError(f"{folder}/{META_FILE}: not an xmr_jax converted CLIP (format={meta.get('format')!r})")
    fields = dict(meta["fields"])
    # folders written before the activation field existed hold OpenAI-style (QuickGELU) towers
    check_recorded_activation(fields.setdefault("activation", "quick_gelu"), overrides,
                              f"{folder}/{META_FILE}'s activation")
    source = as_hw(fields["image_size"])
    unknown = sorted(set(overrides) - set(CLIP_FIELDS))
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown}; expected any of {list(CLIP_FIELDS)}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields["image_size"] = as_hw(image_size) if image_size is not None else source
    if "dtype" in fields:
        fields["dtype"] = parse_dtype(fields["dtype"])
    model = CLIP(**fields)
    if meta.get("params_format") == "orbax":
        from xmr_jax import checkpoints

        if not os.path.isdir(os.path.join(folder, "checkpoints")):
            raise FileNotFoundError(
                f"{folder}: {META_FILE} says params_format 'orbax' but there is no checkpoints/ folder "
                "(folders converted by earlier versions kept params/; convert the source again)")
        params, _ = checkpoints.load_params(folder, host=True)
    else:
        from flax import serialization

        path = os.path.join(folder, "params.msgpack")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: {META_FILE} present but params.msgpack is missing")
        with open(path, "rb") as fh:
            params = serialization.msgpack_restore(fh.read())
    return model, adapt_params(params, source, model)


def _detect_prefix(sd) -> tuple[str, str]:
    """('openai'|'hf', prefix) of a state dict by its keys."""
    for key in sd:
        if key.endswith("visual.conv1.weight"):
            return "openai", key[: -len("visual.conv1.weight")]
        if key.endswith("vision_model.embeddings.patch_embedding.weight"):
            prefix = key[: -len("vision_model.embeddings.patch_embedding.weight")]
            return "hf", prefix
    raise ValueError("state dict is neither OpenAI CLIP (no '*visual.conv1.weight') nor Hugging Face CLIP "
                     "(no '*vision_model.embeddings.patch_embedding.weight')")


def load_clip(path: str, image_size=None, **model_overrides: Any):
    """Load CLIP towers from `path` -> (CLIP model, float32 params).

    path: an OpenAI CLIP TorchScript archive or state dict (.pt/.pth/.bin/.safetensors), an open_clip
      state dict (same key names; read as open_clip's when its name starts with "open_clip" or an
      open_clip_config.json lies next to it, see convert/open_clip.py), a HF CLIPModel folder
      (config.json + model.safetensors | pytorch_model.bin; hidden_act "quick_gelu" or "gelu"), a
      folder with open_clip_config.json + open_clip weights, or a folder written by `save_converted`
      / `python -m xmr_jax.convert`.
    image_size: (H, W) (or int) to run at; the image positional embedding is resized bilinearly.
    model_overrides: CLIP fields, e.g. dtype="bfloat16", scan_layers=True, remat=True, and head counts
      (vision_heads/text_heads) for state dicts whose heads differ from OpenAI's width // 64;
      activation="gelu" | "quick_gelu" for state dicts, which do not record it (OpenAI-layout files
      default to OpenAI's "quick_gelu"; open_clip files without their config need it), and checked
      against the recorded one for HF, open_clip-with-config and converted folders; for
      OpenAI-format files also `source_image_size=(H, W)` (the size a non-square checkpoint such as
      IRRA's 384x128 was trained at) and `strict=False` (ignore unexpected keys).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, META_FILE)):
            return _load_converted(path, image_size, model_overrides)
        # a hub folder may hold both layouts; the transformers one is read when its weights are there
        hf_weights = any(os.path.isfile(os.path.join(path, n)) for n in _HF_WEIGHT_NAMES)
        if os.path.isfile(os.path.join(path, "config.json")) and (hf_weights or not find_open_clip_weights(path)):
            return load_hf_clip(path, image_size=image_size, **model_overrides)
        if find_open_clip_weights(path):
            return load_open_clip(path, image_size=image_size, **model_overrides)
        raise FileNotFoundError(
            f"{path}: folder has neither {META_FILE} (xmr_jax converted), config.json (Hugging Face CLIPModel) "
            f"nor open_clip weights (open_clip_model.safetensors / open_clip_pytorch_model.bin)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    sd = load_state_dict_file(path)
    style, prefix = _detect_prefix(sd)
    if style == "openai":
        if is_open_clip_file(path):
            return open_clip_state_dict_to_params(sd, config=find_open_clip_config(path), image_size=image_size,
                                                  prefix=prefix, what=f"open_clip checkpoint {path}",
                                                  **model_overrides)
        return openai_state_dict_to_params(sd, image_size=image_size, prefix=prefix, **model_overrides)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return hf_state_dict_to_params(sd, None, image_size=image_size, **model_overrides)
