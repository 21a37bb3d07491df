"""Flax linen modules: CLIP towers, IRRA and TGDT heads."""
