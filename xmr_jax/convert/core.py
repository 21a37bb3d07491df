"""Checkpoint conversion machinery shared by the OpenAI and Hugging Face importers.

A conversion is a table of `Entry`s: one source (PyTorch) key with its expected shape, mapped to one
or more destination paths in our param tree, each with a transform `kind`:

  "id"      copy as is
  "T"       transpose a 2-D Linear weight [out, in] -> Dense kernel [in, out]
  "conv"    Conv2d weight (O, I, kh, kw) -> Flax kernel (kh, kw, I, O)
  ("qkv_w", j) / ("qkv_b", j)   slice j (0=q, 1=k, 2=v) of a packed in_proj weight [3w, w] (then T)
                                or bias [3w]

`apply_table` checks missing keys, unexpected keys and shapes and raises `CheckpointMismatchError`
(a ValueError) naming the key and both shapes. Also: torch-free loading of .safetensors, lazy torch
loading of .pt/.pth/.bin, and parameter-tree checks against a model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from xmr_jax.convert.posembed import resize_positional_embedding
from xmr_jax.models.clip import CLIP, clip_param_shapes
from xmr_jax.models.layers import stack_resblocks, unstack_resblocks
from xmr_jax.models.vit import as_hw, grid_size


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the expected architecture (missing/unexpected key, bad shape)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    src: str
    shape: tuple
    targets: tuple  # ((path tuple, kind), ...)


def to_numpy(value) -> np.ndarray:
    """torch.Tensor / jax / numpy array -> float32 (or integer) numpy array on host."""
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    arr = np.asarray(value)
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    return arr


def _transform(arr: np.ndarray, kind) -> np.ndarray:
    if kind == "id":
        return arr
    if kind == "T":
        return arr.T
    if kind == "conv":
        return arr.transpose(2, 3, 1, 0)
    name, j = kind
    w = arr.shape[0] // 3
    if name == "qkv_w":
        return arr[j * w:(j + 1) * w].T
    if name == "qkv_b":
        return arr[j * w:(j + 1) * w]
    raise ValueError(f"unknown transform {kind!r}")


def inverse_transform(arr: np.ndarray, kind) -> np.ndarray:
    """Inverse of a one-to-one transform kind ("id", "T", "conv")."""
    if kind == "id":
        return arr
    if kind == "T":
        return arr.T
    if kind == "conv":
        return arr.transpose(3, 2, 0, 1)
    raise ValueError(f"transform {kind!r} has no one-to-one inverse")


def _set(tree: dict, path: Sequence[str], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _fmt_keys(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def apply_table(state_dict: Mapping[str, Any], table: Iterable[Entry], *, prefix: str = "",
                ignore: Callable[[str], bool] = lambda k: False, what: str = "checkpoint",
                strict: bool = True) -> dict:
    """Convert `state_dict` (keys `prefix + entry.src`) to a nested numpy param dict.

    Keys outside `prefix` are skipped; keys inside it that no entry uses and `ignore(key)` rejects
    are unexpected (error when strict). Raises CheckpointMismatchError on missing keys, unexpected
    keys, or a shape mismatch (naming key, expected shape and actual shape).
    """
    table = list(table)
    keys = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
    needed = {e.src for e in table}
    missing = [e for e in table if e.src not in keys]
    if missing:
        details = "; ".join(f"{prefix}{e.src} (expected shape {e.shape})" for e in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointMismatchError(f"{what}: missing key(s): {details}{more}")
    if strict:
        unexpected = sorted(k for k in keys if k not in needed and not ignore(k))
        if unexpected:
            details = "; ".join(f"{prefix}{k} (shape {tuple(np.shape(state_dict[keys[k]]))})"
                                for k in unexpected[:8])
            more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
            raise CheckpointMismatchError(
                f"{what}: unexpected key(s) not used by the model: {details}{more} "
                f"(wrong architecture or wrong checkpoint format?)")
    params: dict = {}
    for e in table:
        value = state_dict[keys[e.src]]
        shape = tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))
        if shape != tuple(e.shape):
            raise CheckpointMismatchError(
                f"{what}: key '{prefix}{e.src}' has the wrong shape: expected {tuple(e.shape)}, got {shape}")
        arr = to_numpy(value)
        for path, kind in e.targets:
            _set(params, path, np.ascontiguousarray(_transform(arr, kind)).astype(np.float32))
    return params


def check_params(params, model: CLIP, what: str = "params") -> None:
    """Raise CheckpointMismatchError unless `params` has exactly the tree and shapes `model` expects."""
    expected = flatten(clip_param_shapes(model))
    got = flatten(params)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        raise CheckpointMismatchError(
            f"{what}: missing parameter(s) {_fmt_keys(['/'.join(p) for p in missing])} for {_describe(model)}")
    if unexpected:
        raise CheckpointMismatchError(
            f"{what}: unexpected parameter(s) {_fmt_keys(['/'.join(p) for p in unexpected])} for {_describe(model)}")
    for path, spec in expected.items():
        if tuple(np.shape(got[path])) != tuple(spec.shape):
            raise CheckpointMismatchError(
                f"{what}: parameter '{'/'.join(path)}' has the wrong shape: expected {tuple(spec.shape)}, "
                f"got {tuple(np.shape(got[path]))}")


def _describe(model: CLIP) -> str:
    f = model.fields()
    return (f"CLIP(vision {f['vision_width']}x{f['vision_layers']}, patch {f['patch_size']}, "
            f"image {f['image_size']}, text {f['text_width']}x{f['text_layers']}, embed {f['embed_dim']})")


def flatten(tree) -> dict:
    """Nested dict -> {path tuple: leaf}."""
    out = {}

    def rec(node, path):
        if hasattr(node, "items"):
            for k, v in node.items():
                rec(v, path + (str(k),))
        else:
            out[path] = node

    rec(tree, ())
    return out


def adapt_params(params: dict, source_image_size, model: CLIP) -> dict:
    """Make canonical (unstacked, numpy) params converted at `source_image_size` fit `model`:
    resize the image positional embedding to the model's grid and stack blocks if scan_layers."""
    params = unstack_resblocks(jax.tree.map(np.asarray, params))
    old_grid = grid_size(source_image_size, model.patch_size)
    new_grid = grid_size(model.image_size, model.patch_size)
    if old_grid != new_grid:
        visual = dict(params["visual"])
        visual["positional_embedding"] = resize_positional_embedding(
            visual["positional_embedding"], old_grid, new_grid)
        params = {**params, "visual": visual}
    if model.scan_layers:
        params = stack_resblocks(params)
    check_params(params, model)
    return params


def canonical_params(params: dict) -> dict:
    """Host numpy, unstacked (`resblocks_{i}`) copy of a param tree."""
    return unstack_resblocks(jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), params))


def square_grid(num_positions: int, key: str) -> int:
    """sqrt(num_positions - 1) for a square patch grid, else a clear error."""
    g = int(round((num_positions - 1) ** 0.5))
    if g * g != num_positions - 1:
        raise CheckpointMismatchError(
            f"'{key}' has {num_positions} rows = 1 + {num_positions - 1} patches, which is not a square "
            f"grid; pass the checkpoint's own image size (source_image_size=(H, W))")
    return g


def source_hw(num_positions: int, patch: int, key: str, source_image_size=None) -> tuple[int, int]:
    """Image size (H, W) that a checkpoint's positional embedding was trained for."""
    if source_image_size is not None:
        hw = as_hw(source_image_size)
        gh, gw = grid_size(hw, patch)
        if 1 + gh * gw != num_positions:
            raise CheckpointMismatchError(
                f"source_image_size {hw} with patch {patch} gives 1 + {gh}*{gw} positions but '{key}' "
                f"has {num_positions}")
        return hw
    g = square_grid(num_positions, key)
    return (g * patch, g * patch)


# ----------------------------------------------------------------------------------------------
# File loading


# open_clip's training checkpoints (epoch_N.pt): {"epoch", "name", "state_dict", "optimizer"[, "scaler"]}
_OPEN_CLIP_TRAINING_KEYS = {"epoch", "name", "state_dict", "optimizer", "scaler"}


def load_state_dict_file(path: str) -> dict:
    """Load a state dict from .safetensors (numpy, no torch) or .pt/.pth/.bin (TorchScript archive
    or pickled state dict, read with weights_only=True; needs torch). Wrappers {"state_dict": sd} /
    {"model": sd} (with up to two other entries) and open_clip training checkpoints are unwrapped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path} needs PyTorch (pip install 'xmr_jax[torch]'), or convert it to .safetensors") from e
    sd = None
    try:
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception:  # not a TorchScript archive: a pickled state dict
        sd = None
    if sd is None:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"could not read {path} as a TorchScript archive or a torch state dict: {e}") from e
    for wrapper in ("state_dict", "model"):
        if (isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping)
                and (len(sd) <= 3 or set(sd) <= _OPEN_CLIP_TRAINING_KEYS)):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of names to tensors), got {type(sd).__name__}")
    return dict(sd)
