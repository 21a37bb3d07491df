"""ICFG-PEDES (text-based person search): 54,522 images, 4,102 ids, 1 caption per image."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders.manual_builder import ManualRetrievalBuilder

LAYOUT = """\
<manual_dir>/
  ICFG-PEDES.json    (or ICFG_PEDES.json) list of {"split": "train"|"test", "captions": [str, ...],
                     "file_path": "test/0027/0027_010_05_0303morning_0029_0_ex.jpg",
                     "processed_tokens": [...], "id": int}  (ids 0-based)
  imgs/              the image folders from the release: imgs/train/, imgs/test/
                     (paths = imgs/<file_path>)
"""


class IcfgPedes(ManualRetrievalBuilder, tfds.core.GeneratorBasedBuilder):
    """ICFG-PEDES; splits train/test; train pids relabelled 0..N-1 by sorted original id."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
    SPLITS = ("train", "test")
    ENCODING_FORMAT = "jpeg"
    HOMEPAGE = "https://github.com/zifyloo/SSAN"
    DESCRIPTION = "ICFG-PEDES person images with natural-language descriptions (one example per image)."
    CITATION = "Ding et al., Semantically Self-Aligned Network for Text-to-Image Part-aware Person Re-identification, 2021."

    def parse(self, manual_dir: Path, counts):
        path = ann.find_file(manual_dir, ["ICFG-PEDES.json", "ICFG_PEDES.json"], self.name, LAYOUT)
        ann.require_dirs(manual_dir, ["imgs"], self.name, LAYOUT)
        records = ann.parse_person_annotations(
            path,
            image_key="file_path",
            image_dir="imgs",
            split_map={"train": "train", "test": "test"},
            counts=counts,
        )
        return records, path
