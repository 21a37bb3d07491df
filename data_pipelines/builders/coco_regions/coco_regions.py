"""MS-COCO as bottom-up-attention region features (TERAN's layout, used by TGDT): 113,287
(train + restval) / 5,000 / 5,000 images (Karpathy splits; the 5K test set is evaluated whole
and as 5 folds of 1,000), 5 captions each; fields in region_features.py."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders import region_features as rf

SIZE_FILES = ("annotations/captions_train2014.json", "annotations/captions_val2014.json")
LAYOUT = """\
<manual_dir>/                      (TERAN's data/coco)
  [annotations/]dataset_coco.json  Karpathy split file: {"images": [{"filepath": "val2014",
                     "filename": "COCO_val2014_000000391895.jpg", "split": "train"|"restval"|"val"|"test",
                     "sentences": [{"raw": str, "tokens": [...]}, ...], "cocoid": int}]}
  features_36/bu_att/<cocoid>.npz  key 'feat': float [36, 2048] bottom-up-attention region features
  features_36/bu_box/<cocoid>.npy  float [36, 4] region boxes (x1, y1, x2, y2) in pixels
  annotations/captions_train2014.json, annotations/captions_val2014.json
                     COCO 2014 caption annotations, read for each image's "width"/"height"
                     (without them: train2014/ and val2014/ image files, read for their size)
"""


def _image_path(record: dict, where: str) -> str:
    folder = ann.get_field(record, "filepath", str, where).strip("/")
    return f"{folder}/{ann.get_field(record, 'filename', str, where)}"


def _sizes_from_annotations(paths: list[Path]) -> dict[int, tuple[int, int]]:
    sizes: dict[int, tuple[int, int]] = {}
    for path in paths:
        data = ann.load_json(path)
        images = ann.get_field(data, "images", list, f"{path.name} (top level)")
        for i, im in enumerate(images):
            where = f"{path.name} images[{i}]"
            sizes[ann.get_field(im, "id", int, where)] = (
                ann.get_field(im, "width", int, where), ann.get_field(im, "height", int, where))
    return sizes


class CocoRegions(rf.RegionFeaturesBuilder, tfds.core.GeneratorBasedBuilder):
    """MS-COCO region features; image_id = cocoid (names the feature files); restval joins train;
    first 5 captions per image; sizes from the COCO annotations' width/height as TERAN/TGDT do."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
    HOMEPAGE = "https://github.com/mesnico/TERAN"
    DESCRIPTION = ("MS-COCO 2014, Karpathy splits (restval in train), as 36 bottom-up-attention region "
                   "features [36, 2048] and normalized boxes [36, 4] per image, 5 captions each.")
    CITATION = ("Lin et al., ECCV 2014; Anderson et al., Bottom-up and top-down attention, CVPR 2018; "
                "Messina et al., TERAN, ACM TOMM 2021.")

    def parse(self, manual_dir: Path):
        path = rf.find_karpathy_json(manual_dir, "dataset_coco.json", self.name, LAYOUT)
        return rf.parse_karpathy(path, "cocoid", _image_path), path

    def image_sizes(self, manual_dir: Path, records):
        present = [manual_dir / f for f in SIZE_FILES if (manual_dir / f).is_file()]
        if not present:
            ann.require_dirs(manual_dir, sorted({r.path.split("/")[0] for r in records}), self.name, LAYOUT)
            return rf._parallel(lambda r: rf.image_size_from_file(manual_dir / r.path, r.source), records)
        sizes = _sizes_from_annotations(present)
        out = []
        for r in records:
            if r.image_id not in sizes:
                raise ann.AnnotationError(
                    f"{r.source}: image id {r.image_id} has no width/height in {' or '.join(str(p) for p in present)}"
                )
            out.append(sizes[r.image_id])
        return out
