"""The "tgdt" model family: TGDT's objective and two-stage inference on CLIP towers.

The module, its CMC loss and the checks of config.tgdt live in xmr_jax.models.tgdt; this file
tells the trainer, the evaluator and the input pipeline how to use them (see
xmr_jax.models.families for the members).
"""

from __future__ import annotations

from xmr_jax.models import families, tgdt

# The caption evaluator's settings (xmr_jax.evaluate.CAPTION_SETTINGS) -> their config.tgdt field.
_EVAL_FIELDS = {"k_t2i": "k_t2i", "k_i2t": "k_i2t", "local_scale": "local_scale",
                "local_exhaustive": "eval_local_exhaustive", "coco_1k_folds": "coco_1k_folds",
                "coco_1k_fold_size": "coco_1k_fold_size"}


class TGDTFamily(families.ClipTowerFamily):
    """CMC on global + local similarity (config.tgdt), caption retrieval evaluation, no MLM inputs."""

    name = "tgdt"
    evaluator = "caption"

    def validate(self, config) -> None:
        tgdt.validate_tgdt_config(config)
        self.validate_towers(config)

    def build(self, config) -> tgdt.TGDT:
        return tgdt.build_tgdt(config)

    def loss_fn(self, config):
        def loss(outputs, batch):
            return tgdt.compute_losses(outputs, batch, config)

        return loss

    def micro_batch_outputs(self, config) -> dict[str, str]:
        """Gradient caching: every output is per-example rows (CMC compares the whole batch's
        globals and tokens)."""
        del config
        return {name: "rows" for name in ("image_global", "text_global", "image_tokens", "image_mask",
                                          "text_tokens", "text_mask")}

    def eval_settings(self, config) -> dict:
        """The caption settings config.tgdt sets (the evaluator's defaults for the others)."""
        tcfg = config.tgdt
        return {key: tcfg[field] for key, field in _EVAL_FIELDS.items() if tcfg.get(field) is not None}


FAMILY = TGDTFamily()
