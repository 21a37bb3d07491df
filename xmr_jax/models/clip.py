"""CLIP dual encoder: `visual` (VisionTransformer) and `text` (TextTransformer) towers.

    model = clip_from_config({"preset": "ViT-B/16", "image_size": (384, 128), "dtype": "bfloat16"})
    params = init_clip_params(model, jax.random.key(0))
    g, tokens, mask = model.apply({"params": params}, images_nhwc, method="encode_image")
    g, tokens, mask = model.apply({"params": params}, token_ids, method="encode_text")

Global features are not normalized; all outputs are float32. No logit scale lives here: the losses
take it as an argument.

`activation` is the MLP activation of both towers: "quick_gelu" (OpenAI's CLIPs, presets "ViT-B/16",
"ViT-B/32", "ViT-L/14") or "gelu" (exact erf GELU: open_clip's LAION / DataComp CLIPs, presets
"ViT-B-16" and "ViT-L-14" as open_clip names them; same shapes as OpenAI's B/16 and L/14).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmr_jax.models.layers import activation_fn
from xmr_jax.models.text import TextTransformer
from xmr_jax.models.vit import VisionTransformer, as_hw

Dtype = Any

CLIP_FIELDS = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
               "context_length", "vocab_size", "text_width", "text_layers", "text_heads", "dtype", "remat",
               "scan_layers", "activation")

_B_TEXT = dict(context_length=77, vocab_size=49408, text_width=512, text_layers=12, text_heads=8)
_B16 = dict(embed_dim=512, image_size=(224, 224), patch_size=16, vision_width=768, vision_layers=12,
            vision_heads=12, **_B_TEXT)
_L14 = dict(embed_dim=768, image_size=(224, 224), patch_size=14, vision_width=1024, vision_layers=24,
            vision_heads=16, context_length=77, vocab_size=49408, text_width=768, text_layers=12, text_heads=12)
CLIP_PRESETS: dict[str, dict] = {
    # OpenAI's CLIPs (QuickGELU, the CLIP default)
    "ViT-B/16": dict(_B16),
    "ViT-B/32": dict(embed_dim=512, image_size=(224, 224), patch_size=32, vision_width=768,
                     vision_layers=12, vision_heads=12, **_B_TEXT),
    "ViT-L/14": dict(_L14),
    # open_clip's architectures of the same names (nn.GELU), e.g. its laion2b / DataComp weights
    "ViT-B-16": dict(_B16, activation="gelu"),
    "ViT-L-14": dict(_L14, activation="gelu"),
    "tiny": dict(embed_dim=32, image_size=(32, 32), patch_size=8, vision_width=64, vision_layers=2,
                 vision_heads=4, context_length=77, vocab_size=49408, text_width=64, text_layers=2,
                 text_heads=4),
}

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def parse_dtype(dtype) -> Any:
    """'float32' | 'bfloat16' | a jnp dtype -> jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    return dtype


class CLIP(nn.Module):
    """OpenAI-style CLIP towers. See `encode_image` / `encode_text` for shapes."""

    embed_dim: int
    image_size: Any  # (H, W)
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    activation: str = "quick_gelu"   # MLP activation of both towers: "quick_gelu" | "gelu"

    def setup(self):
        dtype = parse_dtype(self.dtype)
        activation_fn(self.activation)
        self.visual = VisionTransformer(
            image_size=as_hw(self.image_size), patch_size=self.patch_size, width=self.vision_width,
            layers=self.vision_layers, heads=self.vision_heads, output_dim=self.embed_dim, dtype=dtype,
            remat=self.remat, scan_layers=self.scan_layers, activation=self.activation)
        self.text = TextTransformer(
            context_length=self.context_length, vocab_size=self.vocab_size, width=self.text_width,
            layers=self.text_layers, heads=self.text_heads, output_dim=self.embed_dim, dtype=dtype,
            remat=self.remat, scan_layers=self.scan_layers, activation=self.activation)

    def encode_image(self, images):
        """images [B, H, W, 3] -> (global [B, D], tokens [B, 1+gh*gw, D], mask [B, 1+gh*gw] bool)."""
        return self.visual(images)

    def encode_text(self, token_ids):
        """token_ids int [B, T<=context_length] -> (global [B, D], tokens [B, T, D], mask [B, T] bool)."""
        return self.text(token_ids)

    def __call__(self, images, token_ids):
        """Both towers: ((img_global, img_tokens, img_mask), (txt_global, txt_tokens, txt_mask))."""
        return self.encode_image(images), self.encode_text(token_ids)

    def dummy_inputs(self, batch: int = 1):
        """Zero inputs of the right shapes: (images [b, H, W, 3] f32, token_ids [b, context] int32)."""
        h, w = as_hw(self.image_size)
        return jnp.zeros((batch, h, w, 3), jnp.float32), jnp.zeros((batch, self.context_length), jnp.int32)

    def fields(self) -> dict:
        """The CLIP constructor fields as a plain dict (image_size as a tuple)."""
        out = {f: getattr(self, f) for f in CLIP_FIELDS}
        out["image_size"] = as_hw(out["image_size"])
        return out


def init_clip_params(model: CLIP, rng) -> dict:
    """Random (OpenAI-scheme) float32 parameters {"visual": ..., "text": ...} for `model`."""
    return model.init(rng, *model.dummy_inputs())["params"]


def clip_param_shapes(model: CLIP) -> dict:
    """Param tree of jax.ShapeDtypeStruct for `model` (no computation)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs()))["params"]


def clip_from_config(cfg: Mapping) -> CLIP:
    """Build a CLIP from {"preset": name, **overrides}; `image_size` may be an int or list, `dtype` a string.

    Unknown keys raise ValueError. Without `preset` every required field must be given.
    """
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    preset = cfg.pop("preset", None)
    if preset is not None and preset not in CLIP_PRESETS:
        raise ValueError(f"clip config: unknown preset {preset!r}; expected one of {sorted(CLIP_PRESETS)}")
    unknown = sorted(set(cfg) - set(CLIP_FIELDS))
    if unknown:
        raise ValueError(f"clip config: unknown field(s) {unknown}; expected 'preset' and any of {list(CLIP_FIELDS)}")
    fields = dict(CLIP_PRESETS[preset]) if preset is not None else {}
    fields.update({k: v for k, v in cfg.items() if v is not None})
    missing = [f for f in ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers",
                           "vision_heads") if f not in fields]
    if missing:
        raise ValueError(f"clip config: missing field(s) {missing} (give a 'preset' or set them)")
    fields["image_size"] = as_hw(fields["image_size"])
    if "dtype" in fields:
        fields["dtype"] = parse_dtype(fields["dtype"])
    if "activation" in fields:
        try:
            activation_fn(fields["activation"])
        except ValueError as e:
            raise ValueError(f"clip config: {e}") from None
    return CLIP(**fields)
