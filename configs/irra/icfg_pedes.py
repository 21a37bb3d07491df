r"""IRRA on icfg_pedes: CLIP ViT-B/16 at 384x128, sdm+id+mlm, 60 epochs, batch 64 (the recipe:
docs/semantics.md, section 'Training recipes').

  python -m xmr_jax.main --config=configs/irra/icfg_pedes.py:init=/path/ViT-B-16.pt,data_dir=/data/tfds \
      --workdir=/runs/irra_icfg_pedes

ICFG-PEDES has no validation split: no model selection, the test metrics of the last epoch are
reported (selection.json says so).
Needs the icfg_pedes TFDS data set (docs/semantics.md, section 'Data sets') and an OpenAI CLIP
ViT-B/16 checkpoint.
"""

from configs import common


def get_config(arg=None):
    return common.irra_config("icfg_pedes", num_classes=3102, arg=arg, val_split="")
