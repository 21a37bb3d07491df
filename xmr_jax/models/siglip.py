"""SigLIP towers (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"), as transformers'
`SiglipModel` computes them, in Flax.

    model = siglip_from_config({"preset": "tiny"})
    params = model.init(jax.random.key(0), *model.dummy_inputs())["params"]
    g, tokens, mask = model.apply({"params": params}, images_nhwc, method="encode_image")
    g, tokens, mask = model.apply({"params": params}, token_ids, method="encode_text")

Vision: patch embedding (a p x p, stride p convolution WITH bias) + learned position embeddings
(one per patch, no class token) -> pre-LN encoder blocks -> post-LN -> multihead attention pooling
head (a learned probe attends to all tokens, then LN + MLP with a residual) -> global [B, D],
D = vision_width. Text: token + position embeddings -> the same blocks WITHOUT a causal mask ->
final LN -> linear `head` on every token; the global feature is the LAST position's (transformers
pools `last_hidden_state[:, -1]`, which is padding for short captions: SigLIP is trained with
captions padded to the full context). Both towers use `activation` ("gelu_pytorch_tanh" in SigLIP
checkpoints) and LayerNorm eps `layer_norm_eps` (1e-6).

`logit_scale` (t', the log temperature, init log 10) and `logit_bias` (b, init -10) are parameters
of this module: the sigmoid loss (xmr_jax.losses.sigmoid_loss) reads them from the outputs.
Global features are not normalized; outputs are float32.

Parameter names follow transformers' keys (vision/embeddings..., encoder/layers_{i}/self_attn/q_proj,
head/attention, text/head, ...) so the converter (xmr_jax.convert.siglip) is a plain table.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmr_jax.models.clip import parse_dtype
from xmr_jax.models.layers import Dense, LayerNorm, MultiHeadAttention, quick_gelu
from xmr_jax.models.vit import PatchEmbed, as_hw, grid_size

Dtype = Any

SIGLIP_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "quick_gelu")


def siglip_activation(name: str):
    """transformers' hidden_act name -> function: "gelu_pytorch_tanh" / "gelu_new" (tanh
    approximation), "gelu" (exact erf), "quick_gelu"."""
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "quick_gelu":
        return quick_gelu
    raise ValueError(f"siglip activation: expected one of {SIGLIP_ACTIVATIONS}, got {name!r}")


class SiglipMLP(nn.Module):
    """fc1 (C -> mlp_dim), activation, fc2 (mlp_dim -> C). x [..., C] -> [..., C]."""

    mlp_dim: int
    activation: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = Dense(self.mlp_dim, width ** -0.5, self.dtype, name="fc1")(x)
        h = siglip_activation(self.activation)(h)
        return Dense(width, self.mlp_dim ** -0.5, self.dtype, name="fc2")(h)


class SiglipBlock(nn.Module):
    """Pre-LN block: x + self_attn(layer_norm1(x)); x + mlp(layer_norm2(x)). x [B,T,C] -> [B,T,C]."""

    heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        h = LayerNorm(self.layer_norm_eps, self.dtype, name="layer_norm1")(x)
        x = x + MultiHeadAttention(self.heads, self.dtype, name="self_attn")(h)
        h = LayerNorm(self.layer_norm_eps, self.dtype, name="layer_norm2")(x)
        return x + SiglipMLP(self.mlp_dim, self.activation, self.dtype, name="mlp")(h)


class SiglipEncoder(nn.Module):
    """`layers` SiglipBlocks (params `layers_{i}`), no mask. x [B,T,C] -> [B,T,C]. remat=True
    recomputes each block's activations in the backward pass."""

    layers: int
    heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(SiglipBlock) if self.remat else SiglipBlock
        for i in range(self.layers):
            x = block(self.heads, self.mlp_dim, self.activation, self.layer_norm_eps, self.dtype,
                      name=f"layers_{i}")(x)
        return x


class AttentionPoolingHead(nn.Module):
    """Multihead attention pooling: a learned `probe` [1,1,C] attends to x [B,N,C] (`attention`),
    then h + mlp(layernorm(h)). -> [B, C]."""

    heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, _, c = x.shape
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, c), jnp.float32)
        q = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, c))
        h = MultiHeadAttention(self.heads, self.dtype, name="attention")(q, kv=x.astype(self.dtype))
        y = LayerNorm(self.layer_norm_eps, self.dtype, name="layernorm")(h)
        h = h + SiglipMLP(self.mlp_dim, self.activation, self.dtype, name="mlp")(y)
        return h[:, 0]


class SiglipVision(nn.Module):
    """images [B,H,W,3] -> (global [B,C] (pooling head), tokens [B,gh*gw,C] (post-LN), mask [B,gh*gw]
    all True); C = width, float32."""

    image_size: Any
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    activation: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images):
        h, w = as_hw(self.image_size)
        gh, gw = grid_size((h, w), self.patch_size)
        if images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ValueError(f"encode_image expects NHWC images of shape [B, {h}, {w}, 3], got {tuple(images.shape)}")
        x = PatchEmbed(self.width, self.patch_size, self.dtype, name="patch_embedding")(images)
        bias = self.param("patch_bias", nn.initializers.zeros, (self.width,), jnp.float32)
        pos = self.param("position_embedding", nn.initializers.normal(self.width ** -0.5),
                         (gh * gw, self.width), jnp.float32)
        x = x + bias.astype(self.dtype) + pos.astype(self.dtype)
        x = SiglipEncoder(self.layers, self.heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                          self.dtype, self.remat, name="encoder")(x)
        x = LayerNorm(self.layer_norm_eps, self.dtype, name="post_layernorm")(x)
        pooled = AttentionPoolingHead(self.heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                                      self.dtype, name="head")(x)
        mask = jnp.ones(x.shape[:2], bool)
        return pooled.astype(jnp.float32), x.astype(jnp.float32), mask


class SiglipText(nn.Module):
    """token_ids int [B,T<=context_length] -> (global [B,D] = tokens[:, -1], tokens [B,T,D] (final LN
    then `head` on every position), mask [B,T] = ids != pad_id); float32. No causal mask."""

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    embed_dim: int
    activation: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    pad_id: int = 1
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, token_ids):
        if token_ids.ndim != 2 or token_ids.shape[1] > self.context_length:
            raise ValueError(
                f"encode_text expects token ids of shape [B, T<={self.context_length}], got {tuple(token_ids.shape)}")
        t = token_ids.shape[1]
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(self.width ** -0.5), name="token_embedding")(token_ids)
        pos = self.param("position_embedding", nn.initializers.normal(self.width ** -0.5),
                         (self.context_length, self.width), jnp.float32)
        x = x + pos[:t].astype(self.dtype)
        x = SiglipEncoder(self.layers, self.heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                          self.dtype, self.remat, name="encoder")(x)
        x = LayerNorm(self.layer_norm_eps, self.dtype, name="final_layer_norm")(x)
        tokens = Dense(self.embed_dim, self.width ** -0.5, self.dtype, name="head")(x).astype(jnp.float32)
        return tokens[:, -1], tokens, token_ids != self.pad_id


SIGLIP_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp_dim",
                 "context_length", "vocab_size", "text_width", "text_layers", "text_heads", "text_mlp_dim",
                 "embed_dim", "activation", "layer_norm_eps", "pad_id", "dtype", "remat")

_B16 = dict(image_size=(224, 224), patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
            vision_mlp_dim=3072, context_length=64, vocab_size=32000, text_width=768, text_layers=12,
            text_heads=12, text_mlp_dim=3072, embed_dim=768)
SIGLIP_PRESETS: dict[str, dict] = {
    # google/siglip-base-patch16-{224,256,384}: the same towers at other image sizes
    "B/16": dict(_B16),
    "tiny": dict(image_size=(32, 32), patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                 vision_mlp_dim=64, context_length=16, vocab_size=49408, text_width=32, text_layers=2,
                 text_heads=4, text_mlp_dim=64, embed_dim=32),
}


class SigLIP(nn.Module):
    """SigLIP dual encoder (`vision`, `text`) plus the sigmoid loss's `logit_scale` (t') and
    `logit_bias` (b), float32 scalars. embed_dim (the text head's output) must equal vision_width
    (the image side has no projection)."""

    image_size: Any
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_dim: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_dim: int
    embed_dim: int
    activation: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    pad_id: int = 1
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        siglip_activation(self.activation)
        if self.embed_dim != self.vision_width:
            raise ValueError(f"siglip config: embed_dim={self.embed_dim} must equal vision_width="
                             f"{self.vision_width} (the image embedding is the pooling head's output)")
        dtype = parse_dtype(self.dtype)
        common = dict(activation=self.activation, layer_norm_eps=self.layer_norm_eps, dtype=dtype, remat=self.remat)
        self.vision = SiglipVision(as_hw(self.image_size), self.patch_size, self.vision_width, self.vision_layers,
                                   self.vision_heads, self.vision_mlp_dim, **common)
        self.text = SiglipText(self.context_length, self.vocab_size, self.text_width, self.text_layers,
                               self.text_heads, self.text_mlp_dim, self.embed_dim, pad_id=self.pad_id, **common)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), (), jnp.float32)
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), (), jnp.float32)

    def encode_image(self, images):
        """images [B,H,W,3] -> (global [B,D], tokens [B,gh*gw,D], mask [B,gh*gw])."""
        return self.vision(images)

    def encode_text(self, token_ids):
        """token_ids int [B,T] -> (global [B,D], tokens [B,T,D], mask [B,T])."""
        return self.text(token_ids)

    def temperature(self):
        """(logit_scale t' float32 [], logit_bias b float32 []): logits = exp(t') cos + b."""
        return self.logit_scale, self.logit_bias

    def __call__(self, images, token_ids):
        """((img_global, img_tokens, img_mask), (txt_global, txt_tokens, txt_mask), (t', b))."""
        return self.encode_image(images), self.encode_text(token_ids), self.temperature()

    def dummy_inputs(self, batch: int = 1):
        """(images [b,H,W,3] float32, token_ids [b,context_length] int32) of zeros."""
        h, w = as_hw(self.image_size)
        return jnp.zeros((batch, h, w, 3), jnp.float32), jnp.zeros((batch, self.context_length), jnp.int32)

    def fields(self) -> dict:
        out = {f: getattr(self, f) for f in SIGLIP_FIELDS}
        out["image_size"] = as_hw(out["image_size"])
        return out


def siglip_param_shapes(model: SigLIP) -> dict:
    """Param tree of jax.ShapeDtypeStruct for `model` (no computation)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs()))["params"]


def siglip_from_config(cfg: Mapping) -> SigLIP:
    """SigLIP from {"preset": name, **overrides} (presets: SIGLIP_PRESETS); unknown keys raise."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    preset = cfg.pop("preset", None)
    if preset is not None and preset not in SIGLIP_PRESETS:
        raise ValueError(f"siglip config: unknown preset {preset!r}; expected one of {sorted(SIGLIP_PRESETS)}")
    unknown = sorted(set(cfg) - set(SIGLIP_FIELDS))
    if unknown:
        raise ValueError(f"siglip config: unknown field(s) {unknown}; expected 'preset' and any of {list(SIGLIP_FIELDS)}")
    fields = dict(SIGLIP_PRESETS[preset]) if preset is not None else {}
    fields.update({k: v for k, v in cfg.items() if v is not None})
    missing = [f for f in SIGLIP_FIELDS[:13] if f not in fields]
    if missing:
        raise ValueError(f"siglip config: missing field(s) {missing} (give a 'preset' or set them)")
    fields["image_size"] = as_hw(fields["image_size"])
    if "dtype" in fields:
        fields["dtype"] = parse_dtype(fields["dtype"])
    if "activation" in fields:
        try:
            siglip_activation(fields["activation"])
        except ValueError as e:
            raise ValueError(f"siglip config: {e}") from None
    return SigLIP(**fields)
