"""synthetic_regions: TERAN-style region features of synthetic scenes, 5 template captions per image.

Each image shows 2 or 3 objects, each a (colour, noun) pair with distinct nouns (8 colours x 12
nouns). An object covers `regions_per_object` regions; every region feature is

    noun_vector[noun] + colour_scale * colour_vector[colour] + noise * N(0, 1)      float32 [D]

(the vectors are fixed random Gaussians of the data set's seed, one per noun and per colour) and
the remaining regions are background noise. Boxes are random normalized (x1, y1, x2, y2) inside
[0, 1]. The captions name the objects through templates ("a red dog and a blue ball .", "there is
a blue ball next to a red dog .", ...), some only one of them, so a caption is matched to its
image by which colours go with which nouns: retrieval is learnable, and a bag of words that
ignores the pairing is not enough to rank the right image first.

Fields (as data_pipelines/builders/region_features.py, with this config's sizes):

    regions      float32 [num_regions, region_dim]
    boxes        float32 [num_regions, 4]
    captions     str [5]
    image_id     int64    (= image_index)
    image_index  int64    0-based position within its split
    image_size   int32 [2] (w, h) = (640, 480), informational
    path         str      "synthetic/<split>/<index>"

Every word of the captions is in `VOCAB_PATH` (a BERT-style vocab.txt, [PAD] = 0) shipped with
the builder. Deterministic: one generator per image from (seed, split, index).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders.clean_failure import CleanFailureMixin

VOCAB_PATH = Path(__file__).with_name("vocab.txt")

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
NOUNS = ("dog", "cat", "man", "woman", "ball", "bike", "car", "tree", "horse", "boat", "bird", "girl")
TEMPLATES_2 = ("a {0} and a {1} .", "there is a {0} next to a {1} .", "a photo of a {0} with a {1} .",
               "{0} , {1} .", "a {1} near a {0} .")
TEMPLATES_1 = ("a {0} .", "there is a {0} .", "a photo of a {0} .")
CAPTIONS_PER_IMAGE = 5
_SPLIT_CODES = {"train": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class SyntheticRegionsConfig(tfds.core.BuilderConfig):
    """Sizes of a synthetic_regions data set (every field changes the generated data)."""

    seed: int = 0
    num_train: int = 3000
    num_test: int = 200
    num_regions: int = 12
    region_dim: int = 32
    regions_per_object: int = 3
    colour_scale: float = 0.8
    noise: float = 0.3

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        for field in ("num_train", "num_test", "region_dim", "regions_per_object"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"SyntheticRegionsConfig {self.name!r}: {field} must be >= 1, got {getattr(self, field)!r}")
        if self.num_regions < 3 * self.regions_per_object:
            raise ValueError(f"SyntheticRegionsConfig {self.name!r}: num_regions={self.num_regions} cannot hold 3 "
                             f"objects of regions_per_object={self.regions_per_object}")


BUILDER_CONFIGS = [
    SyntheticRegionsConfig(name="default", version="1.0.0",
                           description="3000 train / 200 test images, 12 regions x 32, 5 captions each."),
    SyntheticRegionsConfig(name="tiny", version="1.0.0", num_train=60, num_test=20,
                           description="For tests: 60 train / 20 test images, 12 regions x 32, 5 captions each."),
]


def vocabulary() -> list[str]:
    """The tokens of VOCAB_PATH, in id order ([PAD] = 0)."""
    words = sorted({w for t in TEMPLATES_1 + TEMPLATES_2 for w in t.replace("{0}", "").replace("{1}", "").split()})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(COLOURS) + list(NOUNS) + words


def scene(cfg: SyntheticRegionsConfig, vectors: tuple[np.ndarray, np.ndarray], rng: np.random.Generator):
    """One image: (regions float32 [N, D], boxes float32 [N, 4], captions list of 5 str)."""
    noun_vec, colour_vec = vectors
    n_obj = int(rng.integers(2, 4))
    nouns = rng.choice(len(NOUNS), size=n_obj, replace=False)
    colours = rng.integers(0, len(COLOURS), size=n_obj)
    regions = cfg.noise * rng.standard_normal((cfg.num_regions, cfg.region_dim))
    slots = rng.permutation(cfg.num_regions)
    for k in range(n_obj):
        rows = slots[k * cfg.regions_per_object:(k + 1) * cfg.regions_per_object]
        regions[rows] += noun_vec[nouns[k]] + cfg.colour_scale * colour_vec[colours[k]]
    xy = rng.uniform(0.0, 0.6, size=(cfg.num_regions, 2))
    wh = rng.uniform(0.1, 0.4, size=(cfg.num_regions, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    names = [f"{COLOURS[c]} {NOUNS[n]}" for n, c in zip(nouns, colours)]
    captions = []
    for j in range(CAPTIONS_PER_IMAGE):
        if j == CAPTIONS_PER_IMAGE - 1:   # one caption names a single object
            captions.append(TEMPLATES_1[int(rng.integers(len(TEMPLATES_1)))].format(names[int(rng.integers(n_obj))]))
            continue
        a, b = rng.choice(n_obj, size=2, replace=False)
        captions.append(TEMPLATES_2[int(rng.integers(len(TEMPLATES_2)))].format(names[a], names[b]))
    return regions.astype(np.float32), boxes.astype(np.float32), captions


class SyntheticRegions(CleanFailureMixin, tfds.core.GeneratorBasedBuilder):
    """Synthetic region-feature caption retrieval data (one example per image)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = BUILDER_CONFIGS
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: SyntheticRegionsConfig = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "regions": tfds.features.Tensor(shape=(cfg.num_regions, cfg.region_dim), dtype=np.float32),
                "boxes": tfds.features.Tensor(shape=(cfg.num_regions, 4), dtype=np.float32),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "image_id": tfds.features.Scalar(dtype=np.int64),
                "image_index": tfds.features.Scalar(dtype=np.int64),
                "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                "path": tfds.features.Text(),
            }),
            supervised_keys=None,
            disable_shuffling=True,  # image_index order on disk
            description=__doc__,
        )

    def _log_download_bytes(self) -> None:
        print(f"synthetic_regions: drawing {self.info.full_name} into {self.data_dir}", flush=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg: SyntheticRegionsConfig = self.builder_config
        cfg.validate()
        rng = np.random.default_rng([cfg.seed, 0])
        vectors = (rng.standard_normal((len(NOUNS), cfg.region_dim)), rng.standard_normal((len(COLOURS), cfg.region_dim)))
        return {"train": self._generate_examples("train", cfg.num_train, vectors),
                "test": self._generate_examples("test", cfg.num_test, vectors)}

    def _generate_examples(self, split: str, count: int, vectors):
        cfg: SyntheticRegionsConfig = self.builder_config
        for index in range(count):
            rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index])
            regions, boxes, captions = scene(cfg, vectors, rng)
            yield index, {"regions": regions, "boxes": boxes, "captions": captions, "image_id": index,
                          "image_index": index, "image_size": np.array([640, 480], np.int32),
                          "path": f"synthetic/{split}/{index}"}
