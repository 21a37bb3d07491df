"""Training objectives of IRRA (SDM, ID, MLM, ITC, CMPM) and TGDT (CMC), as pure jnp functions.

Every loss casts its inputs to float32 and computes in float32 (bf16 activations are fine as
input). All functions are jit- and grad-friendly: no Python control flow depends on values, only
on static shapes. Shape errors are reported as ``ValueError`` naming the argument.

Notation: B = batch size, D = embedding width, C = number of identity classes, V = vocabulary.
Feature arguments are UNNORMALIZED unless stated otherwise; the functions L2-normalize where the
reference systems do (docs/semantics.md, section 5 'Losses'), with the library's one
normalization, `xmr_jax.similarity.l2_normalize` (torch.nn.functional.normalize's eps: the norm is
clamped at 1e-12).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xmr_jax.similarity import l2_normalize

__all__ = [
    "sdm_loss",
    "id_loss",
    "mlm_loss",
    "masked_cross_entropy_sum",
    "itc_loss",
    "cmpm_loss",
    "cmc_loss",
    "positive_mask_from_ids",
]

CMC_NEGATIVES = ("hardest", "sum")


# ----------------------------------------------------------------------------- helpers


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_rank(x, rank: int, name: str, fn: str) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(
            f"{fn}: `{name}` must have {rank} dimensions, got shape {tuple(jnp.shape(x))}."
        )


def _check_pair(a, b, fn: str, a_name: str = "image_feats", b_name: str = "text_feats") -> None:
    _check_rank(a, 2, a_name, fn)
    _check_rank(b, 2, b_name, fn)
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{fn}: `{a_name}` and `{b_name}` must have the same shape [B, D], got "
            f"{tuple(jnp.shape(a))} and {tuple(jnp.shape(b))}."
        )


def _check_ids(ids, batch: int, name: str, fn: str) -> None:
    if jnp.shape(ids) != (batch,):
        raise ValueError(
            f"{fn}: `{name}` must have shape [B] = ({batch},), got {tuple(jnp.shape(ids))}."
        )


def positive_mask_from_ids(ids, other_ids=None) -> jax.Array:
    """Boolean positive-pair mask from identity labels.

    Args:
      ids: [B] integer ids of the rows (e.g. image ids or person ids of the images).
      other_ids: [B'] ids of the columns (e.g. of the texts); defaults to `ids`.

    Returns:
      [B, B'] bool, True where `ids[i] == other_ids[j]` (the pair belongs together).
    """
    ids = jnp.asarray(ids)
    other_ids = ids if other_ids is None else jnp.asarray(other_ids)
    if ids.ndim != 1 or other_ids.ndim != 1:
        raise ValueError(
            "positive_mask_from_ids: `ids` and `other_ids` must be 1-D, got shapes "
            f"{tuple(ids.shape)} and {tuple(other_ids.shape)}."
        )
    return ids[:, None] == other_ids[None, :]


def _pid_labels(pids) -> jax.Array:
    """[B] ids -> [B, B] float32 matrix of 1.0 where the ids are equal."""
    return positive_mask_from_ids(pids).astype(jnp.float32)


def _matching_kl(logits: jax.Array, q: jax.Array, eps: float) -> jax.Array:
    """mean over rows of sum over cols softmax(logits) * (log_softmax(logits) - log(q + eps))."""
    log_p = jax.nn.log_softmax(logits, axis=1)
    p = jnp.exp(log_p)
    return jnp.mean(jnp.sum(p * (log_p - jnp.log(q + eps)), axis=1))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example integer-label CE. logits [..., C] float32, labels [...] int -> [...].

    Written as logsumexp(logits) - logits[label] with the label picked by an iota comparison:
    its gradient (softmax - onehot) is one fused elementwise pass, never a scatter into [..., C].
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    picked = jnp.sum(jnp.where(classes == labels[..., None], logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def masked_cross_entropy_sum(logits, labels) -> tuple[jax.Array, jax.Array]:
    """Sum of CE over positions with labels != 0, and their count (both float32 scalars).

    logits [..., V], labels [...] int (0 = not a target). The MLM loss is sum / max(count, 1),
    however the positions were split into pieces (see `xmr_jax.models.irra.sparse_mlm`).
    """
    labels = jnp.asarray(labels)
    valid = labels != 0
    ce = _cross_entropy(_f32(logits), labels)
    return jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid).astype(jnp.float32)


# ----------------------------------------------------------------------------- IRRA losses


def sdm_loss(image_feats, text_feats, pids, logit_scale: float = 50.0, eps: float = 1e-8):
    """Similarity Distribution Matching (IRRA).

    Args:
      image_feats: [B, D] image global features (unnormalized; any float dtype).
      text_feats: [B, D] text global features of the unmasked captions.
      pids: [B] integer person ids; pairs with equal pid are positives.
      logit_scale: fixed temperature inverse (IRRA: 1/0.02 = 50).
      eps: added to the true matching distribution before the log.

    Returns:
      float32 scalar: KL-style loss image->text plus text->image (a SUM of both directions).
      With `t2i = norm(t) @ norm(i).T`, `q = labels / labels.sum(1)` (row-normalized pid
      equality) and S in (scale * t2i.T, scale * t2i):
      `mean_rows(sum_cols softmax(S) * (log_softmax(S) - log(q + eps)))`.
    """
    _check_pair(image_feats, text_feats, "sdm_loss")
    _check_ids(pids, jnp.shape(image_feats)[0], "pids", "sdm_loss")
    i_norm = l2_normalize(image_feats)
    t_norm = l2_normalize(text_feats)
    t2i = logit_scale * (t_norm @ i_norm.T)
    labels = _pid_labels(pids)
    q = labels / jnp.sum(labels, axis=1, keepdims=True)
    return _matching_kl(t2i.T, q, eps) + _matching_kl(t2i, q, eps)


def id_loss(image_logits, text_logits, pids):
    """Identity (instance) classification loss (IRRA).

    Args:
      image_logits: [B, C] classifier logits of the image global features.
      text_logits: [B, C] classifier logits of the text global features.
      pids: [B] integer class ids in [0, C).

    Returns:
      float32 scalar `(mean CE(image_logits, pids) + mean CE(text_logits, pids)) / 2`.
    """
    _check_pair(image_logits, text_logits, "id_loss", "image_logits", "text_logits")
    _check_ids(pids, jnp.shape(image_logits)[0], "pids", "id_loss")
    ce_i = jnp.mean(_cross_entropy(_f32(image_logits), jnp.asarray(pids)))
    ce_t = jnp.mean(_cross_entropy(_f32(text_logits), jnp.asarray(pids)))
    return (ce_i + ce_t) / 2.0


def mlm_loss(logits, labels):
    """Masked-language-model cross-entropy with label 0 = ignore.

    Args:
      logits: [..., V] vocabulary logits (e.g. [B, 77, 49408]).
      labels: [...] int target ids, 0 at positions that are not predicted.

    Returns:
      float32 scalar: CE averaged over positions with `labels != 0` in the whole batch;
      0.0 (not NaN, zero gradient) when no position is labelled.
    """
    if jnp.shape(logits)[:-1] != jnp.shape(labels):
        raise ValueError(
            f"mlm_loss: `logits` must have shape labels.shape + (V,), got logits "
            f"{tuple(jnp.shape(logits))} and labels {tuple(jnp.shape(labels))}."
        )
    total, count = masked_cross_entropy_sum(logits, labels)
    return total / jnp.maximum(count, 1.0)


def itc_loss(image_feats, text_feats, logit_scale: float = 50.0):
    """Symmetric InfoNCE image-text contrastive loss (CLIP / IRRA's ITC).

    Args:
      image_feats: [B, D] unnormalized image features; text_feats: [B, D] text features.
        Pair i is (image i, text i); every other column is a negative.
      logit_scale: fixed logit scale (50).

    Returns:
      float32 scalar `(CE(scale * I T^T, arange) + CE(scale * T I^T, arange)) / 2`.
    """
    _check_pair(image_feats, text_feats, "itc_loss")
    logits = logit_scale * (l2_normalize(image_feats) @ l2_normalize(text_feats).T)
    targets = jnp.arange(logits.shape[0])
    loss_i = jnp.mean(_cross_entropy(logits, targets))
    loss_t = jnp.mean(_cross_entropy(logits.T, targets))
    return (loss_i + loss_t) / 2.0


def cmpm_loss(image_feats, text_feats, pids, eps: float = 1e-8, label_norm: str = "l2"):
    """Cross-Modal Projection Matching loss (as in IRRA's objectives, off by default there).

    Projections use the UNNORMALIZED features of one side onto the normalized other side:
    `image_proj_text = I @ norm(T).T`, `text_proj_image = T @ norm(I).T` (both [B, B]); each
    direction is `mean_rows(sum_cols softmax(P) * (log_softmax(P) - log(q + eps)))`, result is
    the sum of the two directions.

    Args:
      image_feats: [B, D]; text_feats: [B, D]; pids: [B] int (equal pid = positive).
      eps: added to q before the log.
      label_norm: how the pid-equality matrix becomes `q`. "l2" (default) divides each row by
        its L2 norm, sqrt(#positives), exactly like IRRA's `compute_cmpm`; "l1" divides by the
        row sum, the true distribution of the CMPM paper. Identical when pids are unique.

    Returns:
      float32 scalar.
    """
    _check_pair(image_feats, text_feats, "cmpm_loss")
    _check_ids(pids, jnp.shape(image_feats)[0], "pids", "cmpm_loss")
    labels = _pid_labels(pids)
    if label_norm == "l2":
        q = labels / jnp.sqrt(jnp.sum(labels * labels, axis=1, keepdims=True))
    elif label_norm == "l1":
        q = labels / jnp.sum(labels, axis=1, keepdims=True)
    else:
        raise ValueError(f"cmpm_loss: `label_norm` must be 'l1' or 'l2', got {label_norm!r}.")
    i = _f32(image_feats)
    t = _f32(text_feats)
    image_proj_text = i @ l2_normalize(t).T
    text_proj_image = t @ l2_normalize(i).T
    return _matching_kl(image_proj_text, q, eps) + _matching_kl(text_proj_image, q, eps)


# ----------------------------------------------------------------------------- TGDT loss


def _hardest_negative_hinge(sim: jax.Array, negatives: jax.Array, margin: float) -> jax.Array:
    """VSE++ max-violation triplet loss, summed over the batch, both directions.

    sim: [B, B] float32 scores, rows images, cols texts; the diagonal S_ii is the reference
    positive of row i and of column i. negatives: [B, B] bool, True where (i, j) may serve as
    a negative. Returns
    `sum_i max_{j neg} [m + S_ij - S_ii]_+  +  sum_j max_{i neg} [m + S_ij - S_jj]_+`;
    a row/column without any negative contributes 0.
    """
    diag = jnp.diagonal(sim)
    cost_i2t = jnp.where(negatives, jax.nn.relu(margin + sim - diag[:, None]), 0.0)
    cost_t2i = jnp.where(negatives, jax.nn.relu(margin + sim - diag[None, :]), 0.0)
    return jnp.sum(jnp.max(cost_i2t, axis=1)) + jnp.sum(jnp.max(cost_t2i, axis=0))


def _sum_hinge(sim: jax.Array, negatives: jax.Array, margin: float) -> jax.Array:
    """VSE0 triplet loss: the hinge summed over ALL negatives, both directions. sim [B, B] float32
    (rows images, cols texts), negatives [B, B] bool -> scalar
    `sum_{(i,j) neg} ([m + S_ij - S_ii]_+ + [m + S_ij - S_jj]_+)`."""
    diag = jnp.diagonal(sim)
    cost_i2t = jax.nn.relu(margin + sim - diag[:, None])  # image i vs negative texts j
    cost_t2i = jax.nn.relu(margin + sim - diag[None, :])  # text j vs negative images i
    return jnp.sum(jnp.where(negatives, cost_i2t + cost_t2i, 0.0))


def cmc_loss(
    image_global,
    text_global,
    local_sim,
    margin: float = 0.2,
    slack: float = 0.3,
    positive_mask=None,
    negatives: str = "hardest",
):
    """Consistent multimodal contrastive loss of TGDT (docs/semantics.md, section 5).

    total = inter(S_global) + intra + inter(local_sim), where
    - `S_global = norm(V) @ norm(T).T` [B, B] (rows images, cols texts, cosine);
    - inter(S), `negatives="hardest"` (TGDT, VSE++):
      `sum_i max_{j neg} [m + S_ij - S_ii]_+ + sum_j max_{i neg} [m + S_ij - S_jj]_+`;
      `negatives="sum"` (VSE0): `sum_{(i,j) neg} ([m + S_ij - S_ii]_+ + [m + S_ij - S_jj]_+)`.
      The hardest-negative hinge collapses when trained from random towers (every similarity
      equal, loss = 4 * B * margin); the sum does not;
    - intra = `sum_j [max_i |(T T^T)_ij - (V V^T)_ij| - slack]_+` on the normalized globals.

    Positives: pair (i, i) is the reference positive of image row i and of text column i (the
    score every negative is compared against, one pair per row/column). Every other pair with
    `positive_mask[i, j] == True` (same image id or same pid, i.e. duplicates) is removed from
    the negatives, so a duplicate is never pushed away; it is not used as a second positive
    either. A row/column whose pairs are all positives adds 0.

    Args:
      image_global: [B, D] unnormalized image global features.
      text_global: [B, D] unnormalized text global features (text i describes image i).
      local_sim: [B, B] token-level similarity, rows images, cols texts, already scaled
        (e.g. `xmr_jax.similarity.local_similarity(..., scale=10)`).
      margin: hinge margin m (0.2).
      slack: intra-modal slack sigma (0.3).
      positive_mask: optional [B, B] bool, True where image i and text j belong together
        (e.g. `positive_mask_from_ids(image_ids)`); default: identity (only the diagonal).
      negatives: "hardest" or "sum" (see inter above).

    Returns:
      float32 scalar.
    """
    _check_pair(image_global, text_global, "cmc_loss", "image_global", "text_global")
    if negatives not in CMC_NEGATIVES:
        raise ValueError(f"cmc_loss: `negatives` must be one of {CMC_NEGATIVES}, got {negatives!r}.")
    inter = _hardest_negative_hinge if negatives == "hardest" else _sum_hinge
    b = jnp.shape(image_global)[0]
    if jnp.shape(local_sim) != (b, b):
        raise ValueError(
            f"cmc_loss: `local_sim` must have shape [B, B] = ({b}, {b}) (rows images, cols "
            f"texts), got {tuple(jnp.shape(local_sim))}."
        )
    eye = jnp.eye(b, dtype=bool)
    if positive_mask is None:
        positives = eye
    else:
        if jnp.shape(positive_mask) != (b, b):
            raise ValueError(
                f"cmc_loss: `positive_mask` must have shape ({b}, {b}), got "
                f"{tuple(jnp.shape(positive_mask))}."
            )
        positives = jnp.asarray(positive_mask).astype(bool) | eye
    negative_pairs = ~positives

    v = l2_normalize(image_global)
    t = l2_normalize(text_global)
    s_global = v @ t.T
    inter_global = inter(s_global, negative_pairs, margin)
    inter_local = inter(_f32(local_sim), negative_pairs, margin)

    gap = jnp.abs(t @ t.T - v @ v.T)
    intra = jnp.sum(jax.nn.relu(jnp.max(gap, axis=0) - slack))
    return inter_global + intra + inter_local


# ----------------------------------------------------------------------------- SigLIP sigmoid loss

__all__ += ["sigmoid_loss", "chunked_sigmoid_loss"]


def _sigmoid_block(image_feats, text_feats, image_ids, text_ids, logit_scale, logit_bias) -> jax.Array:
    """Sum over all pairs of -log sigmoid(label * (exp(t') cos + b)), label +1 where ids match.

    image_feats [Bi, D], text_feats [Bt, D] (unit norm, float32), ids int [Bi] / [Bt] -> float32 []."""
    logits = image_feats @ text_feats.T * jnp.exp(logit_scale) + logit_bias
    labels = jnp.where(image_ids[:, None] == text_ids[None, :], 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def _sigmoid_inputs(image_feats, text_feats, ids, fn: str):
    _check_pair(image_feats, text_feats, fn)
    batch = jnp.shape(image_feats)[0]
    if ids is None:
        ids = jnp.arange(batch, dtype=jnp.int32)
    _check_ids(ids, batch, "ids", fn)
    return l2_normalize(_f32(image_feats)), l2_normalize(_f32(text_feats)), jnp.asarray(ids)


def sigmoid_loss(image_feats, text_feats, logit_scale, logit_bias, ids=None) -> jax.Array:
    """SigLIP's pairwise sigmoid loss over all B x B pairs (dense, one device's view).

    loss = -(1/B) sum_{i,j} log sigmoid(z_ij (exp(t') <x_i, y_j> + b)), x, y the L2-normalized
    image / text features, z_ij = +1 for a positive pair and -1 otherwise.

    Args:
      image_feats, text_feats: [B, D] unnormalized (row i of each is pair i).
      logit_scale: t', the log temperature, float []; logit_bias: b, float [].
      ids: int [B] or None. None: the positives are the pairs (i, i) (SigLIP); otherwise every pair
        with ids[i] == ids[j] is positive (e.g. person ids: all images and captions of a person).
    Returns:
      float32 [].
    """
    x, y, ids = _sigmoid_inputs(image_feats, text_feats, ids, "sigmoid_loss")
    return _sigmoid_block(x, y, ids, ids, _f32(logit_scale), _f32(logit_bias)) / x.shape[0]


def chunked_sigmoid_loss(image_feats, text_feats, logit_scale, logit_bias, mesh, ids=None,
                         axes: tuple[str, ...] = ("data", "fsdp")) -> jax.Array:
    """`sigmoid_loss`, computed in chunks across the devices of `mesh` (SigLIP's 'chunked' loss).

    The batch rows are split over the mesh axes `axes` (the batch sharding). Each device keeps its
    B/n images and, n times, scores them against one device's B/n texts, then passes those texts
    (and their ids) to its neighbour along the axes with `jax.lax.ppermute`; the partial sums are
    added with `psum`. No device holds the B x D text matrix or a B x B logits matrix, only B/n x B/n
    blocks. Equal to `sigmoid_loss` on the same inputs (value and gradient).

    Args: as `sigmoid_loss`, plus mesh (jax.sharding.Mesh; B divisible by the product of the
      `axes` sizes) and axes (mesh axes the batch is sharded over).
    Returns: float32 [] (replicated).
    """
    from jax.sharding import PartitionSpec as P

    x, y, ids = _sigmoid_inputs(image_feats, text_feats, ids, "chunked_sigmoid_loss")
    axes = tuple(axes)
    n = 1
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"chunked_sigmoid_loss: axis {a!r} is not a mesh axis {tuple(mesh.shape)}")
        n *= mesh.shape[a]
    batch = x.shape[0]
    if batch % n:
        raise ValueError(f"chunked_sigmoid_loss: batch {batch} is not divisible by the {n} devices of axes {axes}")
    perm = [(i, (i + 1) % n) for i in range(n)]

    def local(x, y, ids_img, ids_txt, t, b):
        total = _sigmoid_block(x, y, ids_img, ids_txt, t, b)

        def step(_, carry):
            y, ids_txt, total = carry
            y = jax.lax.ppermute(y, axes, perm)
            ids_txt = jax.lax.ppermute(ids_txt, axes, perm)
            return y, ids_txt, total + _sigmoid_block(x, y, ids_img, ids_txt, t, b)

        _, _, total = jax.lax.fori_loop(1, n, step, (y, ids_txt, total))
        return jax.lax.psum(total, axes) / batch

    rows = P(axes)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, rows, P(), P()), out_specs=P())
    return fn(x, y, ids, ids, _f32(logit_scale), _f32(logit_bias))
