"""The "tgdt_regions" model family: TGDT as published (region features + BERT, xmr_jax.models.tgdt_regions).

What the trainer, the evaluator, main and the input pipeline need (see xmr_jax.models.families):

* model: `TGDTRegions` from config.model.tgdt_regions ({"preset": "tgdt" | "tiny", **fields}),
  compute dtype config.precision. Training uses the "train" token set (stage-2 tokens); every
  evaluator encodes with config.model.eval_token_set (default "test": stage-1 tokens, as TGDT
  after `switch_test`) through `eval_model`.
* inputs: image side regions [B,N,R] + boxes [B,N,4] as the region builders store them
  (flickr30k_regions, coco_regions, synthetic_regions); text side BERT WordPiece ids
  [B, config.data.context_length] ([CLS] ... [SEP], 0 = padding) from config.model.vocab
  (default: config.model.bert_dir/vocab.txt).
* loss: CMC (`losses.cmc_loss`) on the global features and the token-level similarity of the
  training token set, positives by config.tgdt.positives, negatives by config.tgdt.negatives; with
  config.tgdt.negatives_schedule = S > 0 the hinge sums over all negatives for the first S steps
  and takes the hardest negative from step S on (random towers collapse under the hardest
  negative from the start; TGDT itself uses "hardest" throughout).
* evaluation: the "caption" evaluator with config.tgdt's settings (k_t2i, k_i2t, local_scale,
  eval_local_exhaustive, coco_1k_folds, coco_1k_fold_size) and NDCG@ndcg_k from TERAN's relevance
  files when config.tgdt.ndcg_relevance_dir is set (files {dir}/{ndcg_name}-{ndcg_split}-{rougeL,
  spice}.npy, see xmr_jax.metrics.relevance_path).
* init: config.model.bert_dir (a Hugging Face BertModel folder, e.g. bert-base-uncased) gives the
  BERT tower's first `text_layers` layers; "" = random BERT (the demo).
* `--mode=eval --checkpoint=model_best_rsum.pth.tar`: TGDT's released checkpoint
  (xmr_jax.convert.tgdt.load_tgdt; sizes from the checkpoint, token set eval_token_set).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from xmr_jax.models import families, tgdt

# caption evaluator setting -> config.tgdt field
_EVAL_FIELDS = {"k_t2i": "k_t2i", "k_i2t": "k_i2t", "local_scale": "local_scale",
                "local_exhaustive": "eval_local_exhaustive", "coco_1k_folds": "coco_1k_folds",
                "coco_1k_fold_size": "coco_1k_fold_size", "ndcg_relevance_dir": "ndcg_relevance_dir",
                "ndcg_name": "ndcg_name", "ndcg_split": "ndcg_split", "ndcg_k": "ndcg_k"}


def _as_stored(features, size):
    del size  # region features have no image size to resize to
    return {"regions": features["regions"], "boxes": features["boxes"]}


# The region builders' arrays as stored: regions float32 [N, R], boxes float32 [N, 4] (normalized).
REGION_IMAGES = families.ImageSpec("regions", ("regions", "boxes"),
                                   lambda features, size, seeds, augment, flip: _as_stored(features, size),
                                   _as_stored)


@functools.lru_cache(maxsize=8)
def wordpiece_text(vocab_path: str) -> families.TextSpec:
    """TextSpec of BERT WordPiece ids from `vocab_path` (one object per path, so the pipeline's
    per-scheme caches hit): rows [CLS] wordpieces [SEP] 0..., cut to the context length with
    [SEP] kept; the padding caption is [CLS] [SEP] 0..."""
    from xmr_jax.wordpiece import WordPieceTokenizer, read_vocab

    vocab = read_vocab(vocab_path)
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]

    def tokenizer(context_length: int):
        return WordPieceTokenizer(vocab_path, max_length=context_length)

    def pad_caption(context_length: int) -> np.ndarray:
        row = np.zeros((context_length,), np.int32)
        row[:2] = (cls_id, sep_id)
        return row

    return families.TextSpec(f"wordpiece:{vocab_path}", tokenizer, pad_caption, None, vocab_file=vocab_path)


def vocab_path(config) -> str:
    """config.model.vocab, else config.model.bert_dir/vocab.txt; ValueError when neither is set."""
    vocab = config.model.get("vocab") or ""
    if vocab:
        return str(vocab)
    bert_dir = config.model.get("bert_dir") or ""
    if bert_dir:
        return os.path.join(str(bert_dir), "vocab.txt")
    raise ValueError("config.model.vocab and config.model.bert_dir are both empty; the tgdt_regions family needs "
                     "a BERT vocab.txt (config.model.vocab) or a Hugging Face BERT folder holding one")


def model_config(config) -> dict:
    """config.model.tgdt_regions with the compute dtype (config.precision)."""
    cfg = dict(config.model.tgdt_regions)
    cfg["dtype"] = config.precision
    return cfg


def negatives_schedule(config) -> int:
    """config.tgdt.negatives_schedule (steps of summed negatives before the hardest; 0 = off)."""
    return config.tgdt.get("negatives_schedule", 0) or 0


class TGDTRegionsFamily(families.Family):
    """TGDT's encoders on region features + BERT (module docstring)."""

    name = "tgdt_regions"
    evaluator = "caption"
    image_inputs = ("regions", "boxes")
    text_inputs = ("text_ids",)
    checkpoint_format = "TGDT .pth.tar (LCFractal/TGDT model_best_rsum.pth.tar)"

    def validate(self, config) -> None:
        from xmr_jax.models.tgdt_regions import TOKEN_SETS, tgdt_regions_from_config
        from xmr_jax.wordpiece import read_vocab

        tgdt.validate_tgdt_config(config)
        if "tgdt_regions" not in config.model:
            raise ValueError("config.model.tgdt_regions is missing: the tgdt_regions family needs the model sizes, "
                             "e.g. {'preset': 'tgdt'} (see configs/tgdt/flickr30k_regions.py)")
        model = tgdt_regions_from_config(model_config(config))
        schedule = negatives_schedule(config)
        if not isinstance(schedule, int) or isinstance(schedule, bool) or schedule < 0:
            raise ValueError(f"config.tgdt.negatives_schedule={schedule!r}: expected an integer >= 0 (steps with "
                             "summed negatives before the hardest negative; 0 = config.tgdt.negatives throughout)")
        eval_set = config.model.get("eval_token_set", "test")
        if eval_set not in TOKEN_SETS:
            raise ValueError(f"config.model.eval_token_set={eval_set!r}: expected one of {TOKEN_SETS}")
        bert_dir = config.model.get("bert_dir") or ""
        if bert_dir and not os.path.isdir(bert_dir):
            raise FileNotFoundError(f"config.model.bert_dir={bert_dir!r} is not a folder; give a Hugging Face "
                                    "BertModel folder (config.json, vocab.txt, model.safetensors or pytorch_model.bin)")
        vocab = read_vocab(vocab_path(config))
        if len(vocab) > model.vocab_size:
            raise ValueError(f"vocab {vocab_path(config)} has {len(vocab)} tokens but the BERT tower has vocab_size="
                             f"{model.vocab_size} (config.model.tgdt_regions.vocab_size)")
        context = config.data.get("context_length", 77)
        if not 2 <= context <= model.max_position_embeddings:
            raise ValueError(f"config.data.context_length={context}: expected 2..{model.max_position_embeddings} "
                             "(the BERT tower's max_position_embeddings)")
        rel_dir = config.tgdt.get("ndcg_relevance_dir") or ""
        if rel_dir:
            from xmr_jax import metrics

            name = config.tgdt.get("ndcg_name") or ""
            if not name:
                raise ValueError("config.tgdt.ndcg_relevance_dir is set but config.tgdt.ndcg_name is empty; give the "
                                 "relevance files' data set name (f30k, coco)")
            for method in ("rougeL", "spice"):
                path = metrics.relevance_path(rel_dir, name, config.tgdt.get("ndcg_split") or "test", method)
                if not path.is_file():
                    raise FileNotFoundError(f"config.tgdt.ndcg_relevance_dir: relevance file {path} not found "
                                            "(NDCG needs TERAN's rougeL and spice files)")

    def build(self, config):
        from xmr_jax.models.tgdt_regions import tgdt_regions_from_config

        return tgdt_regions_from_config(model_config(config))

    def eval_model(self, model, config):
        """The module the evaluators encode with: token set config.model.eval_token_set ("test")."""
        return model.clone(token_set=config.model.get("eval_token_set", "test"))

    def init_batch(self, config) -> dict:
        """regions float32 [1,2,R], boxes [1,2,4], text_ids int32 [1,T], pids / image_ids int32 [1]
        (the parameters depend on neither the region count nor the caption length)."""
        import jax.numpy as jnp

        r = self.build(config).region_dim
        t = config.data.get("context_length", 77)
        return {"regions": jnp.zeros((1, 2, r), jnp.float32), "boxes": jnp.zeros((1, 2, 4), jnp.float32),
                "text_ids": jnp.zeros((1, t), jnp.int32), "pids": jnp.zeros((1,), jnp.int32),
                "image_ids": jnp.zeros((1,), jnp.int32)}

    def serving_shapes(self, model, config) -> dict[str, tuple[tuple, str]]:
        """regions ("n", model.region_dim) float32, boxes ("n", 4) float32 (n: any region count,
        shared), text_ids (config.data.context_length,) int32."""
        return {"regions": (("n", model.region_dim), "float32"), "boxes": (("n", 4), "float32"),
                "text_ids": ((config.data.get("context_length", 77),), "int32")}

    def loss_fn(self, config):
        import jax.numpy as jnp

        from xmr_jax import losses, similarity

        tcfg = config.tgdt
        schedule = negatives_schedule(config)
        negatives = tcfg.get("negatives", "hardest")

        def loss(outputs, batch):
            """outputs: TGDTRegions.__call__'s dict; batch: pids / image_ids [B] and, with a negatives
            schedule, train_step int32 [B] (the trainer's step on every row) -> (loss, {"cmc_loss": loss})."""
            local = similarity.local_similarity(outputs["image_tokens"], outputs["image_mask"],
                                                outputs["text_tokens"], outputs["text_mask"], scale=tcfg.local_scale)
            ids = batch["pids"] if tcfg.positives == "pid" else batch["image_ids"]
            common = dict(margin=tcfg.margin, slack=tcfg.slack, positive_mask=losses.positive_mask_from_ids(ids))

            def cmc(kind):
                return losses.cmc_loss(outputs["image_global"], outputs["text_global"], local, negatives=kind, **common)

            if not schedule:
                value = cmc(negatives)
                return value, {"cmc_loss": value}
            if "train_step" not in batch:
                raise KeyError("config.tgdt.negatives_schedule needs the trainer's step in the batch ('train_step'); "
                               "the loss was called without it")
            hardest = batch["train_step"][0] >= schedule
            value = jnp.where(hardest, cmc("hardest"), cmc("sum"))
            return value, {"cmc_loss": value, "hardest_negatives": hardest.astype(jnp.float32)}

        return loss

    def text(self, config) -> families.TextSpec:
        return wordpiece_text(os.path.abspath(vocab_path(config)))

    def images(self, config) -> families.ImageSpec:
        return REGION_IMAGES

    def pretrained(self, model, config) -> dict | None:
        """{"bert": BERT params (numpy)} from config.model.bert_dir, or None (random BERT)."""
        bert_dir = config.model.get("bert_dir") or ""
        if not bert_dir:
            return None
        from xmr_jax.convert.tgdt import load_bert_for

        return {"bert": load_bert_for(model, bert_dir)}

    def import_checkpoint(self, path: str, config):
        """TGDT's .pth.tar -> (TGDTRegions with the checkpoint's sizes, params); the vocab must fit."""
        from xmr_jax.convert.tgdt import load_tgdt
        from xmr_jax.wordpiece import read_vocab

        fields = dict(config.model.tgdt_regions)
        # head counts are not stored in the checkpoint: config.model.tgdt_regions's (else TGDT's 4 / 4 / width // 64)
        keep = ("detach", "stage2_mask", "attention_impl", "heads", "region_heads", "text_heads")
        overrides = {k: fields[k] for k in keep if fields.get(k) is not None}
        model, params = load_tgdt(path, token_set=config.model.get("eval_token_set", "test"), dtype=config.precision,
                                  **overrides)
        vocab = read_vocab(vocab_path(config))
        if len(vocab) > model.vocab_size:
            raise ValueError(f"vocab {vocab_path(config)} has {len(vocab)} tokens but the checkpoint's BERT has "
                             f"vocab_size={model.vocab_size}; give the checkpoint's vocab (config.model.vocab)")
        return model, params

    def eval_settings(self, config) -> dict:
        """The caption settings config.tgdt sets (the evaluator's defaults for the others)."""
        tcfg = config.tgdt
        return {key: tcfg[field] for key, field in _EVAL_FIELDS.items() if tcfg.get(field) is not None}


FAMILY = TGDTRegionsFamily()
