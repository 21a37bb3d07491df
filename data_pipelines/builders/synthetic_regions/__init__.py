"""synthetic_regions: random region features of coloured objects with template captions (TFDS builder).

The embedded data set of the TGDT-as-published demo (configs/tgdt/regions_demo.py): the example
fields of the region-feature builders (region_features.py), drawn here, no download.
"""

from data_pipelines.builders.synthetic_regions.synthetic_regions import (
    BUILDER_CONFIGS,
    VOCAB_PATH,
    SyntheticRegions,
    SyntheticRegionsConfig,
)

__all__ = ["SyntheticRegions", "SyntheticRegionsConfig", "BUILDER_CONFIGS", "VOCAB_PATH"]
