r"""IRRA on cuhk_pedes: CLIP ViT-B/16 at 384x128, sdm+id+mlm, 60 epochs, batch 64 (the recipe:
docs/semantics.md, section 'Training recipes').

  python -m xmr_jax.main --config=configs/irra/cuhk_pedes.py:init=/path/ViT-B-16.pt,data_dir=/data/tfds \
      --workdir=/runs/irra_cuhk_pedes

Model selection: the val split is evaluated every epoch and the best val R1 checkpoint is kept
(WORKDIR/best); after training the test split is reported at it and at the last epoch
(selection.json).
Needs the cuhk_pedes TFDS data set (docs/semantics.md, section 'Data sets') and an OpenAI CLIP
ViT-B/16 checkpoint.
"""

from configs import common


def get_config(arg=None):
    return common.irra_config("cuhk_pedes", num_classes=11003, arg=arg)
