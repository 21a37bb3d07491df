"""A PyTorch transcription of TGDT's encoders (LCFractal/TGDT, models/baseline.py + TERAN's
models/visual.py, text.py, utils.py), for parity tests of xmr_jax.models.tgdt_regions and of the
checkpoint importer. Module names reproduce TGDT's state-dict keys (`img_txt_enc.txt_enc.bert_model.*`,
`img_txt_enc.img_enc.*`, `img_txt_enc.transformer_encoder_{1,2,text,img}.layers.N.*`, ...), including
the parameters TGDT builds but never uses, so `reference.state_dict()` has the layout of
`model_best_rsum.pth.tar`'s 'model' entry.

    ref = TGDTReference(tiny_sizes(), seed=0)       # eval mode, every parameter randomized
    out = ref(regions37, boxes37, feat_len, token_ids, cap_len, test=False)
    # out: dict of numpy arrays img_global [B,E], cap_global [B,E] (L2-normalized),
    #      img_tokens [B,37,E], cap_tokens [B,S,E] (normalized, row 0 = the global)
    save_tgdt_checkpoint(ref, path)                 # {'model': state_dict, 'optimizer', 'opt', ...}

Inputs follow TGDT's collate: the zero row already prepended to regions and boxes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def tiny_sizes(**overrides) -> dict:
    """Tiny sizes with the published structure (4 region layers, 2 layers per stage)."""
    sizes = dict(embed=16, region_dim=16, region_layers=4, region_ffn=24, layers=2, ffn=24, heads=4,
                 vocab=60, bert_width=16, bert_layers=2, bert_heads=2, bert_ffn=32, max_pos=24, type_vocab=2)
    sizes.update(overrides)
    return sizes


def _encoder(width: int, layers: int, ffn: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=ffn, dropout=0.1,
                                       activation="relu")   # post-LN, sequence-first as in TGDT
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def _padding(lengths, max_len: int) -> torch.Tensor:
    """True at padded positions (torch's src_key_padding_mask convention)."""
    return torch.arange(max_len)[None, :] >= torch.as_tensor(lengths)[:, None]


class _BoxEncoding(nn.Module):
    """'concat-and-process': [region, x1, y1, x2, y2, area] -> Linear -> ReLU -> Linear."""

    def __init__(self, width: int):
        super().__init__()
        self.map = nn.Sequential(nn.Linear(width + 5, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x, boxes):            # x: L x B x R, boxes: B x L x 4
        area = ((boxes[:, :, 2] - boxes[:, :, 0]) * (boxes[:, :, 3] - boxes[:, :, 1]))[:, :, None]
        info = torch.cat([boxes, area], dim=2).permute(1, 0, 2)
        return self.map(torch.cat([x, info], dim=2))


class _RegionEncoder(nn.Module):
    """TransformerPostProcessing with box encoding; its `fc` (mean-pool head) is never used by TGDT."""

    def __init__(self, s):
        super().__init__()
        self.transformer_encoder = _encoder(s["region_dim"], s["region_layers"], s["region_ffn"], 4)
        self.pos_encoding_image = _BoxEncoding(s["region_dim"])
        self.fc = nn.Linear(s["region_dim"], s["embed"])

    def forward(self, feats, lengths, boxes):   # feats B x L x R -> B x L x R
        x = self.pos_encoding_image(feats.permute(1, 0, 2), boxes)
        x = self.transformer_encoder(x, src_key_padding_mask=_padding(lengths, x.shape[0]))
        return x.permute(1, 0, 2)


class _TextEncoder(nn.Module):
    """EncoderTextBERT with layers = 0: BERT's last hidden state; `map` is never used by TGDT."""

    def __init__(self, s):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=s["vocab"], hidden_size=s["bert_width"], num_hidden_layers=s["bert_layers"],
                         num_attention_heads=s["bert_heads"], intermediate_size=s["bert_ffn"],
                         max_position_embeddings=s["max_pos"], type_vocab_size=s["type_vocab"],
                         hidden_act="gelu", attn_implementation="eager")
        self.bert_model = BertModel(cfg)
        self.word_embeddings = self.bert_model.get_input_embeddings()   # shared: a second key in the state dict
        self.map = nn.Linear(s["bert_width"], s["embed"])

    def forward(self, ids, lengths):
        attention_mask = (~_padding(lengths, ids.shape[1])).long()
        return self.bert_model(ids, attention_mask=attention_mask).last_hidden_state


def _agg_mlp(e: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, e // 2), nn.ReLU(), nn.Linear(e // 2, e))


class _JointEncoder(nn.Module):
    def __init__(self, s):
        super().__init__()
        e = s["embed"]
        self.txt_enc = _TextEncoder(s)
        self.img_enc = _RegionEncoder(s)
        self.img_proj = nn.Linear(s["region_dim"], e)
        self.cap_proj = nn.Linear(s["bert_width"], e)
        self.transformer_encoder_1 = _encoder(e, s["layers"], s["ffn"], s["heads"])
        self.transformer_encoder_2 = _encoder(e, s["layers"], s["ffn"], s["heads"])
        self.text_agg_emb = _agg_mlp(e)          # built, never used
        self.img_agg_emb = _agg_mlp(e)
        self.transformer_encoder_text = _encoder(e, s["layers"], s["ffn"], s["heads"])
        self.transformer_encoder_img = _encoder(e, s["layers"], s["ffn"], s["heads"])

    def forward(self, feats, ids, feat_len, cap_len, boxes, test: bool):
        c = self.cap_proj(self.txt_enc(ids, cap_len))                     # B x S x E
        c1 = self.transformer_encoder_1(c.permute(1, 0, 2), src_key_padding_mask=_padding(cap_len, c.shape[1]))
        c1 = c1.detach()
        c2 = self.transformer_encoder_text(c1)                             # no padding mask
        i = self.img_proj(self.img_enc(feats, feat_len, boxes))
        i1 = self.transformer_encoder_2(i.permute(1, 0, 2), src_key_padding_mask=_padding(feat_len, i.shape[1]))
        i1 = i1.detach()
        i2 = self.transformer_encoder_img(i1)
        cap_global = c2[0] / c2[0].norm(dim=1, keepdim=True)                # 'first' aggregation + l2norm
        img_global = i2[0] / i2[0].norm(dim=1, keepdim=True)
        img_tokens = F.normalize(i1 if test else i2, p=2, dim=2)
        cap_tokens = F.normalize(c1 if test else c2, p=2, dim=2)
        img_tokens[0] = img_global
        cap_tokens[0] = cap_global
        return img_global, cap_global, img_tokens.permute(1, 0, 2), cap_tokens.permute(1, 0, 2)


class TGDTReference(nn.Module):
    """BASELINE's parameters: `img_txt_enc` plus the unused `img_first_emb` / `cap_first_emb`."""

    def __init__(self, sizes: dict, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.sizes = dict(sizes)
        self.img_txt_enc = _JointEncoder(sizes)
        self.img_first_emb = nn.Linear(sizes["embed"], sizes["embed"])
        self.cap_first_emb = nn.Linear(sizes["embed"], sizes["embed"])
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():   # every parameter different (the stacked layers start as copies)
            for name, p in self.named_parameters():
                if "norm" in name.lower() and p.ndim == 1:
                    base = 1.0 if name.endswith("weight") else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(p.shape[-1], 1) ** 0.5))
        self.eval()

    @torch.no_grad()
    def forward(self, regions37, boxes37, feat_len, ids, cap_len, test: bool = False) -> dict:
        out = self.img_txt_enc(torch.as_tensor(np.asarray(regions37), dtype=torch.float32),
                               torch.as_tensor(np.asarray(ids), dtype=torch.long), list(feat_len), list(cap_len),
                               torch.as_tensor(np.asarray(boxes37), dtype=torch.float32), test)
        names = ("img_global", "cap_global", "img_tokens", "cap_tokens")
        return {k: v.numpy() for k, v in zip(names, out)}


def save_tgdt_checkpoint(ref: TGDTReference, path: str) -> None:
    """Writes `ref` in the layout of TGDT's train.py save_checkpoint (model, optimizer, scheduler,
    the argparse options, the YAML config, epoch, Eiters)."""
    optimizer = torch.optim.Adam(ref.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 20, gamma=0.1)
    torch.save({
        "epoch": 3,
        "model": ref.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "opt": argparse.Namespace(num_epochs=60, logger_name="runs/f30k_m0.3", config="configs/f30k_all.yaml"),
        "config": {"model": {"embed-size": ref.sizes["embed"], "layers": ref.sizes["layers"]},
                   "text-model": {"pretrain": "bert-base-uncased", "extraction-hidden-layer": ref.sizes["bert_layers"]}},
        "Eiters": 123,
    }, path)
