"""IRRA: implicit relation reasoning around a CLIP dual encoder (docs/semantics.md, section 'IRRA model').

Parameter names mirror the reference so the optimizer's name rules apply unchanged:
`base_model` (the CLIP towers), `cross_attn`, `cross_modal_transformer`, `ln_pre_t`, `ln_pre_i`,
`ln_post`, `mlm_head/{dense,ln,fc}` and `classifier`.

`FAMILY` (IRRAFamily) is what the trainer, evaluator and input pipeline use: config validation,
the module, the loss bound to config.loss_names, MLM inputs only with the mlm loss, the CLIP
init checkpoint, and import of IRRA's own `best.pth`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmr_jax import losses
from xmr_jax.models import families
from xmr_jax.models.clip import CLIP
from xmr_jax.models.layers import LayerNorm, MultiHeadAttention, QuickGELU, Transformer

KNOWN_LOSSES = ("sdm", "id", "mlm", "itc", "cmpm")


def parse_loss_names(loss_names: str, known: tuple[str, ...] = KNOWN_LOSSES) -> tuple[str, ...]:
    """'sdm+id+mlm' -> ('sdm', 'id', 'mlm'); unknown names raise a ValueError naming the field."""
    return families.parse_loss_names(loss_names, known, "irra")


def sort_targets(labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each caption's prediction targets first, in position order.

    Args:
      labels: int [B, T], 0 = not a prediction target.
    Returns:
      positions int32 [B, T] (targets first, then the other positions), their labels int32
      [B, T] (0 after the targets) and the largest number of targets in one caption (int32 []).
    """
    seq_len = labels.shape[1]
    is_target = labels != 0
    order_key = jnp.where(is_target, 0, seq_len) + jnp.arange(seq_len)[None, :]
    positions = jnp.argsort(order_key, axis=1).astype(jnp.int32)
    picked = jnp.take_along_axis(labels, positions, axis=1).astype(jnp.int32)
    return positions, picked, jnp.max(jnp.sum(is_target, axis=1)).astype(jnp.int32)


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
      mlm_chunk: the 49408-way MLM output layer runs only at masked positions, this many per
        caption in one pass; a batch whose fullest caption holds more targets runs further passes
        (each under `lax.cond`, skipped when empty), so no target is ever dropped and the loss
        equals the all-positions loss. None = every position (IRRA's dense computation).
      mlm_max_passes: at most this many passes (None = as many as a full caption needs, exact).
        Only for measuring the FLOPs of the usual path: XLA's cost analysis counts every branch.
      text_length_buckets: the unmasked captions' text pass runs on the shortest bucket that
        holds every caption's EOT token of the batch (a `lax.switch` over static lengths; the
        tower is causal, so the EOT feature is unchanged). Empty = always the full context.
    """

    base_model: CLIP
    loss_names: tuple[str, ...]
    num_classes: int
    cross_depth: int = 4
    cross_heads: int = 8
    mlm_chunk: int | None = None
    mlm_max_passes: int | None = None
    text_length_buckets: tuple[int, ...] = ()
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

    def text_global(self, token_ids: jax.Array) -> jax.Array:
        """Global text features [B, D] of token_ids int [B, T], on the shortest length bucket
        that holds every EOT token (see `text_length_buckets`)."""
        length = token_ids.shape[1]
        buckets = sorted({int(b) for b in self.text_length_buckets if 0 < int(b) < length}) + [length]
        if len(buckets) == 1 or self.is_initializing():
            return self.base_model.encode_text(token_ids)[0]
        needed = jnp.max(jnp.argmax(token_ids, axis=1)) + 1          # EOT is the largest id
        index = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), needed.astype(jnp.int32))
        branches = [functools.partial(_encode_text_prefix, length=b) for b in buckets]
        return nn.switch(index, branches, self, token_ids)

    def mlm_outputs(self, text_tokens: jax.Array, image_tokens: jax.Array,
                    labels: jax.Array) -> dict[str, jax.Array]:
        """IRR + MLM head. text_tokens [B,T,D] of the masked captions, image_tokens [B,L,D],
        labels int [B,T] (0 = no target) -> mlm_ce_sum, mlm_count (float32 []), and with
        mlm_chunk=None also mlm_logits [B,T,V] / mlm_labels [B,T]."""
        x = self.cross_former(text_tokens, image_tokens)
        seq_len = labels.shape[1]
        if self.mlm_chunk is None or self.mlm_chunk >= seq_len:
            logits = self.mlm_head(x)
            ce_sum, count = losses.masked_cross_entropy_sum(logits, labels)
            return {"mlm_logits": logits, "mlm_labels": labels, "mlm_ce_sum": ce_sum, "mlm_count": count}
        chunk = int(self.mlm_chunk)
        positions, picked, most = sort_targets(labels)
        pad = (-seq_len) % chunk
        positions = jnp.pad(positions, ((0, 0), (0, pad)))
        picked = jnp.pad(picked, ((0, 0), (0, pad)))
        ce_sum = count = jnp.zeros((), jnp.float32)
        n_passes = -(-seq_len // chunk)
        if self.mlm_max_passes is not None:
            n_passes = max(1, min(n_passes, int(self.mlm_max_passes)))
        for start in range(0, chunk * n_passes, chunk):
            pos, lab = positions[:, start:start + chunk], picked[:, start:start + chunk]
            if start == 0:
                part = _mlm_chunk_loss(self, x, pos, lab)
            else:  # only when some caption holds more than `start` targets
                part = nn.cond(most > start, _mlm_chunk_loss, _no_mlm_chunk, self, x, pos, lab)
            ce_sum, count = ce_sum + part[0], count + part[1]
        return {"mlm_ce_sum": ce_sum, "mlm_count": count}

    def __call__(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Forward pass for training.

        Args:
          batch: images [B,H,W,3], text_ids int [B,T]; with MLM also mlm_ids, mlm_labels [B,T].
        Returns:
          dict with image_feats / text_feats float32 [B,D] (unnormalized); image_logits /
          text_logits [B,C] with the ID loss; with MLM the outputs of `mlm_outputs`.
        """
        image_feats, image_tokens, _ = self.base_model.encode_image(batch["images"])
        text_feats = self.text_global(batch["text_ids"])
        out = {"image_feats": image_feats.astype(jnp.float32), "text_feats": text_feats.astype(jnp.float32)}
        if "id" in self.loss_names:
            out["image_logits"] = self.classifier(out["image_feats"])
            out["text_logits"] = self.classifier(out["text_feats"])
        if "mlm" in self.loss_names:
            _, mlm_tokens, _ = self.base_model.encode_text(batch["mlm_ids"])
            out.update(self.mlm_outputs(mlm_tokens, image_tokens, batch["mlm_labels"]))
        return out


def _encode_text_prefix(mdl: IRRA, token_ids: jax.Array, length: int) -> jax.Array:
    return mdl.base_model.encode_text(token_ids[:, :length])[0]


def _mlm_chunk_loss(mdl: IRRA, x, positions, labels):
    """MLM CE sum and count at positions int [B,K] of x [B,T,D] (labels [B,K], 0 = padding)."""
    logits = mdl.mlm_head(jnp.take_along_axis(x, positions[:, :, None], axis=1))
    return losses.masked_cross_entropy_sum(logits, labels)


def _no_mlm_chunk(mdl: IRRA, x, positions, labels):
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)


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
        parts["mlm_loss"] = outputs["mlm_ce_sum"] / jnp.maximum(outputs["mlm_count"], 1.0)
    total = sum(parts.values())
    return total, parts


def build_irra(config) -> IRRA:
    """IRRA from a trainer config (model.clip, loss_names, num_classes, model.*)."""
    names = parse_loss_names(config.loss_names)
    dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
    return IRRA(
        base_model=FAMILY.clip_model(config),
        loss_names=names,
        num_classes=int(config.num_classes),
        cross_depth=config.model.get("cross_depth", 4),
        cross_heads=config.model.get("cross_heads", 8),
        mlm_chunk=config.model.get("mlm_chunk", None),
        mlm_max_passes=config.model.get("mlm_max_passes", None),
        text_length_buckets=tuple(config.model.get("text_length_buckets", ()) or ()),
        dtype=dtype,
    )


class IRRAFamily(families.ClipTowerFamily):
    """The "irra" model family: person retrieval, losses from config.loss_names (docs/semantics.md:
    'IRRA model', 'Losses', 'Evaluation')."""

    name = "irra"
    evaluator = "person"
    checkpoint_format = "a PyTorch IRRA checkpoint (best.pth)"

    def validate(self, config) -> None:
        parse_loss_names(config.loss_names)
        self.validate_towers(config)

    def build(self, config) -> IRRA:
        return build_irra(config)

    def loss_fn(self, config):
        names = parse_loss_names(config.loss_names)
        logit_scale = float(config.model.get("logit_scale", 50.0))

        def loss(outputs, batch):
            return compute_losses(outputs, batch, names, logit_scale)

        return loss

    def text(self, config) -> families.TextSpec:
        """CLIP BPE with <|mask|>; MLM inputs only when the objective has the mlm loss."""
        mlm = "mlm" in parse_loss_names(config.loss_names)
        return families.CLIP_TEXT_MLM if mlm else families.CLIP_TEXT

    def import_checkpoint(self, path: str, config):
        """IRRA's `best.pth` -> (IRRA, params); config.model.import_overrides go to `load_irra`."""
        from xmr_jax.convert.irra import load_irra

        return load_irra(path, image_size=tuple(config.data.image_size),
                         **dict(config.model.get("import_overrides", {})))

    def complete_config(self, config, train_meta) -> None:
        """num_classes <= 0 -> the number of training identities of the data set."""
        if config.num_classes <= 0:
            config.num_classes = train_meta.num_classes

    def micro_batch_outputs(self, config) -> dict[str, str]:
        """Gradient caching: features and ID logits are per-example rows (SDM / ITC / CMPM / ID run
        on the whole batch of them); the MLM branch runs per micro-batch, its CE sum and target
        count add up (the loss divides the batch's sums)."""
        del config
        return {"image_feats": "rows", "text_feats": "rows", "image_logits": "rows", "text_logits": "rows",
                "mlm_ce_sum": "sum", "mlm_count": "sum"}


FAMILY = IRRAFamily()
