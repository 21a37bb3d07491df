"""MS-COCO with the Karpathy splits: 113,287 (train+restval) / 5,000 / 5,000 images, 5 captions."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders.manual_builder import ManualRetrievalBuilder

LAYOUT = """\
<manual_dir>/
  dataset_coco.json  Karpathy split file: {"images": [{"filepath": "val2014",
                     "filename": "COCO_val2014_000000391895.jpg",
                     "split": "train"|"restval"|"val"|"test", "sentences": [{"raw": str, ...}, ...],
                     "cocoid": int, "imgid": int, ...}]}
  train2014/         COCO 2014 train images (paths = <filepath>/<filename>)
  val2014/           COCO 2014 val images
"""


def _image_path(record: dict, where: str) -> str:
    folder = ann.get_field(record, "filepath", str, where).strip("/")
    return f"{folder}/{ann.get_field(record, 'filename', str, where)}"


class CocoKarpathy(ManualRetrievalBuilder, tfds.core.GeneratorBasedBuilder):
    """COCO Karpathy splits; restval joins train; pid = cocoid (train: relabelled 0..N-1).

    Keeps the first 5 captions of each image (a few COCO images have 6 or 7), so that the
    5K/1K test protocols see exactly 5 captions per image.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
    SPLITS = ("train", "val", "test")
    ENCODING_FORMAT = "jpeg"
    CAPTIONS_PER_IMAGE = 5
    HOMEPAGE = "https://cocodataset.org/"
    DESCRIPTION = "MS-COCO 2014 images with 5 captions each, Karpathy splits (restval in train)."
    CITATION = "Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014; Karpathy & Fei-Fei, CVPR 2015."

    def parse(self, manual_dir: Path, counts):
        path = ann.find_file(manual_dir, ["dataset_coco.json"], self.name, LAYOUT)
        ann.require_dirs(manual_dir, ["train2014", "val2014"], self.name, LAYOUT)
        records = ann.parse_karpathy_annotations(
            path,
            id_key="cocoid",
            image_path=_image_path,
            counts=counts,
            captions_per_image=self.CAPTIONS_PER_IMAGE,
        )
        return records, path
