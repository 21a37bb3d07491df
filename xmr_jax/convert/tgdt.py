"""Import TGDT's released checkpoints and Hugging Face BERT weights for xmr_jax.models.tgdt_regions.

    model, params = load_tgdt("runs/f30k_m0.3/model_best_rsum.pth.tar")   # TGDTRegions, token_set "test"
    g, tokens, mask = model.apply({"params": params}, regions, boxes, method="encode_image")
    bert, bert_params = load_bert("bert-base-uncased/", num_layers=6)     # a transformers BertModel folder

TGDT's checkpoint (train.py's save_checkpoint) is a dict whose 'model' entry is BASELINE's state
dict; its other entries (optimizer, scheduler, the argparse options, the YAML config, epoch) are
not needed. Its keys, under `img_txt_enc.` (DataParallel's `module.` prefix is dropped):

    txt_enc.bert_model.embeddings.{word,position,token_type}_embeddings.weight, .LayerNorm.*  -> bert/...
    txt_enc.bert_model.encoder.layer.N.attention.self.{query,key,value}.*                    -> bert/layer_N/attn/{q,k,v}_proj
    txt_enc.bert_model.encoder.layer.N.attention.output.{dense,LayerNorm}.*                  -> .../attn/out_proj, norm1
    txt_enc.bert_model.encoder.layer.N.{intermediate.dense, output.dense, output.LayerNorm}.* -> linear1, linear2, norm2
    img_enc.pos_encoding_image.map.{0,2}.*                 -> region_mlp_in, region_mlp_out
    img_enc.transformer_encoder.layers.N.*                 -> region_transformer/layers_N
    img_proj.*, cap_proj.*                                 -> img_proj, cap_proj
    transformer_encoder_1.layers.N.*  (text stage 1)       -> text_stage1/layers_N
    transformer_encoder_2.layers.N.*  (image stage 1)      -> image_stage1/layers_N
    transformer_encoder_text.layers.N.*, _img.layers.N.*   -> text_stage2, image_stage2

with torch's TransformerEncoderLayer names per layer: `self_attn.in_proj_{weight [3E,E], bias [3E]}`
(split into q, k, v), `self_attn.out_proj`, `linear1`, `linear2`, `norm1`, `norm2`. Linear weights
[out, in] become Dense kernels [in, out].

Skipped (TGDT builds them but never uses them): `text_agg_emb`, `img_agg_emb`, `img_first_emb`,
`cap_first_emb`, `txt_enc.map`, `img_enc.fc`, BERT's pooler and position/token-type id buffers, and
`txt_enc.word_embeddings.weight` (the same tensor as BERT's word embeddings). Any other key is an
error, as is a missing key or a wrong shape (naming the key and both shapes). Sizes (widths, layer
counts, vocabulary) are read from the shapes; the head counts are not stored in a state dict:
TGDT's transformers have 4 heads, BERT's heads are hidden_size // 64 (bert-base: 12) unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Mapping, Optional

import numpy as np

from xmr_jax.convert.core import (CheckpointMismatchError, Entry, apply_table, flatten, load_state_dict_file)
from xmr_jax.models.bert import Bert

__all__ = ["load_tgdt", "load_bert", "load_bert_for", "read_tgdt_checkpoint", "tgdt_state_dict_to_params",
           "bert_state_dict_to_params"]

TGDT_PREFIX = "img_txt_enc."
# Parameters of BASELINE that never take part in TGDT's computation (prefixes of full keys).
TGDT_UNUSED = ("img_first_emb.", "cap_first_emb.", TGDT_PREFIX + "text_agg_emb.", TGDT_PREFIX + "img_agg_emb.",
               TGDT_PREFIX + "txt_enc.map.", TGDT_PREFIX + "img_enc.fc.",
               TGDT_PREFIX + "txt_enc.word_embeddings.weight")
_BERT_UNUSED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")
BERT_HEAD_DIM = 64


# ----------------------------------------------------------------------------------------------
# Tables


def post_ln_layer_entries(src: str, dst: tuple, width: int, mlp_dim: int, dsts: tuple = ()) -> list[Entry]:
    """Entries of one torch TransformerEncoderLayer at `src` (ending in '.') -> PostLNBlock at `dst`
    (and at every path in `dsts`, for a transformer shared by both sides)."""
    paths = (dst,) + tuple(dsts)

    def targets(sub, kind):
        return tuple((p + sub, kind) for p in paths)

    def t(sub_w, sub_b, name, out_dim, in_dim):
        return [Entry(f"{src}{name}.weight", (out_dim, in_dim), targets(sub_w, "T")),
                Entry(f"{src}{name}.bias", (out_dim,), targets(sub_b, "id"))]

    e, f = width, mlp_dim
    table = [
        Entry(f"{src}self_attn.in_proj_weight", (3 * e, e),
              sum((targets(("attn", n, "kernel"), ("qkv_w", j)) for j, n in enumerate(("q_proj", "k_proj", "v_proj"))), ())),
        Entry(f"{src}self_attn.in_proj_bias", (3 * e,),
              sum((targets(("attn", n, "bias"), ("qkv_b", j)) for j, n in enumerate(("q_proj", "k_proj", "v_proj"))), ())),
    ]
    table += t(("attn", "out_proj", "kernel"), ("attn", "out_proj", "bias"), "self_attn.out_proj", e, e)
    table += t(("linear1", "kernel"), ("linear1", "bias"), "linear1", f, e)
    table += t(("linear2", "kernel"), ("linear2", "bias"), "linear2", e, f)
    for norm in ("norm1", "norm2"):
        table += [Entry(f"{src}{norm}.weight", (e,), targets((norm, "scale"), "id")),
                  Entry(f"{src}{norm}.bias", (e,), targets((norm, "bias"), "id"))]
    return table


def bert_entries(src: str, dst: tuple, sizes: Mapping[str, int]) -> list[Entry]:
    """Entries of a Hugging Face BertModel state dict at `src` (keys after the prefix as BertModel
    names them) -> xmr_jax.models.bert.Bert params at `dst`, first sizes['num_layers'] layers."""
    h, i = sizes["hidden_size"], sizes["intermediate_size"]
    table = [
        Entry(f"{src}embeddings.word_embeddings.weight", (sizes["vocab_size"], h),
              ((dst + ("word_embeddings", "embedding"), "id"),)),
        Entry(f"{src}embeddings.position_embeddings.weight", (sizes["max_position_embeddings"], h),
              ((dst + ("position_embeddings", "embedding"), "id"),)),
        Entry(f"{src}embeddings.token_type_embeddings.weight", (sizes["type_vocab_size"], h),
              ((dst + ("token_type_embeddings", "embedding"), "id"),)),
        Entry(f"{src}embeddings.LayerNorm.weight", (h,), ((dst + ("embeddings_ln", "scale"), "id"),)),
        Entry(f"{src}embeddings.LayerNorm.bias", (h,), ((dst + ("embeddings_ln", "bias"), "id"),)),
    ]
    for n in range(sizes["num_layers"]):
        s = f"{src}encoder.layer.{n}."
        d = dst + (f"layer_{n}",)

        def linear(name, path, out_dim, in_dim):
            return [Entry(f"{s}{name}.weight", (out_dim, in_dim), ((d + path + ("kernel",), "T"),)),
                    Entry(f"{s}{name}.bias", (out_dim,), ((d + path + ("bias",), "id"),))]

        def norm(name, path):
            return [Entry(f"{s}{name}.weight", (h,), ((d + (path, "scale"), "id"),)),
                    Entry(f"{s}{name}.bias", (h,), ((d + (path, "bias"), "id"),))]

        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            table += linear(f"attention.self.{name}", ("attn", proj), h, h)
        table += linear("attention.output.dense", ("attn", "out_proj"), h, h)
        table += norm("attention.output.LayerNorm", "norm1")
        table += linear("intermediate.dense", ("linear1",), i, h)
        table += linear("output.dense", ("linear2",), h, i)
        table += norm("output.LayerNorm", "norm2")
    return table


def _count_layers(sd: Mapping[str, Any], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found and sorted(found) != list(range(len(found))):
        raise CheckpointMismatchError(f"layers under '{prefix}' are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def _shape(sd: Mapping[str, Any], key: str, what: str) -> tuple:
    if key not in sd:
        raise CheckpointMismatchError(f"{what}: missing key '{key}' (needed to read the model sizes)")
    return tuple(sd[key].shape)


def normalize_bert_keys(sd: Mapping[str, Any]) -> dict:
    """Hugging Face BERT state dict as BertModel names it: without a 'bert.' prefix (BertForPreTraining
    files), LayerNorm 'gamma'/'beta' (the original Google conversion) renamed 'weight'/'bias'."""
    out = {}
    strip = any(k.startswith("bert.") for k in sd)
    for k, v in sd.items():
        if strip:
            if not k.startswith("bert."):
                continue   # heads of a pre-training model (cls.*)
            k = k[len("bert."):]
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    return out


def bert_sizes(sd: Mapping[str, Any], prefix: str = "", what: str = "BERT weights") -> dict:
    """vocab_size, hidden_size, max_position_embeddings, type_vocab_size, intermediate_size and the
    number of stored layers (`num_layers`) from a BertModel state dict's shapes."""
    vocab, hidden = _shape(sd, f"{prefix}embeddings.word_embeddings.weight", what)
    return {"vocab_size": vocab, "hidden_size": hidden,
            "max_position_embeddings": _shape(sd, f"{prefix}embeddings.position_embeddings.weight", what)[0],
            "type_vocab_size": _shape(sd, f"{prefix}embeddings.token_type_embeddings.weight", what)[0],
            "intermediate_size": _shape(sd, f"{prefix}encoder.layer.0.intermediate.dense.weight", what)[0],
            "num_layers": _count_layers(sd, f"{prefix}encoder.layer.")}


# ----------------------------------------------------------------------------------------------
# TGDT


def read_tgdt_checkpoint(path: str, allow_pickle: bool = False) -> dict:
    """BASELINE's state dict (DataParallel's `module.` prefix removed) from TGDT's `.pth.tar`
    ({'model': state_dict, ...}), a bare state dict file, or a `.safetensors` file.

    The file is read with `torch.load(weights_only=True)`, allowing the argparse.Namespace that
    TGDT's train.py stores next to the weights; `allow_pickle=True` reads any pickle (only for
    files from a source you trust: unpickling can run code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TGDT checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        ckpt: Any = load_state_dict_file(path)
    else:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs PyTorch (pip install torch)") from e
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as e:
            hint = "" if allow_pickle else (" (it was read with weights_only=True; if the file comes from a source "
                                            "you trust, pass allow_pickle=True)")
            raise ValueError(f"{path}: could not be read as a TGDT checkpoint: {type(e).__name__}: "
                             f"{str(e)[:300]}{hint}") from e
    sd = ckpt
    if isinstance(sd, Mapping) and isinstance(sd.get("model"), Mapping):
        sd = sd["model"]
    elif isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(hasattr(v, "shape") for v in sd.values()):
        raise CheckpointMismatchError(
            f"{path}: expected TGDT's checkpoint dict with a 'model' state dict (or a bare state dict), got "
            f"{type(ckpt).__name__}" + (f" with keys {sorted(ckpt)[:8]}" if isinstance(ckpt, Mapping) else ""))
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def tgdt_sizes(sd: Mapping[str, Any], what: str = "TGDT checkpoint") -> dict:
    """TGDTRegions size fields from BASELINE's state dict shapes (head counts excluded)."""
    p = TGDT_PREFIX
    if not any(k.startswith(p) for k in sd):
        raise CheckpointMismatchError(f"{what}: no key starts with '{p}': not a TGDT (BASELINE) state dict "
                                      f"(first keys: {sorted(sd)[:5]})")
    if any(k.startswith(p + "txt_enc.transformer_encoder.") for k in sd):
        raise CheckpointMismatchError(f"{what}: has '{p}txt_enc.transformer_encoder.*' (a text-model with "
                                      "layers > 0 after BERT); TGDT's published configs have none and it is not supported")
    embed, region = _shape(sd, p + "img_proj.weight", what)
    counts = {name: _count_layers(sd, f"{p}{name}.layers.") for name in
              ("img_enc.transformer_encoder", "transformer_encoder_1", "transformer_encoder_2",
               "transformer_encoder_text", "transformer_encoder_img")}
    for name in ("img_enc.transformer_encoder", "transformer_encoder_1", "transformer_encoder_text",
                 "transformer_encoder_img"):
        if counts[name] == 0:
            raise CheckpointMismatchError(f"{what}: missing key(s) '{p}{name}.layers.0.*' (no layers found)")
    shared = counts["transformer_encoder_2"] == 0   # config shared-transformer: stage 1 shared by both sides
    if not shared and counts["transformer_encoder_2"] != counts["transformer_encoder_1"]:
        raise CheckpointMismatchError(f"{what}: transformer_encoder_1 has {counts['transformer_encoder_1']} layers "
                                      f"but transformer_encoder_2 has {counts['transformer_encoder_2']}; the stage-1 "
                                      "transformers of both sides must have the same depth")
    if counts["transformer_encoder_text"] != counts["transformer_encoder_img"]:
        raise CheckpointMismatchError(f"{what}: transformer_encoder_text has {counts['transformer_encoder_text']} "
                                      f"layers but transformer_encoder_img has {counts['transformer_encoder_img']}")
    bert = bert_sizes(sd, p + "txt_enc.bert_model.", what)
    return {
        "embed_dim": embed, "region_dim": region, "region_layers": counts["img_enc.transformer_encoder"],
        "region_mlp_dim": _shape(sd, p + "img_enc.transformer_encoder.layers.0.linear1.weight", what)[0],
        "stage1_layers": counts["transformer_encoder_1"], "stage2_layers": counts["transformer_encoder_text"],
        "mlp_dim": _shape(sd, p + "transformer_encoder_1.layers.0.linear1.weight", what)[0],
        "vocab_size": bert["vocab_size"], "text_width": bert["hidden_size"], "text_layers": bert["num_layers"],
        "text_mlp_dim": bert["intermediate_size"], "max_position_embeddings": bert["max_position_embeddings"],
        "type_vocab_size": bert["type_vocab_size"], "shared_stage1": shared,
    }


def tgdt_table(sizes: Mapping[str, Any]) -> list[Entry]:
    """The conversion table of a TGDT state dict with `sizes` (see `tgdt_sizes`)."""
    p = TGDT_PREFIX
    e, r = sizes["embed_dim"], sizes["region_dim"]
    table = bert_entries(p + "txt_enc.bert_model.", ("bert",), {
        "vocab_size": sizes["vocab_size"], "hidden_size": sizes["text_width"], "num_layers": sizes["text_layers"],
        "intermediate_size": sizes["text_mlp_dim"], "max_position_embeddings": sizes["max_position_embeddings"],
        "type_vocab_size": sizes["type_vocab_size"]})

    def linear(src, dst, out_dim, in_dim):
        return [Entry(f"{src}.weight", (out_dim, in_dim), (((dst, "kernel"), "T"),)),
                Entry(f"{src}.bias", (out_dim,), (((dst, "bias"), "id"),))]

    table += linear(p + "img_enc.pos_encoding_image.map.0", "region_mlp_in", r, r + 5)
    table += linear(p + "img_enc.pos_encoding_image.map.2", "region_mlp_out", r, r)
    table += linear(p + "img_proj", "img_proj", e, r)
    table += linear(p + "cap_proj", "cap_proj", e, sizes["text_width"])
    for n in range(sizes["region_layers"]):
        table += post_ln_layer_entries(f"{p}img_enc.transformer_encoder.layers.{n}.",
                                       ("region_transformer", f"layers_{n}"), r, sizes["region_mlp_dim"])
    for n in range(sizes["stage1_layers"]):
        shared = (("image_stage1", f"layers_{n}"),) if sizes.get("shared_stage1") else ()
        table += post_ln_layer_entries(f"{p}transformer_encoder_1.layers.{n}.", ("text_stage1", f"layers_{n}"),
                                       e, sizes["mlp_dim"], dsts=shared)
        if not sizes.get("shared_stage1"):
            table += post_ln_layer_entries(f"{p}transformer_encoder_2.layers.{n}.", ("image_stage1", f"layers_{n}"),
                                           e, sizes["mlp_dim"])
    for n in range(sizes["stage2_layers"]):
        table += post_ln_layer_entries(f"{p}transformer_encoder_text.layers.{n}.", ("text_stage2", f"layers_{n}"),
                                       e, sizes["mlp_dim"])
        table += post_ln_layer_entries(f"{p}transformer_encoder_img.layers.{n}.", ("image_stage2", f"layers_{n}"),
                                       e, sizes["mlp_dim"])
    return table


def _tgdt_unused(key: str) -> bool:
    if key.startswith(TGDT_UNUSED):
        return True
    bert = TGDT_PREFIX + "txt_enc.bert_model."
    return key.startswith(bert) and bool(_BERT_UNUSED.match(key[len(bert):]))


def tgdt_state_dict_to_params(sd: Mapping[str, Any], what: str = "TGDT checkpoint") -> tuple[dict, dict]:
    """BASELINE state dict -> (TGDTRegions size fields, nested numpy float32 params)."""
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    sizes = tgdt_sizes(sd, what)
    params = apply_table(sd, tgdt_table(sizes), ignore=_tgdt_unused, what=what)
    sizes.pop("shared_stage1")
    return sizes, params


def check_tree(params, expected, what: str) -> None:
    """CheckpointMismatchError unless `params` has exactly `expected`'s paths and shapes."""
    want, got = flatten(expected), flatten(params)
    missing = sorted("/".join(k) for k in set(want) - set(got))
    extra = sorted("/".join(k) for k in set(got) - set(want))
    if missing or extra:
        raise CheckpointMismatchError(f"{what}: parameter tree differs from the model: missing {missing[:6]}, "
                                      f"unexpected {extra[:6]}")
    for k, spec in want.items():
        if tuple(np.shape(got[k])) != tuple(spec.shape):
            raise CheckpointMismatchError(f"{what}: parameter '{'/'.join(k)}' has the wrong shape: expected "
                                          f"{tuple(spec.shape)}, got {tuple(np.shape(got[k]))}")


def load_tgdt(path: str, *, heads: int = 4, region_heads: int = 4, text_heads: Optional[int] = None,
              token_set: str = "test", dtype: Any = "float32", allow_pickle: bool = False, **overrides):
    """TGDT's `.pth.tar` -> (TGDTRegions, params) with the checkpoint's sizes.

    heads / region_heads: heads of the stage and region transformers (TGDT: 4, not stored).
    text_heads: BERT's heads (None: hidden_size // 64, i.e. 12 for bert-base).
    token_set: "test" by default, the token set TGDT evaluates with (`switch_test`); "train" for the
      training-time set. dtype: compute dtype. overrides: other TGDTRegions fields (detach,
      stage2_mask, dropout, attention_impl).
    """
    from xmr_jax.models.clip import parse_dtype
    from xmr_jax.models.tgdt_regions import TGDTRegions, tgdt_regions_param_shapes

    what = f"TGDT checkpoint {path}"
    sizes, params = tgdt_state_dict_to_params(read_tgdt_checkpoint(path, allow_pickle), what)
    width = sizes["text_width"]
    if text_heads is None:
        if width % BERT_HEAD_DIM:
            raise ValueError(f"{what}: BERT width {width} is not a multiple of {BERT_HEAD_DIM}; pass text_heads=")
        text_heads = width // BERT_HEAD_DIM
    model = TGDTRegions(**sizes, heads=heads, region_heads=region_heads, text_heads=text_heads,
                        token_set=token_set, dtype=parse_dtype(dtype), **overrides)
    check_tree(params, tgdt_regions_param_shapes(model), what)
    return model, params


# ----------------------------------------------------------------------------------------------
# Hugging Face BERT


def _read_bert_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"BERT folder not found: {folder} (expected a transformers BertModel folder with "
                                "config.json and model.safetensors or pytorch_model.bin)")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: config.json is missing (expected a transformers BertModel folder)")
    with open(cfg_path) as fh:
        return json.load(fh)


def _read_bert_weights(folder: str) -> dict:
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = os.path.join(folder, name)
        if os.path.isfile(weights):
            return load_state_dict_file(weights)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not "
                            "supported; save the model with save_pretrained(..., max_shard_size='10GB'))")


def _check_bert_config(cfg: Mapping[str, Any], folder: str) -> None:
    if cfg.get("model_type", "bert") != "bert":
        raise ValueError(f"{folder}/config.json: model_type={cfg.get('model_type')!r}, expected 'bert'")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{folder}/config.json: hidden_act={cfg.get('hidden_act')!r}; only 'gelu' (exact) is supported")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{folder}/config.json: position_embedding_type={cfg.get('position_embedding_type')!r}; "
                         "only 'absolute' is supported")


def bert_state_dict_to_params(sd: Mapping[str, Any], num_layers: int, what: str = "BERT weights") -> tuple[dict, dict]:
    """BertModel (or BertForPreTraining) state dict -> (sizes, Bert params of the first `num_layers` layers).
    Layers beyond `num_layers`, the pooler and pre-training heads are skipped."""
    sd = normalize_bert_keys(sd)
    sizes = bert_sizes(sd, "", what)
    if not 1 <= num_layers <= sizes["num_layers"]:
        raise ValueError(f"{what}: num_layers={num_layers}, but the weights hold {sizes['num_layers']} layers "
                         f"(expected 1 <= num_layers <= {sizes['num_layers']})")
    stored = sizes["num_layers"]
    sizes["num_layers"] = num_layers

    def ignore(k):
        m = re.match(r"encoder\.layer\.(\d+)\.", k)
        return bool(_BERT_UNUSED.match(k)) or (m is not None and num_layers <= int(m.group(1)) < stored)

    params = apply_table(sd, bert_entries("", (), sizes), ignore=ignore, what=what)
    return sizes, params


def load_bert(folder: str, num_layers: int = 6, dtype: Any = "float32"):
    """A Hugging Face BertModel folder (config.json + model.safetensors / pytorch_model.bin) ->
    (xmr_jax.models.bert.Bert of its first `num_layers` layers, params), as TGDT loads
    bert-base-uncased with num_hidden_layers=6."""
    from xmr_jax.models.clip import parse_dtype

    cfg = _read_bert_config(folder)
    _check_bert_config(cfg, folder)
    sd = _read_bert_weights(folder)
    what = f"BERT weights in {folder}"
    sizes, params = bert_state_dict_to_params(sd, num_layers, what)
    heads = cfg.get("num_attention_heads", sizes["hidden_size"] // BERT_HEAD_DIM)
    model = Bert(vocab_size=sizes["vocab_size"], hidden_size=sizes["hidden_size"], num_layers=num_layers,
                 num_heads=heads, intermediate_size=sizes["intermediate_size"],
                 max_position_embeddings=sizes["max_position_embeddings"], type_vocab_size=sizes["type_vocab_size"],
                 layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), dtype=parse_dtype(dtype))
    return model, params


def load_bert_for(model, folder: str) -> dict:
    """The `bert` params subtree of a TGDTRegions `model` from a Hugging Face BertModel folder (its
    first `model.text_layers` layers); a size that differs from the model names the field."""
    bert, params = load_bert(folder, num_layers=model.text_layers)
    pairs = (("vocab_size", "vocab_size"), ("hidden_size", "text_width"), ("num_heads", "text_heads"),
             ("intermediate_size", "text_mlp_dim"), ("max_position_embeddings", "max_position_embeddings"),
             ("type_vocab_size", "type_vocab_size"))
    for bert_field, model_field in pairs:
        if getattr(bert, bert_field) != getattr(model, model_field):
            raise CheckpointMismatchError(
                f"BERT in {folder} has {bert_field}={getattr(bert, bert_field)} but the model's {model_field} is "
                f"{getattr(model, model_field)}")
    if abs(bert.layer_norm_eps - 1e-12) > 1e-15:
        raise CheckpointMismatchError(f"BERT in {folder} has layer_norm_eps={bert.layer_norm_eps}; the model uses 1e-12")
    return params
