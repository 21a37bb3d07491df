"""ICFG-PEDES TFDS builder."""

from data_pipelines.builders.icfg_pedes.icfg_pedes import IcfgPedes

__all__ = ["IcfgPedes"]
