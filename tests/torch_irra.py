"""IRRA written in PyTorch: transformers' CLIP towers + the reference's heads and losses.

The numerical and speed reference for xmr_jax's IRRA (tests/test_irra.py, benchmarks/train_step.py)
and the source of reference key names for checkpoint import. Head modules carry the reference's
state-dict names: `cross_attn.*` (nn.MultiheadAttention: in_proj_weight/bias, out_proj),
`cross_modal_transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}`, `ln_pre_t`, `ln_pre_i`,
`ln_post`, `mlm_head.{dense,ln,fc}`, `classifier`. Needs torch and transformers only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP block: x + attn(ln_1(x)); x + mlp(ln_2(x)); full attention, no mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class TorchIRRA(nn.Module):
    """IRRA around a transformers `CLIPModel` (images NCHW). Forward returns the loss inputs."""

    def __init__(self, clip_model, num_classes: int, cross_depth: int = 4, cross_heads: int = 8):
        super().__init__()
        self.base_model = clip_model
        width = clip_model.config.projection_dim
        vocab = clip_model.config.text_config.vocab_size
        self.cross_attn = nn.MultiheadAttention(width, cross_heads, batch_first=True)
        self.cross_modal_transformer = Transformer(width, cross_depth, cross_heads)
        self.ln_pre_t = nn.LayerNorm(width)
        self.ln_pre_i = nn.LayerNorm(width)
        self.ln_post = nn.LayerNorm(width)
        self.mlm_head = nn.Sequential(OrderedDict([
            ("dense", nn.Linear(width, width)), ("gelu", QuickGELU()),
            ("ln", nn.LayerNorm(width)), ("fc", nn.Linear(width, vocab)),
        ]))
        self.classifier = nn.Linear(width, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def encode_image(self, images):
        """images [B,3,H,W] -> (global [B,D], tokens [B,L,D]): ln_post + proj on every token."""
        vm = self.base_model.vision_model
        emb = vm.embeddings
        # Built by hand so non-square inputs work: the positional table must already hold
        # 1 + (H/p)*(W/p) rows (replace `position_embedding` for a non-square grid).
        x = emb.patch_embedding(images).flatten(2).transpose(1, 2)
        x = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + emb.position_embedding.weight[None, : x.shape[1]]
        hidden = vm.encoder(inputs_embeds=vm.pre_layrnorm(x)).last_hidden_state
        tokens = self.base_model.visual_projection(vm.post_layernorm(hidden))
        return tokens[:, 0], tokens

    def encode_text(self, ids):
        """ids [B,T] -> (global at argmax id [B,D], tokens [B,T,D])."""
        hidden = self.base_model.text_model(input_ids=ids).last_hidden_state
        tokens = self.base_model.text_projection(hidden)
        return tokens[torch.arange(ids.shape[0]), ids.argmax(dim=-1)], tokens

    def cross_former(self, q, kv):
        q, kv = self.ln_pre_t(q), self.ln_pre_i(kv)
        x = self.cross_attn(q, kv, kv, need_weights=False)[0]
        return self.ln_post(self.cross_modal_transformer(x))

    def forward(self, images, text_ids, mlm_ids):
        i_feats, image_tokens = self.encode_image(images)
        t_feats, _ = self.encode_text(text_ids)
        _, mlm_tokens = self.encode_text(mlm_ids)
        x = self.cross_former(mlm_tokens, image_tokens)
        return {
            "image_feats": i_feats.float(), "text_feats": t_feats.float(),
            "image_logits": self.classifier(i_feats).float(), "text_logits": self.classifier(t_feats).float(),
            "mlm_logits": self.mlm_head(x).float(),
        }


def sdm_loss(image_feats, text_feats, pids, logit_scale=50.0, eps=1e-8):
    labels = (pids[:, None] == pids[None, :]).float()
    q = labels / labels.sum(dim=1, keepdim=True)
    t2i = F.normalize(text_feats, dim=-1) @ F.normalize(image_feats, dim=-1).t()
    total = 0.0
    for s in (logit_scale * t2i.t(), logit_scale * t2i):
        p = F.softmax(s, dim=1)
        total = total + (p * (F.log_softmax(s, dim=1) - torch.log(q + eps))).sum(dim=1).mean()
    return total


def irra_loss(outputs, pids, mlm_labels):
    """SDM + ID + MLM as IRRA computes them (MLM: CE over positions with label != 0)."""
    sdm = sdm_loss(outputs["image_feats"], outputs["text_feats"], pids)
    idl = (F.cross_entropy(outputs["image_logits"], pids) + F.cross_entropy(outputs["text_logits"], pids)) / 2
    logits = outputs["mlm_logits"].reshape(-1, outputs["mlm_logits"].shape[-1])
    mlm = F.cross_entropy(logits, mlm_labels.reshape(-1), ignore_index=0)
    return sdm + idl + mlm, {"sdm_loss": sdm, "id_loss": idl, "mlm_loss": mlm}
