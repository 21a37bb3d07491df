"""The "siglip" model family: fine-tune SigLIP towers (xmr_jax.models.siglip) with the sigmoid loss.

Config (beside the trainer-wide fields):

  model.siglip           SigLIP fields: {"preset": "B/16" | "tiny", "image_size": (H, W), ...}
                         (xmr_jax.models.siglip.SIGLIP_FIELDS); with model.init_checkpoint the
                         architecture comes from the checkpoint's config.json and only
                         image_size / dtype / remat are taken from here.
  model.init_checkpoint  a Hugging Face SiglipModel folder (config.json + model.safetensors |
                         pytorch_model.bin), or "" for a random init.
  model.sigmoid_impl     "chunked" (default): the loss in blocks across the batch devices, each
                         device's text embeddings passed around the mesh with ppermute
                         (losses.chunked_sigmoid_loss; on the mesh in context, `jax.set_mesh`,
                         else on parallel.make_mesh(mesh.data, mesh.fsdp) over all devices);
                         "dense": all B x B pairs in one matrix.
  model.positives        "pid" (person retrieval: every image-caption pair of the same person is
                         positive, SigLIP's labels with several +1 per row), "image_id" (caption
                         retrieval: captions of the same image) or "pair" (only the diagonal, as
                         SigLIP pre-training).
  model.tokenizer        "clip_bpe" (the library's CLIP BPE ids, padding 0; for towers trained
                         from scratch: the vocabulary must hold 49408 ids) or a LOCAL folder that
                         transformers' AutoTokenizer reads (local_files_only), e.g. the SigLIP
                         checkpoint folder itself (its SentencePiece spiece.model needs the
                         `sentencepiece` package). Captions are padded to the full context
                         (padding="max_length"), as SigLIP was trained.
  loss_names             "sigmoid" or "sigmoid+id" (+ the ID loss of IRRA on a classifier over
                         the global features; num_classes > 0 or taken from the data set).

The evaluator kind comes from config.evals ("person" is this family's default; give
kind="caption" for caption retrieval). Outputs of the module: image_feats / text_feats float32
[B, D], logit_scale / logit_bias float32 [] (and image_logits / text_logits [B, C] with the ID loss).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmr_jax import losses
from xmr_jax.models import families
from xmr_jax.models.siglip import SigLIP, siglip_from_config

KNOWN_LOSSES = ("sigmoid", "id")
IMPLS = ("chunked", "dense")
POSITIVES = ("pid", "image_id", "pair")
_FROM_CHECKPOINT_OK = ("image_size", "dtype", "remat", "preset")


class SiglipRetrieval(nn.Module):
    """SigLIP towers (`base_model`) + an optional ID classifier over the global features."""

    base_model: SigLIP
    num_classes: int = 0
    with_id: bool = False

    def setup(self):
        if self.with_id:
            if self.num_classes <= 0:
                raise ValueError(f"num_classes must be positive for the ID loss, got {self.num_classes}")
            self.classifier = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.001), name="classifier")

    def encode_image(self, images):
        """images [B,H,W,3] -> (global [B,D], tokens [B,N,D], mask [B,N])."""
        return self.base_model.encode_image(images)

    def encode_text(self, token_ids):
        """token_ids int [B,T] -> (global [B,D], tokens [B,T,D], mask [B,T])."""
        return self.base_model.encode_text(token_ids)

    def __call__(self, batch):
        """batch: images [B,H,W,3], text_ids [B,T] -> the outputs the loss reads (module docstring)."""
        image_feats = self.base_model.encode_image(batch["images"])[0]
        text_feats = self.base_model.encode_text(batch["text_ids"])[0]
        scale, bias = self.base_model.temperature()
        out = {"image_feats": image_feats, "text_feats": text_feats, "logit_scale": scale, "logit_bias": bias}
        if self.with_id:
            out["image_logits"] = self.classifier(image_feats)
            out["text_logits"] = self.classifier(text_feats)
        return out


def parse_loss_names(loss_names: str) -> tuple[str, ...]:
    names = families.parse_loss_names(loss_names, KNOWN_LOSSES, "siglip")
    if "sigmoid" not in names:
        raise ValueError(f"config.loss_names={loss_names!r}: model_family 'siglip' needs the 'sigmoid' loss")
    return names


class _Shape:
    def __init__(self, shape):
        self.shape = tuple(shape)


def _weight_shapes(folder: str) -> dict:
    """{key: object with .shape} of a HF folder's weights: safetensors headers only (no tensor is
    read), else the loaded state dict (pytorch_model.bin)."""
    import json

    names = []
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        names = ["model.safetensors"]
    elif os.path.isfile(index):
        with open(index) as fh:
            names = sorted(set(json.load(fh)["weight_map"].values()))
    if not names:
        from xmr_jax.convert.hf import load_hf_state_dict

        return load_hf_state_dict(folder)
    from safetensors import safe_open

    shapes = {}
    for name in names:
        with safe_open(os.path.join(folder, name), framework="np") as fh:
            for key in fh.keys():
                shapes[key] = _Shape(fh.get_slice(key).get_shape())
    return shapes


def _checkpoint_fields(folder: str) -> dict:
    """The SigLIP fields a HF folder's config.json and weight shapes give."""
    import json

    from xmr_jax.convert.siglip import siglip_fields

    with open(os.path.join(folder, "config.json")) as fh:
        cfg = json.load(fh)
    fields, source = siglip_fields(_weight_shapes(folder), cfg)
    fields["image_size"] = source
    return fields


class SiglipFamily(families.Family):
    """Sigmoid loss (+ ID) on SigLIP towers; person retrieval by default, caption by config.evals."""

    name = "siglip"
    evaluator = "person"

    def _field_config(self, config) -> dict:
        cfg = dict(config.model.siglip.to_dict() if hasattr(config.model.siglip, "to_dict") else config.model.siglip)
        init = config.model.get("init_checkpoint")
        if init:
            extra = sorted(set(cfg) - set(_FROM_CHECKPOINT_OK))
            if extra:
                raise ValueError(f"config.model.siglip sets {extra}, but config.model.init_checkpoint={init!r} "
                                 f"gives the architecture; only {list(_FROM_CHECKPOINT_OK)} may be set")
            fields = _checkpoint_fields(init)
            fields.update({k: v for k, v in cfg.items() if k != "preset" and v is not None})
            return fields
        return cfg

    def siglip_model(self, config) -> SigLIP:
        cfg = self._field_config(config)
        cfg["dtype"] = config.precision
        cfg["image_size"] = tuple(config.data.image_size)
        return siglip_from_config(cfg)

    def validate(self, config) -> None:
        parse_loss_names(config.loss_names)
        if "siglip" not in config.model:
            raise ValueError("config.model.siglip is missing: give the SigLIP fields, e.g. {'preset': 'B/16'}")
        init = config.model.get("init_checkpoint")
        if init and not os.path.isfile(os.path.join(init, "config.json")):
            raise FileNotFoundError(f"config.model.init_checkpoint={init!r}: expected a Hugging Face SiglipModel "
                                    "folder (config.json + model.safetensors or pytorch_model.bin)")
        impl = config.model.get("sigmoid_impl", "chunked")
        if impl not in IMPLS:
            raise ValueError(f"config.model.sigmoid_impl={impl!r}: expected one of {IMPLS}")
        positives = config.model.get("positives", "pid")
        if positives not in POSITIVES:
            raise ValueError(f"config.model.positives={positives!r}: expected one of {POSITIVES}")
        model = self.siglip_model(config)
        context = config.data.get("context_length", 77)
        if context != model.context_length:
            raise ValueError(f"config.data.context_length={context} differs from the SigLIP text tower's "
                             f"context length {model.context_length}; set both to the same value")
        tok = config.model.get("tokenizer", "clip_bpe")
        if tok == "clip_bpe":
            if model.vocab_size < 49408:
                raise ValueError(f"config.model.tokenizer='clip_bpe' gives ids up to 49407 but the SigLIP text vocabulary "
                                 f"has {model.vocab_size}; give the checkpoint's tokenizer folder")
        elif not os.path.isdir(tok):
            raise FileNotFoundError(f"config.model.tokenizer={tok!r}: expected 'clip_bpe' or a local tokenizer folder")

    def build(self, config) -> SiglipRetrieval:
        names = parse_loss_names(config.loss_names)
        return SiglipRetrieval(self.siglip_model(config), num_classes=int(config.num_classes), with_id="id" in names)

    def init_batch(self, config) -> dict:
        """images float32 [1,H,W,3], text_ids int32 [1,T], pids / image_ids int32 [1]."""
        h, w = tuple(config.data.image_size)
        t = config.data.get("context_length", 77)
        return {"images": jnp.zeros((1, h, w, 3), jnp.float32), "text_ids": jnp.zeros((1, t), jnp.int32),
                "pids": jnp.zeros((1,), jnp.int32), "image_ids": jnp.zeros((1,), jnp.int32)}

    def loss_fn(self, config):
        names = parse_loss_names(config.loss_names)
        impl = config.model.get("sigmoid_impl", "chunked")
        positives = config.model.get("positives", "pid")
        mesh_shape = (config.mesh.data, config.mesh.fsdp)

        def loss(outputs, batch):
            ids = None if positives == "pair" else batch["pids" if positives == "pid" else "image_ids"]
            args = (outputs["image_feats"], outputs["text_feats"], outputs["logit_scale"], outputs["logit_bias"])
            mesh = _batch_mesh(mesh_shape) if impl == "chunked" else None
            if mesh is not None:
                from xmr_jax import parallel

                value = losses.chunked_sigmoid_loss(*args, mesh, ids=ids, axes=parallel.BATCH_AXES)
            else:
                value = losses.sigmoid_loss(*args, ids=ids)
            parts = {"sigmoid_loss": value}
            if "id" in names:
                parts["id_loss"] = losses.id_loss(outputs["image_logits"], outputs["text_logits"], batch["pids"])
            return sum(parts.values()), parts

        return loss

    def pretrained(self, model, config) -> dict | None:
        """{"base_model": SigLIP params (numpy, with logit_scale / logit_bias)} from the HF folder."""
        init = config.model.get("init_checkpoint")
        if not init:
            return None
        from xmr_jax.convert.siglip import check_siglip_params, load_hf_siglip

        base = model.base_model
        _, params = load_hf_siglip(init, image_size=tuple(config.data.image_size))
        check_siglip_params(params, base, what=f"config.model.init_checkpoint={init}")
        return {"base_model": params}

    def text(self, config) -> families.TextSpec:
        tok = config.model.get("tokenizer", "clip_bpe")
        if tok == "clip_bpe":
            return families.CLIP_TEXT
        return families.TextSpec(f"hf:{os.path.abspath(tok)}", lambda n: HFTokenizer(tok, n),
                                 lambda n: HFTokenizer(tok, n).pad_caption())

    def images(self, config) -> families.ImageSpec:
        return families.RGB_IMAGES

    def complete_config(self, config, train_meta) -> None:
        if "id" in parse_loss_names(config.loss_names) and config.num_classes <= 0:
            config.num_classes = train_meta.num_classes


def _batch_mesh(mesh_shape):
    """The mesh the chunked loss runs on: the one in context (`jax.set_mesh`) when it has the batch
    axes, else the trainer's (`parallel.make_mesh(data, fsdp)` over all devices); None on one device."""
    from xmr_jax import parallel

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.shape for a in parallel.BATCH_AXES):
        if jax.device_count() == 1:
            return None
        mesh = parallel.make_mesh(*mesh_shape)
    return mesh if mesh.size > 1 else None


class HFTokenizer:
    """A tokenizer folder read by transformers' AutoTokenizer from local files only.

    encode(list[str]) -> int32 [N, context_length], padded (and truncated) to the full context."""

    def __init__(self, folder: str, context_length: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.context_length = int(context_length)

    def encode(self, captions) -> np.ndarray:
        out = self.tok(list(captions), padding="max_length", truncation=True, max_length=self.context_length)
        return np.asarray(out["input_ids"], np.int32).reshape(len(captions), self.context_length)

    def pad_caption(self) -> np.ndarray:
        return self.encode([""])[0]


FAMILY = SiglipFamily()
