"""Mixin turning a `parse(manual_dir, counts)` method into a manual-download TFDS builder.

Use: `class CuhkPedes(ManualRetrievalBuilder, tfds.core.GeneratorBasedBuilder)`. All parsing and
image checks run in `_split_generators`, i.e. before TFDS writes a single example; TFDS builds in
a temporary folder that is deleted on any error, and CleanFailureMixin removes the empty folders
TFDS made before that, so a failed build leaves the data dir as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders.clean_failure import CleanFailureMixin
from data_pipelines import features as schema


class ManualRetrievalBuilder(CleanFailureMixin):
    """Shared _info / _split_generators / _generate_examples of the five real-data builders.

    Subclasses set: VERSION, RELEASE_NOTES, MANUAL_DOWNLOAD_INSTRUCTIONS (the layout),
    SPLITS, ENCODING_FORMAT, HOMEPAGE, CITATION, DESCRIPTION, and implement
    `parse(manual_dir: Path, counts: dict[str, SplitCounts]) -> (records, annotation_path)`.

    Extra constructor kwarg: skip_bad_images (default False): missing/undecodable images are
    skipped and counted instead of raising BadImageError. After a build, `build_counts` holds
    {split: SplitCounts}.
    """

    SPLITS: tuple[str, ...] = ("train", "val", "test")
    ENCODING_FORMAT = "jpeg"
    HOMEPAGE = ""
    CITATION = ""
    DESCRIPTION = ""

    def __init__(self, *, skip_bad_images: bool = False, **kwargs: Any):
        self.skip_bad_images = bool(skip_bad_images)
        self.build_counts: dict[str, ann.SplitCounts] | None = None
        super().__init__(**kwargs)
        self._original_state["skip_bad_images"] = self.skip_bad_images  # keeps pickling exact

    def parse(self, manual_dir: Path, counts: dict[str, ann.SplitCounts]):
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=schema.retrieval_features(self.ENCODING_FORMAT),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,  # examples stored in image_index order
        )

    def _log_download_bytes(self) -> None:
        # Replaces TFDS' "Downloading and preparing dataset Unknown size (download: Unknown
        # size, ...)": nothing is downloaded and the size is not known before parsing.
        ann._log(f"{self.name}: preparing {self.info.full_name} from the manual download into "
                 f"{self.data_dir}")

    def _resolve_manual_dir(self, dl_manager) -> Path:
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS' own "does not exist or is empty" check
            folder = getattr(dl_manager, "_manual_dir", None)
            return ann.check_manual_dir(folder, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)

    def _split_generators(self, dl_manager):
        manual_dir = ann.check_manual_dir(
            self._resolve_manual_dir(dl_manager), self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS
        )
        counts = {s: ann.SplitCounts() for s in self.SPLITS}
        ann._log(f"{self.name}: parsing annotations in {manual_dir}")
        records, source = self.parse(manual_dir, counts)
        ann._log(f"{self.name}: {len(records)} images with captions; checking image files")
        records, reencode = ann.check_images(
            records, manual_dir, counts, skip_bad_images=self.skip_bad_images
        )
        by_split = ann.finalize_records(records, self.SPLITS, counts, source)
        self.build_counts = counts
        ann._log(f"{self.name}: validation passed; writing examples")
        return {
            split: self._generate_examples(recs, manual_dir, reencode)
            for split, recs in by_split.items()
        }

    def _generate_examples(
        self, records: list[ann.ImageRecord], manual_dir: Path, reencode: set[str]
    ) -> Iterator[tuple[int, dict]]:
        for rec in records:
            image = ann.encoded_image(
                manual_dir / rec.path, rec.path in reencode, self.ENCODING_FORMAT
            )
            yield rec.image_index, {
                "image": image,
                "captions": list(rec.captions),
                "pid": rec.pid,
                "image_index": rec.image_index,
                "path": rec.path,
            }
