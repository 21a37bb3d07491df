"""IRRA parity with PyTorch: forward outputs and losses, and import of an IRRA `best.pth`.

The reference is tests/torch_irra.py (transformers' CLIP towers + IRRA's heads and losses
in torch), built tiny and random; its weights are converted with xmr_jax.convert.irra.
Tolerance: float32, max abs diff <= 1e-5 on features and losses, <= 2e-5 on the 49408-way logits.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.torch_irra import TorchIRRA, irra_loss
from tests.torch_reference import hf_to_openai_state_dict, random_token_ids, tiny_hf_clip
from xmr_jax.convert.core import CheckpointMismatchError
from xmr_jax.convert.irra import irra_state_dict_to_params, load_irra
from xmr_jax.models.irra import IRRA, compute_losses

NUM_CLASSES = 7
CROSS_DEPTH = 2
HEADS = dict(vision_heads=4, text_heads=4)  # tiny towers: not width // 64, so given explicitly


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (LayerNorm 1/0 and zero biases would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def torch_irra():
    torch.manual_seed(0)
    model = TorchIRRA(tiny_hf_clip(seed=0), NUM_CLASSES, cross_depth=CROSS_DEPTH, cross_heads=2)
    for name in ("cross_attn", "cross_modal_transformer", "ln_pre_t", "ln_pre_i", "ln_post", "mlm_head", "classifier"):
        perturb_(getattr(model, name), seed=len(name))
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = random_token_ids(rng, batch=4, context=77, vocab=49408)
    labels = np.where((rng.random(ids.shape) < 0.3) & (ids > 0) & (ids < 49405), ids, 0).astype(np.int32)
    labels[:, 1] = ids[:, 1]
    mlm_ids = np.where(labels > 0, 49405, ids).astype(np.int32)
    return {
        "images": rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
        "text_ids": ids.astype(np.int32), "mlm_ids": mlm_ids, "mlm_labels": labels,
        "pids": np.array([0, 3, 0, 5], np.int32),
    }


def torch_outputs(model, batch):
    with torch.no_grad():
        out = model(torch.from_numpy(batch["images"]).permute(0, 3, 1, 2),
                    torch.from_numpy(batch["text_ids"]).long(), torch.from_numpy(batch["mlm_ids"]).long())
        total, parts = irra_loss(out, torch.from_numpy(batch["pids"]).long(),
                                 torch.from_numpy(batch["mlm_labels"]).long())
    return {k: v.numpy() for k, v in out.items()}, float(total), {k: float(v) for k, v in parts.items()}


def check_parity(model: IRRA, params, torch_model, batch):
    ours = model.apply({"params": params}, batch)
    ref, ref_total, ref_parts = torch_outputs(torch_model, batch)
    for key in ("image_feats", "text_feats", "image_logits", "text_logits"):
        np.testing.assert_allclose(np.asarray(ours[key]), ref[key], atol=1e-5, rtol=0, err_msg=key)
    np.testing.assert_allclose(np.asarray(ours["mlm_logits"]), ref["mlm_logits"], atol=2e-5, rtol=0)
    total, parts = compute_losses(ours, batch, model.loss_names)
    for name, value in ref_parts.items():
        np.testing.assert_allclose(float(parts[name]), value, atol=1e-5, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(total), ref_total, atol=1e-5, rtol=1e-6)


def test_forward_and_losses_match_torch(torch_irra, batch):
    clip, params, sizes = irra_state_dict_to_params({"model": torch_irra.state_dict()}, **HEADS)
    assert sizes["num_classes"] == NUM_CLASSES and sizes["cross_depth"] == CROSS_DEPTH
    model = IRRA(base_model=clip, loss_names=("sdm", "id", "mlm"), num_classes=NUM_CLASSES,
                 cross_depth=CROSS_DEPTH, cross_heads=2)
    check_parity(model, params, torch_irra, batch)


def _loss_and_grads(model, params, batch):
    def objective(p):
        return compute_losses(model.apply({"params": p}, batch), batch, model.loss_names)
    (total, parts), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return float(total), {k: float(v) for k, v in parts.items()}, grads


@pytest.mark.parametrize("fill", ["sampled", "every_position"])
def test_sparse_mlm_equals_dense_loss_and_gradients(torch_irra, batch, fill):
    """The masked-positions-only MLM (passes of `chunk` targets per caption) equals the dense
    all-positions loss, also for a batch at the maximum masked count (every position a target,
    which needs every pass), and so do the gradients."""
    clip, params, _ = irra_state_dict_to_params(torch_irra.state_dict(), **HEADS)
    if fill == "every_position":
        batch = dict(batch, mlm_labels=np.where(batch["mlm_labels"] > 0, batch["mlm_labels"], 7).astype(np.int32))
    kwargs = dict(base_model=clip, loss_names=("sdm", "id", "mlm"), num_classes=NUM_CLASSES,
                  cross_depth=CROSS_DEPTH, cross_heads=2)
    dense = IRRA(**kwargs)
    total, parts, grads = _loss_and_grads(dense, params, batch)
    most = int((batch["mlm_labels"] != 0).sum(axis=1).max())
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
    for chunk in ((3, most) if fill == "sampled" else (5,)):
        sparse = IRRA(**kwargs, mlm_chunk=chunk, text_length_buckets=(8, 16, 40))
        got_total, got_parts, got_grads = _loss_and_grads(sparse, params, batch)
        np.testing.assert_allclose(got_parts["mlm_loss"], parts["mlm_loss"], rtol=1e-6, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(got_total, total, rtol=1e-6, err_msg=f"chunk {chunk}")
        for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(grads)):
            # float32 sums in another order: rtol 1e-4 plus 1e-6 of the largest gradient entry
            # (leaves whose true gradient is 0, e.g. attention key biases, hold only rounding).
            np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-4, atol=1e-6 * scale,
                                       err_msg=f"chunk {chunk}: {jax.tree_util.keystr(path)}")


def test_sparse_mlm_never_builds_vocabulary_sized_tensors_at_every_position(torch_irra, batch):
    """The compiled train objective holds no [B, T, V] array (no dense logits, one-hot or scatter)."""
    clip, params, _ = irra_state_dict_to_params(torch_irra.state_dict(), **HEADS)
    model = IRRA(base_model=clip, loss_names=("sdm", "id", "mlm"), num_classes=NUM_CLASSES,
                 cross_depth=CROSS_DEPTH, cross_heads=2, mlm_chunk=4)

    def objective(p):
        return compute_losses(model.apply({"params": p}, batch), batch, model.loss_names)[0]

    hlo = jax.jit(jax.grad(objective)).lower(params).compile().as_text()
    b, t = batch["mlm_labels"].shape
    assert f"[{b},{t},49408]" not in hlo.replace(" ", "")
    assert "[4,4,49408]" in hlo.replace(" ", "")  # the per-pass logits: batch x chunk x vocabulary
    dense = IRRA(base_model=clip, loss_names=("mlm",), num_classes=0, cross_depth=CROSS_DEPTH, cross_heads=2)
    dense_hlo = jax.jit(jax.grad(lambda p: compute_losses(dense.apply({"params": p}, batch), batch,
                                                           ("mlm",))[0])).lower(params).compile().as_text()
    assert f"[{b},{t},49408]" in dense_hlo.replace(" ", "")  # the check above can fail


def test_load_irra_best_pth_with_openai_keys(torch_irra, batch, tmp_path):
    """A checkpoint with the reference's key names: OpenAI towers under `base_model.`, `{"model": sd}`."""
    sd = {k: v for k, v in torch_irra.state_dict().items() if not k.startswith("base_model.")}
    sd.update({f"base_model.{k}": v for k, v in hf_to_openai_state_dict(torch_irra.base_model).items()})
    path = tmp_path / "best.pth"
    torch.save({"model": sd}, path)
    model, params = load_irra(str(path), cross_heads=2, **HEADS)
    assert model.num_classes == NUM_CLASSES and model.cross_depth == CROSS_DEPTH
    assert model.loss_names == ("sdm", "id", "mlm")
    check_parity(model, params, torch_irra, batch)


def test_bad_irra_checkpoint_names_key_and_shapes(torch_irra):
    sd = dict(torch_irra.state_dict())
    sd["mlm_head.dense.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointMismatchError, match=r"mlm_head\.dense\.weight.*\(32, 32\).*\(5, 5\)"):
        irra_state_dict_to_params(sd, **HEADS)
    sd = {k: v for k, v in torch_irra.state_dict().items() if k != "ln_post.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*ln_post\.bias"):
        irra_state_dict_to_params(sd, **HEADS)
    with pytest.raises(CheckpointMismatchError, match="not an IRRA checkpoint"):
        irra_state_dict_to_params({"classifier.weight": torch.zeros(3, 4)})


def test_imported_irra_checkpoint_runs_through_the_evaluator(torch_irra, tmp_path):
    """`--mode=eval --checkpoint=best.pth`: import, then the person-retrieval evaluator on tf.data."""
    from tests.train_fixtures import tiny_config
    from xmr_jax.main import run_experiment

    sd = {k: v for k, v in torch_irra.state_dict().items() if not k.startswith("base_model.")}
    sd.update({f"base_model.{k}": v for k, v in hf_to_openai_state_dict(torch_irra.base_model).items()})
    path = tmp_path / "best.pth"
    torch.save({"model": sd}, path)
    config = tiny_config(batch_size=8, eval_batch_size=8)
    config.data.update(dict(config_name="tiny", data_dir=str(tmp_path / "tfds"), image_size=(32, 32),
                            context_length=77))
    config.model.clip.update(dict(image_size=(32, 32), context_length=77))
    config.model.import_overrides = dict(HEADS, cross_heads=2)
    result = run_experiment(config, str(tmp_path / "run"), "eval", checkpoint=str(path))["eval"]
    assert result["num_gallery"] == 12 and result["num_queries"] == 24
    # The same numbers from the torch model itself: its features of the same test split, cosine
    # scores in float64, metrics query by query from their definitions.
    from data_pipelines import input_pipeline
    from tests.train_fixtures import reference_person_metrics

    name, data_dir = "synthetic_people/tiny", str(tmp_path / "tfds")
    gallery = list(input_pipeline.eval_gallery(name, data_dir, "test", (32, 32), 8))
    queries = list(input_pipeline.eval_queries(name, data_dir, "test", 8, context_length=77))
    with torch.no_grad():
        g = np.concatenate([torch_irra.encode_image(torch.from_numpy(np.array(b["images"])).permute(0, 3, 1, 2))[0].numpy()[b["valid"]]
                            for b in gallery]).astype(np.float64)
        q = np.concatenate([torch_irra.encode_text(torch.from_numpy(np.array(b["text_ids"])).long())[0].numpy()[b["valid"]]
                            for b in queries]).astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    want = reference_person_metrics(q @ g.T, np.concatenate([b["pids"][b["valid"]] for b in queries]),
                                    np.concatenate([b["pids"][b["valid"]] for b in gallery]))
    assert {k: result[k] for k in want} == pytest.approx(want, abs=1e-6)
