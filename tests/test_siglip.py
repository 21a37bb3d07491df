"""SigLIP: towers and import against transformers' torch SiglipModel, the sigmoid loss (dense and
chunked across 8 simulated devices, value and gradient), and the "siglip" family through the trainer."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests.train_fixtures import CONTEXT, batch_for_step, iterator_from, tiny_config
from xmr_jax import losses, parallel, train
from xmr_jax.models import families

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 49408  # CLIP BPE ids (the trainer fixtures' captions) fit


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random transformers SiglipModel (16x16 images, patch 8, width 32) saved to a folder."""
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8))
    model = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():  # move every parameter off its init value (LN scales 1, biases 0, ...)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("siglip_hf")
    model.save_pretrained(folder)
    return str(folder), model


def test_hf_siglip_import_matches_transformers(hf_folder):
    from xmr_jax.convert.siglip import load_hf_siglip

    folder, ref = hf_folder
    model, params = load_hf_siglip(folder)
    assert model.activation == "gelu_pytorch_tanh" and model.layer_norm_eps == 1e-6 and model.pad_id == 1
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    ids = rng.integers(0, VOCAB, (3, CONTEXT))
    ids[0, 5:] = 1  # a padded caption: pooled at the last (padding) position, as transformers does
    with torch.no_grad():
        want_img = ref.get_image_features(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).pooler_output
        want_txt = ref.get_text_features(input_ids=torch.tensor(ids)).pooler_output
        want_logits = ref(input_ids=torch.tensor(ids),
                          pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).logits_per_image
    got_img, img_tokens, img_mask = model.apply({"params": params}, images, method="encode_image")
    got_txt, txt_tokens, txt_mask = model.apply({"params": params}, ids, method="encode_text")
    np.testing.assert_allclose(np.asarray(got_img), want_img.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_txt), want_txt.numpy(), atol=1e-5)
    assert img_tokens.shape == (3, 4, 32) and bool(img_mask.all())
    assert txt_tokens.shape == (3, CONTEXT, 32) and not bool(txt_mask[0, 5:].any()) and bool(txt_mask[0, :5].all())
    # logits exp(t') cos + b with the imported temperature and bias
    from xmr_jax.similarity import l2_normalize

    cos = l2_normalize(got_img) @ l2_normalize(got_txt).T
    logits = cos * np.exp(params["logit_scale"]) + params["logit_bias"]
    np.testing.assert_allclose(np.asarray(logits), want_logits.numpy(), atol=1e-5)


def test_hf_siglip_import_resizes_positions_and_refuses_other_folders(hf_folder, tmp_path):
    from xmr_jax.convert.siglip import load_hf_siglip

    folder, _ = hf_folder
    model, params = load_hf_siglip(folder, image_size=(32, 16))
    assert params["vision"]["position_embedding"].shape == (8, 32)
    g, tokens, _ = model.apply({"params": params}, np.zeros((1, 32, 16, 3), np.float32), method="encode_image")
    assert g.shape == (1, 32) and tokens.shape == (1, 8, 32) and np.isfinite(np.asarray(g)).all()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type='clip', expected 'siglip'"):
        load_hf_siglip(str(tmp_path))


def _features(batch=16, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, dim)).astype(np.float32)
    y = (x + 0.5 * rng.standard_normal((batch, dim))).astype(np.float32)
    return x, y, rng.integers(0, 5, batch).astype(np.int32)


def test_sigmoid_loss_matches_its_definition():
    x, y, ids = _features(6, 4)
    t, b = 1.7, -3.0
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    logits = xn @ yn.T * np.exp(t) + b
    for labels_ids, got in ((np.arange(6), losses.sigmoid_loss(x, y, t, b)),
                            (ids, losses.sigmoid_loss(x, y, t, b, ids=ids))):
        z = np.where(labels_ids[:, None] == labels_ids[None, :], 1.0, -1.0)
        want = np.sum(np.log1p(np.exp(-z * logits))) / 6
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2)])
@pytest.mark.parametrize("with_ids", [False, True])
def test_chunked_sigmoid_loss_and_gradient_equal_the_dense_loss_on_8_devices(mesh_shape, with_ids):
    assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
    mesh = parallel.make_mesh(*mesh_shape)
    x, y, ids = _features(16, 8)
    ids = ids if with_ids else None
    dense = jax.value_and_grad(lambda *a: losses.sigmoid_loss(*a, ids=ids), argnums=(0, 1, 2, 3))
    chunked = jax.jit(jax.value_and_grad(lambda *a: losses.chunked_sigmoid_loss(*a, mesh, ids=ids),
                                         argnums=(0, 1, 2, 3)))
    sharded = jax.device_put((x, y), parallel.batch_sharding(mesh))  # as the trainer holds the batch
    v_dense, g_dense = dense(x, y, 1.3, -2.0)
    v_chunk, g_chunk = chunked(*sharded, 1.3, -2.0)
    np.testing.assert_allclose(float(v_chunk), float(v_dense), rtol=1e-6)
    for a, b in zip(g_chunk, g_dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="batch 12 is not divisible by the 8 devices"):
        losses.chunked_sigmoid_loss(x[:12], y[:12], 1.0, 0.0, mesh)


@pytest.fixture
def siglip_registered():
    from xmr_jax.models import siglip_family

    old = families.FAMILIES.get("siglip")
    families.register(siglip_family.FAMILY)
    yield siglip_family.FAMILY
    if old is None:
        families.unregister("siglip")
    else:
        families.FAMILIES["siglip"] = old


def _siglip_config(folder=""):
    config = tiny_config(model_family="siglip", loss_names="sigmoid+id")
    del config.model["clip"]
    config.model.siglip = {"preset": "tiny", "context_length": CONTEXT} if not folder else {}
    config.model.init_checkpoint = folder
    config.model.positives = "pid"
    config.data.context_length = CONTEXT
    config.num_epochs = 1
    config.log_every = 1
    return config


def test_siglip_family_trains_two_steps_from_a_hf_folder(siglip_registered, hf_folder, tmp_path):
    from xmr_jax.convert.siglip import load_hf_siglip

    folder, _ = hf_folder
    config = _siglip_config(folder)
    train.validate_config(config)
    family = families.get_family("siglip")
    result = train.train(config, str(tmp_path), iterator_from, steps_per_epoch=2)
    assert int(result.state.step) == 2
    assert set(result.state.params) == {"base_model", "classifier"}

    # step 1 ran on the imported weights: its logged (chunked, 8-device) loss is the dense loss of
    # the HF towers with a fresh classifier on batch 1
    model = family.build(config)
    init = train.init_params(model, config, jax.random.PRNGKey(config.seed))
    _, hf_params = load_hf_siglip(folder)
    params = {**init, "base_model": hf_params}
    batch = batch_for_step(1)
    outputs = model.apply({"params": params}, batch)
    dense_config = _siglip_config(folder)
    dense_config.model.sigmoid_impl = "dense"
    want, parts = family.loss_fn(dense_config)(outputs, batch)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    np.testing.assert_allclose(train_rows[0]["sigmoid_loss"], float(parts["sigmoid_loss"]), rtol=1e-4)
    np.testing.assert_allclose(train_rows[0]["loss"], float(want), rtol=1e-4)
    moved = np.asarray(result.state.params["base_model"]["logit_bias"])
    assert moved != np.float32(hf_params["logit_bias"])

    # the person evaluator encodes with the SigLIP towers: its metrics are those of the cosine
    # similarity of the trained globals
    from tests.train_fixtures import reference_person_metrics
    from xmr_jax import evaluate
    from xmr_jax.similarity import l2_normalize

    trained = jax.device_get(result.state.params)
    valid = np.ones(8, bool)
    gallery = lambda: iter([{"images": batch["images"], "pids": batch["pids"], "image_ids": batch["image_ids"],
                             "valid": valid}])
    queries = lambda: iter([{"text_ids": batch["text_ids"], "pids": batch["pids"], "image_ids": batch["image_ids"],
                             "valid": valid}])
    evaluator = evaluate.Evaluator.for_config(model, parallel.make_mesh(-1, 1), gallery, queries, config)
    assert evaluator.kind == "person"
    metrics = evaluator.run(trained)
    img = model.apply({"params": trained}, batch["images"], method="encode_image")[0]
    txt = model.apply({"params": trained}, batch["text_ids"], method="encode_text")[0]
    sim = np.asarray(l2_normalize(txt) @ l2_normalize(img).T)
    want_metrics = reference_person_metrics(sim, batch["pids"], batch["pids"])
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-3), key


def test_siglip_family_validation_names_the_field(siglip_registered):
    config = _siglip_config()
    config.model.sigmoid_impl = "ring"
    with pytest.raises(ValueError, match="config.model.sigmoid_impl='ring'"):
        train.validate_config(config)
    config = _siglip_config()
    config.loss_names = "id"
    with pytest.raises(ValueError, match="needs the 'sigmoid' loss"):
        train.validate_config(config)
    config = _siglip_config()
    config.data.context_length = 77
    with pytest.raises(ValueError, match="config.data.context_length=77 differs"):
        train.validate_config(config)


def test_local_tokenizer_folder_gives_padded_ids(siglip_registered, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 1, "<unk>": 2, "a": 3, "man": 4, "in": 5, "red": 6, "</s>": 7, "<x>": 0}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    config = _siglip_config()
    config.model.tokenizer = str(tmp_path)
    spec = siglip_registered.text(config)
    ids = spec.tokenizer(6).encode(["a man in red", "a dog"])
    np.testing.assert_array_equal(ids, [[3, 4, 5, 6, 1, 1], [3, 2, 1, 1, 1, 1]])
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(spec.pad_caption(6), [1] * 6)
    config.model.tokenizer = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.model.tokenizer="):
        train.validate_config(config)


def test_siglip_configs_build_and_name_a_missing_checkpoint(siglip_registered):
    from configs.irra import cuhk_pedes_siglip
    from configs.siglip import flickr30k

    person = cuhk_pedes_siglip.get_config("init=/nonexistent/siglip,batch_size=8")
    assert (person.model_family, person.loss_names, person.model.positives) == ("siglip", "sigmoid+id", "pid")
    assert person.model.tokenizer == "/nonexistent/siglip" and person.data.image_size == (384, 128)
    caption = flickr30k.get_config("init=/nonexistent/siglip")
    assert (caption.loss_names, caption.model.positives, caption.evals.eval.kind) == ("sigmoid", "image_id", "caption")
    for config in (person, caption):
        with pytest.raises(FileNotFoundError, match="config.model.init_checkpoint='/nonexistent/siglip'"):
            siglip_registered.validate(config)


def test_caption_evaluator_runs_on_siglip_towers(siglip_registered):
    """config.evals kind "caption" (configs/siglip/flickr30k.py): global R@K both ways equal those
    of the towers' cosine similarity (one caption per image here)."""
    from xmr_jax import evaluate
    from xmr_jax.similarity import l2_normalize

    config = _siglip_config()
    config.loss_names = "sigmoid"
    config.evals.eval.kind = "caption"
    spec = [s for s in evaluate.evaluator_specs(config) if s.name == "eval"][0]
    model = siglip_registered.build(config)
    params = train.init_params(model, config, jax.random.PRNGKey(0))
    batch, valid = batch_for_step(1), np.ones(8, bool)
    keys = ("pids", "image_ids")
    gallery = lambda: iter([{"images": batch["images"], **{k: batch[k] for k in keys}, "valid": valid}])
    queries = lambda: iter([{"text_ids": batch["text_ids"], **{k: batch[k] for k in keys}, "valid": valid}])
    evaluator = evaluate.Evaluator.for_config(model, parallel.make_mesh(-1, 1), gallery, queries, config, spec)
    assert evaluator.kind == "caption"
    got = evaluator.run(params)["global"]
    img = model.apply({"params": params}, batch["images"], method="encode_image")[0]
    txt = model.apply({"params": params}, batch["text_ids"], method="encode_text")[0]
    sim = np.asarray(l2_normalize(img) @ l2_normalize(txt).T)  # [image, caption], caption i of image i
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        rank = np.array([np.sum(row > row[i]) for i, row in enumerate(s)])  # 0 = the match is first
        for k in (1, 5, 10):
            assert got[f"{name}_R{k}"] == pytest.approx(100.0 * np.mean(rank < k)), (name, k)


def test_family_loss_runs_chunked_on_the_mesh_in_context(siglip_registered):
    """Under `jax.set_mesh` (here 4 of the 8 devices) the family's chunked loss runs on that mesh."""
    config = _siglip_config()
    config.loss_names = "sigmoid"
    x, y, ids = _features(8, 8)
    rows = {"image_feats": x, "text_feats": y, "pids": ids}
    want = losses.sigmoid_loss(x, y, 1.1, -2.0, ids=ids)
    mesh = parallel.make_mesh(4, 1, devices=jax.devices()[:4])
    loss = siglip_registered.loss_fn(config)
    with jax.set_mesh(mesh):
        placed = jax.device_put(rows, parallel.batch_sharding(mesh))
        outputs = {"image_feats": placed["image_feats"], "text_feats": placed["text_feats"],
                   "logit_scale": np.float32(1.1), "logit_bias": np.float32(-2.0)}
        got, parts = jax.jit(loss)(outputs, {"pids": placed["pids"]})
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert set(parts) == {"sigmoid_loss"}
