"""The image gallery index: encode a folder of images, the index formats, the model check.

Two formats, both read by `load_index`:

* format 2, an index folder written chunk by chunk by `write_index` (and by
  `python -m xmr_jax.search index`): global features, float16 token features + mask and paths in
  .npy/.json chunks on any etils.epath filesystem; resumable; searched with only the global
  features in memory. Layout and manifest: `xmr_jax.search.store`.
* format 1, one .npz file (`save_index` of an in-memory `ImageIndex` from `build_index`; what
  earlier versions of the CLI wrote), loaded whole into memory:
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
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import jax.numpy as jnp
import numpy as np

from xmr_jax.search.encoders import Encoders, as_encoders
from xmr_jax.search.errors import IndexMismatchError, SearchError
from xmr_jax.search.store import INDEX_FORMAT, IndexStore, IndexWriter, is_store

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
INDEX_VERSION = 1  # the .npz format; index folders are format STORE_VERSION (2)


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

    # The row access of IndexStore, so either can be searched chunk by chunk.
    def global_chunks(self) -> list[np.ndarray]:
        return [self.global_features]

    def global_rows(self, rows) -> np.ndarray:
        return np.asarray(self.global_features, np.float32)[np.asarray(rows, np.int64)]

    def token_rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        return self.tokens[rows], self.mask[rows]

    def paths_of(self, rows) -> list[str]:
        return [self.paths[int(r)] for r in np.asarray(rows).reshape(-1)]


@dataclasses.dataclass(frozen=True)
class Gallery:
    """What an index encodes, item by item.

    names: one name per item, stored in the index and printed in results (relative image paths;
      the image ids of region features); root: the folder recorded as the index's image_root;
    load(i) -> item i's encoder inputs without the batch dim, in `Encoders.image_inputs` order
      (images: float32 [H, W, 3]; regions: float32 [N, R], boxes float32 [N, 4]); raises
      SearchError naming the file when it cannot be read."""

    names: list[str]
    root: str
    load: Callable[[int], tuple[np.ndarray, ...]]


def image_gallery(enc: Encoders, image_paths: Sequence[str], image_root: Optional[str]) -> Gallery:
    """The images `image_paths` (relative to `image_root`, or absolute / cwd-relative when it is
    None) through the test transform at the model's (H, W)."""
    if enc.image_size is None:
        names = ", ".join(i.name for i in enc.image_inputs)
        raise SearchError(f"--images: the model takes {names}, not images; index region features with "
                          "--features (TERAN's layout)")
    full = _full_paths(image_paths, image_root)
    size = tuple(enc.image_size)
    return Gallery(list(image_paths), os.path.abspath(image_root) if image_root else "",
                   lambda i: (load_image(full[i], size),))


def _stack(items: list[tuple[np.ndarray, ...]], batch_size: int) -> list[np.ndarray]:
    """m items of k arrays -> k batches [batch_size, ...], rows m.. zero (one compiled shape)."""
    batches = []
    for j, first in enumerate(items[0]):
        batch = np.zeros((batch_size, *np.shape(first)), np.float32)
        batch[:len(items)] = np.stack([item[j] for item in items])
        batches.append(batch)
    return batches


def _encode_stream(enc: Encoders, gallery: Gallery, positions: Sequence[int], *, batch_size: int,
                   with_tokens: bool, skip_bad_images: bool, num_workers: Optional[int]):
    """Encodes the items `positions` of the gallery, batch by batch. Yields (loaded positions,
    unreadable positions, global f32 [m, D], tokens f16 [m, L, D] | None, mask [m, L] | None)."""
    if batch_size < 1:
        raise SearchError(f"batch_size must be >= 1, got {batch_size}")
    workers = num_workers or min(8, os.cpu_count() or 1)

    def load(i):
        try:
            return gallery.load(i)
        except SearchError:
            if not skip_bad_images:
                raise
            return None

    positions = list(positions)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for b0 in range(0, len(positions), batch_size):
            chunk = positions[b0:b0 + batch_size]
            items = list(pool.map(load, chunk))
            good = [i for i, item in zip(chunk, items) if item is not None]
            bad = [i for i, item in zip(chunk, items) if item is None]
            if not good:
                yield [], bad, None, None, None
                continue
            g, t, m = enc.encode_image(*_stack([item for item in items if item is not None], batch_size))
            m_good = len(good)
            toks = mask = None
            if with_tokens:
                if t is None or m is None:
                    raise SearchError("the image encoder returns no token features/mask; index with "
                                      "--no_tokens (global search only)")
                toks = np.asarray(jnp.asarray(t[:m_good]).astype(jnp.float16))
                mask = np.asarray(m[:m_good], bool)
            yield good, bad, np.asarray(g[:m_good], np.float32), toks, mask


def _full_paths(image_paths: Sequence[str], image_root: Optional[str]) -> list[str]:
    return [os.path.join(image_root, p) if image_root else p for p in image_paths]


def _encode_range(enc, gallery: Gallery, indices, on_batch, **stream_kwargs):
    """Encodes the items `indices` of `gallery` (`_encode_stream` with `stream_kwargs`); returns
    (global batches, token batches, mask batches, kept names, skipped names) over the readable
    items. on_batch(good, bad), if given, sees the item indices of every batch."""
    globs, toks, masks, kept, skipped = [], [], [], [], []
    for good, bad, g, t, m in _encode_stream(enc, gallery, indices, **stream_kwargs):
        skipped += [gallery.names[i] for i in bad]
        if good:
            globs.append(g)
            toks.append(t)
            masks.append(m)
            kept += [gallery.names[i] for i in good]
        if on_batch is not None:
            on_batch(good, bad)
    return globs, toks, masks, kept, skipped


def build_index(model, params, image_paths: Sequence[str], image_root: str | None = None, *,
                batch_size: int = 64, with_tokens: bool = True, skip_bad_images: bool = False,
                num_workers: int | None = None, log: Callable[[str], None] | None = None) -> ImageIndex:
    """Encodes images into an in-memory ImageIndex (small galleries; `write_index` streams a
    gallery of any size to an index folder).

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
    if not image_paths:
        raise SearchError("build_index: no image paths given")
    gallery = image_gallery(enc, image_paths, image_root)
    n = len(gallery.names)
    start = time.time()

    def report(good, bad):
        if log is not None:
            done = (good + bad)[-1] + 1
            rate = done / max(time.time() - start, 1e-9)
            log(f"[index] {done}/{n} images ({rate:.1f} img/s, ETA {(n - done) / rate:.0f} s)")

    globs, toks, masks, kept, skipped = _encode_range(
        enc, gallery, range(n), report, batch_size=batch_size, with_tokens=with_tokens,
        skip_bad_images=skip_bad_images, num_workers=num_workers)
    if not kept:
        raise SearchError(f"none of the {n} images could be decoded (first: {image_paths[0]!r})")
    meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "image_root": gallery.root,
            "model": enc.description, "num_images": len(kept), "with_tokens": bool(with_tokens),
            "skipped": skipped, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return ImageIndex(np.concatenate(globs), np.concatenate(toks) if with_tokens else None,
                      np.concatenate(masks) if with_tokens else None, kept, meta)


def write_index(model, params, image_paths: Sequence[str], image_root: str | None, path: str, *,
                chunk_size: int = 4096, batch_size: int = 64, with_tokens: bool = True,
                skip_bad_images: bool = False, num_workers: int | None = None,
                progress: bool = True, log: Callable[[str], None] | None = None) -> IndexStore:
    """Encodes images into an index folder (format 2, `xmr_jax.search.store`), chunk by chunk:
    `write_gallery` of `image_gallery(enc, image_paths, image_root)`; arguments as there."""
    enc = as_encoders(model, params)
    if not image_paths:
        raise SearchError("write_index: no image paths given")
    return write_gallery(enc, image_gallery(enc, image_paths, image_root), path, chunk_size=chunk_size,
                         batch_size=batch_size, with_tokens=with_tokens, skip_bad_images=skip_bad_images,
                         num_workers=num_workers, progress=progress, log=log)


def write_gallery(enc: Encoders, gallery: Gallery, path: str, *, chunk_size: int = 4096, batch_size: int = 64,
                  with_tokens: bool = True, skip_bad_images: bool = False, num_workers: int | None = None,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> IndexStore:
    """Encodes a Gallery (`image_gallery`, `xmr_jax.search.regions.region_gallery`) into an index
    folder (format 2, `xmr_jax.search.store`), chunk by chunk.

    Only one chunk of features is held in memory. Resumable: when `path` holds a partial index
    built with the same items, chunk size, model and options, only the chunks without a DONE
    marker are encoded (an interrupted chunk is redone). Arguments as `build_index`, plus
    chunk_size (items per chunk) and progress (a tqdm bar on stderr). Returns the opened
    IndexStore.
    """
    from xmr_jax.logging_utils import path_str

    if batch_size < 1:
        raise SearchError(f"batch_size must be >= 1, got {batch_size}")
    writer = IndexWriter(path, gallery.names, chunk_size, enc.embed_dim, with_tokens, enc.description,
                         gallery.root)
    pending = writer.pending()
    todo = sum(len(writer.chunk_range(c)) for c in pending)
    if log is not None and len(pending) < writer.num_chunks:
        log(f"[index] resuming {path_str(path)}: {writer.num_chunks - len(pending)} of "
            f"{writer.num_chunks} chunks already written, {todo} images left")
    bar = None
    total = len(gallery.names)
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=total - todo, unit="img", desc="[index]",
                   file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        for c in pending:
            globs, toks, masks, kept, skipped = _encode_range(
                enc, gallery, writer.chunk_range(c),
                (lambda good, bad: bar.update(len(good) + len(bad))) if bar is not None else None,
                batch_size=batch_size, with_tokens=with_tokens, skip_bad_images=skip_bad_images,
                num_workers=num_workers)
            d = enc.embed_dim
            g = np.concatenate(globs) if globs else np.zeros((0, d), np.float32)
            t = m = None
            if with_tokens:
                t = np.concatenate(toks) if toks else np.zeros((0, 0, d), np.float16)
                m = np.concatenate(masks) if masks else np.zeros((0, 0), bool)
            writer.write_chunk(c, g, t, m, kept, skipped)
    finally:
        if bar is not None:
            bar.close()
    writer.finish()
    return IndexStore(path)


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


def load_index(path: str):
    """Opens an index: an index folder (format 2, `write_index` / `python -m xmr_jax.search
    index`) -> IndexStore; a .npz file (format 1, `save_index`) -> ImageIndex, loaded whole.
    Local or gs:// (any etils.epath) paths.

    Raises FileNotFoundError when `path` does not exist, SearchError naming it when it is neither.
    """
    from xmr_jax.logging_utils import as_path, is_uri

    target = as_path(path)
    if target.is_dir():
        if is_store(path):
            return IndexStore(path)
        raise SearchError(f"index {path!r} is a folder without index.json: not a search index "
                          "(write one with `python -m xmr_jax.search index ... --index FOLDER`)")
    if not (target.is_file() if is_uri(path) else os.path.isfile(path)):
        raise FileNotFoundError(f"index {path!r} does not exist (write one with "
                                "`python -m xmr_jax.search index ... --index FOLDER`)")
    not_index = (f"{path!r} is not a search index (expected an index folder written by "
                 "`python -m xmr_jax.search index`, or a format-1 .npz holding global/paths/meta)")
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
    if meta.get("version") != INDEX_VERSION:
        raise SearchError(f"{path!r}: a .npz index of version {meta.get('version')!r} (this xmr_jax "
                          f"reads .npz version {INDEX_VERSION}); rebuild it with "
                          "`python -m xmr_jax.search index ... --index FOLDER`")
    return ImageIndex(data["global"], data.get("tokens"), data.get("mask"),
                      [str(p) for p in data["paths"]], meta)


def check_compatible(index, enc: Encoders, allow_other_weights: bool = False) -> None:
    """Raises IndexMismatchError when `enc` is not the model the index (ImageIndex or
    IndexStore) was built with."""
    built = index.meta.get("model", {})
    mine = enc.description
    src = f"index built from {built.get('source')!r}, querying with {mine.get('source')!r}"
    for key in ("embed_dim", "image_size", "inputs"):
        if key == "inputs" and not (built.get(key) and mine.get(key)):
            continue  # indexes written before the inputs were recorded: image_size says it
        if key == "inputs" and built[key] != mine[key] or \
                key != "inputs" and list(np.atleast_1d(built.get(key))) != list(np.atleast_1d(mine.get(key))):
            raise IndexMismatchError(
                f"the index was made with a different model: {key} {built.get(key)} (index) vs "
                f"{mine.get(key)} (query model); {src}. Rebuild the index with this model.")
    fa, fb = str(built.get("fingerprint", "")), str(mine.get("fingerprint", ""))
    same_kind = fa.split(":")[0] == fb.split(":")[0]
    if same_kind and fa and fa != fb and not allow_other_weights:
        raise IndexMismatchError(
            f"the index was made with different weights: fingerprint {fa} (index) vs {fb} (query "
            f"model); {src}. Rebuild the index, or pass --allow_other_weights.")

