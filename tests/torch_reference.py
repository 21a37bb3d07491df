"""PyTorch reference helpers for parity tests (offline, tiny random transformers.CLIPModel).

    hf = tiny_hf_clip(seed=0)                       # CLIPModel, float32, eval, all params perturbed
    sd = hf_to_openai_state_dict(hf)                # same weights under OpenAI key names
    g, tok = hf_image_features(hf, images_nhwc)     # numpy: projected CLS, all tokens projected
    g, tok = hf_text_features(hf, token_ids)        # numpy: projected EOT (argmax), all tokens
    ids = random_token_ids(rng, batch=3, context=77, vocab=49408)

All token features follow our convention: HF's post_layernorm + visual_projection applied to every
vision token, final_layer_norm (already in last_hidden_state) + text_projection to every text token.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TINY = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4, text_width=64,
            text_layers=2, text_heads=4, embed_dim=32, vocab_size=49408, context_length=77)


def tiny_hf_config(hidden_act: str = "quick_gelu", **overrides):
    """A transformers.CLIPConfig for a tiny OpenAI-style CLIP (eps 1e-5, argmax pooling); hidden_act
    "quick_gelu" (OpenAI) or "gelu" (open_clip / LAION) in both towers."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    c = {**TINY, **overrides}
    text = CLIPTextConfig(vocab_size=c["vocab_size"], hidden_size=c["text_width"],
                          intermediate_size=4 * c["text_width"], projection_dim=c["embed_dim"],
                          num_hidden_layers=c["text_layers"], num_attention_heads=c["text_heads"],
                          max_position_embeddings=c["context_length"], hidden_act=hidden_act,
                          layer_norm_eps=1e-5, eos_token_id=2, bos_token_id=c["vocab_size"] - 2, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=c["vision_width"], intermediate_size=4 * c["vision_width"],
                              projection_dim=c["embed_dim"], num_hidden_layers=c["vision_layers"],
                              num_attention_heads=c["vision_heads"], image_size=c["image_size"],
                              patch_size=c["patch_size"], hidden_act=hidden_act, layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=c["embed_dim"])


def tiny_hf_clip(seed: int = 0, **overrides):
    """Random tiny transformers.CLIPModel (float32, eval). Every parameter gets extra random noise so
    LayerNorm scales/biases and all biases are non-trivial (a wrong mapping cannot hide)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_hf_config(**overrides)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def hf_to_openai_state_dict(model) -> dict:
    """The weights of a transformers.CLIPModel under OpenAI CLIP key names (torch tensors)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}

    def blocks(src, dst):
        i = 0
        while f"{src}.{i}.layer_norm1.weight" in sd:
            s, d = f"{src}.{i}", f"{dst}.{i}"
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                out[f"{d}.{b}.weight"] = sd[f"{s}.{a}.weight"]
                out[f"{d}.{b}.bias"] = sd[f"{s}.{a}.bias"]
            out[f"{d}.attn.in_proj_weight"] = torch.cat([sd[f"{s}.self_attn.{n}_proj.weight"] for n in "qkv"], 0)
            out[f"{d}.attn.in_proj_bias"] = torch.cat([sd[f"{s}.self_attn.{n}_proj.bias"] for n in "qkv"], 0)
            i += 1

    v, t = "vision_model", "text_model"
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    for a, b in ((f"{v}.pre_layrnorm", "visual.ln_pre"), (f"{v}.post_layernorm", "visual.ln_post"),
                 (f"{t}.final_layer_norm", "ln_final")):
        out[f"{b}.weight"], out[f"{b}.bias"] = sd[f"{a}.weight"], sd[f"{a}.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"]
    blocks(f"{v}.encoder.layers", "visual.transformer.resblocks")
    blocks(f"{t}.encoder.layers", "transformer.resblocks")
    return out


def bilinear_resize_pos_torch(pos: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """[1+g0*g1, C] -> [1+n0*n1, C] with torch F.interpolate(bilinear, align_corners=False)."""
    c = pos.shape[-1]
    grid = pos[1:].reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, c)], 0)


@torch.no_grad()
def hf_image_features(model, images_nhwc: np.ndarray):
    """NHWC float images -> (global [B,D], tokens [B,L,D]) numpy, ours-convention. Non-square or
    non-native sizes use the position embedding resized by torch bilinear interpolation."""
    x = torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2).contiguous()
    vm = model.vision_model
    emb = vm.embeddings
    h, w = x.shape[-2:]
    native = emb.image_size // emb.patch_size
    new_grid = (h // emb.patch_size, w // emb.patch_size)
    interpolate = new_grid != (native, native)
    if interpolate:
        resized = bilinear_resize_pos_torch(emb.position_embedding.weight, (native, native), new_grid)
        emb.interpolate_pos_encoding = lambda embeddings, height, width: resized[None]
    try:
        out = vm(pixel_values=x, interpolate_pos_encoding=interpolate)
    finally:
        if interpolate:
            del emb.interpolate_pos_encoding
    tokens = model.visual_projection(vm.post_layernorm(out.last_hidden_state))
    pooled = model.visual_projection(out.pooler_output)
    return pooled.numpy(), tokens.numpy()


@torch.no_grad()
def hf_text_features(model, token_ids: np.ndarray):
    """int token ids [B,T] -> (global [B,D], tokens [B,T,D]) numpy (pooled by HF = EOT/argmax)."""
    ids = torch.from_numpy(np.asarray(token_ids, np.int64))
    out = model.text_model(input_ids=ids)
    tokens = model.text_projection(out.last_hidden_state)
    pooled = model.text_projection(out.pooler_output)
    return pooled.numpy(), tokens.numpy()


def random_token_ids(rng: np.random.Generator, batch: int, context: int = 77, vocab: int = 49408) -> np.ndarray:
    """CLIP-like ids [batch, context] int32: SOT, 1..context-2 random words, EOT, zero padding."""
    ids = np.zeros((batch, context), np.int32)
    for b in range(batch):
        n = int(rng.integers(1, context - 1))
        ids[b, 0] = vocab - 2
        ids[b, 1:1 + n] = rng.integers(1, vocab - 3, size=n)
        ids[b, 1 + n] = vocab - 1
    return ids


class _Node(torch.nn.Module):
    """Parameter holder for `save_torchscript`; identity forward so it can be scripted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state_dict: dict, path: str) -> str:
    """Save a TorchScript archive whose `.state_dict()` is `state_dict` (like OpenAI's ViT-B-16.pt)."""
    root = _Node()
    for key, value in state_dict.items():
        *mods, leaf = key.split(".")
        node = root
        for name in mods:
            if not hasattr(node, name):
                node.add_module(name, _Node())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    torch.jit.script(root).save(path)
    return path
