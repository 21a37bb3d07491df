"""xmr_jax.export: jax.export artifacts, TF SavedModel, checkpoint loading and the CLI (tiny CLIP)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmr_jax import export as ex
from xmr_jax.models.clip import clip_from_config, clip_param_shapes

IMAGE_SIZE = (32, 16)  # non-square on purpose: H and W must not be swapped anywhere


@pytest.fixture(scope="module")
def tiny():
    model = clip_from_config({"preset": "tiny", "image_size": IMAGE_SIZE})
    # Random values on the real parameter tree (no model.init: its RNG init costs ~10 s CPU here).
    shapes = clip_param_shapes(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    params["visual"]["ln_post"]["scale"] += 1.0
    params["text"]["ln_final"]["scale"] += 1.0
    return model, params


_apply = jax.jit(lambda model, params, x, method: model.apply({"params": params}, x, method=method),
                 static_argnums=(0, 3))


def _inputs(batch: int, seed: int):
    """Random images and token ids; use batch <= 3 and slice, so references compile once."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, *IMAGE_SIZE, 3)).astype(np.float32)
    ids = np.zeros((batch, 77), np.int32)
    for i in range(batch):  # SOT, words, EOT, padding: exercises the EOT pooling and the mask
        n = 3 + 4 * i
        ids[i, 0], ids[i, n + 1] = 49406, 49407
        ids[i, 1:n + 1] = rng.integers(1, 49405, n)
    return images, ids


def _check(outputs, model, params, x, method, atol):
    """outputs (named) == model.apply on x; the reference always runs at batch 3 (one compile)."""
    padded = np.concatenate([x, np.zeros((3 - len(x), *x.shape[1:]), x.dtype)]) if len(x) < 3 else x
    ref = [np.asarray(r)[:len(x)] for r in _apply(model, params, padded, method)]
    names = ("global", "tokens", "mask")[:len(ref)]
    assert sorted(outputs) == sorted(names)
    for name, r in zip(names, ref):
        got = np.asarray(outputs[name])
        assert got.shape == r.shape, (name, got.shape, r.shape)
        if name == "mask":
            np.testing.assert_array_equal(got, r)
        else:
            np.testing.assert_allclose(got, r, atol=atol, rtol=0, err_msg=f"{method}/{name}")


def test_jax_export_round_trip_symbolic_batch(tiny, tmp_path):
    model, params = tiny
    meta = ex.export_jax(model, params, str(tmp_path))  # default: cpu, cuda and tpu lowerings
    assert meta["params"] == "constants"
    on_disk = json.loads((tmp_path / ex.META_FILE).read_text())
    assert on_disk["encode_image"]["inputs"]["images"] == {"shape": ["b", 32, 16, 3], "dtype": "float32"}
    assert on_disk["encode_text"]["inputs"]["token_ids"] == {"shape": ["b", 77], "dtype": "int32"}
    assert on_disk["encode_image"]["outputs"]["tokens"]["shape"] == ["b", 1 + 4 * 2, 32]
    assert on_disk["encode_text"]["outputs"]["mask"] == {"shape": ["b", 77], "dtype": "bool"}

    image_exp = jax.export.deserialize(bytearray((tmp_path / ex.IMAGE_FILE).read_bytes()))
    text_exp = ex.load_exported(str(tmp_path / ex.TEXT_FILE))
    assert set(image_exp.platforms) == {"cpu", "cuda", "tpu"}
    images3, ids3 = _inputs(3, seed=1)
    for batch in (1, 3):  # one artifact, two batch sizes
        images, ids = images3[:batch], ids3[:batch]
        _check(image_exp.call(images), model, params, images, "encode_image", atol=1e-5)
        _check(text_exp.call(ids), model, params, ids, "encode_text", atol=1e-5)
    with pytest.raises(Exception, match="(?i)shape"):
        image_exp.call(np.zeros((2, 16, 32, 3), np.float32))  # H/W swapped: rejected


def test_jax_export_params_as_argument(tiny, tmp_path):
    model, params = tiny
    meta = ex.export_jax(model, params, str(tmp_path), platforms=("cpu",), params_as_argument=True)
    assert meta["params"] == "argument" and (tmp_path / ex.PARAMS_FILE).is_file()
    encode_image, encode_text, meta = ex.load_exported_encoders(str(tmp_path))
    images, ids = _inputs(3, seed=7)
    _check(encode_image(images), model, params, images, "encode_image", atol=1e-5)
    _check(encode_text(ids), model, params, ids, "encode_text", atol=1e-5)
    # the raw artifact takes (params, x): other weights of the same shapes can be swapped in
    other = jax.tree.map(lambda p: p * 0.5, params)
    raw = ex.load_exported(str(tmp_path / ex.TEXT_FILE))
    _check(raw.call(other, ids), model, other, ids, "encode_text", atol=1e-5)


def test_export_input_errors(tiny, tmp_path):
    model, params = tiny
    with pytest.raises(ex.ExportError, match=r"image_size \(32, 16\)"):
        ex.export_jax(model, params, str(tmp_path), image_shape=(16, 32))
    with pytest.raises(FileNotFoundError, match="jax_export.json"):
        ex.load_exported_encoders(str(tmp_path / "nothing"))
    with pytest.raises(ex.ExportError, match="--formats"):
        ex.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--formats", "jax,onnx"])
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        ex.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])


def test_saved_model_signatures(tiny, tmp_path):
    tf = pytest.importorskip("tensorflow")
    model, params = tiny
    ex.export_saved_model(model, params, str(tmp_path / "sm"), platforms=("cpu",))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    assert set(loaded.signatures) == {"encode_image", "encode_text"}
    image_sig, text_sig = loaded.signatures["encode_image"], loaded.signatures["encode_text"]
    assert image_sig.structured_input_signature[1]["images"].shape.as_list() == [None, 32, 16, 3]
    assert text_sig.structured_input_signature[1]["token_ids"].shape.as_list() == [None, 77]
    images3, ids3 = _inputs(3, seed=11)
    for batch in (1, 3):  # dynamic batch
        images, ids = images3[:batch], ids3[:batch]
        out = {k: v.numpy() for k, v in image_sig(images=tf.constant(images)).items()}
        _check(out, model, params, images, "encode_image", atol=1e-4)
        out = {k: v.numpy() for k, v in text_sig(token_ids=tf.constant(ids)).items()}
        _check(out, model, params, ids, "encode_text", atol=1e-4)


def test_cli_from_converted_folder_and_hf_wiring(tiny, tmp_path, monkeypatch):
    from xmr_jax.convert import hf, save_converted
    model, params = tiny
    save_converted(model, params, str(tmp_path / "conv"))  # what `python -m xmr_jax.convert` writes
    calls = []
    monkeypatch.setattr(hf, "to_hf_clip", lambda m, p, out: calls.append((m, p, out)) or out)
    out = tmp_path / "out"
    rc = ex.main(["--checkpoint", str(tmp_path / "conv" / "params.msgpack"), "--out", str(out),
                  "--formats", "jax,hf", "--platforms", "cpu"])
    assert rc == 0
    encode_image, encode_text, meta = ex.load_exported_encoders(str(out / "jax"))
    assert meta["model"]["image_size"] == list(IMAGE_SIZE) and meta["platforms"] == ["cpu"]
    images, ids = _inputs(3, seed=3)
    _check(encode_image(images), model, params, images, "encode_image", atol=1e-5)
    _check(encode_text(ids), model, params, ids, "encode_text", atol=1e-5)
    (hf_model, hf_params, hf_out), = calls
    assert hf_out == str(out / "hf") and hf_model.fields() == model.fields()
    np.testing.assert_array_equal(hf_params["visual"]["proj"], params["visual"]["proj"])


def test_cli_from_training_workdir(tiny, tmp_path):
    """A workdir as xmr_jax.checkpoints writes it; CLIP params under params["base_model"]."""
    from xmr_jax.checkpoints import Checkpointer
    from xmr_jax.train import TrainState
    model, params = tiny
    full = {"base_model": params, "classifier": {"kernel": jnp.ones((32, 5))}}
    state = TrainState(step=jnp.asarray(7, jnp.int32), params=full,
                       opt_state={"mu": jax.tree.map(jnp.zeros_like, full)}, nonfinite=jnp.zeros((), jnp.int32))
    workdir = tmp_path / "run"
    with Checkpointer(str(workdir), keep=2, async_save=False) as ckpt:
        ckpt.save(3, jax.tree.map(lambda x: x * 0, state))
        ckpt.save(7, state)
    (workdir / "config.json").write_text(json.dumps(
        {"model_family": "irra", "precision": "bfloat16",
         "model": {"clip": {"preset": "tiny", "image_size": list(IMAGE_SIZE)}}}))

    loaded = ex.load_params_for_export(str(workdir))  # newest step (7), not the zeroed step 3
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)
    with pytest.raises(FileNotFoundError, match=r"^--checkpoint=.*: no checkpoint for step 5 .*saved steps: \[3, 7\]"):
        ex.load_params_for_export(str(workdir), step=5)
    # the checkpoints folder (newest step) and one step folder: the model from the workdir's config.json
    _, newest = ex.load_for_export(str(workdir / "checkpoints"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), newest, params)
    step_model, step3 = ex.load_for_export(str(workdir / "checkpoints" / "3"))
    assert step_model == model.clone(dtype=step_model.dtype)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(step3))  # step 3 was saved zeroed

    out = tmp_path / "out"
    assert ex.main(["--checkpoint", str(workdir), "--out", str(out), "--formats", "jax",
                    "--platforms", "cpu"]) == 0
    encode_image, _, meta = ex.load_exported_encoders(str(out / "jax"))
    assert meta["model"]["dtype"] == "float32"  # training precision is not applied to the export
    images, _ = _inputs(3, seed=5)
    _check(encode_image(images), model, params, images, "encode_image", atol=1e-5)

    (workdir / "config.json").unlink()
    with pytest.raises(ex.ExportError, match="pass --config"):
        ex.load_for_export(str(workdir))


def test_export_module_imports_without_tensorflow():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'tensorflow' or name.startswith('orbax.export'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import xmr_jax.export as ex\n"
            "assert 'tensorflow' not in sys.modules\n"
            "try:\n"
            "    ex.export_saved_model(None, None, '/nonexistent')\n"
            "except ImportError as e:\n"
            "    assert 'savedmodel' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('expected ImportError')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
