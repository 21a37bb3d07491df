"""BERT text tower (Hugging Face `BertModel` semantics) and the post-LN transformer block it shares
with TGDT's `torch.nn.TransformerEncoderLayer` stacks.

Shapes: B batch, S sequence length, C width, N heads, F feed-forward width.

A post-LN block (:class:`PostLNBlock`) computes, on x [B,S,C] with an optional key-padding mask
[B,S] (True = a real token, attended to):

    h = LayerNorm_1(x + Dropout(Attention(x)))
    y = LayerNorm_2(h + Dropout(Linear_2(Dropout?(act(Linear_1(h))))))

which is BERT's layer (act = exact-erf GELU, LayerNorm eps 1e-12, no dropout after the activation)
and torch's `nn.TransformerEncoderLayer(norm_first=False)` (act = ReLU, eps 1e-5, dropout after the
activation too). Attention-probability dropout is not applied (the fused attention kernels have
none); at inference (the default, `deterministic=True`) no dropout is applied at all.

:class:`Bert` is `BertModel`'s last hidden state, cut to its first `num_layers` layers: word +
absolute position + token-type embeddings, LayerNorm, then the layers. Parameters (float32):

    word_embeddings/embedding [V, C], position_embeddings/embedding [P, C],
    token_type_embeddings/embedding [T, C], embeddings_ln/{scale,bias} [C],
    layer_{i}/attn/{q_proj,k_proj,v_proj,out_proj}/{kernel [C,C], bias [C]},
    layer_{i}/norm1, layer_{i}/linear1/{kernel [C,F], bias [F]}, layer_{i}/linear2 [F,C], layer_{i}/norm2.

`xmr_jax.convert.tgdt.load_bert` reads a Hugging Face BertModel folder into this tree. The pooler
is not part of it (TGDT uses the token features only).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmr_jax.models.layers import Dense, LayerNorm, MultiHeadAttention

Dtype = Any

ACTIVATIONS = ("relu", "gelu")

# BERT's initializer range (Hugging Face `BertConfig.initializer_range`).
BERT_INIT_STD = 0.02


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)   # BERT's "gelu" is the exact erf form
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def torch_linear_std(fan_in: int) -> float:
    """Standard deviation of torch's default `nn.Linear` weight init (uniform +-1/sqrt(fan_in))."""
    return (3 * fan_in) ** -0.5


def padding_attention_mask(key_mask: Optional[jax.Array]) -> Optional[jax.Array]:
    """key_mask bool [B,S] (True = real token) -> [B,1,1,S] for `dot_product_attention`, or None."""
    if key_mask is None:
        return None
    return jnp.asarray(key_mask, bool)[:, None, None, :]


class PostLNBlock(nn.Module):
    """One post-LN transformer layer (module docstring). x [B,S,C] -> [B,S,C] in `dtype`.

    Attributes:
      num_heads: attention heads N (C divisible by N).
      mlp_dim: feed-forward width F.
      activation: "relu" (torch TransformerEncoderLayer) or "gelu" (BERT, exact erf).
      epsilon: LayerNorm eps (torch 1e-5, BERT 1e-12).
      dropout: rate of the residual-branch dropouts (and of the one after the activation when
        `dropout_after_activation`); used only when called with deterministic=False (needs a
        "dropout" rng).
      in_std / out_std / fc_std / proj_std: normal init stds of the q/k/v, attention-out, linear1 and
        linear2 kernels (biases zero).

    Call: x [B,S,C], key_mask optional bool [B,S] (True = attend to this key), deterministic.
    """

    num_heads: int
    mlp_dim: int
    activation: str = "relu"
    epsilon: float = 1e-5
    dropout: float = 0.0
    dropout_after_activation: bool = True
    dtype: Dtype = jnp.float32
    in_std: float = 0.02
    out_std: float = 0.02
    fc_std: float = 0.02
    proj_std: float = 0.02
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: Optional[jax.Array] = None, deterministic: bool = True):
        width = x.shape[-1]
        x = x.astype(self.dtype)
        drop = nn.Dropout(self.dropout, deterministic=deterministic or self.dropout == 0.0)
        h = MultiHeadAttention(self.num_heads, self.dtype, self.in_std, self.out_std, self.attention_impl,
                               name="attn")(x, mask=padding_attention_mask(key_mask))
        x = LayerNorm(self.epsilon, self.dtype, name="norm1")(x + drop(h))
        h = Dense(self.mlp_dim, self.fc_std, self.dtype, name="linear1")(x)
        h = _activation(self.activation, h)
        if self.dropout_after_activation:
            h = drop(h)
        h = Dense(width, self.proj_std, self.dtype, name="linear2")(h)
        return LayerNorm(self.epsilon, self.dtype, name="norm2")(x + drop(h))


class PostLNTransformer(nn.Module):
    """`layers` :class:`PostLNBlock`s named `layers_{i}`, all with the same key-padding mask.

    Init: torch's TransformerEncoderLayer defaults as normal stds (q/k/v like xavier-uniform on the
    packed [3C, C] in_proj, out-proj / linear1 / linear2 like `nn.Linear`), biases zero.
    x [B,S,C] -> [B,S,C] in `dtype`; key_mask optional bool [B,S] (True = real token).
    """

    layers: int
    num_heads: int
    mlp_dim: int
    activation: str = "relu"
    epsilon: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: Optional[jax.Array] = None, deterministic: bool = True):
        width = x.shape[-1]
        for i in range(self.layers):
            x = PostLNBlock(self.num_heads, self.mlp_dim, self.activation, self.epsilon, self.dropout, True,
                            self.dtype, in_std=(2 * width) ** -0.5, out_std=torch_linear_std(width),
                            fc_std=torch_linear_std(width), proj_std=torch_linear_std(self.mlp_dim),
                            attention_impl=self.attention_impl, name=f"layers_{i}")(x, key_mask, deterministic)
        return x


class Bert(nn.Module):
    """Hugging Face BertModel's last hidden state (post-LN layers, exact GELU), first `num_layers` layers.

    Call: token_ids int [B,S] (S <= max_position_embeddings; BERT ids, 0 = [PAD]),
    attention_mask optional bool/int [B,S] (None: token_ids != 0), token_type_ids optional int [B,S]
    (None: zeros, as TGDT feeds BERT) -> hidden states float32 [B,S,hidden_size].
    Positions are 0..S-1 (absolute position embeddings).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, token_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 token_type_ids: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        if token_ids.ndim != 2:
            raise ValueError(f"Bert expects token ids of shape [B, S], got shape {tuple(token_ids.shape)}")
        b, s = token_ids.shape
        if s > self.max_position_embeddings:
            raise ValueError(f"Bert: sequence length {s} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = token_ids != 0
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(token_ids)
        init = nn.initializers.normal(BERT_INIT_STD)
        word = nn.Embed(self.vocab_size, self.hidden_size, param_dtype=jnp.float32, embedding_init=init,
                        name="word_embeddings")(token_ids)
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, param_dtype=jnp.float32,
                       embedding_init=init, name="position_embeddings")(jnp.arange(s)[None, :])
        typ = nn.Embed(self.type_vocab_size, self.hidden_size, param_dtype=jnp.float32, embedding_init=init,
                       name="token_type_embeddings")(token_type_ids)
        x = LayerNorm(self.layer_norm_eps, self.dtype, name="embeddings_ln")(
            word.astype(jnp.float32) + pos.astype(jnp.float32) + typ.astype(jnp.float32))
        x = nn.Dropout(self.dropout, deterministic=deterministic or self.dropout == 0.0)(x)
        for i in range(self.num_layers):
            x = PostLNBlock(self.num_heads, self.intermediate_size, "gelu", self.layer_norm_eps, self.dropout,
                            dropout_after_activation=False, dtype=self.dtype, in_std=BERT_INIT_STD,
                            out_std=BERT_INIT_STD, fc_std=BERT_INIT_STD, proj_std=BERT_INIT_STD,
                            attention_impl=self.attention_impl, name=f"layer_{i}")(x, attention_mask, deterministic)
        return x.astype(jnp.float32)
