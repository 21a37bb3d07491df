"""TFDS builder `synthetic_people`: procedurally drawn pedestrians with template captions.

Deterministic from the config's seed; nothing is downloaded. Identities are distinct attribute
combinations (see draw.py); the first `num_train_ids` (in a seeded random order) form the train
split, the next `num_test_ids` the test split, so the splits share no identity. Every identity has a
random "original" id (a permutation of 1..num_train_ids+num_test_ids, like CUHK-PEDES' 1-based ids):
train pids are relabelled 0..N-1 in order of original id; test pids keep the original id. The
original id is also in each example's `path` ("train/p00017_2.png").

Configs: "default" (1500/250 ids, 4 images/id, 2 captions, 64x32), "five_captions" (6000/1000
ids, 1 image/id, 5 captions per image, 64x32: caption retrieval in the Flickr30K/COCO layout, see
below), "tiny" (tests), or any `SyntheticPeopleConfig(...)` passed as `config=`.

"five_captions" has ONE image per identity, so each image is the only one its captions describe
and image-level positives (TGDT's "same image id") are meaningful: with several images per
identity the template captions could not tell the images of one identity apart. Its test split
has the Flickr30K test size (1000 images / 5000 captions); it draws the same 7000 images as
"default" (same build time).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders.clean_failure import CleanFailureMixin
from data_pipelines.builders.synthetic_people import captions as captions_lib
from data_pipelines.builders.synthetic_people import draw
from data_pipelines.features import retrieval_features

_SPLIT_CODES = {"train": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class SyntheticPeopleConfig(tfds.core.BuilderConfig):
    """Size and look of a synthetic_people data set (all fields change the generated data)."""

    seed: int = 0
    num_train_ids: int = 1500
    num_test_ids: int = 250
    images_per_id: int = 4
    captions_per_image: int = 2
    image_height: int = 64
    image_width: int = 32
    supersample: int = 4

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        for field in ("num_train_ids", "num_test_ids", "images_per_id", "captions_per_image",
                      "supersample"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"SyntheticPeopleConfig {self.name!r}: {field} must be >= 1, "
                                 f"got {getattr(self, field)!r}")
        if self.image_height < 8 or self.image_width < 4:
            raise ValueError(f"SyntheticPeopleConfig {self.name!r}: image size must be at least "
                             f"8x4, got {self.image_height}x{self.image_width}")


def _config(name: str, description: str, **kwargs) -> SyntheticPeopleConfig:
    return SyntheticPeopleConfig(name=name, version="1.0.0", description=description, **kwargs)


BUILDER_CONFIGS = [
    _config("default", "1500 train / 250 test ids, 4 images per id, 2 captions per image, 64x32."),
    _config("five_captions", "Caption retrieval: 6000 train / 1000 test ids, 1 image per id, "
            "5 captions per image, 64x32.",
            num_train_ids=6000, num_test_ids=1000, images_per_id=1, captions_per_image=5),
    _config("tiny", "For tests: 12 train / 6 test ids, 2 images per id, 2 captions, 64x32.",
            num_train_ids=12, num_test_ids=6, images_per_id=2),
]


class SyntheticPeople(CleanFailureMixin, tfds.core.GeneratorBasedBuilder):
    """Synthetic text-to-image person retrieval data (one example per image)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = BUILDER_CONFIGS
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=retrieval_features("png"),
            supervised_keys=None,
            disable_shuffling=True,  # keep examples in image_index order on disk
            description=__doc__,
        )

    def _log_download_bytes(self) -> None:
        # Replaces TFDS' "Downloading and preparing dataset Unknown size ...": nothing is
        # downloaded; the images are drawn here.
        print(f"synthetic_people: drawing {self.info.full_name} into {self.data_dir}", flush=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg: SyntheticPeopleConfig = self.builder_config
        cfg.validate()
        total = cfg.num_train_ids + cfg.num_test_ids
        rng = np.random.default_rng([cfg.seed, 0])
        identities = draw.sample_identities(rng, total)
        original_ids = rng.permutation(total) + 1
        train = sorted(zip(original_ids[: cfg.num_train_ids], identities[: cfg.num_train_ids]))
        test = sorted(zip(original_ids[cfg.num_train_ids:], identities[cfg.num_train_ids:]))
        train_people = [(pid, int(orig), attrs) for pid, (orig, attrs) in enumerate(train)]
        test_people = [(int(orig), int(orig), attrs) for orig, attrs in test]
        return {"train": self._generate_examples("train", train_people),
                "test": self._generate_examples("test", test_people)}

    def _generate_examples(self, split: str, people):
        """Yields (key, example) per image; people = [(pid, original_id, Attributes)]."""
        cfg: SyntheticPeopleConfig = self.builder_config
        count = len(people) * cfg.images_per_id
        start, index = time.time(), 0
        for pid, original_id, attrs in people:
            for k in range(cfg.images_per_id):
                # One generator per image: the data does not depend on generation order.
                rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index])
                image = draw.render(attrs, rng, cfg.image_height, cfg.image_width, cfg.supersample)
                texts = [captions_lib.make_caption(attrs, rng) for _ in range(cfg.captions_per_image)]
                yield index, {
                    "image": image,
                    "captions": texts,
                    "pid": pid,
                    "image_index": index,
                    "path": f"{split}/p{original_id:05d}_{k}.png",
                }
                index += 1
                if index % 1000 == 0 or index == count:
                    print(f"synthetic_people/{cfg.name} {split}: {index}/{count} images "
                          f"({time.time() - start:.1f}s)", flush=True)
