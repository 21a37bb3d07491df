"""TGDT as published: bottom-up region features + BERT, two stages of transformers on each side.

    model = tgdt_regions_from_config({"preset": "tgdt"})          # the published sizes
    params = init_tgdt_regions_params(model, jax.random.key(0))
    g, tokens, mask = model.apply({"params": params}, regions, boxes, method="encode_image")
    g, tokens, mask = model.apply({"params": params}, token_ids, method="encode_text")
    g, tokens, mask = model.apply({"params": params}, token_ids, method="encode_text", token_set="test")

Shapes: B batch, N regions per image (36 in the published features), S caption length, E embed
width (1024), R region width (2048), H BERT width (768).

Image side (`encode_image`): regions [B,N,R] and boxes [B,N,4] as stored (x1, y1, x2, y2 divided by
the image's (w, h, w, h)). The model prepends TGDT's all-zero row (the slot "reserved as CLS") to
both, so the image has L = N + 1 tokens:

    info   = [x1, y1, x2, y2, (x2 - x1) * (y2 - y1)]                  [B,L,5]
    x      = Linear(R+5 -> R) -> ReLU -> Linear(R -> R) on [region, info]
    x      = region_layers post-LN layers at width R (key-padding mask)  (TGDT's img_enc)
    stage1 = stage1_layers post-LN layers at width E on img_proj(x) (key-padding mask)
    stage2 = stage2_layers post-LN layers at width E on stage1, WITHOUT a padding mask

Text side (`encode_text`): BERT ids with [CLS] ... [SEP] and 0 = padding, [B,S]:

    h      = BERT (first text_layers layers) last hidden state           [B,S,H]
    stage1 = stage1_layers post-LN layers on cap_proj(h) (key-padding mask from ids != 0)
    stage2 = stage2_layers post-LN layers on stage1, WITHOUT a padding mask

Every post-LN layer outside BERT is torch's `nn.TransformerEncoderLayer` (4 heads, feed-forward
2048, ReLU, LayerNorm eps 1e-5; see xmr_jax.models.bert). With `detach=True` (as published) stage1
is cut from the gradient before stage 2, so only the stage-2 layers train; `detach=False` trains
end to end.

Outputs of both methods: `(global [B,E], tokens [B,L,E], mask [B,L])`, float32:

* global: stage-2 token 0 ('first' aggregation: the zero row / [CLS]), NOT normalized (the losses
  and similarities normalize; TGDT's own global is this vector L2-normalized).
* tokens: the token set, every row L2-normalized, and row 0 replaced by the normalized global.
  Which stage they come from is the token set: "train" = stage-2 tokens (TGDT during training),
  "test" = stage-1 tokens (TGDT after `switch_test`, in all its evaluations). Choose it with the
  module field `token_set` or per call (`token_set="test"` passed through `model.apply`).
* mask (bool): the tokens local similarity counts. Image: the regions (False for row 0 and, with
  `region_mask`, for missing regions). Text: the words (False for [CLS] at position 0, for [SEP]
  at the last non-padding position and for padding).

Because stage 2 has no padding mask (as published), a caption's outputs depend on how far it is
padded (TGDT pads each batch to its longest caption); `stage2_mask=True` masks padding there too.

Parameters (float32): `bert` (xmr_jax.models.bert.Bert), `region_mlp_in` / `region_mlp_out`,
`region_transformer/layers_{i}`, `img_proj`, `cap_proj`, `image_stage1`, `text_stage1`,
`image_stage2`, `text_stage2` (each `layers_{i}` of a PostLNTransformer). TGDT's state-dict names
for each are in xmr_jax.convert.tgdt.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmr_jax.models.bert import Bert, PostLNTransformer, torch_linear_std
from xmr_jax.models.clip import parse_dtype
from xmr_jax.models.layers import Dense
from xmr_jax.similarity import l2_normalize

Dtype = Any

TOKEN_SETS = ("train", "test")

TGDT_REGIONS_FIELDS = (
    "embed_dim", "region_dim", "region_layers", "region_heads", "region_mlp_dim", "stage1_layers",
    "stage2_layers", "heads", "mlp_dim", "vocab_size", "text_width", "text_layers", "text_heads",
    "text_mlp_dim", "max_position_embeddings", "type_vocab_size", "token_set", "detach", "stage2_mask",
    "dropout", "dtype", "attention_impl")

TGDT_REGIONS_PRESETS: dict[str, dict] = {
    # LCFractal/TGDT configs f30k_all.yaml / coco_all.yaml with bert-base-uncased cut to 6 layers.
    "tgdt": dict(embed_dim=1024, region_dim=2048, region_layers=4, region_heads=4, region_mlp_dim=2048,
                 stage1_layers=2, stage2_layers=2, heads=4, mlp_dim=2048, vocab_size=30522, text_width=768,
                 text_layers=6, text_heads=12, text_mlp_dim=3072, max_position_embeddings=512,
                 type_vocab_size=2),
    # Same structure, small enough for CPU tests and demos.
    "tiny": dict(embed_dim=32, region_dim=32, region_layers=2, region_heads=4, region_mlp_dim=64,
                 stage1_layers=1, stage2_layers=1, heads=4, mlp_dim=64, vocab_size=30522, text_width=32,
                 text_layers=2, text_heads=4, text_mlp_dim=64, max_position_embeddings=128,
                 type_vocab_size=2),
}


def box_info(boxes: jax.Array) -> jax.Array:
    """boxes [..., 4] (x1, y1, x2, y2) -> [..., 5] with the area (x2 - x1) * (y2 - y1) appended."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return jnp.concatenate([boxes, area[..., None]], axis=-1)


def text_word_mask(token_ids: jax.Array) -> jax.Array:
    """BERT ids [B,S] (0 = padding, right-padded) -> bool [B,S]: True for the words, i.e. not padding,
    not position 0 ([CLS]) and not the last non-padding position ([SEP])."""
    real = token_ids != 0
    length = jnp.sum(real, axis=1, keepdims=True)
    pos = jnp.arange(token_ids.shape[1])[None, :]
    return real & (pos > 0) & (pos < length - 1)


class TGDTRegions(nn.Module):
    """TGDT's encoders (module docstring). Sizes default to the published model ("tgdt" preset)."""

    embed_dim: int = 1024
    region_dim: int = 2048
    region_layers: int = 4
    region_heads: int = 4
    region_mlp_dim: int = 2048
    stage1_layers: int = 2
    stage2_layers: int = 2
    heads: int = 4
    mlp_dim: int = 2048
    vocab_size: int = 30522
    text_width: int = 768
    text_layers: int = 6
    text_heads: int = 12
    text_mlp_dim: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    token_set: str = "train"
    detach: bool = True
    stage2_mask: bool = False
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    def setup(self):
        if self.token_set not in TOKEN_SETS:
            raise ValueError(f"TGDTRegions.token_set={self.token_set!r}: expected one of {TOKEN_SETS}")
        dtype = parse_dtype(self.dtype)

        def stack(layers, heads, mlp_dim):
            return PostLNTransformer(layers, heads, mlp_dim, "relu", 1e-5, self.dropout, dtype,
                                     self.attention_impl)

        self.bert = Bert(self.vocab_size, self.text_width, self.text_layers, self.text_heads, self.text_mlp_dim,
                         self.max_position_embeddings, self.type_vocab_size, 1e-12, self.dropout, dtype,
                         self.attention_impl)
        r = self.region_dim
        self.region_mlp_in = Dense(r, torch_linear_std(r + 5), dtype)
        self.region_mlp_out = Dense(r, torch_linear_std(r), dtype)
        self.region_transformer = stack(self.region_layers, self.region_heads, self.region_mlp_dim)
        self.img_proj = Dense(self.embed_dim, torch_linear_std(r), dtype)
        self.cap_proj = Dense(self.embed_dim, torch_linear_std(self.text_width), dtype)
        self.image_stage1 = stack(self.stage1_layers, self.heads, self.mlp_dim)
        self.text_stage1 = stack(self.stage1_layers, self.heads, self.mlp_dim)
        self.image_stage2 = stack(self.stage2_layers, self.heads, self.mlp_dim)
        self.text_stage2 = stack(self.stage2_layers, self.heads, self.mlp_dim)

    # ------------------------------------------------------------------------------------------

    def _resolve_token_set(self, token_set: Optional[str]) -> str:
        token_set = self.token_set if token_set is None else token_set
        if token_set not in TOKEN_SETS:
            raise ValueError(f"token_set={token_set!r}: expected 'train' (stage-2 tokens) or 'test' (stage-1 tokens)")
        return token_set

    def _two_stages(self, x, key_mask, stage1, stage2, token_set, deterministic):
        """Shared tail of both sides: x [B,L,E] -> (global [B,E], tokens [B,L,E]) float32."""
        s1 = stage1(x, key_mask, deterministic)
        s2_in = jax.lax.stop_gradient(s1) if self.detach else s1
        s2 = stage2(s2_in, key_mask if self.stage2_mask else None, deterministic)
        s1 = s1.astype(jnp.float32)
        s2 = s2.astype(jnp.float32)
        global_feat = s2[:, 0]
        tokens = l2_normalize(s2 if token_set == "train" else s1)
        tokens = tokens.at[:, 0].set(l2_normalize(global_feat))
        return global_feat, tokens

    def encode_image(self, regions: jax.Array, boxes: jax.Array, region_mask: Optional[jax.Array] = None,
                     token_set: Optional[str] = None, deterministic: bool = True):
        """regions [B,N,R] float, boxes [B,N,4] float (normalized x1, y1, x2, y2), region_mask optional
        bool [B,N] (True = a real region; None = all real) -> (global [B,E], tokens [B,N+1,E],
        mask [B,N+1] bool), float32. token_set None = the module's `token_set`."""
        token_set = self._resolve_token_set(token_set)
        if regions.ndim != 3 or regions.shape[-1] != self.region_dim:
            raise ValueError(f"encode_image: regions must be [B, N, {self.region_dim}], got {tuple(regions.shape)}")
        if boxes.shape != regions.shape[:2] + (4,):
            raise ValueError(f"encode_image: boxes must be [B, N, 4] = {regions.shape[:2] + (4,)} to match the "
                             f"regions, got {tuple(boxes.shape)}")
        b, n, _ = regions.shape
        regions = jnp.concatenate([jnp.zeros((b, 1, self.region_dim), jnp.float32),
                                   jnp.asarray(regions, jnp.float32)], axis=1)
        boxes = jnp.concatenate([jnp.zeros((b, 1, 4), jnp.float32), jnp.asarray(boxes, jnp.float32)], axis=1)
        if region_mask is None:
            key_mask = jnp.ones((b, n + 1), bool)
        else:
            if region_mask.shape != (b, n):
                raise ValueError(f"encode_image: region_mask must be [B, N] = {(b, n)}, got {tuple(region_mask.shape)}")
            key_mask = jnp.concatenate([jnp.ones((b, 1), bool), jnp.asarray(region_mask, bool)], axis=1)
        x = jnp.concatenate([regions, box_info(boxes)], axis=-1)
        x = self.region_mlp_out(jax.nn.relu(self.region_mlp_in(x)))
        x = self.region_transformer(x, key_mask, deterministic)
        x = self.img_proj(x)
        global_feat, tokens = self._two_stages(x, key_mask, self.image_stage1, self.image_stage2, token_set,
                                               deterministic)
        mask = key_mask & (jnp.arange(n + 1) > 0)[None, :]
        return global_feat, tokens, mask

    def encode_text(self, token_ids: jax.Array, token_set: Optional[str] = None, deterministic: bool = True):
        """token_ids int [B,S] (BERT ids, [CLS] ... [SEP], 0 = padding on the right) -> (global [B,E],
        tokens [B,S,E], mask [B,S] bool, see `text_word_mask`), float32. token_set None = the
        module's `token_set`."""
        token_set = self._resolve_token_set(token_set)
        if token_ids.ndim != 2:
            raise ValueError(f"encode_text: token ids must be [B, S], got shape {tuple(token_ids.shape)}")
        key_mask = token_ids != 0
        h = self.bert(token_ids, key_mask, None, deterministic)
        x = self.cap_proj(h)
        global_feat, tokens = self._two_stages(x, key_mask, self.text_stage1, self.text_stage2, token_set,
                                               deterministic)
        return global_feat, tokens, text_word_mask(token_ids)

    def __call__(self, batch: Mapping[str, jax.Array], token_set: Optional[str] = None,
                 deterministic: Optional[bool] = None) -> dict[str, jax.Array]:
        """The training pass; deterministic None = dropout on when `dropout` > 0 (TGDT trains
        with 0.1; needs a "dropout" rng, which the trainer passes every step).

        batch: regions [B,N,R], boxes [B,N,4], text_ids [B,S] (optional region_mask [B,N]) ->
        {image_global, text_global [B,E] (unnormalized), image_tokens [B,N+1,E], image_mask,
        text_tokens [B,S,E], text_mask} (the keys `xmr_jax.models.tgdt.compute_losses` reads)."""
        if deterministic is None:
            deterministic = self.dropout == 0.0
        image_global, image_tokens, image_mask = self.encode_image(
            batch["regions"], batch["boxes"], batch.get("region_mask"), token_set, deterministic)
        text_global, text_tokens, text_mask = self.encode_text(batch["text_ids"], token_set, deterministic)
        return {"image_global": image_global, "text_global": text_global, "image_tokens": image_tokens,
                "image_mask": image_mask, "text_tokens": text_tokens, "text_mask": text_mask}

    def dummy_batch(self, batch: int = 1, num_regions: int = 36, text_length: int = 32) -> dict:
        """Zero inputs for `init`: regions [b,num_regions,R], boxes [b,num_regions,4], text_ids [b,text_length]."""
        return {"regions": jnp.zeros((batch, num_regions, self.region_dim), jnp.float32),
                "boxes": jnp.zeros((batch, num_regions, 4), jnp.float32),
                "text_ids": jnp.zeros((batch, text_length), jnp.int32)}

    def fields(self) -> dict:
        """The constructor fields as a plain dict."""
        return {f: getattr(self, f) for f in TGDT_REGIONS_FIELDS}


def init_tgdt_regions_params(model: TGDTRegions, rng) -> dict:
    """Random float32 parameters for `model` (torch/BERT default init scales, see the submodules)."""
    return model.init(rng, model.dummy_batch(num_regions=2, text_length=4))["params"]


def tgdt_regions_param_shapes(model: TGDTRegions) -> dict:
    """Param tree of jax.ShapeDtypeStruct for `model` (no computation)."""
    return jax.eval_shape(lambda: init_tgdt_regions_params(model, jax.random.key(0)))


def tgdt_regions_from_config(cfg: Mapping) -> TGDTRegions:
    """Build from {"preset": "tgdt" | "tiny", **overrides} (`dtype` may be a string). Unknown keys or
    presets raise ValueError naming them."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    preset = cfg.pop("preset", None)
    if preset is not None and preset not in TGDT_REGIONS_PRESETS:
        raise ValueError(f"tgdt_regions config: unknown preset {preset!r}; expected one of "
                         f"{sorted(TGDT_REGIONS_PRESETS)}")
    unknown = sorted(set(cfg) - set(TGDT_REGIONS_FIELDS))
    if unknown:
        raise ValueError(f"tgdt_regions config: unknown field(s) {unknown}; expected 'preset' and any of "
                         f"{list(TGDT_REGIONS_FIELDS)}")
    fields = dict(TGDT_REGIONS_PRESETS[preset]) if preset is not None else {}
    fields.update({k: v for k, v in cfg.items() if v is not None})
    if "dtype" in fields:
        fields["dtype"] = parse_dtype(fields["dtype"])
    if fields.get("token_set", "train") not in TOKEN_SETS:
        raise ValueError(f"tgdt_regions config: token_set={fields['token_set']!r}; expected one of {TOKEN_SETS}")
    return TGDTRegions(**fields)
