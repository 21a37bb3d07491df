"""Region-feature builders (flickr30k_regions, coco_regions) on tiny fixtures in TERAN's layout."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(Path(__file__).parent))
import teran_fixtures as fx  # noqa: E402

from data_pipelines import build  # noqa: E402
from data_pipelines.builders import annotations as ann  # noqa: E402
from data_pipelines.builders import region_features as rf  # noqa: E402

ID_KEY = {"flickr30k_regions": "imgid", "coco_regions": "cocoid"}


def _tree(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def _read(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def _fail(name, manual_dir, data_dir, error, *patterns, one_line=True):
    """The build raises `error` with a message matching every pattern, one line unless a missing
    folder (whose message ends with the expected layout, as every builder's does); data dir unchanged."""
    before = _tree(data_dir)
    with pytest.raises(error) as info:
        build.build(name, manual_dir, data_dir)
    message = str(info.value)
    if one_line:
        assert "\n" not in message, message
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in {message!r}"
    assert not build.builder_class(name)(data_dir=str(data_dir)).is_prepared()
    assert _tree(data_dir) == before
    return message


def _json(manual_dir: Path, name: str) -> Path:
    p = manual_dir / "annotations" / "dataset_flickr30k.json"
    return p if name == "flickr30k_regions" else manual_dir / "dataset_coco.json"


def _sizes(manual_dir: Path, name: str) -> dict[int, tuple[int, int]]:
    if name == "flickr30k_regions":
        from PIL import Image

        recs = json.loads(_json(manual_dir, name).read_text())["images"]
        return {r["imgid"]: Image.open(manual_dir / "flickr30k-images" / r["filename"]).size for r in recs}
    out = {}
    for f in ("train2014", "val2014"):
        for im in json.loads((manual_dir / "annotations" / f"captions_{f}.json").read_text())["images"]:
            out[im["id"]] = (im["width"], im["height"])
    return out


WRITERS = {"flickr30k_regions": fx.write_flickr30k_teran, "coco_regions": fx.write_coco_teran}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_build_matches_files(name, tmp_path):
    manual = WRITERS[name](tmp_path / "m")
    builder = build.build(name, manual, tmp_path / "tfds")
    sizes = _sizes(manual, name)
    records = json.loads(_json(manual, name).read_text())["images"]
    expected: dict[str, list[dict]] = {}
    for r in records:
        expected.setdefault("train" if r["split"] == "restval" else r["split"], []).append(r)
    assert set(builder.info.splits) == {"train", "val", "test"}
    for split, recs in expected.items():
        got = _read(builder, split)
        assert [int(e["image_index"]) for e in got] == list(range(len(recs)))
        assert builder.build_counts[split].images == len(recs)
        assert builder.build_counts[split].captions == 5 * len(recs)
        for e, r in zip(got, recs):
            image_id = r[ID_KEY[name]]
            assert int(e["image_id"]) == image_id
            assert [c.decode() for c in e["captions"]] == [s["raw"] for s in r["sentences"][:5]]
            feat = np.load(manual / "features_36" / "bu_att" / f"{image_id}.npz")["feat"]
            box = np.load(manual / "features_36" / "bu_box" / f"{image_id}.npy")
            w, h = sizes[image_id]
            assert e["regions"].dtype == np.float32 and e["regions"].shape == (36, 2048)
            np.testing.assert_array_equal(e["regions"], feat)
            assert e["boxes"].dtype == np.float32 and e["boxes"].shape == (36, 4)
            np.testing.assert_allclose(e["boxes"], box / np.array([w, h, w, h]), rtol=1e-6)
            assert 0 < e["boxes"].max() <= 1.0
            assert tuple(e["image_size"]) == (w, h)
            assert e["path"].decode().endswith(r["filename"])


def test_coco_restval_in_train_and_sizes_from_images_without_annotations(tmp_path):
    manual = fx.write_coco_teran(tmp_path / "m")
    builder = build.build("coco_regions", manual, tmp_path / "a")
    assert [int(e["image_id"]) for e in _read(builder, "train")] == [500, 507, 514]  # train, restval, train
    assert len(_read(builder, "train")[1]["captions"]) == 5  # the 6-caption image keeps its first 5
    # without the COCO annotation files the sizes come from the image files
    for f in ("train2014", "val2014"):
        (manual / "annotations" / f"captions_{f}.json").unlink()
    _fail("coco_regions", manual, tmp_path / "b", ann.ManualDirError, r"image folder\(s\) \['train2014', 'val2014'\]",
          one_line=False)
    from PIL import Image

    for r in json.loads((manual / "dataset_coco.json").read_text())["images"]:
        (manual / r["filepath"]).mkdir(exist_ok=True)
        w, h = fx.image_size(r["imgid"])
        Image.new("RGB", (w, h)).save(manual / r["filepath"] / r["filename"])
    other = build.build("coco_regions", manual, tmp_path / "b")
    for split in ("train", "test"):
        for a, b in zip(_read(builder, split), _read(other, split)):
            np.testing.assert_array_equal(a["boxes"], b["boxes"])


def test_missing_feature_files_named(tmp_path):
    data = tmp_path / "tfds"
    manual = fx.write_flickr30k_teran(tmp_path / "m")
    npz = manual / "features_36" / "bu_att" / "6.npz"
    npz.rename(tmp_path / "6.npz")
    _fail("flickr30k_regions", manual, data, rf.FeatureFileError,
          re.escape(str(npz)) + r" not found", r"imgid 6")
    (tmp_path / "6.npz").rename(npz)
    npy = manual / "features_36" / "bu_box" / "2.npy"
    npy.unlink()
    _fail("flickr30k_regions", manual, data, rf.FeatureFileError, re.escape(str(npy)) + r" not found")


@pytest.mark.parametrize("regions,dim,boxes,pattern", [
    (35, 2048, 35, r"'feat' has shape \[35, 2048\], expected \[36, 2048\]"),
    (36, 2047, 36, r"'feat' has shape \[36, 2047\], expected \[36, 2048\]"),
    (36, 2048, 35, r"box count 35 != region count 36 in 3\.npz"),
])
def test_wrong_shapes_named(tmp_path, regions, dim, boxes, pattern):
    manual = fx.write_flickr30k_teran(tmp_path / "m")
    fx.write_region_files(manual, 3, fx.image_size(3), regions=regions, dim=dim, boxes=boxes)
    where = "bu_box/3.npy" if boxes != regions else "bu_att/3.npz"
    _fail("flickr30k_regions", manual, tmp_path / "tfds", rf.FeatureFileError, re.escape(where), pattern)


def test_box_columns_and_bad_npz_key(tmp_path):
    manual = fx.write_coco_teran(tmp_path / "m")
    np.save(manual / "features_36" / "bu_box" / "521.npy", np.zeros((36, 5), np.float32))
    _fail("coco_regions", manual, tmp_path / "t", rf.FeatureFileError,
          r"bu_box/521\.npy \(dataset_coco\.json images\[3\] \(cocoid 521\)\): boxes have shape \[36, 5\]")
    fx.write_region_files(manual, 521, fx.image_size(3))
    np.savez(manual / "features_36" / "bu_att" / "528.npz", features=np.zeros((36, 2048), np.float32))
    _fail("coco_regions", manual, tmp_path / "t", rf.FeatureFileError, r"528\.npz: no array 'feat' \(it holds \['features'\]\)")


@pytest.mark.parametrize("edit,pattern", [
    (lambda r: r["sentences"][2].update(raw="   "), r"images\[4\] \(imgid 4\): caption 2 has no tokens"),
    (lambda r: r["sentences"][0].update(tokens=[]), r"images\[4\] \(imgid 4\): caption 0 has no tokens"),
    (lambda r: r["sentences"].pop(), r"images\[4\] \(imgid 4\): 4 sentences, expected at least 5"),
])
def test_bad_captions_named(tmp_path, edit, pattern):
    manual = fx.write_flickr30k_teran(tmp_path / "m")
    path = _json(manual, "flickr30k_regions")
    data = json.loads(path.read_text())
    edit(data["images"][4])
    path.write_text(json.dumps(data))
    _fail("flickr30k_regions", manual, tmp_path / "tfds", ann.AnnotationError, r"dataset_flickr30k\.json " + pattern)


def test_missing_size_sources_named(tmp_path):
    manual = fx.write_flickr30k_teran(tmp_path / "m")
    (manual / "flickr30k-images" / "1005.jpg").unlink()
    _fail("flickr30k_regions", manual, tmp_path / "t", ann.BadImageError,
          r"images\[5\] \(imgid 5\): image .*1005\.jpg not found \(needed for its size")
    manual = fx.write_coco_teran(tmp_path / "c")
    path = manual / "annotations" / "captions_val2014.json"
    data = json.loads(path.read_text())
    data["images"] = [im for im in data["images"] if im["id"] != 535]
    path.write_text(json.dumps(data))
    _fail("coco_regions", manual, tmp_path / "t", ann.AnnotationError, r"cocoid 535\): image id 535 has no width/height")


def test_cli_and_skip_bad_images_refused(tmp_path, capsys):
    manual = fx.write_flickr30k_teran(tmp_path / "m")
    data = tmp_path / "tfds"
    (manual / "features_36" / "bu_att" / "0.npz").unlink()
    argv = ["--dataset", "flickr30k_regions", "--manual_dir", str(manual), "--data_dir", str(data)]
    assert build.main(argv) == 2
    err = capsys.readouterr().err
    assert "bu_att/0.npz not found" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ann.DataSetError, match="skip_bad_images is not supported"):
        build.build("flickr30k_regions", manual, data, skip_bad_images=True)
    fx.write_region_files(manual, 0, fx.image_size(0))
    assert build.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"flickr30k_regions: test\s+3\s+15", out)


def test_built_split_feeds_tgdt_regions_and_ndcg(tmp_path):
    """The stored fields fit the pieces that use them: WordPiece ids and the regions/boxes go into
    TGDTRegions' encoders; the caption-major similarity/relevance layout into ndcg_metrics."""
    import jax
    import jax.numpy as jnp

    from xmr_jax import metrics
    from xmr_jax.models.tgdt_regions import tgdt_regions_from_config
    from xmr_jax.wordpiece import WordPieceTokenizer

    builder = build.build("flickr30k_regions", fx.write_flickr30k_teran(tmp_path / "m"), tmp_path / "tfds")
    test = _read(builder, "test")
    regions = np.stack([e["regions"] for e in test])            # [3, 36, 2048]
    boxes = np.stack([e["boxes"] for e in test])                # [3, 36, 4]
    captions = [c.decode() for e in test for c in e["captions"]]  # caption 5 i + k belongs to image i
    tok = WordPieceTokenizer(fx.write_bert_vocab(tmp_path / "vocab.txt"))
    ids = tok.encode(captions, max_length=None)                 # [15, S], padded to the longest
    assert (ids[:, 0] == tok.cls_id).all() and tok.unk_id not in ids
    model = tgdt_regions_from_config({"preset": "tiny", "region_dim": 2048, "vocab_size": tok.vocab_size})
    params = model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 36, ids.shape[1]))["params"]
    img, img_tokens, _ = model.apply({"params": params}, regions, boxes, method="encode_image", token_set="test")
    txt, _, _ = model.apply({"params": params}, jnp.asarray(ids), method="encode_text", token_set="test")
    assert img.shape == (3, 32) and img_tokens.shape == (3, 37, 32) and txt.shape == (15, 32)
    sim = np.asarray(img / jnp.linalg.norm(img, axis=1, keepdims=True)) @ np.asarray(
        txt / jnp.linalg.norm(txt, axis=1, keepdims=True)).T
    rel = np.random.default_rng(0).random((15, 3)).astype(np.float32)
    out = metrics.ndcg_metrics(sim, {"rougeL": rel}, k=25)
    assert 0 < out["i2t_ndcg_rougeL"] <= 1 and 0 < out["t2i_ndcg_rougeL"] <= 1
