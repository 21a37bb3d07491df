"""Optimizers for xmr_jax: IRRA parameter groups, coupled-L2 Adam, learning-rate schedules.

Everything is built from the ``config.optim`` ConfigDict (see ``default_irra_optim_config``):

  name          "adam_l2" (Adam with COUPLED L2: ``g + wd * p`` is fed to Adam, as torch.optim.Adam's
                ``weight_decay``; IRRA) or "adamw" (decoupled: ``p -= lr * (adam(g) + wd * p)``).
  lr            base learning rate (the lr of a parameter no rule matches).
  weight_decay  base weight decay.
  b1, b2, eps   Adam moments and epsilon (IRRA: 0.9, 0.999, 1e-3).
  schedule      "epoch_warmup_cosine" | "step_warmup_cosine" | "step_decay" | "constant".
  warmup_epochs, warmup_factor, num_epochs   (the two warmup-cosine schedules)
  decay_epochs, decay_rate                   ("step_decay": x decay_rate every decay_epochs epochs)
  warmup_steps  linear warmup (from warmup_factor to 1) in steps for "step_decay" and "constant";
                0 = none (TGDT on Flickr30K uses 1000).
  grad_clip     None or a float: clip the RAW gradient by its global norm (over all parameters)
                BEFORE the L2 term is added (so the decay term is never clipped).
  param_groups  ordered rules; each rule is ``(substrings, lr_mult, weight_decay)`` (tuple/list) or a
                mapping with keys ``contains``, ``lr_mult``, ``weight_decay``. ``substrings`` is a
                regular expression or a sequence of them; a rule matches a parameter when ANY of them
                is found (``re.search``) in the parameter's path name ``"/".join(keys)`` (e.g.
                "cross_attn/out_proj/bias"), so a plain word matches wherever it occurs and
                "^base_model/visual/" or "/bias$" anchor it.
                Rules are applied in order; a matching rule sets the parameter's lr to
                ``lr_mult * lr`` (when lr_mult is not None) and its weight decay (when not None), so a
                later rule overrides an earlier one. Multipliers are relative to the BASE lr (they do
                not compound), as in the IRRA reference, so ``--config.optim.lr`` rescales all groups.

Effective learning rate of a parameter at optimizer step ``s`` (0-based; the s-th update):
``lr * lr_mult(param) * factor(s)``, where ``factor`` is the schedule factor (``schedule_factor``).

The train state that holds the optimizer state is ``xmr_jax.train.TrainState``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any

OPTIMIZERS = ("adam_l2", "adamw")
SCHEDULES = ("epoch_warmup_cosine", "step_warmup_cosine", "step_decay", "constant")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def default_irra_optim_config() -> ml_collections.ConfigDict:
    """IRRA's recipe (docs/semantics.md, section 'Training recipes'): Adam + coupled L2, parameter groups, warmup-cosine, 60 ep."""
    c = ml_collections.ConfigDict()
    c.name = "adam_l2"
    c.lr = 1e-5
    c.weight_decay = 4e-5
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-3
    c.schedule = "epoch_warmup_cosine"
    c.warmup_epochs = 5
    c.warmup_factor = 0.1
    c.num_epochs = 60
    c.decay_epochs = 20
    c.decay_rate = 0.1
    c.warmup_steps = 0
    c.grad_clip = ml_collections.FieldReference(None, field_type=float)
    # (substrings, lr multiplier of the base lr, weight decay); later rules override earlier ones.
    c.param_groups = [
        (("cross",), 5.0, None),
        (("bias",), 2.0, 0.0),
        (("classifier", "mlm_head"), 5.0, None),
    ]
    return c


def default_tgdt_optim_config() -> ml_collections.ConfigDict:
    """TGDT recipe (docs/semantics.md, section 'Training recipes'): Adam lr 1e-5, no decay, clip 2.0, x0.1 every 20 of 60 epochs."""
    c = default_irra_optim_config()
    c.weight_decay = 0.0
    c.eps = 1e-8
    c.schedule = "step_decay"
    c.grad_clip = 2.0
    c.param_groups = []
    return c


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Reads ``cfg.key`` from a ConfigDict / Mapping / object, with a default for optional keys."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            value = cfg.get(key, default)
        except (KeyError, AttributeError):
            value = default
    else:
        value = getattr(cfg, key, default)
    return default if value is None and default is not None else value


def _require(cfg: Any, key: str) -> Any:
    value = _get(cfg, key)
    if value is None:
        raise KeyError(f"config.optim.{key} is required but missing (see xmr_jax.optim docstring)")
    return value


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------


class GroupRule(NamedTuple):
    substrings: tuple[str, ...]
    lr_mult: float | None
    weight_decay: float | None


def parse_group_rules(rules: Sequence[Any] | None) -> list[GroupRule]:
    """Normalizes ``config.optim.param_groups`` into a list of GroupRule (see module docstring)."""
    out = []
    for i, rule in enumerate(rules or ()):
        if isinstance(rule, Mapping) or hasattr(rule, "to_dict"):
            rule = dict(rule.to_dict() if hasattr(rule, "to_dict") else rule)
            unknown = set(rule) - {"contains", "lr_mult", "weight_decay"}
            if "contains" not in rule or unknown:
                raise ValueError(
                    f"config.optim.param_groups[{i}] = {rule!r}: expected keys 'contains' (required), "
                    f"'lr_mult', 'weight_decay'; got unknown keys {sorted(unknown)}"
                )
            subs, lr_mult, wd = rule["contains"], rule.get("lr_mult"), rule.get("weight_decay")
        elif isinstance(rule, (tuple, list)) and len(rule) == 3:
            subs, lr_mult, wd = rule
        else:
            raise ValueError(
                f"config.optim.param_groups[{i}] = {rule!r}: expected (substrings, lr_mult, "
                "weight_decay) or a mapping with 'contains', 'lr_mult', 'weight_decay'"
            )
        subs = (subs,) if isinstance(subs, str) else tuple(subs)
        if not subs or not all(isinstance(s, str) and s for s in subs):
            raise ValueError(
                f"config.optim.param_groups[{i}]: substrings must be non-empty strings, got {subs!r}"
            )
        for sub in subs:
            try:
                re.compile(sub)
            except re.error as e:
                raise ValueError(f"config.optim.param_groups[{i}]: {sub!r} is not a regular expression ({e})") from e
        for what, v in (("lr_mult", lr_mult), ("weight_decay", wd)):
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ValueError(
                    f"config.optim.param_groups[{i}]: {what} must be None or a number >= 0, got {v!r}"
                )
        out.append(
            GroupRule(subs, None if lr_mult is None else float(lr_mult), None if wd is None else float(wd))
        )
    return out


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_path_names(params: PyTree) -> PyTree:
    """Pytree (same structure as ``params``) of each leaf's path name, e.g. "cross_attn/q_proj/bias"."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(_key_name(k) for k in path), params)


def group_settings(name: str, rules: Sequence[GroupRule], base_wd: float) -> tuple[float, float]:
    """(lr multiplier, weight decay) of one parameter name under the ordered rules."""
    lr_mult, wd = 1.0, float(base_wd)
    for rule in rules:
        if any(re.search(s, name) for s in rule.substrings):
            if rule.lr_mult is not None:
                lr_mult = rule.lr_mult
            if rule.weight_decay is not None:
                wd = rule.weight_decay
    return lr_mult, wd


def param_group_trees(optim_cfg: Any, params: PyTree) -> tuple[PyTree, PyTree]:
    """Returns (lr_mult tree, weight-decay tree) of python floats, same structure as ``params``.

    ``params`` may be arrays or jax.ShapeDtypeStruct (only the tree structure and names are used).
    """
    rules = parse_group_rules(_get(optim_cfg, "param_groups", None))
    base_wd = float(_get(optim_cfg, "weight_decay", 0.0))
    names = param_path_names(params)
    settings = jax.tree.map(lambda n: group_settings(n, rules, base_wd), names)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], float)
    lr_mults = jax.tree.map(lambda s: s[0], settings, is_leaf=is_pair)
    wds = jax.tree.map(lambda s: s[1], settings, is_leaf=is_pair)
    return lr_mults, wds


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def _warmup_cosine(e, warmup: float, total: float, warmup_factor: float):
    """Factor at (possibly fractional) epoch e: linear warmup from warmup_factor, then cosine to 0."""
    warm = warmup_factor + (1.0 - warmup_factor) * e / max(warmup, 1e-12)
    e = jnp.minimum(e, total)  # past the last epoch the factor stays at 0
    cos = 0.5 * (1.0 + jnp.cos(jnp.pi * (e - warmup) / (total - warmup)))
    return jnp.where(e < warmup, warm, cos)


def _linear_warmup(step, warmup_steps: int, warmup_factor: float):
    if warmup_steps <= 0:
        return 1.0
    frac = jnp.minimum(step / warmup_steps, 1.0)
    return warmup_factor + (1.0 - warmup_factor) * frac


def schedule_factor(optim_cfg: Any, steps_per_epoch: int) -> Callable[[Any], jax.Array]:
    """Returns ``factor(step) -> float32 scalar``, the multiplier of every group's lr.

    step is the optimizer update count (0 for the first update); epoch e = step // steps_per_epoch.
      epoch_warmup_cosine: e < W: wf + (1 - wf) * e / W;  else 0.5 * (1 + cos(pi * (e - W) / (N - W)))
      step_warmup_cosine:  the same with the fractional epoch e = step / steps_per_epoch.
      step_decay:          decay_rate ** (e // decay_epochs), times the optional step warmup.
      constant:            1, times the optional step warmup.
    """
    name = _require(optim_cfg, "schedule")
    if name not in SCHEDULES:
        raise ValueError(f"config.optim.schedule = {name!r}; expected one of {SCHEDULES}")
    spe = int(steps_per_epoch)
    if spe <= 0:
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    wf = float(_get(optim_cfg, "warmup_factor", 0.1))

    if name in ("epoch_warmup_cosine", "step_warmup_cosine"):
        warmup = float(_require(optim_cfg, "warmup_epochs"))
        total = float(_require(optim_cfg, "num_epochs"))
        if not 0 <= warmup < total:
            raise ValueError(
                f"config.optim: need 0 <= warmup_epochs < num_epochs, got warmup_epochs="
                f"{warmup}, num_epochs={total}"
            )
        integer_epochs = name == "epoch_warmup_cosine"

        def factor(step):
            step = jnp.asarray(step)
            e = (step // spe) if integer_epochs else step / spe
            return _warmup_cosine(e.astype(jnp.float32), warmup, total, wf).astype(jnp.float32)

        return factor

    warmup_steps = int(_get(optim_cfg, "warmup_steps", 0) or 0)
    if name == "step_decay":
        every = int(_require(optim_cfg, "decay_epochs"))
        rate = float(_require(optim_cfg, "decay_rate"))
        if every <= 0:
            raise ValueError(f"config.optim.decay_epochs must be > 0, got {every}")

        def factor(step):
            step = jnp.asarray(step)
            e = step // spe
            decay = jnp.power(jnp.float32(rate), (e // every).astype(jnp.float32))
            return (decay * _linear_warmup(step, warmup_steps, wf)).astype(jnp.float32)

        return factor

    def factor(step):  # constant
        step = jnp.asarray(step)
        return jnp.asarray(_linear_warmup(step, warmup_steps, wf), jnp.float32)

    return factor


# ----------------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------------


def add_per_param_decay(wd_tree: PyTree) -> optax.GradientTransformation:
    """``updates + wd * params`` with a per-leaf python-float wd (leaves with wd == 0 untouched)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_per_param_decay needs params: call tx.update(grads, opt_state, params)")
        updates = jax.tree.map(
            lambda u, p, wd: u if wd == 0.0 else u + jnp.asarray(wd, u.dtype) * p, updates, params, wd_tree
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_per_param(mult_tree: PyTree) -> optax.GradientTransformation:
    """``updates * mult`` with a per-leaf python-float multiplier."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree.map(
            lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, mult_tree
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    optim_cfg: Any, params: PyTree, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """Builds the optax transformation for ``params`` (arrays or ShapeDtypeStruct tree).

    Returns ``(tx, lr_schedule)`` with ``lr_schedule(step)`` = base lr * schedule factor (the lr of a
    parameter no group rule matches; a group's lr is that times its lr_mult).

    adam_l2: clip(g) -> g + wd*p -> Adam(b1, b2, eps) -> * lr_mult -> * -lr*factor(step)
    adamw:   clip(g) -> Adam(b1, b2, eps) -> + wd*p -> * lr_mult -> * -lr*factor(step)
    """
    name = _require(optim_cfg, "name")
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optim.name = {name!r}; expected one of {OPTIMIZERS}")
    base_lr = float(_require(optim_cfg, "lr"))
    factor = schedule_factor(optim_cfg, steps_per_epoch)
    lr_schedule = lambda step: base_lr * factor(step)
    lr_mults, wds = param_group_trees(optim_cfg, params)
    adam = optax.scale_by_adam(
        b1=float(_get(optim_cfg, "b1", 0.9)),
        b2=float(_get(optim_cfg, "b2", 0.999)),
        eps=float(_get(optim_cfg, "eps", 1e-8)),
    )
    parts = []
    clip = _get(optim_cfg, "grad_clip", None)
    if clip is not None:
        if float(clip) <= 0:
            raise ValueError(f"config.optim.grad_clip must be None or > 0, got {clip}")
        parts.append(optax.clip_by_global_norm(float(clip)))
    if name == "adam_l2":
        parts += [add_per_param_decay(wds), adam]
    else:
        parts += [adam, add_per_param_decay(wds)]
    parts += [scale_per_param(lr_mults), optax.scale_by_learning_rate(lr_schedule)]
    return optax.chain(*parts), lr_schedule
