"""Flickr30K with the Karpathy splits: 29,000 / 1,014 / 1,000 images, 5 captions each."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders.manual_builder import ManualRetrievalBuilder

IMAGE_DIR = "flickr30k-images"
LAYOUT = f"""\
<manual_dir>/
  dataset_flickr30k.json  Karpathy split file: {{"images": [{{"filename": "1000092795.jpg",
                          "split": "train"|"val"|"test", "sentences": [{{"raw": str, ...}} x5],
                          "imgid": int, ...}}]}}
  {IMAGE_DIR}/       all 31,783 images, flat (paths = {IMAGE_DIR}/<filename>)
"""


def _image_path(record: dict, where: str) -> str:
    return f"{IMAGE_DIR}/{ann.get_field(record, 'filename', str, where)}"


class Flickr30kKarpathy(ManualRetrievalBuilder, tfds.core.GeneratorBasedBuilder):
    """Flickr30K Karpathy splits; pid = imgid (train: relabelled 0..N-1 by sorted imgid)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
    SPLITS = ("train", "val", "test")
    ENCODING_FORMAT = "jpeg"
    CAPTIONS_PER_IMAGE = 5
    HOMEPAGE = "https://shannon.cs.illinois.edu/DenotationGraph/"
    DESCRIPTION = "Flickr30K images with 5 captions each, Karpathy train/val/test splits."
    CITATION = "Young et al., From image descriptions to visual denotations, TACL 2014; Karpathy & Fei-Fei, CVPR 2015."

    def parse(self, manual_dir: Path, counts):
        path = ann.find_file(manual_dir, ["dataset_flickr30k.json"], self.name, LAYOUT)
        ann.require_dirs(manual_dir, [IMAGE_DIR], self.name, LAYOUT)
        records = ann.parse_karpathy_annotations(
            path,
            id_key="imgid",
            image_path=_image_path,
            counts=counts,
            captions_per_image=self.CAPTIONS_PER_IMAGE,
        )
        return records, path
