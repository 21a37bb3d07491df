r"""TGDT as published on coco_regions (5K test images; the 1K protocol as 5 folds): region features + BERT.

  python -m xmr_jax.main --config=configs/tgdt/coco_regions.py:bert=/models/bert-base-uncased,data_dir=/data/tfds \
      --mode=eval --checkpoint=/ckpt/coco_m0.3/model_best_rsum.pth.tar --workdir=/runs/tgdt_coco_eval

Everything as configs/tgdt/flickr30k_regions.py (arguments included) except: batch 40 (TGDT's
coco_all.yaml), restval joins train (the coco_regions builder), the metrics are reported on the 5K
test set and averaged over its five 1K folds (keys "coco_1k/..."; rsum is the fold mean), and the
NDCG relevance files are named coco-test-{rougeL,spice}.npy.
"""

from configs.tgdt.flickr30k_regions import regions_config


def get_config(arg=None):
    config = regions_config("coco_regions", arg, batch_size=40, warmup_steps=1000, relevance_name="coco")
    config.tgdt.coco_1k_folds = 5
    return config
