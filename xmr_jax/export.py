"""Serving export of the CLIP encoders: jax.export (StableHLO), TF SavedModel, Hugging Face.

Every format exports the two encoders of a `xmr_jax.models.clip.CLIP` with a symbolic
(dynamic) batch dimension `b`:

    encode_image: images float32 [b, H, W, 3] (NHWC, already normalized)
        -> {"global": f32 [b, D], "tokens": f32 [b, 1 + N_patches, D], "mask": bool [b, 1 + N_patches]}
    encode_text: token_ids int32 [b, context_length=77]
        -> {"global": f32 [b, D], "tokens": f32 [b, 77, D], "mask": bool [b, 77]}

Outputs are exactly what `model.apply(..., method="encode_image"/"encode_text")` returns, named;
"mask" is included when the model returns one (the content-token mask used for local similarity:
image False for CLS, text True for word tokens only). Global features are NOT normalized.
Float outputs are cast to float32 even when the model computes in bfloat16.

Formats (sub-folders of the CLI's --out):
    jax/        `image_encoder.jax_exported`, `text_encoder.jax_exported` (jax.export bytes) and
                `jax_export.json` (input/output shapes with the symbolic dim, platforms, model
                fields). Default: parameters baked in as constants (self-contained, call
                `exported.call(x)`); `params_as_argument=True` exports `f(params, x)` and writes
                `params.msgpack`. Load with `load_exported` / `load_exported_encoders`.
    saved_model/  TF SavedModel (orbax-export, jax2tf native serialization) with signatures
                `encode_image` (input "images") and `encode_text` (input "token_ids");
                parameters are non-trainable tf.Variables. TensorFlow is imported lazily.
    hf/         transformers CLIPModel folder (`xmr_jax.convert.hf.to_hf_clip`).

CLI:
    python -m xmr_jax.export --checkpoint WORKDIR_OR_PARAMS [--config configs/x.py[:args]] \
        --out DIR --formats jax,savedmodel,hf [--platforms cpu,cuda,tpu] [--params_as_argument]
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


def encoder_fns(model) -> dict[str, Callable[[Any, jax.Array], dict[str, jax.Array]]]:
    """{"encode_image": f(params, images), "encode_text": f(params, token_ids)} -> named outputs."""

    def encode_image(params, images):
        return _named_outputs(model.apply({"params": params}, images, method="encode_image"))

    def encode_text(params, token_ids):
        return _named_outputs(model.apply({"params": params}, token_ids, method="encode_text"))

    return {"encode_image": encode_image, "encode_text": encode_text}


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


def _input_specs(model, image_shape, batch: str = "b"):
    """Symbolic input specs for the two encoders (one shared symbolic scope per encoder)."""
    h, w = image_shape
    context = int(getattr(model, "context_length", 77))
    image = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"{batch}, {h}, {w}, 3"), jnp.float32)
    text = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"{batch}, {context}"), jnp.int32)
    return {"encode_image": image, "encode_text": text}


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


def export_jax(model, params, out_dir: str, image_shape: Sequence[int] | None = None, *,
               platforms: Sequence[str] | None = DEFAULT_PLATFORMS,
               params_as_argument: bool = False) -> dict[str, Any]:
    """Serializes encode_image / encode_text with jax.export and a symbolic batch dim `b`.

    Args:
        model: a CLIP module (anything with `encode_image` / `encode_text` methods).
        params: its parameters (the dict under "params").
        out_dir: folder to write into (created).
        image_shape: (H, W) of the exported image input; default `model.image_size`.
        platforms: lowering platforms (one artifact runs on all of them); None = current backend.
        params_as_argument: False (default) bakes params into the artifacts as constants, so
            `exported.call(x)`; True exports `f(params, x)` and writes `params.msgpack` next to it.

    Returns:
        the metadata dict also written to `out_dir/jax_export.json`.
    """
    from xmr_jax.logging_utils import as_path

    image_shape = _resolve_image_shape(model, image_shape)
    out = as_path(out_dir)  # local or gs:// (etils.epath)
    out.mkdir(parents=True, exist_ok=True)
    fns = encoder_fns(model)
    specs = _input_specs(model, image_shape)
    params_spec = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), p.dtype), params)
    meta: dict[str, Any] = {
        "format": "jax.export",
        "jax_version": jax.__version__,
        "params": "argument" if params_as_argument else "constants",
        "platforms": list(platforms) if platforms else [jax.default_backend()],
        "model": _model_fields(model),
    }
    for method, filename, input_name in (("encode_image", IMAGE_FILE, "images"),
                                         ("encode_text", TEXT_FILE, "token_ids")):
        fn = fns[method]
        if params_as_argument:
            exported = jax.export.export(jax.jit(fn), platforms=platforms)(params_spec, specs[method])
        else:  # params closed over: baked into the StableHLO as constants
            bound = jax.jit(lambda x, fn=fn: fn(params, x))
            exported = jax.export.export(bound, platforms=platforms)(specs[method])
        (out / filename).write_bytes(bytes(exported.serialize()))
        out_tree = jax.tree.unflatten(exported.out_tree, list(exported.out_avals))
        meta[method] = {
            "file": filename,
            "calling_convention_version": exported.calling_convention_version,
            "inputs": {input_name: {"shape": _shape_json(specs[method].shape),
                                    "dtype": str(specs[method].dtype)}},
            "outputs": {k: {"shape": _shape_json(v.shape), "dtype": str(v.dtype)}
                        for k, v in out_tree.items()},
        }
    if params_as_argument:
        from flax import serialization
        (out / PARAMS_FILE).write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
        meta["params_file"] = PARAMS_FILE
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def load_exported(path: str) -> jax.export.Exported:
    """Deserializes one `*.jax_exported` file; call it with `exported.call(x)` (or `(params, x)`)."""
    from xmr_jax.logging_utils import as_path

    if not as_path(path).is_file():
        raise FileNotFoundError(f"no jax.export artifact at {path!r} (expected e.g. {IMAGE_FILE})")
    return jax.export.deserialize(bytearray(as_path(path).read_bytes()))


def load_exported_encoders(out_dir: str) -> tuple[Callable, Callable, dict[str, Any]]:
    """(encode_image(images), encode_text(token_ids), metadata) from an `export_jax` folder.

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
        return (lambda x: image.call(params, x)), (lambda x: text.call(params, x)), meta
    return image.call, text.call, meta


# ----------------------------------------------------------------------------- TF SavedModel


def export_saved_model(model, params, out_dir: str, image_shape: Sequence[int] | None = None, *,
                       platforms: Sequence[str] | None = DEFAULT_PLATFORMS) -> str:
    """Writes a TF SavedModel with `encode_image` / `encode_text` signatures (dynamic batch).

    Built with orbax-export (jax2tf native serialization, polymorphic shape "b, ..."); params
    become non-trainable variables. Signature inputs: `images` float32 [None, H, W, 3] and
    `token_ids` int32 [None, 77]; outputs: "global", "tokens"[, "mask"] as in the module docstring.

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
    image_shape = _resolve_image_shape(model, image_shape)
    context = int(getattr(model, "context_length", 77))
    fns = encoder_fns(model)
    jax2tf_kwargs = {"native_serialization_platforms": tuple(platforms)} if platforms else {}
    module = obx.JaxModule(
        params, fns, trainable=False,
        input_polymorphic_shape={"encode_image": "b, ...", "encode_text": "b, ..."},
        jax2tf_kwargs={"encode_image": dict(jax2tf_kwargs), "encode_text": dict(jax2tf_kwargs)})
    serving_configs = [
        obx.ServingConfig(
            signature_key="encode_image", method_key="encode_image",
            input_signature=[tf.TensorSpec([None, *image_shape, 3], tf.float32, name="images")]),
        obx.ServingConfig(
            signature_key="encode_text", method_key="encode_text",
            input_signature=[tf.TensorSpec([None, context], tf.int32, name="token_ids")]),
    ]
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


def load_for_export(checkpoint: str, config_spec: str | None = None):
    """(CLIP model, params) for the export CLI.

    checkpoint: a training checkpoint (a workdir, its checkpoints folder or one step folder, see
      `load_params_for_export`; the model comes from --config or else the workdir's config.json
      `model.clip`), or anything `xmr_jax.convert.load_clip`
      reads: a folder written by `python -m xmr_jax.convert` (xmr_clip.json + params.msgpack or
      checkpoints/0/), its params.msgpack file, a Hugging Face CLIPModel folder, an OpenAI CLIP file.
    config_spec: `configs/x.py[:args]`; its `model.clip` builds the model for a workdir.
    The model computes in float32 (the training precision is not applied to the export).
    """
    from xmr_jax.logging_utils import as_path

    if not as_path(checkpoint).exists():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint!r} does not exist (expected a training workdir, a folder "
            "written by `python -m xmr_jax.convert`, a HF CLIPModel folder or an OpenAI CLIP file)")
    from xmr_jax import checkpoints
    from xmr_jax.convert import META_FILE as CONVERTED_META

    if checkpoints.is_checkpoint_path(checkpoint) and not (as_path(checkpoint) / CONVERTED_META).is_file():
        params = load_params_for_export(checkpoint)
        model = build_model(config_spec, _workdir_of(checkpoint))
        return model, params
    from xmr_jax.convert import load_clip

    if os.path.basename(checkpoint) == PARAMS_FILE:
        checkpoint = os.path.dirname(checkpoint) or "."
    model, params = load_clip(checkpoint)
    return model, params


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


def build_model(config_spec: str | None, workdir: str):
    """CLIP (float32) from --config's `model.clip`, else `<workdir>/config.json`'s `model.clip`."""
    from xmr_jax.models import clip as clip_lib
    if config_spec:
        config = _load_config_file(config_spec)
        if "model" not in config or "clip" not in config.model:
            raise ExportError(f"--config {config_spec!r} has no model.clip section")
        clip_cfg, where = config.model.clip, f"--config {config_spec}"
    else:
        from xmr_jax.logging_utils import as_path

        cfg_json = str(as_path(workdir) / "config.json")
        if not as_path(cfg_json).is_file():
            raise ExportError(
                f"cannot tell which model {workdir!r} holds: it has no config.json; pass --config "
                "(the configs/*.py file it was trained with)")
        cfg = json.loads(as_path(cfg_json).read_text())
        try:
            clip_cfg, where = cfg["model"]["clip"], cfg_json
        except (KeyError, TypeError) as e:
            raise ExportError(f"{cfg_json} has no model.clip section") from e
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
                        "params.msgpack), HF CLIPModel folder, or OpenAI CLIP file")
    p.add_argument("--config", default=None,
                   help="configs/x.py[:arg] whose model.clip describes a workdir's model "
                        "(default: WORKDIR/config.json)")
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
    model, params = load_for_export(args.checkpoint, args.config)
    image_shape = _resolve_image_shape(model, None)
    from xmr_jax.logging_utils import as_path, is_uri

    if "hf" in formats and is_uri(args.out):
        raise ExportError(f"--out {args.out!r}: the hf format is written with transformers' save_pretrained, "
                          "local folders only; export hf to a local folder and copy it")
    out = as_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        if fmt == "jax":
            export_jax(model, params, str(out / "jax"), image_shape, platforms=platforms,
                       params_as_argument=args.params_as_argument)
        elif fmt == "savedmodel":
            export_saved_model(model, params, str(out / SAVED_MODEL_DIR), image_shape,
                               platforms=platforms)
        else:
            to_hf_clip(model, params, str(out / HF_DIR))
        print(f"[export] wrote {fmt} -> {out / _FORMAT_DIRS[fmt]}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, ImportError) as err:  # ExportError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
