"""The two encoders behind a search, whatever they were loaded from.

`Encoders` wraps a CLIP module + params or an `xmr_jax.export.Servable` of any family
(`model_encoders`; e.g. tgdt_regions: region features + BERT) or a `python -m xmr_jax.export
--formats jax` folder (`exported_encoders`) behind the same two jitted calls, plus the encoders'
inputs, the query tokenizer (the family's TextSpec) and the model description (fields, inputs,
weight fingerprint) an index records so a query can check it uses the same model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from xmr_jax.search.errors import SearchError


@dataclasses.dataclass
class Encoders:
    """The two encoders behind a search, whatever they were loaded from.

    encode_image: the image inputs, in `image_inputs` order, batch first (CLIP: images float32
      [B, H, W, 3]; tgdt_regions: regions float32 [B, N, R], boxes float32 [B, N, 4])
      -> (global [B, D] f32, tokens [B, L, D], mask [B, L] bool)
    encode_text:  int32 [B, context_length] -> (global [B, D], tokens [B, T, D], mask [B, T])
    image_size: (H, W) of a pixel model, None for region features.
    description:  JSON-able model description stored in the index (fields, encoder inputs, fingerprint).
    image_inputs: xmr_jax.export.EncoderInput of each image input (shape with the batch dim "b").
    text: the families.TextSpec whose tokenizer(context_length) makes the token ids.
    """

    encode_image: Callable
    encode_text: Callable
    image_size: tuple[int, int] | None
    context_length: int
    embed_dim: int
    description: dict
    image_inputs: tuple = ()
    text: Any = None

    @property
    def takes_regions(self) -> bool:
        """True when the image side is region features (regions + boxes), not pixels."""
        return [i.name for i in self.image_inputs] == ["regions", "boxes"]

    def tokenizer(self):
        """The query tokenizer: `encode(list[str])` -> int32 [Q, context_length], `count(text)` -> tokens."""
        return self.text.tokenizer(self.context_length)


def params_fingerprint(params) -> str:
    """'params:<hex>' hash of every parameter's path, shape and float32 bytes."""
    h = hashlib.blake2b(digest_size=12)
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return "params:" + h.hexdigest()


def _as_triple(out):
    if isinstance(out, Mapping):
        return out["global"], out["tokens"], out.get("mask")
    return tuple(out) + (None,) * (3 - len(out))


def _inputs_json(inputs) -> dict:
    """{method: {input name: shape}} of `xmr_jax.export.EncoderInputs` (the index records it)."""
    return {m: {i.name: list(i.json()["shape"]) for i in items} for m, items in inputs.items()}


def _encoders(img_fn, txt_fn, inputs, text, embed_dim: int, desc: dict) -> Encoders:
    """Encoders of two jitted functions of the inputs `inputs` (xmr_jax.export.EncoderInputs)."""
    image_inputs = tuple(inputs["encode_image"])
    sizes = [i.shape[1:3] for i in image_inputs if i.name == "images"]
    image_size = tuple(int(s) for s in sizes[0]) if sizes else None
    context = int(inputs["encode_text"][0].shape[1])
    desc = {**desc, "embed_dim": int(embed_dim), "image_size": list(image_size) if image_size else None,
            "inputs": _inputs_json(inputs)}
    return Encoders(lambda *xs: _as_triple(img_fn(*xs)), lambda x: _as_triple(txt_fn(x)), image_size,
                    context, int(embed_dim), desc, image_inputs, text)


def model_encoders(model, params=None, source: str | None = None) -> Encoders:
    """Encoders of a CLIP module + params or of an `xmr_jax.export.Servable` (params are an
    argument of the jitted functions)."""
    from xmr_jax.export import as_servable
    from xmr_jax.models.vit import as_hw

    served = as_servable(model, params)
    model, params = served.model, served.params
    img_fn = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs, method="encode_image"))
    txt_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text"))
    fields = {}
    if hasattr(model, "fields"):
        fields = {k: v for k, v in model.fields().items() if k not in ("dtype", "remat", "scan_layers")}
        if "image_size" in fields:
            fields["image_size"] = list(as_hw(fields["image_size"]))
    desc = {"kind": type(model).__name__, "source": source, "family": served.family or None, "fields": fields,
            "fingerprint": params_fingerprint(params)}
    return _encoders(lambda *xs: img_fn(params, *xs), lambda x: txt_fn(params, x), served.inputs, served.text,
                     model.embed_dim, desc)


def exported_encoders(folder: str) -> Encoders:
    """Encoders from a `python -m xmr_jax.export --formats jax` folder (the `jax/` sub-folder)."""
    from xmr_jax.export import META_FILE, EncoderInput, exported_text_spec, load_exported_encoders
    from xmr_jax.logging_utils import as_path, path_str

    if (as_path(folder) / "jax").is_dir() and not (as_path(folder) / META_FILE).is_file():
        folder = str(as_path(folder) / "jax")
    enc_img, enc_txt, meta = load_exported_encoders(folder)
    try:
        inputs = {m: tuple(EncoderInput(name, tuple(v["shape"]), v["dtype"])
                           for name, v in meta[m]["inputs"].items()) for m in ("encode_image", "encode_text")}
        embed_dim = int(meta["encode_image"]["outputs"]["global"]["shape"][1])
        text = exported_text_spec(folder, meta)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise SearchError(f"{folder}: jax_export.json lacks the encoder input/output shapes or text scheme ({e})") from e
    digest = hashlib.blake2b((as_path(folder) / meta["encode_image"]["file"]).read_bytes(),
                             digest_size=12).hexdigest()
    desc = {"kind": "jax.export", "source": path_str(folder), "family": meta.get("family"),
            "fields": meta.get("model", {}), "fingerprint": "exported:" + digest}
    return _encoders(jax.jit(enc_img), jax.jit(enc_txt), inputs, text, embed_dim, desc)


def as_encoders(model, params) -> Encoders:
    """`model` itself when it is an Encoders, else model_encoders(model, params)."""
    return model if isinstance(model, Encoders) else model_encoders(model, params)


def load_encoders(checkpoint: str | None = None, exported: str | None = None,
                  config: str | None = None) -> Encoders:
    """Encoders from exactly one of `checkpoint` (anything `xmr_jax.export.load_for_export` reads;
    `config` = configs/x.py[:arg] describing a workdir's model) or `exported` (a
    `python -m xmr_jax.export --formats jax` folder)."""
    if (checkpoint is None) == (exported is None):
        raise SearchError("give exactly one of --checkpoint and --exported")
    if exported:
        return exported_encoders(exported)
    from xmr_jax.export import load_servable
    from xmr_jax.logging_utils import path_str

    return model_encoders(load_servable(checkpoint, config), source=path_str(checkpoint))

