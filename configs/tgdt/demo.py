r"""Demo: TGDT (CMC loss, two-stage inference) with tiny towers on synthetic_people/five_captions.

  python -m xmr_jax.main --config=configs/tgdt/demo.py --workdir=/tmp/xmr_tgdt_demo

Data: synthetic_people "five_captions" (6000 train / 1000 test images, ONE image per identity, 5
template captions per image; built on first use, ~2 min), so the positives of a caption are
exactly its image (`tgdt.positives="image_id"`) and the test split has the Flickr30K test size
(1000 images / 5000 captions). One evaluation reports global-only, local-only and two-stage
(global top-k, k_t2i=100 / k_i2t=50, reranked by s_g + s_l) caption retrieval metrics.

Towers: those of configs/demo.py (ViT 8x8 patches on 64x32 images = 32 patch tokens + CLS, width
128, 3 layers; causal text transformer width 128, 3 layers, 48-token context; 128-d embeddings),
trained from scratch with AdamW lr 1e-3 (TGDT's Adam lr 1e-5 is for fine-tuning pretrained
towers and barely moves random ones).

Objective: CMC with `tgdt.negatives="sum"` (inter-modal hinge summed over all in-batch
negatives, VSE0) instead of TGDT's hardest negative: from random towers the hardest-negative
hinge collapses every embedding to one point (a run with `negatives=hardest` ended at loss 55.7 =
4 * 64 * margin + intra, with chance-level recall R@1 0.1); pretrained CLIP towers (configs
flickr30k.py / coco.py) start far from that collapse and use "hardest".

Arguments after ':' (comma-separated key=value): epochs, batch_size, seed, lr, negatives.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, epochs=1, batch_size=64, seed=0, lr=1e-3, negatives="sum")
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model_family = "tgdt"
    config.loss_names = "cmc"
    config.num_classes = 0  # unused by TGDT

    common.synthetic_demo(config, data_config="five_captions", epochs=arg.epochs, lr=arg.lr, grad_clip=2.0,
                          shuffle_buffer=30_000)
    config.tgdt = common.tgdt_defaults("image_id")
    # From random towers the hardest-negative hinge collapses (all similarities equal, loss stuck
    # at 4 * B * margin, chance-level retrieval: seen with 1 epoch); the sum over negatives trains.
    config.tgdt.negatives = arg.negatives
    config.batch_size = arg.batch_size
    config.eval_batch_size = 200  # a multiple of 8 devices; 1000 images / 5000 captions in whole batches
    return config
