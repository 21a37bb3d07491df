"""Shared transformer building blocks (OpenAI-CLIP style), reused by all towers and IRRA.

Shapes: B batch, T query length, S key/value length, C width, N heads, H = C // N head dim.

Initialisation follows OpenAI CLIP's `initialize_parameters` for a stack of L blocks of width w:

* attention q/k/v projections ("in-proj"): N(0, w^-0.5)              -> `attn_std`
* attention out-proj and MLP `c_proj`:      N(0, w^-0.5 * (2L)^-0.5) -> `out_std`
* MLP `c_fc`:                               N(0, (2w)^-0.5)          -> `fc_std`
* all biases zero, LayerNorm scale 1 / bias 0.

`Transformer` derives these three numbers from (width, layers) unless they are passed explicitly;
`ResidualBlock` / `MultiHeadAttention` / `Mlp` used on their own default to the L = 1 values.
LayerNorm statistics are always computed in float32 (eps 1e-5), parameters are float32, and
`dtype` is the compute dtype of the matmuls (float32 or bfloat16).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's GELU approximation `x * sigmoid(1.702 x)` (elementwise, any shape)."""
    return x * jax.nn.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """Module wrapper around :func:`quick_gelu`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return quick_gelu(x)


def default_stds(width: int, layers: int = 1) -> tuple[float, float, float]:
    """OpenAI CLIP init stds `(attn_std, out_std, fc_std)` for a stack of `layers` blocks."""
    attn_std = width ** -0.5
    out_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    return attn_std, out_std, fc_std


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with float32 statistics (params `scale`, `bias`).

    x [..., C] (any dtype) -> [..., C] in `dtype` (None = input dtype).
    """

    epsilon: float = 1e-5
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype or x.dtype)


def _dense(features: int, std: float, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=True,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(stddev=std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out Dense projections (all with bias).

    Attributes:
      num_heads: number of heads N (width C must be divisible by N).
      dtype: compute dtype; the softmax is always computed in float32.
      in_std: init std of q/k/v kernels (None -> C^-0.5, OpenAI's in-proj std).
      out_std: init std of the out-proj kernel (None -> C^-0.5; `Transformer` passes
        C^-0.5 * (2L)^-0.5).

    Call: x [B,T,C], kv [B,S,C] or None (self-attention), causal (query t sees keys <= t; self-
    attention only), mask optional bool broadcastable to [B,N,T,S] (True = attend).
    Returns [B,T,C] in `dtype`.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    in_std: Optional[float] = None
    out_std: Optional[float] = None

    @nn.compact
    def __call__(self, x, kv=None, causal: bool = False, mask=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"MultiHeadAttention: width {width} is not divisible by num_heads {self.num_heads}")
        if causal and kv is not None:
            raise ValueError("MultiHeadAttention: causal=True is only supported for self-attention (kv=None)")
        head_dim = width // self.num_heads
        in_std = self.in_std if self.in_std is not None else width ** -0.5
        out_std = self.out_std if self.out_std is not None else width ** -0.5
        kv = x if kv is None else kv
        b, t, _ = x.shape
        s = kv.shape[1]
        q = _dense(width, in_std, self.dtype, "q_proj")(x).reshape(b, t, self.num_heads, head_dim)
        k = _dense(width, in_std, self.dtype, "k_proj")(kv).reshape(b, s, self.num_heads, head_dim)
        v = _dense(width, in_std, self.dtype, "v_proj")(kv).reshape(b, s, self.num_heads, head_dim)
        if mask is not None:
            mask = jnp.asarray(mask, dtype=bool)
        # The xla implementation computes logits with float32 accumulation and the softmax in float32.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")
        out = out.reshape(b, t, width)
        return _dense(width, out_std, self.dtype, "out_proj")(out)


class Mlp(nn.Module):
    """Position-wise MLP: `c_fc` (C -> ratio*C), QuickGELU, `c_proj` (ratio*C -> C).

    x [..., C] -> [..., C]. fc_std None -> (2C)^-0.5, proj_std None -> C^-0.5.
    """

    dtype: Dtype = jnp.float32
    mlp_ratio: int = 4
    fc_std: Optional[float] = None
    proj_std: Optional[float] = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        fc_std = self.fc_std if self.fc_std is not None else (2 * width) ** -0.5
        proj_std = self.proj_std if self.proj_std is not None else width ** -0.5
        h = _dense(self.mlp_ratio * width, fc_std, self.dtype, "c_fc")(x)
        h = quick_gelu(h)
        return _dense(width, proj_std, self.dtype, "c_proj")(h)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). x [B,T,C] -> [B,T,C] in `dtype`.

    attn_std / out_std / fc_std: see module docstring (None -> L = 1 OpenAI values).
    `mask` (optional, bool broadcastable to [B,N,T,T]) is passed to the attention.
    """

    width: int
    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    attn_std: Optional[float] = None
    out_std: Optional[float] = None
    fc_std: Optional[float] = None

    @nn.compact
    def __call__(self, x, mask=None):
        if x.shape[-1] != self.width:
            raise ValueError(f"ResidualBlock: input width {x.shape[-1]} != block width {self.width}")
        attn_std, out_std, fc_std = default_stds(self.width, 1)
        attn_std = self.attn_std if self.attn_std is not None else attn_std
        out_std = self.out_std if self.out_std is not None else out_std
        fc_std = self.fc_std if self.fc_std is not None else fc_std
        x = x.astype(self.dtype)
        h = LayerNorm(dtype=self.dtype, name="ln_1")(x)
        h = MultiHeadAttention(self.num_heads, self.dtype, attn_std, out_std, name="attn")(
            h, causal=self.causal, mask=mask)
        x = x + h
        h = LayerNorm(dtype=self.dtype, name="ln_2")(x)
        h = Mlp(self.dtype, fc_std=fc_std, proj_std=out_std, name="mlp")(h)
        return x + h


def _scan_body(block: nn.Module, x, mask):
    return block(x, mask), None


class Transformer(nn.Module):
    """A stack of `layers` ResidualBlocks. x [B,T,C] -> [B,T,C] in `dtype`.

    Params: `resblocks_{i}` per block, or (scan_layers=True) one `resblocks` subtree whose leaves
    carry a leading [layers] axis (see :func:`stack_resblocks` / :func:`unstack_resblocks`).
    remat=True recomputes each block's activations in the backward pass (nn.remat).
    Init stds default to OpenAI's values for (width, layers), see module docstring.
    """

    width: int
    layers: int
    heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    attn_std: Optional[float] = None
    out_std: Optional[float] = None
    fc_std: Optional[float] = None

    @nn.compact
    def __call__(self, x, mask=None):
        attn_std, out_std, fc_std = default_stds(self.width, self.layers)
        kwargs = dict(
            width=self.width,
            num_heads=self.heads,
            causal=self.causal,
            dtype=self.dtype,
            attn_std=self.attn_std if self.attn_std is not None else attn_std,
            out_std=self.out_std if self.out_std is not None else out_std,
            fc_std=self.fc_std if self.fc_std is not None else fc_std,
        )
        block_cls = ResidualBlock
        if self.remat:
            block_cls = nn.remat(ResidualBlock, prevent_cse=not self.scan_layers)
        x = x.astype(self.dtype)
        if self.scan_layers:
            scanned = nn.scan(
                _scan_body,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=self.layers,
            )
            x, _ = scanned(block_cls(**kwargs, name="resblocks"), x, mask)
            return x
        for i in range(self.layers):
            x = block_cls(**kwargs, name=f"resblocks_{i}")(x, mask)
        return x


_BLOCK_RE = re.compile(r"^resblocks_(\d+)$")


def stack_resblocks(tree):
    """Convert every `{resblocks_0, ..., resblocks_{L-1}}` group in a param tree to one stacked
    `resblocks` subtree (leaves [L, ...]) as used by `Transformer(scan_layers=True)`."""
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    tree = dict(tree)
    idx = sorted(int(m.group(1)) for k in tree if (m := _BLOCK_RE.match(k)))
    out = {k: stack_resblocks(v) for k, v in tree.items() if not _BLOCK_RE.match(k)}
    if idx:
        if idx != list(range(len(idx))):
            raise ValueError(f"stack_resblocks: block indices are not contiguous from 0: {idx}")
        blocks = [tree[f"resblocks_{i}"] for i in idx]
        out["resblocks"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
    return out


def unstack_resblocks(tree, container_keys=("transformer",)):
    """Inverse of :func:`stack_resblocks`: split each `transformer/resblocks` subtree with stacked
    leaves [L, ...] into `resblocks_{i}` subtrees (only below keys named in `container_keys`)."""
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    out = {}
    for k, v in dict(tree).items():
        if k in container_keys and hasattr(v, "items") and "resblocks" in v:
            v = dict(v)
            stacked = v.pop("resblocks")
            n = jax.tree.leaves(stacked)[0].shape[0]
            for i in range(n):
                v[f"resblocks_{i}"] = jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked)
            out[k] = {kk: unstack_resblocks(vv, container_keys) for kk, vv in v.items()}
        else:
            out[k] = unstack_resblocks(v, container_keys)
    return out
