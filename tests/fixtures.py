"""Writers of tiny fixture folders in exactly the published layouts (real JPEG/PNG files).

Each `write_<dataset>(root, ...)` creates `root` (the manual dir) and returns it. The
annotation records written are in the JSON file, so tests read them back for expectations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, size: tuple[int, int] = (8, 16), fmt: str | None = None) -> None:
    """Writes a random RGB image of size (W, H); format from the suffix (.png/.jpg) unless fmt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    fmt = fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG")
    Image.fromarray(pixels).save(path, format=fmt)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _person_records(ids_by_split, images_per_id, image_key, path_fn, tokens=True):
    records, n = [], 0
    for split, ids in ids_by_split.items():
        for pid in ids:
            for k in range(images_per_id):
                rec = {
                    "split": split,
                    "captions": [f"person {pid} view {k} wears a red coat.", f"id {pid} image {k}, {split}."],
                    image_key: path_fn(split, pid, k, n),
                    "id": pid,
                }
                if tokens:
                    rec["processed_tokens"] = [c.lower().split() for c in rec["captions"]]
                records.append(rec)
                n += 1
    return records


def write_cuhk_pedes(root: Path, ids_by_split=None, images_per_id: int = 2) -> Path:
    """reid_raw.json + imgs/{CUHK01 (png), Market (jpg), test_query (jpg)}; ids start at 1."""
    ids_by_split = ids_by_split or {"train": [1, 2, 3], "val": [4, 5], "test": [6, 7, 8]}

    def path_fn(split, pid, k, n):
        if split == "train":
            return f"CUHK01/{pid:04d}{k:03d}.png" if k % 2 == 0 else f"Market/{pid:04d}_c{k}s1_{n:06d}_01.jpg"
        return f"test_query/p{pid}_s{n}.jpg"

    records = _person_records(ids_by_split, images_per_id, "file_path", path_fn)
    for n, rec in enumerate(records):
        write_image(root / "imgs" / rec["file_path"], seed=n)
    _write_json(root / "reid_raw.json", records)
    return root


def write_icfg_pedes(root: Path, filename: str = "ICFG-PEDES.json", images_per_id: int = 2) -> Path:
    """ICFG-PEDES.json (or ICFG_PEDES.json) + imgs/{train,test}/<id>/...jpg; ids 0-based."""
    ids_by_split = {"train": [0, 3, 7], "test": [1, 4]}

    def path_fn(split, pid, k, n):
        return f"{split}/{pid:04d}/{pid:04d}_{k:03d}_05_0303morning_{n:04d}_0_ex.jpg"

    records = _person_records(ids_by_split, images_per_id, "file_path", path_fn)
    for n, rec in enumerate(records):
        write_image(root / "imgs" / rec["file_path"], seed=100 + n)
    _write_json(root / filename, records)
    return root


def write_rstpreid(root: Path, images_per_id: int = 2) -> Path:
    """data_captions.json (image key img_path, no processed_tokens) + flat imgs/; ids 0-based."""
    ids_by_split = {"train": [0, 1, 2], "val": [3, 4], "test": [5, 6]}

    def path_fn(split, pid, k, n):
        return f"{pid:04d}_c{k + 1}_{n:04d}.jpg"

    records = _person_records(ids_by_split, images_per_id, "img_path", path_fn, tokens=False)
    for n, rec in enumerate(records):
        write_image(root / "imgs" / rec["img_path"], seed=200 + n)
    _write_json(root / "data_captions.json", records)
    return root


def _karpathy_image(i: int, split: str, filename: str, image_id_key: str, image_id: int, extra: dict):
    sentences = [
        {"raw": f"Image {i} caption {s}: a dog runs.", "tokens": ["image", str(i), "caption", str(s)],
         "imgid": i, "sentid": 5 * i + s}
        for s in range(5)
    ]
    rec = {"filename": filename, "split": split, "sentences": sentences, "imgid": i,
           "sentids": [5 * i + s for s in range(5)], **extra}
    rec[image_id_key] = image_id
    return rec


def write_flickr30k_karpathy(root: Path, splits=("train",) * 4 + ("val",) * 2 + ("test",) * 3) -> Path:
    """dataset_flickr30k.json + flickr30k-images/<filename>.jpg; imgid deliberately non-contiguous."""
    images = []
    for i, split in enumerate(splits):
        imgid = 10 * i + 3
        filename = f"{1000092795 + i}.jpg"
        rec = _karpathy_image(imgid, split, filename, "imgid", imgid, {})
        images.append(rec)
        write_image(root / "flickr30k-images" / filename, seed=300 + i, size=(12, 10))
    _write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    return root


def write_coco_karpathy(
    root: Path, splits=("train", "restval", "train", "restval", "val", "val", "test", "test", "test")
) -> Path:
    """dataset_coco.json + train2014/ and val2014/ (train from train2014, the rest from val2014)."""
    images = []
    for i, split in enumerate(splits):
        cocoid = 500000 - 37 * i  # decreasing, so sorted-id relabelling differs from file order
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        rec = _karpathy_image(i, split, filename, "cocoid", cocoid, {"filepath": folder})
        images.append(rec)
        write_image(root / folder / filename, seed=400 + i, size=(12, 10))
    _write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return root


WRITERS = {
    "cuhk_pedes": write_cuhk_pedes,
    "icfg_pedes": write_icfg_pedes,
    "rstpreid": write_rstpreid,
    "flickr30k_karpathy": write_flickr30k_karpathy,
    "coco_karpathy": write_coco_karpathy,
}
