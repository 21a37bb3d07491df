"""Flickr30K as bottom-up-attention region features (TERAN's layout, used by TGDT):
29,000 / 1,014 / 1,000 images (Karpathy splits), 5 captions each; fields in region_features.py."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders import region_features as rf

IMAGE_DIR = "flickr30k-images"
LAYOUT = f"""\
<manual_dir>/                      (TERAN's data/f30k)
  [annotations/]dataset_flickr30k.json  Karpathy split file: {{"images": [{{"filename": "1000092795.jpg",
                          "split": "train"|"val"|"test", "sentences": [{{"raw": str, "tokens": [...]}} x5],
                          "imgid": int}}]}}
  features_36/bu_att/<imgid>.npz  key 'feat': float [36, 2048] bottom-up-attention region features
  features_36/bu_box/<imgid>.npy  float [36, 4] region boxes (x1, y1, x2, y2) in pixels
  {IMAGE_DIR}/<filename>     the images, read only for their (w, h) to normalize the boxes
"""


def _image_path(record: dict, where: str) -> str:
    return f"{IMAGE_DIR}/{ann.get_field(record, 'filename', str, where)}"


class Flickr30kRegions(rf.RegionFeaturesBuilder, tfds.core.GeneratorBasedBuilder):
    """Flickr30K region features; image_id = imgid (= the record's position in the JSON, which
    names TERAN's feature files); sizes read from the image files as TERAN/TGDT do."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
    HOMEPAGE = "https://github.com/mesnico/TERAN"
    DESCRIPTION = ("Flickr30K, Karpathy splits, as 36 bottom-up-attention region features [36, 2048] and "
                   "normalized boxes [36, 4] per image, 5 captions each.")
    CITATION = ("Young et al., TACL 2014; Anderson et al., Bottom-up and top-down attention, CVPR 2018; "
                "Messina et al., TERAN, ACM TOMM 2021.")

    def parse(self, manual_dir: Path):
        path = rf.find_karpathy_json(manual_dir, "dataset_flickr30k.json", self.name, LAYOUT)
        ann.require_dirs(manual_dir, [IMAGE_DIR], self.name, LAYOUT)
        return rf.parse_karpathy(path, "imgid", _image_path), path

    def image_sizes(self, manual_dir: Path, records):
        return rf._parallel(lambda r: rf.image_size_from_file(manual_dir / r.path, r.source), records)
