r"""TGDT as published on flickr30k_regions: bottom-up region features + BERT (model family tgdt_regions).

  # evaluate TGDT's released checkpoint (prints the global / local / two-stage rows, NDCG with relevances)
  python -m xmr_jax.main --config=configs/tgdt/flickr30k_regions.py:bert=/models/bert-base-uncased,data_dir=/data/tfds \
      --mode=eval --checkpoint=/ckpt/f30k_m0.3/model_best_rsum.pth.tar --workdir=/runs/tgdt_f30k_eval
  # train with TGDT's recipe
  python -m xmr_jax.main --config=configs/tgdt/flickr30k_regions.py:bert=/models/bert-base-uncased,data_dir=/data/tfds \
      --workdir=/runs/tgdt_f30k

Data: the flickr30k_regions TFDS data set built from TERAN's layout (`python -m data_pipelines.build
--dataset flickr30k_regions --manual_dir <TERAN data/f30k> --data_dir <tfds>`, or `manual_dir=` here
to build on first use). bert: a Hugging Face bert-base-uncased folder (config.json, vocab.txt,
weights); its vocab.txt tokenizes the captions and its first 6 layers initialize the text tower.

The recipe (LCFractal/TGDT configs/f30k_all.yaml and train.py): Adam lr 1e-5 (no weight decay),
gradient clipping at global norm 2.0, lr x0.1 every 20 epochs, linear warm-up from 0 over 1000 steps,
batch 30 (give a multiple of the device count on several devices, e.g. batch_size=32 on 8), 60 epochs, CMC (margin 0.2, slack 0.3, local scale 10) with the hardest negative, the
stage-1 outputs detached (only the stage-2 transformers train, as published; `detach=false` trains
end to end), two-stage inference with k_t2i=100 / k_i2t=50 on the test token set (stage-1 tokens).

Arguments after ':' (comma-separated key=value): bert, vocab (default bert/vocab.txt), data_dir,
manual_dir, batch_size, epochs, seed, detach, dropout (0.1 as published; applied in training only),
negatives_schedule (steps with summed negatives before the hardest; 0 = hardest throughout),
context_length, relevances (TERAN's relevance folder: adds NDCG@25 with ROUGE-L and SPICE),
precision, text_heads (BERT's heads; 0 = width / 64).

Differences from TGDT's code: captions are padded to context_length (64 wordpieces; longer ones are
cut, [SEP] kept) instead of to each batch's longest; stage 2 has no padding mask (as published), so
the global features depend on that padding length (`stage2_mask=True` in config.model.tgdt_regions
removes the dependence). Dropout 0.1 applies in training where TGDT's transformers and BERT apply it
(the residual branches, after the region/stage transformers' activation, after BERT's embeddings)
except on the attention probabilities (the fused attention kernels have none). Same-image pairs in
a batch are not negatives (`tgdt.positives="image_id"`).
"""

import ml_collections

from configs import common


def regions_config(dataset: str, arg, *, batch_size: int, warmup_steps: int, relevance_name: str,
                   preset: str = "tgdt", epochs: int = 60, lr: float = 1e-5, bert: str = "",
                   vocab: str = "", negatives: str = "hardest") -> ml_collections.ConfigDict:
    """TGDT's recipe for the tgdt_regions family on a region-feature data set (docstring above).

    `arg` keys: bert, vocab, data_dir, manual_dir, batch_size, epochs, seed, lr, detach, negatives,
    negatives_schedule, context_length, relevances, precision, text_heads.
    """
    from xmr_jax import optim

    arg = common.parse_arg(arg, bert=bert, vocab=vocab, data_dir="", manual_dir="", batch_size=batch_size,
                           epochs=epochs, seed=1, lr=lr, detach=True, negatives=negatives, negatives_schedule=0,
                           context_length=64, relevances="", precision="float32", text_heads=0,
                           dropout=0.1)
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model_family = "tgdt_regions"
    config.loss_names = "cmc"
    config.num_classes = 0  # no identity classifier

    config.model = ml_collections.ConfigDict()
    config.model.tgdt_regions = ml_collections.ConfigDict({"preset": preset, "detach": arg.detach,
                                                           "dropout": arg.dropout,
                                                           "stage2_mask": False})
    if arg.text_heads:  # BERT's heads when not width // 64 (checkpoints do not store head counts)
        config.model.tgdt_regions.text_heads = arg.text_heads
    config.model.bert_dir = arg.bert  # Hugging Face BertModel folder: init of the text tower + vocab.txt
    config.model.vocab = arg.vocab    # "" = bert_dir/vocab.txt
    config.model.eval_token_set = "test"  # TGDT evaluates after switch_test (stage-1 tokens)

    config.tgdt = common.tgdt_defaults("image_id")
    config.tgdt.negatives = arg.negatives
    config.tgdt.negatives_schedule = arg.negatives_schedule
    config.tgdt.ndcg_relevance_dir = arg.relevances
    config.tgdt.ndcg_name = relevance_name
    config.tgdt.ndcg_split = "test"
    config.tgdt.ndcg_k = 25

    config.data = ml_collections.ConfigDict({
        "name": dataset, "config_name": "", "data_dir": arg.data_dir, "manual_dir": arg.manual_dir,
        "image_size": (1, 1),  # unused: the image side is the stored region features
        "augment": False, "flip": False, "mlm_prob": 0.0, "train_split": "train", "eval_split": "test",
        "shuffle_buffer": 50_000, "context_length": arg.context_length,
    })
    config.batch_size = arg.batch_size
    config.num_epochs = ml_collections.FieldReference(arg.epochs)
    config.optim = optim.default_tgdt_optim_config()  # Adam, no wd, clip 2.0, x0.1 every 20 epochs
    config.optim.lr = arg.lr
    config.optim.num_epochs = config.get_ref("num_epochs")
    config.optim.warmup_steps = warmup_steps
    config.optim.warmup_factor = 0.0
    common.trainer_defaults(config)
    config.precision = arg.precision
    config.eval_batch_size = 120  # a multiple of 1, 2, 4, 8 devices
    config.eval_every_epochs = 0  # the last epoch is reported
    return config


def get_config(arg=None):
    return regions_config("flickr30k_regions", arg, batch_size=30, warmup_steps=1000, relevance_name="f30k")
