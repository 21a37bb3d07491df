"""IRRA: implicit relation reasoning around a CLIP dual encoder (SPEC section 3).

Parameter names mirror the reference so the optimizer's name rules apply unchanged:
`base_model` (the CLIP towers), `cross_attn`, `cross_modal_transformer`, `ln_pre_t`, `ln_pre_i`,
`ln_post`, `mlm_head/{dense,ln,fc}` and `classifier`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmr_jax import losses
from xmr_jax.models.clip import CLIP, clip_from_config
from xmr_jax.models.layers import LayerNorm, MultiHeadAttention, QuickGELU, Transformer

KNOWN_LOSSES = ("sdm", "id", "mlm", "itc", "cmpm")


def parse_loss_names(loss_names: str, known: tuple[str, ...] = KNOWN_LOSSES) -> tuple[str, ...]:
    """'sdm+id+mlm' -> ('sdm', 'id', 'mlm'); unknown names raise a ValueError naming the field."""
    names = tuple(n.strip() for n in loss_names.split("+") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"config.loss_names={loss_names!r}: unknown loss {unknown or '(empty)'}; "
            f"use names from {known} joined by '+', e.g. 'sdm+id+mlm'"
        )
    return names


def select_masked_positions(labels: jax.Array, max_predictions: int) -> tuple[jax.Array, jax.Array]:
    """Picks up to `max_predictions` positions per row where labels != 0, in position order.

    Args:
      labels: int [B, T], 0 = not a prediction target.
    Returns:
      positions int32 [B, K] and their labels int32 [B, K] (0 where a row has fewer targets).
    """
    seq_len = labels.shape[1]
    is_target = labels != 0
    # Targets first (in position order), then the rest: key = position, pushed back if no target.
    order_key = jnp.where(is_target, 0, seq_len) + jnp.arange(seq_len)[None, :]
    positions = jnp.argsort(order_key, axis=1)[:, :max_predictions].astype(jnp.int32)
    picked = jnp.take_along_axis(labels, positions, axis=1)
    return positions, picked


class MLMHead(nn.Module):
    """Dense -> QuickGELU -> LayerNorm -> Dense(vocab), the reference's `mlm_head`."""

    width: int
    vocab_size: int
    dense_std: float
    fc_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., W] -> float32 logits [..., vocab]."""
        x = nn.Dense(self.width, dtype=self.dtype, kernel_init=nn.initializers.normal(self.dense_std), name="dense")(x)
        x = QuickGELU()(x)
        x = LayerNorm(name="ln")(x)
        x = nn.Dense(self.vocab_size, dtype=self.dtype, kernel_init=nn.initializers.normal(self.fc_std), name="fc")(x)
        return x.astype(jnp.float32)


class IRRA(nn.Module):
    """CLIP towers + IRR cross-modal MLM module + shared ID classifier.

    Attributes:
      base_model: the CLIP dual encoder.
      loss_names: which parts exist and which losses are computed.
      num_classes: training identities (ID classifier width).
      cross_depth / cross_heads: the cross-modal transformer (4 layers, 8 heads in IRRA).
      mlm_max_predictions: if set, the 49408-way MLM output layer runs only at up to this many
        masked positions per caption (exact whenever a caption has no more targets than that).
    """

    base_model: CLIP
    loss_names: tuple[str, ...]
    num_classes: int
    cross_depth: int = 4
    cross_heads: int = 8
    mlm_max_predictions: int | None = None
    dtype: Any = jnp.float32

    def setup(self):
        width = self.base_model.embed_dim
        if "id" in self.loss_names:
            if self.num_classes <= 0:
                raise ValueError(f"num_classes must be positive for the ID loss, got {self.num_classes}")
            self.classifier = nn.Dense(
                self.num_classes,
                kernel_init=nn.initializers.normal(0.001),
                bias_init=nn.initializers.zeros,
                name="classifier",
            )
        if "mlm" in self.loss_names:
            attn_std = width**-0.5
            proj_std = attn_std * (2 * self.cross_depth) ** -0.5
            fc_std = (2 * width) ** -0.5
            self.cross_attn = MultiHeadAttention(
                num_heads=self.cross_heads, dtype=self.dtype, in_std=attn_std, out_std=proj_std
            )
            self.cross_modal_transformer = Transformer(
                width=width,
                layers=self.cross_depth,
                heads=self.cross_heads,
                causal=False,
                dtype=self.dtype,
                attn_std=attn_std,
                out_std=proj_std,
                fc_std=fc_std,
            )
            self.ln_pre_t = LayerNorm()
            self.ln_pre_i = LayerNorm()
            self.ln_post = LayerNorm()
            self.mlm_head = MLMHead(
                width=width,
                vocab_size=self.base_model.vocab_size,
                dense_std=fc_std,
                fc_std=proj_std,
                dtype=self.dtype,
            )

    def encode_image(self, images: jax.Array):
        """images [B,H,W,3] -> (global [B,D], tokens [B,L,D], mask [B,L])."""
        return self.base_model.encode_image(images)

    def encode_text(self, token_ids: jax.Array):
        """token_ids int [B,T] -> (global [B,D], tokens [B,T,D], mask [B,T])."""
        return self.base_model.encode_text(token_ids)

    def cross_former(self, text_tokens: jax.Array, image_tokens: jax.Array) -> jax.Array:
        """IRR: cross-attention (no residual, no masks) -> 4 blocks -> LN. [B,T,D],[B,L,D] -> [B,T,D]."""
        x = self.cross_attn(self.ln_pre_t(text_tokens), kv=self.ln_pre_i(image_tokens))
        x = self.cross_modal_transformer(x)
        return self.ln_post(x)

    def __call__(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Forward pass for training.

        Args:
          batch: images [B,H,W,3], text_ids int [B,T]; with MLM also mlm_ids, mlm_labels [B,T].
        Returns:
          dict with image_feats / text_feats float32 [B,D] (unnormalized); image_logits /
          text_logits [B,C] with the ID loss; mlm_logits [B,K,V] and mlm_labels [B,K] with MLM.
        """
        image_feats, image_tokens, _ = self.base_model.encode_image(batch["images"])
        text_feats, _, _ = self.base_model.encode_text(batch["text_ids"])
        out = {"image_feats": image_feats.astype(jnp.float32), "text_feats": text_feats.astype(jnp.float32)}
        if "id" in self.loss_names:
            out["image_logits"] = self.classifier(out["image_feats"])
            out["text_logits"] = self.classifier(out["text_feats"])
        if "mlm" in self.loss_names:
            _, mlm_tokens, _ = self.base_model.encode_text(batch["mlm_ids"])
            x = self.cross_former(mlm_tokens, image_tokens)
            labels = batch["mlm_labels"]
            if self.mlm_max_predictions is not None and self.mlm_max_predictions < labels.shape[1]:
                positions, labels = select_masked_positions(labels, self.mlm_max_predictions)
                x = jnp.take_along_axis(x, positions[:, :, None], axis=1)
            out["mlm_logits"] = self.mlm_head(x)
            out["mlm_labels"] = labels
        return out


def compute_losses(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                   loss_names: tuple[str, ...], logit_scale: float = 50.0) -> tuple[jax.Array, dict]:
    """Sums the configured IRRA losses (each weight 1.0). Returns (total, {name_loss: value})."""
    parts = {}
    pids = batch["pids"]
    if "sdm" in loss_names:
        parts["sdm_loss"] = losses.sdm_loss(outputs["image_feats"], outputs["text_feats"], pids, logit_scale)
    if "itc" in loss_names:
        parts["itc_loss"] = losses.itc_loss(outputs["image_feats"], outputs["text_feats"], logit_scale)
    if "cmpm" in loss_names:
        parts["cmpm_loss"] = losses.cmpm_loss(outputs["image_feats"], outputs["text_feats"], pids)
    if "id" in loss_names:
        parts["id_loss"] = losses.id_loss(outputs["image_logits"], outputs["text_logits"], pids)
    if "mlm" in loss_names:
        parts["mlm_loss"] = losses.mlm_loss(outputs["mlm_logits"], outputs["mlm_labels"])
    total = sum(parts.values())
    return total, parts


def build_irra(config) -> IRRA:
    """IRRA from a trainer config (model.clip, loss_names, num_classes, model.*)."""
    names = parse_loss_names(config.loss_names)
    dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
    clip_cfg = dict(config.model.clip)
    clip_cfg["dtype"] = config.precision
    return IRRA(
        base_model=clip_from_config(clip_cfg),
        loss_names=names,
        num_classes=int(config.num_classes),
        cross_depth=config.model.get("cross_depth", 4),
        cross_heads=config.model.get("cross_heads", 8),
        mlm_max_predictions=config.model.get("mlm_max_predictions", None),
        dtype=dtype,
    )
