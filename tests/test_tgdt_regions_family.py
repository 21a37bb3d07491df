"""The tgdt_regions model family (TGDT as published) wired into the trainer, the evaluator and main:
the embedded demo trains end to end with the negatives schedule; a checkpoint in TGDT's .pth.tar
layout (written by tests/torch_tgdt_reference.py) evaluates through `python -m xmr_jax.main
--mode=eval --checkpoint=...` on the flickr30k_regions fixture, its global metrics and NDCG equal
a brute-force recomputation from the torch transcription's own features."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tgdt import coco_regions, flickr30k_regions, regions_demo
from tests import teran_fixtures as fx
from xmr_jax import evaluate, losses, metrics, parallel, similarity, train
from xmr_jax.models import families

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 16


def _demo_config(tmp_path, **args):
    spec = ",".join(f"{k}={v}" for k, v in {"data": "tiny", "data_dir": tmp_path / "tfds", "epochs": 1, **args}.items())
    config = regions_demo.get_config(spec)
    config.progress_bar = False
    config.param_table = False
    config.async_checkpoints = False
    config.log_every = 3
    return config


def test_negatives_schedule_switches_from_sum_to_hardest():
    config = regions_demo.get_config("negatives_schedule=3")
    loss_fn = families.get_family("tgdt_regions").loss_fn(config)
    rng = np.random.default_rng(0)
    b, li, lt, d = 4, 5, 6, 8
    out = {"image_global": rng.normal(size=(b, d)), "text_global": rng.normal(size=(b, d)),
           "image_tokens": rng.normal(size=(b, li, d)), "text_tokens": rng.normal(size=(b, lt, d)),
           "image_mask": rng.random((b, li)) > 0.2, "text_mask": rng.random((b, lt)) > 0.2}
    out = {k: jnp.asarray(v) for k, v in out.items()}
    ids = jnp.asarray([0, 1, 1, 2])
    local = similarity.local_similarity(out["image_tokens"], out["image_mask"], out["text_tokens"], out["text_mask"],
                                        scale=config.tgdt.local_scale)
    expected = {kind: losses.cmc_loss(out["image_global"], out["text_global"], local, margin=0.2, slack=0.3,
                                      positive_mask=losses.positive_mask_from_ids(ids), negatives=kind)
                for kind in ("sum", "hardest")}
    assert float(expected["sum"]) != pytest.approx(float(expected["hardest"]))
    for step, kind in ((0, "sum"), (2, "sum"), (3, "hardest"), (10, "hardest")):
        batch = {"pids": ids, "image_ids": ids, "train_step": jnp.full((b,), step, jnp.int32)}
        value, parts = jax.jit(loss_fn)(out, batch)
        np.testing.assert_allclose(float(value), float(expected[kind]), rtol=1e-6)
        assert float(parts["hardest_negatives"]) == (kind == "hardest")
    with pytest.raises(KeyError, match="negatives_schedule"):
        loss_fn(out, {"pids": ids, "image_ids": ids})


def test_config_errors_name_the_field(tmp_path):
    config = regions_demo.get_config()
    config.tgdt.negatives_schedule = -1
    with pytest.raises(ValueError, match=r"config.tgdt.negatives_schedule=-1"):
        train.validate_config(config)
    config = regions_demo.get_config()
    config.model.vocab = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="missing.txt not found"):
        train.validate_config(config)
    config = flickr30k_regions.get_config(f"vocab={fx.write_bert_vocab(tmp_path / 'vocab.txt')},"
                                          f"relevances={tmp_path},batch_size=32")
    with pytest.raises(FileNotFoundError, match=r"f30k-test-rougeL.npy not found"):
        train.validate_config(config)
    config = flickr30k_regions.get_config("batch_size=32")
    with pytest.raises(ValueError, match="config.model.vocab and config.model.bert_dir are both empty"):
        train.validate_config(config)


def test_regions_demo_trains_end_to_end_and_evaluates_with_the_test_token_set(tmp_path):
    from xmr_jax import main

    config = _demo_config(tmp_path, negatives_schedule=3)
    family = families.get_family("tgdt_regions")
    model = family.build(config)
    assert model.token_set == "train" and family.eval_model(model, config).token_set == "test"
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    evaluator = evaluate.Evaluator.for_config(model, mesh, lambda: iter(()), lambda: iter(()), config)
    assert evaluator.model.token_set == "test" and evaluator.image_inputs == ("regions", "boxes")

    results = main.run_experiment(config, str(tmp_path / "work"))
    result = results["eval"]
    assert set(result) >= {"global", "local", "two_stage"}
    assert result["num_gallery"] == 20 and result["num_queries"] == 100
    for kind in ("global", "local", "two_stage"):
        assert 0 < result[kind]["rsum"] <= 600
    logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    train_rows = {row["step"]: row for row in logged if row.get("split") == "train"}
    # 60 images x 5 captions / batch 32 = 9 steps; steps 1-3 see train_step 0-2 (< 3: summed negatives),
    # steps 4-6 train_step 3-5 (hardest)
    assert train_rows[3]["hardest_negatives"] == 0.0 and train_rows[6]["hardest_negatives"] == 1.0
    assert all(np.isfinite(row["loss"]) for row in train_rows.values())


def _brute_ndcg(scores, rel, k=25):
    """scores / rel [n_queries, n_items] -> mean NDCG@k, query by query (ties: lower index first)."""
    out = []
    for s, r in zip(scores, rel):
        order = sorted(range(len(s)), key=lambda j: (-s[j], j))[:k]
        dcg = sum((2.0 ** r[j] - 1) / np.log2(n + 2) for n, j in enumerate(order))
        ideal = sum((2.0 ** v - 1) / np.log2(n + 2) for n, v in enumerate(sorted(r, reverse=True)[:k]))
        out.append(dcg / ideal if ideal > 0 else 0.0)
    return np.array(out)


def test_released_checkpoint_layout_evaluates_through_main(tmp_path):
    torch = pytest.importorskip("torch")
    from data_pipelines import build
    from tests.torch_tgdt_reference import TGDTReference, save_tgdt_checkpoint, tiny_sizes
    from xmr_jax.wordpiece import WordPieceTokenizer

    vocab = fx.write_bert_vocab(tmp_path / "vocab.txt")
    tok = WordPieceTokenizer(vocab)
    builder = build.build("flickr30k_regions", fx.write_flickr30k_teran(tmp_path / "manual"), tmp_path / "tfds")
    ref = TGDTReference(tiny_sizes(region_dim=2048, region_layers=1, vocab=tok.vocab_size), seed=3)
    ckpt = tmp_path / "model_best_rsum.pth.tar"
    save_tgdt_checkpoint(ref, str(ckpt))

    # What TGDT computes on the test split (test token set), captions padded like the pipeline's.
    import tensorflow_datasets as tfds
    test = sorted(tfds.as_numpy(builder.as_dataset(split="test")), key=lambda e: e["image_index"])
    n_img = len(test)
    regions = np.stack([e["regions"] for e in test])
    boxes = np.stack([e["boxes"] for e in test])
    captions = [c.decode() for e in test for c in e["captions"]]
    ids = tok.encode(captions, max_length=CONTEXT)
    zero = np.zeros((n_img, 1, 1))
    out = ref(np.concatenate([zero * regions[:, :1], regions], 1), np.concatenate([zero * boxes[:, :1], boxes], 1),
              [37] * n_img, ids, (ids != 0).sum(1), test=True)
    sim = out["img_global"] @ out["cap_global"].T                                       # [3, 15]
    rel = {m: np.random.default_rng(i).random((len(captions), n_img)).astype(np.float32)
           for i, m in enumerate(("rougeL", "spice"))}
    rel_dir = tmp_path / "relevances"
    rel_dir.mkdir()
    for m, r in rel.items():
        r.tofile(rel_dir / f"f30k-test-{m}.npy")                                   # TERAN's raw memmap

    workdir = tmp_path / "eval"
    args = [f"--config={REPO}/configs/tgdt/flickr30k_regions.py:vocab={vocab},data_dir={tmp_path / 'tfds'},"
            f"context_length={CONTEXT},relevances={rel_dir},batch_size=32,text_heads=2", f"--workdir={workdir}", "--mode=eval",
            f"--checkpoint={ckpt}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "xmr_jax.main", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("global", "local", "two_stage"):
        assert f"eval checkpoint @ step 0: {kind}" in proc.stdout
    assert "i2t_ndcg_rougeL" in proc.stdout
    got = json.loads((workdir / "eval_checkpoint_metrics.json").read_text())["global"]

    text_to_image = np.repeat(np.arange(n_img), 5)
    expected = metrics.caption_retrieval_metrics(sim, text_to_image=text_to_image)
    for key in ("i2t_R1", "i2t_R5", "t2i_R1", "t2i_R5"):
        assert got[key] == pytest.approx(expected[key]), key
    for m, r in rel.items():
        assert got[f"t2i_ndcg_{m}"] == pytest.approx(np.mean(_brute_ndcg(sim.T, r)), abs=1e-5)
        i2t = _brute_ndcg(sim, r.T)
        assert got[f"i2t_ndcg_{m}"] == pytest.approx(np.mean(i2t[i2t != 0]), abs=1e-5)


def test_coco_1k_ndcg_uses_each_folds_block_of_the_relevance_files():
    """NDCG through the evaluator's COCO 1K path: fold f scores its own images / captions against
    rows [5 F f, 5 F (f+1)) x columns [F f, F (f+1)) of the whole-split relevance matrix."""
    rng = np.random.default_rng(0)
    folds, fold_size, per_image, d = 2, 4, 5, 6
    n_img = folds * fold_size
    img = rng.normal(size=(n_img, d)).astype(np.float32)
    txt = (np.repeat(img, per_image, 0) + rng.normal(size=(n_img * per_image, d))).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)

    def split(feats, image_ids):
        n = len(feats)
        return {"global": feats, "tokens": feats[:, None], "mask": np.ones((n, 1), bool),
                "pids": image_ids, "image_ids": image_ids}

    gallery = split(img, np.arange(n_img))
    query = split(txt, np.repeat(np.arange(n_img), per_image))
    rel = {"rougeL": rng.random((n_img * per_image, n_img)).astype(np.float32)}
    got = evaluate.coco_1k_retrieval(query, gallery, folds=folds, fold_size=fold_size, k_t2i=3, k_i2t=3,
                                     local_exhaustive=False, relevances=rel)["global"]
    t2i, i2t = [], []
    for f in range(folds):
        im, tx = slice(f * fold_size, (f + 1) * fold_size), slice(f * fold_size * per_image, (f + 1) * fold_size * per_image)
        sim = img[im] @ txt[tx].T
        block = rel["rougeL"][tx, im]
        t2i.append(np.mean(_brute_ndcg(sim.T, block)))
        per_img = _brute_ndcg(sim, block.T)
        i2t.append(np.mean(per_img[per_img != 0]))
    assert got["t2i_ndcg_rougeL"] == pytest.approx(np.mean(t2i), abs=1e-6)
    assert got["i2t_ndcg_rougeL"] == pytest.approx(np.mean(i2t), abs=1e-6)
    recalls = [v for k, v in got.items() if "_R" in k]
    assert len(recalls) == 6 and got["rsum"] == pytest.approx(sum(recalls))   # NDCG is not part of rsum


def test_published_recipes():
    f30k = flickr30k_regions.get_config("batch_size=30")
    coco = coco_regions.get_config("")
    for config, batch in ((f30k, 30), (coco, 40)):
        o = config.optim
        assert (config.batch_size, o.lr, o.grad_clip, o.schedule, o.decay_epochs, o.decay_rate, o.warmup_steps,
                o.warmup_factor, o.weight_decay, config.num_epochs) == (batch, 1e-5, 2.0, "step_decay", 20, 0.1, 1000,
                                                                          0.0, 0.0, 60)
        assert config.tgdt.negatives == "hardest" and config.model.tgdt_regions.detach is True
        assert config.model.tgdt_regions.preset == "tgdt" and config.model.eval_token_set == "test"
    assert coco.tgdt.coco_1k_folds == 5 and coco.tgdt.ndcg_name == "coco" and f30k.tgdt.ndcg_name == "f30k"


def test_synthetic_regions_scenes_are_deterministic_and_fully_in_the_shipped_vocab():
    from data_pipelines.builders.synthetic_regions import synthetic_regions as sr
    from xmr_jax.wordpiece import WordPieceTokenizer

    cfg = sr.BUILDER_CONFIGS[0]
    vectors = (np.ones((len(sr.NOUNS), cfg.region_dim)), np.zeros((len(sr.COLOURS), cfg.region_dim)))
    a = sr.scene(cfg, vectors, np.random.default_rng([0, 2, 7]))
    b = sr.scene(cfg, vectors, np.random.default_rng([0, 2, 7]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (cfg.num_regions, cfg.region_dim) and a[1].shape == (cfg.num_regions, 4)
    assert (a[1][:, 2:] > a[1][:, :2]).all() and ((a[1] >= 0) & (a[1] <= 1)).all()
    assert sr.VOCAB_PATH.read_text().splitlines() == sr.vocabulary()
    tok = WordPieceTokenizer(sr.VOCAB_PATH)
    captions = [c for i in range(50) for c in sr.scene(cfg, vectors, np.random.default_rng([0, 1, i]))[2]]
    assert len(captions) == 250 and a[2] == b[2]
    ids = tok.encode(captions, max_length=None)
    assert tok.unk_id not in ids and ids.shape[1] <= 16   # the demo's context_length holds every caption


def test_dropout_is_drawn_per_step_in_training_and_off_at_evaluation():
    """TGDT trains with dropout 0.1: the trainer's step passes a fresh "dropout" rng per step (two
    seeds give different losses on the same batch, a model without dropout ignores the rng), the
    encoders used for evaluation stay deterministic; TGDT's recipe configs set 0.1."""
    from xmr_jax import optim

    rng = np.random.default_rng(0)
    batch = {"regions": rng.normal(size=(4, 5, 32)).astype(np.float32),   # the demo's region_dim
             "boxes": rng.random((4, 5, 4)).astype(np.float32),
             "text_ids": np.tile(np.array([[2, 7, 9, 3, 0, 0]], np.int32), (4, 1)),
             "pids": np.arange(4, dtype=np.int32), "image_ids": np.arange(4, dtype=np.int32)}
    losses_by = {}
    for rate in (0.0, 0.1):
        config = regions_demo.get_config()
        config.model.tgdt_regions.dropout = rate
        family = families.get_family("tgdt_regions")
        model = family.build(config)
        params = train.init_params(model, config, jax.random.PRNGKey(0))
        tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=10)
        for seed in (1, 2):
            step = jax.jit(train.make_train_step(model, family.loss_fn(config), tx,
                                                 dropout_rng=jax.random.PRNGKey(seed)))
            _, m = step(train.create_train_state(params, tx), batch)
            losses_by[rate, seed] = float(m["loss"])
        image = model.apply({"params": params}, batch["regions"], batch["boxes"], method="encode_image")[0]
        text = model.apply({"params": params}, batch["text_ids"], method="encode_text")[0]
        if rate == 0.0:
            reference = (image, text)
        else:  # same parameters, so the evaluation features equal those of the model without dropout
            np.testing.assert_allclose(image, reference[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(text, reference[1], rtol=1e-6, atol=1e-6)
            with pytest.raises(Exception, match="dropout"):
                model.apply({"params": params}, batch)  # training pass without a dropout rng
    assert losses_by[0.0, 1] == losses_by[0.0, 2]
    assert losses_by[0.1, 1] != losses_by[0.1, 2]
    assert losses_by[0.1, 1] != losses_by[0.0, 1]
    assert flickr30k_regions.get_config("batch_size=32").model.tgdt_regions.dropout == 0.1
