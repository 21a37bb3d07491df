"""Model families the trainer knows: each gives a module builder and a loss function.

A family is (build(config) -> module, losses(outputs, batch, config) -> (total, parts)); the module's
`__call__(batch)` returns the outputs its losses read, and `encode_image` / `encode_text` serve
evaluation. Adding a family means adding an entry here, not a second trainer.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from xmr_jax.models import irra, tgdt


class Family(NamedTuple):
    build: Callable
    losses: Callable
    known_losses: tuple[str, ...]


FAMILIES = {
    "irra": Family(
        build=irra.build_irra,
        losses=lambda outputs, batch, config: irra.compute_losses(
            outputs, batch, irra.parse_loss_names(config.loss_names), config.model.get("logit_scale", 50.0)
        ),
        known_losses=irra.KNOWN_LOSSES,
    ),
    "tgdt": Family(
        build=tgdt.build_tgdt,
        losses=lambda outputs, batch, config: tgdt.compute_losses(outputs, batch, config),
        known_losses=tgdt.KNOWN_LOSSES,
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"config.model_family={name!r} is not known; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]
