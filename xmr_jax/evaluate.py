"""Evaluation: encode the gallery and the queries in jitted batches, score on device, report.

Two evaluator kinds; config.evals declares which run (kind, split, every_epochs, prefix and the
kind's settings; `evaluator_specs`), a model family names its default kind and settings
(xmr_jax.models.families), and `Evaluator.for_config` builds one:
Person retrieval ("person", IRRA): text -> image, R1/R5/R10/mAP/mINP over pids
(docs/semantics.md, 'Evaluation').
Caption retrieval ("caption", TGDT): both directions, R@1/5/10 and rsum, for global-only,
local-only and two-stage (global top-k, rerank by s_g + s_l) scoring (docs/semantics.md,
'Similarity and retrieval'); with the
coco_1k_folds setting also the COCO 1K protocol (the same three per fold of 1000 images,
averaged; keys "coco_1k/...").

Features stay on device: the encoders return them L2-normalized (tokens in the compute dtype,
bfloat16 when config.precision == "bfloat16"), and the batches are assembled device by device
into global arrays sharded over the batch axes of the mesh (each device keeps the rows it
encoded: nothing is gathered onto one host or device). Scoring runs sharded over the mesh
(:mod:`xmr_jax.retrieval`: gallery sharded, queries gathered a chunk at a time); only global
features' scores [Nq, Ng], ids and validity reach the host. Padded rows of the last batch
(valid=False) are computed, never retrieved (gallery) and dropped from the score matrices; the
rows are put back in the order the data came in, so metrics (ties included) equal scoring the
real rows in that order.

The caption setting local_exhaustive (default True; config.tgdt.eval_local_exhaustive for the
tgdt family): also report the "local" (local similarity only) metrics. That is every pair x every valid token pair: Nq x Ng x Lq x Lg x D multiply-adds,
~10^15 at COCO-5K size (5000 x 25000 pairs x 196 x ~18 tokens x 512), hours on CPU and minutes
on accelerators; set False to skip it (two-stage needs only the global top-k).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from xmr_jax import metrics as metrics_lib
from xmr_jax import parallel, retrieval, similarity


def _to_host(x: jax.Array) -> np.ndarray:
    """A globally sharded array -> the full numpy array on every process."""
    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _inputs(batch: Mapping[str, Any], input_key: Union[str, Sequence[str]]) -> list:
    keys = (input_key,) if isinstance(input_key, str) else tuple(input_key)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"evaluation batch has no {missing} (its keys: {sorted(batch)}); the model family's "
                       f"encoder takes {list(keys)}")
    return [batch[k] for k in keys]


def encode_split(encode_fn: Callable, params, batches: Iterable[Mapping[str, np.ndarray]],
                 input_key: Union[str, Sequence[str]], mesh, keep_tokens: bool) -> dict[str, np.ndarray]:
    """Runs `encode_fn(params, *inputs) -> (global, tokens, mask)` over batches; keeps valid rows.

    inputs: batch[k] for k in input_key (one key or a sequence of keys).

    The host path (small data, tools): returns numpy global [N,D] float32, pids [N],
    image_ids [N] and, with keep_tokens, tokens [N,L,D] (float32) and mask [N,L] bool. The
    Evaluator uses :func:`encode_split_on_device` instead.
    """
    out: dict[str, list] = {"global": [], "pids": [], "image_ids": [], "tokens": [], "mask": []}
    for local in batches:
        batch = parallel.global_batch(local, mesh)
        g, tok, mask = encode_fn(params, *_inputs(batch, input_key))
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


# ----------------------------------------------------------------------------------------------
# Device-resident encoded splits


@dataclasses.dataclass
class EncodedSplit:
    """One encoded split, features on device.

    global_features [N, D] float32 and tokens [N, L, D] (compute dtype) L2-normalized, mask
    [N, L] bool (token axis compacted to the valid window): global jax Arrays, sharded over the
    mesh's batch axes (or on one device). valid / pids / image_ids / order: host numpy [N];
    valid False marks padding rows; order is each row's position in the order the data came in
    (the device-major layout differs from it).
    """
    global_features: jax.Array
    tokens: Optional[jax.Array]
    mask: Optional[jax.Array]
    valid: np.ndarray
    pids: np.ndarray
    image_ids: np.ndarray
    order: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        """Indices of the valid rows, in the order the data came in."""
        real = np.flatnonzero(self.valid)
        return real[np.argsort(self.order[real], kind="stable")]

    def __len__(self) -> int:
        return int(self.valid.sum())


def from_numpy(split: Mapping[str, np.ndarray], compute_dtype=None) -> EncodedSplit:
    """An :func:`encode_split` dict (numpy, valid rows only) -> EncodedSplit on the default device."""
    n = len(split["global"])
    tokens = split.get("tokens")
    feats = retrieval.prepare_features(split["global"], tokens, split.get("mask"), compute_dtype)
    return EncodedSplit(feats.global_features, feats.tokens, feats.mask, np.ones(n, bool),
                        np.asarray(split["pids"]), np.asarray(split["image_ids"]), np.arange(n))


def _assemble(parts: list[jax.Array], window=None) -> jax.Array:
    """Concatenates per-batch global arrays (all sharded like ``parts[0]`` over their rows)
    device by device: each device concatenates the rows it holds, nothing moves between devices.
    The result is sharded the same way; row order is device-major (see EncodedSplit.order).
    ``window``: (lo, hi) slice of axis 1 taken at the same time (token compaction)."""
    sharding = parts[0].sharding
    per_device = collections.defaultdict(list)
    for part in parts:
        for shard in part.addressable_shards:
            data = shard.data if window is None else shard.data[:, window[0]:window[1]]
            per_device[shard.device].append(data)
    first = parts[0].shape[1:] if window is None else (window[1] - window[0],) + parts[0].shape[2:]
    shape = (sum(p.shape[0] for p in parts),) + tuple(first)
    arrays = []
    for device in sharding.addressable_devices_indices_map(shape):
        pieces = per_device[device]
        arrays.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def encode_split_on_device(encode_fn: Callable, params, batches: Iterable[Mapping[str, np.ndarray]],
                           input_key: Union[str, Sequence[str]], mesh, keep_tokens: bool) -> EncodedSplit:
    """Runs ``encode_fn(params, *inputs) -> (global, tokens, mask)`` (normalized, sharded over the
    batch axes; tokens/mask None without keep_tokens) over the batches and assembles an
    EncodedSplit without moving features between devices or to the host."""
    sharding = parallel.batch_sharding(mesh)
    parts = collections.defaultdict(list)
    windows = []
    start = 0
    for local in batches:
        batch = parallel.global_batch(local, mesh)
        g, tok, mask = encode_fn(params, *_inputs(batch, input_key))
        n = batch["valid"].shape[0]
        order = _arange_fn(n, sharding)(np.int32(start))    # position of each row, on device
        start += n
        for key, value in (("global", g), ("valid", batch["valid"]), ("pids", batch["pids"]),
                           ("image_ids", batch["image_ids"]), ("order", order)):
            parts[key].append(value)
        if keep_tokens:
            parts["tokens"].append(tok)
            parts["mask"].append(mask)
            windows.append(similarity.token_window(mask))
    if not parts["global"]:
        raise ValueError(f"the evaluation split yielded no batches for {input_key!r}")
    host = {key: _to_host(_assemble(parts[key])) for key in ("valid", "pids", "image_ids", "order")}
    tokens = mask = None
    if keep_tokens:
        window = (min(w[0] for w in windows), max(w[1] for w in windows))
        tokens, mask = _assemble(parts["tokens"], window), _assemble(parts["mask"], window)
    return EncodedSplit(_assemble(parts["global"]), tokens, mask, host["valid"].astype(bool),
                        host["pids"], host["image_ids"], host["order"])


@functools.lru_cache(maxsize=None)
def _arange_fn(n: int, sharding):
    return jax.jit(lambda start: jnp.arange(n, dtype=jnp.int32) + start, out_shardings=sharding)


def select_rows(split: EncodedSplit, keep: np.ndarray) -> EncodedSplit:
    """The rows ``keep`` [N] bool of a split, selected on each device among its own rows (no
    data moves between devices); devices are padded to equal counts with invalid rows."""
    keep = np.asarray(keep, bool) & split.valid
    arrays = [a for a in (split.global_features, split.tokens, split.mask) if a is not None]
    ref = arrays[0]
    sharding = ref.sharding
    n = ref.shape[0]
    index_map = sharding.devices_indices_map((n,) + ref.shape[1:])
    spans = {d: (idx[0].start or 0, n if idx[0].stop is None else idx[0].stop)
             for d, idx in index_map.items()}
    local = {d: np.flatnonzero(keep[lo:hi]) for d, (lo, hi) in spans.items()}
    m = max(1, max(len(v) for v in local.values()))
    take = {d: np.concatenate([v, np.zeros(m - len(v), np.int64)]) for d, v in local.items()}
    ok = {d: np.arange(m) < len(v) for d, v in local.items()}
    devices = sorted(index_map, key=lambda d: spans[d][0])   # shard order: same in the new array
    rows = np.concatenate([spans[d][0] + take[d] for d in devices])
    new_valid = np.concatenate([ok[d] for d in devices])

    def pick(a):
        shape = (len(devices) * m,) + a.shape[1:]
        shards = {s.device: s.data for s in a.addressable_shards}
        out = [jnp.take(shards[d], jnp.asarray(take[d]), axis=0)
               for d in a.sharding.addressable_devices_indices_map(shape)]
        return jax.make_array_from_single_device_arrays(shape, a.sharding, out)

    if len(devices) == 1:
        pick = lambda a: jnp.take(a, jnp.asarray(rows), axis=0)   # noqa: E731
    return EncodedSplit(pick(split.global_features),
                        None if split.tokens is None else pick(split.tokens),
                        None if split.mask is None else pick(split.mask),
                        new_valid, split.pids[rows], split.image_ids[rows], split.order[rows])


# ----------------------------------------------------------------------------------------------
# Metrics


def _mesh_axis(mesh):
    if mesh is None:
        return None
    axes = tuple(a for a in parallel.BATCH_AXES if a in mesh.shape)
    return axes or tuple(mesh.shape)[:1]


def _as_split(x: Union[EncodedSplit, Mapping[str, np.ndarray]]) -> EncodedSplit:
    return x if isinstance(x, EncodedSplit) else from_numpy(x)


def person_retrieval(query, gallery, mesh=None) -> dict[str, float]:
    """Text -> image person retrieval metrics from encoded queries and gallery (EncodedSplit,
    or encode_split dicts)."""
    q, g = _as_split(query), _as_split(gallery)
    sim = retrieval.global_scores(q.global_features, g.global_features, mesh=mesh,
                                  axis=_mesh_axis(mesh) or "data", normalized=True,
                                  gallery_valid=g.valid)
    q_rows, g_rows = q.rows, g.rows
    return metrics_lib.person_retrieval_metrics(_to_host(sim)[np.ix_(q_rows, g_rows)],
                                                q.pids[q_rows], g.pids[g_rows])


def caption_retrieval(query, gallery, k_t2i: int = 100, k_i2t: int = 50,
                      local_scale: float = 10.0, mesh=None,
                      local_exhaustive: bool = True, relevances=None,
                      ndcg_k: int = 25) -> dict[str, dict[str, float]]:
    """Global-only, local-only and two-stage caption retrieval metrics (keys 'global', 'local'
    (only with local_exhaustive), 'two_stage').

    relevances: None, or {method: [N_txt, N_img]} graded relevances (TERAN's files, captions and
    images in the split's order, 5 captions per image): each ranking then also reports
    i2t_ndcg_<method> / t2i_ndcg_<method> (NDCG@ndcg_k, `metrics.ndcg_metrics`; not in rsum).

    query (captions) / gallery (images): EncodedSplit (features on device, sharded over
    ``mesh``) or encode_split dicts. Scores are computed sharded over ``mesh`` (gallery sharded,
    queries a chunk at a time); only the [N_img, N_txt] score matrices come to the host.
    """
    q, g = _as_split(query), _as_split(gallery)
    q_rows, g_rows = q.rows, g.rows
    index_of = {int(i): n for n, i in enumerate(g.image_ids[g_rows])}
    missing = [int(i) for i in q.image_ids[q_rows] if int(i) not in index_of]
    if missing:
        raise ValueError(f"{len(missing)} captions refer to images absent from the gallery "
                         f"(e.g. image id {missing[0]})")
    text_to_image = np.array([index_of[int(i)] for i in q.image_ids[q_rows]])
    axis = _mesh_axis(mesh) or "data"
    common = dict(mesh=mesh, axis=axis, normalized=True)

    def i2t_host(scores):           # [N_img(all rows), N_txt(all rows)] -> valid, in order
        return _to_host(scores)[np.ix_(g_rows, q_rows)]

    def t2i_host(scores):           # [N_txt, N_img] -> [N_img, N_txt]
        return _to_host(scores)[np.ix_(q_rows, g_rows)].T

    if relevances is not None:
        per_image = len(q_rows) // max(len(g_rows), 1)
        if not np.array_equal(text_to_image, np.arange(len(q_rows)) // max(per_image, 1)) or per_image < 1:
            raise ValueError("NDCG (ndcg_relevance_dir) needs the same number of captions for every image, in "
                             "image order, as TERAN's relevance files index them")

    def report(sim_i2t_for_i2t, sim_i2t_for_t2i):
        i2t = metrics_lib.caption_retrieval_metrics(sim_i2t_for_i2t, text_to_image=text_to_image)
        t2i = metrics_lib.caption_retrieval_metrics(sim_i2t_for_t2i, text_to_image=text_to_image)
        merged = {k: v for k, v in i2t.items() if k.startswith("i2t")}
        merged.update({k: v for k, v in t2i.items() if k.startswith("t2i")})
        merged["rsum"] = sum(v for k, v in merged.items() if k != "rsum")
        if relevances is not None:
            for sim, direction in ((sim_i2t_for_i2t, "i2t"), (sim_i2t_for_t2i, "t2i")):
                ndcg = metrics_lib.ndcg_metrics(sim, relevances, k=ndcg_k, captions_per_image=per_image)
                merged.update({k: v for k, v in ndcg.items() if k.startswith(direction)})  # in [0, 1]
        return merged

    result = {}
    s_global = i2t_host(retrieval.global_scores(g.global_features, q.global_features,
                                                gallery_valid=q.valid, **common))
    result["global"] = report(s_global, s_global)
    del s_global
    if local_exhaustive:
        s_local = i2t_host(retrieval.exhaustive_local(
            g.tokens, g.mask, q.tokens, q.mask, "i2t", local_scale, gallery_valid=q.valid,
            **common))
        result["local"] = report(s_local, s_local)
        del s_local
    two_i2t = i2t_host(retrieval.two_stage_scores(
        g.global_features, g.tokens, g.mask, q.global_features, q.tokens, q.mask, k=k_i2t,
        direction="i2t", local_scale=local_scale, gallery_valid=q.valid, **common))
    two_t2i = t2i_host(retrieval.two_stage_scores(
        q.global_features, q.tokens, q.mask, g.global_features, g.tokens, g.mask, k=k_t2i,
        direction="t2i", local_scale=local_scale, gallery_valid=g.valid, **common))
    result["two_stage"] = report(two_i2t, two_t2i)
    return {key: result[key] for key in ("global", "local", "two_stage") if key in result}


def coco_1k_retrieval(query, gallery, folds: int = 5, fold_size: int = 1000, k_t2i: int = 100,
                      k_i2t: int = 50, local_scale: float = 10.0, mesh=None,
                      local_exhaustive: bool = True, relevances=None,
                      ndcg_k: int = 25) -> dict[str, dict[str, float]]:
    """COCO 1K protocol: `caption_retrieval` on each fold of `fold_size` images, averaged.

    Fold f holds the images ranked [f * fold_size, (f + 1) * fold_size) by image id (the split's
    image order, whatever order the evaluator gathered them in) and every caption of those
    images. relevances (whole split, see `caption_retrieval`): each fold gets its block (TERAN's
    5-fold NDCG). Each fold is scored on its own features, so the two-stage top-k candidates come from
    the fold's images / captions only (rows selected on each device, see `select_rows`). Every
    metric, rsum included, is the mean over folds (rsum is not multiplied by the number of folds).

    Args:
      query / gallery: EncodedSplit or outputs of `encode_split` (global [N,D], tokens [N,L,D],
        mask [N,L], pids [N], image_ids [N]); the gallery must hold exactly folds * fold_size
        images.
    Returns:
      {"global": {...}, "local": {...}, "two_stage": {...}} with the keys of `caption_retrieval`.
    """
    q, g = _as_split(query), _as_split(gallery)
    g_rows = g.rows
    n_img = len(g_rows)
    if folds < 1 or fold_size < 1 or n_img != folds * fold_size:
        raise ValueError(
            f"config.tgdt.coco_1k_folds={folds} x config.tgdt.coco_1k_fold_size={fold_size} = "
            f"{folds * fold_size} images, but the evaluation split has {n_img} images"
        )
    ids = g.image_ids[g_rows]
    order = np.argsort(ids, kind="stable")
    per_fold = []
    for f in range(folds):
        fold_ids = ids[order[f * fold_size:(f + 1) * fold_size]]
        keep_g = np.zeros(len(g.valid), bool)
        keep_g[g_rows[order[f * fold_size:(f + 1) * fold_size]]] = True
        keep_q = q.valid & np.isin(q.image_ids, fold_ids)
        fold_rel = None
        if relevances is not None:   # the fold's block: images ranked [f F, (f+1) F), their captions
            per_image = len(q.rows) // n_img
            fold_rel = {m: r[f * fold_size * per_image:(f + 1) * fold_size * per_image, f * fold_size:(f + 1) * fold_size]
                        for m, r in relevances.items()}
        per_fold.append(caption_retrieval(select_rows(q, keep_q), select_rows(g, keep_g),
                                          k_t2i=k_t2i, k_i2t=k_i2t, local_scale=local_scale,
                                          mesh=mesh, local_exhaustive=local_exhaustive, relevances=fold_rel,
                                          ndcg_k=ndcg_k))
    return {kind: {key: float(np.mean([m[kind][key] for m in per_fold])) for key in per_fold[0][kind]}
            for kind in per_fold[0]}


# ndcg_relevance_dir: "" = no NDCG; else NDCG@ndcg_k of every ranking from TERAN's relevance files
# {dir}/{ndcg_name}-{ndcg_split}-{rougeL,spice}.npy (xmr_jax.metrics.load_relevances).
CAPTION_SETTINGS = {"k_t2i": 100, "k_i2t": 50, "local_scale": 10.0, "local_exhaustive": True,
                    "coco_1k_folds": 0, "coco_1k_fold_size": 1000, "ndcg_relevance_dir": "", "ndcg_name": "",
                    "ndcg_split": "test", "ndcg_k": 25}
KIND_SETTINGS = {"person": {}, "caption": CAPTION_SETTINGS}
_ENTRY_FIELDS = ("kind", "split", "every_epochs", "prefix")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One evaluator declared in config.evals, resolved: kind, split, every_epochs (0 = only after
    training), prefix (names its report and logs) and the kind's settings (family's, then the
    entry's own)."""
    name: str
    kind: str
    split: str
    every_epochs: int
    prefix: str
    settings: Mapping[str, Any]


def evaluator_specs(config) -> list[EvalSpec]:
    """config.evals -> [EvalSpec] in name order (ConfigDict's); raises ValueError naming the field.

    An entry: kind ("" = the model family's), split ("" = config.data.eval_split), every_epochs
    (int >= 0), prefix (non-empty, unique), plus any settings of its kind.
    """
    from xmr_jax.models.families import get_family

    family = get_family(config.model_family)
    evals = config.get("evals")
    if not evals:
        raise ValueError("config.evals is empty; declare at least one evaluator (see configs/common.py: "
                         "trainer_defaults)")
    specs, prefixes = [], {}
    for name, entry in evals.items():
        where = f"config.evals.{name}"
        entry = dict(entry)
        kind = entry.get("kind") or family.evaluator
        if kind not in KIND_SETTINGS:
            raise ValueError(f"{where}.kind={kind!r}: expected one of {sorted(KIND_SETTINGS)} (or '' for the "
                             f"model family's, {family.evaluator!r})")
        split = entry.get("split") or config.data.get("eval_split", "test")
        every = entry.get("every_epochs", 0)
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(f"{where}.every_epochs={every!r}: expected an integer >= 0 (0 = only after training)")
        prefix = entry.get("prefix") or ""
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise ValueError(f"{where}.prefix={prefix!r}: expected a non-empty name without '/'")
        if prefix in prefixes:
            raise ValueError(f"{where}.prefix={prefix!r}: config.evals.{prefixes[prefix]} has it too; each "
                             "evaluator needs its own prefix (it names its report and logs)")
        prefixes[prefix] = name
        own = {k: v for k, v in entry.items() if k not in _ENTRY_FIELDS}
        unknown = sorted(set(own) - set(KIND_SETTINGS[kind]))
        if unknown:
            raise ValueError(f"{where}: {unknown} are not settings of kind {kind!r}; its settings: "
                             f"{sorted(KIND_SETTINGS[kind])}, and the fields {list(_ENTRY_FIELDS)}")
        settings = {**(family.eval_settings(config) if kind == family.evaluator else {}), **own}
        specs.append(EvalSpec(str(name), kind, str(split), int(every), prefix, settings))
    return specs


PERSON_METRICS = ("R1", "R5", "R10", "mAP", "mINP")


@dataclasses.dataclass(frozen=True)
class SelectionRule:
    """Model selection (config.select), resolved: the evaluator whose results pick the best
    checkpoint (`spec`, one of `evaluator_specs`), the metric (a key of its flattened results, e.g.
    "R1" or "two_stage/rsum") and mode ("max" / "min")."""
    spec: EvalSpec
    metric: str
    mode: str


def selection_rule(config, specs: Sequence[EvalSpec]) -> Optional[SelectionRule]:
    """config.select -> SelectionRule, or None when config.select.eval is "" (or config.select is
    absent): no selection, the last epoch is reported. Raises ValueError naming the field.

    config.select: eval (a name in config.evals, e.g. "val": its every_epochs > 0 so there is
    something to choose from), metric (default "R1"), mode ("max" | "min"), note (printed when
    eval is "", e.g. why a data set has no validation split).
    """
    select = config.get("select")
    if not select or not select.get("eval"):
        return None
    by_name = {spec.name: spec for spec in specs}
    name, metric, mode = select.get("eval"), select.get("metric", "R1"), select.get("mode", "max")
    if name not in by_name:
        raise ValueError(f"config.select.eval={name!r}: expected one of config.evals ({sorted(by_name)}) or '' "
                         "for no selection")
    spec = by_name[name]
    if spec.every_epochs <= 0:
        raise ValueError(f"config.select.eval={name!r}: config.evals.{name}.every_epochs is 0, so it runs only "
                         "after training and there is nothing to select; set it (or config.eval_every_epochs) "
                         "to N >= 1")
    if mode not in ("max", "min"):
        raise ValueError(f"config.select.mode={mode!r}: expected 'max' or 'min'")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"config.select.metric={metric!r}: expected a metric name such as 'R1'")
    if spec.kind == "person" and metric not in PERSON_METRICS:
        raise ValueError(f"config.select.metric={metric!r}: person retrieval reports {list(PERSON_METRICS)}")
    if len(specs) < 2:
        raise ValueError(f"config.select.eval={name!r} is the only evaluator in config.evals; declare the test "
                         "evaluator too, to report its metrics at the selected checkpoint")
    return SelectionRule(spec, metric, mode)


def selected_value(rule: SelectionRule, result: Mapping[str, Any]) -> float:
    """The selection metric in one result of rule.spec; ValueError naming config.select.metric
    and the keys there are when it has no such metric (caption results: "two_stage/rsum", ...)."""
    flat = flatten_metrics(result)
    if rule.metric not in flat:
        known = sorted(k for k in flat if not k.split("/")[-1].startswith("num_"))
        raise ValueError(f"config.select.metric={rule.metric!r}: config.evals.{rule.spec.name} reports "
                         f"{known}")
    return flat[rule.metric]


def summarize_seeds(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict:
    """Mean and standard deviation over seeds of every reported metric.

    per_seed: {seed: {row: result}}, a result being an evaluator's metrics (nested caption results
    are flattened: "two_stage/rsum"); counts (num_*) are left out. Rows are what was evaluated,
    e.g. "eval" (test, last epoch) and "eval@best" (test at the best-on-validation checkpoint).
    Returns {"seeds": [...], "rows": {row: {metric: {"mean", "std", "values"}}}}; std is the
    sample standard deviation (ddof=1; None for one seed). A row some seed lacks is left out.
    """
    seeds = sorted(per_seed)
    if not seeds:
        raise ValueError("summarize_seeds: no seed results")
    rows = {}
    for row in per_seed[seeds[0]]:
        if not all(row in per_seed[s] for s in seeds):
            continue
        flats = [flatten_metrics(per_seed[s][row]) for s in seeds]
        metrics = {}
        for key in flats[0]:
            if key.split("/")[-1].startswith("num_") or not all(key in f for f in flats):
                continue
            values = [float(f[key]) for f in flats]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else None
            metrics[key] = {"mean": float(np.mean(values)), "std": std, "values": values}
        rows[row] = metrics
    return {"seeds": seeds, "rows": rows}


def seeds_table(summary: Mapping[str, Any]) -> str:
    """`summarize_seeds` output as a markdown table: one line per row, mean ± std per metric
    (person metrics in their usual order first)."""
    lines = [f"Mean ± std (sample, ddof=1) over seeds {', '.join(map(str, summary['seeds']))}"]
    for row, metrics in summary["rows"].items():
        keys = [k for k in PERSON_METRICS if k in metrics] + [k for k in metrics if k not in PERSON_METRICS]
        cell = lambda m: f"{m['mean']:.2f}" + (f" ± {m['std']:.2f}" if m["std"] is not None else "")  # noqa: E731
        lines += ["", f"| {row} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
                  "| mean ± std | " + " | ".join(cell(metrics[k]) for k in keys) + " |"]
        lines += [f"| seed {s} | " + " | ".join(f"{metrics[k]['values'][i]:.2f}" for k in keys) + " |"
                  for i, s in enumerate(summary["seeds"])]
    return "\n".join(lines) + "\n"


class Evaluator:
    """Encodes the eval split with the current params and computes the metrics of one kind.

    Features stay on device, sharded over the mesh (see the module docstring).

    Args:
      model: module with `encode_image` / `encode_text` methods returning (global [B,D],
        tokens [B,L,D], mask [B,L]).
      kind: "person" (text -> image over pids) or "caption" (both directions; needs token features).
      gallery_fn / query_fn: () -> iterator of per-process numpy batches (with `valid`, `pids`,
        `image_ids` and the encoder inputs).
      settings: the kind's settings (`KIND_SETTINGS`; missing ones take their defaults).
      precision: "bfloat16" keeps token features in bfloat16 on device, else float32.
      image_inputs / text_inputs: batch keys passed, in order, to encode_image / encode_text.
    """

    def __init__(self, model, mesh, kind: str, gallery_fn: Callable, query_fn: Callable,
                 settings: Mapping[str, Any] | None = None, precision: str = "float32",
                 image_inputs: Sequence[str] = ("images",), text_inputs: Sequence[str] = ("text_ids",)):
        if kind not in KIND_SETTINGS:
            raise ValueError(f"evaluation kind {kind!r}: expected one of {sorted(KIND_SETTINGS)}")
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(KIND_SETTINGS[kind]))
        if unknown:
            raise ValueError(f"evaluation kind {kind!r} has no settings {unknown}; "
                             f"known: {sorted(KIND_SETTINGS[kind])}")
        self.model, self.mesh, self.kind = model, mesh, kind
        self.settings = {**KIND_SETTINGS[kind], **settings}
        self.gallery_fn, self.query_fn = gallery_fn, query_fn
        self.image_inputs, self.text_inputs = tuple(image_inputs), tuple(text_inputs)
        data = parallel.batch_sharding(mesh)
        keep_tokens = kind == "caption"
        dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32

        def encoder(method):
            def encode(p, *x):
                g, tok, mask = model.apply({"params": p}, *x, method=method)
                g = similarity.l2_normalize(g)              # normalized once, here
                if not keep_tokens:
                    return g, None, None
                return g, similarity.normalize_tokens(tok, dtype), mask.astype(bool)
            return jax.jit(encode, out_shardings=data)

        self._encode_image = encoder("encode_image")
        self._encode_text = encoder("encode_text")

    @classmethod
    def for_config(cls, model, mesh, gallery_fn: Callable, query_fn: Callable, config,
                   spec: EvalSpec | None = None) -> "Evaluator":
        """The evaluator `spec` (one of `evaluator_specs(config)`) declares, or without it the model
        family's kind with the family's settings; encoder inputs from the family."""
        from xmr_jax.models.families import get_family

        family = get_family(config.model_family)
        kind, settings = (spec.kind, spec.settings) if spec else (family.evaluator, family.eval_settings(config))
        model = family.eval_model(model, config)
        return cls(model, mesh, kind, gallery_fn, query_fn, settings,
                   precision=config.get("precision", "float32"), image_inputs=family.image_inputs,
                   text_inputs=family.text_inputs)

    def encode(self, params) -> tuple[EncodedSplit, EncodedSplit]:
        """(gallery, queries) encoded with ``params``, on device."""
        keep_tokens = self.kind == "caption"
        gallery = encode_split_on_device(self._encode_image, params, self.gallery_fn(), self.image_inputs,
                                         self.mesh, keep_tokens)
        query = encode_split_on_device(self._encode_text, params, self.query_fn(), self.text_inputs,
                                       self.mesh, keep_tokens)
        return gallery, query

    def run(self, params) -> dict[str, Any]:
        gallery, query = self.encode(params)
        if self.kind == "person":
            result = person_retrieval(query, gallery, mesh=self.mesh)
        else:
            s = self.settings
            common = dict(k_t2i=int(s["k_t2i"]), k_i2t=int(s["k_i2t"]), local_scale=float(s["local_scale"]),
                          mesh=self.mesh, local_exhaustive=bool(s["local_exhaustive"]))
            if s["ndcg_relevance_dir"]:
                common["relevances"] = metrics_lib.load_relevances(
                    s["ndcg_relevance_dir"], s["ndcg_name"], s["ndcg_split"], len(query), len(gallery))
                common["ndcg_k"] = int(s["ndcg_k"])
            result = caption_retrieval(query, gallery, **common)
            folds = int(s["coco_1k_folds"] or 0)
            if folds:
                one_k = coco_1k_retrieval(query, gallery, folds, int(s["coco_1k_fold_size"]), **common)
                result.update({f"coco_1k/{kind}": value for kind, value in one_k.items()})
        result_counts = {"num_queries": len(query), "num_gallery": len(gallery)}
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
