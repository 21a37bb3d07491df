r"""TGDT on coco_karpathy, adapted to CLIP ViT-B/16 towers; 5K and 1K test (the recipe:
docs/semantics.md, section 'Training recipes').

  python -m xmr_jax.main --config=configs/tgdt/coco.py:init=/path/ViT-B-16.pt,data_dir=/data/tfds \
      --workdir=/runs/tgdt_coco

Needs the coco_karpathy TFDS data set (train = Karpathy train + restval; docs/semantics.md,
section 'Data sets') and an OpenAI CLIP ViT-B/16 checkpoint. Arguments after ':': init, data_dir,
manual_dir, batch_size, epochs, seed, precision, positives.

Evaluation reports the 5K test (5000 images / 25000 captions: keys "global", "local",
"two_stage") and COCO 1K (`tgdt.coco_1k_folds=5`: the same test set in 5 folds of 1000 images,
two-stage top-k taken within each fold, every metric and rsum averaged over folds: keys
"coco_1k/global", "coco_1k/local", "coco_1k/two_stage").

Kept from the original TGDT recipe: CMC loss (margin 0.2, slack 0.3, local scale 10) on global +
local similarity, Adam lr 1e-5 without weight decay, gradient clipping at norm 2.0, lr x0.1
every 20 epochs, 60 epochs, batch 40 (no warmup), two-stage inference with k_t2i=100 / k_i2t=50.

Changed, and why:
- Towers: OpenAI CLIP ViT-B/16 (global = CLS / EOT feature, local = the projected patch / word
  tokens) instead of 36 precomputed Faster R-CNN regions (2048-d + boxes) and a 6-layer BERT: the
  detector features are not reproducible here and CLIP gives both sides in one embedding space.
  Images are therefore raw pixels at CLIP's native 224x224.
- No image augmentation (no person-style flip / pad-crop / random erasing): the original trained
  on fixed detector features, i.e. without any image augmentation, and captions mention
  left/right and positions that a flip or crop would contradict.
- Same-image pairs in a batch are not negatives (`tgdt.positives="image_id"`).
- bfloat16 compute (float32 master weights; losses and similarities in float32).
- COCO 1K rsum is the fold mean (the reference printed 6x the mean).
"""

from configs import common


def get_config(arg=None):
    config = common.tgdt_config("coco_karpathy", arg, batch_size=40, warmup_steps=0)
    config.tgdt.coco_1k_folds = 5
    return config
