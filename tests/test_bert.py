"""Flax BERT tower (xmr_jax.models.bert) and `load_bert` vs transformers' torch BertModel, built offline
from a tiny random BertConfig: last hidden state (float32, max abs diff <= 1e-5), the first-N-layers
cut, the other file layouts of Hugging Face BERT weights, and errors naming the file/key/field.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from xmr_jax.convert.core import CheckpointMismatchError  # noqa: E402
from xmr_jax.convert.tgdt import load_bert, load_bert_for  # noqa: E402
from xmr_jax.models.bert import Bert  # noqa: E402
from xmr_jax.models.tgdt_regions import tgdt_regions_from_config  # noqa: E402

ATOL = 1e-5
CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=16, type_vocab_size=2, hidden_act="gelu")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**CONFIG, attn_implementation="eager"))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # LayerNorm 1/0 and zero biases would hide mapping mistakes
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def hf_bert():
    return tiny_bert()


@pytest.fixture(scope="module")
def folder(hf_bert, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bert"))
    hf_bert.save_pretrained(path)
    return path


def token_ids(lengths=(9, 4, 6), pad_to=9, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), pad_to), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, CONFIG["vocab_size"], size=n)
    return ids


def hf_hidden(hf, ids, layer=None):
    with torch.no_grad():
        out = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(ids != 0).long(), output_hidden_states=True)
    return (out.last_hidden_state if layer is None else out.hidden_states[layer]).numpy()


def test_last_hidden_state_matches_transformers(hf_bert, folder):
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    model, params = load_bert(folder, num_layers=3)
    assert isinstance(model, Bert) and (model.num_layers, model.num_heads, model.hidden_size) == (3, 2, 16)
    ids = token_ids()
    got = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, jnp.asarray(ids, jnp.int32)))
    want = hf_hidden(hf_bert, ids)
    assert got.dtype == np.float32 and got.shape == want.shape == (3, 9, 16)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)   # padded positions included
    assert np.abs(want).mean() > 0.1


def test_first_layers_only(hf_bert, folder):
    """num_layers=2 is BertModel cut to 2 layers (TGDT: num_hidden_layers=6 of 12) = hidden_states[2]."""
    model, params = load_bert(folder, num_layers=2)
    assert sorted(k for k in params if k.startswith("layer_")) == ["layer_0", "layer_1"]
    ids = token_ids(seed=1)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, hf_hidden(hf_bert, ids, layer=2), atol=ATOL, rtol=0)
    assert np.abs(got - hf_hidden(hf_bert, ids)).max() > 1e-2


def test_padding_is_masked(folder):
    """A caption's outputs at its real positions do not depend on how far it is padded."""
    model, params = load_bert(folder, num_layers=3)
    short = token_ids(lengths=(5,), pad_to=5)
    long = token_ids(lengths=(5,), pad_to=12)
    a = np.asarray(model.apply({"params": params}, jnp.asarray(short, jnp.int32)))
    b = np.asarray(model.apply({"params": params}, jnp.asarray(long, jnp.int32)))
    np.testing.assert_allclose(a, b[:, :5], atol=1e-6)


def test_pretraining_layout_with_gamma_beta(hf_bert, folder, tmp_path):
    """The original bert-base-uncased files: 'bert.' prefix, LayerNorm gamma/beta, cls.* heads, .bin."""
    sd = {}
    for k, v in hf_bert.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd["bert." + k] = v
    sd["cls.predictions.bias"] = torch.zeros(CONFIG["vocab_size"])
    sd["bert.embeddings.position_ids"] = torch.arange(CONFIG["max_position_embeddings"])[None]
    torch.save(sd, str(tmp_path / "pytorch_model.bin"))
    with open(tmp_path / "config.json", "w") as fh:
        json.dump({**CONFIG, "model_type": "bert"}, fh)
    _, params = load_bert(str(tmp_path), num_layers=3)
    _, want = load_bert(folder, num_layers=3)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(params) == jax.tree.structure(want)


def test_bfloat16_compute(folder, hf_bert):
    model, params = load_bert(folder, num_layers=3, dtype="bfloat16")
    ids = token_ids(seed=2)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, hf_hidden(hf_bert, ids), atol=0.1, rtol=0)


def test_load_bert_for_tgdt_regions(folder):
    model = tgdt_regions_from_config({"preset": "tiny", "vocab_size": 50, "text_width": 16, "text_layers": 2,
                                      "text_heads": 2, "text_mlp_dim": 32, "max_position_embeddings": 16})
    params = load_bert_for(model, folder)
    assert sorted(k for k in params if k.startswith("layer_")) == ["layer_0", "layer_1"]
    with pytest.raises(CheckpointMismatchError, match="hidden_size=16 but the model's text_width is 32"):
        load_bert_for(model.clone(text_width=32), folder)


def test_errors_name_the_problem(hf_bert, folder, tmp_path):
    with pytest.raises(ValueError, match=r"num_layers=4, but the weights hold 3 layers"):
        load_bert(folder, num_layers=4)
    with pytest.raises(FileNotFoundError, match="BERT folder not found"):
        load_bert(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_bert(str(tmp_path))
    with open(tmp_path / "config.json", "w") as fh:
        json.dump({**CONFIG, "hidden_act": "gelu_new"}, fh)
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        load_bert(str(tmp_path))
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(CONFIG, fh)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_bert(str(tmp_path))
    sd = dict(hf_bert.state_dict())
    sd["encoder.layer.1.output.dense.weight"] = torch.zeros(16, 30)
    torch.save(sd, str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(CheckpointMismatchError,
                       match=r"encoder\.layer\.1\.output\.dense\.weight.*expected \(16, 32\), got \(16, 30\)"):
        load_bert(str(tmp_path), num_layers=3)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        model, params = load_bert(folder, num_layers=1)
        model.apply({"params": params}, jnp.ones((1, 17), jnp.int32))
