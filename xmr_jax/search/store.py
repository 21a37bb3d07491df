"""The chunked search index (format version 2): a folder of .npy chunks on any filesystem.

Written chunk by chunk (`IndexWriter`), so a gallery never has to fit in memory, and resumable:
a rerun of the same `index` command skips every chunk whose DONE marker exists. Read by
`IndexStore`, which keeps only the global features in memory (memory-mapped on a local disk,
read once elsewhere) and reads token rows on demand (memory-mapped locally; ranged reads of the
.npy files on gs:// and other etils.epath filesystems).

Layout (INDEX is any etils.epath folder: local, gs://...):

    INDEX/index.json                   manifest (below); written first, rewritten when complete
    INDEX/chunks/000000/global.npy     float32 [n_c, D]     image global features, unnormalized
    INDEX/chunks/000000/tokens.npy     float16 [n_c, L, D]  image token features (with tokens)
    INDEX/chunks/000000/mask.npy       bool    [n_c, L]     content-token mask (False for CLS)
    INDEX/chunks/000000/paths.json     {"paths": [n_c relative paths], "skipped": [...]}
    INDEX/chunks/000000/DONE           {"rows": n_c}, written last: a chunk without it is redone
    INDEX/chunks/000001/...

Chunk c holds the images [c * chunk_size, (c + 1) * chunk_size) of the sorted source list,
minus the undecodable ones (skipped); image i of the index is row i - offset_c of its chunk,
offsets being the running sum of the chunks' rows.

index.json: format ("xmr_jax.search.index"), version (2), layout ("npy-chunks"), chunk_size,
num_source (images listed), source_digest (blake2b of the sorted relative paths), embed_dim,
with_tokens, model (fields + weight fingerprint), image_root, created, complete; once complete
also num_images, chunk_rows (rows per chunk), token_shape ([L, D] or null) and skipped.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from xmr_jax.search.errors import SearchError

INDEX_FORMAT = "xmr_jax.search.index"
STORE_VERSION = 2
LAYOUT = "npy-chunks"
MANIFEST = "index.json"
DONE = "DONE"
REMOTE_READ_THREADS = 16  # parallel ranged reads of token rows on gs:// and other URIs
# Manifest fields that must agree for a rerun to continue a partial index.
_RESUME_KEYS = ("format", "version", "layout", "chunk_size", "num_source", "source_digest",
                "embed_dim", "with_tokens", "image_root")


def _path(p):
    from xmr_jax.logging_utils import as_path

    return as_path(p)


def _is_local(p) -> bool:
    from xmr_jax.logging_utils import is_uri

    return not is_uri(str(p))


def source_digest(paths: Sequence[str]) -> str:
    """blake2b of the newline-joined relative paths: identifies the image list of an index."""
    h = hashlib.blake2b(digest_size=12)
    for p in paths:
        h.update(p.encode())
        h.update(b"\n")
    return h.hexdigest()


def chunk_dir(root, c: int):
    return _path(root) / "chunks" / f"{c:06d}"


def is_store(path) -> bool:
    """True when `path` is a folder holding an index.json."""
    p = _path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def _save_npy(path, arr: np.ndarray) -> None:
    with path.open("wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)


def _describe_difference(old: dict, new: dict) -> str:
    for key in _RESUME_KEYS:
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r} (on disk) vs {new.get(key)!r} (this run)"
    a = str(old.get("model", {}).get("fingerprint")), str(new.get("model", {}).get("fingerprint"))
    return f"model fingerprint {a[0]} (on disk) vs {a[1]} (this run)"


class IndexWriter:
    """Writes an index folder chunk by chunk; reopening a partial one with the same settings resumes.

    Args:
      path: the index folder (local or any etils.epath URI); created if needed.
      source_paths: the sorted relative image paths the index is built from (identify the run).
      chunk_size: source images per chunk.
      embed_dim, with_tokens, model (description with a fingerprint), image_root: manifest fields.

    Raises SearchError when `path` is a file, a non-empty folder that is not an index, or an index
    built with other settings (named).
    """

    def __init__(self, path, source_paths: Sequence[str], chunk_size: int, embed_dim: int,
                 with_tokens: bool, model: dict, image_root: str = ""):
        if int(chunk_size) < 1:
            raise SearchError(f"--chunk_size must be >= 1, got {chunk_size}")
        if not source_paths:
            raise SearchError("no images to index")
        self.root = _path(path)
        self.name = str(path)
        self.num_source = len(source_paths)
        self.chunk_size = int(chunk_size)
        self.num_chunks = -(-self.num_source // self.chunk_size)
        self.manifest = {"format": INDEX_FORMAT, "version": STORE_VERSION, "layout": LAYOUT,
                         "chunk_size": self.chunk_size, "num_source": self.num_source,
                         "source_digest": source_digest(source_paths), "embed_dim": int(embed_dim),
                         "with_tokens": bool(with_tokens), "model": model, "image_root": image_root,
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False}
        if self.root.exists() and not self.root.is_dir():
            raise SearchError(f"--index {self.name!r} is a file; the index is a folder (format "
                              f"{STORE_VERSION}): give a folder path")
        if (self.root / MANIFEST).is_file():
            old = self._read_manifest()
            same = all(old.get(k) == self.manifest[k] for k in _RESUME_KEYS) and \
                old.get("model", {}).get("fingerprint") == model.get("fingerprint")
            if not same:
                raise SearchError(f"--index {self.name!r} already holds an index built with other "
                                  f"settings ({_describe_difference(old, self.manifest)}); remove "
                                  "it or choose another folder")
            self.manifest["created"] = old.get("created", self.manifest["created"])
        elif self.root.is_dir() and any(True for _ in self.root.iterdir()):
            raise SearchError(f"--index {self.name!r} is a folder that holds other files and no "
                              f"{MANIFEST}; give a new or empty folder for the index")
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / MANIFEST).is_file():
            (self.root / MANIFEST).write_text(json.dumps(self.manifest, indent=1))

    def _read_manifest(self) -> dict:
        try:
            return json.loads((self.root / MANIFEST).read_text())
        except ValueError as e:
            raise SearchError(f"--index {self.name!r}: {MANIFEST} is not JSON ({e}); remove the "
                              "folder and rebuild") from e

    def chunk_range(self, c: int) -> range:
        """Source positions of chunk c."""
        return range(c * self.chunk_size, min(self.num_source, (c + 1) * self.chunk_size))

    def is_done(self, c: int) -> bool:
        return (chunk_dir(self.root, c) / DONE).is_file()

    def pending(self) -> list[int]:
        """Chunks still to write (without a DONE marker), in order."""
        if not (self.root / "chunks").is_dir():
            return list(range(self.num_chunks))
        done = {p.name for p in (self.root / "chunks").iterdir() if (p / DONE).is_file()}
        return [c for c in range(self.num_chunks) if f"{c:06d}" not in done]

    def write_chunk(self, c: int, global_features: np.ndarray, tokens: Optional[np.ndarray],
                    mask: Optional[np.ndarray], paths: Sequence[str], skipped: Sequence[str] = ()):
        """Writes chunk c: global f32 [n, D], tokens [n, L, D] (stored float16) and mask [n, L]
        (when the index has tokens), the n relative paths and the skipped ones; DONE last."""
        n = len(paths)
        g = np.asarray(global_features, np.float32)
        if g.shape != (n, self.manifest["embed_dim"]):
            raise SearchError(f"chunk {c}: global features {g.shape}, expected ({n}, "
                              f"{self.manifest['embed_dim']})")
        d = chunk_dir(self.root, c)
        d.mkdir(parents=True, exist_ok=True)
        if (d / DONE).exists():
            (d / DONE).unlink()
        _save_npy(d / "global.npy", g)
        if self.manifest["with_tokens"]:
            if tokens is None or mask is None or len(tokens) != n or len(mask) != n:
                raise SearchError(f"chunk {c}: the index stores tokens but got "
                                  f"{None if tokens is None else np.shape(tokens)} tokens / "
                                  f"{None if mask is None else np.shape(mask)} mask for {n} images")
            _save_npy(d / "tokens.npy", np.asarray(tokens).astype(np.float16))
            _save_npy(d / "mask.npy", np.asarray(mask, bool))
        (d / "paths.json").write_text(json.dumps({"paths": list(paths), "skipped": list(skipped)}))
        (d / DONE).write_text(json.dumps({"rows": n}))

    def finish(self) -> dict:
        """Checks that every chunk is done, writes the complete manifest and returns it."""
        missing = self.pending()
        if missing:
            raise SearchError(f"--index {self.name!r}: chunks {missing[:5]} are not written yet")
        rows, skipped, token_shape = [], [], None
        for c in range(self.num_chunks):
            d = chunk_dir(self.root, c)
            rows.append(int(json.loads((d / DONE).read_text())["rows"]))
            skipped += json.loads((d / "paths.json").read_text())["skipped"]
            if token_shape is None and self.manifest["with_tokens"] and rows[-1]:
                token_shape = list(_NpyRows(d / "tokens.npy").shape[1:])
        if not sum(rows):
            raise SearchError(f"none of the {self.num_source} images could be decoded")
        self.manifest.update(complete=True, num_images=sum(rows), chunk_rows=rows,
                             token_shape=token_shape, skipped=skipped)
        (self.root / MANIFEST).write_text(json.dumps(self.manifest, indent=1))
        return self.manifest


class _NpyRows:
    """Rows of one .npy file: the header is parsed once and rows are read with seek + read
    (ranged reads on object stores; on a local disk this maps no pages, whereas indexing a
    memory map maps whole stretches of the file around each row). `read_all` memory-maps a
    local file."""

    def __init__(self, path):
        self.path = path
        self.local = _is_local(path)
        with (open(str(path), "rb") if self.local else path.open("rb")) as fh:
            version = np.lib.format.read_magic(fh)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            self.shape, fortran, self.dtype = read(fh)
            self.offset = fh.tell()
        if fortran:
            raise SearchError(f"{path}: a Fortran-ordered array; not written by the indexer")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read_all(self) -> np.ndarray:
        if self.local:
            return np.load(str(self.path), mmap_mode="r", allow_pickle=False)
        return np.load(io.BytesIO(self.path.read_bytes()), allow_pickle=False)

    def _open(self):
        return self.path.open("rb")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """rows: sorted int array of row numbers -> array [len(rows), ...]."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows),) + tuple(self.shape[1:]), self.dtype)
        runs, start = [], 0
        while start < len(rows):  # runs of consecutive rows: one ranged read each
            stop = start + 1
            while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                stop += 1
            runs.append((start, stop))
            start = stop

        def read_run(run, fh=None):
            a, b = run
            n_bytes, at = (b - a) * self.row_bytes, self.offset + int(rows[a]) * self.row_bytes
            if fh is None:
                with self._open() as f:
                    f.seek(at)
                    buf = f.read(n_bytes)
            else:
                buf = os.pread(fh.fileno(), n_bytes, at)
            if len(buf) != n_bytes:
                raise SearchError(f"{self.path}: rows {rows[a]}..{rows[b - 1]} lie past the end of the "
                                  f"file (truncated?); rebuild the index")
            out[a:b] = np.frombuffer(buf, self.dtype).reshape((b - a,) + tuple(self.shape[1:]))

        if self.local:  # positioned reads on one descriptor
            with open(str(self.path), "rb") as fh:
                for run in runs:
                    read_run(run, fh)
        elif len(runs) == 1:
            read_run(runs[0])
        else:  # object stores: latency-bound requests, issued in parallel
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(REMOTE_READ_THREADS, len(runs))) as pool:
                list(pool.map(read_run, runs))
        return out


class IndexStore:
    """A complete index folder, opened for search.

    global chunks: float32 [n_c, D] each, memory-mapped on a local disk (read into memory once
    elsewhere); tokens [n, L, D] float16 / mask [n, L] and paths are read per requested row.
    """

    def __init__(self, path):
        self.path = str(path)
        self.root = _path(path)
        try:
            meta = json.loads((self.root / MANIFEST).read_text())
        except ValueError as e:
            raise SearchError(f"index {self.path!r}: {MANIFEST} is not JSON ({e}); rebuild it") from e
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else meta
            raise SearchError(f"{self.path!r}: {MANIFEST} format is {got!r}, expected {INDEX_FORMAT!r}")
        if meta.get("version") != STORE_VERSION or meta.get("layout") != LAYOUT:
            raise SearchError(f"index {self.path!r} has format version {meta.get('version')} "
                              f"({meta.get('layout')}); this xmr_jax reads version {STORE_VERSION} "
                              f"({LAYOUT}): rebuild it with `python -m xmr_jax.search index`")
        if not meta.get("complete"):
            total = -(-int(meta.get("num_source", 0)) // max(1, int(meta.get("chunk_size", 1))))
            done = sum(1 for p in (self.root / "chunks").iterdir() if (p / DONE).is_file()) \
                if (self.root / "chunks").is_dir() else 0
            raise SearchError(f"index {self.path!r} is incomplete ({done} of {total} chunks written): "
                              "rerun the same `python -m xmr_jax.search index` command to finish it")
        self.meta = meta
        self.chunk_rows = [int(r) for r in meta["chunk_rows"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.chunk_rows)]).astype(np.int64)
        self._global = [_NpyRows(chunk_dir(self.root, c) / "global.npy").read_all()
                        if n else np.zeros((0, meta["embed_dim"]), np.float32)
                        for c, n in enumerate(self.chunk_rows)]
        for c, g in enumerate(self._global):
            if g.shape != (self.chunk_rows[c], meta["embed_dim"]):
                raise SearchError(f"index {self.path!r}: chunk {c} global.npy has shape {g.shape}, "
                                  f"expected ({self.chunk_rows[c]}, {meta['embed_dim']}); rebuild it")
        self._tokens: dict[int, _NpyRows] = {}
        self._masks: dict[int, _NpyRows] = {}
        self._paths: dict[int, list[str]] = {}

    @property
    def has_tokens(self) -> bool:
        return bool(self.meta.get("with_tokens"))

    @property
    def image_root(self) -> str:
        return self.meta.get("image_root", "")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def global_chunks(self) -> list[np.ndarray]:
        """The global features, float32 [n_c, D] per chunk (memory-mapped where local)."""
        return self._global

    def _locate(self, rows) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range [0, {len(self)})")
        chunk = np.searchsorted(self.offsets, rows, side="right") - 1
        return chunk, rows - self.offsets[chunk]

    def _by_chunk(self, rows, read_chunk):
        """Reads rows (any order) chunk by chunk with read_chunk(c, sorted local rows)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size == 0:
            raise SearchError("no rows requested")
        order = np.argsort(rows, kind="stable")
        chunk, local = self._locate(rows[order])
        parts = []
        for c in np.unique(chunk):
            sel = chunk == c
            parts.append(read_chunk(int(c), local[sel]))
        out = np.concatenate(parts) if parts else None
        result = np.empty_like(out)
        result[order] = out
        return result

    def global_rows(self, rows) -> np.ndarray:
        """float32 [len(rows), D]."""
        return self._by_chunk(rows, lambda c, r: np.asarray(self._global[c][r], np.float32))

    def token_rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(tokens float16 [len(rows), L, D], mask bool [len(rows), L]) read from the chunks."""
        if not self.has_tokens:
            raise SearchError("the index was built with --no_tokens")

        def rows_of(store, name):
            def read(c, r):
                if c not in store:
                    store[c] = _NpyRows(chunk_dir(self.root, c) / name)
                return store[c].read(r)
            return read

        return (self._by_chunk(rows, rows_of(self._tokens, "tokens.npy")),
                self._by_chunk(rows, rows_of(self._masks, "mask.npy")))

    def paths_of(self, rows) -> list[str]:
        """Relative paths of the given rows (paths.json of their chunks, read on demand)."""
        chunk, local = self._locate(np.asarray(rows, np.int64).reshape(-1))
        out = []
        for c, r in zip(chunk.tolist(), local.tolist()):
            if c not in self._paths:
                self._paths[c] = json.loads((chunk_dir(self.root, c) / "paths.json").read_text())["paths"]
            out.append(self._paths[c][r])
        return out

    @property
    def paths(self) -> list[str]:
        """All relative paths (reads every chunk's paths.json)."""
        return self.paths_of(np.arange(len(self)))


# ----------------------------------------------------------------------------------------------
# First stage over chunks of global features: exact top-k (lax.top_k) or approx_max_k.


@functools.partial(jax.jit, static_argnames=("k", "recall_target"))
def _block_topk(q_unit, block, n_valid, offset, *, k, recall_target):
    """Top-k cosines of q_unit [Q, D] (unit rows) against block [B, D] (rows >= n_valid are
    padding) -> (values [Q, k] float32, global indices [Q, k] int32)."""
    from xmr_jax.similarity import l2_normalize

    s = jnp.matmul(q_unit, l2_normalize(block).T, precision=jax.lax.Precision.HIGHEST)
    s = jnp.where(jnp.arange(block.shape[0])[None, :] < n_valid, s, -jnp.inf)
    if recall_target is None:
        vals, idx = jax.lax.top_k(s, k)
    else:
        vals, idx = jax.lax.approx_max_k(s, k, recall_target=recall_target)
    return vals, idx.astype(jnp.int32) + offset


@jax.jit
def _merge_topk(vals_a, idx_a, vals_b, idx_b):
    """Top-k (k = vals_a.shape[1]) of two sorted lists; ties go to the first (lower indices)."""
    vals, pos = jax.lax.top_k(jnp.concatenate([vals_a, vals_b], axis=1), vals_a.shape[1])
    return vals, jnp.take_along_axis(jnp.concatenate([idx_a, idx_b], axis=1), pos, axis=1)


@jax.jit
def _unit(x):
    from xmr_jax.similarity import l2_normalize

    return l2_normalize(x)


def _aligned_empty(shape) -> np.ndarray:
    """An uninitialized float32 array whose data starts on a 64-byte boundary."""
    n = int(np.prod(shape))
    raw = np.empty(n + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + n].reshape(shape)


def chunked_topk(query_global, chunks: Sequence[np.ndarray], k: int, block_rows: Optional[int] = None,
                 recall_target: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Global cosine top-k of queries over a gallery given as chunks, one block in memory at a time.

    Args:
      query_global: float32 [Q, D] (unnormalized). chunks: float32 [n_c, D] arrays (memmaps
        welcome) whose concatenation is the gallery [N, D].
      k: results per query (<= N). block_rows: rows per jitted call (default: the largest chunk);
        every block is padded to it, so one shape compiles.
      recall_target: None = exact (jax.lax.top_k, ties to the lower index, as topk_search);
        else jax.lax.approx_max_k per block with this recall target (approximate on TPU; XLA
        falls back to an exact top-k on CPU and GPU), merged exactly.
    Returns (indices int32 [Q, k], cosines float32 [Q, k]), best first.
    """
    n = sum(len(c) for c in chunks)
    if not 1 <= k <= n:
        raise SearchError(f"k must be in [1, {n}] (the gallery size), got {k}")
    block = int(block_rows or max(len(c) for c in chunks))
    q = _unit(jnp.asarray(query_global, jnp.float32))
    kb = min(k, block)
    best_v = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
    best_i = jnp.full((q.shape[0], k), -1, jnp.int32)
    offset, previous = 0, None
    for c in chunks:
        for b0 in range(0, len(c), block):
            part = c[b0:b0 + block]
            # A fresh 64-byte aligned buffer per block: jax.device_put then uses it without a
            # copy (3x faster on CPU than jnp.asarray's copy), and it is never written again
            # while the asynchronous computation may still read it.
            buf = _aligned_empty((block, q.shape[1]))
            buf[:len(part)] = part
            buf[len(part):] = 0.0
            v, i = _block_topk(q, jax.device_put(buf), len(part), offset + b0, k=kb,
                               recall_target=recall_target)
            if kb < k:
                v = jnp.pad(v, ((0, 0), (0, k - kb)), constant_values=-jnp.inf)
                i = jnp.pad(i, ((0, 0), (0, k - kb)), constant_values=-1)
            best_v, best_i = _merge_topk(best_v, best_i, v, i)
            if previous is not None:  # at most two blocks in flight: bounded host memory
                previous.block_until_ready()
            previous = best_v
        offset += len(c)
    return np.asarray(best_i, np.int32), np.asarray(best_v, np.float32)
