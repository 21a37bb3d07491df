"""Evaluation: encode the gallery and the queries in jitted batches, score on device, report.

Person retrieval (IRRA): text -> image, R1/R5/R10/mAP/mINP over pids (SPEC 5).
Caption retrieval (TGDT): both directions, R@1/5/10 and rsum, for global-only, local-only and
two-stage (global top-k, rerank by s_g + s_l) scoring (SPEC 6-7); with config.tgdt.coco_1k_folds
also the COCO 1K protocol (the same three per fold of 1000 images, averaged; keys "coco_1k/...").
Padded rows of the last batch (valid=False) are computed and then dropped, never the real ones.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from xmr_jax import metrics as metrics_lib
from xmr_jax import parallel, retrieval, similarity


def _to_host(x: jax.Array) -> np.ndarray:
    """A globally sharded array -> the full numpy array on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def encode_split(encode_fn: Callable, params, batches: Iterable[Mapping[str, np.ndarray]], input_key: str,
                 mesh, keep_tokens: bool) -> dict[str, np.ndarray]:
    """Runs `encode_fn(params, inputs) -> (global, tokens, mask)` over batches; keeps valid rows.

    Returns numpy: global [N,D] float32, pids [N], image_ids [N] and, with keep_tokens, tokens
    [N,L,D] (float32) and mask [N,L] bool.
    """
    out: dict[str, list] = {"global": [], "pids": [], "image_ids": [], "tokens": [], "mask": []}
    for local in batches:
        batch = parallel.global_batch(local, mesh)
        g, tok, mask = encode_fn(params, batch[input_key])
        valid = _to_host(batch["valid"]).astype(bool)
        out["global"].append(_to_host(g)[valid])
        out["pids"].append(_to_host(batch["pids"])[valid])
        out["image_ids"].append(_to_host(batch["image_ids"])[valid])
        if keep_tokens:
            out["tokens"].append(_to_host(tok)[valid].astype(np.float32))
            out["mask"].append(_to_host(mask)[valid])
    if not out["global"]:
        raise ValueError(f"the evaluation split yielded no batches for {input_key!r}")
    return {k: np.concatenate(v) for k, v in out.items() if v}


def person_retrieval(query: dict, gallery: dict) -> dict[str, float]:
    """Text -> image person retrieval metrics from encoded queries and gallery."""
    sim = similarity.global_similarity(jnp.asarray(query["global"]), jnp.asarray(gallery["global"]))
    return metrics_lib.person_retrieval_metrics(np.asarray(sim), query["pids"], gallery["pids"])


def caption_retrieval(query: dict, gallery: dict, k_t2i: int = 100, k_i2t: int = 50,
                      local_scale: float = 10.0, mesh=None) -> dict[str, dict[str, float]]:
    """Global-only, local-only and two-stage caption retrieval metrics (keys 'global', 'local', 'two_stage')."""
    index_of = {int(i): n for n, i in enumerate(gallery["image_ids"])}
    missing = [int(i) for i in query["image_ids"] if int(i) not in index_of]
    if missing:
        raise ValueError(f"{len(missing)} captions refer to images absent from the gallery (e.g. image id {missing[0]})")
    text_to_image = np.array([index_of[int(i)] for i in query["image_ids"]])
    img_g, txt_g = jnp.asarray(gallery["global"]), jnp.asarray(query["global"])
    img_t, img_m = jnp.asarray(gallery["tokens"]), jnp.asarray(gallery["mask"])
    txt_t, txt_m = jnp.asarray(query["tokens"]), jnp.asarray(query["mask"])

    def report(sim_i2t_for_i2t, sim_i2t_for_t2i):
        i2t = metrics_lib.caption_retrieval_metrics(np.asarray(sim_i2t_for_i2t), text_to_image=text_to_image)
        t2i = metrics_lib.caption_retrieval_metrics(np.asarray(sim_i2t_for_t2i), text_to_image=text_to_image)
        merged = {k: v for k, v in i2t.items() if k.startswith("i2t")}
        merged.update({k: v for k, v in t2i.items() if k.startswith("t2i")})
        merged["rsum"] = sum(v for k, v in merged.items() if k != "rsum")
        return merged

    s_global = similarity.global_similarity(img_g, txt_g)
    s_local = similarity.local_similarity(img_t, img_m, txt_t, txt_m, scale=local_scale)
    two_i2t = retrieval.two_stage_scores(img_g, img_t, img_m, txt_g, txt_t, txt_m, k=k_i2t,
                                         direction="i2t", local_scale=local_scale, mesh=mesh)
    two_t2i = retrieval.two_stage_scores(txt_g, txt_t, txt_m, img_g, img_t, img_m, k=k_t2i,
                                         direction="t2i", local_scale=local_scale, mesh=mesh)
    return {
        "global": report(s_global, s_global),
        "local": report(s_local, s_local),
        "two_stage": report(two_i2t, jnp.transpose(two_t2i)),
    }


def _take(split: dict, rows: np.ndarray) -> dict:
    return {k: v[rows] for k, v in split.items()}


def coco_1k_retrieval(query: dict, gallery: dict, folds: int = 5, fold_size: int = 1000, k_t2i: int = 100,
                      k_i2t: int = 50, local_scale: float = 10.0, mesh=None) -> dict[str, dict[str, float]]:
    """COCO 1K protocol: `caption_retrieval` on each fold of `fold_size` images, averaged.

    Fold f holds the images ranked [f * fold_size, (f + 1) * fold_size) by image id (the split's
    image order, whatever order the evaluator gathered them in) and every caption of those
    images. Each fold is scored on its own features, so the two-stage top-k candidates come from
    the fold's images / captions only. Every metric, rsum included, is the mean over folds (rsum
    is not multiplied by the number of folds).

    Args:
      query / gallery: outputs of `encode_split` (global [N,D], tokens [N,L,D], mask [N,L],
        pids [N], image_ids [N]); the gallery must hold exactly folds * fold_size images.
    Returns:
      {"global": {...}, "local": {...}, "two_stage": {...}} with the keys of `caption_retrieval`.
    """
    n_img = len(gallery["image_ids"])
    if folds < 1 or fold_size < 1 or n_img != folds * fold_size:
        raise ValueError(
            f"config.tgdt.coco_1k_folds={folds} x config.tgdt.coco_1k_fold_size={fold_size} = "
            f"{folds * fold_size} images, but the evaluation split has {n_img} images"
        )
    order = np.argsort(gallery["image_ids"], kind="stable")
    per_fold = []
    for f in range(folds):
        rows = order[f * fold_size:(f + 1) * fold_size]
        txt = np.flatnonzero(np.isin(query["image_ids"], gallery["image_ids"][rows]))
        per_fold.append(caption_retrieval(_take(query, txt), _take(gallery, rows), k_t2i=k_t2i, k_i2t=k_i2t,
                                          local_scale=local_scale, mesh=mesh))
    return {kind: {key: float(np.mean([m[kind][key] for m in per_fold])) for key in per_fold[0][kind]}
            for kind in per_fold[0]}


class Evaluator:
    """Encodes the eval split with the current params and computes the family's metrics.

    Args:
      model: module with `encode_image` / `encode_text` methods.
      kind: "person" (IRRA metrics) or "caption" (TGDT metrics, needs token features).
      gallery_fn / query_fn: () -> iterator of per-process numpy batches (with `valid`).
    """

    def __init__(self, model, mesh, kind: str, gallery_fn: Callable, query_fn: Callable, config):
        if kind not in ("person", "caption"):
            raise ValueError(f"evaluation kind {kind!r}: expected 'person' or 'caption'")
        self.model, self.mesh, self.kind, self.config = model, mesh, kind, config
        self.gallery_fn, self.query_fn = gallery_fn, query_fn
        data = parallel.batch_sharding(mesh)
        self._encode_image = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method="encode_image"), out_shardings=(data, data, data)
        )
        self._encode_text = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method="encode_text"), out_shardings=(data, data, data)
        )

    def run(self, params) -> dict[str, Any]:
        keep_tokens = self.kind == "caption"
        gallery = encode_split(self._encode_image, params, self.gallery_fn(), "images", self.mesh, keep_tokens)
        query = encode_split(self._encode_text, params, self.query_fn(), "text_ids", self.mesh, keep_tokens)
        if self.kind == "person":
            result = person_retrieval(query, gallery)
        else:
            tcfg = self.config.tgdt
            result = caption_retrieval(query, gallery, k_t2i=tcfg.k_t2i, k_i2t=tcfg.k_i2t,
                                       local_scale=tcfg.local_scale)
            folds = int(tcfg.get("coco_1k_folds", 0) or 0)
            if folds:
                one_k = coco_1k_retrieval(query, gallery, folds, int(tcfg.get("coco_1k_fold_size", 1000)),
                                          k_t2i=tcfg.k_t2i, k_i2t=tcfg.k_i2t, local_scale=tcfg.local_scale)
                result.update({f"coco_1k/{kind}": value for kind, value in one_k.items()})
        result_counts = {"num_queries": int(len(query["global"])), "num_gallery": int(len(gallery["global"]))}
        return {**result, **result_counts}


def flatten_metrics(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{'two_stage': {'rsum': ..}} -> {'two_stage/rsum': ..}."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def report(result: Mapping[str, Any], workdir: str, step: int, writer=None, name: str = "eval") -> str:
    """Writes WORKDIR/{name}_metrics.json (+ TensorBoard via writer) and returns the printed table."""
    tables = []
    nested = {k: v for k, v in result.items() if isinstance(v, Mapping)}
    if nested:
        for key, value in nested.items():
            tables.append(metrics_lib.format_metrics_table(value, title=f"{name} @ step {step}: {key}"))
    else:
        scalars = {k: v for k, v in result.items() if not k.startswith("num_")}
        tables.append(metrics_lib.format_metrics_table(scalars, title=f"{name} @ step {step}"))
    table = "\n".join(tables)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, f"{name}_metrics.json"), "w") as f:
            json.dump({"step": step, **result}, f, indent=2)
        if writer is not None:
            writer.scalars(step, flatten_metrics(result), prefix=name)
    return table
