"""Shared config pieces and the big_vision-style `file.py:key=value,key2=value2` argument parser."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `key=value,key2=value2` (the part after ':' in --config=file.py:...) over defaults.

    Values are converted to the type of the default (bool accepts true/false/1/0; tuples accept
    `384x128` or `384/128`); a bare `key` sets a bool default to True. Unknown keys raise a
    ValueError naming the key and the accepted ones.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return result
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"config argument {key!r} is not known; accepted: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            result[key] = True
            continue
        result[key] = _convert(key, raw.strip(), default)
    return result


def _convert(key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            parts = raw.replace("x", "/").split("/")
            return tuple(type(default[0])(p) for p in parts)
        if default is None:
            try:
                return ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return raw
        return raw
    except ValueError as err:
        raise ValueError(
            f"config argument {key}={raw!r}: expected a value like {default!r}"
        ) from err


def mesh_config(strategy: str = "data") -> ml_collections.ConfigDict:
    """Device mesh: `data` axis size (-1 = all devices), `fsdp` axis size, sharding strategy, and
    sharding rules: ordered (regex, spec) pairs; the first regex found in a train-state leaf's path
    name (e.g. "params/base_model/text/token_embedding/embedding", which its Adam moments'
    ".../mu/base_model/text/..." also contain) sets its spec: "replicated", "fsdp" (split the
    largest divisible dimension) or a tuple of mesh axis names / None per dimension, e.g.
    ("token_embedding", ("fsdp", None)). Leaves no rule matches follow the strategy."""
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "strategy": strategy, "rules": []})


def trainer_defaults(config: ml_collections.ConfigDict) -> None:
    """Fills the trainer keys every config shares (logging, checkpoints, precision, mesh)."""
    config.log_every = 50
    config.ckpt_every_steps = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.eval_every_epochs = 0  # 0 = evaluate only after training
    config.eval_batch_size = 256
    # Evaluators, big_vision style: name -> kind ("" = the model family's: "person" / "caption"),
    # split ("" = config.data.eval_split), every_epochs (0 = only after training; the default one
    # follows config.eval_every_epochs), prefix (report file {prefix}_metrics.json, TensorBoard /
    # metrics.jsonl split, table title), and optionally the kind's settings (caption: k_t2i,
    # k_i2t, local_scale, local_exhaustive, coco_1k_folds, coco_1k_fold_size) over the family's.
    config.evals = ml_collections.ConfigDict({"eval": {
        "kind": "", "split": "", "every_epochs": config.get_ref("eval_every_epochs"), "prefix": "eval"}})
    # Model selection: eval names the config.evals entry whose results pick the best checkpoint
    # (kept in WORKDIR/best, never deleted by keep_checkpoints; "" = none: the last epoch is
    # reported), metric a key of its results ("R1", "mAP", ...; caption: "two_stage/rsum"), mode
    # "max" | "min"; note says why there is none (printed and written to selection.json).
    config.select = ml_collections.ConfigDict({"eval": "", "metric": "R1", "mode": "max", "note": ""})
    config.precision = "bfloat16"
    # Gradient caching (xmr_jax.grad_cache): examples per device per micro-batch; the step's
    # gradient stays the full-batch one (SDM/ITC/CMC over the whole batch). 0 = off.
    config.micro_batch_size = 0
    config.mesh = mesh_config()
    config.profile_steps = ()  # e.g. (10, 20): jax.profiler trace from step 10 to 20
    config.profile_dir = ""  # default: WORKDIR/profile
    config.progress_bar = True
    config.param_table = True  # print which parameter got which lr / weight decay / sharding at start


def irra_config(dataset: str, num_classes: int, arg: str | None, val_split: str = "val") -> ml_collections.ConfigDict:
    """IRRA's published recipe on a person-retrieval data set (docs/semantics.md, 'Training recipes').

    Model selection: with a `val_split` ("" = the data set has none), config.evals.val evaluates
    it every config.eval_every_epochs (1) epochs, the best val R1 checkpoint is kept, and the
    test split (config.evals.eval) is evaluated after training at the last epoch and at that best
    checkpoint. Without one, the last epoch is reported.

    `arg` keys: init (OpenAI CLIP checkpoint path), data_dir, manual_dir, batch_size, epochs, seed,
    loss_names, precision.
    """
    from xmr_jax import optim

    arg = parse_arg(arg, init="checkpoints/ViT-B-16.pt", data_dir="", manual_dir="", batch_size=64,
                    epochs=60, seed=1, loss_names="sdm+id+mlm", precision="bfloat16")
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model_family = "irra"
    config.loss_names = arg.loss_names
    config.num_classes = num_classes  # training identities; 0 = take it from the data set

    config.model = ml_collections.ConfigDict()
    config.model.clip = ml_collections.ConfigDict({"preset": "ViT-B/16", "image_size": (384, 128)})
    config.model.init_checkpoint = arg.init  # OpenAI ViT-B/16 (positional embedding resized to 24x8)
    config.model.cross_depth = 4
    config.model.cross_heads = 8
    # The 49408-way MLM output at masked positions only, 12 per caption per pass (15% of a
    # 77-token caption is 11.25 on average; a fuller caption adds a pass, nothing is dropped).
    config.model.mlm_chunk = 12
    # The unmasked captions' (causal) text pass runs on the shortest of these lengths that holds
    # the batch's longest caption.
    config.model.text_length_buckets = (32, 48, 64)
    config.model.logit_scale = 50.0

    config.data = ml_collections.ConfigDict({
        "name": dataset, "config_name": "", "data_dir": arg.data_dir, "manual_dir": arg.manual_dir,
        "image_size": (384, 128), "augment": True, "flip": True, "mlm_prob": 0.15,
        "train_split": "train", "eval_split": "test", "shuffle_buffer": 50_000,
    })
    config.batch_size = arg.batch_size
    config.num_epochs = ml_collections.FieldReference(arg.epochs)
    config.optim = optim.default_irra_optim_config()
    config.optim.num_epochs = config.get_ref("num_epochs")
    trainer_defaults(config)
    config.precision = arg.precision
    # IRRA's reference picked its best epoch on the test split; here the test split is evaluated
    # only after training, and a validation split (when the data set has one) selects.
    config.evals.eval = ml_collections.ConfigDict({"kind": "", "split": "", "every_epochs": 0, "prefix": "eval"})
    if val_split:
        config.eval_every_epochs = 1
        config.evals.val = ml_collections.ConfigDict({
            "kind": "", "split": val_split, "every_epochs": config.get_ref("eval_every_epochs"), "prefix": "val"})
        config.select.eval = "val"
    else:
        config.eval_every_epochs = 0
        config.select.note = f"{dataset} has no validation split"
    return config


def tgdt_defaults(positives: str = "image_id") -> ml_collections.ConfigDict:
    """config.tgdt: CMC loss and two-stage inference settings (docs/semantics.md, 'Losses' and
    'Similarity and retrieval').

    local_scale: scale of the token-level similarity (loss and inference); positives: "image_id"
    (caption data: pairs of the same image are never negatives) or "pid" (same person);
    margin / slack: CMC hinge margin and intra-modal slack; k_t2i / k_i2t: global top-k reranked
    by s_g + s_l at inference; coco_1k_folds: 0 = off, F = also report the metrics averaged over F
    folds of 1000 images (keys "coco_1k/..."); coco_1k_fold_size: images per fold; negatives:
    "hardest" (TGDT: hinge on the hardest negative) or "sum" (over all negatives; trains random
    towers, which the hardest-negative hinge collapses).
    """
    return ml_collections.ConfigDict({
        "local_scale": 10.0, "positives": positives, "margin": 0.2, "slack": 0.3,
        "k_t2i": 100, "k_i2t": 50, "coco_1k_folds": 0, "coco_1k_fold_size": 1000,
        "negatives": "hardest",
        # All-pairs "local only" metrics at evaluation: N_img x N_txt x L_img x L_txt x D work
        # (hours at COCO-5K size on CPU); two-stage scoring does not need them.
        "eval_local_exhaustive": True,
    })


def tgdt_config(dataset: str, arg: str | None, batch_size: int, warmup_steps: int) -> ml_collections.ConfigDict:
    """TGDT's recipe (docs/semantics.md, 'Training recipes') on CLIP ViT-B/16 towers for a caption data
    set at 224x224.

    `arg` keys: init (OpenAI CLIP checkpoint path), data_dir, manual_dir, batch_size, epochs, seed,
    precision, positives.
    """
    from xmr_jax import optim

    arg = parse_arg(arg, init="checkpoints/ViT-B-16.pt", data_dir="", manual_dir="",
                    batch_size=batch_size, epochs=60, seed=1, precision="bfloat16", positives="image_id")
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.model_family = "tgdt"
    config.loss_names = "cmc"
    config.num_classes = 0  # unused by TGDT (no identity classifier)

    config.model = ml_collections.ConfigDict()
    config.model.clip = ml_collections.ConfigDict({"preset": "ViT-B/16", "image_size": (224, 224)})
    config.model.init_checkpoint = arg.init  # OpenAI ViT-B/16 at its native 224x224
    config.tgdt = tgdt_defaults(arg.positives)

    config.data = ml_collections.ConfigDict({
        "name": dataset, "config_name": "", "data_dir": arg.data_dir, "manual_dir": arg.manual_dir,
        "image_size": (224, 224), "augment": False, "flip": False, "mlm_prob": 0.15,
        "train_split": "train", "eval_split": "test", "shuffle_buffer": 50_000,
    })
    config.batch_size = arg.batch_size
    config.num_epochs = ml_collections.FieldReference(arg.epochs)
    config.optim = optim.default_tgdt_optim_config()  # Adam 1e-5, no wd, clip 2.0, x0.1 / 20 ep
    config.optim.num_epochs = config.get_ref("num_epochs")
    config.optim.warmup_steps = warmup_steps
    config.optim.warmup_factor = 0.0
    trainer_defaults(config)
    config.precision = arg.precision
    # The last epoch is reported (IRRA's reference picked the best epoch on the test split).
    config.eval_every_epochs = 0
    return config


def synthetic_demo(config: ml_collections.ConfigDict, data_config: str, epochs: int, lr: float,
                   grad_clip: float, shuffle_buffer: int) -> None:
    """The CPU demos' shared pieces: tiny towers from scratch on synthetic_people, AdamW, float32.

    Towers (sized so a from-scratch run learns within minutes on 2 CPU cores): ViT 8x8 patches on
    64x32 images (32 patches + CLS),
    width 128, 3 layers, 4 heads; causal text transformer width 128, 3 layers; 128-d embeddings.
    The synthetic captions are at most 47 tokens long: a 48-token context (instead of CLIP's 77)
    saves a third of the text tower's work; model and data share the one value. num_epochs is one
    reference: --config.num_epochs=N also moves the schedule's end.
    """
    context = ml_collections.FieldReference(48)
    config.model = ml_collections.ConfigDict()
    config.model.clip = ml_collections.ConfigDict(dict(
        preset="tiny", image_size=(64, 32), patch_size=8,
        vision_width=128, vision_layers=3, vision_heads=4,
        text_width=128, text_layers=3, text_heads=4, embed_dim=128, context_length=context,
    ))
    config.model.init_checkpoint = ""  # random init
    config.data = ml_collections.ConfigDict(dict(
        name="synthetic_people", config_name=data_config, data_dir="", manual_dir="",
        image_size=(64, 32), augment=False, flip=True, mlm_prob=0.15,
        train_split="train", eval_split="test", shuffle_buffer=shuffle_buffer, context_length=context,
    ))
    config.num_epochs = ml_collections.FieldReference(epochs)
    config.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
        schedule="step_warmup_cosine", warmup_epochs=0.5, warmup_factor=0.0,
        num_epochs=config.get_ref("num_epochs"), grad_clip=grad_clip, param_groups=[],
    ))
    trainer_defaults(config)
    config.precision = "float32"
    config.log_every = 25
    config.ckpt_every_steps = 500
