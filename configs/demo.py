r"""Demo: IRRA with tiny towers on the embedded synthetic_people data set, minutes on a laptop CPU.

  python -m xmr_jax.main --config=configs/demo.py --workdir=/tmp/xmr_demo
  python -m xmr_jax.main --config=configs/demo.py:loss_names=sdm+id+mlm --workdir=/tmp/xmr_demo_mlm

The default objective is SDM + ID: on 2 CPU cores the IRR/MLM branch (a second text pass, the
cross-modal transformer and a 49408-way output) triples the step time, so within the 5-minute
budget it trains a third as many steps; `loss_names=sdm+id+mlm` runs the full IRRA objective.

Arguments after ':' (comma-separated key=value): loss_names, epochs, batch_size, seed, mlm_k.
Towers follow shared/notes/demo-feasibility.md: ViT 8x8 patches on 64x32 images (32 patches +
CLS), width 128, 3 layers, 4 heads; causal text transformer width 128, 3 layers; 128-d
embeddings; trained from scratch with AdamW (the IRRA recipe's lr 1e-5 is for fine-tuning
pretrained CLIP and barely moves random towers).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, loss_names="sdm+id", epochs=3, batch_size=64, seed=0, mlm_k=6)
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model_family = "irra"
    config.loss_names = arg.loss_names
    config.num_classes = 0  # 0 = the number of training identities of the data set

    config.model = ml_collections.ConfigDict()
    # The synthetic captions are at most 47 tokens long: a 48-token context (instead of CLIP's 77)
    # saves a third of the text towers' work. Model and data share the one value.
    context = ml_collections.FieldReference(48)
    config.model.clip = ml_collections.ConfigDict(dict(
        preset="tiny", image_size=(64, 32), patch_size=8,
        vision_width=128, vision_layers=3, vision_heads=4,
        text_width=128, text_layers=3, text_heads=4, embed_dim=128, context_length=context,
    ))
    config.model.init_checkpoint = ""  # random init
    config.model.cross_depth = 1
    config.model.cross_heads = 4
    # The 49408-way MLM output runs only at (up to) this many masked positions per caption.
    config.model.mlm_max_predictions = arg.mlm_k
    config.model.logit_scale = 50.0

    config.data = ml_collections.ConfigDict(dict(
        name="synthetic_people", config_name="default", data_dir="", manual_dir="",
        image_size=(64, 32), augment=False, flip=True, mlm_prob=0.15,
        train_split="train", eval_split="test", shuffle_buffer=20_000, context_length=context,
    ))

    config.batch_size = arg.batch_size
    # One reference: --config.num_epochs=N also moves the schedule's end.
    config.num_epochs = ml_collections.FieldReference(arg.epochs)
    config.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
        schedule="step_warmup_cosine", warmup_epochs=0.5, warmup_factor=0.0,
        num_epochs=config.get_ref("num_epochs"), grad_clip=1.0, param_groups=[],
    ))
    common.trainer_defaults(config)
    config.precision = "float32"
    config.log_every = 25
    config.ckpt_every_steps = 500
    config.eval_batch_size = 256
    return config
