"""Text-to-image search over a folder of images: build an index once, query it with free text.

    python -m xmr_jax.search index --checkpoint CKPT --images DIR --index gallery.npz
    python -m xmr_jax.search query --index gallery.npz --text "a woman in a red dress" \
        [--checkpoint CKPT] [--k 10] [--rerank_k 100] [--grid grid.png] [--ground_truth gt.json]

CKPT is anything `xmr_jax.export.load_for_export` reads (a training workdir with config.json, a
folder written by `python -m xmr_jax.convert`, a HF CLIPModel folder, an OpenAI CLIP file), or,
with `--exported DIR`, a `jax/` folder written by `python -m xmr_jax.export --formats jax`.

Image transform: `xmr_jax.image_transform` (= the evaluation transform of
data_pipelines/preprocess.py, without TensorFlow): RGB -> PIL bilinear resize to the model's (H, W),
antialiased when shrinking, as IRRA's torchvision transform -> (x / 255 - CLIP_MEAN) / CLIP_STD.

Index (one .npz file, written to exactly the given path; read with `load_index`):
    global   float32 [N, D]     image global features (unnormalized, as the encoder returns them)
    tokens   float16 [N, L, D]  image token features (absent with --no_tokens)
    mask     bool    [N, L]     content-token mask (False for CLS)
    paths    str     [N]        image paths relative to the image folder (posix, sorted)
    meta     str (json)         image root, model description (fields + weight fingerprint), ...

Query: captions are tokenized with IRRA's mask-variant CLIP tokenizer (context length from the
model), encoded, and searched with `xmr_jax.retrieval.topk_search`: two-stage (global top
`rerank_k`, reranked by s_g + s_l, SPEC 6) when the index holds tokens, else global cosine.
Printed per result: the rank, the score (s_g + s_l when reranked: it grows with the number of
query words, so compare it only within one query), the global cosine (comparable across queries)
and the path. A query longer than the context is cut: the CLI says how many tokens were kept.
Empty queries are rejected. --index, --grid, --ground_truth and --queries_file may be gs:// (or
any etils.epath) paths. Errors in user input exit with status 2 and a message naming the file or
parameter.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
INDEX_FORMAT = "xmr_jax.search.index"
INDEX_VERSION = 1
GREEN = (0, 170, 0)
GREY = (170, 170, 170)
WHITE = (255, 255, 255)


class SearchError(ValueError):
    """Bad search input (folder, image, index, query or ground truth) with a message naming it."""


class IndexMismatchError(SearchError):
    """The index was built with a different model than the one used to query it."""


# ----------------------------------------------------------------------------- images


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


# ----------------------------------------------------------------------------- encoders


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


def _encoders(model, params) -> Encoders:
    return model if isinstance(model, Encoders) else model_encoders(model, params)


# ----------------------------------------------------------------------------- index


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
    enc = _encoders(model, params)
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
    """Reads an index written by `save_index` / `python -m xmr_jax.search index` (local or gs://)."""
    from xmr_jax.logging_utils import as_path, is_uri

    if not (as_path(path).is_file() if is_uri(path) else os.path.isfile(path)):
        raise FileNotFoundError(f"index file {path!r} does not exist (write one with "
                                "`python -m xmr_jax.search index ... --index PATH`)")
    try:
        source = io.BytesIO(as_path(path).read_bytes()) if is_uri(path) else path
        with np.load(source, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise SearchError(f"{path!r} is not a search index (.npz with global/paths/meta): {e}") from e
    if meta.get("format") != INDEX_FORMAT:
        raise SearchError(f"{path!r}: meta format is {meta.get('format')!r}, expected {INDEX_FORMAT!r}")
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


# ----------------------------------------------------------------------------- search


@dataclasses.dataclass
class SearchResult:
    """indices int32 [Q, k] into the index; scores float32 [Q, k] (s_g + s_l for reranked
    items when two_stage, else cosine); paths: Q lists of k relative paths; cosine float32
    [Q, k]: the global cosine of each result (comparable across queries, unlike s_g + s_l)."""

    texts: list[str]
    indices: np.ndarray
    scores: np.ndarray
    paths: list[list[str]]
    two_stage: bool
    rerank_k: Optional[int]
    cosine: Optional[np.ndarray] = None


def query_token_counts(texts: Sequence[str], context_length: int) -> list[tuple[int, int]]:
    """(word tokens of the caption, word tokens kept: at most context_length - 2) per query."""
    from xmr_jax.tokenizer import default_tokenizer

    tok = default_tokenizer(mask_token=True, context_length=context_length)
    counts = [len(tok.bpe_ids(t)) for t in texts]
    return [(n, min(n, context_length - 2)) for n in counts]


def _check_queries(texts: Sequence[str]) -> None:
    empty = [i + 1 for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise SearchError(f"query {empty[0]} of {len(texts)} is empty: give each --text (or line of "
                          "--queries_file) some words")


def encode_texts(enc: Encoders, texts: Sequence[str], batch_size: int = 64):
    """Tokenizes (IRRA mask variant) and encodes -> (global f32 [Q,D], tokens f32 [Q,T,D], mask [Q,T])."""
    from xmr_jax.tokenizer import default_tokenizer

    ids = default_tokenizer(mask_token=True, context_length=enc.context_length).encode(list(texts))
    bs = min(batch_size, 1 << max(0, (len(texts) - 1).bit_length()))  # few compiled shapes
    outs = []
    for b0 in range(0, len(ids), bs):
        chunk = ids[b0:b0 + bs]
        padded = np.zeros((bs, ids.shape[1]), np.int32)
        padded[:len(chunk)] = chunk
        g, t, m = enc.encode_text(padded)
        outs.append((np.asarray(g[:len(chunk)], np.float32), np.asarray(t[:len(chunk)], np.float32),
                     None if m is None else np.asarray(m[:len(chunk)], bool)))
    g, t, m = (np.concatenate([o[i] for o in outs]) if outs[0][i] is not None else None for i in range(3))
    return g, t, m


def search(index: ImageIndex, model, params, texts: Sequence[str], k: int = 10,
           rerank_k: int = 100, two_stage: Optional[bool] = None, check: bool = True,
           mesh=None) -> SearchResult:
    """Top-k images of the index for each text query.

    Args:
      index: an ImageIndex; model, params: the CLIP it was built with (or an `Encoders`).
      texts: Q query captions. k: results per query (capped at the index size).
      rerank_k: global candidates reranked by s_g + s_l in two-stage search.
      two_stage: None = two-stage iff the index holds tokens; True needs tokens; False = global.
      check: verify that the model matches the index (IndexMismatchError).
      mesh: optional jax.sharding.Mesh with a "data" axis: the gallery is sharded over it
        (two-stage search; same results as one device).
    Repeated calls: pass `model_encoders(model, params)` as `model` to reuse compiled encoders.
    """
    enc = _encoders(model, params)
    texts = [str(t) for t in texts]
    if not texts:
        raise SearchError("no query texts given (use --text or --queries_file)")
    _check_queries(texts)
    if check:
        check_compatible(index, enc)
    if two_stage is None:
        two_stage = index.has_tokens
    if two_stage and not index.has_tokens:
        raise SearchError("two-stage search needs token features, but the index was built with "
                          "--no_tokens; rebuild it with tokens or use --global_only")
    if k < 1:
        raise SearchError(f"--k must be >= 1, got {k}")
    if rerank_k < 1:
        raise SearchError(f"--rerank_k must be >= 1, got {rerank_k}")
    k = min(int(k), len(index))
    q_glob, q_tok, q_mask = encode_texts(enc, texts)
    from xmr_jax.retrieval import topk_search

    if two_stage:
        if q_tok is None or q_mask is None:
            raise SearchError("the text encoder returns no token features/mask; use --global_only")
        rk = int(rerank_k)
        idx, scores = topk_search(q_glob, index.global_features, k, query_tokens=q_tok,
                                  query_mask=q_mask, gallery_tokens=index.tokens,
                                  gallery_mask=index.mask, rerank_k=rk, direction="t2i",
                                  mesh=mesh)
    else:
        rk = None
        idx, scores = topk_search(q_glob, index.global_features, k)
    idx, scores = np.asarray(idx, np.int32), np.asarray(scores, np.float32)
    paths = [[index.paths[j] for j in row] for row in idx]
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    gallery = unit(np.asarray(index.global_features, np.float32))
    cosine = np.einsum("qd,qkd->qk", unit(np.asarray(q_glob, np.float32)), gallery[idx]).astype(np.float32)
    return SearchResult(texts, idx, scores, paths, bool(two_stage), rk, cosine)


# ----------------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of the result grid: rows = queries, columns = ranks."""

    rows: int
    cols: int
    thumb: tuple[int, int] = (128, 128)   # (H, W) box each thumbnail is fitted into
    pad: int = 6                           # space around a thumbnail (the outline lives here)
    title_h: int = 22                      # query text above each row
    label_h: int = 16                      # score under each thumbnail
    margin: int = 8

    @property
    def cell(self) -> tuple[int, int]:
        return self.thumb[0] + 2 * self.pad + self.label_h, self.thumb[1] + 2 * self.pad

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the PNG."""
        ch, cw = self.cell
        return (2 * self.margin + self.cols * cw, 2 * self.margin + self.rows * (self.title_h + ch))

    def thumb_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the thumbnail box (exclusive x1, y1)."""
        ch, cw = self.cell
        x0 = self.margin + col * cw + self.pad
        y0 = self.margin + row * (self.title_h + ch) + self.title_h + self.pad
        return x0, y0, x0 + self.thumb[1], y0 + self.thumb[0]


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_grid(texts: Sequence[str], paths: Sequence[Sequence[str]], scores, image_root: str,
                out_path: str | None = None, ground_truth: Sequence[Sequence[str]] | None = None,
                thumb: tuple[int, int] = (128, 128)):
    """PNG grid of search results -> (PIL.Image, GridLayout).

    One row per query (texts[q] above it), thumbnails of paths[q] (relative to image_root), each
    with its score below; with ground_truth (Q lists of relative paths) a correct match is outlined
    in green (4 px), others in thin grey (1 px). Writes `out_path` when given.
    """
    from PIL import Image, ImageDraw, ImageFont

    scores = np.asarray(scores)
    layout = GridLayout(rows=len(texts), cols=max((len(p) for p in paths), default=1), thumb=tuple(thumb))
    canvas = Image.new("RGB", layout.size, WHITE)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, text in enumerate(texts):
        x0, y0, _, _ = layout.thumb_box(r, 0)
        title_w = layout.size[0] - 2 * layout.margin
        draw.text((layout.margin, y0 - layout.pad - layout.title_h + 4),
                  _fit_text(draw, f"{r + 1}. {text}", font, title_w), fill=(0, 0, 0), font=font)
        truth = {os.path.normpath(p) for p in (ground_truth[r] if ground_truth is not None else ())}
        for c, rel in enumerate(paths[r]):
            bx0, by0, bx1, by1 = layout.thumb_box(r, c)
            try:
                with Image.open(os.path.join(image_root, rel)) as im:
                    im = im.convert("RGB")
                    fit = min(layout.thumb[1] / im.width, layout.thumb[0] / im.height)
                    im = im.resize((max(1, min(layout.thumb[1], round(im.width * fit))),
                                    max(1, min(layout.thumb[0], round(im.height * fit)))),
                                   Image.Resampling.BILINEAR)
                    canvas.paste(im, (bx0 + (layout.thumb[1] - im.width) // 2,
                                      by0 + (layout.thumb[0] - im.height) // 2))
            except OSError:  # moved/unreadable since indexing: leave the box empty, say so
                draw.text((bx0 + 4, by0 + 4), "missing", fill=(200, 0, 0), font=font)
            hit = os.path.normpath(rel) in truth
            width = 4 if hit else 1
            draw.rectangle((bx0 - width, by0 - width, bx1 - 1 + width, by1 - 1 + width),
                           outline=GREEN if hit else GREY, width=width)
            draw.text((bx0, by1 + layout.pad - 2), f"#{c + 1}  {float(scores[r][c]):.3f}", fill=(0, 0, 0), font=font)
    if out_path:
        from xmr_jax.logging_utils import as_path

        target = as_path(out_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as fh:
            canvas.save(fh, format="PNG")
    return canvas, layout


def read_ground_truth(path: str, texts: Sequence[str]) -> list[list[str]]:
    """gt json: {query_text: [relative paths]} or a list (one entry per query, in order) of path
    lists (a bare string counts as one path) -> Q lists of relative paths."""
    from xmr_jax.logging_utils import as_path

    if not as_path(path).is_file():
        raise FileNotFoundError(f"--ground_truth {path!r} does not exist")
    try:
        data = json.loads(as_path(path).read_text())
    except json.JSONDecodeError as e:
        raise SearchError(f"--ground_truth {path!r} is not valid JSON: {e}") from e
    as_list = lambda v, where: ([v] if isinstance(v, str) else
                                list(v) if isinstance(v, list) and all(isinstance(x, str) for x in v)
                                else _raise(SearchError(f"{path}: {where} must be a list of relative "
                                                        f"image paths, got {v!r}")))
    if isinstance(data, dict):
        missing = [t for t in texts if t not in data]
        if missing:
            raise SearchError(f"{path}: no ground truth for query {missing[0]!r} (keys are query texts)")
        return [as_list(data[t], f"entry {t!r}") for t in texts]
    if isinstance(data, list):
        if len(data) != len(texts):
            raise SearchError(f"{path}: the list has {len(data)} entries but there are {len(texts)} queries")
        return [as_list(v, f"entry {i}") for i, v in enumerate(data)]
    raise SearchError(f"{path}: expected a JSON object {{query: [paths]}} or a list of path lists")


def _raise(err):
    raise err


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m xmr_jax.search", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, required: bool):
        g = sp.add_mutually_exclusive_group(required=required)
        g.add_argument("--checkpoint", help="training workdir, `python -m xmr_jax.convert` folder, HF "
                                            "CLIPModel folder or OpenAI CLIP file")
        g.add_argument("--exported", help="a `python -m xmr_jax.export --formats jax` folder")
        sp.add_argument("--config", default=None, help="configs/x.py[:arg] describing a workdir's model")

    ix = sub.add_parser("index", help="encode a folder of images into an index")
    model_args(ix, True)
    ix.add_argument("--images", required=True, help="image folder (searched recursively)")
    ix.add_argument("--index", required=True, help="output .npz")
    ix.add_argument("--batch_size", type=int, default=64)
    ix.add_argument("--no_tokens", action="store_true", help="store global features only")
    ix.add_argument("--skip_bad_images", action="store_true", help="skip (and count) undecodable images")
    ix.add_argument("--num_workers", type=int, default=None, help="image decoding threads")

    q = sub.add_parser("query", help="search an index with text")
    model_args(q, False)
    q.add_argument("--index", required=True)
    q.add_argument("--text", action="append", default=[], help="a query (repeatable)")
    q.add_argument("--queries_file", help="text file, one query per line")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--rerank_k", type=int, default=100)
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--two_stage", dest="two_stage", action="store_true", default=None)
    mode.add_argument("--global_only", dest="two_stage", action="store_false")
    q.set_defaults(two_stage=None)
    q.add_argument("--grid", help="write a PNG grid of the results here")
    q.add_argument("--thumb", type=int, default=128, help="thumbnail box size in the grid (px)")
    q.add_argument("--ground_truth", help="json {query: [relative paths]} or a list per query")
    q.add_argument("--images", help="image folder (default: the one recorded in the index)")
    q.add_argument("--shard_gallery", action="store_true",
                   help="shard the gallery over all local devices (two-stage search)")
    q.add_argument("--allow_other_weights", action="store_true",
                   help="query an index built from different weights of the same architecture")
    return p.parse_args(argv)


def _load_encoders(args) -> Encoders:
    if args.exported:
        return exported_encoders(args.exported)
    from xmr_jax.export import load_for_export

    from xmr_jax.logging_utils import path_str

    model, params = load_for_export(args.checkpoint, args.config)
    return model_encoders(model, params, source=path_str(args.checkpoint))


def _cmd_index(args, log) -> int:
    paths = list_images(args.images)
    enc = _load_encoders(args)
    log(f"[index] {len(paths)} images in {args.images}; model {enc.description['kind']} "
        f"embed_dim={enc.embed_dim} image_size={tuple(enc.image_size)}")
    index = build_index(enc, None, paths, args.images, batch_size=args.batch_size,
                        with_tokens=not args.no_tokens, skip_bad_images=args.skip_bad_images,
                        num_workers=args.num_workers, log=log)
    save_index(index, args.index)
    skipped = index.meta["skipped"]
    if skipped:
        log(f"[index] skipped {len(skipped)} undecodable image(s): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""))
    tok = f", tokens {index.tokens.shape} float16" if index.has_tokens else ", no tokens"
    print(f"[index] wrote {len(index)} images (global {index.global_features.shape}{tok}) -> {args.index}")
    return 0


def _read_queries(args) -> list[str]:
    from xmr_jax.logging_utils import as_path

    empty = [i + 1 for i, t in enumerate(args.text) if not t.strip()]
    if empty:
        raise SearchError(f"--text #{empty[0]} is empty: a query needs some words")
    texts = [t.strip() for t in args.text]
    if args.queries_file:
        if not as_path(args.queries_file).is_file():
            raise FileNotFoundError(f"--queries_file {args.queries_file!r} does not exist")
        texts += [line.strip() for line in as_path(args.queries_file).read_text().splitlines() if line.strip()]
    if not texts:
        raise SearchError("no queries: give --text (repeatable) or --queries_file")
    return texts


def _cmd_query(args, log) -> int:
    index = load_index(args.index)
    texts = _read_queries(args)
    if not args.checkpoint and not args.exported:
        args.checkpoint = index.meta.get("model", {}).get("source")
        if not args.checkpoint:
            raise SearchError("--checkpoint (or --exported) is required: the index records no model source")
        if index.meta["model"].get("kind") == "jax.export":
            args.exported, args.checkpoint = args.checkpoint, None
    enc = _load_encoders(args)
    check_compatible(index, enc, args.allow_other_weights)
    image_root = args.images or index.image_root
    truth = read_ground_truth(args.ground_truth, texts) if args.ground_truth else None
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",)) if args.shard_gallery else None
    counts = query_token_counts(texts, enc.context_length)
    wordless = [q + 1 for q, (total, _) in enumerate(counts) if total == 0]
    if wordless:
        raise SearchError(f"query {wordless[0]} ({texts[wordless[0] - 1]!r}) has no words the tokenizer keeps")
    res = search(index, enc, None, texts, k=args.k, rerank_k=args.rerank_k, two_stage=args.two_stage,
                 check=False, mesh=mesh)
    mode = f"two-stage (rerank top {min(res.rerank_k, len(index))} by s_g + s_l)" if res.two_stage else "global cosine"
    for q, (total, kept) in enumerate(counts):
        if kept < total:
            log(f"[query] query {q + 1}: {total} tokens, only the first {kept} were used (context length "
                f"{enc.context_length} incl. start/end); the rest of the query was ignored")
    if res.two_stage:
        print("columns: rank, score (s_g + s_l: grows with the query's length, compare within a query), "
              "global cosine (comparable across queries), path")
    for q, text in enumerate(texts):
        total, kept = counts[q]
        cut = f", cut to {kept} of {total} tokens" if kept < total else ""
        print(f'query {q + 1}: "{text}"  [{mode}, {len(index)} images{cut}]')
        for r, (path, score) in enumerate(zip(res.paths[q], res.scores[q])):
            hit = "  *" if truth is not None and os.path.normpath(path) in {os.path.normpath(p) for p in truth[q]} else ""
            cosine = f"  {res.cosine[q][r]:7.4f}" if res.two_stage else ""
            print(f"  {r + 1:3d}  {score:8.4f}{cosine}  {path}{hit}")
    if args.grid:
        render_grid(texts, res.paths, res.scores, image_root, args.grid, truth, (args.thumb, args.thumb))
        print(f"[query] grid -> {args.grid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit status (2 on bad input, with the message on stderr)."""
    args = _parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        return _cmd_index(args, log) if args.command == "index" else _cmd_query(args, log)
    except (SearchError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
