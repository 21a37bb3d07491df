"""RSTPReid TFDS builder."""

from data_pipelines.builders.rstpreid.rstpreid import Rstpreid

__all__ = ["Rstpreid"]
