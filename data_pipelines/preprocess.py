"""tf.data image and text ops: decode, IRRA train/test transforms, MLM masking.

All randomness is stateless: every random op takes a `seed` int32/int64 [2] tensor, so a sample's
augmentation depends only on (base seed, its position in the stream), never on thread scheduling.

IRRA train transform (torchvision on PIL images), on one image:
  decode (JPEGs with libjpeg's accurate integer DCT, as PIL decodes them) -> resize to (H, W) as
  PIL's bilinear filter does, antialiased when shrinking (tf.image.resize(bilinear, antialias=True):
  within one grey level of PIL on every size tested; values stay float, not rounded to uint8 as PIL
  would) -> horizontal flip p=0.5 -> zero-pad 10 px each side -> random HxW crop (offsets uniform in
  0..20) -> /255 -> (x - CLIP_MEAN) / CLIP_STD -> random erasing (p=0.5, area 2%-40%, log-uniform
  aspect 0.3-3.3, up to 10 attempts, torchvision's rules; fill = CLIP_MEAN per channel, in
  normalized space as IRRA does).
Test transform: decode -> resize -> /255 -> normalize. Its NumPy/PIL twin for host-side code (the
search CLI) and the CLIP constants live in xmr_jax.image_transform (no TensorFlow there).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

try:  # the accelerators belong to JAX
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialized or no GPU support: nothing to hide
    pass

from xmr_jax.image_transform import CLIP_MEAN, CLIP_STD  # noqa: E402  (the one copy)

PAD = 10
ERASE_PROB = 0.5
ERASE_SCALE = (0.02, 0.4)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10

# Number of independent stateless seeds one training sample uses (see train_sample_seeds).
_NUM_SAMPLE_SEEDS = 5


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG/... bytes (scalar string) -> uint8 [H, W, 3].

    JPEGs use the accurate integer DCT (PIL's default, so IRRA's): tf.io.decode_image's default
    (the fast DCT) is off by up to 15 grey levels on sharp edges.
    """
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, size: tuple[int, int], antialias: bool = True) -> tf.Tensor:
    """Bilinear resize to size=(H, W); uint8 or float [h, w, 3] -> float32 [H, W, 3] in pixel units.

    antialias=True (the default, used by both transforms) is PIL's bilinear filter: widened by the
    scale factor along an axis that shrinks (tf.image.resize(antialias=True)). When neither axis
    shrinks the filter is plain bilinear with half-pixel centres, and the faster
    tf.image.resize(antialias=False) computes the same values (within 0.01 grey levels; exactly the
    input at the same size). antialias=False always samples only the 2x2 nearest pixels (not what
    IRRA does when shrinking).
    """
    pixels = tf.cast(image, tf.float32)
    plain = lambda: tf.image.resize(pixels, size, method="bilinear", antialias=False)
    if antialias:
        shape = tf.shape(pixels)
        enlarges = (shape[0] <= size[0]) & (shape[1] <= size[1])
        out = tf.cond(enlarges, plain,
                      lambda: tf.image.resize(pixels, size, method="bilinear", antialias=True))
    else:
        out = plain()
    return tf.ensure_shape(out, [size[0], size[1], 3])


def normalize(image: tf.Tensor) -> tf.Tensor:
    """float [..., 3] in 0..255 -> (x / 255 - CLIP_MEAN) / CLIP_STD."""
    # One fused multiply-add: x * (1 / (255 std)) - mean / std.
    scale = tf.constant([1.0 / (255.0 * s) for s in CLIP_STD], tf.float32)
    offset = tf.constant([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], tf.float32)
    return tf.cast(image, tf.float32) * scale + offset


def pad_and_crop(image: tf.Tensor, offset_y, offset_x, pad: int = PAD) -> tf.Tensor:
    """Zero-pads `pad` px on every side, then crops the original size at (offset_y, offset_x)."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.slice(padded, tf.stack([offset_y, offset_x, 0]), tf.stack([height, width, 3]))


def random_pad_crop(image: tf.Tensor, seed: tf.Tensor, pad: int = PAD) -> tf.Tensor:
    """torchvision Pad(pad) + RandomCrop(original size): offsets uniform in [0, 2*pad]."""
    offsets = tf.random.stateless_uniform([2], seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    out = pad_and_crop(image, offsets[0], offsets[1], pad)
    return tf.ensure_shape(out, image.shape)


def erasing_box(height, width, uniforms: tf.Tensor, scale=ERASE_SCALE, ratio=ERASE_RATIO):
    """torchvision RandomErasing's box from given draws.

    Args:
      height, width: image size (int or scalar int32 tensors).
      uniforms: float32 [attempts, 4] uniform [0, 1) draws; per attempt (area fraction, log aspect,
        top, left), as in torchvision's loop.
    Returns:
      (found bool, top, left, h, w) int32 scalars: the first attempt whose box fits
      (h < height and w < width); found=False (erase nothing) when none fits.
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    u = tf.cast(uniforms, tf.float64)  # float64 like torchvision's Python arithmetic
    area = tf.cast(height * width, tf.float64)
    frac = scale[0] + u[:, 0] * (scale[1] - scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    # Python's round() (used by torchvision) and tf.round both round half to even.
    h = tf.cast(tf.round(tf.sqrt(area * frac * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(area * frac / aspect)), tf.int32)
    fits = (h < height) & (w < width)
    k = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # first fitting attempt
    found = tf.reduce_any(fits)
    h_k, w_k = h[k], w[k]
    top = tf.cast(tf.floor(u[k, 2] * tf.cast(height - h_k + 1, tf.float64)), tf.int32)
    left = tf.cast(tf.floor(u[k, 3] * tf.cast(width - w_k + 1, tf.float64)), tf.int32)
    return found, top, left, h_k, w_k


def erase(image: tf.Tensor, top, left, h, w, value=CLIP_MEAN) -> tf.Tensor:
    """Sets image[top:top+h, left:left+w, c] = value[c] for float [H, W, 3]."""
    rows = tf.range(tf.shape(image)[0])
    cols = tf.range(tf.shape(image)[1])
    inside = ((rows >= top) & (rows < top + h))[:, None] & ((cols >= left) & (cols < left + w))[None, :]
    return tf.where(inside[:, :, None], tf.constant(value, image.dtype), image)  # broadcasts


def random_erase(image: tf.Tensor, seed: tf.Tensor, prob: float = ERASE_PROB, scale=ERASE_SCALE,
                 ratio=ERASE_RATIO, attempts: int = ERASE_ATTEMPTS, value=CLIP_MEAN) -> tf.Tensor:
    """torchvision RandomErasing(p=prob, scale, ratio, value=value) on a normalized float [H, W, 3] image."""
    draws = tf.random.stateless_uniform([attempts * 4 + 1], seed, dtype=tf.float32)
    apply = draws[0] < prob
    found, top, left, h, w = erasing_box(tf.shape(image)[0], tf.shape(image)[1],
                                         tf.reshape(draws[1:], [attempts, 4]), scale, ratio)
    return tf.cond(apply & found, lambda: erase(image, top, left, h, w, value), lambda: image)


def sample_seeds(base_seed: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """int64 [_NUM_SAMPLE_SEEDS, 2] seeds for the sample at `position` of a stream seeded by base_seed [2]."""
    seed = tf.random.experimental.stateless_fold_in(tf.cast(base_seed, tf.int64), tf.cast(position, tf.int64))
    return tf.random.experimental.stateless_split(seed, num=_NUM_SAMPLE_SEEDS)


def train_image(encoded: tf.Tensor, size: tuple[int, int], seeds: tf.Tensor, augment: bool = True,
                flip: bool | None = None) -> tf.Tensor:
    """IRRA train transform: encoded bytes -> normalized float32 [H, W, 3]; seeds: [>=3, 2].

    augment=True: flip, pad-crop, erase (module docstring). augment=False: resize + normalize, plus the random
    flip only when flip=True. flip=None follows augment.
    """
    image = resize(decode_image(encoded), size)
    if flip if flip is not None else augment:
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    if not augment:
        return normalize(image)
    image = random_pad_crop(image, seeds[1])
    return random_erase(normalize(image), seeds[2])


def eval_image(encoded: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Test transform: encoded bytes -> resize -> normalize, float32 [H, W, 3]."""
    return normalize(resize(decode_image(encoded), size))


def mlm_mask(token_ids: tf.Tensor, seed: tf.Tensor, mask_prob: float = 0.15):
    """IRRA MLM corruption (xmr_jax.tokenizer.apply_mlm_rule) with stateless draws.

    token_ids: int32 [L] (or [..., L]); seed: [2]. Returns (masked_ids, labels) int32, same shape.
    """
    import tensorflow.experimental.numpy as tnp

    from xmr_jax.tokenizer import MASK_ID, apply_mlm_rule

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    shape = tf.shape(token_ids)
    ids = tf.cast(token_ids, tf.int32)
    u_select = tf.random.stateless_uniform(shape, seeds[0], dtype=tf.float32)
    u_action = tf.random.stateless_uniform(shape, seeds[1], dtype=tf.float32)
    random_ids = tf.random.stateless_uniform(shape, seeds[2], minval=1, maxval=MASK_ID, dtype=tf.int32)
    masked, labels = apply_mlm_rule(ids, u_select, u_action, random_ids, mask_prob=mask_prob,
                                    mask_id=MASK_ID, vocab_limit=MASK_ID, xp=tnp)
    return tf.cast(masked, tf.int32), tf.cast(labels, tf.int32)
