"""RSTPReid (text-based person search): 20,505 images, 4,101 ids, 2 captions per image."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders.manual_builder import ManualRetrievalBuilder

LAYOUT = """\
<manual_dir>/
  data_captions.json list of {"split": "train"|"val"|"test", "captions": [str, ...],
                     "img_path": "3903_c14_0007.jpg", "id": int}  (ids 0-based)
  imgs/              all images, flat (paths = imgs/<img_path>)
"""


class Rstpreid(ManualRetrievalBuilder, tfds.core.GeneratorBasedBuilder):
    """RSTPReid; splits train/val/test; train pids relabelled 0..N-1 by sorted original id."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
    SPLITS = ("train", "val", "test")
    ENCODING_FORMAT = "jpeg"
    HOMEPAGE = "https://github.com/NjtechCVLab/RSTPReid-Dataset"
    DESCRIPTION = "RSTPReid person images with natural-language descriptions (one example per image)."
    CITATION = "Zhu et al., DSSL: Deep Surroundings-person Separation Learning for Text-based Person Retrieval, ACM MM 2021."

    def parse(self, manual_dir: Path, counts):
        path = ann.find_file(manual_dir, ["data_captions.json"], self.name, LAYOUT)
        ann.require_dirs(manual_dir, ["imgs"], self.name, LAYOUT)
        records = ann.parse_person_annotations(
            path, image_key="img_path", image_dir="imgs", split_map=ann.PERSON_SPLITS, counts=counts
        )
        return records, path
