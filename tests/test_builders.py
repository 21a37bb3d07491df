"""Real-data TFDS builders on tiny fixtures written in the published layouts (tests/fixtures.py)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(Path(__file__).parent))
import fixtures  # noqa: E402

from data_pipelines import build  # noqa: E402
from data_pipelines.builders import annotations as ann  # noqa: E402

PERSON = {"cuhk_pedes": ("reid_raw.json", "file_path"), "icfg_pedes": ("ICFG-PEDES.json", "file_path"),
          "rstpreid": ("data_captions.json", "img_path")}
KARPATHY = {"flickr30k_karpathy": ("dataset_flickr30k.json", "imgid"),
            "coco_karpathy": ("dataset_coco.json", "cocoid")}


# ----------------------------------------------------------------------------- helpers


def _read(builder, split: str) -> list[dict]:
    """Examples of one split in stored order, image left as the stored bytes."""
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return list(tfds.as_numpy(ds))


def _expected(name: str, manual_dir: Path, annotation: str | None = None) -> dict[str, list[tuple]]:
    """{split: [(path, captions, original id)]} in annotation order, straight from the JSON."""
    out: dict[str, list[tuple]] = {}
    if name in PERSON:
        fname, key = PERSON[name]
        for rec in json.loads((manual_dir / (annotation or fname)).read_text()):
            out.setdefault(rec["split"], []).append(("imgs/" + rec[key], rec["captions"], rec["id"]))
    else:
        fname, key = KARPATHY[name]
        for rec in json.loads((manual_dir / fname).read_text())["images"]:
            split = "train" if rec["split"] == "restval" else rec["split"]
            folder = rec.get("filepath", "flickr30k-images")
            caps = [s["raw"] for s in rec["sentences"]][:5]
            out.setdefault(split, []).append((f"{folder}/{rec['filename']}", caps, rec[key]))
    return out


def _tree(path: Path) -> list[str] | None:
    """Every file and folder under `path` (relative), or None when `path` does not exist."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def _assert_no_dataset(name: str, data_dir: Path) -> None:
    """A failed build must leave neither a version folder nor a temporary folder behind."""
    builder = build.builder_class(name)(data_dir=str(data_dir))
    assert not builder.is_prepared()
    leftovers = list((data_dir / name).glob("*")) if (data_dir / name).exists() else []
    assert leftovers == [], leftovers


def _fail(name, manual_dir, data_dir, error, *patterns, **kw):
    """Builds, expects `error`, checks every regex in patterns is in the message and that the data
    dir is exactly as before: no data set, and no new (empty or partial) folder either."""
    before = _tree(data_dir)
    with pytest.raises(error) as info:
        build.build(name, manual_dir, data_dir, **kw)
    message = str(info.value)
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in {message!r}"
    _assert_no_dataset(name, data_dir)
    assert _tree(data_dir) == before
    return message


# ----------------------------------------------------------------------------- good builds


@pytest.mark.parametrize("name", sorted(fixtures.WRITERS))
def test_build_matches_annotations(name, tmp_path):
    manual = fixtures.WRITERS[name](tmp_path / "manual")
    builder = build.build(name, manual, tmp_path / "data")
    expected = _expected(name, manual)
    assert builder.is_prepared()
    assert set(builder.info.splits) == set(expected) == set(builder.SPLITS)
    for split, recs in expected.items():
        examples = _read(builder, split)
        assert len(examples) == len(recs)
        train_rank = {pid: k for k, pid in enumerate(sorted({r[2] for r in recs}))}
        for k, (ex, (path, caps, orig)) in enumerate(zip(examples, recs)):
            assert ex["image_index"] == k
            assert ex["path"].decode() == path
            assert [c.decode() for c in ex["captions"]] == caps  # captions preserved verbatim
            assert ex["pid"] == (train_rank[orig] if split == "train" else orig)
            assert ex["image"] == (manual / path).read_bytes()  # original bytes passed through
        counts = builder.build_counts[split]
        assert (counts.images, counts.captions, counts.identities, counts.skipped) == (
            len(recs), sum(len(r[1]) for r in recs), len({r[2] for r in recs}), 0)
    # Decoding through the schema gives uint8 HxWx3 images (PNG and JPEG alike).
    ex = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
    assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3 and ex["image"].shape[-1] == 3


def test_cuhk_train_pids_are_id_minus_one_and_sorted_rank(tmp_path):
    manual = fixtures.write_cuhk_pedes(tmp_path / "a")
    ex = _read(build.build("cuhk_pedes", manual, tmp_path / "da"), "train")
    orig = {e["path"].decode(): e["pid"] for e in ex}
    for path, _, pid in _expected("cuhk_pedes", manual)["train"]:
        assert orig[path] == pid - 1  # contiguous ids 1..N -> id - 1
    # Non-contiguous, unsorted ids: pid = rank among sorted unique train ids; test ids kept.
    manual = fixtures.write_cuhk_pedes(tmp_path / "b", {"train": [9, 2, 5], "val": [11], "test": [40]})
    builder = build.build("cuhk_pedes", manual, tmp_path / "db")
    train = _read(builder, "train")
    assert [e["pid"] for e in train] == [2, 2, 0, 0, 1, 1]
    assert {e["pid"] for e in _read(builder, "test")} == {40}
    assert {e["pid"] for e in _read(builder, "val")} == {11}


def test_split_membership(tmp_path):
    manual = fixtures.write_rstpreid(tmp_path / "m")
    builder = build.build("rstpreid", manual, tmp_path / "d")
    for split, ids in {"train": {0, 1, 2}, "val": {3, 4}, "test": {5, 6}}.items():
        paths = {e["path"].decode() for e in _read(builder, split)}
        assert {int(Path(p).name[:4]) for p in paths} == ids


def test_icfg_accepts_underscore_spelling(tmp_path):
    manual = fixtures.write_icfg_pedes(tmp_path / "m", filename="ICFG_PEDES.json")
    builder = build.build("icfg_pedes", manual, tmp_path / "d")
    assert builder.build_counts["train"].images == 6 and builder.build_counts["test"].images == 4
    assert set(builder.info.splits) == {"train", "test"}


def test_coco_restval_joins_train(tmp_path):
    manual = fixtures.write_coco_karpathy(tmp_path / "m")
    builder = build.build("coco_karpathy", manual, tmp_path / "d")
    train = _read(builder, "train")
    folders = sorted(e["path"].decode().split("/")[0] for e in train)
    assert folders == ["train2014", "train2014", "val2014", "val2014"]  # 2 train + 2 restval
    # cocoids decrease in file order, so sorted-id relabelling reverses the order.
    assert [e["pid"] for e in train] == [3, 2, 1, 0]


def test_karpathy_keeps_first_five_nonempty_captions(tmp_path):
    manual = fixtures.write_flickr30k_karpathy(tmp_path / "m")
    path = manual / "dataset_flickr30k.json"
    data = json.loads(path.read_text())
    sentences = data["images"][0]["sentences"]
    sentences.insert(1, {"raw": "  ", "tokens": []})
    sentences += [{"raw": f"extra {i}", "tokens": []} for i in range(2)]
    path.write_text(json.dumps(data))
    builder = build.build("flickr30k_karpathy", manual, tmp_path / "d")
    first = _read(builder, "train")[0]
    raws = [s["raw"] for s in sentences if s["raw"].strip()][:5]
    assert [c.decode() for c in first["captions"]] == raws
    assert all(len(e["captions"]) == 5 for s in ("train", "val", "test") for e in _read(builder, s))
    assert builder.build_counts["train"].skipped_empty_captions == 1


def test_cmyk_jpeg_is_reencoded(tmp_path):
    manual = fixtures.write_rstpreid(tmp_path / "m")
    rel = json.loads((manual / "data_captions.json").read_text())[0]["img_path"]
    from PIL import Image
    Image.new("CMYK", (7, 9), (10, 20, 30, 40)).save(manual / "imgs" / rel, format="JPEG")
    builder = build.build("rstpreid", manual, tmp_path / "d")
    ex = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
    assert ex["path"].decode() == "imgs/" + rel and ex["image"].shape == (9, 7, 3)


def test_cli_prints_counts(tmp_path, capsys):
    manual = fixtures.write_icfg_pedes(tmp_path / "m")
    argv = ["--dataset", "icfg_pedes", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "d")]
    assert build.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"icfg_pedes: train\s+6\s+12\s+3\s+0", out)
    assert re.search(r"icfg_pedes: test\s+4\s+8\s+2\s+0", out)
    assert build.main(argv) == 0  # second run reuses the data set
    assert "already prepared" in capsys.readouterr().out


def test_cli_process_output_is_quiet_and_truthful(tmp_path):
    """`python -m data_pipelines.build` in a fresh process (TF_CPP_MIN_LOG_LEVEL unset): no
    TensorFlow banner, no TFDS "Downloading ... Unknown size" line, about ten progress lines."""
    import os
    import subprocess

    manual = fixtures.write_rstpreid(tmp_path / "m")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    res = subprocess.run([sys.executable, "-m", "data_pipelines.build", "--dataset", "rstpreid",
                          "--manual_dir", str(manual), "--data_dir", str(tmp_path / "d")],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    both = res.stdout + res.stderr
    for noise in ("cpu_feature_guard", "This TensorFlow binary", "absl::InitializeLog", "Unknown size"):
        assert noise not in both, noise
    assert f"rstpreid: preparing rstpreid/1.0.0 from the manual download into {tmp_path / 'd'}" in res.stdout
    assert len(re.findall(r"checked \d+/14 images", res.stdout)) == 7  # every 2nd of 14
    assert re.search(r"rstpreid: train\s+6\s+12\s+3\s+0", res.stdout)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("empty", [False, True])
def test_missing_or_empty_manual_dir(tmp_path, empty, capsys):
    manual = tmp_path / "manual"
    if empty:
        manual.mkdir()
    state = "is empty" if empty else "does not exist"
    _fail("cuhk_pedes", manual, tmp_path / "d", ann.ManualDirError,
          re.escape(str(manual)), state, "reid_raw.json", "imgs/")
    # The builder itself (without build()'s pre-check) reports the same way, and the CLI exits 2.
    builder = build.builder_class("coco_karpathy")(data_dir=str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    _assert_no_dataset("coco_karpathy", tmp_path / "d")
    assert not (tmp_path / "d").exists()  # TFDS had created d/, d/downloads/extracted/, d/coco_karpathy/
    argv = ["--dataset", "rstpreid", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "d")]
    assert build.main(argv) == 2
    assert "data_captions.json" in capsys.readouterr().err


def test_missing_annotation_file_or_image_folder(tmp_path):
    manual = fixtures.write_icfg_pedes(tmp_path / "m")
    (manual / "ICFG-PEDES.json").rename(manual / "other.json")
    _fail("icfg_pedes", manual, tmp_path / "d", ann.ManualDirError, "'ICFG-PEDES.json' or 'ICFG_PEDES.json'")
    manual = fixtures.write_coco_karpathy(tmp_path / "c")
    (manual / "train2014").rename(manual / "train")
    _fail("coco_karpathy", manual, tmp_path / "d", ann.ManualDirError, r"\['train2014'\]")


def test_malformed_json_names_file_line_column(tmp_path):
    manual = fixtures.write_cuhk_pedes(tmp_path / "m")
    (manual / "reid_raw.json").write_text('[\n {"split": "train",\n  "id": 1,,\n]')
    _fail("cuhk_pedes", manual, tmp_path / "d", ann.AnnotationError,
          re.escape(str(manual / "reid_raw.json")), "line 3, column 11")


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("id", None, r"record 3: missing field 'id'"),
        ("id", "7", r"record 3: field 'id' must be an integer, got string"),
        ("captions", "a caption", r"record 3: field 'captions' must be a list, got string"),
        ("captions", ["ok", 5], r"record 3: field 'captions'\[1\] must be a string"),
        ("img_path", 12, r"record 3: field 'img_path' must be a string, got integer"),
        ("split", "dev", r"record 3: field 'split' is 'dev'; expected one of \['test', 'train', 'val'\]"),
    ],
)
def test_bad_person_record_names_file_record_field(tmp_path, field, value, pattern):
    manual = fixtures.write_rstpreid(tmp_path / "m")
    path = manual / "data_captions.json"
    data = json.loads(path.read_text())
    if value is None:
        del data[3][field]
    else:
        data[3][field] = value
    path.write_text(json.dumps(data))
    _fail("rstpreid", manual, tmp_path / "d", ann.AnnotationError, r"data_captions\.json " + pattern)


def test_bad_karpathy_record_names_file_record_field(tmp_path):
    manual = fixtures.write_coco_karpathy(tmp_path / "m")
    path = manual / "dataset_coco.json"
    data = json.loads(path.read_text())
    del data["images"][4]["sentences"][2]["raw"]
    path.write_text(json.dumps(data))
    _fail("coco_karpathy", manual, tmp_path / "d", ann.AnnotationError,
          r"dataset_coco\.json record 4 \(images\[4\]\) sentences\[2\]: missing field 'raw'")
    data["images"][4]["sentences"][2]["raw"] = "fine"
    data["images"][6]["filepath"] = None
    path.write_text(json.dumps(data))
    _fail("coco_karpathy", manual, tmp_path / "d", ann.AnnotationError,
          r"record 6 \(images\[6\]\): field 'filepath' must be a string, got null")
    path.write_text(json.dumps([1, 2]))
    _fail("coco_karpathy", manual, tmp_path / "d", ann.AnnotationError,
          r"dataset_coco\.json \(top level\): expected an object, got list")


def _break_images(manual: Path) -> tuple[Path, Path, Path]:
    """Deletes both train images of id 2, truncates one test image (CUHK fixture)."""
    recs = json.loads((manual / "reid_raw.json").read_text())
    gone = [manual / "imgs" / r["file_path"] for r in recs if r["split"] == "train" and r["id"] == 2]
    for p in gone:
        p.unlink()
    bad = manual / "imgs" / [r for r in recs if r["split"] == "test"][1]["file_path"]
    bad.write_bytes(bad.read_bytes()[:60])
    return gone[0], gone[1], bad


def test_missing_and_undecodable_images_raise(tmp_path):
    manual = fixtures.write_cuhk_pedes(tmp_path / "m")
    gone, gone_too, bad = _break_images(manual)
    _fail("cuhk_pedes", manual, tmp_path / "d", ann.BadImageError,
          re.escape(f"image {gone} does not exist"), r"reid_raw\.json record 2", "skip_bad_images")
    fixtures.write_image(gone, seed=1)  # restore the missing files; the truncated one remains
    fixtures.write_image(gone_too, seed=2)
    _fail("cuhk_pedes", manual, tmp_path / "d", ann.BadImageError,
          re.escape(f"image {bad} cannot be decoded"))


def test_skip_bad_images_counts_and_relabels(tmp_path):
    manual = fixtures.write_cuhk_pedes(tmp_path / "m")
    _break_images(manual)
    builder = build.build("cuhk_pedes", manual, tmp_path / "d", skip_bad_images=True)
    c = builder.build_counts
    assert (c["train"].images, c["train"].identities, c["train"].skipped_bad_images) == (4, 2, 2)
    assert (c["test"].images, c["test"].skipped_bad_images, c["val"].skipped) == (5, 1, 0)
    train = _read(builder, "train")
    assert [e["pid"] for e in train] == [0, 0, 1, 1]  # ids 1 and 3 -> 0 and 1
    assert [e["image_index"] for e in train] == [0, 1, 2, 3]
    assert len(_read(builder, "test")) == 5
    assert "skip" in ann.format_counts("cuhk_pedes", c)


def test_empty_captions_skipped_and_counted(tmp_path):
    manual = fixtures.write_rstpreid(tmp_path / "m")
    path = manual / "data_captions.json"
    data = json.loads(path.read_text())
    data[0]["captions"][1] = "   "
    data[1]["captions"] = ["", " "]
    data[7]["captions"] = []  # a val image with no caption at all
    path.write_text(json.dumps(data))
    builder = build.build("rstpreid", manual, tmp_path / "d")
    c = builder.build_counts
    assert (c["train"].images, c["train"].captions) == (5, 9)
    assert (c["train"].skipped_empty_captions, c["train"].skipped_captionless_images) == (3, 1)
    assert (c["val"].images, c["val"].skipped_captionless_images) == (3, 1)
    train = _read(builder, "train")
    assert [c.decode() for c in train[0]["captions"]] == [data[0]["captions"][0]]
    assert train[1]["path"].decode() == "imgs/" + data[2]["img_path"]


def test_split_left_empty_is_an_error(tmp_path):
    manual = fixtures.write_icfg_pedes(tmp_path / "m")
    path = manual / "ICFG-PEDES.json"
    data = [r for r in json.loads(path.read_text()) if r["split"] == "train"]
    path.write_text(json.dumps(data))
    _fail("icfg_pedes", manual, tmp_path / "d", ann.AnnotationError, r"split 'test' has no usable image")


def test_failed_build_leaves_the_data_dir_as_it_was(tmp_path, capsys):
    """Bad annotation / missing image folder / bad image into a data dir that already holds a data
    set and the user's own files: nothing added, nothing removed; through the CLI too."""
    data_dir = tmp_path / "tfds"
    build.build("rstpreid", fixtures.write_rstpreid(tmp_path / "ok"), data_dir)
    (data_dir / "downloads" / "manual").mkdir(parents=True)
    (data_dir / "downloads" / "manual" / "notes.txt").write_text("mine")
    (data_dir / "cuhk_pedes").mkdir()  # an empty folder the user made: it existed, it stays
    before = _tree(data_dir)
    manual = fixtures.write_cuhk_pedes(tmp_path / "m")
    good = (manual / "reid_raw.json").read_text()
    (manual / "reid_raw.json").write_text(good.replace('"id"', '"pid"', 1))
    _fail("cuhk_pedes", manual, data_dir, ann.AnnotationError, "missing field 'id'")
    (manual / "reid_raw.json").write_text(good)
    sorted((manual / "imgs").rglob("*.*"))[0].write_bytes(b"not an image")
    _fail("cuhk_pedes", manual, data_dir, ann.BadImageError, "cannot be decoded")
    manual = fixtures.write_coco_karpathy(tmp_path / "c")
    (manual / "val2014").rename(manual / "val")
    argv = ["--dataset", "coco_karpathy", "--manual_dir", str(manual), "--data_dir", str(data_dir)]
    assert build.main(argv) == 2
    assert "val2014" in capsys.readouterr().err
    assert _tree(data_dir) == before


def test_remove_created_folders_keeps_files(tmp_path):
    from data_pipelines.builders.clean_failure import remove_created_folders
    from etils import epath

    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "keep").mkdir()
    (tmp_path / "a" / "keep" / "user.txt").write_text("x")
    (tmp_path / "a" / "ds" / ".config").mkdir(parents=True)
    (tmp_path / "a" / "ds" / ".config" / "metadata.json").write_text("{}")  # TFDS' own
    remove_created_folders([epath.Path(tmp_path / "a")])
    assert _tree(tmp_path) == ["a", "a/keep", "a/keep/user.txt"]
    remove_created_folders([epath.Path(tmp_path / "nothing_here")])  # absent: no error
