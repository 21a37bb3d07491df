"""CUHK-PEDES TFDS builder."""

from data_pipelines.builders.cuhk_pedes.cuhk_pedes import CuhkPedes

__all__ = ["CuhkPedes"]
