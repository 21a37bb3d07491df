"""synthetic_people builder: determinism, identity splits, pid relabelling, counts, captions."""

import re

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines.builders import synthetic_people as sp  # noqa: E402
from data_pipelines.builders.synthetic_people import captions as captions_lib  # noqa: E402
from data_pipelines.builders.synthetic_people import draw  # noqa: E402

TINY = {c.name: c for c in sp.BUILDER_CONFIGS}["tiny"]


def _records(builder, split):
    out = []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        out.append({"image": ex["image"], "captions": [c.decode() for c in ex["captions"]],
                    "pid": int(ex["pid"]), "image_index": int(ex["image_index"]),
                    "path": ex["path"].decode()})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    builder = sp.build(str(tmp_path_factory.mktemp("sp_a")), "tiny", verbose=False)
    return {split: _records(builder, split) for split in ("train", "test")}


def _original_id(path):
    return int(re.fullmatch(r"(train|test)/p(\d{5})_\d+\.png", path).group(2))


def test_counts_and_schema(tiny):
    n_train, n_test = TINY.num_train_ids * TINY.images_per_id, TINY.num_test_ids * TINY.images_per_id
    assert len(tiny["train"]) == n_train and len(tiny["test"]) == n_test
    for split in ("train", "test"):
        recs = tiny[split]
        assert [r["image_index"] for r in recs] == list(range(len(recs)))  # stored in order
        for r in recs:
            assert r["image"].shape == (TINY.image_height, TINY.image_width, 3)
            assert r["image"].dtype == np.uint8
            assert len(r["captions"]) == TINY.captions_per_image
            assert all(len(c.split()) >= 6 for c in r["captions"])
            assert r["path"].startswith(split + "/")


def test_identities_disjoint_and_pids_relabelled(tiny):
    train_orig = {_original_id(r["path"]) for r in tiny["train"]}
    test_orig = {_original_id(r["path"]) for r in tiny["test"]}
    assert len(train_orig) == TINY.num_train_ids and len(test_orig) == TINY.num_test_ids
    assert not train_orig & test_orig
    assert train_orig | test_orig == set(range(1, TINY.num_train_ids + TINY.num_test_ids + 1))
    # Train pids: 0..N-1 in order of original id, images_per_id images each.
    pids = np.array([r["pid"] for r in tiny["train"]])
    assert sorted(set(pids.tolist())) == list(range(TINY.num_train_ids))
    assert np.all(np.bincount(pids) == TINY.images_per_id)
    by_pid = {r["pid"]: _original_id(r["path"]) for r in tiny["train"]}
    assert [by_pid[p] for p in range(TINY.num_train_ids)] == sorted(train_orig)
    # Test pids keep the original id.
    assert all(r["pid"] == _original_id(r["path"]) for r in tiny["test"])


def test_identities_are_distinct_attribute_combinations_and_captions_match():
    total = TINY.num_train_ids + TINY.num_test_ids
    rng = np.random.default_rng([TINY.seed, 0])
    identities = draw.sample_identities(rng, total)
    assert len(set(identities)) == total
    for attrs in identities:
        for k in range(20):
            caption = captions_lib.make_caption(attrs, np.random.default_rng(k)).lower()
            colour_words = {"grey": ("grey", "gray"), "purple": ("purple", "violet")}
            assert any(w in caption for w in colour_words.get(attrs.top_colour, (attrs.top_colour,)))
            assert any(w in caption for w in colour_words.get(attrs.bottom_colour, (attrs.bottom_colour,)))
            assert caption.endswith(".") and " a a" not in caption and "a orange" not in caption


def test_captions_agree_with_identity(tiny):
    total = TINY.num_train_ids + TINY.num_test_ids
    rng = np.random.default_rng([TINY.seed, 0])
    identities = draw.sample_identities(rng, total)
    original_ids = rng.permutation(total) + 1
    attrs_of = dict(zip(original_ids.tolist(), identities))
    style_words = {"pants": ("pants", "trousers", "slacks"), "shorts": ("shorts", "short pants"),
                   "skirt": ("skirt",), "tshirt": ("t-shirt", "tee", "short-sleeved", "t shirt"),
                   "jacket": ("jacket", "coat"), "dress": ("dress",)}
    for r in tiny["train"] + tiny["test"]:
        a = attrs_of[_original_id(r["path"])]
        for c in r["captions"]:
            assert any(w in c for w in style_words[a.bottom_style]), (c, a)
            assert any(w in c for w in style_words[a.top_style]), (c, a)


def test_build_is_deterministic_and_seed_matters(tiny, tmp_path):
    again = sp.build(str(tmp_path / "b"), "tiny", verbose=False)
    recs = _records(again, "train")
    assert len(recs) == len(tiny["train"])
    for a, b in zip(recs, tiny["train"]):
        assert np.array_equal(a["image"], b["image"])
        assert a["captions"] == b["captions"] and a["pid"] == b["pid"] and a["path"] == b["path"]
    other = sp.build(str(tmp_path / "c"), "tiny_seed1_five", verbose=False, seed=1, num_train_ids=3,
                     num_test_ids=2, images_per_id=1, captions_per_image=5)
    other_recs = _records(other, "train")
    assert len(other_recs) == 3 and all(len(r["captions"]) == 5 for r in other_recs)
    assert not np.array_equal(other_recs[0]["image"], tiny["train"][0]["image"])
    assert len(_records(other, "test")) == 2


def test_images_vary_within_identity(tiny):
    by_pid = {}
    for r in tiny["train"]:
        by_pid.setdefault(r["pid"], []).append(r["image"].astype(np.float32))
    for images in by_pid.values():
        assert np.abs(images[0] - images[1]).mean() > 5.0  # position/scale/background/jitter differ
        assert images[0].std() > 10.0  # not a flat image


def test_render_deterministic_and_validates():
    attrs = draw.sample_identities(np.random.default_rng(0), 1)[0]
    a = draw.render(attrs, np.random.default_rng(5), 48, 24, 2)
    b = draw.render(attrs, np.random.default_rng(5), 48, 24, 2)
    assert a.shape == (48, 24, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="height"):
        draw.render(attrs, np.random.default_rng(0), 4, 24)


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown config_name 'nope'"):
        sp.build(str(tmp_path), "nope")
    with pytest.raises(ValueError, match="predefined"):
        sp.build(str(tmp_path), "tiny", seed=3)
    with pytest.raises(ValueError, match="unknown config fields"):
        sp.build(str(tmp_path), "custom", colour=3)
    with pytest.raises(ValueError, match="num_train_ids must be >= 1"):
        sp.build(str(tmp_path), "custom", num_train_ids=0)


def test_failed_build_leaves_no_folders(tmp_path):
    """A config that fails inside TFDS' build (after TFDS made data_dir/, downloads/,
    synthetic_people/.config/) leaves no folder behind; the data dir's other content stays."""
    bad = sp.SyntheticPeopleConfig(name="broken", version="1.0.0", description="x", num_train_ids=0)
    with pytest.raises(ValueError, match="num_train_ids must be >= 1"):
        sp.SyntheticPeople(data_dir=str(tmp_path / "d"), config=bad).download_and_prepare()
    assert not (tmp_path / "d").exists()
    (tmp_path / "d2" / "other").mkdir(parents=True)
    (tmp_path / "d2" / "other" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="num_train_ids must be >= 1"):
        sp.SyntheticPeople(data_dir=str(tmp_path / "d2"), config=bad).download_and_prepare()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "d2", "d2/other", "d2/other/x.txt"]
