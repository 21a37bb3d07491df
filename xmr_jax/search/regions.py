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

Everything is the builders' own code: the builder class parses the Karpathy file and reads the
image sizes (`parse`, `image_sizes`), `region_features.check_feature_files` checks every file's
header before any encoding and `region_features.load_example` reads one image (boxes divided by
(w, h, w, h)). The index names each image by its id ({id} of the feature files). No TensorFlow
is imported (only tensorflow_datasets' builder base classes).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xmr_jax.search.encoders import Encoders
from xmr_jax.search.errors import SearchError
from xmr_jax.search.index import Gallery

# builder name -> its Karpathy split file (at DIR or DIR/annotations)
LAYOUTS = {"flickr30k_regions": "dataset_flickr30k.json", "coco_regions": "dataset_coco.json"}
SPLITS = ("train", "val", "test")


def _builder(folder: str):
    """The region builder whose Karpathy split file `folder` holds (an instance: only its parsing
    methods are used; it writes nothing)."""
    from data_pipelines import build

    for name, filename in LAYOUTS.items():
        if any(os.path.isfile(os.path.join(folder, sub, filename)) for sub in ("", "annotations")):
            return build.builder_class(name)(data_dir=os.path.join(tempfile.gettempdir(), "xmr_unused_tfds"))
    raise SearchError(f"--features {folder!r} holds no {' or '.join(LAYOUTS.values())} (at the top or in "
                      "annotations/): expected TERAN's layout (Karpathy file, features_36/bu_att, features_36/bu_box)")


def teran_records(folder: str, splits: Sequence[str] = SPLITS) -> list:
    """The images of `splits` in a TERAN folder, in the Karpathy file's order, with their (w, h):
    data_pipelines' RegionRecord (image_id, split, path, size, source). Errors (SearchError) name
    the file and what was expected."""
    import dataclasses

    from data_pipelines.builders import annotations as ann

    if not os.path.isdir(folder):
        raise SearchError(f"--features {folder!r} is not a folder (expected TERAN's data/f30k or data/coco layout)")
    builder = _builder(folder)
    try:
        records, source = builder.parse(Path(folder))
        records = [r for r in records if r.split in splits]
        if not records:
            raise SearchError(f"--features {folder!r}: {source.name} has no image in split(s) {list(splits)}")
        sizes = builder.image_sizes(Path(folder), records)
    except ann.DataSetError as e:
        raise SearchError(f"--features: {e}") from e
    return [dataclasses.replace(r, size=tuple(s)) for r, s in zip(records, sizes)]


def region_gallery(enc: Encoders, folder: str, records: list, check_files: bool = True) -> Gallery:
    """A Gallery of `records` (`teran_records`) of `folder`: load(i) -> (regions float32 [36, 2048],
    boxes float32 [36, 4] divided by (w, h, w, h)), named by image id. check_files: read every
    feature file's header now (missing file, wrong shape, box count != region count: a SearchError
    naming the file before anything is encoded)."""
    from data_pipelines.builders import annotations as ann
    from data_pipelines.builders import region_features as rf

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
