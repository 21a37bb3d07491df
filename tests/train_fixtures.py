"""Shared pieces of the trainer tests: a tiny IRRA config, deterministic synthetic batches, a
query-by-query reference for person-retrieval metrics and a toy model family.

Used by tests/test_train.py, tests/test_fsdp.py and the multi-process driver
tests/multihost_driver.py (which imports it outside pytest), so it must not import pytest or set
any environment variables.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import demo
from xmr_jax.models import families

CONTEXT = 16
NUM_CLASSES = 6


def tiny_config(**overrides):
    """IRRA (sdm+id; mlm_chunk=4 for tests that add mlm) with 1-layer width-32 towers on 16x16
    images, global batch 8."""
    config = demo.get_config("batch_size=8,epochs=2")
    config.model.clip.update(dict(
        image_size=(16, 16), patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
        text_width=32, text_layers=1, text_heads=2, embed_dim=32, context_length=CONTEXT,
    ))
    config.model.cross_depth = 1
    config.model.mlm_chunk = 4
    config.data.image_size = (16, 16)
    config.num_classes = NUM_CLASSES
    config.log_every = 2
    config.ckpt_every_steps = 2
    config.progress_bar = False
    config.async_checkpoints = False
    for key, value in overrides.items():
        config[key] = value
    return config


def batch_for_step(step: int, batch_size: int = 8) -> dict:
    """The GLOBAL batch of a step, depending only on the step (as the tf.data pipeline guarantees).

    Returns images float32 [B,16,16,3], text_ids/mlm_ids/mlm_labels int32 [B,CONTEXT],
    pids/image_ids int32 [B].
    """
    rng = np.random.default_rng(step % 3)  # three distinct batches, repeated
    ids = np.zeros((batch_size, CONTEXT), np.int32)
    ids[:, 0] = 49406
    ids[:, 1:8] = rng.integers(1, 400, size=(batch_size, 7))
    ids[:, 8] = 49407
    labels = np.zeros_like(ids)
    labels[:, 2] = ids[:, 2]
    mlm_ids = ids.copy()
    mlm_ids[:, 2] = 49405
    pids = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
    images = rng.standard_normal((batch_size, 16, 16, 3)).astype(np.float32)
    images += pids[:, None, None, None].astype(np.float32) * 0.5  # learnable signal
    return {"images": images, "text_ids": ids, "mlm_ids": mlm_ids, "mlm_labels": labels,
            "pids": pids, "image_ids": np.arange(batch_size, dtype=np.int32)}


def process_slice(batch: dict, process_index: int, process_count: int) -> dict:
    """Rows [i*B/N, (i+1)*B/N) of every entry: process i's contiguous share of a global batch."""
    b = len(next(iter(batch.values())))
    if b % process_count:
        raise ValueError(f"global batch {b} is not divisible by {process_count} processes")
    n = b // process_count
    return {k: v[process_index * n:(process_index + 1) * n] for k, v in batch.items()}


def iterator_from(start_step: int, on_step=None, batch_size: int = 8, process_index: int = 0,
                  process_count: int = 1):
    """train_iter_fn for xmr_jax.train.train: this process's slice of each step's global batch."""
    step = start_step
    while True:
        step += 1
        if on_step:
            on_step(step)
        yield process_slice(batch_for_step(step, batch_size), process_index, process_count)


def flat_params(state) -> np.ndarray:
    """All parameters of a (single-process) train state, concatenated into one float vector."""
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])


def reference_person_metrics(similarity, query_pids, gallery_pids) -> dict:
    """R1/R5/R10/mAP/mINP (percent) query by query in plain Python, written from the definitions
    (a caption's relevant images are those of its pid; ties ranked by gallery index), to check
    the library's vectorized metrics against.

    similarity [Nq, Ng] (higher = closer), query_pids [Nq], gallery_pids [Ng].
    """
    similarity = np.asarray(similarity, np.float64)
    out = {"R1": 0.0, "R5": 0.0, "R10": 0.0, "mAP": 0.0, "mINP": 0.0}
    for q, row in enumerate(similarity):
        ranked = sorted(range(len(row)), key=lambda g: (-row[g], g))
        hits = [int(gallery_pids[g] == query_pids[q]) for g in ranked]
        for k in (1, 5, 10):
            out[f"R{k}"] += 100.0 * (sum(hits[:k]) > 0)
        found, precision_sum = 0, 0.0
        for rank, hit in enumerate(hits, start=1):
            if hit:
                found += 1
                precision_sum += found / rank
                last = rank
        out["mAP"] += 100.0 * precision_sum / found
        out["mINP"] += 100.0 * found / last
    return {k: v / len(similarity) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# A model family the library has never seen (tests/test_train.py, tests/test_main.py)
# ----------------------------------------------------------------------------------------------

TOY_WIDTH = 8
TOY_KERNEL = 0.01  # the toy "init checkpoint": every image_proj kernel entry


class ToyModel(nn.Module):
    """Images flattened -> Dense; text ids -> Embed (mod 64) -> mean -> Dense; no CLIP anywhere."""

    width: int

    def setup(self):
        self.image_proj = nn.Dense(self.width)
        self.text_embed = nn.Embed(64, self.width)
        self.text_proj = nn.Dense(self.width)

    def encode_image(self, images):
        """images [B,H,W,3] -> (global [B,W], tokens [B,1,W], mask [B,1])."""
        g = self.image_proj(images.reshape(images.shape[0], -1))
        return g, g[:, None], jnp.ones(g.shape[:1] + (1,), bool)

    def encode_text(self, text_ids):
        """text_ids [B,T] -> (global [B,W], tokens [B,T,W], mask [B,T])."""
        tokens = self.text_proj(self.text_embed(text_ids % 64))
        return tokens.mean(axis=1), tokens, text_ids > 0

    def __call__(self, batch):
        return {"image": self.encode_image(batch["images"])[0], "text": self.encode_text(batch["text_ids"])[0]}


class ToyFamily(families.Family):
    """A model family the library does not know (register it with families.register): the toy
    model, a softmax contrastive loss, person-retrieval evaluation, CLIP text, RGB images, and a
    pretrained hook that sets image_proj when config.model.toy_init is true."""

    name = "toy"
    evaluator = "person"

    def validate(self, config):
        if config.model.get("toy_width", 0) <= 0:
            raise ValueError(f"config.model.toy_width={config.model.get('toy_width')!r}: expected > 0")

    def build(self, config):
        return ToyModel(width=config.model.toy_width)

    def init_batch(self, config):
        h, w = config.data.image_size
        t = config.data.get("context_length", CONTEXT)
        return {"images": jnp.zeros((1, h, w, 3)), "text_ids": jnp.zeros((1, t), jnp.int32)}

    def loss_fn(self, config):
        scale = float(config.model.toy_scale)

        def loss(outputs, batch):
            logits = scale * outputs["image"] @ outputs["text"].T            # [B, B]
            value = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(logits.shape[0])).mean()
            return value, {"toy_loss": value}

        return loss

    def text(self, config):
        return families.CLIP_TEXT

    def images(self, config):
        return families.RGB_IMAGES

    def pretrained(self, model, config):
        if not config.model.get("toy_init"):
            return None
        h, w = config.data.image_size
        return {"image_proj": {"kernel": np.full((h * w * 3, config.model.toy_width), TOY_KERNEL, np.float32),
                               "bias": np.zeros((config.model.toy_width,), np.float32)}}
