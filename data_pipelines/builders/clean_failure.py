"""A failed TFDS build leaves the data dir as it found it.

TFDS writes a data set into a temporary folder that it deletes on error, but before that it creates
the data dir itself, `downloads/`, `downloads/extracted/`, `<name>/` (and for builders with
configs `<name>/.config/metadata.json`): after a bad annotation file or a missing image folder
those stayed behind, empty. `CleanFailureMixin.download_and_prepare` notes which of these folders
exist before the build and, when the build raises, removes the ones it created, provided they hold
nothing but empty folders and TFDS' own `.config/metadata.json` (files a user put there are never
touched, and nothing that existed before the call is removed).
"""

from __future__ import annotations

from typing import Any

from etils import epath

_TFDS_BOOKKEEPING = (".config", "metadata.json")  # <name>/.config/metadata.json: default config name


def folders_a_build_creates(builder, download_dir=None, download_config=None) -> list[epath.Path]:
    """The folders `builder.download_and_prepare(download_dir=..., download_config=...)` may create,
    parents before children: the data dir and its missing ancestors, the download/extract folders
    (and the default manual folder), and <name>/[<config>/]<version>."""
    root = epath.Path(builder.data_dir_root)
    chain = [root]
    while not chain[0].exists() and chain[0].parent != chain[0]:
        chain.insert(0, chain[0].parent)
    downloads = epath.Path(download_dir) if download_dir else root / "downloads"
    extract = getattr(download_config, "extract_dir", None)
    manual = getattr(download_config, "manual_dir", None)
    chain += [downloads, epath.Path(extract) if extract else downloads / "extracted"]
    if not manual:
        chain.append(downloads / "manual")
    data_dir = epath.Path(builder.data_dir)
    try:
        below = data_dir.relative_to(root).parts
    except ValueError:  # data dir outside the root: watch it and its parent only
        chain += [data_dir.parent, data_dir]
    else:
        for i in range(1, len(below) + 1):
            chain.append(root.joinpath(*below[:i]))
    seen, out = set(), []
    for p in chain:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out


def _remove_if_only_empty(folder: epath.Path) -> bool:
    """Removes `folder` when it holds only empty folders (and TFDS' .config/metadata.json);
    returns True when it is gone."""
    if not folder.is_dir():
        return not folder.exists()
    empty = True
    for child in list(folder.iterdir()):
        if child.is_dir():
            empty &= _remove_if_only_empty(child)
        elif (folder.name, child.name) == _TFDS_BOOKKEEPING:
            child.unlink()
        else:
            empty = False
    if empty:
        folder.rmdir()
    return empty


def remove_created_folders(created: list[epath.Path]) -> None:
    """Removes each folder of `created` (deepest first) that holds nothing but empty folders."""
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            _remove_if_only_empty(folder)
        except OSError:  # best effort: the build's own error is what the user needs to see
            pass


class CleanFailureMixin:
    """Mixin for a tfds.core.DatasetBuilder (list it before the TFDS base class): a failed
    download_and_prepare removes the empty folders it created (module docstring)."""

    def download_and_prepare(self, *args: Any, **kwargs: Any):
        watch = folders_a_build_creates(self, kwargs.get("download_dir"), kwargs.get("download_config"))
        new = [p for p in watch if not p.exists()]
        try:
            return super().download_and_prepare(*args, **kwargs)
        except BaseException:
            remove_created_folders(new)
            raise
