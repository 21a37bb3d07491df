"""xmr_jax: cross-modal (image <-> text) retrieval in JAX/Flax (IRRA and TGDT)."""

__version__ = "0.1.0"
