r"""IRRA-style person retrieval on cuhk_pedes with SigLIP towers: sigmoid loss (every image-caption
pair of the same person is positive) + ID loss, at 384x128, IRRA's schedule and evaluation.

  python -m xmr_jax.main --config=configs/irra/cuhk_pedes_siglip.py:init=/path/siglip-base-patch16-224,data_dir=/data/tfds \
      --workdir=/runs/siglip_cuhk_pedes

init: a Hugging Face SiglipModel folder (google/siglip-base-patch16-224 or another SigLIP B/16);
its tokenizer is read from the same folder unless tokenizer=FOLDER is given (SigLIP's SentencePiece
model needs the `sentencepiece` package). impl=dense computes the loss on one B x B matrix.
Other arguments: data_dir, manual_dir, batch_size, epochs, seed, precision.
"""

from configs import common
from configs.siglip import base_arg, siglip_config


def get_config(arg=None):
    parsed, rest = base_arg(arg)
    base = common.irra_config("cuhk_pedes", num_classes=11003, arg=rest)
    return siglip_config(base, parsed, loss_names="sigmoid+id", positives="pid", image_size=(384, 128))
