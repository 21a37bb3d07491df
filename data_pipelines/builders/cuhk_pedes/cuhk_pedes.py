"""CUHK-PEDES (text-based person search): 40,206 images, 13,003 ids, 2 captions per image."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders.manual_builder import ManualRetrievalBuilder

LAYOUT = """\
<manual_dir>/
  reid_raw.json      list of {"split": "train"|"val"|"test", "captions": [str, ...],
                     "file_path": "CUHK01/0363004.png", "processed_tokens": [...], "id": int}
                     (ids start at 1)
  imgs/              the image folders from the release: imgs/CUHK01/, imgs/CUHK03/,
                     imgs/Market/, imgs/test_query/, imgs/train_query/ (paths = imgs/<file_path>)
"""


class CuhkPedes(ManualRetrievalBuilder, tfds.core.GeneratorBasedBuilder):
    """CUHK-PEDES; train pids relabelled 0..N-1 by sorted original id (= id - 1)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
    SPLITS = ("train", "val", "test")
    ENCODING_FORMAT = "png"  # CUHK01/CUHK03 images are PNG; Market/query JPEGs are kept as JPEG
    HOMEPAGE = "https://github.com/ShuangLI59/Person-Search-with-Natural-Language-Description"
    DESCRIPTION = "CUHK-PEDES person images with natural-language descriptions (one example per image)."
    CITATION = "Li et al., Person Search with Natural Language Description, CVPR 2017."

    def parse(self, manual_dir: Path, counts):
        path = ann.find_file(manual_dir, ["reid_raw.json"], self.name, LAYOUT)
        ann.require_dirs(manual_dir, ["imgs"], self.name, LAYOUT)
        records = ann.parse_person_annotations(
            path, image_key="file_path", image_dir="imgs", split_map=ann.PERSON_SPLITS, counts=counts
        )
        return records, path
