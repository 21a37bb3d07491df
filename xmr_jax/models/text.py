"""CLIP text tower: token emb + pos emb -> causal blocks -> ln_final -> every token @ text_projection.

Token ids follow CLIP: SOT = vocab_size - 2, EOT = vocab_size - 1 (the largest id), padding 0.
Output features are float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmr_jax.models.layers import LayerNorm, Transformer

Dtype = Any


def text_content_mask(token_ids: jax.Array, vocab_size: int = 49408) -> jax.Array:
    """Word-token mask [B, T] bool: True where 0 < id < EOT (vocab_size-1) and id != SOT (vocab_size-2)."""
    eot_id, sot_id = vocab_size - 1, vocab_size - 2
    return (token_ids > 0) & (token_ids < eot_id) & (token_ids != sot_id)


class TextTransformer(nn.Module):
    """OpenAI CLIP text encoder.

    Call: token_ids int [B, T] (T <= context_length) -> (global [B, D], tokens [B, T, D], mask [B, T])
    with tokens = all tokens after ln_final and text_projection, global = the token at argmax(id)
    (the EOT position), mask = :func:`text_content_mask`.
    """

    context_length: int
    vocab_size: int
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
    def __call__(self, token_ids: jax.Array):
        if token_ids.ndim != 2 or token_ids.shape[1] > self.context_length:
            raise ValueError(
                f"encode_text expects token ids of shape [B, T<={self.context_length}], got {tuple(token_ids.shape)}")
        b, t = token_ids.shape
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(0.02), name="token_embedding")(token_ids)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                         (self.context_length, self.width), jnp.float32)
        x = x + pos[:t].astype(self.dtype)
        x = Transformer(self.width, self.layers, self.heads, causal=True, dtype=self.dtype,
                        remat=self.remat, scan_layers=self.scan_layers, attention_impl=self.attention_impl,
                        activation=self.activation, name="transformer")(x)
        x = LayerNorm(dtype=self.dtype, name="ln_final")(x)
        proj = self.param("text_projection", nn.initializers.normal(self.width ** -0.5),
                          (self.width, self.output_dim), jnp.float32)
        tokens = jnp.dot(x.reshape(-1, self.width), proj.astype(self.dtype),  # 2-D GEMM (see layers.Dense)
                         preferred_element_type=jnp.float32).reshape(*x.shape[:2], self.output_dim)
        eot_pos = jnp.argmax(token_ids, axis=-1)
        global_feat = jnp.take_along_axis(tokens, eot_pos[:, None, None], axis=1)[:, 0]
        return global_feat, tokens, text_content_mask(token_ids, self.vocab_size)
