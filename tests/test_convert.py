"""Checkpoint import/export: parity with transformers.CLIPModel (float32, <= 1e-5), OpenAI key layout,
positional-embedding resize vs torch, error messages, CLI and formats, HF export round trip; GELU
(open_clip / LAION-style) CLIPs as HF folders and as open_clip state dicts."""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import torch_reference as ref  # noqa: E402
from xmr_jax.convert import (CheckpointMismatchError, hf_state_dict_to_params, load_clip,  # noqa: E402
                             load_open_clip, open_clip_state_dict_to_params, openai_state_dict_to_params,
                             resize_positional_embedding, to_hf_clip)
from xmr_jax.convert.__main__ import main as convert_main  # noqa: E402
from xmr_jax.models.clip import clip_from_config, clip_param_shapes  # noqa: E402

TOL = 1e-5
HEADS = dict(vision_heads=4, text_heads=4)  # tiny model: heads != width // 64


@functools.partial(jax.jit, static_argnums=0)
def run(model, params, images, ids):
    return model.apply({"params": params}, images, ids)


def _image_only(model, params, images):
    return jax.jit(functools.partial(model.apply, method="encode_image"))({"params": params}, images)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def hf():
    return ref.tiny_hf_clip(seed=0)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 32, 32, 3)).astype(np.float32), ref.random_token_ids(rng, 3)


@pytest.fixture(scope="module")
def converted(hf):
    return hf_state_dict_to_params(hf.state_dict(), hf.config)


@pytest.fixture(scope="module")
def openai_pt(hf, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("openai") / "tiny_clip.pt")
    torch.save(ref.hf_to_openai_state_dict(hf), path)
    return path


# ---------------------------------------------------------------- positional embedding resize


@pytest.mark.parametrize("old,new", [((14, 14), (24, 8)), ((4, 4), (6, 10)), ((3, 5), (3, 5))])
def test_resize_positional_embedding_matches_torch(old, new):
    c = 32
    pos = (np.random.default_rng(0).standard_normal((1 + old[0] * old[1], c)) * c ** -0.5).astype(np.float32)
    out = resize_positional_embedding(pos, old, new)
    want = ref.bilinear_resize_pos_torch(torch.from_numpy(pos), old, new).numpy()
    assert out.shape == (1 + new[0] * new[1], c) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], pos[0])
    assert np.abs(out - want).max() <= 1e-6
    with pytest.raises(ValueError, match="expected shape"):
        resize_positional_embedding(pos[1:], old, new)


# ---------------------------------------------------------------- parity with transformers


def test_hf_import_matches_torch_square(hf, converted, inputs):
    model, params = converted
    assert model.image_size == (32, 32) and model.vision_heads == 4 and model.embed_dim == 32
    images, ids = inputs
    (ig, itok, _), (tg, ttok, _) = run(model, params, images, ids)
    rg, rtok = ref.hf_image_features(hf, images)
    assert np.abs(ig - rg).max() <= TOL and np.abs(itok - rtok).max() <= TOL
    rg, rtok = ref.hf_text_features(hf, ids)
    assert np.abs(tg - rg).max() <= TOL and np.abs(ttok - rtok).max() <= TOL
    # the reference itself is consistent with CLIPModel's own embeddings
    with torch.no_grad():
        emb = hf.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    emb = getattr(emb, "pooler_output", emb)
    np.testing.assert_allclose(emb.numpy(), rg, atol=1e-6)


def test_hf_import_non_square_matches_torch_interpolation(hf):
    model, params = hf_state_dict_to_params(hf.state_dict(), hf.config, image_size=(48, 32))
    assert params["visual"]["positional_embedding"].shape == (1 + 6 * 4, 64)
    images = np.random.default_rng(1).standard_normal((2, 48, 32, 3)).astype(np.float32)
    g, tok, _ = _image_only(model, params, images)
    rg, rtok = ref.hf_image_features(hf, images)
    assert np.abs(g - rg).max() <= TOL and np.abs(tok - rtok).max() <= TOL


# ---------------------------------------------------------------- OpenAI format, load_clip


def test_openai_import_equals_hf_import(hf, converted, openai_pt, tmp_path):
    _, params = converted
    sd = ref.hf_to_openai_state_dict(hf)
    model, p_openai = openai_state_dict_to_params(sd, **HEADS)
    assert model.fields() == converted[0].fields()
    _assert_tree_equal(p_openai, params)
    model2, p_file = load_clip(openai_pt, **HEADS)
    assert model2 == model
    _assert_tree_equal(p_file, params)
    scripted = ref.save_torchscript(sd, str(tmp_path / "ViT-tiny.pt"))
    assert isinstance(torch.jit.load(scripted), torch.jit.ScriptModule)
    _assert_tree_equal(load_clip(scripted, **HEADS)[1], params)
    # default heads follow OpenAI's width // 64 rule
    assert openai_state_dict_to_params(sd)[0].vision_heads == 1
    # a prefixed (IRRA-style) dict with foreign keys outside the prefix
    wrapped = {**{f"base_model.{k}": v for k, v in sd.items()}, "classifier.weight": torch.zeros(3, 4)}
    _assert_tree_equal(openai_state_dict_to_params(wrapped, prefix="base_model.", **HEADS)[1], params)


def test_openai_non_square_checkpoint(hf):
    """IRRA-style checkpoint whose positional embedding is already on a 6x4 grid (48x32 input)."""
    sd = ref.hf_to_openai_state_dict(hf)
    sd["visual.positional_embedding"] = ref.bilinear_resize_pos_torch(sd["visual.positional_embedding"], (4, 4), (6, 4))
    with pytest.raises(ValueError, match="source_image_size"):
        openai_state_dict_to_params(sd, **HEADS)
    model, params = openai_state_dict_to_params(sd, source_image_size=(48, 32), **HEADS)
    assert model.image_size == (48, 32)
    np.testing.assert_array_equal(params["visual"]["positional_embedding"], sd["visual.positional_embedding"].numpy())
    _, want = hf_state_dict_to_params(hf.state_dict(), hf.config, image_size=(48, 32))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_load_clip_hf_folder_scan_and_resize(hf, converted, tmp_path):
    hf.save_pretrained(str(tmp_path))
    model, params = load_clip(str(tmp_path))
    _assert_tree_equal(params, converted[1])
    model, params = load_clip(str(tmp_path), image_size=(48, 32), scan_layers=True, dtype="bfloat16")
    assert model.scan_layers and model.image_size == (48, 32)
    shapes = jax.tree.map(lambda s: s.shape, clip_param_shapes(model))
    assert shapes == jax.tree.map(np.shape, params)
    assert params["visual"]["transformer"]["resblocks"]["ln_1"]["scale"].shape == (2, 64)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip(str(tmp_path / "nowhere.pt"))


# ---------------------------------------------------------------- error messages


def test_mismatch_errors_name_key_and_shapes(hf):
    sd = ref.hf_to_openai_state_dict(hf)
    bad = dict(sd)
    del bad["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing.*visual\.transformer\.resblocks\.1\.mlp\.c_fc\.bias "
                                                      r"\(expected shape \(256,\)\)"):
        openai_state_dict_to_params(bad, **HEADS)
    bad = {**sd, "visual.extra_head.weight": torch.zeros(5, 7)}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*visual\.extra_head\.weight \(shape \(5, 7\)\)"):
        openai_state_dict_to_params(bad, **HEADS)
    bad = {**sd, "visual.ln_post.weight": torch.zeros(32)}
    with pytest.raises(ValueError, match=r"'visual\.ln_post\.weight'.*expected \(64,\), got \(32,\)"):
        openai_state_dict_to_params(bad, **HEADS)
    hsd = dict(hf.state_dict())
    hsd["text_projection.weight"] = torch.zeros(32, 48)
    with pytest.raises(ValueError, match=r"'text_projection\.weight'.*expected \(32, 64\), got \(32, 48\)"):
        hf_state_dict_to_params(hsd, hf.config)
    cfg = hf.config.to_dict()
    cfg["vision_config"]["hidden_act"] = "gelu_new"
    with pytest.raises(ValueError, match=r"vision_config\.hidden_act = 'gelu_new': expected one of \('quick_gelu', "
                                         r"'gelu'\)"):
        hf_state_dict_to_params(hf.state_dict(), cfg)
    cfg["vision_config"]["hidden_act"] = "gelu"   # text_config keeps quick_gelu
    with pytest.raises(ValueError, match="vision_config.hidden_act = 'gelu' but text_config.hidden_act = 'quick_gelu'"):
        hf_state_dict_to_params(hf.state_dict(), cfg)
    with pytest.raises(ValueError, match="unknown model override"):
        openai_state_dict_to_params(sd, vision_head=4)


# ---------------------------------------------------------------- CLI and our own format


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_cli_writes_loadable_output(openai_pt, tmp_path, fmt):
    out = str(tmp_path / "converted")
    rc = convert_main(["--input", openai_pt, "--output", out, "--image_size", "48,32", "--format", fmt,
                       "--vision_heads", "4", "--text_heads", "4"])
    assert rc == 0
    meta = json.load(open(os.path.join(out, "xmr_clip.json")))
    assert meta["fields"]["image_size"] == [48, 32] and meta["params_format"] == fmt
    model, params = load_clip(out)
    want_model, want = load_clip(openai_pt, image_size=(48, 32), **HEADS)
    assert model == want_model
    _assert_tree_equal(params, want)
    assert convert_main(["--input", str(tmp_path / "missing.pt"), "--output", out]) == 2
    if fmt == "orbax":  # the trainer's checkpoint layout, replaced when converted again
        assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["0"]
        assert convert_main(["--input", openai_pt, "--output", out, "--image_size", "48,32", "--format", fmt,
                             "--vision_heads", "4", "--text_heads", "4"]) == 0
        _assert_tree_equal(load_clip(out)[1], want)
        shutil.rmtree(os.path.join(out, "checkpoints"))
        with pytest.raises(FileNotFoundError, match="params_format 'orbax' but there is no checkpoints/"):
            load_clip(out)


# ---------------------------------------------------------------- export to transformers


def test_to_hf_clip_round_trip(tmp_path, inputs):
    from transformers import CLIPModel

    model = clip_from_config({"preset": "tiny"})
    rng = np.random.default_rng(5)

    def draw(path, s):
        x = 0.05 * rng.standard_normal(s.shape).astype(np.float32)
        return x + 1.0 if path[-1].key == "scale" else x

    params = jax.tree_util.tree_map_with_path(draw, clip_param_shapes(model))
    out = to_hf_clip(model, params, str(tmp_path / "hf"))
    hf = CLIPModel.from_pretrained(out).float().eval()
    assert hf.config.text_config.hidden_act == "quick_gelu"
    np.testing.assert_allclose(float(hf.logit_scale.detach()), np.log(1 / 0.07), rtol=1e-6)
    images, ids = inputs
    (ig, itok, _), (tg, ttok, _) = run(model, params, images, ids)
    rg, rtok = ref.hf_image_features(hf, images)
    assert np.abs(ig - rg).max() <= TOL and np.abs(itok - rtok).max() <= TOL
    rg, rtok = ref.hf_text_features(hf, ids)
    assert np.abs(tg - rg).max() <= TOL and np.abs(ttok - rtok).max() <= TOL
    model2, params2 = load_clip(out)
    assert model2 == model
    _assert_tree_equal(params2, params)
    with pytest.raises(ValueError, match="square"):
        to_hf_clip(model.clone(image_size=(48, 32)), params, str(tmp_path / "bad"))


# ---------------------------------------------------------------- GELU CLIPs (open_clip / LAION / DataComp)


def _tiny_gelu_hf_clip(seed: int = 3):
    """Tiny random transformers.CLIPModel with hidden_act="gelu" (exact) in both towers, every parameter
    perturbed as in torch_reference.tiny_hf_clip."""
    model = ref.tiny_hf_clip(seed, hidden_act="gelu")
    assert model.config.vision_config.hidden_act == model.config.text_config.hidden_act == "gelu"
    return model


@pytest.fixture(scope="module")
def hf_gelu():
    return _tiny_gelu_hf_clip()


def _open_clip_state_dict(hf_model) -> dict:
    """The weights under open_clip's key names: open_clip's CLIP keeps OpenAI's layout (conv1 without
    bias, packed attn.in_proj_weight [3w, w], text_projection [w, D] matrix), plus the causal
    `attn_mask` buffer older open_clip versions saved."""
    sd = ref.hf_to_openai_state_dict(hf_model)
    ctx = sd["positional_embedding"].shape[0]
    sd["attn_mask"] = torch.full((ctx, ctx), float("-inf")).triu_(1)
    return sd


def _open_clip_config(**vision):
    return {"model_cfg": {"embed_dim": 32,
                          "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                         "head_width": 16, **vision},
                          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4,
                                       "layers": 2}},
            "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073]}}


def _assert_matches_torch(model, params, hf_model, images, ids):
    (ig, itok, _), (tg, ttok, _) = run(model, params, images, ids)
    rg, rtok = ref.hf_image_features(hf_model, images)
    assert np.abs(ig - rg).max() <= TOL and np.abs(itok - rtok).max() <= TOL
    rg, rtok = ref.hf_text_features(hf_model, ids)
    assert np.abs(tg - rg).max() <= TOL and np.abs(ttok - rtok).max() <= TOL


def test_hf_gelu_folder_matches_torch(hf_gelu, inputs, tmp_path):
    hf_gelu.save_pretrained(str(tmp_path))
    model, params = load_clip(str(tmp_path))
    assert model.activation == "gelu" and model.vision_heads == 4
    images, ids = inputs
    _assert_matches_torch(model, params, hf_gelu, images, ids)
    # the activation matters: the same weights through QuickGELU towers are far off
    (ig, _, _), (tg, _, _) = run(model.clone(activation="quick_gelu"), params, images, ids)
    rg, _ = ref.hf_image_features(hf_gelu, images)
    assert np.abs(ig - rg).max() > 1e-3
    with pytest.raises(ValueError, match="activation='quick_gelu' was asked for but the Hugging Face config's "
                                         "hidden_act is 'gelu'"):
        load_clip(str(tmp_path), activation="quick_gelu")
    assert load_clip(str(tmp_path), activation="gelu")[0] == model


def test_open_clip_state_dict_matches_torch(hf_gelu, inputs, tmp_path):
    images, ids = inputs
    sd = _open_clip_state_dict(hf_gelu)
    _, want = hf_state_dict_to_params(hf_gelu.state_dict(), hf_gelu.config)
    # hub layout: open_clip_config.json next to open_clip_pytorch_model.bin (read with weights_only=True)
    hub = tmp_path / "hub"
    hub.mkdir()
    torch.save(sd, str(hub / "open_clip_pytorch_model.bin"))
    with open(hub / "open_clip_config.json", "w") as fh:
        json.dump(_open_clip_config(), fh)
    for path in (hub / "open_clip_pytorch_model.bin", hub):
        model, params = load_clip(str(path))
        assert model.activation == "gelu" and (model.vision_heads, model.text_heads) == (4, 4)
        _assert_tree_equal(params, want)
        _assert_matches_torch(model, params, hf_gelu, images, ids)
    # a bare .safetensors with open_clip's names: the activation has to be given
    from safetensors.torch import save_file

    bare = tmp_path / "laion_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bare))
    model, params = load_clip(str(bare), activation="gelu", **HEADS)
    assert model.activation == "gelu"
    _assert_matches_torch(model, params, hf_gelu, images, ids)
    assert load_clip(str(bare), **HEADS)[0].activation == "quick_gelu"   # OpenAI layout: OpenAI's default
    named = tmp_path / "open_clip_model.safetensors"
    shutil.copy(bare, named)
    with pytest.raises(ValueError, match=r"open_clip_model\.safetensors: open_clip weights do not record the MLP "
                                         r"activation; pass activation='gelu'"):
        load_clip(str(named))
    model, params = load_clip(str(named), activation="gelu")     # heads: open_clip's width // 64 default
    assert model.vision_heads == 1 and model.text_heads == 1


def test_open_clip_config_checks(hf_gelu, tmp_path):
    sd = _open_clip_state_dict(hf_gelu)
    cfg = _open_clip_config()
    cfg["model_cfg"]["quick_gelu"] = True
    model, _ = open_clip_state_dict_to_params(sd, config=cfg)
    assert model.activation == "quick_gelu"
    with pytest.raises(ValueError, match="activation='gelu' was asked for but open_clip config: model_cfg's "
                                         "activation is 'quick_gelu'"):
        open_clip_state_dict_to_params(sd, config=cfg, activation="gelu")
    bad = _open_clip_config()
    bad["model_cfg"]["text_cfg"]["width"] = 128
    with pytest.raises(CheckpointMismatchError, match=r"model_cfg\.text_cfg\.width = 128 but the weights have "
                                                      r"text_width = 64"):
        open_clip_state_dict_to_params(sd, config=bad)
    with pytest.raises(ValueError, match=r"vision_cfg\.attentional_pool = True: not supported"):
        open_clip_state_dict_to_params(sd, config=_open_clip_config(attentional_pool=True))
    with pytest.raises(ValueError, match=r"vision_cfg\.timm_model_name = 'vit_base'"):
        open_clip_state_dict_to_params(sd, config=_open_clip_config(timm_model_name="vit_base"))
    with pytest.raises(ValueError, match=r"vision_cfg\.ls_scale = 1: this open_clip option is not supported"):
        open_clip_state_dict_to_params(sd, config=_open_clip_config(ls_scale=1))
    # a layer-scale checkpoint has keys our blocks do not have
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        open_clip_state_dict_to_params({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(64)},
                                       config=_open_clip_config())
    # an open_clip training checkpoint (DDP "module." prefix, optimizer state) with the config given
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
                "scaler": {}}, str(path))
    model, params = load_open_clip(str(path), config=_open_clip_config())
    assert model.activation == "gelu"
    _assert_tree_equal(params, hf_state_dict_to_params(hf_gelu.state_dict(), hf_gelu.config)[1])


def test_gelu_export_and_converted_round_trip(hf_gelu, inputs, tmp_path):
    from transformers import CLIPModel

    from xmr_jax.convert import save_converted

    model, params = open_clip_state_dict_to_params(_open_clip_state_dict(hf_gelu), config=_open_clip_config())
    out = to_hf_clip(model, params, str(tmp_path / "hf"))
    back = CLIPModel.from_pretrained(out).float().eval()
    assert back.config.vision_config.hidden_act == back.config.text_config.hidden_act == "gelu"
    images, ids = inputs
    _assert_matches_torch(model, params, back, images, ids)
    model2, params2 = load_clip(out)
    assert model2 == model
    _assert_tree_equal(params2, params)
    conv = save_converted(model, params, str(tmp_path / "conv"))
    assert json.load(open(os.path.join(conv, "xmr_clip.json")))["fields"]["activation"] == "gelu"
    assert load_clip(conv)[0] == model
    with pytest.raises(ValueError, match="xmr_clip.json's activation is 'gelu'"):
        load_clip(conv, activation="quick_gelu")
    meta = json.load(open(os.path.join(conv, "xmr_clip.json")))   # written before the field existed
    del meta["fields"]["activation"]
    json.dump(meta, open(os.path.join(conv, "xmr_clip.json"), "w"))
    assert load_clip(conv)[0].activation == "quick_gelu"
    # the CLI takes the activation of a bare state dict
    bare = str(tmp_path / "bare.pt")
    torch.save(_open_clip_state_dict(hf_gelu), bare)
    rc = convert_main(["--input", bare, "--output", str(tmp_path / "cli"), "--activation", "gelu",
                       "--vision_heads", "4", "--text_heads", "4"])
    assert rc == 0 and load_clip(str(tmp_path / "cli"))[0] == model



def test_family_init_checkpoint_uses_and_checks_the_config_activation(tmp_path):
    """IRRA's model.init_checkpoint: the config's activation is passed to load_clip, so a checkpoint
    recording another one is refused instead of being run with the wrong MLP."""
    import types

    import ml_collections

    from xmr_jax.convert import save_converted
    from xmr_jax.models.irra import FAMILY

    gelu = clip_from_config({"preset": "tiny", "activation": "gelu"})
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), clip_param_shapes(gelu))
    save_converted(gelu, params, str(tmp_path / "clip"))
    config = ml_collections.ConfigDict({"model": {"init_checkpoint": str(tmp_path / "clip")},
                                        "data": {"image_size": (32, 32)}})
    got = FAMILY.pretrained(types.SimpleNamespace(base_model=gelu), config)
    _assert_tree_equal(got["base_model"], params)
    with pytest.raises(ValueError, match="activation='quick_gelu' was asked for but .*xmr_clip.json's activation is "
                                         "'gelu'"):
        FAMILY.pretrained(types.SimpleNamespace(base_model=gelu.clone(activation="quick_gelu")), config)
