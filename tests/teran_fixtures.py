"""Writers of tiny fixtures for TGDT-as-published: a small BERT vocab.txt and data folders in the
published TERAN layout (Karpathy JSON, features_36/bu_att/{id}.npz key 'feat', bu_box/{id}.npy,
image files or COCO caption annotations for the image sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "a", "an", "the", "man", "woman", "dog", "dogs", "cat", "is", "are", "on", "in", "of", "with",
    "grass", "red", "blue", "shirt", "running", "run", "jump", "cafe", "play", "ball", "street",
    "two", "people", "bike", "riding", "young", "girl", "boy", "water", "un", "##believ", "##able",
    "##s", "##ing", "##ed", "##er", "##ly", "snow", "board", "##board", "1", "2", "##0", "teddy",
]
PUNCT = list(".,!?'\"-()/:;&")


def write_bert_vocab(path: Path) -> Path:
    """A ~120-token BERT vocab.txt: specials ([PAD] = 0), words, '##' pieces, letters, digits,
    punctuation, one CJK character."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = SPECIAL_TOKENS + WORDS + PUNCT + letters + ["##" + c for c in letters] + ["中"]
    seen, out = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t)
            out.append(t)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


CAPTION_WORDS = ["a", "man", "dog", "on", "the", "grass", "red", "shirt", "running", "two", "people"]


def _captions(i: int, n: int = 5) -> list[dict]:
    rng = np.random.default_rng(1000 + i)
    out = []
    for k in range(n):
        words = [CAPTION_WORDS[j] for j in rng.integers(0, len(CAPTION_WORDS), size=3 + k)]
        out.append({"raw": " ".join(words).capitalize() + ".", "tokens": words, "sentid": 5 * i + k})
    return out


def write_region_files(root: Path, image_id: int, size: tuple[int, int], regions: int = 36, dim: int = 2048,
                       boxes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """features_36/bu_att/{id}.npz ('feat' float32 [regions, dim]) and bu_box/{id}.npy (float32 [boxes, 4]
    pixel x1, y1, x2, y2 inside an image of size (w, h)). Returns (feat, boxes in pixels)."""
    rng = np.random.default_rng(image_id)
    feat = rng.random((regions, dim), dtype=np.float32) * 4
    w, h = size
    n = regions if boxes is None else boxes
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    box = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1).astype(np.float32)
    (root / "features_36" / "bu_att").mkdir(parents=True, exist_ok=True)
    (root / "features_36" / "bu_box").mkdir(parents=True, exist_ok=True)
    np.savez(root / "features_36" / "bu_att" / f"{image_id}.npz", feat=feat)
    np.save(root / "features_36" / "bu_box" / f"{image_id}.npy", box)
    return feat, box


def image_size(i: int) -> tuple[int, int]:
    return 40 + 3 * i, 30 + 2 * i  # (w, h), all different


def write_flickr30k_teran(root: Path, splits=("train",) * 3 + ("val",) * 2 + ("test",) * 3, dim: int = 2048) -> Path:
    """Flickr30K in TERAN's layout: annotations/dataset_flickr30k.json, flickr30k-images/*.jpg (sizes),
    features_36 keyed by imgid (= position in the JSON)."""
    images = []
    for i, split in enumerate(splits):
        name = f"{1000 + i}.jpg"
        w, h = image_size(i)
        (root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (i * 20 % 255, 50, 90)).save(root / "flickr30k-images" / name)
        write_region_files(root, i, (w, h), dim=dim)
        images.append({"filename": name, "split": split, "imgid": i, "sentids": list(range(5 * i, 5 * i + 5)),
                       "sentences": _captions(i)})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def write_coco_teran(root: Path, splits=("train", "restval", "train", "val", "val", "test", "test", "test"),
                     dim: int = 2048) -> Path:
    """COCO in TERAN's layout: dataset_coco.json (at the top), annotations/captions_{train,val}2014.json
    (image width/height), features_36 keyed by cocoid. Image 1 (restval) has 6 captions."""
    images, coco = [], {"train2014": [], "val2014": []}
    for i, split in enumerate(splits):
        cocoid = 500 + 7 * i
        folder = "train2014" if split == "train" else "val2014"
        w, h = image_size(i)
        write_region_files(root, cocoid, (w, h), dim=dim)
        coco[folder].append({"id": cocoid, "width": w, "height": h, "file_name": f"COCO_{folder}_{cocoid:012d}.jpg"})
        images.append({"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "split": split,
                       "cocoid": cocoid, "imgid": i, "sentences": _captions(i, 6 if i == 1 else 5)})
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    (root / "annotations").mkdir(exist_ok=True)
    for folder, imgs in coco.items():
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps({"images": imgs, "annotations": []}))
    return root
