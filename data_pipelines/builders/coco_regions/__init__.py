"""MS-COCO region features (TERAN / TGDT layout) TFDS builder."""

from data_pipelines.builders.coco_regions.coco_regions import CocoRegions

__all__ = ["CocoRegions"]
