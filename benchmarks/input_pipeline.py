"""Input-pipeline throughput: training images/s of the full IRRA transform, and synthetic build time.

    python benchmarks/input_pipeline.py [--data_dir DIR] [--image_size 384,128] [--batch_size 64]
        [--batches 40] [--rebuild]

Rows of the printed table:
  build synthetic_people/default   wall seconds to build the default set (1500/250 ids, 7000
                                   64x32 images) -- only timed when it is built in this run
                                   (--rebuild or a fresh data_dir)
  build synthetic_people/native    the same for a 400-image set drawn directly at --image_size
  train <set> all cores            images/s of the train stream (decode, resize to image_size, flip,
                                   pad-crop, normalize, erase, MLM) with tf.data AUTOTUNE; the
                                   per-core column is images per CPU-second this process used
                                   (robust to other load on a shared machine)
  train <set> 1 thread             the same with a 1-thread private pool (~ one core)
The 64x32 set is upscaled to image_size by the transform; the native set decodes full-size PNGs
(closer to real data, whose JPEGs are ~100x300).
TensorFlow is imported only inside data_pipelines (this file runs the import lazily).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def _throughput(ds, batch_size: int, batches: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process, all threads)."""
    it = ds.as_numpy_iterator()
    for _ in range(3):  # warm-up: tracing, shuffle-buffer fill, autotune
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    images = batches * batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "xmr_bench_data"))
    parser.add_argument("--image_size", default="384,128", help="H,W")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per row")
    parser.add_argument("--rebuild", action="store_true", help="delete and rebuild the synthetic sets")
    parser.add_argument("--step_cases", default="demo,vitb16",
                        help="train steps to time beside the pipeline (benchmarks/train_step.py cases; '' = none)")
    args = parser.parse_args(argv)
    size = tuple(int(s) for s in args.image_size.split(","))

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from data_pipelines import input_pipeline as ip
    from data_pipelines.builders import synthetic_people as sp

    if args.rebuild and os.path.isdir(args.data_dir):
        shutil.rmtree(args.data_dir)
    rows = []
    native = f"native_{size[0]}x{size[1]}"
    for config, overrides in (("default", {}),
                              (native, _native_overrides(size))):
        fresh = not os.path.isdir(os.path.join(args.data_dir, "synthetic_people", config))
        start = time.perf_counter()
        sp.build(args.data_dir, config, verbose=False, **overrides)
        seconds = time.perf_counter() - start
        rows.append((f"build synthetic_people/{config}", f"{seconds:.1f} s" if fresh else "(prepared before)",
                     ""))
    cores = os.cpu_count() or 1
    ds = ip.train_tf_dataset("synthetic_people/default", args.data_dir, image_size=size,
                             batch_size=args.batch_size, seed=0)
    rate, per_cpu = _throughput(ds, args.batch_size, args.batches)
    rows.append((f"train 64x32 upscaled, all {cores} cores", f"{rate:.0f} img/s", f"{per_cpu:.0f} img/cpu-s"))
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    rate1, per_cpu1 = _throughput(ds.with_options(options), args.batch_size, max(8, args.batches // 4))
    rows.append(("train 64x32 upscaled, 1 thread", f"{rate1:.0f} img/s", f"{per_cpu1:.0f} img/cpu-s"))
    rows.extend(_native_rows(args, size, native, cores))

    print(f"\ninput pipeline, IRRA train transform at {size[0]}x{size[1]}, batch {args.batch_size}, "
          f"{cores} CPU cores (os.cpu_count), TF {tf.__version__}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share the cores; "
          f"img/cpu-s = images per CPU-second used by this process, i.e. per fully used core)")
    print(f"| {'what':<56} | {'value':>18} | {'per core':>14} |")
    print(f"|{'-' * 58}|{'-' * 20}|{'-' * 16}|")
    for what, value, per_core in rows:
        print(f"| {what:<56} | {value:>18} | {per_core:>14} |")
    if args.step_cases:
        _print_pipeline_vs_step(args, ip, {"vitb16": rate})


def _print_pipeline_vs_step(args, ip, pipeline_rates: dict) -> None:
    """Pipeline images/s beside the compiled train step's images/s for the same workload."""
    import sys

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks.train_step import case_config, synthetic_batch, time_jax

    print("\n| workload | input pipeline img/s | IRRA train step img/s (this machine) | pipeline / step |")
    print("|---|---|---|---|")
    for case in args.step_cases.split(","):
        config = case_config(case, "float32")
        if case not in pipeline_rates:  # the case's own transform on the default synthetic set
            d = config.data
            ds = ip.train_tf_dataset("synthetic_people/default", args.data_dir, image_size=tuple(d.image_size),
                                     batch_size=config.batch_size, seed=0, augment=d.augment, flip=d.flip,
                                     context_length=d.get("context_length", 77))
            pipeline_rates[case] = _throughput(ds, config.batch_size, args.batches)[0]
        seconds, _, _ = time_jax(config, synthetic_batch(config, np.random.default_rng(0)), steps=3, warmup=1)
        step_rate = config.batch_size / seconds
        h, w = config.data.image_size
        print(f"| {case} ({h}x{w}, batch {config.batch_size}) | {pipeline_rates[case]:.0f} | {step_rate:.1f} | "
              f"{pipeline_rates[case] / step_rate:.1f}x |")


def _native_overrides(size):
    return dict(num_train_ids=100, num_test_ids=25, images_per_id=4, image_height=size[0],
                image_width=size[1], supersample=1)


def _native_rows(args, size, native, cores):
    """Throughput on the set drawn at full size (custom config -> builder object, not a name)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from data_pipelines import preprocess as pp
    from data_pipelines.builders import synthetic_people as sp

    builder = sp.build(args.data_dir, native, verbose=False, **_native_overrides(size))

    ds = builder.as_dataset("train", decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: ex["image"]).cache().shuffle(400, seed=0).repeat().enumerate()
    base = tf.constant([0, 0], tf.int64)
    ds = ds.map(lambda i, img: pp.train_image(img, size, pp.sample_seeds(base, i)),
                num_parallel_calls=tf.data.AUTOTUNE).batch(args.batch_size).prefetch(tf.data.AUTOTUNE)
    rate, per_cpu = _throughput(ds, args.batch_size, args.batches)
    return [(f"train {size[0]}x{size[1]} native PNG (image only), all cores", f"{rate:.0f} img/s",
             f"{per_cpu:.0f} img/cpu-s")]


if __name__ == "__main__":
    main()
