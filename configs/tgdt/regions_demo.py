r"""Demo of TGDT as published (model family tgdt_regions) on the embedded synthetic_regions data set.

  python -m xmr_jax.main --config=configs/tgdt/regions_demo.py --workdir=/tmp/xmr_tgdt_regions_demo

Data: synthetic_regions (built on first use in seconds, no download): 3000 train / 200 test images of
12 region features x 32 (coloured objects plus background noise) with 5 template captions each,
tokenized by the WordPiece vocab shipped with the builder.

Model: TGDTRegions "tiny" (region encoder 2 layers at width 32, BERT 2 layers at width 32 from
random init, one transformer per stage, 32-d embeddings), trained END TO END (`detach=False`: with
TGDT's detach only the stage-2 layers would learn, and nothing below them is pretrained here) with
Adam lr 1e-3 and TGDT's step decay (x0.1 every 20 epochs) and warm-up (100 steps here). The loss
is CMC with the hinge SUMMED over all in-batch negatives (`negatives=sum`), not TGDT's hardest
negative: from random towers the hardest negative collapses the global features. Measured here
(4 epochs, 1872 steps): summed throughout, global / local / two-stage rsum 517.5 / 537.7 / 542.9;
`negatives_schedule=200` (summed for 200 steps, then the hardest) 34.9 / 562.3 / 81.7, i.e. the
global ranking (and with it the two-stage top-k) collapsed while the local one kept learning;
`negatives_schedule=1400` (3 epochs summed, then the hardest) 524.9 / 537.1 / 541.4: once the
towers have learned, the hardest negative trains without collapsing.
`negatives_schedule=N` runs TGDT's hardest negative after N summed steps.
Evaluation: global / local / two-stage R@1/5/10 and rsum on the 200 test images, test token set.

Arguments after ':' (comma-separated key=value): data (the synthetic_regions config: default | tiny),
data_dir (TFDS folder; "" = TFDS' default), epochs, batch_size, seed, lr, negatives (sum | hardest),
negatives_schedule (N > 0: summed negatives for the first N steps, then the hardest).
"""

from configs import common
from configs.tgdt.flickr30k_regions import regions_config


def get_config(arg=None):
    from data_pipelines.builders.synthetic_regions import VOCAB_PATH

    demo = common.parse_arg(arg, data="default", data_dir="", epochs=4, batch_size=32, seed=0, lr=1e-3,
                            negatives="sum", negatives_schedule=0)
    config = regions_config("synthetic_regions", f"epochs={demo.epochs},seed={demo.seed},detach=false,"
                            f"negatives={demo.negatives},negatives_schedule={demo.negatives_schedule},"
                            "context_length=16,dropout=0",
                            batch_size=demo.batch_size, warmup_steps=100, relevance_name="",
                            preset="tiny", lr=demo.lr, vocab=str(VOCAB_PATH))
    config.data.config_name = demo.data
    config.data.data_dir = demo.data_dir
    config.data.shuffle_buffer = 20_000
    config.model.tgdt_regions.region_dim = 32
    config.model.tgdt_regions.vocab_size = len(VOCAB_PATH.read_text().splitlines())
    config.tgdt.k_t2i = 20
    config.tgdt.k_i2t = 10
    config.log_every = 25
    config.ckpt_every_steps = 500
    config.eval_batch_size = 40   # 200 / 20 test images in whole batches, a multiple of 1, 2, 4, 8 devices
    return config
