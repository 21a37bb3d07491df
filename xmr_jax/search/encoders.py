"""The two encoders behind a search, whatever they were loaded from.

`Encoders` wraps a CLIP module + params (`model_encoders`) or a `python -m xmr_jax.export --formats
jax` folder (`exported_encoders`) behind the same two jitted calls, plus the model description
(fields + weight fingerprint) an index records so a query can check it uses the same model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping

import jax
import numpy as np

from xmr_jax.search.errors import SearchError


@dataclasses.dataclass
class Encoders:
    """The two encoders behind a search, whatever they were loaded from.

    encode_image: float32 [B, H, W, 3] -> (global [B, D] f32, tokens [B, L, D], mask [B, L] bool)
    encode_text:  int32 [B, context_length] -> (global [B, D], tokens [B, T, D], mask [B, T])
    description:  JSON-able model description stored in the index (fields + fingerprint).
    """

    encode_image: Callable
    encode_text: Callable
    image_size: tuple[int, int]
    context_length: int
    embed_dim: int
    description: dict


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


def model_encoders(model, params, source: str | None = None) -> Encoders:
    """Encoders of a CLIP module + params (params are an argument of the jitted functions)."""
    from xmr_jax.models.vit import as_hw

    img_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    txt_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text"))
    fields = {}
    if hasattr(model, "fields"):
        fields = {k: v for k, v in model.fields().items() if k not in ("dtype", "remat", "scan_layers")}
        fields["image_size"] = list(as_hw(fields["image_size"]))
    image_size = as_hw(model.image_size)
    desc = {"kind": type(model).__name__, "source": source, "fields": fields,
            "embed_dim": int(model.embed_dim), "image_size": list(image_size),
            "fingerprint": params_fingerprint(params)}
    return Encoders(lambda x: _as_triple(img_fn(params, x)), lambda x: _as_triple(txt_fn(params, x)),
                    image_size, int(getattr(model, "context_length", 77)), int(model.embed_dim), desc)


def exported_encoders(folder: str) -> Encoders:
    """Encoders from a `python -m xmr_jax.export --formats jax` folder (the `jax/` sub-folder)."""
    from xmr_jax.export import META_FILE, load_exported_encoders
    from xmr_jax.logging_utils import as_path, path_str

    if (as_path(folder) / "jax").is_dir() and not (as_path(folder) / META_FILE).is_file():
        folder = str(as_path(folder) / "jax")
    enc_img, enc_txt, meta = load_exported_encoders(folder)
    fields = meta.get("model", {})
    try:
        image_size = tuple(int(s) for s in meta["encode_image"]["inputs"]["images"]["shape"][1:3])
        context = int(meta["encode_text"]["inputs"]["token_ids"]["shape"][1])
        embed_dim = int(meta["encode_image"]["outputs"]["global"]["shape"][1])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise SearchError(f"{folder}: jax_export.json lacks the encoder input/output shapes ({e})") from e
    digest = hashlib.blake2b((as_path(folder) / meta["encode_image"]["file"]).read_bytes(),
                             digest_size=12).hexdigest()
    desc = {"kind": "jax.export", "source": path_str(folder), "fields": fields,
            "embed_dim": embed_dim, "image_size": list(image_size), "fingerprint": "exported:" + digest}
    img_fn, txt_fn = jax.jit(enc_img), jax.jit(enc_txt)
    return Encoders(lambda x: _as_triple(img_fn(x)), lambda x: _as_triple(txt_fn(x)),
                    image_size, context, embed_dim, desc)


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
    from xmr_jax.export import load_for_export
    from xmr_jax.logging_utils import path_str

    model, params = load_for_export(checkpoint, config)
    return model_encoders(model, params, source=path_str(checkpoint))

