"""Region-feature galleries: a folder in TERAN's layout, read as the region builders read it.

`python -m xmr_jax.search index --features DIR` indexes the images of DIR, a Flickr30K or MS-COCO
folder in TERAN's layout (the `--manual_dir` of data_pipelines' flickr30k_regions / coco_regions
builders, see data_pipelines/builders/region_features.py):

    [annotations/]dataset_flickr30k.json | dataset_coco.json   Karpathy split file: the images,
                                   their ids (Flickr30K imgid / COCO cocoid) and splits
    features_36/bu_att/{id}.npz    key 'feat': float [36, 2048] bottom-up-attention region features
    features_36/bu_box/{id}.npy    float [36, 4] region boxes (x1, y1, x2, y2) in pixels
    flickr30k-images/* (Flickr30K) or annotations/captions_{train,val}2014.json (COCO): the image
                                   sizes (w, h) the boxes are divided by

The reading is the builders' shared code (data_pipelines.builders.region_features, which needs
no TensorFlow): `parse_karpathy` lists the images, `image_size_from_file` reads Flickr30K's sizes,
`check_feature_files` checks every file's header before any encoding and `load_example` reads
one image (boxes divided by (w, h, w, h)). Only the two builders' per-data-set rules (id key,
image path, COCO's size annotations) are restated here: their modules subclass
tensorflow_datasets' builder, which imports TensorFlow. The index names each image by its id
({id} of the feature files). No TensorFlow is imported.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xmr_jax.search.encoders import Encoders
from xmr_jax.search.errors import SearchError
from xmr_jax.search.index import Gallery

SPLITS = ("train", "val", "test")
COCO_SIZE_FILES = ("annotations/captions_train2014.json", "annotations/captions_val2014.json")


def _flickr_path(record: dict, where: str) -> str:
    from data_pipelines.builders import annotations as ann

    return f"flickr30k-images/{ann.get_field(record, 'filename', str, where)}"


def _coco_path(record: dict, where: str) -> str:
    from data_pipelines.builders import annotations as ann

    return f"{ann.get_field(record, 'filepath', str, where).strip('/')}/{ann.get_field(record, 'filename', str, where)}"


# Karpathy split file -> (id key, image path of a record): the flickr30k_regions / coco_regions
# builders' rules. Their builder modules need tensorflow_datasets.core, which needs TensorFlow; the
# shared, TensorFlow-free part (data_pipelines.builders.region_features) does the rest.
LAYOUTS = {"dataset_flickr30k.json": ("imgid", _flickr_path), "dataset_coco.json": ("cocoid", _coco_path)}


def _region_features():
    """data_pipelines.builders.region_features. It imports tensorflow_datasets at the top, which,
    without TensorFlow installed (GPU machines), prints a banner and an error log but still loads
    what that module uses; both are silenced here."""
    import contextlib
    import importlib.util
    import io
    import logging

    if "data_pipelines.builders.region_features" in sys.modules or importlib.util.find_spec("tensorflow"):
        from data_pipelines.builders import region_features
        return region_features
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from data_pipelines.builders import region_features
    finally:
        absl.setLevel(level)
    return region_features


def _image_sizes(root: Path, records: list) -> list[tuple[int, int]]:
    """(w, h) per record: COCO's caption annotations (width/height) when present, as the
    coco_regions builder reads them, else the image files' headers (Flickr30K, as TERAN)."""
    from data_pipelines.builders import annotations as ann
    rf = _region_features()

    present = [root / f for f in COCO_SIZE_FILES if (root / f).is_file()]
    if not present:
        return rf._parallel(lambda r: rf.image_size_from_file(root / r.path, r.source), records)
    sizes = {}
    for path in present:
        data = ann.load_json(path)
        for k, im in enumerate(ann.get_field(data, "images", list, path.name)):
            where = f"{path.name} images[{k}]"
            sizes[ann.get_field(im, "id", int, where)] = (ann.get_field(im, "width", int, where),
                                                          ann.get_field(im, "height", int, where))
    missing = [r for r in records if r.image_id not in sizes]
    if missing:
        raise ann.AnnotationError(f"{missing[0].source}: image id {missing[0].image_id} has no width/height in "
                                  f"{' or '.join(str(p) for p in present)}")
    return [sizes[r.image_id] for r in records]


def teran_records(folder: str, splits: Sequence[str] = SPLITS) -> list:
    """The images of `splits` in a TERAN folder, in the Karpathy file's order, with their (w, h):
    data_pipelines' RegionRecord (image_id, split, path, size, source). Errors (SearchError) name
    the file and what was expected."""
    import dataclasses

    from data_pipelines.builders import annotations as ann
    rf = _region_features()

    if not os.path.isdir(folder):
        raise SearchError(f"--features {folder!r} is not a folder (expected TERAN's data/f30k or data/coco layout)")
    root = Path(folder)
    found = [name for name in LAYOUTS if (root / name).is_file() or (root / "annotations" / name).is_file()]
    if not found:
        raise SearchError(f"--features {folder!r} holds no {' or '.join(LAYOUTS)} (at the top or in annotations/): "
                          "expected TERAN's layout (Karpathy file, features_36/bu_att, features_36/bu_box)")
    id_key, image_path = LAYOUTS[found[0]]
    try:
        path = rf.find_karpathy_json(root, found[0], "--features", "TERAN's layout")
        records = [r for r in rf.parse_karpathy(path, id_key, image_path) if r.split in splits]
        if not records:
            raise SearchError(f"--features {folder!r}: {path.name} has no image in split(s) {list(splits)}")
        sizes = _image_sizes(root, records)
    except ann.DataSetError as e:
        raise SearchError(f"--features: {e}") from e
    return [dataclasses.replace(r, size=tuple(s)) for r, s in zip(records, sizes)]


def region_gallery(enc: Encoders, folder: str, records: list, check_files: bool = True) -> Gallery:
    """A Gallery of `records` (`teran_records`) of `folder`: load(i) -> (regions float32 [36, 2048],
    boxes float32 [36, 4] divided by (w, h, w, h)), named by image id. check_files: read every
    feature file's header now (missing file, wrong shape, box count != region count: a SearchError
    naming the file before anything is encoded)."""
    from data_pipelines.builders import annotations as ann
    rf = _region_features()

    if not enc.takes_regions:
        raise SearchError("--features: the model takes images, not region features; index an image folder "
                          "with --images")
    width = enc.image_inputs[0].shape[-1]
    if width != rf.FEATURE_DIM:
        raise SearchError(f"--features: TERAN's region features are [{rf.NUM_REGIONS}, {rf.FEATURE_DIM}] but the "
                          f"model takes regions of width {width} (config.model.tgdt_regions.region_dim)")
    root = Path(folder)
    if check_files:
        try:
            rf._parallel(lambda rec: rf.check_feature_files(root, rec), records)
        except ann.DataSetError as e:
            raise SearchError(f"--features: {e}") from e

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            example = rf.load_example(root, records[i])
        except (ann.DataSetError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise SearchError(f"--features: {e}") from e
        return example["regions"], example["boxes"]

    return Gallery([str(r.image_id) for r in records], os.path.abspath(folder), load)


def is_region_index(index) -> bool:
    """True when the index (ImageIndex or IndexStore) was built from region features."""
    inputs = index.meta.get("model", {}).get("inputs") or {}
    return "regions" in (inputs.get("encode_image") or {})
