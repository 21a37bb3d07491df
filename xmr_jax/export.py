"""Serving export of a model's two encoders: jax.export (StableHLO), TF SavedModel, Hugging Face.

Every format exports `encode_image` and `encode_text` with a symbolic (dynamic) batch dimension
`b`. Their inputs are the model's (`Servable.inputs`, from the family's `image_inputs` /
`text_inputs` and `Family.serving_shapes`):

  CLIP towers (a bare `xmr_jax.models.clip.CLIP`; the irra / tgdt / siglip workdirs export their
  CLIP towers):
    encode_image: images float32 [b, H, W, 3] (NHWC, already normalized)
        -> {"global": f32 [b, D], "tokens": f32 [b, 1 + N_patches, D], "mask": bool [b, 1 + N_patches]}
    encode_text: token_ids int32 [b, context_length=77] (IRRA's CLIP BPE)
        -> {"global": f32 [b, D], "tokens": f32 [b, 77, D], "mask": bool [b, 77]}
  tgdt_regions (TGDT as published, `xmr_jax.models.tgdt_regions`), the evaluation token set
  (`family.eval_model`: config.model.eval_token_set, "test" = stage-1 tokens):
    encode_image: regions float32 [b, n, R], boxes float32 [b, n, 4] (x1/w, y1/h, x2/w, y2/h;
        n symbolic too, 36 in TERAN's features)
        -> {"global": f32 [b, E], "tokens": f32 [b, n + 1, E], "mask": bool [b, n + 1]}
    encode_text: token_ids int32 [b, config.data.context_length] (BERT WordPiece, [CLS] ... [SEP], 0 = pad)
        -> {"global": f32 [b, E], "tokens": f32 [b, T, E], "mask": bool [b, T]}

Outputs are exactly what `model.apply(..., method="encode_image"/"encode_text")` returns, named;
"mask" is included when the model returns one (the content-token mask used for local similarity:
image False for CLS, text True for word tokens only). Global features are NOT normalized.
Float outputs are cast to float32 even when the model computes in bfloat16.

Formats (sub-folders of the CLI's --out):
    jax/        `image_encoder.jax_exported`, `text_encoder.jax_exported` (jax.export bytes) and
                `jax_export.json`: each encoder's inputs (names in call order, shapes with the
                symbolic dims, dtypes) and outputs, platforms, model fields, the family, the
                token set and the text scheme (`text`: tokenizer and, for WordPiece, the
                `vocab.txt` copied next to it). Default: parameters baked in as constants
                (self-contained, call `exported.call(*inputs)`); `params_as_argument=True` exports
                `f(params, *inputs)` and writes `params.msgpack`. Load with `load_exported` /
                `load_exported_encoders`.
    saved_model/  TF SavedModel (orbax-export, jax2tf native serialization) with signatures
                `encode_image` and `encode_text` whose inputs carry the names above ("images",
                "regions" + "boxes", "token_ids"); parameters are non-trainable tf.Variables.
                TensorFlow is imported lazily.
    hf/         transformers CLIPModel folder (`xmr_jax.convert.hf.to_hf_clip`; CLIP towers only).

CLI:
    python -m xmr_jax.export --checkpoint WORKDIR_OR_PARAMS [--config configs/x.py[:args]] \
        --out DIR --formats jax,savedmodel,hf [--platforms cpu,cuda,tpu] [--params_as_argument]

--checkpoint: a training workdir (its config.json, or --config, says the model: `model.clip` ->
the CLIP towers, else the family `model_family` builds), a `python -m xmr_jax.convert` folder, a
HF CLIPModel folder, an OpenAI CLIP file, or, with --config of a family that imports one (e.g.
configs/tgdt/flickr30k_regions.py:vocab=...), that family's reference checkpoint file (TGDT's
model_best_rsum.pth.tar, `Family.import_checkpoint`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_FILE = "image_encoder.jax_exported"
TEXT_FILE = "text_encoder.jax_exported"
META_FILE = "jax_export.json"
PARAMS_FILE = "params.msgpack"
VOCAB_FILE = "vocab.txt"
SAVED_MODEL_DIR = "saved_model"
HF_DIR = "hf"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
FORMATS = ("jax", "savedmodel", "hf")
_FORMAT_DIRS = {"jax": "jax", "savedmodel": SAVED_MODEL_DIR, "hf": HF_DIR}
_OUTPUT_NAMES = ("global", "tokens", "mask")


class ExportError(ValueError):
    """Bad export input (checkpoint, config, shape or format) with a message naming it."""


# ----------------------------------------------------------------------------- encoder functions


def _named_outputs(outputs) -> dict[str, jax.Array]:
    """(global, tokens[, mask]) -> {"global", "tokens"[, "mask"]}; float outputs cast to f32."""
    if not isinstance(outputs, (tuple, list)) or len(outputs) not in (2, 3):
        raise ExportError(
            "expected the encoder to return (global [B,D], tokens [B,L,D][, mask [B,L]]), got "
            f"{type(outputs).__name__}")
    named = {}
    for name, value in zip(_OUTPUT_NAMES, outputs):
        value = jnp.asarray(value)
        named[name] = value.astype(jnp.float32) if jnp.issubdtype(value.dtype, jnp.floating) else value
    return named


def encoder_fns(model, inputs: "EncoderInputs | None" = None) -> dict[str, Callable[..., dict[str, jax.Array]]]:
    """{"encode_image": f(params, *image inputs), "encode_text": f(params, *text inputs)} -> named
    outputs; the inputs in `inputs[method]` order (default: one array each, as CLIP takes)."""

    def fn(method):
        def encode(params, *xs):
            return _named_outputs(model.apply({"params": params}, *xs, method=method))
        return encode

    return {method: fn(method) for method in ("encode_image", "encode_text")}


def _resolve_image_shape(model, image_shape) -> tuple[int, int]:
    if image_shape is None:
        image_shape = getattr(model, "image_size", None)
    if image_shape is None:
        raise ExportError("image_shape=(H, W) is required: the model has no `image_size` field")
    if isinstance(image_shape, int):
        image_shape = (image_shape, image_shape)
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 2 or min(image_shape) <= 0:
        raise ExportError(f"image_shape must be (H, W) with positive ints, got {image_shape}")
    model_size = getattr(model, "image_size", None)
    if isinstance(model_size, int):
        model_size = (model_size, model_size)
    if model_size is not None and tuple(model_size) != image_shape:
        raise ExportError(
            f"image_shape {image_shape} differs from the model's image_size {tuple(model_size)}: "
            "the positional embedding is sized for the latter; build the model at the wanted size "
            "(e.g. xmr_jax.convert.load_clip(path, image_size=(H, W))) and export that")
    patch = getattr(model, "patch_size", None)
    if patch and (image_shape[0] % patch or image_shape[1] % patch):
        raise ExportError(
            f"image_shape {image_shape} is not divisible by the model's patch_size {patch}")
    return image_shape


@dataclasses.dataclass(frozen=True)
class EncoderInput:
    """One input of an exported encoder: its name, shape (the batch dim "b" first; any other str
    is a symbolic dim shared by the encoder's inputs, e.g. "n" regions) and dtype name."""

    name: str
    shape: tuple
    dtype: str

    def json(self) -> dict[str, Any]:
        return {"shape": _shape_json(self.shape), "dtype": self.dtype}


EncoderInputs = dict  # "encode_image" / "encode_text" -> tuple[EncoderInput, ...] in call order
_EXPORTED_NAMES = {"text_ids": "token_ids"}  # batch key -> exported input name (where they differ)


def clip_inputs(model, image_shape: Sequence[int] | None = None) -> EncoderInputs:
    """CLIP's inputs: images float32 [b, H, W, 3] (default model.image_size), token_ids int32
    [b, model.context_length]."""
    h, w = _resolve_image_shape(model, image_shape)
    context = int(getattr(model, "context_length", 77))
    return {"encode_image": (EncoderInput("images", ("b", h, w, 3), "float32"),),
            "encode_text": (EncoderInput("token_ids", ("b", context), "int32"),)}


def family_inputs(family, model, config) -> EncoderInputs:
    """A family's inputs: its image_inputs / text_inputs keys with `family.serving_shapes(model,
    config)` behind a symbolic batch dim "b" (the text ids are exported as "token_ids")."""
    shapes = family.serving_shapes(model, config)

    def inputs(keys):
        return tuple(EncoderInput(_EXPORTED_NAMES.get(k, k), ("b", *shapes[k][0]), shapes[k][1]) for k in keys)

    return {"encode_image": inputs(family.image_inputs), "encode_text": inputs(family.text_inputs)}


@dataclasses.dataclass(frozen=True)
class Servable:
    """What an export writes and a search encodes with.

    model: the module whose encode_image / encode_text are exported (a family's `eval_model`,
      float32); params: its parameters (the dict under "params"); inputs: `EncoderInputs`;
    text: the families.TextSpec that makes encode_text's token ids; family: the
      config.model_family it was built from ("" when unknown, e.g. a converted CLIP)."""

    model: Any
    params: Any
    inputs: EncoderInputs
    text: Any
    family: str = ""

    @property
    def context_length(self) -> int:
        return int(self.inputs["encode_text"][0].shape[1])


def as_servable(model, params=None, image_shape: Sequence[int] | None = None, family: str = "") -> Servable:
    """`model` itself when it is a Servable, else the CLIP module `model` with `params`, its
    `clip_inputs` and the CLIP BPE text scheme."""
    if isinstance(model, Servable):
        return model
    from xmr_jax.models.families import CLIP_TEXT

    return Servable(model, params, clip_inputs(model, image_shape), CLIP_TEXT, family)


def _input_specs(inputs: EncoderInputs) -> dict[str, tuple[jax.ShapeDtypeStruct, ...]]:
    """Symbolic ShapeDtypeStructs per encoder (one symbolic scope per encoder: its inputs share "b")."""
    specs = {}
    for method, items in inputs.items():
        scope = jax.export.SymbolicScope()
        specs[method] = tuple(
            jax.ShapeDtypeStruct(jax.export.symbolic_shape(", ".join(map(str, i.shape)), scope=scope),
                                 jnp.dtype(i.dtype)) for i in items)
    return specs


def _shape_json(shape) -> list:
    return [d if isinstance(d, int) else str(d) for d in shape]


def _model_fields(model) -> dict[str, Any]:
    """JSON-able dataclass fields of the module (for the metadata file)."""
    fields = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        value = getattr(model, f.name, None)
        if isinstance(value, (bool, int, float, str)) or value is None:
            fields[f.name] = value
        elif isinstance(value, (tuple, list)):
            fields[f.name] = list(value)
        else:
            fields[f.name] = str(getattr(value, "__name__", value))
    return fields


# ----------------------------------------------------------------------------- jax.export


def _text_meta(servable: Servable, out) -> dict[str, Any]:
    """{"tokenizer": scheme, "context_length": T[, "vocab_file": "vocab.txt"]}; a WordPiece vocab is
    copied into `out` so the folder is self-contained."""
    from xmr_jax.logging_utils import as_path

    text = {"tokenizer": servable.text.name.split(":")[0], "context_length": servable.context_length}
    if servable.text.vocab_file:
        (out / VOCAB_FILE).write_text(as_path(servable.text.vocab_file).read_text())
        text["vocab_file"] = VOCAB_FILE
    return text


def export_jax(model, params, out_dir: str, image_shape: Sequence[int] | None = None, *,
               platforms: Sequence[str] | None = DEFAULT_PLATFORMS,
               params_as_argument: bool = False) -> dict[str, Any]:
    """Serializes encode_image / encode_text with jax.export and a symbolic batch dim `b`.

    Args:
        model: a `Servable` (params then unused), or a CLIP module (anything with
            `encode_image(images)` / `encode_text(token_ids)` and an `image_size`).
        params: the CLIP module's parameters (the dict under "params").
        out_dir: folder to write into (created).
        image_shape: (H, W) of a CLIP module's image input; default `model.image_size`.
        platforms: lowering platforms (one artifact runs on all of them); None = current backend.
        params_as_argument: False (default) bakes params into the artifacts as constants, so
            `exported.call(*inputs)`; True exports `f(params, *inputs)` and writes `params.msgpack`.

    Returns:
        the metadata dict also written to `out_dir/jax_export.json`.
    """
    from xmr_jax.logging_utils import as_path

    served = as_servable(model, params, image_shape)
    out = as_path(out_dir)  # local or gs:// (etils.epath)
    out.mkdir(parents=True, exist_ok=True)
    fns = encoder_fns(served.model)
    specs = _input_specs(served.inputs)
    params_spec = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), p.dtype), served.params)
    meta: dict[str, Any] = {
        "format": "jax.export",
        "jax_version": jax.__version__,
        "params": "argument" if params_as_argument else "constants",
        "platforms": list(platforms) if platforms else [jax.default_backend()],
        "family": served.family or None,
        "token_set": getattr(served.model, "token_set", None),
        "model": _model_fields(served.model),
        "text": _text_meta(served, out),
    }
    for method, filename in (("encode_image", IMAGE_FILE), ("encode_text", TEXT_FILE)):
        fn = fns[method]
        if params_as_argument:
            exported = jax.export.export(jax.jit(fn), platforms=platforms)(params_spec, *specs[method])
        else:  # params closed over: baked into the StableHLO as constants
            bound = jax.jit(lambda *xs, fn=fn: fn(served.params, *xs))
            exported = jax.export.export(bound, platforms=platforms)(*specs[method])
        (out / filename).write_bytes(bytes(exported.serialize()))
        out_tree = jax.tree.unflatten(exported.out_tree, list(exported.out_avals))
        meta[method] = {
            "file": filename,
            "calling_convention_version": exported.calling_convention_version,
            "inputs": {i.name: i.json() for i in served.inputs[method]},
            "outputs": {k: {"shape": _shape_json(v.shape), "dtype": str(v.dtype)}
                        for k, v in out_tree.items()},
        }
    if params_as_argument:
        from flax import serialization
        (out / PARAMS_FILE).write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, served.params)))
        meta["params_file"] = PARAMS_FILE
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def load_exported(path: str) -> jax.export.Exported:
    """Deserializes one `*.jax_exported` file; call it with `exported.call(*inputs)` (or `(params, *inputs)`)."""
    from xmr_jax.logging_utils import as_path

    if not as_path(path).is_file():
        raise FileNotFoundError(f"no jax.export artifact at {path!r} (expected e.g. {IMAGE_FILE})")
    return jax.export.deserialize(bytearray(as_path(path).read_bytes()))


def load_exported_encoders(out_dir: str) -> tuple[Callable, Callable, dict[str, Any]]:
    """(encode_image(*image inputs), encode_text(token_ids), metadata) from an `export_jax` folder;
    the inputs in the order of metadata[method]["inputs"] (CLIP: images; tgdt_regions: regions, boxes).

    When the artifacts take params as an argument, `params.msgpack` is loaded and bound.
    """
    from xmr_jax.logging_utils import as_path

    folder = as_path(out_dir)
    if not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"{out_dir!r} is not a jax export folder: {META_FILE} is missing")
    meta = json.loads((folder / META_FILE).read_text())
    image = load_exported(str(folder / meta["encode_image"]["file"]))
    text = load_exported(str(folder / meta["encode_text"]["file"]))
    if meta["params"] == "argument":
        from flax import serialization
        params = serialization.msgpack_restore((folder / meta["params_file"]).read_bytes())
        return (lambda *xs: image.call(params, *xs)), (lambda *xs: text.call(params, *xs)), meta
    return image.call, text.call, meta


def exported_text_spec(out_dir: str, meta: Mapping[str, Any]):
    """The families.TextSpec of an export folder's `text` metadata (CLIP BPE when absent: folders
    written before it was recorded)."""
    from xmr_jax.logging_utils import as_path, is_uri
    from xmr_jax.models.families import CLIP_TEXT, text_spec

    text = meta.get("text") or {"tokenizer": CLIP_TEXT.name}
    vocab = text.get("vocab_file", "")
    if vocab:
        vocab = as_path(out_dir) / vocab
        if is_uri(str(vocab)):  # the tokenizer reads a local file
            import tempfile

            local = os.path.join(tempfile.mkdtemp(prefix="xmr_vocab_"), VOCAB_FILE)
            with open(local, "w", encoding="utf-8") as fh:
                fh.write(vocab.read_text())
            vocab = local
    return text_spec(text["tokenizer"], str(vocab) if vocab else "")


# ----------------------------------------------------------------------------- TF SavedModel


def export_saved_model(model, params, out_dir: str, image_shape: Sequence[int] | None = None, *,
                       platforms: Sequence[str] | None = DEFAULT_PLATFORMS) -> str:
    """Writes a TF SavedModel with `encode_image` / `encode_text` signatures (dynamic batch).

    Built with orbax-export (jax2tf native serialization, polymorphic shapes as the inputs'
    symbolic dims); params become non-trainable variables. model / params / image_shape as
    `export_jax`. Signature inputs: the encoders' inputs by name (CLIP: `images` float32
    [None, H, W, 3], `token_ids` int32 [None, 77]; tgdt_regions: `regions` [None, None, R],
    `boxes` [None, None, 4], `token_ids` [None, T]); outputs: "global", "tokens"[, "mask"] as
    in the module docstring.

    Returns:
        out_dir. TensorFlow and orbax-export are imported here only.
    """
    try:
        import tensorflow as tf
        from orbax import export as obx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'savedmodel' export needs tensorflow and orbax-export "
            f"(pip install tensorflow-cpu orbax-export): {e}") from e
    served = as_servable(model, params, image_shape)
    fns = encoder_fns(served.model)
    # orbax's JaxModule passes one argument: the signature's inputs as a dict by name
    by_name = {m: (lambda p, x, m=m: fns[m](p, *(x[i.name] for i in served.inputs[m]))) for m in fns}
    jax2tf_kwargs = {"native_serialization_platforms": tuple(platforms)} if platforms else {}
    module = obx.JaxModule(
        served.params, by_name, trainable=False,
        input_polymorphic_shape={m: {i.name: ", ".join(map(str, i.shape)) for i in served.inputs[m]}
                                 for m in fns},
        jax2tf_kwargs={m: dict(jax2tf_kwargs) for m in fns})
    serving_configs = [
        obx.ServingConfig(
            signature_key=m, method_key=m,
            input_signature=[{i.name: tf.TensorSpec([d if isinstance(d, int) else None for d in i.shape],
                                                    tf.as_dtype(i.dtype), name=i.name)
                              for i in served.inputs[m]}])
        for m in fns]
    obx.ExportManager(module, serving_configs).save(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- Hugging Face


def to_hf_clip(model, params, out_dir: str):
    """Writes a transformers CLIPModel folder (delegates to `xmr_jax.convert.hf.to_hf_clip`)."""
    try:
        from xmr_jax.convert.hf import to_hf_clip as _to_hf_clip
    except ImportError as e:
        raise ImportError(
            f"the 'hf' export needs xmr_jax.convert.hf.to_hf_clip (and torch/transformers): {e}") from e
    return _to_hf_clip(model, params, out_dir)


# ----------------------------------------------------------------------------- checkpoint loading


def _find_clip_params(tree: Any, where: str) -> Mapping[str, Any]:
    """The first sub-dict (breadth first) holding both a `visual` and a `text` tower."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            if "visual" in node and "text" in node:
                return node
            queue.extend(node.values())
    raise ExportError(
        f"{where}: found no CLIP parameters (a dict with 'visual' and 'text' sub-trees); "
        f"top-level keys: {sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__}")


def load_params_for_export(path: str, step: int | None = None) -> Mapping[str, Any]:
    """CLIP params (the dual-encoder sub-tree) from a training checkpoint, as host numpy arrays.

    Reads only the `params` of the train state (`xmr_jax.checkpoints.load_params`, host=True:
    no optimizer state, no device placement, so a checkpoint written on any mesh loads on one
    CPU). The family model keeps the CLIP towers under `params["base_model"]` (IRRA; TGDT
    likewise); rather than hard-coding the key, the first sub-tree of `params` holding both
    `visual` and `text` is returned, so a bare CLIP train state works too.

    Args:
      path: a training workdir, its checkpoints folder, or one step folder (--checkpoint).
      step: which step; default the newest.
    Returns:
      {"visual": ..., "text": ...} float32 numpy params for `xmr_jax.models.clip.CLIP`.
    """
    from xmr_jax import checkpoints

    params, step = checkpoints.load_params(path, step, host=True, flag="--checkpoint")
    return _find_clip_params(params, f"--checkpoint={path} (step {step})")


def _workdir_of(checkpoint: str) -> str:
    """The training workdir of a checkpoint path (a workdir, its checkpoints folder or one step
    folder): where its config.json lives."""
    from xmr_jax import checkpoints
    from xmr_jax.logging_utils import as_path, path_str

    step_dir, _ = checkpoints.find_checkpoint(checkpoint, flag="--checkpoint")
    return path_str(as_path(step_dir).parent.parent)


def load_servable(checkpoint: str, config_spec: str | None = None) -> Servable:
    """The Servable (model, params, inputs, text scheme, family) the export CLI and
    `xmr_jax.search` use.

    checkpoint: a training checkpoint (a workdir, its checkpoints folder or one step folder; the
      model comes from --config or else the workdir's config.json: its `model.clip` gives the CLIP
      towers (`load_params_for_export`), otherwise its `model_family` builds the family's
      `eval_model`, e.g. tgdt_regions with its evaluation token set); with a --config of a family
      that imports reference checkpoints (`Family.import_checkpoint`, e.g. TGDT's .pth.tar), such
      a file; else anything `xmr_jax.convert.load_clip` reads: a folder written by
      `python -m xmr_jax.convert` (xmr_clip.json + params.msgpack or checkpoints/0/), its
      params.msgpack file, a Hugging Face CLIPModel folder, an OpenAI CLIP file.
    config_spec: `configs/x.py[:args]`.
    The model computes in float32 (the training precision is not applied to the export).
    """
    from xmr_jax.logging_utils import as_path

    if not as_path(checkpoint).exists():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint!r} does not exist (expected a training workdir, a folder "
            "written by `python -m xmr_jax.convert`, a HF CLIPModel folder, an OpenAI CLIP file, or "
            "with --config a family's reference checkpoint such as TGDT's .pth.tar)")
    from xmr_jax import checkpoints
    from xmr_jax.convert import META_FILE as CONVERTED_META

    if checkpoints.is_checkpoint_path(checkpoint) and not (as_path(checkpoint) / CONVERTED_META).is_file():
        config, where = _read_config(config_spec, _workdir_of(checkpoint))
        if "clip" in config.get("model", {}):
            model = _clip_model(config.model.clip, where)
            return as_servable(model, load_params_for_export(checkpoint), family=config.get("model_family", ""))
        params, step = checkpoints.load_params(checkpoint, host=True, flag="--checkpoint")
        return _family_servable(config, where, params, f"--checkpoint={checkpoint} (step {step})")
    if config_spec:
        config = _load_config_file(config_spec)
        if "clip" not in config.get("model", {}):
            return _family_servable(config, f"--config {config_spec}", checkpoint, None)
    from xmr_jax.convert import load_clip

    if os.path.basename(checkpoint) == PARAMS_FILE:
        checkpoint = os.path.dirname(checkpoint) or "."
    return as_servable(*load_clip(checkpoint))


def load_for_export(checkpoint: str, config_spec: str | None = None):
    """(model, params) of `load_servable(checkpoint, config_spec)`."""
    served = load_servable(checkpoint, config_spec)
    return served.model, served.params


def _family_servable(config, where: str, params_or_file, params_where: str | None) -> Servable:
    """A family's Servable: float32 `family.eval_model` with `params_or_file` (a params tree read
    from `params_where`, checked against the model), or a reference checkpoint file the family
    imports (`import_checkpoint`) when params_where is None."""
    from xmr_jax.models import families

    family_name = config.get("model_family") or ""
    if not family_name:
        raise ExportError(f"{where}: neither model.clip nor model_family is set; cannot tell which model to export")
    try:
        family = families.get_family(family_name)
        config = _float32(config)
        if params_where is None:
            model, params = family.import_checkpoint(params_or_file, config)
        else:
            model, params = family.build(config), params_or_file
            _check_params(model, family.init_batch(config), params, f"{params_where} vs the model of {where}")
        return Servable(family.eval_model(model, config), params, family_inputs(family, model, config),
                        family.text(config), family.name)
    except (KeyError, AttributeError) as e:
        raise ExportError(f"{where}: model_family {family_name!r}: the config lacks {e}") from e


def _float32(config):
    """A copy of the config with precision float32 (an export computes in float32)."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
    config.precision = "float32"
    return config


def _check_params(model, init_batch: Mapping[str, Any], params, where: str) -> None:
    """ExportError naming the first parameter whose path or shape differs from `model`'s."""
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), init_batch))["params"]
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ExportError(f"{where}: parameter {key} has shape {got.get(key, 'missing')} in the checkpoint, "
                              f"the model expects {want.get(key, 'none')}; pass the --config it was trained with")


# ----------------------------------------------------------------------------- CLI


def _load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_xmr_export_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ExportError(f"--config {path!r} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _read_config(config_spec: str | None, workdir: str):
    """(ConfigDict, where) from --config, else `<workdir>/config.json`."""
    import ml_collections

    from xmr_jax.logging_utils import as_path

    if config_spec:
        return _load_config_file(config_spec), f"--config {config_spec}"
    cfg_json = str(as_path(workdir) / "config.json")
    if not as_path(cfg_json).is_file():
        raise ExportError(
            f"cannot tell which model {workdir!r} holds: it has no config.json; pass --config "
            "(the configs/*.py file it was trained with)")
    cfg = json.loads(as_path(cfg_json).read_text())
    if not isinstance(cfg, dict):
        raise ExportError(f"{cfg_json} holds no config object")
    return ml_collections.ConfigDict(cfg), cfg_json


def _clip_model(clip_cfg, where: str):
    """CLIP (float32) from a `model.clip` section."""
    from xmr_jax.models import clip as clip_lib

    clip_cfg = dict(clip_cfg.to_dict() if hasattr(clip_cfg, "to_dict") else clip_cfg)
    clip_cfg.pop("dtype", None)
    try:
        return clip_lib.clip_from_config(clip_cfg)
    except ValueError as e:
        raise ExportError(f"{where}: model.clip: {e}") from e


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m xmr_jax.export", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training workdir, `python -m xmr_jax.convert` output folder (or its "
                        "params.msgpack), HF CLIPModel folder, OpenAI CLIP file, or with --config a "
                        "family's reference checkpoint (TGDT's .pth.tar)")
    p.add_argument("--config", default=None,
                   help="configs/x.py[:arg] describing the model: its model.clip, else its model_family "
                        "(default for a workdir: WORKDIR/config.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--formats", default="jax,savedmodel",
                   help=f"comma-separated subset of {','.join(FORMATS)} (default jax,savedmodel)")
    p.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                   help="lowering platforms for jax/savedmodel (default cpu,cuda,tpu)")
    p.add_argument("--params_as_argument", action="store_true",
                   help="jax format: keep params as an argument (params.msgpack) instead of constants")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise ExportError(f"--formats {args.formats!r}: unknown {bad}; choose from {FORMATS}")
    platforms = tuple(s.strip() for s in args.platforms.split(",") if s.strip()) or None
    served = load_servable(args.checkpoint, args.config)
    from xmr_jax.logging_utils import as_path, is_uri
    from xmr_jax.models.clip import CLIP

    if "hf" in formats and not isinstance(served.model, CLIP):
        raise ExportError(f"--formats {args.formats!r}: hf writes a transformers CLIPModel, and the "
                          f"{served.family or type(served.model).__name__} model has no CLIP towers; use --formats jax,savedmodel")
    if "hf" in formats and is_uri(args.out):
        raise ExportError(f"--out {args.out!r}: the hf format is written with transformers' save_pretrained, "
                          "local folders only; export hf to a local folder and copy it")
    out = as_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        if fmt == "jax":
            export_jax(served, None, str(out / "jax"), platforms=platforms,
                       params_as_argument=args.params_as_argument)
        elif fmt == "savedmodel":
            export_saved_model(served, None, str(out / SAVED_MODEL_DIR), platforms=platforms)
        else:
            to_hf_clip(served.model, served.params, str(out / HF_DIR))
        print(f"[export] wrote {fmt} -> {out / _FORMAT_DIRS[fmt]}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, ImportError) as err:  # ExportError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
