"""xmr_jax.search: index a folder of images, query it with text, render the grid (tiny CLIP).

The CLI writes an index folder (format 2); `setup["index"]` is the same gallery built in memory
(`build_index`), the reference the folder is compared with here and in test_search_store.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from xmr_jax import search as S
from xmr_jax.models.clip import clip_from_config, clip_param_shapes
from xmr_jax.retrieval import two_stage_scores
from xmr_jax.tokenizer import default_tokenizer

IMAGE_SIZE = (32, 16)  # (H, W): non-square so H/W mix-ups show
CLIP_CFG = {"preset": "tiny", "embed_dim": 16, "image_size": IMAGE_SIZE, "vision_width": 32,
            "vision_layers": 1, "vision_heads": 2, "text_width": 32, "text_layers": 1,
            "text_heads": 2, "context_length": 16}
QUERIES = ["a woman in a red dress", "a man with a black backpack"]
# 6 images: nested folders, mixed formats and sizes, a mixed-case extension and one non-image.
FILES = {"a.png": (20, 30), "b.JPG": (40, 24), "sub/c.jpeg": (16, 16), "sub/d.webp": (33, 17),
         "sub/deeper/e.png": (64, 32), "f.png": (12, 50)}


def init_clip_params(model, key):
    """Random params on the real tree (model.init's RNG init costs >10 s of CPU here)."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    flat = jax.tree_util.tree_flatten_with_path(clip_param_shapes(model))[0]
    leaves = [(0.05 * rng.standard_normal(s.shape) + ("scale" in jax.tree_util.keystr(k))).astype(np.float32)
              for k, s in flat]
    return jax.tree.unflatten(jax.tree.structure(clip_param_shapes(model)), leaves)


def _write(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(px).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from xmr_jax.convert import save_converted
    root = tmp_path_factory.mktemp("search")
    model = clip_from_config(CLIP_CFG)
    params = init_clip_params(model, jax.random.key(0))
    save_converted(model, params, str(root / "ckpt"))
    for i, (name, size) in enumerate(FILES.items()):
        _write(root / "images" / name, size, seed=i)
    (root / "images" / "notes.txt").write_text("not an image")
    index_path = root / "gallery"
    rc = S.main(["index", "--checkpoint", str(root / "ckpt"), "--images", str(root / "images"),
                 "--index", str(index_path), "--batch_size", "4", "--chunk_size", "4"])
    assert rc == 0
    memory = S.build_index(model, params, sorted(FILES), str(root / "images"), batch_size=4)
    return {"root": root, "model": model, "params": params, "index": memory,
            "store": S.load_index(str(index_path)), "index_path": str(index_path),
            "ckpt": str(root / "ckpt")}


def store_arrays(store):
    """(global [N, D], tokens [N, L, D] | None, mask | None) of an IndexStore, read whole."""
    rows = np.arange(len(store))
    tokens, mask = store.token_rows(rows) if store.has_tokens else (None, None)
    return np.concatenate(store.global_chunks()), tokens, mask


def _text_features(model, params, texts):
    ids = default_tokenizer(mask_token=True, context_length=model.context_length).encode(texts)
    g, t, m = model.apply({"params": params}, ids, method="encode_text")
    return np.asarray(g), np.asarray(t), np.asarray(m)


def _normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_local(img_tok, img_mask, txt_tok, txt_mask, scale=10.0):
    """[N_img, N_txt]: max over valid image tokens, sum over valid words."""
    cos = np.einsum("ild,tjd->itlj", _normalize(img_tok), _normalize(txt_tok))
    cos = np.where(img_mask[:, None, :, None], cos, -np.inf).max(axis=2)
    return scale * np.where(txt_mask[None, :, :], cos, 0.0).sum(-1)


def test_resize_normalize_matches_tf_eval_transform(tmp_path):
    pre = pytest.importorskip("data_pipelines.preprocess")
    for size in [(20, 30), (7, 5), (64, 48)]:
        path = tmp_path / f"x{size[0]}.png"
        _write(path, size, seed=size[0])
        ours = S.load_image(str(path), IMAGE_SIZE)
        ref = pre.eval_image(path.read_bytes(), IMAGE_SIZE).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_index_contents(setup):
    index, model, params = setup["index"], setup["model"], setup["params"]
    store = setup["store"]
    assert isinstance(store, S.IndexStore) and store.chunk_rows == [4, 2]
    assert store.paths == index.paths == sorted(FILES)  # relative, posix, sorted; notes.txt ignored
    for got, want in zip(store_arrays(store), (index.global_features, index.tokens, index.mask)):
        np.testing.assert_array_equal(got, want)  # the CLI's folder holds the in-memory features
        assert got.dtype == want.dtype
    n_tok = 1 + (IMAGE_SIZE[0] // 8) * (IMAGE_SIZE[1] // 8)
    assert index.global_features.shape == (6, 16) and index.global_features.dtype == np.float32
    assert index.tokens.shape == (6, n_tok, 16) and index.tokens.dtype == np.float16
    assert index.mask.shape == (6, n_tok) and index.mask.dtype == bool
    assert not index.mask[:, 0].any() and index.mask[:, 1:].all()
    assert index.meta["model"]["embed_dim"] == 16 and index.meta["model"]["image_size"] == list(IMAGE_SIZE)
    # Features equal a direct encode of the test-transformed images (batching/padding changes nothing).
    images = np.stack([S.load_image(str(setup["root"] / "images" / p), IMAGE_SIZE) for p in index.paths])
    g, t, m = model.apply({"params": params}, images, method="encode_image")
    np.testing.assert_allclose(index.global_features, np.asarray(g), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(index.tokens, np.asarray(t), rtol=2e-3, atol=2e-3)  # float16 storage


def test_global_search_equals_numpy_ranking(setup, capsys):
    index, model, params = setup["index"], setup["model"], setup["params"]
    res = S.search(index, model, params, QUERIES, k=6, two_stage=False)
    qg, _, _ = _text_features(model, params, QUERIES)
    sim = _normalize(qg) @ _normalize(index.global_features).T
    order = np.argsort(-sim, axis=1)
    np.testing.assert_array_equal(res.indices, order)
    np.testing.assert_allclose(res.scores, np.take_along_axis(sim, order, 1), atol=1e-5)
    # The CLI prints the same ranking.
    capsys.readouterr()
    rc = S.main(["query", "--checkpoint", setup["ckpt"], "--index", setup["index_path"], "--global_only",
                 "--k", "6", "--text", QUERIES[0], "--text", QUERIES[1]])
    assert rc == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert [ln[2] for ln in lines] == [index.paths[j] for j in order.reshape(-1)]
    np.testing.assert_allclose([float(ln[1]) for ln in lines], np.sort(-sim, 1).reshape(-1) * -1, atol=1e-4)


@pytest.mark.parametrize("rerank_k", [3, 6])
def test_two_stage_search_equals_reference(setup, rerank_k):
    index, model, params = setup["index"], setup["model"], setup["params"]
    res = S.search(index, model, params, QUERIES, k=6, rerank_k=rerank_k)  # tokens in index -> two-stage
    assert res.two_stage
    qg, qt, qm = _text_features(model, params, QUERIES)
    s_g = _normalize(qg) @ _normalize(index.global_features).T
    s_l = _numpy_local(index.tokens.astype(np.float32), index.mask, qt, qm).T   # [Q, N]
    for q in range(len(QUERIES)):
        by_global = list(np.argsort(-s_g[q]))
        cand = by_global[:rerank_k]
        reranked = sorted(cand, key=lambda j: -(s_g[q, j] + s_l[q, j]))
        expected = reranked + by_global[rerank_k:]
        assert list(res.indices[q]) == expected
        np.testing.assert_allclose(res.scores[q, :rerank_k], [s_g[q, j] + s_l[q, j] for j in reranked],
                                   rtol=1e-4, atol=1e-3)
    # Same ranking as xmr_jax.retrieval.two_stage_scores on the same features.
    full = np.asarray(two_stage_scores(qg, qt, qm, index.global_features, index.tokens, index.mask,
                                       k=rerank_k))
    np.testing.assert_array_equal(res.indices, np.argsort(-full, axis=1))
    if rerank_k == 3:  # gallery sharded over the 8 test devices (6 images: padded) -> same result
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        sharded = S.search(index, model, params, QUERIES, k=6, rerank_k=rerank_k, mesh=mesh)
        np.testing.assert_array_equal(sharded.indices, res.indices)
        np.testing.assert_allclose(sharded.scores, res.scores, rtol=1e-5, atol=1e-5)


def test_grid_png_with_ground_truth_outlines(setup, tmp_path):
    index, model, params = setup["index"], setup["model"], setup["params"]
    res = S.search(index, model, params, QUERIES, k=4, rerank_k=6)
    truth = {QUERIES[0]: [res.paths[0][1], res.paths[0][3]], QUERIES[1]: [res.paths[1][0]]}
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(truth))
    grid = tmp_path / "out" / "grid.png"
    rc = S.main(["query", "--checkpoint", setup["ckpt"], "--index", setup["index_path"], "--k", "4",
                 "--rerank_k", "6", "--text", QUERIES[0], "--text", QUERIES[1], "--grid", str(grid),
                 "--ground_truth", str(gt_file), "--thumb", "48"])
    assert rc == 0 and grid.is_file()
    layout = S.GridLayout(rows=2, cols=4, thumb=(48, 48))
    img = np.asarray(Image.open(grid).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == layout.size
    green = {(0, 1), (0, 3), (1, 0)}
    for r in range(2):
        for c in range(4):
            x0, y0, x1, y1 = layout.thumb_box(r, c)
            ym = (y0 + y1) // 2
            left_2, left_1 = tuple(img[ym, x0 - 3]), tuple(img[ym, x0 - 1])
            if (r, c) in green:
                assert left_2 == S.GREEN and left_1 == S.GREEN and tuple(img[y0 - 2, x0 + 5]) == S.GREEN
            else:
                assert left_1 == S.GREY and left_2 == S.WHITE
            # The thumbnail itself is pasted inside the box (random pixels, not background).
            assert not (img[y0:y1, x0:x1] == 255).all()


def test_no_tokens_index_and_mode_flags(setup, tmp_path, capsys):
    out = tmp_path / "g"
    assert S.main(["index", "--checkpoint", setup["ckpt"], "--images", str(setup["root"] / "images"),
                   "--index", str(out), "--no_tokens"]) == 0
    index = S.load_index(str(out))
    assert not index.has_tokens and not list(out.glob("chunks/*/tokens.npy"))
    glob, _, _ = store_arrays(index)
    assert glob.shape == (6, 16)
    np.testing.assert_allclose(glob, setup["index"].global_features, atol=1e-6)
    res = S.search(index, setup["model"], setup["params"], QUERIES, k=3)
    assert not res.two_stage and res.indices.shape == (2, 3)
    capsys.readouterr()
    assert S.main(["query", "--index", str(out), "--text", "x", "--two_stage"]) == 2  # checkpoint from index
    assert "--no_tokens" in capsys.readouterr().err


def test_error_cases(setup, tmp_path, capsys):
    ckpt = setup["ckpt"]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert S.main(["index", "--checkpoint", ckpt, "--images", str(empty), "--index", str(tmp_path / "x")]) == 2
    assert "no images" in capsys.readouterr().err
    assert S.main(["index", "--checkpoint", ckpt, "--images", str(tmp_path / "nope"),
                   "--index", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "x").exists()

    bad_dir = tmp_path / "bad"
    _write(bad_dir / "ok1.png", (10, 10), 1)
    _write(bad_dir / "ok2.jpg", (10, 12), 2)
    (bad_dir / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    args = ["index", "--checkpoint", ckpt, "--images", str(bad_dir), "--index", str(tmp_path / "b"),
            "--batch_size", "2", "--chunk_size", "2"]
    assert S.main(args) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert S.main(args + ["--skip_bad_images"]) == 0  # resumes: the chunk that failed is redone
    assert "skipped 1" in capsys.readouterr().err
    index = S.load_index(str(tmp_path / "b"))
    assert index.paths == ["ok1.png", "ok2.jpg"] and index.meta["skipped"] == ["broken.jpg"]
    assert index.chunk_rows == [1, 1] and index.meta["token_shape"][1] == 16
    memory = S.build_index(setup["model"], setup["params"], ["broken.jpg", "ok1.png", "ok2.jpg"],
                           str(bad_dir), skip_bad_images=True, batch_size=2)  # same batches
    for got, want in zip(store_arrays(index), (memory.global_features, memory.tokens, memory.mask)):
        np.testing.assert_array_equal(got, want)

    # Index made with another model: different embed dim -> both named; same shape, other weights.
    other = clip_from_config({**CLIP_CFG, "embed_dim": 8})
    wrong = S.build_index(other, init_clip_params(other, jax.random.key(1)), ["ok1.png"], str(bad_dir))
    S.save_index(wrong, str(tmp_path / "wrong.npz"))
    assert S.main(["query", "--checkpoint", ckpt, "--index", str(tmp_path / "wrong.npz"), "--text", "a"]) == 2
    err = capsys.readouterr().err
    assert "embed_dim 8 (index)" in err and "16 (query model)" in err
    params2 = init_clip_params(setup["model"], jax.random.key(7))
    with pytest.raises(S.IndexMismatchError, match="different weights"):
        S.search(setup["index"], setup["model"], params2, ["a"], k=2)
    assert S.main(["query", "--checkpoint", ckpt, "--index", str(tmp_path / "missing"), "--text", "a"]) == 2
    assert "missing" in capsys.readouterr().err
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"other query": ["a.png"]}))
    assert S.main(["query", "--checkpoint", ckpt, "--index", setup["index_path"], "--text", "a",
                   "--ground_truth", str(gt)]) == 2
    assert "no ground truth for query 'a'" in capsys.readouterr().err


def test_exported_artifact_gives_same_index(setup, tmp_path, capsys):
    from xmr_jax.export import export_jax
    export_jax(setup["model"], setup["params"], str(tmp_path / "exp" / "jax"), platforms=["cpu"])
    out = tmp_path / "e"
    assert S.main(["index", "--exported", str(tmp_path / "exp"), "--images", str(setup["root"] / "images"),
                   "--index", str(out)]) == 0
    index = S.load_index(str(out))
    glob, _, mask = store_arrays(index)
    np.testing.assert_allclose(glob, setup["index"].global_features, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(mask, setup["index"].mask)
    a = S.search(index, S.exported_encoders(str(tmp_path / "exp")), None, QUERIES, k=6)
    b = S.search(setup["index"], setup["model"], setup["params"], QUERIES, k=6)
    np.testing.assert_array_equal(a.indices, b.indices)
    # Weights of an exported model and a checkpoint cannot be compared: the CLI says so.
    capsys.readouterr()
    assert S.main(["query", "--checkpoint", setup["ckpt"], "--index", str(out), "--text", QUERIES[0],
                   "--k", "2"]) == 0
    assert "their weights cannot be compared, only their shapes" in capsys.readouterr().err
    assert S.main(["query", "--index", str(out), "--text", QUERIES[0], "--k", "2"]) == 0  # same model
    assert "cannot be compared" not in capsys.readouterr().err


def test_cli_process_runs_without_tensorflow(setup, tmp_path):
    """`python -m xmr_jax.search` (the package's __main__) indexes and queries with TensorFlow
    unimportable, and a plain run leaves it out of sys.modules (so no TF banner either)."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'tensorflow':\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import runpy\n"
            "sys.argv = ['xmr_jax.search'] + sys.argv[1:]\n"
            "runpy.run_module('xmr_jax.search', run_name='__main__')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-c", code, *a], capture_output=True, text=True,
                                    env=env, timeout=120)
    res = run("query", "--index", setup["index_path"], "--text", QUERIES[0], "--k", "2", "--global_only")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("  ")]) == 2
    res = run("query", "--index", setup["index_path"], "--k", "2")  # no query text
    assert res.returncode == 2 and "--text" in res.stderr
    res = run("index", "--checkpoint", setup["ckpt"], "--images", str(setup["root"] / "images"),
              "--index", str(tmp_path / "again"), "--no_tokens")
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_allclose(store_arrays(S.load_index(str(tmp_path / "again")))[0],
                               setup["index"].global_features, atol=1e-6)
    # Unblocked: the CLI does not import TensorFlow at all (checked in sys.modules at exit).
    check = ("import sys\n"
             "from xmr_jax.search import main\n"
             "rc = main(sys.argv[1:])\n"
             "print('tensorflow loaded:', 'tensorflow' in sys.modules, file=sys.stderr)\n"
             "sys.exit(rc)\n")
    res = subprocess.run([sys.executable, "-c", check, "query", "--index", setup["index_path"], "--text",
                          QUERIES[1], "--k", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tensorflow loaded: False" in res.stderr


def test_package_modules_and_help(tmp_path):
    """The CLI entry is the package's __main__; each job lives in its own module; bad images are
    SearchErrors naming the file."""
    from xmr_jax.search import cli, encoders, index, query, render

    assert S.main is cli.main and S.search is query.search and S.render_grid is render.render_grid
    assert S.build_index is index.build_index and S.Encoders is encoders.Encoders
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(S.SearchError, match="broken.png"):
        S.load_image(str(tmp_path / "broken.png"), IMAGE_SIZE)
    res = subprocess.run([sys.executable, "-m", "xmr_jax.search", "query", "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--rerank_k" in res.stdout and "--allow_other_weights" in res.stdout
    assert "--approx_recall" in res.stdout
