"""Files and progress: the path layer, TensorBoard scalars, a JSON-lines metrics log, a progress bar.

Path layer: every file the project reads or writes goes through `as_path`: `etils.epath` (the
library orbax already uses) for URIs, so a workdir, checkpoint, export or search index may live on
local disk, `gs://bucket/...` or any filesystem epath has registered (`gs://` uses tf.io.gfile
when TensorFlow is installed, else fsspec/gcsfs); pathlib for local paths. Never `open()` a path
that may be a URI: `open("gs://b/x")` silently writes to ./gs:/b/x on local disk.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shutil
import socket
import time
import uuid
from typing import Any, Mapping


# ----------------------------------------------------------------------------- path layer


def is_uri(path: Any) -> bool:
    """True for `scheme://...` paths (gs://, s3://, a registered test filesystem, ...)."""
    return "://" in (path if isinstance(path, str) else os.fspath(path))


def as_path(path: Any):
    """A pathlib-like object: `LocalPath` (pathlib, made absolute) for local paths, an
    `etils.epath.Path` for URIs. Both have exists/is_dir/iterdir/mkdir/open/read_*/write_*/rmtree."""
    if is_uri(path):
        from etils import epath

        return epath.Path(path)
    return LocalPath(os.path.abspath(os.path.expanduser(os.fspath(path))))


class LocalPath(type(pathlib.Path())):
    """pathlib.Path with epath's `rmtree` (local paths never touch epath's backend lookup)."""

    def rmtree(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        shutil.rmtree(self)


def path_str(path: Any) -> str:
    """A path as the string to print and to pass on: absolute if local, the URI otherwise."""
    return str(as_path(path))


def join(path: Any, *parts: str) -> str:
    return str(as_path(path).joinpath(*parts))


def makedirs(path: Any) -> None:
    as_path(path).mkdir(parents=True, exist_ok=True)


def write_text(path: Any, text: str) -> None:
    """Writes `text` to `path` (creating its folder); local files are replaced atomically."""
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_uri(p):  # object stores: a single upload is already all-or-nothing
        p.write_text(text)
        return
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_text(path: Any) -> str:
    return as_path(path).read_text()


def describe_os_error(err: BaseException) -> str:
    """'No space left on device (errno 28)' from an OSError, or from a message carrying
    `os_error_code='28'` (tensorstore), `[Errno 28]`, ...; else the error's first line."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno:
            return f"{e.strerror or os.strerror(e.errno)} (errno {e.errno})"
    for e in _chain(err):
        m = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(e))
        if m:
            code = int(m.group(1) or m.group(2))
            return f"{os.strerror(code)} (errno {code})"
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return first if len(first) <= 300 else first[:300] + " ..."


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


class PathCheckError(ValueError):
    """A path given by the user cannot be used (message names the flag and the reason)."""


def check_writable_dir(path: Any, what: str = "--workdir") -> str:
    """Creates folder `path` if needed and writes+removes a probe file in it; returns its string.

    Raises PathCheckError naming `what` and the cause (permission denied, read-only filesystem,
    a file in the way, no such parent, ...).
    """
    p = as_path(path)
    try:
        if p.exists() and not p.is_dir():
            raise PathCheckError(f"{what}={path}: is a file, expected a folder")
        p.mkdir(parents=True, exist_ok=True)
        # Unique across the hosts of a multi-host job probing one shared workdir.
        probe = p / f".write_probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except PathCheckError:
        raise
    except (OSError, NotImplementedError, ValueError) as e:
        raise PathCheckError(f"{what}={path}: cannot create or write files there: {describe_os_error(e)}") from e
    return str(p)


# ----------------------------------------------------------------------------- remote files


class _RewritingFile:
    """A write-only file on a filesystem without append (object stores): keeps the content and
    re-uploads all of it on flush(). Starts from the existing content when `keep_existing`."""

    def __init__(self, path: Any, keep_existing: bool = False, binary: bool = True):
        self._path = as_path(path)
        self._buf = io.BytesIO()
        self._dirty = True
        self._binary = binary
        if keep_existing and self._path.exists():
            self._buf.write(self._path.read_bytes())

    def write(self, data) -> None:
        self._buf.write(data if self._binary else data.encode())
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._path.write_bytes(self._buf.getvalue())
            self._dirty = False

    def close(self) -> None:
        self.flush()


class _EpathRecordWriterFactory:
    """tensorboardX writer factory for URI schemes: event files written through epath."""

    def open(self, path):
        return _RewritingFile(path)

    def directory_check(self, path):
        makedirs(path)


def _register_tensorboard_scheme(path: str) -> None:
    from tensorboardX import record_writer

    scheme = path.split("://", 1)[0]
    # Replaces tensorboardX's own gs:// (google-cloud-storage) and s3:// (boto3) writers too.
    record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())


# ----------------------------------------------------------------------------- metrics


class MetricWriter:
    """Writes scalars to TensorBoard (tensorboardX, no TensorFlow needed) and WORKDIR/metrics.jsonl.

    Local workdirs: metrics.jsonl is appended and flushed at every call. URI workdirs (gs://...):
    both files are kept in memory and uploaded whole at `flush()` and at most every
    `remote_flush_secs` seconds from `scalars()` (object stores have no append).
    """

    def __init__(self, workdir: str, enabled: bool = True, remote_flush_secs: float = 30.0):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._remote = is_uri(workdir)
        self._remote_flush_secs = remote_flush_secs
        self._last_flush = time.time()
        if enabled:
            from tensorboardX import SummaryWriter

            makedirs(workdir)
            tb_dir = join(workdir, "tensorboard")
            if self._remote:
                _register_tensorboard_scheme(tb_dir)
                self._jsonl = _RewritingFile(join(workdir, "metrics.jsonl"), keep_existing=True, binary=False)
            else:
                self._jsonl = open(join(workdir, "metrics.jsonl"), "a")
            self._tb = SummaryWriter(tb_dir)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(f"{prefix}/{name}", float(value), step)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **{k: float(v) for k, v in values.items()}}) + "\n")
        if not self._remote:
            self._jsonl.flush()
        elif time.time() - self._last_flush > self._remote_flush_secs:
            self.flush()

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()
            self._last_flush = time.time()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._tb.close()
            self._jsonl.close()
            self.enabled = False


class ProgressBar:
    """tqdm bar over optimizer steps; shows steps/s and ETA (tqdm) and the loss just logged."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, step: int, summary: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        # Postfix first: update() may redraw, and must show this interval's loss, not the last one.
        self._bar.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{summary.get('lr', 0):.2e}", refresh=False)
        if step >= self._bar.total:
            self._bar.n = step  # drawn once, by close(); an update() here would print it twice
        else:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["MetricWriter", "ProgressBar", "PathCheckError", "as_path", "check_writable_dir",
           "describe_os_error", "is_uri", "join", "makedirs", "path_str", "read_text", "write_text"]
