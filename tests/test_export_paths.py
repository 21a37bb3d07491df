"""xmr_jax.export on gs:// (tests/fake_gcs.py): a jax export written to and loaded from a bucket,
CLIP params read from a training workdir in a bucket, without orbax's step-metadata warning."""

import logging

import jax
import numpy as np

from tests import fake_gcs
from tests.test_search import CLIP_CFG, init_clip_params
from xmr_jax import checkpoints
from xmr_jax import export as ex
from xmr_jax.models.clip import clip_from_config


def test_jax_export_and_workdir_params_on_gcs(tmp_path, monkeypatch, caplog):
    fake_gcs.fake_gcs(tmp_path / "gcs", monkeypatch)
    try:
        monkeypatch.chdir(tmp_path)
        model = clip_from_config(CLIP_CFG)
        params = init_clip_params(model, jax.random.key(0))
        ex.export_jax(model, params, "gs://bucket/export/jax", platforms=["cpu"])
        assert (tmp_path / "gcs" / "bucket" / "export" / "jax" / ex.META_FILE).is_file()
        encode_image, encode_text, meta = ex.load_exported_encoders("gs://bucket/export/jax")
        ids = np.zeros((2, CLIP_CFG["context_length"]), np.int32)
        want = model.apply({"params": params}, ids, method="encode_text")[0]
        np.testing.assert_allclose(encode_text(ids)["global"], want, rtol=1e-5, atol=1e-5)

        with checkpoints.Checkpointer("gs://bucket/run", async_save=False) as ckpt:
            ckpt.save(3, {"params": {"base_model": params}, "step": np.int32(3)})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded = ex.load_params_for_export("gs://bucket/run")
        assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not (tmp_path / "gs:").exists()
    finally:
        fake_gcs.unregister()
