"""Builds one real data set into TFDS format.

    python -m data_pipelines.build --dataset cuhk_pedes --manual_dir /data/CUHK-PEDES \
        --data_dir ~/tensorflow_datasets [--skip_bad_images]

Prints progress and, when done, the per-split counts (images, captions, identities, skipped).
Exit status 2 with a one-paragraph message on bad input (missing files, malformed annotations,
bad images).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

# TensorFlow (imported by TFDS) reads this once, when it loads: no INFO banner from its C++ side.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATASETS = {
    "cuhk_pedes": "CuhkPedes",
    "icfg_pedes": "IcfgPedes",
    "rstpreid": "Rstpreid",
    "flickr30k_karpathy": "Flickr30kKarpathy",
    "coco_karpathy": "CocoKarpathy",
    "flickr30k_regions": "Flickr30kRegions",
    "coco_regions": "CocoRegions",
}


def builder_class(name: str):
    """The builder class of data set `name` (one of DATASETS)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    module = importlib.import_module(f"data_pipelines.builders.{name}")
    return getattr(module, DATASETS[name])


def build(name: str, manual_dir: str | Path, data_dir: str | Path, skip_bad_images: bool = False):
    """Builds data set `name` from manual_dir into data_dir; returns the prepared builder.

    builder.build_counts is {split: SplitCounts} when this call built it, None when it existed.
    """
    import tensorflow_datasets as tfds

    from data_pipelines.builders import annotations as ann

    # Checked here too so a missing folder is reported before TFDS creates anything.
    cls = builder_class(name)
    ann.check_manual_dir(manual_dir, name, cls.MANUAL_DOWNLOAD_INSTRUCTIONS)
    builder = cls(data_dir=str(data_dir), skip_bad_images=skip_bad_images)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--manual_dir", required=True, help="folder with the downloaded files")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to write into")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="skip (and count) missing/undecodable images instead of failing")
    args = parser.parse_args(argv)

    from data_pipelines.builders import annotations as ann

    start = time.time()
    try:
        builder = build(args.dataset, args.manual_dir, args.data_dir, args.skip_bad_images)
    except ann.DataSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.time() - start
    if builder.build_counts is None:
        print(f"{args.dataset}: already prepared at {builder.data_dir}")
        for split, info in builder.info.splits.items():
            print(f"{args.dataset}: {split:<7}{info.num_examples:>8} images")
    else:
        print(f"{args.dataset}: built in {seconds:.1f} s at {builder.data_dir}")
        print(ann.format_counts(args.dataset, builder.build_counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
