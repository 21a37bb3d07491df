"""Flickr30K (Karpathy splits) TFDS builder."""

from data_pipelines.builders.flickr30k_karpathy.flickr30k_karpathy import Flickr30kKarpathy

__all__ = ["Flickr30kKarpathy"]
