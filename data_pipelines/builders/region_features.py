"""Shared parsing, validation and writing of the region-feature builders (TERAN's layout).

TGDT-as-published (and TERAN, whose data layout it uses) reads per image precomputed
bottom-up-attention features instead of pixels:

    features_36/bu_att/{id}.npz   key 'feat': float [36, 2048], one row per detected region
    features_36/bu_box/{id}.npy   float [36, 4]: (x1, y1, x2, y2) of each region in pixels

with {id} = the Karpathy record's 'imgid' for Flickr30K (its position in dataset_flickr30k.json)
and 'cocoid' for MS-COCO. Boxes are divided by the image's (w, h, w, h) when loaded; this builder
stores them divided. The all-zero "CLS" row TGDT's collate step prepends is NOT stored: the
model (xmr_jax.models.tgdt_regions) prepends it itself.

One example per image (splits train / val / test, restval joins train; stored in the Karpathy
file's order, so the test captions line up with TERAN's relevance files):

    regions      float32 [36, 2048]  the 'feat' array as published
    boxes        float32 [36, 4]     (x1/w, y1/h, x2/w, y2/h)
    captions     str [5]             the first 5 'raw' sentences, unchanged
    image_id     int64               {id} of the feature files (imgid / cocoid)
    image_index  int64               0-based position within its split
    image_size   int32 [2]           (w, h) used for the boxes
    path         str                 image path relative to the manual dir (informational)

Storage: float32 as published, about 295 KB per image (Flickr30K about 9.4 GB, COCO about 36 GB).

Every check runs before TFDS writes an example (file headers only, the arrays are read while
writing), and a failed build leaves the data dir as it was (CleanFailureMixin). Bad input raises a
one-line `DataSetError` naming the file, the image and what was expected.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import annotations as ann
from data_pipelines.builders.clean_failure import CleanFailureMixin

NUM_REGIONS = 36
FEATURE_DIM = 2048
CAPTIONS_PER_IMAGE = 5
FEATURE_DIR = "features_36"


class FeatureFileError(ann.DataSetError, FileNotFoundError):
    """A region feature or box file is missing or has the wrong shape / content."""


@dataclasses.dataclass(frozen=True)
class RegionRecord:
    split: str
    image_id: int
    path: str  # image path relative to the manual dir
    captions: tuple[str, ...]
    source: str  # "dataset_coco.json images[12] (cocoid 391895)"
    image_index: int = -1
    size: tuple[int, int] = (0, 0)  # (w, h)


def region_features() -> tfds.features.FeaturesDict:
    """The FeaturesDict of the region builders (module docstring)."""
    return tfds.features.FeaturesDict({
        "regions": tfds.features.Tensor(shape=(NUM_REGIONS, FEATURE_DIM), dtype=np.float32),
        "boxes": tfds.features.Tensor(shape=(NUM_REGIONS, 4), dtype=np.float32),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "image_id": tfds.features.Scalar(dtype=np.int64),
        "image_index": tfds.features.Scalar(dtype=np.int64),
        "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "path": tfds.features.Text(),
    })


# ----------------------------------------------------------------------------- annotations


def find_karpathy_json(manual_dir: Path, filename: str, dataset: str, layout: str) -> Path:
    """<manual_dir>/<filename> or <manual_dir>/annotations/<filename> (TERAN keeps it there)."""
    return ann.find_file(manual_dir, [filename, f"annotations/{filename}"], dataset, layout)


def parse_karpathy(path: Path, id_key: str, image_path: Callable[[dict, str], str]) -> list[RegionRecord]:
    """Karpathy split file -> one RegionRecord per image, file order; restval -> train.

    Keeps the first 5 sentences ('raw', unchanged). An image with fewer than 5 sentences, or a
    kept sentence without tokens (blank 'raw', or an empty 'tokens' list when the field exists),
    raises AnnotationError naming the file, image and caption index: dropping a caption would
    shift every later test caption against the relevance files.
    """
    data = ann.load_json(path)
    images = ann.get_field(data, "images", list, f"{path.name} (top level)")
    records = []
    for i, rec in enumerate(images):
        where = f"{path.name} images[{i}]"
        image_id = ann.get_field(rec, id_key, int, where)
        where = f"{where} ({id_key} {image_id})"
        split = ann.get_split(rec, "split", ann.KARPATHY_SPLITS, where)
        rel = image_path(rec, where)
        sentences = ann.get_field(rec, "sentences", list, where)
        if len(sentences) < CAPTIONS_PER_IMAGE:
            raise ann.AnnotationError(
                f"{where}: {len(sentences)} sentences, expected at least {CAPTIONS_PER_IMAGE}"
            )
        captions = []
        for j, s in enumerate(sentences[:CAPTIONS_PER_IMAGE]):
            raw = ann.get_field(s, "raw", str, f"{where} sentences[{j}]")
            tokens = s.get("tokens") if isinstance(s, dict) else None
            if not raw.strip() or (isinstance(tokens, list) and not tokens):
                raise ann.AnnotationError(f"{where}: caption {j} has no tokens (raw={raw!r})")
            captions.append(raw)
        records.append(RegionRecord(split, image_id, rel, tuple(captions), where))
    return records


def image_size_from_file(path: Path, source: str) -> tuple[int, int]:
    """(w, h) from an image file's header (TERAN reads the Flickr sizes from the images once)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ann.BadImageError(f"{source}: image {path} not found (needed for its size, to normalize the boxes)")
    try:
        with Image.open(path) as im:
            return tuple(int(v) for v in im.size)
    except (UnidentifiedImageError, OSError) as e:
        raise ann.BadImageError(f"{source}: image {path} cannot be read for its size ({e})") from None


# ----------------------------------------------------------------------------- feature files


def feature_paths(manual_dir: Path, image_id: int) -> tuple[Path, Path]:
    root = manual_dir / FEATURE_DIR
    return root / "bu_att" / f"{image_id}.npz", root / "bu_box" / f"{image_id}.npy"


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), dtype


def npz_member_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array `key` in a .npz without reading the array."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if f"{key}.npy" not in names:
            keys = [n[:-4] for n in names if n.endswith(".npy")]
            raise FeatureFileError(f"{path}: no array {key!r} (it holds {keys})")
        with z.open(f"{key}.npy") as f:
            return _npy_header(f)


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    with open(path, "rb") as f:
        return _npy_header(f)


def check_shapes(feat_path: Path, feat_shape, box_path: Path, box_shape, source: str) -> None:
    """Raises FeatureFileError unless feat is [36, 2048] and boxes [36, 4]."""
    if tuple(feat_shape) != (NUM_REGIONS, FEATURE_DIM):
        raise FeatureFileError(
            f"{feat_path} ({source}): 'feat' has shape {list(feat_shape)}, expected [{NUM_REGIONS}, {FEATURE_DIM}]"
        )
    if len(box_shape) != 2 or box_shape[1] != 4:
        raise FeatureFileError(f"{box_path} ({source}): boxes have shape {list(box_shape)}, expected [{NUM_REGIONS}, 4]")
    if box_shape[0] != feat_shape[0]:
        raise FeatureFileError(
            f"{box_path} ({source}): box count {box_shape[0]} != region count {feat_shape[0]} in {feat_path.name}"
        )


def check_feature_files(manual_dir: Path, rec: RegionRecord) -> None:
    """Both files exist and their headers hold the expected shapes and float dtypes."""
    feat_path, box_path = feature_paths(manual_dir, rec.image_id)
    for p in (feat_path, box_path):
        if not p.is_file():
            raise FeatureFileError(f"{p} not found (region features of {rec.source})")
    try:
        feat_shape, feat_dtype = npz_member_header(feat_path, "feat")
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        if isinstance(e, FeatureFileError):
            raise
        raise FeatureFileError(f"{feat_path} ({rec.source}): not a readable .npz ({e})") from None
    try:
        box_shape, box_dtype = npy_header(box_path)
    except (ValueError, OSError) as e:
        raise FeatureFileError(f"{box_path} ({rec.source}): not a readable .npy ({e})") from None
    check_shapes(feat_path, feat_shape, box_path, box_shape, rec.source)
    for p, dt in ((feat_path, feat_dtype), (box_path, box_dtype)):
        if not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)):
            raise FeatureFileError(f"{p} ({rec.source}): dtype {dt}, expected a float array")


def load_example(manual_dir: Path, rec: RegionRecord) -> dict[str, Any]:
    """Reads one image's arrays; boxes divided by (w, h, w, h) as TERAN/TGDT do."""
    feat_path, box_path = feature_paths(manual_dir, rec.image_id)
    with np.load(feat_path) as z:
        feat = np.asarray(z["feat"])
    boxes = np.load(box_path)
    check_shapes(feat_path, feat.shape, box_path, boxes.shape, rec.source)
    for p, a in ((feat_path, feat), (box_path, boxes)):
        if not np.all(np.isfinite(a)):
            raise FeatureFileError(f"{p} ({rec.source}): holds NaN or infinite values")
    w, h = rec.size
    boxes = boxes.astype(np.float64) / np.array([w, h, w, h], np.float64)
    return {
        "regions": feat.astype(np.float32),
        "boxes": boxes.astype(np.float32),
        "captions": list(rec.captions),
        "image_id": rec.image_id,
        "image_index": rec.image_index,
        "image_size": np.array([w, h], np.int32),
        "path": rec.path,
    }


def _parallel(fn, items, workers: int = 8) -> list:
    """fn over items in a thread pool; the first error (in item order) is raised."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


# ----------------------------------------------------------------------------- builder mixin


class RegionFeaturesBuilder(CleanFailureMixin):
    """_info / _split_generators / _generate_examples of the region builders.

    Subclasses (listed before tfds.core.GeneratorBasedBuilder) set VERSION, RELEASE_NOTES,
    MANUAL_DOWNLOAD_INSTRUCTIONS, HOMEPAGE, CITATION, DESCRIPTION and implement
    `parse(manual_dir) -> (records, annotation_path)` and `image_sizes(manual_dir, records) -> [(w, h)]`.
    After a build, `build_counts` holds {split: annotations.SplitCounts}.
    """

    SPLITS: tuple[str, ...] = ("train", "val", "test")
    HOMEPAGE = ""
    CITATION = ""
    DESCRIPTION = ""

    def __init__(self, *, skip_bad_images: bool = False, **kwargs: Any):
        if skip_bad_images:
            raise ann.DataSetError(
                f"{type(self).__name__}: skip_bad_images is not supported for region features "
                "(every image's features are needed so that test captions line up with the relevance files)"
            )
        self.build_counts: dict[str, ann.SplitCounts] | None = None
        super().__init__(**kwargs)

    def parse(self, manual_dir: Path) -> tuple[list[RegionRecord], Path]:
        raise NotImplementedError

    def image_sizes(self, manual_dir: Path, records: list[RegionRecord]) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=region_features(),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,  # examples stored in image_index order
        )

    def _log_download_bytes(self) -> None:
        ann._log(f"{self.name}: preparing {self.info.full_name} from the manual download into {self.data_dir}")

    def _split_generators(self, dl_manager):
        try:
            folder = Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS' own "does not exist or is empty" check
            folder = getattr(dl_manager, "_manual_dir", None)
        manual_dir = ann.check_manual_dir(folder, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        ann._log(f"{self.name}: parsing annotations in {manual_dir}")
        records, source = self.parse(manual_dir)
        ids: dict[int, str] = {}
        for rec in records:
            if rec.image_id in ids:
                raise ann.AnnotationError(f"{rec.source}: image id {rec.image_id} already used by {ids[rec.image_id]}")
            ids[rec.image_id] = rec.source
        ann._log(f"{self.name}: {len(records)} images; reading image sizes and checking region feature files")
        sizes = self.image_sizes(manual_dir, records)
        for rec, (w, h) in zip(records, sizes):
            if w <= 0 or h <= 0:
                raise ann.AnnotationError(f"{rec.source}: image size {w}x{h} is not positive")
        _parallel(lambda rec: check_feature_files(manual_dir, rec), records)
        counts = {s: ann.SplitCounts() for s in self.SPLITS}
        by_split: dict[str, list[RegionRecord]] = {s: [] for s in self.SPLITS}
        for rec, size in zip(records, sizes):
            split_recs = by_split[rec.split]
            split_recs.append(dataclasses.replace(rec, image_index=len(split_recs), size=tuple(size)))
        for split, recs in by_split.items():
            if not recs:
                raise ann.AnnotationError(f"{source}: split {split!r} has no image; expected splits {list(self.SPLITS)}")
            c = counts[split]
            c.images = c.identities = len(recs)
            c.captions = sum(len(r.captions) for r in recs)
        self.build_counts = counts
        ann._log(f"{self.name}: validation passed; writing examples")
        return {split: self._generate_examples(recs, manual_dir) for split, recs in by_split.items()}

    def _generate_examples(self, records: list[RegionRecord], manual_dir: Path) -> Iterator[tuple[int, dict]]:
        for rec in records:
            yield rec.image_index, load_example(manual_dir, rec)
