"""The evaluation image transform on the host (NumPy + PIL), and the CLIP pixel constants.

IRRA's test transform (torchvision on a PIL image): decode to RGB -> `T.Resize((H, W))`, i.e.
PIL's bilinear resize, which antialiases when shrinking (its triangle filter widens with the scale
factor) -> /255 -> (x - CLIP_MEAN) / CLIP_STD.

This module is the one home of that rule outside TensorFlow: the search CLI encodes its gallery
with `load_image`, and `data_pipelines/preprocess.py` (the tf.data twin: decode, then
`tf.image.resize(bilinear, antialias=True)`) takes CLIP_MEAN / CLIP_STD from here. It imports
NumPy and PIL only (no TensorFlow, no JAX).

One deliberate detail: PIL resizes each channel as a float image (mode "F") here, so the result is
not rounded to uint8 the way torchvision's PIL path rounds it. The tf.data pipeline does not round
either; the host transform therefore equals the training/evaluation transform to float precision
(~0.004 grey levels measured), and both stay within one grey level of IRRA's rounded PIL output.
JPEGs are decoded by libjpeg with the accurate integer DCT here and in the tf.data pipeline (PIL's
default), so decoding agrees bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(ValueError):
    """An image file cannot be read or decoded; the message names the path."""


def normalize(pixels: np.ndarray) -> np.ndarray:
    """float [..., 3] in 0..255 -> (x / 255 - CLIP_MEAN) / CLIP_STD, float32 [..., 3].

    Computed as one multiply-add, x * (1 / (255 std)) - mean / std, with the same float32 constants
    as data_pipelines.preprocess.normalize.
    """
    scale = np.array([1.0 / (255.0 * s) for s in CLIP_STD], np.float32)
    offset = np.array([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], np.float32)
    return np.asarray(pixels, np.float32) * scale + offset


def resize(rgb: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """PIL bilinear resize (antialiased when shrinking) without rounding.

    Args:
      rgb: uint8 (or float in 0..255) [h, w, C].
      size: (H, W) of the output.
    Returns:
      float32 [H, W, C] in pixel units (0..255).
    """
    from PIL import Image

    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"resize: size must be a positive (H, W), got {tuple(size)}")
    img = np.asarray(rgb)
    if img.ndim != 3:
        raise ValueError(f"resize: expected an [h, w, C] image, got shape {img.shape}")
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32))  # mode "F"
                   .resize((width, height), Image.Resampling.BILINEAR), np.float32)
        for c in range(img.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """Image file -> uint8 [h, w, 3] RGB (PIL's convert("RGB"), as IRRA reads images).

    Raises ImageDecodeError naming the path when the file is missing or cannot be decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ImageDecodeError(f"cannot decode image {os.fspath(path)!r}: {e}") from e


def eval_transform(rgb: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The test transform on decoded pixels: uint8 [h, w, 3] -> normalized float32 [H, W, 3]."""
    return normalize(resize(rgb, size))


def load_image(path: str | os.PathLike, size: Sequence[int]) -> np.ndarray:
    """Image file -> normalized float32 [H, W, 3] (decode, resize to size=(H, W), normalize).

    Raises ImageDecodeError naming the path when the file cannot be decoded.
    """
    return eval_transform(decode_rgb(path), size)
