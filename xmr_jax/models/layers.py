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

Performance notes (see benchmarks/towers.py):

* every projection is one 2-D [N, C] x [C, F] matmul (:class:`Dense` flattens the leading axes), so
  the weight gradient is a plain GEMM contracting one axis; with `nn.Dense` on [B, T, C] inputs the
  gradient contracts two axes and XLA:CPU adds a transposed copy of the output gradient per
  projection.
* attention goes through `jax.nn.dot_product_attention`; :func:`attention_implementation` picks
  "cudnn" (fused kernel) on CUDA GPUs for bfloat16/float16 and "xla" elsewhere.
"""

from __future__ import annotations

import logging
import os
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


ACTIVATIONS = ("quick_gelu", "gelu")


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU `x * Phi(x)` (erf form), as torch `nn.GELU()` and Hugging Face's "gelu"."""
    return jax.nn.gelu(x, approximate=False)


def activation_fn(name: str):
    """The MLP activation called `name`: "quick_gelu" (OpenAI CLIP) or "gelu" (exact; open_clip /
    LAION / DataComp CLIPs). Raises ValueError naming `activation` otherwise."""
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return gelu
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


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


class Dense(nn.Module):
    """`x @ kernel + bias` over the last axis, computed as one 2-D matmul on x reshaped to [N, C].

    Same parameters as `flax.linen.Dense(features)`: "kernel" [C, F] ~ N(0, std), "bias" [F] = 0,
    both float32. x [..., C] -> [..., F] in `dtype`.
    """

    features: int
    std: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(stddev=self.std), (x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        lead = x.shape[:-1]
        y = jnp.dot(x.astype(self.dtype).reshape(-1, x.shape[-1]), kernel.astype(self.dtype))
        return (y + bias.astype(self.dtype)).reshape(*lead, self.features)


def _dense(features: int, std: float, dtype: Dtype, name: str) -> Dense:
    return Dense(features, std, dtype, name=name)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_ATTENTION_ENV = "XMR_ATTENTION_IMPL"
_log = logging.getLogger(__name__)
_warned_fallback = set()


def default_backend_kind() -> str:
    """'cuda', 'rocm', 'cpu' or 'tpu' for JAX's default backend (initialises the backend)."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version or "hip" in version else "cuda"
    return backend


def attention_implementation(dtype, backend: Optional[str] = None, requested: Optional[str] = None) -> str:
    """The `jax.nn.dot_product_attention` implementation MultiHeadAttention uses: "cudnn" or "xla".

    requested: "xla" / "cudnn" are returned as they are; "auto" (or None: the process default, the
      environment variable XMR_ATTENTION_IMPL, else "auto") picks "cudnn" (the fused cuDNN kernel)
      on a CUDA GPU when the compute dtype is bfloat16 or float16, and "xla" otherwise (CPU, TPU,
      ROCm, float32: cuDNN's fused attention takes only 16-bit inputs).
    backend: "cuda"/"gpu", "rocm", "cpu", "tpu"; None = JAX's default backend.

    Note that `implementation=None` in `jax.nn.dot_product_attention` (jax 0.10) still means XLA, so
    the fused kernel has to be asked for by name.
    """
    requested = requested or os.environ.get(_ATTENTION_ENV, "auto") or "auto"
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation: expected one of {ATTENTION_IMPLEMENTATIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    backend = default_backend_kind() if backend is None else backend
    if backend in ("cuda", "gpu") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


def dot_product_attention(q, k, v, mask=None, causal: bool = False, implementation: Optional[str] = None):
    """softmax(q k^T / sqrt(H) masked) v. q [B,T,N,H], k/v [B,S,N,H], mask bool broadcastable to
    [B,N,T,S] (True = attend) -> [B,T,N,H] in q's dtype. Logits and softmax are float32 on every path.

    implementation: see :func:`attention_implementation` (resolved with q's dtype). With "auto", a
    configuration the cuDNN kernel rejects at trace time (head dim, mask shape, old GPU) falls back
    to "xla" with a warning; an explicit "cudnn" raises instead.
    """
    impl = attention_implementation(q.dtype, requested=implementation)
    if mask is not None:
        mask = jnp.asarray(mask, dtype=bool)
    if impl == "cudnn":
        try:
            if mask is not None:   # cuDNN wants a full [B, N, T, S] mask
                mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
            if (implementation or os.environ.get(_ATTENTION_ENV, "auto")) == "cudnn":
                raise
            key = (type(e).__name__, str(e)[:200])
            if key not in _warned_fallback:
                _warned_fallback.add(key)
                _log.warning("cuDNN attention unavailable (%s: %s); using the XLA implementation", *key)
    # The xla implementation computes logits with float32 accumulation and the softmax in float32.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out Dense projections (all with bias).

    Attributes:
      num_heads: number of heads N (width C must be divisible by N).
      dtype: compute dtype; the softmax is always computed in float32.
      in_std: init std of q/k/v kernels (None -> C^-0.5, OpenAI's in-proj std).
      out_std: init std of the out-proj kernel (None -> C^-0.5; `Transformer` passes
        C^-0.5 * (2L)^-0.5).
      attention_impl: "auto" | "xla" | "cudnn" | None (process default), see
        :func:`attention_implementation`.

    Call: x [B,T,C], kv [B,S,C] or None (self-attention), causal (query t sees keys <= t; self-
    attention only), mask optional bool broadcastable to [B,N,T,S] (True = attend).
    Returns [B,T,C] in `dtype`.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    in_std: Optional[float] = None
    out_std: Optional[float] = None
    attention_impl: Optional[str] = None

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
        out = dot_product_attention(q, k, v, mask=mask, causal=causal, implementation=self.attention_impl)
        out = out.reshape(b, t, width)
        return _dense(width, out_std, self.dtype, "out_proj")(out)


class Mlp(nn.Module):
    """Position-wise MLP: `c_fc` (C -> ratio*C), activation, `c_proj` (ratio*C -> C).

    x [..., C] -> [..., C]. fc_std None -> (2C)^-0.5, proj_std None -> C^-0.5.
    activation: "quick_gelu" (OpenAI CLIP, the default) or "gelu" (exact erf GELU), see
    :func:`activation_fn`; it has no parameters, so both give the same param tree.
    """

    dtype: Dtype = jnp.float32
    mlp_ratio: int = 4
    fc_std: Optional[float] = None
    proj_std: Optional[float] = None
    activation: str = "quick_gelu"

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        fc_std = self.fc_std if self.fc_std is not None else (2 * width) ** -0.5
        proj_std = self.proj_std if self.proj_std is not None else width ** -0.5
        act = activation_fn(self.activation)
        h = _dense(self.mlp_ratio * width, fc_std, self.dtype, "c_fc")(x)
        h = act(h)
        return _dense(width, proj_std, self.dtype, "c_proj")(h)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). x [B,T,C] -> [B,T,C] in `dtype`.

    attn_std / out_std / fc_std: see module docstring (None -> L = 1 OpenAI values).
    `mask` (optional, bool broadcastable to [B,N,T,T]) is passed to the attention.
    attention_impl: see :class:`MultiHeadAttention`. activation: the MLP's, see :class:`Mlp`.
    """

    width: int
    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    attn_std: Optional[float] = None
    out_std: Optional[float] = None
    fc_std: Optional[float] = None
    attention_impl: Optional[str] = None
    activation: str = "quick_gelu"

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
        h = MultiHeadAttention(self.num_heads, self.dtype, attn_std, out_std, self.attention_impl, name="attn")(
            h, causal=self.causal, mask=mask)
        x = x + h
        h = LayerNorm(dtype=self.dtype, name="ln_2")(x)
        h = Mlp(self.dtype, fc_std=fc_std, proj_std=out_std, activation=self.activation, name="mlp")(h)
        return x + h


def _scan_body(block: nn.Module, x, mask):
    return block(x, mask), None


class Transformer(nn.Module):
    """A stack of `layers` ResidualBlocks. x [B,T,C] -> [B,T,C] in `dtype`.

    Params: `resblocks_{i}` per block, or (scan_layers=True) one `resblocks` subtree whose leaves
    carry a leading [layers] axis (see :func:`stack_resblocks` / :func:`unstack_resblocks`).
    remat=True recomputes each block's activations in the backward pass (nn.remat).
    Init stds default to OpenAI's values for (width, layers), see module docstring.
    attention_impl: see :class:`MultiHeadAttention`. activation: the MLPs', see :class:`Mlp`.
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
    attention_impl: Optional[str] = None
    activation: str = "quick_gelu"

    @nn.compact
    def __call__(self, x, mask=None):
        activation_fn(self.activation)  # an unknown name fails here, before any block is traced
        attn_std, out_std, fc_std = default_stds(self.width, self.layers)
        kwargs = dict(
            width=self.width,
            num_heads=self.heads,
            causal=self.causal,
            dtype=self.dtype,
            attn_std=self.attn_std if self.attn_std is not None else attn_std,
            out_std=self.out_std if self.out_std is not None else out_std,
            fc_std=self.fc_std if self.fc_std is not None else fc_std,
            attention_impl=self.attention_impl,
            activation=self.activation,
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
