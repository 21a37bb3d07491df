"""synthetic_people: procedurally drawn pedestrians with template captions (TFDS builder)."""

from __future__ import annotations

import time

from data_pipelines.builders.synthetic_people.synthetic_people import (
    BUILDER_CONFIGS,
    SyntheticPeople,
    SyntheticPeopleConfig,
)

__all__ = ["SyntheticPeople", "SyntheticPeopleConfig", "BUILDER_CONFIGS", "build"]


def build(data_dir: str, config_name: str = "default", verbose: bool = True,
          **overrides) -> SyntheticPeople:
    """Prepares synthetic_people under `data_dir` if not prepared yet and returns the builder.

    Args:
      data_dir: TFDS data directory (the data lands in data_dir/synthetic_people/<config>/1.0.0).
      config_name: one of "default", "five_captions", "tiny"; with `overrides`, the name of the
        custom config (must not be one of the predefined names).
      verbose: print the build time and per-split counts.
      **overrides: SyntheticPeopleConfig fields (seed, num_train_ids, num_test_ids, images_per_id,
        captions_per_image, image_height, image_width, supersample) for a custom config, based on
        "default".
    """
    known = {c.name: c for c in BUILDER_CONFIGS}
    if overrides:
        if config_name in known:
            raise ValueError(
                f"synthetic_people.build: config_name {config_name!r} is predefined; give a new "
                f"name for a custom config with overrides {sorted(overrides)}")
        fields = set(SyntheticPeopleConfig.__dataclass_fields__) - {"name", "version", "description"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"synthetic_people.build: unknown config fields {unknown}; "
                             f"expected some of {sorted(fields)}")
        config = SyntheticPeopleConfig(name=config_name, version="1.0.0",
                                       description="custom", **overrides)
        config.validate()
        builder = SyntheticPeople(data_dir=data_dir, config=config)
    else:
        if config_name not in known:
            raise ValueError(f"synthetic_people.build: unknown config_name {config_name!r}; "
                             f"expected one of {sorted(known)} (or pass overrides for a custom one)")
        builder = SyntheticPeople(data_dir=data_dir, config=config_name)
    if not builder.is_prepared():
        start = time.time()
        builder.download_and_prepare()
        if verbose:
            counts = {name: split.num_examples for name, split in builder.info.splits.items()}
            print(f"synthetic_people/{builder.builder_config.name}: built in "
                  f"{time.time() - start:.1f}s at {builder.data_dir}; images per split {counts}",
                  flush=True)
    return builder
