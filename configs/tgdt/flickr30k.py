r"""TGDT on flickr30k_karpathy, adapted to CLIP ViT-B/16 towers (the recipe: docs/semantics.md,
section 'Training recipes').

  python -m xmr_jax.main --config=configs/tgdt/flickr30k.py:init=/path/ViT-B-16.pt,data_dir=/data/tfds \
      --workdir=/runs/tgdt_flickr30k

Needs the flickr30k_karpathy TFDS data set (docs/semantics.md, section 'Data sets') and an
OpenAI CLIP ViT-B/16 checkpoint. Arguments after ':': init, data_dir, manual_dir, batch_size,
epochs, seed, precision, positives.

Kept from the original TGDT recipe: CMC loss (margin 0.2, slack 0.3, local scale 10) on global +
local similarity, Adam lr 1e-5 without weight decay, gradient clipping at norm 2.0, lr x0.1
every 20 epochs, 60 epochs, 1000 linear warmup steps (from 0), two-stage inference with
k_t2i=100 / k_i2t=50.

Changed, and why:
- Towers: OpenAI CLIP ViT-B/16 (global = CLS / EOT feature, local = the projected patch / word
  tokens) instead of 36 precomputed Faster R-CNN regions (2048-d + boxes) and a 6-layer BERT: the
  detector features are not reproducible here and CLIP gives both sides in one embedding space.
  Images are therefore raw pixels at CLIP's native 224x224 (196 patch tokens, no positional
  embedding resize).
- Batch 32 instead of 30: the global batch must be a multiple of the number of devices (8 on a
  TPU v5e-8 / 8-GPU host); give `batch_size=30` on a single device for the exact recipe.
- No image augmentation (no person-style flip / pad-crop / random erasing): the original trained
  on fixed detector features, i.e. without any image augmentation, and Flickr captions mention
  left/right and positions that a flip or crop would contradict.
- Same-image pairs in a batch are not negatives (`tgdt.positives="image_id"`; the reference
  treats a duplicate image as a negative).
- bfloat16 compute (float32 master weights; losses and similarities in float32).
"""

from configs import common


def get_config(arg=None):
    return common.tgdt_config("flickr30k_karpathy", arg, batch_size=32, warmup_steps=1000)
