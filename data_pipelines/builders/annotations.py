"""Parsing and validation shared by the real-data builders (no TensorFlow here).

Every parser turns a published annotation file into a list of `ImageRecord` (one per image):
split (output split name), pid (the ORIGINAL id), path (relative to the manual dir), captions.
Bad input raises a `DataSetError` subclass naming the file, record index and field.
Empty captions are dropped and counted; an image left with no caption is dropped and counted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from PIL import Image

PERSON_SPLITS = {"train": "train", "val": "val", "test": "test"}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


class DataSetError(ValueError):
    """Base class of every data-set input error (a ValueError)."""


class ManualDirError(DataSetError, FileNotFoundError):
    """The manual dir, or a file/folder expected in it, is missing or empty."""


class AnnotationError(DataSetError):
    """An annotation file is malformed or a record has a missing/mistyped field."""


class BadImageError(DataSetError):
    """An image file is missing or cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image and its captions. pid is the original id until `finalize_records` relabels."""

    split: str
    pid: int
    path: str  # relative to the manual dir, '/'-separated
    captions: tuple[str, ...]
    source: str  # where it came from, for messages: "reid_raw.json record 12"
    image_index: int = -1


@dataclasses.dataclass
class SplitCounts:
    """Per-split build summary."""

    images: int = 0
    captions: int = 0
    identities: int = 0
    skipped_bad_images: int = 0
    skipped_empty_captions: int = 0
    skipped_captionless_images: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_bad_images + self.skipped_empty_captions + self.skipped_captionless_images


def _log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- manual dir / files


def check_manual_dir(manual_dir: os.PathLike | str | None, dataset: str, layout: str) -> Path:
    """Returns manual_dir as a Path; raises ManualDirError if it is missing or empty.

    layout: human description of the expected files (goes into the message).
    """
    if manual_dir is None:
        raise ManualDirError(f"{dataset}: no manual_dir given. Expected a folder containing:\n{layout}")
    folder = Path(manual_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        state = "is empty" if folder.is_dir() else "does not exist"
        raise ManualDirError(
            f"{dataset}: manual_dir {folder} {state}. Expected a folder containing:\n{layout}"
        )
    return folder


def find_file(manual_dir: Path, names: Sequence[str], dataset: str, layout: str) -> Path:
    """Returns the first of `names` (alternative spellings) that exists in manual_dir."""
    for name in names:
        if (manual_dir / name).is_file():
            return manual_dir / name
    listing = sorted(p.name for p in manual_dir.iterdir())[:20]
    raise ManualDirError(
        f"{dataset}: annotation file {' or '.join(repr(n) for n in names)} not found in {manual_dir} "
        f"(it contains {listing}). Expected layout:\n{layout}"
    )


def require_dirs(manual_dir: Path, names: Iterable[str], dataset: str, layout: str) -> None:
    """Raises ManualDirError naming every missing image folder."""
    missing = [n for n in names if not (manual_dir / n).is_dir()]
    if missing:
        raise ManualDirError(
            f"{dataset}: image folder(s) {missing} not found in {manual_dir}. Expected layout:\n{layout}"
        )


def load_json(path: Path) -> Any:
    """json.load with an error naming the file (and line/column) on malformed input."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})") from None


# ----------------------------------------------------------------------------- typed field access

_TYPE_NAMES = {str: "string", int: "integer", list: "list", dict: "object"}
_ARTICLE = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def get_field(record: Any, key: str, kind: type, where: str) -> Any:
    """record[key], checked to be of `kind` (bool is not an int). where: 'FILE record I'."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected an object, got {_type_name(record)}")
    if key not in record:
        raise AnnotationError(
            f"{where}: missing field {key!r} (has {sorted(record)}); expected {_ARTICLE[kind]}"
        )
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AnnotationError(
            f"{where}: field {key!r} must be {_ARTICLE[kind]}, got {_type_name(value)} {value!r:.60}"
        )
    return value


def get_split(record: dict, key: str, split_map: Mapping[str, str], where: str) -> str:
    value = get_field(record, key, str, where)
    if value not in split_map:
        raise AnnotationError(
            f"{where}: field {key!r} is {value!r}; expected one of {sorted(split_map)}"
        )
    return split_map[value]


def _clean_captions(
    captions: Sequence[str], split: str, counts: dict[str, SplitCounts], limit: int | None
) -> tuple[str, ...]:
    kept = tuple(c for c in captions if c.strip())
    counts[split].skipped_empty_captions += len(captions) - len(kept)
    return kept[:limit] if limit else kept


# ----------------------------------------------------------------------------- parsers


def parse_person_annotations(
    path: Path,
    *,
    image_key: str,
    image_dir: str,
    split_map: Mapping[str, str],
    counts: dict[str, SplitCounts],
) -> list[ImageRecord]:
    """CUHK-PEDES / ICFG-PEDES / RSTPReid: a JSON list of {split, captions, <image_key>, id}.

    Images are under manual_dir/<image_dir>/<record[image_key]>. Empty captions and images
    without captions are counted in `counts[split]` (split = output split name).
    """
    data = load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of records, got {_type_name(data)}")
    records = []
    for i, rec in enumerate(data):
        where = f"{path.name} record {i}"
        split = get_split(rec, "split", split_map, where)
        pid = get_field(rec, "id", int, where)
        rel = get_field(rec, image_key, str, where)
        captions = get_field(rec, "captions", list, where)
        for j, c in enumerate(captions):
            if not isinstance(c, str):
                raise AnnotationError(
                    f"{where}: field 'captions'[{j}] must be a string, got {_type_name(c)}"
                )
        if not rel.strip():
            raise AnnotationError(f"{where}: field {image_key!r} is an empty path")
        kept = _clean_captions(captions, split, counts, None)
        if not kept:
            counts[split].skipped_captionless_images += 1
            continue
        records.append(ImageRecord(split, pid, f"{image_dir}/{rel.lstrip('/')}", kept, where))
    return records


def parse_karpathy_annotations(
    path: Path,
    *,
    id_key: str,
    image_path: Callable[[dict, str], str],
    counts: dict[str, SplitCounts],
    captions_per_image: int = 5,
) -> list[ImageRecord]:
    """Karpathy split files: {"images": [{filename, split, sentences: [{raw}], <id_key>}]}.

    image_path(record, where) -> path relative to the manual dir. 'restval' joins train.
    Keeps the first `captions_per_image` non-empty 'raw' sentences (unchanged) per image.
    """
    data = load_json(path)
    images = get_field(data, "images", list, f"{path.name} (top level)")
    records = []
    for i, rec in enumerate(images):
        where = f"{path.name} record {i} (images[{i}])"
        split = get_split(rec, "split", KARPATHY_SPLITS, where)
        pid = get_field(rec, id_key, int, where)
        rel = image_path(rec, where)
        sentences = get_field(rec, "sentences", list, where)
        raws = [
            get_field(s, "raw", str, f"{where} sentences[{j}]") for j, s in enumerate(sentences)
        ]
        kept = _clean_captions(raws, split, counts, captions_per_image)
        if not kept:
            counts[split].skipped_captionless_images += 1
            continue
        records.append(ImageRecord(split, pid, rel, kept, where))
    return records


# ----------------------------------------------------------------------------- images


def probe_image(path: Path) -> str:
    """Fully decodes the image (JPEGs at 1/8 scale, which still reads every byte).

    Returns 'keep' when the original bytes can be stored as they are (JPEG gray/RGB, PNG
    8-bit), 'reencode' otherwise (CMYK JPEG, BMP, 16-bit PNG, ...). Raises BadImageError.
    """
    if not path.is_file():
        raise BadImageError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            if fmt == "JPEG":
                im.draft(mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise BadImageError(f"image {path} cannot be decoded: {type(e).__name__}: {e}") from None
    if (fmt == "JPEG" and mode in ("RGB", "L")) or (
        fmt == "PNG" and mode in ("RGB", "RGBA", "L", "LA", "P")
    ):
        return "keep"
    return "reencode"


def check_images(
    records: list[ImageRecord],
    manual_dir: Path,
    counts: dict[str, SplitCounts],
    *,
    skip_bad_images: bool,
    num_threads: int | None = None,
) -> tuple[list[ImageRecord], set[str]]:
    """Probes every image (threaded). Returns (records kept, paths that need re-encoding).

    A missing/undecodable image raises BadImageError naming the path, or with
    skip_bad_images=True is dropped and counted in counts[split].skipped_bad_images.
    """
    num_threads = num_threads or min(32, (os.cpu_count() or 1) * 4)
    total = len(records)
    report_every = max(1, -(-total // 10))  # about ten progress lines, whatever the total
    results: list[Any] = [None] * total

    def probe(i: int) -> Any:
        try:
            return probe_image(manual_dir / records[i].path)
        except BadImageError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for i, res in enumerate(pool.map(probe, range(total))):
            results[i] = res
            done = i + 1
            if isinstance(res, BadImageError) and not skip_bad_images:
                pool.shutdown(wait=False, cancel_futures=True)
                raise BadImageError(
                    f"{res} (referenced by {records[i].source}); pass skip_bad_images=True "
                    "(--skip_bad_images) to skip and count bad images instead"
                )
            if done % report_every == 0 or done == total:
                _log(f"  checked {done}/{total} images")
    kept, reencode = [], set()
    for rec, res in zip(records, results):
        if isinstance(res, BadImageError):
            counts[rec.split].skipped_bad_images += 1
            _log(f"  skipping bad image: {res}")
            continue
        if res == "reencode":
            reencode.add(rec.path)
        kept.append(rec)
    return kept, reencode


def encoded_image(path: Path, reencode: bool, encoding_format: str) -> bytes:
    """The bytes to store: the file as it is, or re-encoded as RGB `encoding_format`."""
    if not reencode:
        return path.read_bytes()
    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG" if encoding_format == "jpeg" else "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- finishing


def finalize_records(
    records: list[ImageRecord], splits: Sequence[str], counts: dict[str, SplitCounts], source: Path
) -> dict[str, list[ImageRecord]]:
    """Groups by split, sets image_index (annotation order) and relabels train pids.

    Train pids become the rank of the original id among the sorted unique train ids (0..N-1);
    other splits keep the original ids. Fills images/captions/identities in `counts`.
    Raises AnnotationError if a split ends up with no image.
    """
    by_split: dict[str, list[ImageRecord]] = {s: [] for s in splits}
    for rec in records:
        by_split[rec.split].append(rec)
    for split, recs in by_split.items():
        if not recs:
            raise AnnotationError(
                f"{source}: split {split!r} has no usable image "
                f"({counts[split].skipped} skipped); expected splits {list(splits)}"
            )
        if split == "train":
            rank = {pid: k for k, pid in enumerate(sorted({r.pid for r in recs}))}
        else:
            rank = None
        by_split[split] = [
            dataclasses.replace(r, image_index=k, pid=rank[r.pid] if rank else r.pid)
            for k, r in enumerate(recs)
        ]
        c = counts[split]
        c.images = len(recs)
        c.captions = sum(len(r.captions) for r in recs)
        c.identities = len({r.pid for r in recs})
    return by_split


def format_counts(name: str, counts: Mapping[str, SplitCounts]) -> str:
    """A small table: split, images, captions, identities, skipped (bad/empty/captionless)."""
    lines = [
        f"{name}: split    images  captions  identities  skipped(bad_images/empty_captions/captionless)"
    ]
    for split, c in counts.items():
        lines.append(
            f"{name}: {split:<7}{c.images:>8}{c.captions:>10}{c.identities:>12}  {c.skipped} "
            f"({c.skipped_bad_images}/{c.skipped_empty_captions}/{c.skipped_captionless_images})"
        )
    return "\n".join(lines)
