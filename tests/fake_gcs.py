"""A stand-in for Google Cloud Storage in tests: `gs://bucket/path` lives under a local folder.

`fake_gcs(root, monkeypatch)` makes, for the rest of the test:
  * etils.epath route gs:// through fsspec (not tf.io.gfile), and fsspec's "gs"/"gcs" protocol be
    `FakeGCS`, a local filesystem rooted at `root` that names entries bucket-relative, as gcsfs
    does (so epath, and orbax through it, see object-store paths);
  * orbax keep its GCS code paths (is_gcs_path is true: commit-marker files instead of atomic
    renames, GCS deletion) but give tensorstore a "file" kvstore under `root` instead of the
    "gcs" driver, and skip the hierarchical-namespace query (a google-cloud-storage API call).

Code that opens a gs:// path with the builtin open() / os.makedirs writes to ./gs:/... under the
current directory instead: tests run from a scratch folder and assert that it stays empty.
"""

from __future__ import annotations

import os

from fsspec.implementations.local import LocalFileSystem


class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")
    root = "/nonexistent"  # set by fake_gcs()

    def __init__(self, *args, **kwargs):
        kwargs.pop("finalize_on_close", None)
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        if not path.startswith(cls.root + "/") and path != cls.root:
            path = f"{cls.root}/{path.lstrip('/')}"
        return path.rstrip("/") or cls.root

    def _public(self, name: str) -> str:
        return name[len(self.root) + 1:] if name.startswith(self.root + "/") else name

    def ls(self, path, detail=False, **kwargs):
        out = super().ls(path, detail=detail, **kwargs)
        if detail:
            return [{**entry, "name": self._public(entry["name"])} for entry in out]
        return [self._public(name) for name in out]

    def glob(self, path, maxdepth=None, **kwargs):
        import glob

        return sorted(self._public(p) for p in glob.glob(self._strip_protocol(path), recursive=True))

    def info(self, path, **kwargs):
        entry = super().info(path, **kwargs)
        return {**entry, "name": self._public(entry["name"])}


def fake_gcs(root, monkeypatch) -> str:
    """Routes gs:// to `root` (see the module docstring); returns root as a string."""
    import fsspec
    from etils.epath import backend, gpath
    from orbax.checkpoint._src.path import gcs_utils

    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    monkeypatch.setattr(FakeGCS, "root", root)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    FakeGCS.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)

    def kvstore(ckpt_path: str):
        bucket, rest = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket, rest)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    return root


def unregister():
    """Forgets the fake after a test (fsspec's registry and epath's filesystem cache)."""
    import importlib

    from etils.epath import backend

    registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
    for name in ("gs", "gcs"):
        registry.pop(name, None)
    FakeGCS.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
