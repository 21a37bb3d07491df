"""Train and eval input pipelines over the xmr_jax TFDS builders; yields NumPy batches.

Entry points: from_config(config, process_index, process_count) -> PipelineData (what the trainer
uses); train_dataset / eval_gallery / eval_queries / dataset_metadata / eval_sizes underneath.

Data layout (data_pipelines/builders): a builder yields one example per image with `captions`,
`image_index` and, for person data, `pid` (without one, each image is its own identity);
training uses one sample per caption.

Text follows the model family's TextSpec (xmr_jax.models.families; `text=`, default CLIP_TEXT_MLM:
the CLIP tokenizer in IRRA's mask variant, with MLM inputs). Captions are tokenized ONCE per
(data set, split, text scheme, context length) in NumPy when the pipeline is built -- faster than
a tf.py_function per sample and identical across workers. The token table is then looked up
inside tf.data by caption row; when the TextSpec has an MLM masker, the batch also gets
mlm_ids / mlm_labels, drawn in tf.data with stateless seeds. The image side follows the family's
ImageSpec (`images=`, default RGB_IMAGES: decode, IRRA's train transform or the test resize,
CLIP normalization -> `images`): which example features it reads and which batch fields it makes.

Determinism: the training stream is (host shard -> one sample per caption -> shuffle(seed) ->
repeat -> enumerate -> map); each sample's augmentation and MLM seeds are folded from
(seed, process_index, position in the stream), so the same seed gives the same batches whatever
the parallelism.

Multi-host: process i of N reads the i-th of N disjoint, contiguous image ranges of the split
(tfds.even_splits) and all captions of those images, so hosts see disjoint caption samples that
together cover the split. Each host gets `batch_size` (per-process) rows per batch; the trainer
builds the global batch with jax.make_array_from_process_local_data.

Eval: `eval_gallery` yields each image of the host's range once, `eval_queries` each caption of the
host's contiguous caption range once. Both pad the last batch (valid=False rows) and, with several
hosts, add all-padding batches so that every host yields the same number of batches
(`EvalSizes.num_batches`). The evaluator gathers per-batch outputs from all hosts (e.g. global
arrays built with make_array_from_process_local_data, or multihost_utils.process_allgather), then
keeps rows with valid=True; `pids`/`image_ids` travel with the rows, so order does not matter.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data_pipelines import preprocess  # noqa: F401  (sets TF log level and hides GPUs first)
import tensorflow as tf  # noqa: E402,I001
import tensorflow_datasets as tfds  # noqa: E402

from xmr_jax.models.families import CLIP_TEXT_MLM, RGB_IMAGES, ImageSpec, TextSpec  # noqa: E402

CONTEXT_LENGTH = 77
_BUILDERS_DIR = Path(__file__).resolve().parent / "builders"
# In-memory caching of the encoded training samples when the split is smaller than this.
_CACHE_LIMIT_BYTES = 2 << 30
_DEFAULT_SHUFFLE_BUFFER = 16384


class DataError(ValueError):
    """Bad data set name, data folder or split; the message names it and says what was expected."""


# --------------------------------------------------------------------------- builders and metadata

def available_builders() -> list[str]:
    """Names of the builder packages in data_pipelines/builders/."""
    return sorted(p.name for p in _BUILDERS_DIR.iterdir() if (p / "__init__.py").is_file())


def get_builder(name: str, data_dir: str | os.PathLike | None, manual_dir: str | None = None,
                prepare: bool = False) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `name` ("synthetic_people" or "synthetic_people/tiny") in data_dir.

    prepare=True builds the data set when it is missing (synthetic_people needs nothing; real data
    sets need manual_dir). Raises DataError for an unknown name, a missing data_dir, or data that is
    not prepared (with prepare=False).
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"data set name must be a non-empty string, got {name!r}")
    base, _, config = name.partition("/")
    known = available_builders()
    if base not in known:
        raise DataError(f"unknown data set {base!r} (from name {name!r}); expected one of {known}")
    importlib.import_module(f"data_pipelines.builders.{base}")  # registers the builder class
    if data_dir is not None and not prepare and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"data_dir {str(data_dir)!r} for data set {name!r} does not exist; it should "
                        f"be the TFDS data dir holding {base}/<config>/<version>/")
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    except (ValueError, KeyError) as e:  # e.g. unknown config name
        raise DataError(f"cannot open data set {name!r}: {e}") from e
    if not builder.is_prepared():
        if not prepare:
            hint = (f"data_pipelines.builders.synthetic_people.build({str(data_dir)!r}, "
                    f"{builder.builder_config.name!r})" if base == "synthetic_people" else
                    f"python -m data_pipelines.build --dataset {base} --manual_dir <folder> "
                    f"--data_dir {data_dir}")
            raise DataError(f"data set {name!r} is not prepared in data_dir {str(data_dir)!r} "
                            f"(expected {builder.data_dir}); build it with: {hint}")
        download_config = (tfds.download.DownloadConfig(manual_dir=str(manual_dir))
                           if manual_dir is not None else None)
        builder.download_and_prepare(download_config=download_config)
    return builder


def _skip_image(builder) -> dict | None:
    """Reading without decoding the encoded image (decoded per sample where needed), if any."""
    return {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None


def _pid(ex) -> tf.Tensor:
    """The example's identity: its `pid`, or for data sets without one (e.g. region features) the
    image itself (`image_index`)."""
    return ex["pid"] if "pid" in ex else ex["image_index"]


def _repeat(x: tf.Tensor, n) -> tf.Tensor:
    """[n, *x.shape]: x repeated n times."""
    return tf.fill([n], x) if x.shape.rank == 0 else tf.repeat(x[None], n, axis=0)


def _check_split(builder, split: str) -> None:
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise DataError(f"data set {builder.info.full_name!r} has no split {split!r}; "
                        f"available splits: {splits}")


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    """Everything about a split except the pixels, ordered by image_index then caption order.

    image_pids: int64 [num_images]; caption_start/caption_count: int64 [num_images] (rows of the
    image's captions); caption_image: int64 [num_captions]; token_ids: int32 [num_captions, 77];
    captions: list of num_captions str.
    """

    name: str
    split: str
    image_pids: np.ndarray
    caption_start: np.ndarray
    caption_count: np.ndarray
    caption_image: np.ndarray
    token_ids: np.ndarray
    captions: list

    @property
    def num_images(self) -> int:
        return int(self.image_pids.shape[0])

    @property
    def num_captions(self) -> int:
        return int(self.caption_image.shape[0])

    @property
    def caption_pids(self) -> np.ndarray:
        """int64 [num_captions]: the pid of each caption's image."""
        return self.image_pids[self.caption_image]


_READ_BATCH = 1024  # records per tf.data batch when reading captions


@functools.lru_cache(maxsize=16)
def _split_captions(name: str, data_dir: str | None, split: str):
    """(image_pids int64 [I], caption_start int64 [I], caption_count int64 [I], caption_image int64
    [C], captions list of C str) of a split, read once."""
    builder = get_builder(name, data_dir)
    _check_split(builder, split)
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders=_skip_image(builder))
    ds = ds.map(lambda ex: (ex["image_index"], _pid(ex), ex["captions"]))
    records = {}
    # Read in batches: one Python round trip per record costs ~1 ms (7 s for the demo's 7000 images).
    for indices, pids, caption_rows in ds.ragged_batch(_READ_BATCH).as_numpy_iterator():
        rows = caption_rows.to_list() if hasattr(caption_rows, "to_list") else list(caption_rows)
        for image_index, pid, captions in zip(indices.tolist(), pids.tolist(), rows):
            if image_index in records:
                raise DataError(f"{name!r} split {split!r}: image_index {image_index} occurs twice")
            if len(captions) == 0:
                raise DataError(f"{name!r} split {split!r}: image_index {image_index} has no captions")
            records[image_index] = (int(pid), [c.decode("utf-8") for c in captions])
    n = len(records)
    if sorted(records) != list(range(n)):
        raise DataError(f"{name!r} split {split!r}: image_index values must be 0..{n - 1}, got "
                        f"min {min(records, default=None)} max {max(records, default=None)}")
    image_pids = np.array([records[i][0] for i in range(n)], np.int64)
    counts = np.array([len(records[i][1]) for i in range(n)], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    captions = [c for i in range(n) for c in records[i][1]]
    caption_image = np.repeat(np.arange(n, dtype=np.int64), counts)
    return image_pids, starts, counts, caption_image, captions


@functools.lru_cache(maxsize=16)
def _split_index(name: str, data_dir: str | None, split: str, context_length: int, text: TextSpec) -> SplitIndex:
    image_pids, starts, counts, caption_image, captions = _split_captions(name, data_dir, split)
    token_ids = np.asarray(text.tokenizer(context_length).encode(captions)).astype(np.int32)
    if token_ids.shape != (len(captions), context_length):
        raise DataError(f"text scheme {text.name!r} gave token ids of shape {token_ids.shape} for {name!r} split "
                        f"{split!r}; expected ({len(captions)}, {context_length})")
    return SplitIndex(name, split, image_pids, starts, counts, caption_image, token_ids, captions)


def split_index(name: str, data_dir: str | os.PathLike | None, split: str,
                context_length: int = CONTEXT_LENGTH, text: TextSpec = CLIP_TEXT_MLM) -> SplitIndex:
    """Captions, tokens [num_captions, context_length] (by `text.tokenizer`) and pids of a split
    (built once per text scheme and context length, cached)."""
    return _split_index(name, None if data_dir is None else str(data_dir), split, int(context_length), text)


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """Sizes of a split. num_samples = captions (one training sample per caption);
    num_classes = distinct pids (the ID classifier size when split is train)."""

    name: str
    split: str
    num_images: int
    num_samples: int
    num_classes: int

    @property
    def num_train_samples(self) -> int:
        return self.num_samples

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """Full batches per pass over all captions (the train stream drops partial batches)."""
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        return max(1, self.num_samples // global_batch_size)


def dataset_metadata(name: str, data_dir, split: str = "train") -> DatasetMeta:
    """DatasetMeta of a split (reads the captions once; no image decoding)."""
    image_pids, _, _, caption_image, _ = _split_captions(name, None if data_dir is None else str(data_dir), split)
    return DatasetMeta(name, split, len(image_pids), len(caption_image), int(np.unique(image_pids).size))


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index={process_index}, "
                         f"process_count={process_count}")


def _host_split(split: str, process_index: int, process_count: int) -> str:
    if process_count == 1:
        return split
    return tfds.even_splits(split, n=process_count)[process_index]


def _host_image_counts(builder, split: str, process_count: int) -> list[int]:
    """Images per host for split (tfds.even_splits sizes)."""
    if process_count == 1:
        return [builder.info.splits[split].num_examples]
    return [builder.info.splits[s].num_examples for s in tfds.even_splits(split, n=process_count)]


@functools.lru_cache(maxsize=64)
def _host_image_indices_cached(name: str, data_dir: str | None, split: str, process_index: int,
                               process_count: int) -> np.ndarray:
    builder = get_builder(name, data_dir)
    ds = builder.as_dataset(split=_host_split(split, process_index, process_count), shuffle_files=False,
                            decoders=_skip_image(builder))
    batches = ds.map(lambda ex: ex["image_index"]).batch(_READ_BATCH).as_numpy_iterator()
    return np.concatenate([np.zeros([0], np.int64), *batches]).astype(np.int64)


def host_image_indices(name: str, data_dir, split: str, process_index: int = 0,
                       process_count: int = 1) -> np.ndarray:
    """int64 [n]: image_index of every record process `process_index` reads (in reading order)."""
    _check_process(process_index, process_count)
    return _host_image_indices_cached(name, None if data_dir is None else str(data_dir), split,
                                      process_index, process_count)


def _image_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width) with positive entries, got {image_size!r}")
    return size


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # AUTOTUNE values then mean "as many as there are cores", without the autotuning model. With
    # the model on, deleting the training iterator at the end of the demo's training waited 35-50 s
    # idle in 3 of 5 runs (tf.data's optimization thread); without it: no wait in 2 runs, the
    # first batch in 3.4 s instead of 6-7 s and 19.5 instead of 24 CPU-ms per 64-sample batch.
    options.autotune.enabled = False
    return options


# --------------------------------------------------------------------------- training

def train_tf_dataset(name: str, data_dir, split: str = "train", image_size=(384, 128),
                     batch_size: int = 64, seed: int = 0, augment: bool = True,
                     mlm_prob: float = 0.15, process_index: int = 0, process_count: int = 1,
                     shuffle_buffer: int | None = None, cache: bool | None = None,
                     start_step: int = 0, num_epochs: int | None = None,
                     flip: bool | None = None, context_length: int = CONTEXT_LENGTH,
                     text: TextSpec = CLIP_TEXT_MLM, images: ImageSpec = RGB_IMAGES) -> tf.data.Dataset:
    """The tf.data.Dataset behind `train_dataset` (same arguments); elements are dicts of tensors."""
    size = _image_size(image_size)
    _check_process(process_index, process_count)
    if batch_size < 1:
        raise ValueError(f"batch_size (per process) must be >= 1, got {batch_size}")
    if not 0.0 <= mlm_prob <= 1.0:
        raise ValueError(f"mlm_prob must be in [0, 1], got {mlm_prob}")
    builder = get_builder(name, data_dir)
    _check_split(builder, split)
    index = split_index(name, data_dir, split, context_length, text)
    host_split = _host_split(split, process_index, process_count)
    local_images = host_image_indices(name, data_dir, split, process_index, process_count)
    num_local = int(index.caption_count[local_images].sum())
    if num_local < batch_size:
        raise ValueError(f"{name!r} split {split!r}: process {process_index} has {num_local} caption "
                         f"samples, fewer than batch_size={batch_size}")

    tokens = tf.constant(index.token_ids)
    starts = tf.constant(index.caption_start)
    counts = tf.constant(index.caption_count)

    def per_caption(ex):
        i = ex["image_index"]
        n = counts[i]
        return tf.data.Dataset.from_tensor_slices({
            **{key: _repeat(ex[key], n) for key in images.features},
            "row": starts[i] + tf.range(n, dtype=tf.int64),
            "pid": tf.fill([n], _pid(ex)),
            "image_index": tf.fill([n], i),
        })

    ds = builder.as_dataset(split=host_split, shuffle_files=False,
                            decoders=_skip_image(builder))
    ds = ds.flat_map(per_caption)
    if cache is None:
        cache = builder.info.dataset_size < _CACHE_LIMIT_BYTES
    if cache:
        ds = ds.cache()
    buffer = shuffle_buffer or min(num_local, _DEFAULT_SHUFFLE_BUFFER)
    ds = ds.shuffle(buffer, seed=seed * 1_000_003 + process_index, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs)
    ds = ds.enumerate()
    if start_step:
        ds = ds.skip(int(start_step) * batch_size)
    base_seed = tf.constant([seed, process_index], tf.int64)

    def transform(position, sample):
        seeds = preprocess.sample_seeds(base_seed, position)
        text_ids = tf.gather(tokens, sample["row"])
        out = {
            **images.train({key: sample[key] for key in images.features}, size, seeds, augment, flip),
            "text_ids": text_ids,
            "pids": tf.cast(sample["pid"], tf.int32),
            "image_ids": tf.cast(sample["image_index"], tf.int32),
        }
        if text.mlm_mask is not None:
            out["mlm_ids"], out["mlm_labels"] = text.mlm_mask(text_ids, seeds[3], mlm_prob)
        return out

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def train_dataset(name: str, data_dir, split: str = "train", image_size=(384, 128),
                  batch_size: int = 64, seed: int = 0, augment: bool = True,
                  mlm_prob: float = 0.15, process_index: int = 0, process_count: int = 1,
                  shuffle_buffer: int | None = None, cache: bool | None = None,
                  start_step: int = 0, num_epochs: int | None = None,
                  flip: bool | None = None, context_length: int = CONTEXT_LENGTH,
                  text: TextSpec = CLIP_TEXT_MLM, images: ImageSpec = RGB_IMAGES) -> Iterator[dict]:
    """Endless (num_epochs=None) iterator of training batches for this process.

    Args:
      name: builder name, optionally with config ("synthetic_people/tiny").
      data_dir: TFDS data dir holding the prepared data set.
      split: split to read ("train").
      image_size: (H, W) network input size.
      batch_size: rows per batch for THIS process (global batch = batch_size * process_count).
      seed: base seed of shuffling, augmentation and MLM masking.
      augment: IRRA train transform (flip, pad-crop, erasing) if True; resize+normalize otherwise.
      mlm_prob: MLM selection probability (IRRA: 0.15).
      process_index, process_count: this host and the number of hosts (disjoint shards).
      shuffle_buffer: shuffle buffer in caption samples (default min(local samples, 16384)).
      cache: keep encoded samples in memory (default: when the data set is < 2 GiB).
      start_step: skip this many batches (resume), without decoding them.
      num_epochs: None = repeat forever.
      flip: random horizontal flip; None = follow `augment` (augment=False, flip=True: flip only).
      context_length: T, the text tower's context (captions tokenized, cut and padded to T).
      text: the tokenizer and MLM masker (the model family's `text(config)`).
      images: the image-side inputs (the model family's `images(config)`; default RGB_IMAGES).

    Yields dicts of NumPy arrays: images float32 [B,H,W,3] (normalized NHWC; the fields of
    `images.train` for another ImageSpec), text_ids int32
    [B,T], pids int32 [B], image_ids int32 [B] (the image_index), and when text.mlm_mask is set
    mlm_ids int32 [B,T], mlm_labels int32 [B,T] (0 = ignore).
    """
    ds = train_tf_dataset(name, data_dir, split, image_size, batch_size, seed, augment, mlm_prob,
                          process_index, process_count, shuffle_buffer, cache, start_step, num_epochs,
                          flip, context_length, text, images)
    return ds.as_numpy_iterator()


# --------------------------------------------------------------------------- evaluation

@dataclasses.dataclass(frozen=True)
class EvalSizes:
    """Per-host eval sizes: rows this host yields for real, and batches every host yields."""

    num_local_images: int
    num_local_queries: int
    num_gallery_batches: int
    num_query_batches: int


def eval_sizes(name: str, data_dir, split: str = "test", batch_size: int = 64,
               process_index: int = 0, process_count: int = 1) -> EvalSizes:
    """Sizes of eval_gallery / eval_queries for this host (batches are equal on all hosts)."""
    _check_process(process_index, process_count)
    builder = get_builder(name, data_dir)
    _check_split(builder, split)
    num_captions = len(_split_captions(name, None if data_dir is None else str(data_dir), split)[3])
    image_counts = _host_image_counts(builder, split, process_count)
    query_counts = [len(r) for r in np.array_split(np.arange(num_captions), process_count)]
    return EvalSizes(image_counts[process_index], query_counts[process_index],
                     math.ceil(max(image_counts) / batch_size), math.ceil(max(query_counts) / batch_size))


def _padded(batch: dict, batch_size: int, fill: dict | None = None) -> dict:
    """Pads every array of `batch` to batch_size rows (zeros or fill[key] rows); adds `valid`."""
    n = len(next(iter(batch.values())))
    out = {}
    for key, value in batch.items():
        pad = np.zeros((batch_size - n,) + value.shape[1:], value.dtype)
        if fill and key in fill:
            pad[...] = fill[key]
        out[key] = np.concatenate([value, pad]) if n < batch_size else value
    out["valid"] = np.arange(batch_size) < n
    return out


def eval_gallery(name: str, data_dir, split: str = "test", image_size=(384, 128),
                 batch_size: int = 64, process_index: int = 0,
                 process_count: int = 1, images: ImageSpec = RGB_IMAGES) -> Iterator[dict]:
    """Each image of this host's range once (test transform), in batches of batch_size.

    Yields dicts: images float32 [B,H,W,3] (the fields of `images.eval` for another ImageSpec),
    pids int32 [B], image_ids int32 [B], valid bool [B] (False on padding rows of the last batch
    and on the extra batches that equalize hosts).
    """
    size = _image_size(image_size)
    sizes = eval_sizes(name, data_dir, split, batch_size, process_index, process_count)
    builder = get_builder(name, data_dir)
    ds = builder.as_dataset(split=_host_split(split, process_index, process_count), shuffle_files=False,
                            decoders=_skip_image(builder))
    ds = ds.map(lambda ex: {**images.eval({key: ex[key] for key in images.features}, size),
                            "pids": tf.cast(_pid(ex), tf.int32),
                            "image_ids": tf.cast(ex["image_index"], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options())
    unknown = {k: s.shape for k, s in ds.element_spec.items() if None in s.shape[1:]}
    if unknown:
        raise DataError(f"image scheme {images.name!r}: eval fields {unknown} have no static shape (padding "
                        "batches need one); set it in the scheme's eval function")
    empty = {k: np.zeros((0, *s.shape[1:]), s.dtype.as_numpy_dtype) for k, s in ds.element_spec.items()}
    emitted = 0
    for batch in ds.as_numpy_iterator():
        emitted += 1
        yield _padded(batch, batch_size)
    for _ in range(sizes.num_gallery_batches - emitted):
        yield _padded(empty, batch_size)


def eval_queries(name: str, data_dir, split: str = "test", batch_size: int = 64,
                 process_index: int = 0, process_count: int = 1,
                 context_length: int = CONTEXT_LENGTH, text: TextSpec = CLIP_TEXT_MLM) -> Iterator[dict]:
    """Each caption of this host's contiguous caption range once, in batches of batch_size.

    Yields dicts: text_ids int32 [B,context_length], pids int32 [B], image_ids int32 [B], valid bool [B].
    Padding rows hold `text.pad_caption` (CLIP: the empty caption [SOT, EOT, 0, ...], safe for EOT
    pooling).
    """
    sizes = eval_sizes(name, data_dir, split, batch_size, process_index, process_count)
    index = split_index(name, data_dir, split, context_length, text)
    rows = np.array_split(np.arange(index.num_captions), process_count)[process_index]
    empty_caption = np.asarray(text.pad_caption(context_length), np.int32)
    pids = index.caption_pids.astype(np.int32)
    image_ids = index.caption_image.astype(np.int32)
    for b in range(sizes.num_query_batches):
        r = rows[b * batch_size:(b + 1) * batch_size]
        batch = {"text_ids": index.token_ids[r], "pids": pids[r], "image_ids": image_ids[r]}
        yield _padded(batch, batch_size, fill={"text_ids": empty_caption})


# --------------------------------------------------------------------------- trainer entry point

@dataclasses.dataclass(frozen=True)
class PipelineData:
    """What the trainer needs. train_iter(start_step) / gallery_iter() / query_iter() return fresh
    iterators of per-process NumPy batches (the evaluation pair for config.data.eval_split);
    eval_iters(split) -> (gallery_iter, query_iter) gives the pair for any split; steps_per_epoch
    counts global batches."""

    train_iter: object
    gallery_iter: object
    query_iter: object
    num_classes: int
    steps_per_epoch: int
    train_meta: DatasetMeta
    eval_sizes: EvalSizes
    eval_iters: object


def _per_process(global_batch: int, process_count: int, field: str) -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"config.{field}={global_batch} must be a positive multiple of the number of "
                         f"processes ({process_count})")
    return global_batch // process_count


def from_config(config, process_index: int = 0, process_count: int = 1,
                text: TextSpec = CLIP_TEXT_MLM, images: ImageSpec = RGB_IMAGES) -> PipelineData:
    """Builds the pipelines from a trainer config (config.data.*, batch_size, eval_batch_size, seed).

    text / images: how captions and the image side become inputs; the trainer passes its model
    family's `text(config)` and `images(config)`.
    config.data: name, config_name ("" = the builder's default), data_dir ("" = TFDS default),
    manual_dir, image_size, augment, flip, mlm_prob, train_split, eval_split, shuffle_buffer,
    context_length (default 77; must equal the text tower's).
    config.batch_size / config.eval_batch_size are GLOBAL; each process gets its share.
    synthetic_people / synthetic_regions are built on first use; a real data set is built when data.manual_dir is set.
    """
    d = config.data
    name = f"{d.name}/{d.config_name}" if d.get("config_name") else d.name
    data_dir = d.get("data_dir") or None
    manual_dir = d.get("manual_dir") or None
    prepare = d.name in ("synthetic_people", "synthetic_regions") or manual_dir is not None
    get_builder(name, data_dir, manual_dir=manual_dir, prepare=prepare)
    batch = _per_process(int(config.batch_size), process_count, "batch_size")
    eval_batch = _per_process(int(config.get("eval_batch_size", config.batch_size)), process_count,
                              "eval_batch_size")
    size = tuple(d.image_size)
    context = int(d.get("context_length", CONTEXT_LENGTH))
    train_split, eval_split = d.get("train_split", "train"), d.get("eval_split", "test")
    meta = dataset_metadata(name, data_dir, train_split)
    kwargs = dict(image_size=size, batch_size=batch, seed=int(config.seed), augment=bool(d.augment),
                  flip=d.get("flip"), mlm_prob=float(d.get("mlm_prob", 0.15)),
                  process_index=process_index, process_count=process_count,
                  shuffle_buffer=d.get("shuffle_buffer"), context_length=context, text=text, images=images)

    def train_iter(start_step: int = 0):
        return train_dataset(name, data_dir, train_split, start_step=start_step, **kwargs)

    def eval_iters(split: str):
        _check_split(get_builder(name, data_dir), split)

        def gallery_iter():
            return eval_gallery(name, data_dir, split, size, eval_batch, process_index, process_count, images)

        def query_iter():
            return eval_queries(name, data_dir, split, eval_batch, process_index, process_count, context, text)

        return gallery_iter, query_iter

    gallery_iter, query_iter = eval_iters(eval_split)
    return PipelineData(train_iter, gallery_iter, query_iter, meta.num_classes,
                        meta.steps_per_epoch(int(config.batch_size)), meta,
                        eval_sizes(name, data_dir, eval_split, eval_batch, process_index, process_count),
                        eval_iters)
