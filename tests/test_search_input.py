"""xmr_jax.search input and output: empty queries rejected, truncation reported, a score comparable
across queries printed beside the rerank score, and index / grid / ground truth on gs:// paths."""

import json

import jax
import numpy as np
import pytest

from tests import fake_gcs
from tests.test_search import CLIP_CFG, FILES, _write, init_clip_params
from xmr_jax import search as S
from xmr_jax.models.clip import clip_from_config


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from xmr_jax.convert import save_converted

    root = tmp_path_factory.mktemp("search_input")
    model = clip_from_config(CLIP_CFG)
    params = init_clip_params(model, jax.random.key(3))
    save_converted(model, params, str(root / "ckpt"))
    for i, (name, size) in enumerate(list(FILES.items())[:4]):
        _write(root / "images" / name, size, seed=i)
    assert S.main(["index", "--checkpoint", str(root / "ckpt"), "--images", str(root / "images"),
                   "--index", str(root / "g")]) == 0
    memory = S.build_index(model, params, sorted(list(FILES)[:4]), str(root / "images"))
    S.save_index(memory, str(root / "g.npz"))  # format 1, as earlier versions wrote
    return {"root": root, "model": model, "params": params, "index": S.load_index(str(root / "g")),
            "memory": memory, "args": ["query", "--checkpoint", str(root / "ckpt"), "--index", str(root / "g")]}


def test_empty_queries_are_rejected(small, capsys):
    capsys.readouterr()
    assert S.main([*small["args"], "--text", "a red coat", "--text", "   "]) == 2
    assert "--text #2 is empty" in capsys.readouterr().err
    with pytest.raises(S.SearchError, match="query 2 of 2 is empty"):
        S.search(small["index"], small["model"], small["params"], ["a red coat", ""], k=2)


def test_truncation_is_reported_and_cosine_is_comparable(small, capsys):
    long_query = " ".join(["a woman in a long red coat with a black bag"] * 50)  # 500 words
    short_query = "a red coat"
    capsys.readouterr()
    assert S.main([*small["args"], "--text", short_query, "--text", long_query, "--k", "3"]) == 0
    captured = capsys.readouterr()
    # context_length 16: SOT + 14 word tokens + EOT
    assert "[query] query 2: 550 tokens, only the first 14 were used" in captured.err
    assert "query 1:" not in captured.err  # the short one is not cut
    assert "cut to 14 of 550 tokens" in captured.out
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("  ")]
    assert len(rows) == 6 and all(len(r) == 4 for r in rows)  # rank, score, cosine, path
    res = S.search(small["index"], small["model"], small["params"], [short_query, long_query], k=3)
    assert res.two_stage
    np.testing.assert_allclose([float(r[2]) for r in rows], res.cosine.reshape(-1), atol=1e-4)
    # The cosine is the global cosine of each result, bounded whatever the query length.
    from tests.test_search import _normalize, _text_features

    qg, _, _ = _text_features(small["model"], small["params"], [short_query, long_query])
    want = np.take_along_axis(_normalize(qg) @ _normalize(small["memory"].global_features).T, res.indices, 1)
    np.testing.assert_allclose(res.cosine, want, atol=1e-5)
    assert np.all(np.abs(res.cosine) <= 1.0 + 1e-6)


def test_index_grid_and_ground_truth_on_gcs(small, tmp_path, monkeypatch, capsys):
    fake_gcs.fake_gcs(tmp_path / "gcs", monkeypatch)
    try:
        monkeypatch.chdir(tmp_path)
        S.save_index(small["memory"], "gs://bucket/idx/g.npz")  # format 1 still round-trips on gs://
        again = S.load_index("gs://bucket/idx/g.npz")
        np.testing.assert_array_equal(again.global_features, small["memory"].global_features)
        (tmp_path / "gcs" / "bucket" / "gt.json").write_text(json.dumps({"a red coat": [again.paths[0]]}))
        capsys.readouterr()
        assert S.main(["query", "--checkpoint", str(small["root"] / "ckpt"), "--index", "gs://bucket/idx/g.npz",
                       "--text", "a red coat", "--k", "2", "--ground_truth", "gs://bucket/gt.json",
                       "--grid", "gs://bucket/out/grid.png"]) == 0
        assert (tmp_path / "gcs" / "bucket" / "out" / "grid.png").read_bytes()[:4] == b"\x89PNG"
        # The CLI writes an index folder to gs:// and queries it (tokens by ranged reads).
        ckpt, images = str(small["root"] / "ckpt"), str(small["root"] / "images")
        assert S.main(["index", "--checkpoint", ckpt, "--images", images, "--index", "gs://bucket/gal",
                       "--chunk_size", "3", "--no_progress"]) == 0
        assert (tmp_path / "gcs" / "bucket" / "gal" / "chunks" / "000001" / "DONE").is_file()
        capsys.readouterr()
        assert S.main(["query", "--index", "gs://bucket/gal", "--text", "a red coat", "--k", "3"]) == 0
        remote_out = capsys.readouterr().out
        assert S.main([*small["args"], "--text", "a red coat", "--k", "3"]) == 0
        assert capsys.readouterr().out.replace("gs://bucket/gal", "") == remote_out.replace("gs://bucket/gal", "")
        assert not (tmp_path / "gs:").exists()
    finally:
        fake_gcs.unregister()


def test_output_paths_checked_before_any_work(small, tmp_path, capsys):
    """--index / --grid that cannot be written fail at once (before the model loads and the images
    are encoded), naming the flag; an --index that is a folder too."""
    ckpt, images = str(small["root"] / "ckpt"), str(small["root"] / "images")
    (tmp_path / "a_file").write_text("x")
    capsys.readouterr()
    for target, why in ((tmp_path / "a_file" / "g", "its folder cannot be created or written"),
                        (tmp_path / "a_file", "is a file; the index is a folder"),
                        (tmp_path, "is a folder that holds other files and no index.json"),
                        (tmp_path / "g.npz", "the index is a folder of chunks now")):
        assert S.main(["index", "--checkpoint", ckpt, "--images", images, "--index", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"error: --index {str(target)!r}" in err and why in err
        assert "[index]" not in err  # nothing was encoded
    assert S.main([*small["args"], "--text", "a", "--grid", str(tmp_path / "a_file" / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert f"--grid {str(tmp_path / 'a_file' / 'grid.png')!r}" in err and "a_file is a file" in err
    assert S.main([*small["args"], "--text", "a", "--grid", str(tmp_path / "g.png"),
                   "--images", str(tmp_path / "nope")]) == 2
    assert "--images" in capsys.readouterr().err and not (tmp_path / "g.png").exists()


def test_not_an_index_is_named_without_numpy_advice(small, tmp_path, capsys):
    np.save(tmp_path / "array.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    (tmp_path / "config.json").write_text("{}")
    cases = {str(tmp_path): "is a folder", str(tmp_path / "config.json"): "not an .npz file",
             str(tmp_path / "array.npy"): "single .npy array",
             str(tmp_path / "other.npz"): "lacks ['global', 'paths', 'meta']"}
    capsys.readouterr()
    for path, why in cases.items():
        assert S.main([*small["args"][:3], "--index", path, "--text", "a"]) == 2
        err = capsys.readouterr().err
        assert why in err and path in err and "pickle" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_moved_images_reported_and_grid_shows_cosine(small, tmp_path, capsys):
    """A grid whose images moved since indexing says so (and --images fixes it); two-stage grids
    label each result with its score and its global cosine."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(small["root"] / "images", moved)
    index = S.load_index(str(small["root"] / "g.npz"))  # format 1: loads whole into memory
    assert isinstance(index, S.ImageIndex)
    index.meta["image_root"] = str(tmp_path / "gone")
    S.save_index(index, str(tmp_path / "g.npz"))
    args = ["query", "--checkpoint", str(small["root"] / "ckpt"), "--index", str(tmp_path / "g.npz"),
            "--text", "a red coat", "--k", "2", "--grid", str(tmp_path / "grid.png")]
    capsys.readouterr()
    assert S.main(args) == 0
    assert "2 of the 2 result images are not under" in capsys.readouterr().err
    assert S.main(args + ["--images", str(moved)]) == 0
    assert "not under" not in capsys.readouterr().err

    res = S.search(index, small["model"], small["params"], ["a red coat"], k=2)
    plain, layout = S.render_grid(res.texts, res.paths, res.scores, str(moved))
    labelled, _ = S.render_grid(res.texts, res.paths, res.scores, str(moved), cosine=res.cosine)
    plain, labelled = np.asarray(plain), np.asarray(labelled)
    for c in range(2):
        x0, y0, x1, y1 = layout.thumb_box(0, c)
        np.testing.assert_array_equal(plain[y0:y1, x0:x1], labelled[y0:y1, x0:x1])  # same thumbnail
        below = slice(y1 + layout.pad - 2, y1 + layout.pad - 2 + layout.label_h)
        cell = slice(x0, x0 + layout.cell[1] - 2)
        assert (labelled[below, cell] != 255).sum() > (plain[below, cell] != 255).sum()  # more text
