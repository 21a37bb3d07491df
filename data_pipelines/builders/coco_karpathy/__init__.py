"""MS-COCO (Karpathy splits) TFDS builder."""

from data_pipelines.builders.coco_karpathy.coco_karpathy import CocoKarpathy

__all__ = ["CocoKarpathy"]
