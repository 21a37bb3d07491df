"""SigLIP fine-tuning configs (model_family "siglip"): person retrieval (configs/irra/cuhk_pedes_siglip.py)
and caption retrieval (configs/siglip/flickr30k.py). See xmr_jax/models/siglip_family.py for the fields."""

from __future__ import annotations

import ml_collections

from configs import common

# `arg` keys of the SigLIP configs (after ':' in --config=FILE:...)
ARG_DEFAULTS = dict(init="checkpoints/siglip-base-patch16-224", tokenizer="", data_dir="", manual_dir="",
                    batch_size=64, epochs=60, seed=1, precision="bfloat16", impl="chunked")


def siglip_config(base: ml_collections.ConfigDict, arg, loss_names: str, positives: str,
                  image_size) -> ml_collections.ConfigDict:
    """Turns an IRRA / TGDT recipe config `base` (data, schedule, evaluators) into SigLIP fine-tuning.

    arg: the parsed ARG_DEFAULTS. init: a Hugging Face SiglipModel folder (its config gives the
    towers; the patch position embeddings are resized to `image_size`); tokenizer: a local
    tokenizer folder ("" = the init folder, whose SentencePiece model needs `sentencepiece`).
    """
    config = base
    config.model_family = "siglip"
    config.loss_names = loss_names
    config.model = ml_collections.ConfigDict()
    config.model.siglip = ml_collections.ConfigDict({"image_size": tuple(image_size)})
    config.model.init_checkpoint = arg.init
    config.model.tokenizer = arg.tokenizer or arg.init
    config.model.sigmoid_impl = arg.impl   # "chunked": texts passed around the mesh; "dense"
    config.model.positives = positives
    config.data.image_size = tuple(image_size)
    config.data.context_length = 64        # SigLIP B/16's text context (padding to the full length)
    # t' and b train at the base lr without weight decay (they are not weights)
    config.optim.param_groups = list(config.optim.param_groups) + [(("logit_scale", "logit_bias"), 1.0, 0.0)]
    return config


def base_arg(arg) -> tuple[ml_collections.ConfigDict, str]:
    """(parsed SigLIP arg, the arg string for the IRRA / TGDT recipe builders)."""
    parsed = common.parse_arg(arg, **ARG_DEFAULTS)
    keys = ("data_dir", "manual_dir", "batch_size", "epochs", "seed", "precision")
    return parsed, ",".join(f"{k}={parsed[k]}" for k in keys if str(parsed[k]) != "")
