"""The image gallery index: encode a folder of images, the .npz file format, the model check.

Index (one .npz file, written to exactly the given path; read with `load_index`):
    global   float32 [N, D]     image global features (unnormalized, as the encoder returns them)
    tokens   float16 [N, L, D]  image token features (absent with --no_tokens)
    mask     bool    [N, L]     content-token mask (False for CLS)
    paths    str     [N]        image paths relative to the image folder (posix, sorted)
    meta     str (json)         format, version, image root, model description (fields + weight
                                fingerprint), num_images, with_tokens, skipped, created

Images go through `xmr_jax.image_transform.load_image`, the evaluation transform of
data_pipelines/preprocess.py without TensorFlow (PIL bilinear resize, antialiased when shrinking,
as IRRA's torchvision transform; then CLIP normalization).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import jax.numpy as jnp
import numpy as np

from xmr_jax.search.encoders import Encoders, as_encoders
from xmr_jax.search.errors import IndexMismatchError, SearchError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
INDEX_FORMAT = "xmr_jax.search.index"
INDEX_VERSION = 1


def list_images(folder: str) -> list[str]:
    """Relative posix paths of every jpg/jpeg/png/webp under `folder` (recursive), sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist (expected a folder of "
                                f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files)")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    if not found:
        raise SearchError(f"image folder {folder!r} holds no images (looked recursively for "
                          f"{', '.join(IMAGE_EXTENSIONS)} files)")
    return sorted(found)


def load_image(path: str, size: Sequence[int]) -> np.ndarray:
    """Decode an image file -> normalized float32 [H, W, 3] (the test transform,
    `xmr_jax.image_transform.load_image`). Raises SearchError naming the path when the file
    cannot be decoded."""
    from xmr_jax import image_transform

    try:
        return image_transform.load_image(path, size)
    except image_transform.ImageDecodeError as e:
        raise SearchError(str(e)) from e



@dataclasses.dataclass
class ImageIndex:
    """Encoded image gallery. global_features f32 [N, D]; tokens f16 [N, L, D] | None;
    mask bool [N, L] | None; paths: N relative paths; meta: image_root, model, skipped, ..."""

    global_features: np.ndarray
    tokens: Optional[np.ndarray]
    mask: Optional[np.ndarray]
    paths: list[str]
    meta: dict

    @property
    def has_tokens(self) -> bool:
        return self.tokens is not None

    @property
    def image_root(self) -> str:
        return self.meta.get("image_root", "")

    def __len__(self) -> int:
        return len(self.paths)


def build_index(model, params, image_paths: Sequence[str], image_root: str | None = None, *,
                batch_size: int = 64, with_tokens: bool = True, skip_bad_images: bool = False,
                num_workers: int | None = None, log: Callable[[str], None] | None = None) -> ImageIndex:
    """Encodes images into an ImageIndex.

    Args:
      model, params: a CLIP module and its params, or an `Encoders` as `model` (params ignored).
      image_paths: paths relative to `image_root` (or absolute / cwd-relative when it is None).
      batch_size: images per jitted call; the last batch is padded (one compiled shape).
      with_tokens: also store token features (float16) + mask for two-stage search.
      skip_bad_images: skip undecodable files (counted, listed in meta["skipped"]) instead of
        raising SearchError naming the first one.
      num_workers: decoding threads (default min(8, cpus)).
    """
    enc = as_encoders(model, params)
    if batch_size < 1:
        raise SearchError(f"batch_size must be >= 1, got {batch_size}")
    if not image_paths:
        raise SearchError("build_index: no image paths given")
    h, w = enc.image_size
    full = [os.path.join(image_root, p) if image_root else p for p in image_paths]
    n = len(full)
    glob = np.zeros((n, enc.embed_dim), np.float32)
    toks = mask = None
    kept, skipped, pos = [], [], 0
    workers = num_workers or min(8, os.cpu_count() or 1)
    start = time.time()

    def decode(path):
        try:
            return load_image(path, (h, w))
        except SearchError:
            if not skip_bad_images:
                raise
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for b0 in range(0, n, batch_size):
            chunk = list(range(b0, min(n, b0 + batch_size)))
            images = list(pool.map(decode, [full[i] for i in chunk]))
            good = [i for i, im in zip(chunk, images) if im is not None]
            skipped += [image_paths[i] for i, im in zip(chunk, images) if im is None]
            if not good:
                continue
            batch = np.zeros((batch_size, h, w, 3), np.float32)
            batch[:len(good)] = np.stack([im for im in images if im is not None])
            g, t, m = enc.encode_image(batch)
            m_good = len(good)
            glob[pos:pos + m_good] = np.asarray(g[:m_good], np.float32)
            if with_tokens:
                if t is None or m is None:
                    raise SearchError("the image encoder returns no token features/mask; index with "
                                      "--no_tokens (global search only)")
                if toks is None:
                    toks = np.zeros((n,) + tuple(t.shape[1:]), np.float16)
                    mask = np.zeros((n,) + tuple(m.shape[1:]), bool)
                toks[pos:pos + m_good] = np.asarray(jnp.asarray(t[:m_good]).astype(jnp.float16))
                mask[pos:pos + m_good] = np.asarray(m[:m_good], bool)
            kept += [image_paths[i] for i in good]
            pos += m_good
            if log is not None:
                done = chunk[-1] + 1
                rate = done / max(time.time() - start, 1e-9)
                log(f"[index] {done}/{n} images ({rate:.1f} img/s, ETA {(n - done) / rate:.0f} s)")
    if not kept:
        raise SearchError(f"none of the {n} images could be decoded (first: {image_paths[0]!r})")
    meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION,
            "image_root": os.path.abspath(image_root) if image_root else "",
            "model": enc.description, "num_images": pos, "with_tokens": bool(with_tokens),
            "skipped": skipped, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return ImageIndex(glob[:pos], None if toks is None else toks[:pos],
                      None if mask is None else mask[:pos], kept, meta)


def save_index(index: ImageIndex, path: str) -> str:
    """Writes `index` as an (uncompressed) .npz at exactly `path` (local or gs://...); returns path."""
    from xmr_jax.logging_utils import as_path

    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"global": index.global_features, "paths": np.asarray(index.paths, dtype=str),
              "meta": np.asarray(json.dumps(index.meta))}
    if index.tokens is not None:
        arrays.update(tokens=index.tokens, mask=index.mask)
    with target.open("wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_index(path: str) -> ImageIndex:
    """Reads an index written by `save_index` / `python -m xmr_jax.search index` (local or gs://).

    Raises FileNotFoundError when `path` does not exist, SearchError naming it when it is a folder
    or not an index.
    """
    from xmr_jax.logging_utils import as_path, is_uri

    target = as_path(path)
    if target.is_dir():
        raise SearchError(f"index {path!r} is a folder; expected the .npz file written by "
                          "`python -m xmr_jax.search index ... --index PATH`")
    if not (target.is_file() if is_uri(path) else os.path.isfile(path)):
        raise FileNotFoundError(f"index file {path!r} does not exist (write one with "
                                "`python -m xmr_jax.search index ... --index PATH`)")
    not_index = (f"{path!r} is not a search index (expected the .npz file written by "
                 "`python -m xmr_jax.search index`, holding global/paths/meta)")
    try:
        source = io.BytesIO(target.read_bytes()) if is_uri(path) else path
        loaded = np.load(source, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            data = None  # a bare .npy array
        else:
            with loaded as z:
                data = {k: z[k] for k in z.files}
    except ValueError as e:  # neither .npz nor .npy: numpy's message is about pickles
        raise SearchError(f"{not_index}: not an .npz file") from e
    except OSError as e:
        raise SearchError(f"{not_index}: {e}") from e
    if data is None:
        raise SearchError(f"{not_index}: it holds a single .npy array")
    missing = [k for k in ("global", "paths", "meta") if k not in data]
    if missing:
        raise SearchError(f"{not_index}: it lacks {missing}")
    try:
        meta = json.loads(str(data["meta"]))
    except ValueError as e:
        raise SearchError(f"{not_index}: its meta is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise SearchError(f"{path!r}: meta format is {got!r}, expected {INDEX_FORMAT!r}")
    return ImageIndex(data["global"], data.get("tokens"), data.get("mask"),
                      [str(p) for p in data["paths"]], meta)


def check_compatible(index: ImageIndex, enc: Encoders, allow_other_weights: bool = False) -> None:
    """Raises IndexMismatchError when `enc` is not the model the index was built with."""
    built = index.meta.get("model", {})
    mine = enc.description
    src = f"index built from {built.get('source')!r}, querying with {mine.get('source')!r}"
    for key in ("embed_dim", "image_size"):
        if list(np.atleast_1d(built.get(key))) != list(np.atleast_1d(mine.get(key))):
            raise IndexMismatchError(
                f"the index was made with a different model: {key} {built.get(key)} (index) vs "
                f"{mine.get(key)} (query model); {src}. Rebuild the index with this model.")
    fa, fb = str(built.get("fingerprint", "")), str(mine.get("fingerprint", ""))
    same_kind = fa.split(":")[0] == fb.split(":")[0]
    if same_kind and fa and fa != fb and not allow_other_weights:
        raise IndexMismatchError(
            f"the index was made with different weights: fingerprint {fa} (index) vs {fb} (query "
            f"model); {src}. Rebuild the index, or pass --allow_other_weights.")

