"""Model families: everything the trainer, the evaluator, main and the input pipeline know about a model.

A family is a `Family` object. The shared code calls only these members:

  name                  the `config.model_family` value it is registered under.
  evaluator             the default evaluator kind: "person" (text -> image, R1/R5/R10/mAP/mINP over
                        pids) or "caption" (both directions, global / local / two-stage R@K and
                        rsum); see xmr_jax.evaluate (config.evals may ask for other kinds).
  image_inputs          batch keys `encode_image` takes, in order (e.g. ("images",)).
  text_inputs           batch keys `encode_text` takes (e.g. ("text_ids",)).
  validate(config)      every check of the family's own config fields (loss names included); raises
                        ValueError / FileNotFoundError naming the field. The trainer-wide fields
                        (precision, mesh, batch sizes) are checked by `xmr_jax.train.validate_config`,
                        which calls this.
  build(config)         -> the Flax module. `module.apply({"params": p}, batch)` returns the outputs the
                        loss reads; `method="encode_image"` / `"encode_text"` on the inputs above
                        return (global [B,D], tokens [B,L,D], mask [B,L]).
  init_batch(config)    -> a one-example batch of zeros that `module.init` traces (shapes only).
  loss_fn(config)       -> `loss(outputs, batch) -> (total float32 [], {name: float32 []})`, bound to
                        the config once (the train step calls it inside jit).
  pretrained(model, config)
                        -> {top-level parameter name: host (numpy) subtree} read from the config's
                        init checkpoint, or None; these replace the random init of those subtrees.
  import_checkpoint(path, config)
                        -> (model, params) from a reference implementation's checkpoint file (for
                        `--mode=eval --checkpoint=FILE`); `checkpoint_format` says what it reads
                        ("" = the family imports none).
  text(config)          -> TextSpec: the tokenizer, the padding caption and whether MLM inputs are made.
  images(config)        -> ImageSpec: which data set features make the image side and how (tf.data).
  eval_settings(config) -> keyword settings of the evaluator kind (caption: k_t2i, k_i2t, ...).
  eval_model(model, config)
                        -> the module the evaluators encode with (default: `model`; e.g. TGDT as
                        published switches to its test-time token set).
  serving_shapes(model, config)
                        -> {batch key of image_inputs / text_inputs: (shape without the batch dim,
                        dtype name)}: the inputs `xmr_jax.export` and `xmr_jax.search` give the
                        encoders; a str entry is a symbolic dim shared by the encoder's inputs (e.g.
                        "n" regions). Default: the shapes of `init_batch`.
  complete_config(config, train_meta)
                        fills config values left to the data set (IRRA: num_classes = identities).
  micro_batch_outputs(config)
                        -> {output name: "rows" | "sum"} for gradient caching (config.micro_batch_size,
                        xmr_jax.grad_cache): the outputs the loss reads and how micro-batches make
                        them ("rows": per-example rows, concatenated, e.g. embeddings for the batch
                        losses; "sum": float32 [] added up, e.g. a per-sample CE sum and its count),
                        or None (default): the family does not train in micro-batches.

A new family is its module under models/ (the module and a Family subclass), one entry in
`FAMILIES` (or `register(family)` at run time, as tests do) and its configs; a data set with
other image features (e.g. precomputed regions) needs its TFDS builder too, and its ImageSpec
says which features the pipeline reads. `ClipTowerFamily`
holds what every family on the CLIP towers shares (tokenizer, init batch, CLIP checkpoint loading,
context length check).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

import numpy as np

EVALUATOR_KINDS = ("person", "caption")


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """How captions become model inputs (used by data_pipelines.input_pipeline).

    name: names the scheme in messages and caches.
    tokenizer: context_length -> object whose `encode(list[str])` returns int32 [N, context_length].
    pad_caption: context_length -> int32 [context_length], the caption of padding rows (eval batches).
    mlm_mask: None (no MLM inputs) or, in tf.data, (token_ids int32 [T], seed int [2], prob) ->
      (masked_ids int32 [T], labels int32 [T], 0 = no target): the batch then has mlm_ids/mlm_labels.
    vocab_file: the vocabulary file the tokenizer reads ("" = built into xmr_jax); an export copies it.
    """

    name: str
    tokenizer: Callable[[int], Any]
    pad_caption: Callable[[int], np.ndarray]
    mlm_mask: Callable | None = None
    vocab_file: str = ""


def _clip_tokenizer(context_length: int):
    from xmr_jax.tokenizer import default_tokenizer

    return default_tokenizer(mask_token=True, context_length=context_length)


def _clip_pad_caption(context_length: int) -> np.ndarray:
    from xmr_jax.tokenizer import EOT_ID, SOT_ID

    row = np.zeros((context_length,), np.int32)
    row[:2] = (SOT_ID, EOT_ID)  # the empty caption: safe for EOT pooling
    return row


def _clip_mlm_mask(token_ids, seed, prob):
    from data_pipelines import preprocess

    return preprocess.mlm_mask(token_ids, seed, prob)


# IRRA's tokenizer variant (CLIP BPE + <|mask|>), with and without MLM inputs.
CLIP_TEXT = TextSpec("clip_bpe", _clip_tokenizer, _clip_pad_caption, None)
CLIP_TEXT_MLM = dataclasses.replace(CLIP_TEXT, mlm_mask=_clip_mlm_mask)


def text_spec(scheme: str, vocab_file: str = "") -> TextSpec:
    """The TextSpec a scheme names (as export metadata records it): "clip_bpe", or "wordpiece"
    with its BERT vocab.txt `vocab_file`."""
    if scheme == CLIP_TEXT.name:
        return CLIP_TEXT
    if scheme == "wordpiece" and vocab_file:
        from xmr_jax.models.tgdt_regions_family import wordpiece_text

        return wordpiece_text(os.path.abspath(vocab_file))
    raise ValueError(f"text scheme {scheme!r} (vocab file {vocab_file!r}) is not known; expected "
                     f"{CLIP_TEXT.name!r} or 'wordpiece' with a vocab.txt")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How a data set example's image side becomes encoder inputs (data_pipelines.input_pipeline).

    name: names the scheme in messages.
    features: the example features it reads (e.g. ("image",): the encoded image; a region-feature
      data set would name its feature arrays). "image" reaches the functions undecoded.
    train: ({feature: tf tensor}, size (H, W), seeds int64 [5, 2] (the sample's stateless seeds;
      seeds[3] is the MLM masker's), augment, flip) -> {batch field: tf tensor}.
    eval: ({feature: tf tensor}, size) -> {batch field: tf tensor} (deterministic).
    The batch fields are what `image_inputs` names for the family's encode_image.
    """

    name: str
    features: tuple[str, ...]
    train: Callable
    eval: Callable


def _rgb_train(features, size, seeds, augment, flip):
    from data_pipelines import preprocess

    return {"images": preprocess.train_image(features["image"], size, seeds, augment=augment, flip=flip)}


def _rgb_eval(features, size):
    from data_pipelines import preprocess

    return {"images": preprocess.eval_image(features["image"], size)}


# RGB pixels: decode, IRRA's train transform (flip / pad-crop / erasing per config.data) or the
# test resize, CLIP normalization -> images float32 [H, W, 3].
RGB_IMAGES = ImageSpec("rgb", ("image",), _rgb_train, _rgb_eval)


class Family:
    """Base class of a model family; see the module docstring for each member."""

    name: str = ""
    evaluator: str = "person"
    image_inputs: tuple[str, ...] = ("images",)
    text_inputs: tuple[str, ...] = ("text_ids",)
    checkpoint_format: str = ""

    def validate(self, config) -> None:
        raise NotImplementedError

    def build(self, config):
        raise NotImplementedError

    def init_batch(self, config) -> dict:
        raise NotImplementedError

    def loss_fn(self, config) -> Callable:
        raise NotImplementedError

    def text(self, config) -> TextSpec:
        raise NotImplementedError

    def images(self, config) -> ImageSpec:
        raise NotImplementedError

    def pretrained(self, model, config) -> dict | None:
        return None

    def import_checkpoint(self, path: str, config):
        raise ValueError(f"config.model_family={self.name!r} imports no checkpoint files; give a training "
                         "workdir or its checkpoints folder")

    def eval_settings(self, config) -> dict:
        return {}

    def eval_model(self, model, config):
        return model

    def serving_shapes(self, model, config) -> dict[str, tuple[tuple, str]]:
        """{input key: (shape without the batch dim, dtype name)} of `model`'s encoder inputs, from
        `init_batch` (families whose inputs vary in size override it with symbolic dims)."""
        del model
        batch = self.init_batch(config)
        return {k: (tuple(batch[k].shape[1:]), str(batch[k].dtype)) for k in self.image_inputs + self.text_inputs}

    def complete_config(self, config, train_meta) -> None:
        del config, train_meta

    def micro_batch_outputs(self, config) -> dict[str, str] | None:
        return None


class ClipTowerFamily(Family):
    """Shared by the families built on `config.model.clip` towers (CLIP BPE text, RGB images)."""

    def clip_model(self, config):
        """The CLIP towers the config describes (config.model.clip, compute dtype config.precision)."""
        from xmr_jax.models.clip import clip_from_config

        clip_cfg = dict(config.model.clip)
        clip_cfg["dtype"] = config.precision
        return clip_from_config(clip_cfg)

    def validate_towers(self, config) -> None:
        """data.context_length == the text tower's; model.init_checkpoint exists (when set)."""
        from xmr_jax.models.clip import clip_from_config

        model_context = clip_from_config(config.model.clip).context_length
        data_context = config.data.get("context_length", 77)
        if model_context != data_context:
            raise ValueError(
                f"config.data.context_length={data_context} differs from the text tower's context length "
                f"{model_context} (config.model.clip.context_length); set both to the same value"
            )
        init = config.model.get("init_checkpoint")
        if init and not os.path.exists(init):
            raise FileNotFoundError(
                f"config.model.init_checkpoint={init!r} does not exist; give an OpenAI CLIP .pt / state dict, "
                "a Hugging Face CLIP folder or a params file written by `python -m xmr_jax.convert`"
            )

    def init_batch(self, config) -> dict:
        """images float32 [1,H,W,3] (config.data.image_size), text_ids / mlm_ids / mlm_labels int32
        [1,T] (the tower's context length), pids / image_ids int32 [1]."""
        import jax.numpy as jnp

        from xmr_jax.models.clip import clip_from_config

        h, w = tuple(config.data.image_size)
        t = clip_from_config(config.model.clip).context_length
        return {
            "images": jnp.zeros((1, h, w, 3), jnp.float32),
            "text_ids": jnp.zeros((1, t), jnp.int32),
            "mlm_ids": jnp.zeros((1, t), jnp.int32),
            "mlm_labels": jnp.zeros((1, t), jnp.int32),
            "pids": jnp.zeros((1,), jnp.int32),
            "image_ids": jnp.zeros((1,), jnp.int32),
        }

    def pretrained(self, model, config) -> dict | None:
        """{"base_model": CLIP tower params (numpy)} from config.model.init_checkpoint, or None."""
        init = config.model.get("init_checkpoint")
        if not init:
            return None
        from xmr_jax import convert

        clip = model.base_model
        # activation: picks it for state dicts (which do not record it); an error if the file records another
        _, clip_params = convert.load_clip(init, image_size=tuple(config.data.image_size),
                                           scan_layers=clip.scan_layers, activation=clip.activation)
        convert.check_params(clip_params, clip, what=f"config.model.init_checkpoint={init}")
        return {"base_model": clip_params}

    def text(self, config) -> TextSpec:
        return CLIP_TEXT

    def images(self, config) -> ImageSpec:
        return RGB_IMAGES


# name -> "module:attribute" of a Family instance, imported on first use (no import cycles, and
# main imports only the family it runs).
FAMILIES: dict[str, str] = {
    "irra": "xmr_jax.models.irra:FAMILY",
    "tgdt": "xmr_jax.models.tgdt_family:FAMILY",
    "tgdt_regions": "xmr_jax.models.tgdt_regions_family:FAMILY",
    "siglip": "xmr_jax.models.siglip_family:FAMILY",
}
_LOADED: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds (or replaces) `family` under `family.name`; returns it."""
    if not family.name:
        raise ValueError(f"{type(family).__name__}.name is empty; a family needs the name configs select it by")
    if family.evaluator not in EVALUATOR_KINDS:
        raise ValueError(f"family {family.name!r}: evaluator={family.evaluator!r}, expected one of {EVALUATOR_KINDS}")
    FAMILIES[family.name] = family
    _LOADED.pop(family.name, None)
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)
    _LOADED.pop(name, None)


def get_family(name: str) -> Family:
    """The Family registered as `name` (config.model_family)."""
    if name not in FAMILIES:
        raise ValueError(f"config.model_family={name!r} is not known; choose one of {sorted(FAMILIES)}")
    entry = FAMILIES[name]
    if isinstance(entry, Family):
        return entry
    if name not in _LOADED:
        module, _, attr = entry.partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), attr)
    return _LOADED[name]


def parse_loss_names(loss_names: str, known: tuple[str, ...], family: str) -> tuple[str, ...]:
    """'sdm+id+mlm' -> ('sdm', 'id', 'mlm'); unknown or no names raise a ValueError naming the field."""
    names = tuple(n.strip() for n in str(loss_names).split("+") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"config.loss_names={loss_names!r}: unknown loss {unknown or '(empty)'} for model_family "
            f"{family!r}; use names from {known} joined by '+'"
        )
    return names

