"""`python -m xmr_jax.search index|query ...`: see the xmr_jax.search package docstring."""

import sys

from xmr_jax.search.cli import main

if __name__ == "__main__":
    sys.exit(main())
