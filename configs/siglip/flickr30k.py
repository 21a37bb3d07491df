r"""Caption retrieval on flickr30k_karpathy with SigLIP towers: sigmoid loss (captions of the same
image are positives), TGDT's schedule and the caption evaluator (both directions, R@K, rsum), at
SigLIP B/16's 224x224.

  python -m xmr_jax.main --config=configs/siglip/flickr30k.py:init=/path/siglip-base-patch16-224,data_dir=/data/tfds \
      --workdir=/runs/siglip_flickr30k

Arguments: init (a Hugging Face SiglipModel folder), tokenizer (default: the init folder), impl
(chunked | dense), data_dir, manual_dir, batch_size (32), epochs, seed, precision.
"""

from configs import common
from configs.siglip import ARG_DEFAULTS, siglip_config
import ml_collections


def get_config(arg=None):
    parsed = common.parse_arg(arg, **{**ARG_DEFAULTS, "batch_size": 32})
    keys = ("data_dir", "manual_dir", "batch_size", "epochs", "seed", "precision")
    rest = ",".join(f"{k}={parsed[k]}" for k in keys if str(parsed[k]) != "")
    base = common.tgdt_config("flickr30k_karpathy", rest, batch_size=32, warmup_steps=1000)
    del base["tgdt"]
    config = siglip_config(base, parsed, loss_names="sigmoid", positives="image_id", image_size=(224, 224))
    config.evals.eval = ml_collections.ConfigDict({"kind": "caption", "split": "", "every_epochs": 0,
                                                   "prefix": "eval"})
    return config
