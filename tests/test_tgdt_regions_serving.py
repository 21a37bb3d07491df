"""TGDT as published (tgdt_regions) in serving export and `xmr_jax.search`: a training workdir (tiny
towers at TERAN's region width 2048, random weights) exports its evaluation token-set encoders with
region + box inputs, and a Flickr30K folder in TERAN's layout (tests/teran_fixtures.py) is indexed
and searched with WordPiece queries; results equal brute-force NumPy recomputations."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import xmr_jax.search as S
from configs.tgdt import regions_demo
from tests import teran_fixtures as fx
from tests.test_search import _normalize, _numpy_local
from xmr_jax import export as ex
from xmr_jax.models import families
from xmr_jax.models.tgdt_regions import tgdt_regions_param_shapes
from xmr_jax.wordpiece import WordPieceTokenizer

CONTEXT = 16
NUM_IMAGES = 8  # fx.write_flickr30k_teran's default splits


def _config(vocab, region_dim):
    config = regions_demo.get_config()
    config.model.vocab = str(vocab)
    config.model.tgdt_regions.region_dim = region_dim
    config.model.tgdt_regions.vocab_size = len(vocab.read_text().splitlines())
    config.data.context_length = CONTEXT
    return config


def _random_params(model, seed=0):
    """Random values on the model's parameter tree (model.init at width 2048 costs ~20 s here)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        x = 0.05 * rng.standard_normal(s.shape)
        return (x + (jax.tree_util.keystr(path).endswith("['scale']"))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, tgdt_regions_param_shapes(model))


def _workdir(root, region_dim, *export_flags):
    """A tgdt_regions workdir (config.json + one checkpoint of random weights) and its CLI jax export."""
    from xmr_jax.checkpoints import Checkpointer
    from xmr_jax.train import TrainState, write_config

    vocab = fx.write_bert_vocab(root / "vocab.txt")
    config = _config(vocab, region_dim)
    family = families.get_family("tgdt_regions")
    model = family.build(config)
    params = _random_params(model)
    state = TrainState(step=jnp.asarray(5, jnp.int32), params=params, opt_state={},
                       nonfinite=jnp.zeros((), jnp.int32))
    workdir = root / "work"
    with Checkpointer(str(workdir), keep=1, async_save=False) as ckpt:
        ckpt.save(5, state)
    write_config(config, str(workdir))
    assert ex.main(["--checkpoint", str(workdir), "--out", str(root / "exp"), "--formats", "jax",
                    "--platforms", "cpu", *export_flags]) == 0
    return {"root": root, "workdir": str(workdir), "exp": str(root / "exp"), "vocab": vocab, "config": config,
            "train_model": model, "model": family.eval_model(model, config), "params": params}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Region width 32 (fast to compile): the export tests."""
    return _workdir(tmp_path_factory.mktemp("small"), 32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Region width 2048 (TERAN's features), exported with params as an argument, and a TERAN folder."""
    root = tmp_path_factory.mktemp("regions")
    return {**_workdir(root, 2048, "--params_as_argument"), "teran": fx.write_flickr30k_teran(root / "f30k")}


def _random_regions(batch, n, width, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.random((batch, n, 2)) * 0.5
    boxes = np.concatenate([xy, xy + rng.random((batch, n, 2)) * 0.5], -1)
    return (rng.random((batch, n, width)) * 4).astype(np.float32), boxes.astype(np.float32)


def _region_inputs(teran, ids):
    """regions [n, 36, 2048], boxes [n, 36, 4] / (w, h, w, h): read here, independently of the builders."""
    regions = np.stack([np.load(teran / "features_36" / "bu_att" / f"{i}.npz")["feat"] for i in ids])
    boxes = []
    for i in ids:
        w, h = Image.open(teran / "flickr30k-images" / f"{1000 + i}.jpg").size
        boxes.append(np.load(teran / "features_36" / "bu_box" / f"{i}.npy") / np.array([w, h, w, h], np.float32))
    return regions.astype(np.float32), np.stack(boxes).astype(np.float32)


def _check(outputs, reference, atol):
    assert sorted(outputs) == ["global", "mask", "tokens"]
    for name, want in zip(("global", "tokens", "mask"), reference):
        got, want = np.asarray(outputs[name]), np.asarray(want)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        if name == "mask":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=name)


def test_jax_export_of_a_workdir_takes_regions_boxes_and_wordpiece_ids(small):
    encode_image, encode_text, meta = ex.load_exported_encoders(small["exp"] + "/jax")
    assert meta["family"] == "tgdt_regions" and meta["token_set"] == "test" and meta["params"] == "constants"
    assert meta["encode_image"]["inputs"] == {"regions": {"shape": ["b", "n", 32], "dtype": "float32"},
                                              "boxes": {"shape": ["b", "n", 4], "dtype": "float32"}}
    assert list(meta["encode_image"]["inputs"]) == ["regions", "boxes"]  # the call order
    assert meta["encode_text"]["inputs"] == {"token_ids": {"shape": ["b", CONTEXT], "dtype": "int32"}}
    assert meta["encode_image"]["outputs"]["tokens"]["shape"] == ["b", "n + 1", 32]
    assert meta["text"] == {"tokenizer": "wordpiece", "context_length": CONTEXT, "vocab_file": "vocab.txt"}
    assert (small["root"] / "exp" / "jax" / "vocab.txt").read_text() == small["vocab"].read_text()

    model, params = small["model"], small["params"]
    apply = jax.jit(lambda p, *xs, method: model.apply({"params": p}, *xs, method=method), static_argnames="method")
    for n in (36, 7):  # symbolic region count; batches 1 and 3 of one artifact (the reference runs at 3)
        regions, boxes = _random_regions(3, n, 32, seed=n)
        want = apply(params, regions, boxes, method="encode_image")
        for batch in (1, 3):
            _check(encode_image(regions[:batch], boxes[:batch]), [np.asarray(w)[:batch] for w in want], atol=1e-5)
    ids = WordPieceTokenizer(small["vocab"], max_length=CONTEXT).encode(
        ["a man on the grass", "two dogs running", "a girl riding a bike in the snow"])
    want = apply(params, ids, method="encode_text")
    for batch in (1, 3):
        _check(encode_text(ids[:batch]), [np.asarray(w)[:batch] for w in want], atol=1e-5)
    # the exported token set is the evaluation one ("test": stage-1 tokens), not training's
    regions, boxes = _random_regions(1, 36, 32, seed=36)
    train_tokens = small["train_model"].apply({"params": params}, regions, boxes, method="encode_image")[1]
    assert np.abs(np.asarray(encode_image(regions, boxes)["tokens"]) - np.asarray(train_tokens)).max() > 1e-2


def test_saved_model_signatures_take_regions_and_boxes(small, tmp_path):
    tf = pytest.importorskip("tensorflow")
    family = families.get_family("tgdt_regions")
    served = ex.Servable(small["model"], small["params"], ex.family_inputs(family, small["model"], small["config"]),
                         family.text(small["config"]), family.name)
    ex.export_saved_model(served, None, str(tmp_path / "sm"), platforms=("cpu",))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    image_sig, text_sig = loaded.signatures["encode_image"], loaded.signatures["encode_text"]
    spec = image_sig.structured_input_signature[1]
    assert spec["regions"].shape.as_list() == [None, None, 32] and spec["boxes"].shape.as_list() == [None, None, 4]
    assert text_sig.structured_input_signature[1]["token_ids"].shape.as_list() == [None, CONTEXT]
    model, params = small["model"], small["params"]
    regions, boxes = _random_regions(3, 9, 32, seed=1)
    ids = WordPieceTokenizer(small["vocab"], max_length=CONTEXT).encode(["a dog on the grass", "red shirt", "a cat"])
    apply = jax.jit(lambda p, *xs, method: model.apply({"params": p}, *xs, method=method), static_argnames="method")
    want_image = apply(params, regions, boxes, method="encode_image")
    want_text = apply(params, ids, method="encode_text")
    for batch in (1, 3):  # dynamic batch (each new shape compiles in TF: ~5 s here, so text runs at one)
        out = image_sig(regions=tf.constant(regions[:batch]), boxes=tf.constant(boxes[:batch]))
        _check({k: v.numpy() for k, v in out.items()}, [np.asarray(w)[:batch] for w in want_image], atol=1e-4)
    out = text_sig(token_ids=tf.constant(ids))
    _check({k: v.numpy() for k, v in out.items()}, [np.asarray(w) for w in want_text], atol=1e-4)


def test_hf_format_and_mismatched_config_are_refused(small, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ex.ExportError, match=r"^--formats 'jax,hf': hf writes a transformers CLIPModel, and the "
                                             r"tgdt_regions model has no CLIP towers; use --formats jax,savedmodel$"):
        ex.main(["--checkpoint", small["workdir"], "--out", str(out), "--formats", "jax,hf"])
    assert not out.exists()  # refused before anything is written
    # the demo config's vocab (37 tokens) is not the checkpoint's (117): named, with the fix
    with pytest.raises(ex.ExportError, match=r"parameter \['bert'\]\['word_embeddings'\]\['embedding'\] has shape "
                                             r"\(117, 32\) in the checkpoint, the model expects \(37, 32\); pass the --config"):
        ex.load_servable(small["workdir"], "configs/tgdt/regions_demo.py")


def _cli_lines(capsys):
    """Result rows of `query` output: [rank, score, cosine, name]."""
    return [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]


def _encode_images(run, regions, boxes):
    fn = jax.jit(lambda p, r, b: run["model"].apply({"params": p}, r, b, method="encode_image"))
    return [np.asarray(x) for x in fn(run["params"], regions, boxes)]


def test_index_of_teran_features_holds_the_models_encodings(run, tmp_path):
    index_path = str(tmp_path / "idx")
    assert S.main(["index", "--checkpoint", run["workdir"], "--features", str(run["teran"]), "--index", index_path,
                   "--no_progress", "--batch_size", "3", "--chunk_size", "5"]) == 0
    store = S.load_index(index_path)
    assert store.paths == [str(i) for i in range(NUM_IMAGES)]  # image ids, Karpathy file order
    assert store.chunk_rows == [5, 3] and store.meta["model"]["family"] == "tgdt_regions"
    g, t, m = _encode_images(run, *_region_inputs(run["teran"], range(NUM_IMAGES)))
    np.testing.assert_allclose(np.concatenate(store.global_chunks()), g, rtol=1e-4, atol=1e-5)
    tokens, mask = store.token_rows(np.arange(NUM_IMAGES))
    assert tokens.shape == (NUM_IMAGES, 37, 32) and tokens.dtype == np.float16
    np.testing.assert_allclose(tokens, t, atol=2e-3)
    np.testing.assert_array_equal(mask, m)
    assert not mask[:, 0].any() and mask[:, 1:].all()


def test_query_of_a_region_index_ranks_as_brute_force_numpy(run, tmp_path, capsys):
    index_path = str(tmp_path / "idx")
    assert S.main(["index", "--exported", run["exp"], "--features", str(run["teran"]), "--index", index_path,
                   "--no_progress"]) == 0
    store = S.load_index(index_path)
    g = np.concatenate(store.global_chunks())
    t, m = store.token_rows(np.arange(NUM_IMAGES))
    # an image's own caption as the query (the model is untrained: the ranking, not the hit, is checked)
    caption = json.loads((run["teran"] / "annotations" / "dataset_flickr30k.json").read_text()
                         )["images"][6]["sentences"][0]["raw"]
    capsys.readouterr()
    assert S.main(["query", "--index", index_path, "--text", caption, "--k", str(NUM_IMAGES), "--rerank_k", "4"]) == 0
    rows = _cli_lines(capsys)
    ids = WordPieceTokenizer(run["vocab"], max_length=CONTEXT).encode([caption])
    qg, qt, qm = jax.jit(lambda p, x: run["model"].apply({"params": p}, x, method="encode_text"))(run["params"], ids)
    s_g = (_normalize(qg) @ _normalize(g).T)[0]
    s_l = _numpy_local(t.astype(np.float32), m, np.asarray(qt), np.asarray(qm))[:, 0]
    by_global = list(np.argsort(-s_g))
    expected = sorted(by_global[:4], key=lambda j: -(s_g[j] + s_l[j])) + by_global[4:]
    assert [r[3] for r in rows] == [str(j) for j in expected]
    np.testing.assert_allclose([float(r[1]) for r in rows[:4]], [s_g[j] + s_l[j] for j in expected[:4]],
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose([float(r[2]) for r in rows], s_g[expected], atol=1e-4)


def _broken_copy(run, tmp_path, how):
    teran = tmp_path / "f30k"
    shutil.copytree(run["teran"], teran)
    att, box = teran / "features_36" / "bu_att" / "3.npz", teran / "features_36" / "bu_box" / "3.npy"
    if how == "missing":
        att.unlink()
    elif how == "shape":
        np.savez(att, feat=np.zeros((36, 100), np.float32))
    elif how == "boxes":
        np.save(box, np.zeros((35, 4), np.float32))
    elif how == "layout":
        (teran / "annotations" / "dataset_flickr30k.json").unlink()
    return teran


@pytest.mark.parametrize("how, message", [
    ("missing", r"^error: --features: .*bu_att/3\.npz not found \(region features of dataset_flickr30k\.json images\[3\] \(imgid 3\)\)$"),
    ("shape", r"^error: --features: .*bu_att/3\.npz \(.*\): 'feat' has shape \[36, 100\], expected \[36, 2048\]$"),
    ("boxes", r"^error: --features: .*bu_box/3\.npy \(.*\): box count 35 != region count 36 in 3\.npz$"),
    ("layout", r"^error: --features '.*f30k' holds no dataset_flickr30k\.json or dataset_coco\.json \(at the top or "
               r"in annotations/\): expected TERAN's layout"),
])
def test_malformed_features_are_named_before_anything_is_written(run, tmp_path, capsys, how, message):
    teran = _broken_copy(run, tmp_path, how)
    capsys.readouterr()
    assert S.main(["index", "--checkpoint", run["workdir"], "--features", str(teran), "--index",
                   str(tmp_path / "idx"), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").match(message, err), err
    assert not (tmp_path / "idx").exists()


def test_model_and_input_kinds_must_match(run, tmp_path, capsys):
    capsys.readouterr()
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    assert S.main(["index", "--exported", run["exp"], "--images", str(tmp_path / "imgs"), "--index",
                   str(tmp_path / "i1")]) == 2
    assert "error: --images: the model takes regions, boxes, not images; index region features with --features" \
        in capsys.readouterr().err
    assert S.main(["index", "--exported", run["exp"], "--images", str(tmp_path / "imgs"), "--split", "test",
                   "--index", str(tmp_path / "i2")]) == 2
    assert "--split selects Karpathy splits of --features" in capsys.readouterr().err
    index_path = str(tmp_path / "idx")
    assert S.main(["index", "--exported", run["exp"], "--features", str(run["teran"]), "--split", "val",
                   "--index", index_path, "--no_progress"]) == 0
    capsys.readouterr()
    assert S.main(["query", "--index", index_path, "--text", "a dog", "--grid", str(tmp_path / "g.png")]) == 2
    assert "--grid: " in capsys.readouterr().err and not (tmp_path / "g.png").exists()


def test_released_checkpoint_layout_exports_with_its_config(tmp_path):
    """TGDT's .pth.tar (written by tests/torch_tgdt_reference.py) + --config: the exported encoders
    give the torch transcription's normalized global features and its test-time tokens."""
    pytest.importorskip("torch")
    from tests.torch_tgdt_reference import TGDTReference, save_tgdt_checkpoint, tiny_sizes

    vocab = fx.write_bert_vocab(tmp_path / "vocab.txt")
    tok = WordPieceTokenizer(vocab, max_length=CONTEXT)
    ref = TGDTReference(tiny_sizes(region_layers=1, vocab=tok.vocab_size), seed=3)
    save_tgdt_checkpoint(ref, str(tmp_path / "model_best_rsum.pth.tar"))
    config = f"configs/tgdt/flickr30k_regions.py:vocab={vocab},context_length={CONTEXT},text_heads=2"
    assert ex.main(["--checkpoint", str(tmp_path / "model_best_rsum.pth.tar"), "--config", config,
                    "--out", str(tmp_path / "exp"), "--formats", "jax", "--platforms", "cpu"]) == 0
    encode_image, encode_text, meta = ex.load_exported_encoders(str(tmp_path / "exp" / "jax"))
    assert meta["family"] == "tgdt_regions" and meta["token_set"] == "test"
    assert meta["encode_image"]["inputs"]["regions"]["shape"] == ["b", "n", 16]

    regions, boxes = _random_regions(2, 5, 16, seed=4)
    ids = tok.encode(["a man on the grass", "two dogs running in the water"])
    zero = np.zeros((2, 1, 1), np.float32)
    want = ref(np.concatenate([zero * regions[:, :1], regions], 1), np.concatenate([zero * boxes[:, :1], boxes], 1),
               [6, 6], ids, (ids != 0).sum(1), test=True)
    image, text = encode_image(regions, boxes), encode_text(ids)
    np.testing.assert_allclose(_normalize(image["global"]), want["img_global"], atol=1e-4)
    np.testing.assert_allclose(_normalize(text["global"]), want["cap_global"], atol=1e-4)
    np.testing.assert_allclose(image["tokens"], want["img_tokens"], atol=1e-4)


def test_region_index_runs_where_tensorflow_is_not_installed(run, tmp_path):
    """GPU machines have no TensorFlow: `index --features` reads TERAN's files through
    data_pipelines.builders.region_features without it, and prints no TFDS import banner."""
    import os
    import subprocess
    import sys

    code = ("import sys, runpy\n"
            "sys.modules['tensorflow'] = None  # as if not installed\n"
            f"sys.argv = ['xmr_jax.search', 'index', '--exported', {run['exp']!r}, '--features', "
            f"{str(run['teran'])!r}, '--split', 'val', '--index', {str(tmp_path / 'idx')!r}, '--no_progress']\n"
            "runpy.run_module('xmr_jax.search', run_name='__main__')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "TensorFlow" not in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert S.load_index(str(tmp_path / "idx")).paths == ["3", "4"]  # --split val of the Karpathy file
