"""xmr_jax.image_transform (host-side test transform, NumPy + PIL) vs IRRA's PIL resize and vs the
tf.data evaluation transform of data_pipelines/preprocess.py."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from xmr_jax import image_transform as it

# (h, w) sources for a 384x128 (HxW) target: shrink both axes, shrink H only, enlarge, same size.
SOURCES = ((700, 260), (500, 128), (300, 100), (384, 128))
# Each axis on its own: H enlarges while W shrinks, and the reverse.
MIXED = ((100, 200), (500, 64))


def _noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _smooth(h, w, seed):
    """A photo-like image: smooth gradients with a few sharp edges (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    base = np.stack([128 + 100 * np.sin(6 * y + c) * np.cos(4 * x - c) for c in range(3)], -1)
    base[: h // 3, w // 2:] = rng.integers(0, 256, 3)  # a flat block with sharp edges
    return np.clip(base, 0, 255).astype(np.uint8)


def test_host_resize_matches_pil_uint8():
    """it.resize (PIL bilinear on float channels) vs PIL's uint8 RGB resize, as IRRA calls it:
    they differ by PIL's rounding (uint8 after each of its two 1-D passes) only: measured max
    0.940 / 0.500 / 0.996 / 0 grey levels for the four SOURCES."""
    for (h, w), seed in zip(SOURCES, range(1, 5)):
        image = _noise(h, w, seed)
        pil = np.asarray(Image.fromarray(image).resize((128, 384), Image.Resampling.BILINEAR), np.float32)
        ours = it.resize(image, (384, 128))
        assert ours.shape == (384, 128, 3) and ours.dtype == np.float32
        assert np.abs(ours - pil).max() <= 1.0, (h, w)
        assert np.abs(ours - pil).mean() <= 0.35, (h, w)  # measured 0.277 / 0.250 / 0.304 / 0


def test_normalize_matches_formula():
    image = _noise(8, 4, 0)
    want = (image / 255.0 - np.array(it.CLIP_MEAN)) / np.array(it.CLIP_STD)
    np.testing.assert_allclose(it.normalize(image), want, rtol=0, atol=1e-5)
    assert it.normalize(image).dtype == np.float32


def test_host_transform_equals_tf_eval_transform(tmp_path):
    """load_image (decode + PIL resize + normalize) == preprocess.eval_image on the same file, PNG
    and JPEG, shrinking and enlarging: float tolerance (measured <= 0.0041 grey levels in resize,
    i.e. ~6e-5 after normalization)."""
    tf = pytest.importorskip("tensorflow")
    from data_pipelines import preprocess as pp

    assert pp.CLIP_MEAN is it.CLIP_MEAN and pp.CLIP_STD is it.CLIP_STD  # one copy of the constants
    for (h, w), seed in zip(SOURCES + MIXED, range(10, 16)):
        for fmt, make in (("png", _noise), ("jpg", _smooth)):
            path = tmp_path / f"{h}x{w}.{fmt}"
            Image.fromarray(make(h, w, seed)).save(path, **({"quality": 90} if fmt == "jpg" else {}))
            ours = it.load_image(path, (384, 128))
            ref = pp.eval_image(tf.constant(path.read_bytes()), (384, 128)).numpy()
            assert ours.shape == ref.shape == (384, 128, 3)
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4, err_msg=f"{h}x{w} {fmt}")
    # The tf.data train transform without augmentation is the same transform.
    seeds = pp.sample_seeds(tf.constant([0, 0], tf.int64), 0)
    plain = pp.train_image(tf.constant(path.read_bytes()), (384, 128), seeds, augment=False).numpy()
    np.testing.assert_allclose(it.load_image(path, (384, 128)), plain, rtol=0, atol=1e-4)


def test_grey_and_palette_images_decode_as_rgb(tmp_path):
    grey = _noise(20, 10, 3)[..., 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(_noise(20, 10, 4)).convert("P").save(tmp_path / "p.png")
    rgb = it.decode_rgb(tmp_path / "g.png")
    assert rgb.shape == (20, 10, 3) and (rgb == grey[..., None]).all()
    assert it.decode_rgb(tmp_path / "p.png").shape == (20, 10, 3)


def test_bad_input_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(it.ImageDecodeError, match="broken.jpg"):
        it.load_image(bad, (8, 4))
    with pytest.raises(it.ImageDecodeError, match="missing.png"):
        it.load_image(tmp_path / "missing.png", (8, 4))
    with pytest.raises(ValueError, match=r"size must be a positive \(H, W\)"):
        it.resize(_noise(4, 4, 0), (0, 4))


def test_module_does_not_import_tensorflow_or_jax():
    code = ("import sys, numpy as np\n"
            "from xmr_jax import image_transform as it\n"
            "it.eval_transform(np.zeros((9, 5, 3), np.uint8), (4, 2))\n"
            "print(sorted(m for m in ('tensorflow', 'jax') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

