"""CLIP image tower (OpenAI ViT): patchify -> [CLS] + patches + pos -> ln_pre -> blocks -> ln_post
-> every token @ proj.

Images are NHWC (already normalized). Output features are float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmr_jax.models.layers import LayerNorm, Transformer

Dtype = Any


def as_hw(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    """`224` or `(384, 128)` / `[384, 128]` -> (H, W) tuple of ints."""
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {size!r}")
    return size


def grid_size(image_size, patch_size: int) -> tuple[int, int]:
    """Patch grid (H // patch, W // patch); raises if the image size is not a multiple of patch."""
    h, w = as_hw(image_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image_size {(h, w)} is not a multiple of patch_size {patch_size}")
    return h // patch_size, w // patch_size


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patch projection without bias, as one [B*gh*gw, p*p*3] x [p*p*3, C] matmul.

    Same parameter as `nn.Conv(C, (p, p), strides=p, use_bias=False)`: "kernel" [p, p, 3, C] (HWIO,
    LeCun-normal init). images [B, H, W, 3] -> [B, gh*gw, C] (row-major patch order) in `dtype`.
    (XLA:CPU runs the strided convolution and its kernel gradient, a dilated convolution, several
    times slower than the equivalent GEMMs.)
    """

    width: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        b, h, w, c = images.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width), jnp.float32)
        gh, gw = h // p, w // p
        x = images.astype(self.dtype).reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b * gh * gw, p * p * c)
        y = jnp.dot(x, kernel.reshape(p * p * c, self.width).astype(self.dtype))
        return y.reshape(b, gh * gw, self.width)


class VisionTransformer(nn.Module):
    """OpenAI CLIP ViT.

    Call: images [B, H, W, 3] -> (global [B, D], tokens [B, 1 + gh*gw, D], mask [B, 1 + gh*gw] bool)
    with D = output_dim, tokens = all tokens after ln_post and proj (CLS first), global = tokens[:, 0],
    mask False for CLS and True for patches.
    """

    image_size: Any  # (H, W) or int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    attention_impl: Optional[str] = None   # see layers.attention_implementation
    activation: str = "quick_gelu"          # MLP activation: "quick_gelu" (OpenAI) | "gelu" (open_clip)

    @nn.compact
    def __call__(self, images: jax.Array):
        h, w = as_hw(self.image_size)
        gh, gw = grid_size((h, w), self.patch_size)
        if images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ValueError(
                f"encode_image expects NHWC images of shape [B, {h}, {w}, 3], got {tuple(images.shape)}")
        scale = self.width ** -0.5
        p = self.patch_size
        x = PatchEmbed(self.width, p, self.dtype, name="conv1")(images)
        b = x.shape[0]
        cls = self.param("class_embedding", nn.initializers.normal(scale), (self.width,), jnp.float32)
        pos = self.param("positional_embedding", nn.initializers.normal(scale),
                         (1 + gh * gw, self.width), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        x = LayerNorm(dtype=self.dtype, name="ln_pre")(x)
        x = Transformer(self.width, self.layers, self.heads, causal=False, dtype=self.dtype,
                        remat=self.remat, scan_layers=self.scan_layers, attention_impl=self.attention_impl,
                        activation=self.activation, name="transformer")(x)
        x = LayerNorm(dtype=self.dtype, name="ln_post")(x)
        proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim), jnp.float32)
        tokens = jnp.dot(x.reshape(-1, self.width), proj.astype(self.dtype),  # 2-D GEMM (see layers.Dense)
                         preferred_element_type=jnp.float32).reshape(*x.shape[:2], self.output_dim)
        mask = jnp.broadcast_to(jnp.arange(1 + gh * gw) > 0, (b, 1 + gh * gw))
        return tokens[:, 0], tokens, mask
