"""TGDT on CLIP-style towers: global features + token features, CMC training (docs/semantics.md, section 5).

The towers are the plain CLIP dual encoder (`base_model`); TGDT adds no parameters. What makes it
TGDT is the objective (consistent multimodal contrastive loss on global and token-level
similarity) and the two-stage inference in `xmr_jax.retrieval`.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax

from xmr_jax import losses, similarity
from xmr_jax.models.clip import CLIP, clip_from_config

KNOWN_LOSSES = ("cmc",)


class TGDT(nn.Module):
    """Dual encoder whose outputs feed global and local (token-level) similarity."""

    base_model: CLIP

    def encode_image(self, images: jax.Array):
        """images [B,H,W,3] -> (global [B,D], tokens [B,L,D], mask [B,L])."""
        return self.base_model.encode_image(images)

    def encode_text(self, token_ids: jax.Array):
        """token_ids int [B,T] -> (global [B,D], tokens [B,T,D], mask [B,T])."""
        return self.base_model.encode_text(token_ids)

    def __call__(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """batch: images [B,H,W,3], text_ids [B,T] -> unnormalized globals image_global /
        text_global [B,D], tokens image_tokens [B,Li,D] / text_tokens [B,T,D] and their bool masks
        (the loss normalizes each once: `losses.cmc_loss`, `similarity.local_similarity`)."""
        image_global, image_tokens, image_mask = self.base_model.encode_image(batch["images"])
        text_global, text_tokens, text_mask = self.base_model.encode_text(batch["text_ids"])
        return {
            "image_global": image_global,
            "text_global": text_global,
            "image_tokens": image_tokens,
            "image_mask": image_mask,
            "text_tokens": text_tokens,
            "text_mask": text_mask,
        }


def compute_losses(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], config) -> tuple[jax.Array, dict]:
    """CMC (`losses.cmc_loss`) on global + local similarity; pairs sharing
    `config.tgdt.positives` (image_id or pid) are never negatives; config.tgdt.negatives: "hardest"
    (TGDT/VSE++, max over the negatives) or "sum" (hinge summed over all negatives).

    outputs: `TGDT.__call__`'s dict; batch: pids / image_ids int [B]. -> (loss, {"cmc_loss": loss}).
    """
    tcfg = config.tgdt
    local = similarity.local_similarity(
        outputs["image_tokens"], outputs["image_mask"], outputs["text_tokens"], outputs["text_mask"],
        scale=tcfg.local_scale,
    )
    ids = batch["pids"] if tcfg.positives == "pid" else batch["image_ids"]
    loss = losses.cmc_loss(outputs["image_global"], outputs["text_global"], local,
                           margin=tcfg.margin, slack=tcfg.slack,
                           positive_mask=losses.positive_mask_from_ids(ids),
                           negatives=tcfg.get("negatives", "hardest"))
    return loss, {"cmc_loss": loss}


def validate_tgdt_config(config) -> None:
    """Checks config.loss_names and config.tgdt.*; raises ValueError naming the bad field."""
    from xmr_jax.models import families

    if families.parse_loss_names(config.loss_names, KNOWN_LOSSES, "tgdt") != KNOWN_LOSSES:
        raise ValueError(f"config.loss_names={config.loss_names!r}: the tgdt family trains with 'cmc' only")
    if "tgdt" not in config:
        raise ValueError("config.tgdt is missing: the tgdt family needs config.tgdt "
                         "(see configs/common.py: tgdt_defaults)")
    tcfg = config.tgdt
    if tcfg.get("positives") not in ("image_id", "pid"):
        raise ValueError(f"config.tgdt.positives={tcfg.get('positives')!r}: expected 'image_id' or 'pid'")
    if tcfg.get("negatives", "hardest") not in losses.CMC_NEGATIVES:
        raise ValueError(f"config.tgdt.negatives={tcfg.get('negatives')!r}: expected one of {losses.CMC_NEGATIVES}")
    checks = (("local_scale", lambda v: v > 0, "> 0"), ("margin", lambda v: v >= 0, ">= 0"),
              ("slack", lambda v: v >= 0, ">= 0"), ("k_t2i", lambda v: int(v) == v and v >= 1, "an integer >= 1"),
              ("k_i2t", lambda v: int(v) == v and v >= 1, "an integer >= 1"))
    for field, ok, expected in checks:
        value = tcfg.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
            raise ValueError(f"config.tgdt.{field}={value!r}: expected {expected}")
    for field, minimum in (("coco_1k_folds", 0), ("coco_1k_fold_size", 1)):
        value = tcfg.get(field, minimum)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"config.tgdt.{field}={value!r}: expected an integer >= {minimum}")


def build_tgdt(config) -> TGDT:
    validate_tgdt_config(config)
    clip_cfg = dict(config.model.clip)
    clip_cfg["dtype"] = config.precision
    return TGDT(base_model=clip_from_config(clip_cfg))
