"""Flickr30K region features (TERAN / TGDT layout) TFDS builder."""

from data_pipelines.builders.flickr30k_regions.flickr30k_regions import Flickr30kRegions

__all__ = ["Flickr30kRegions"]
