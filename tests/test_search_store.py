"""xmr_jax.search.store: the chunked index folder (format 2).

Written chunk by chunk and resumable after an interruption; searched with only the global
features in memory (memory-mapped locally) and only the candidates' tokens read, with results
equal to the in-memory search of the same features; gs:// through the fake GCS; exact and
approx_max_k chunked top-k against topk_search; old and foreign formats named in one line.
"""

import json

import jax
import numpy as np
import pytest

from tests import fake_gcs
from tests.test_search import CLIP_CFG, FILES, QUERIES, _write, init_clip_params
from xmr_jax import search as S
from xmr_jax.models.clip import clip_from_config
from xmr_jax.retrieval import topk_search
from xmr_jax.search import store as store_mod

PATHS = sorted(FILES)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_store")
    model = clip_from_config(CLIP_CFG)
    params = init_clip_params(model, jax.random.key(5))
    for i, (name, size) in enumerate(FILES.items()):
        _write(root / "images" / name, size, seed=10 + i)
    enc = S.model_encoders(model, params, source="tiny")
    memory = S.build_index(enc, None, PATHS, str(root / "images"), batch_size=2)
    store = S.write_index(enc, None, PATHS, str(root / "images"), str(root / "idx"), chunk_size=2,
                          batch_size=2, progress=False)
    return {"root": root, "enc": enc, "memory": memory, "store": store}


def _arrays(store):
    rows = np.arange(len(store))
    tokens, mask = store.token_rows(rows)
    return np.concatenate(store.global_chunks()), tokens, mask


class _Counting:
    """An Encoders whose encode_image counts its calls and raises after `fail_after` of them."""

    def __init__(self, enc, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

        def encode_image(x):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            self.calls += 1
            return enc.encode_image(x)

        import dataclasses
        self.enc = dataclasses.replace(enc, encode_image=encode_image)


def test_folder_layout_and_memory_map(gallery):
    store, memory = gallery["store"], gallery["memory"]
    root = gallery["root"] / "idx"
    manifest = json.loads((root / "index.json").read_text())
    assert manifest["format"] == "xmr_jax.search.index" and manifest["version"] == 2
    assert manifest["layout"] == "npy-chunks" and manifest["complete"] and manifest["chunk_size"] == 2
    assert manifest["chunk_rows"] == [2, 2, 2] and manifest["num_images"] == 6
    assert manifest["token_shape"] == list(memory.tokens.shape[1:])
    assert sorted(p.name for p in (root / "chunks").iterdir()) == ["000000", "000001", "000002"]
    assert sorted(p.name for p in (root / "chunks" / "000001").iterdir()) == [
        "DONE", "global.npy", "mask.npy", "paths.json", "tokens.npy"]
    # Global features stay on disk (memory-mapped), tokens are not loaded at all.
    assert all(isinstance(g, np.memmap) for g in store.global_chunks())
    assert store._tokens == {}
    for got, want in zip(_arrays(store), (memory.global_features, memory.tokens, memory.mask)):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    assert store.paths == memory.paths
    # Rows in any order, across chunks.
    rows = np.array([5, 0, 3, 3, 1])
    np.testing.assert_array_equal(store.global_rows(rows), memory.global_features[rows])
    np.testing.assert_array_equal(store.token_rows(rows)[0], memory.tokens[rows])
    assert store.paths_of(rows) == [memory.paths[r] for r in rows]


@pytest.mark.parametrize("k,rerank_k", [(6, 3), (2, 4), (5, 2), (6, 6)])
def test_store_search_equals_in_memory_search(gallery, k, rerank_k, monkeypatch):
    store, memory, enc = gallery["store"], gallery["memory"], gallery["enc"]
    read = []
    original = S.IndexStore.token_rows
    monkeypatch.setattr(S.IndexStore, "token_rows", lambda self, rows: (read.append(np.asarray(rows)),
                                                                         original(self, rows))[1])
    a = S.search(store, enc, None, QUERIES, k=k, rerank_k=rerank_k)
    b = S.search(memory, enc, None, QUERIES, k=k, rerank_k=rerank_k)
    assert a.two_stage and b.two_stage
    np.testing.assert_array_equal(a.indices, b.indices)
    # Equal here bit for bit; 2 ulps allowed (XLA:CPU's matmul order depends on the shapes).
    np.testing.assert_allclose(a.scores, b.scores, rtol=2.5e-7, atol=2.5e-7)
    np.testing.assert_allclose(a.cosine, b.cosine, rtol=2.5e-7, atol=2.5e-7)
    assert a.paths == b.paths
    # Only the candidates' tokens were read: the union of each query's global top max(k, rerank_k).
    from tests.test_search import _normalize
    from xmr_jax.search.query import encode_texts

    qg, _, _ = encode_texts(enc, QUERIES)
    s_g = _normalize(qg) @ _normalize(memory.global_features).T
    top = np.argsort(-s_g, axis=1, kind="stable")[:, :max(k, rerank_k)]
    assert len(read) == 1 and sorted(read[0].tolist()) == sorted(set(top.reshape(-1).tolist()))
    # Global-only search and the approx option (exact on CPU) give the same as well.
    a = S.search(store, enc, None, QUERIES, k=k, two_stage=False)
    b = S.search(memory, enc, None, QUERIES, k=k, two_stage=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=2.5e-7)
    c = S.search(store, enc, None, QUERIES, k=k, rerank_k=rerank_k, recall_target=0.95)
    d = S.search(memory, enc, None, QUERIES, k=k, rerank_k=rerank_k)
    np.testing.assert_array_equal(c.indices, d.indices)
    e = S.search(memory, enc, None, QUERIES, k=k, rerank_k=rerank_k, recall_target=0.95)  # .npz too
    np.testing.assert_array_equal(e.indices, d.indices)


def test_interrupted_index_resumes_from_the_last_complete_chunk(gallery, tmp_path, capsys):
    enc, images = gallery["enc"], str(gallery["root"] / "images")
    out = str(tmp_path / "idx")
    # batch_size = chunk_size = 2: one encoder call per chunk; interrupted in the 2nd chunk.
    first = _Counting(enc, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        S.write_index(first.enc, None, PATHS, images, out, chunk_size=2, batch_size=2, progress=False)
    assert first.calls == 1
    assert (tmp_path / "idx" / "chunks" / "000000" / "DONE").is_file()
    # A half-written chunk (no DONE marker) does not count and is rewritten.
    half = tmp_path / "idx" / "chunks" / "000001"
    half.mkdir(parents=True, exist_ok=True)
    (half / "global.npy").write_bytes(b"torn write")
    with pytest.raises(S.SearchError, match=r"incomplete \(1 of 3 chunks written\).*rerun the same"):
        S.load_index(out)
    assert S.main(["query", "--index", out, "--text", "a", "--checkpoint", "unused"]) == 2
    assert "incomplete (1 of 3 chunks written)" in capsys.readouterr().err
    # Other settings are refused, naming the one that differs.
    with pytest.raises(S.SearchError, match=r"chunk_size 2 \(on disk\) vs 3 \(this run\)"):
        S.write_index(enc, None, PATHS, images, out, chunk_size=3, progress=False)
    with pytest.raises(S.SearchError, match="source_digest"):
        S.write_index(enc, None, PATHS[:-1] + ["zz.png"], images, out, chunk_size=2, progress=False)
    # The rerun encodes only the 2 missing chunks and gives the one-shot index.
    second = _Counting(enc)
    logs = []
    store = S.write_index(second.enc, None, PATHS, images, out, chunk_size=2, batch_size=2,
                          progress=False, log=logs.append)
    assert second.calls == 2
    assert logs == [f"[index] resuming {out}: 1 of 3 chunks already written, 4 images left"]
    for got, want in zip(_arrays(store), _arrays(gallery["store"])):
        np.testing.assert_array_equal(got, want)
    assert store.paths == PATHS
    # A complete index with the same settings: nothing to encode.
    third = _Counting(enc)
    S.write_index(third.enc, None, PATHS, images, out, chunk_size=2, batch_size=2, progress=False)
    assert third.calls == 0


def test_cli_progress_bar_and_resume(gallery, tmp_path, capsys, monkeypatch):
    from xmr_jax.convert import save_converted

    model = clip_from_config(CLIP_CFG)
    save_converted(model, init_clip_params(model, jax.random.key(5)), str(tmp_path / "ckpt"))
    args = ["index", "--checkpoint", str(tmp_path / "ckpt"), "--images", str(gallery["root"] / "images"),
            "--index", str(tmp_path / "idx"), "--chunk_size", "4", "--batch_size", "2"]
    capsys.readouterr()
    assert S.main(args) == 0
    cap = capsys.readouterr()
    assert "[index]: 100%" in cap.err and "6/6" in cap.err  # tqdm bar on stderr
    assert "in 2 chunk(s)" in cap.out
    # Ctrl-C while the last chunk is written: exit 130, what was written is kept.
    import shutil

    shutil.rmtree(tmp_path / "idx")
    write_chunk = S.IndexWriter.write_chunk

    def interrupted(self, c, *a, **kw):
        if c == 1:
            raise KeyboardInterrupt
        return write_chunk(self, c, *a, **kw)

    monkeypatch.setattr(S.IndexWriter, "write_chunk", interrupted)
    assert S.main(args + ["--no_progress"]) == 130
    assert "[index] interrupted" in capsys.readouterr().err
    monkeypatch.setattr(S.IndexWriter, "write_chunk", write_chunk)
    assert S.main(args + ["--no_progress"]) == 0
    cap = capsys.readouterr()
    assert "1 of 2 chunks already written, 2 images left" in cap.err and "100%" not in cap.err
    res = S.search(S.load_index(str(tmp_path / "idx")), gallery["enc"], None, QUERIES, k=3, check=False)
    want = S.search(gallery["memory"], gallery["enc"], None, QUERIES, k=3)
    np.testing.assert_array_equal(res.indices, want.indices)


def test_index_folder_on_gcs(gallery, tmp_path, monkeypatch):
    gcs = fake_gcs.fake_gcs(tmp_path / "gcs", monkeypatch)
    try:
        monkeypatch.chdir(tmp_path)
        enc, images = gallery["enc"], str(gallery["root"] / "images")
        first = _Counting(enc, fail_after=2)
        with pytest.raises(KeyboardInterrupt):
            S.write_index(first.enc, None, PATHS, images, "gs://bucket/idx", chunk_size=2, batch_size=2,
                          progress=False)
        second = _Counting(enc)
        store = S.write_index(second.enc, None, PATHS, images, "gs://bucket/idx", chunk_size=2,
                              batch_size=2, progress=False)
        assert second.calls == 1 and (tmp_path / "gcs" / "bucket" / "idx" / "index.json").is_file()
        assert not (tmp_path / "gs:").exists()  # nothing went through the builtin open()
        store = S.load_index("gs://bucket/idx")
        assert not any(isinstance(g, np.memmap) for g in store.global_chunks())
        a = S.search(store, enc, None, QUERIES, k=5, rerank_k=3)
        assert all(not r.local for r in store._tokens.values()) and store._tokens  # ranged reads
        b = S.search(gallery["memory"], enc, None, QUERIES, k=5, rerank_k=3)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.scores, b.scores, rtol=2.5e-7, atol=2.5e-7)
        for got, want in zip(_arrays(store), _arrays(gallery["store"])):
            np.testing.assert_array_equal(got, want)
        assert gcs
    finally:
        fake_gcs.unregister()


def test_npy_ranged_reads_match_memmap(tmp_path, monkeypatch):
    """_NpyRows: header parsed, runs of consecutive rows read at once (ranged reads on gs://,
    positioned reads locally); a truncated file is named."""
    fake_gcs.fake_gcs(tmp_path / "gcs", monkeypatch)
    try:
        from etils import epath

        arr = np.random.default_rng(0).standard_normal((50, 3, 4)).astype(np.float16)
        (tmp_path / "gcs" / "b").mkdir(parents=True)
        np.save(tmp_path / "gcs" / "b" / "t.npy", arr)
        remote = store_mod._NpyRows(epath.Path("gs://b/t.npy"))
        assert not remote.local and remote.shape == arr.shape
        rows = np.array([0, 1, 2, 7, 30, 31, 49])
        np.testing.assert_array_equal(remote.read(rows), arr[rows])
        np.testing.assert_array_equal(remote.read_all(), arr)
        local = store_mod._NpyRows(tmp_path / "gcs" / "b" / "t.npy")  # positioned reads
        assert local.local and isinstance(local.read_all(), np.memmap)
        np.testing.assert_array_equal(local.read(rows), arr[rows])
        (tmp_path / "cut.npy").write_bytes((tmp_path / "gcs" / "b" / "t.npy").read_bytes()[:-100])
        with pytest.raises(S.SearchError, match=r"rows 49..49 lie past the end of the file"):
            store_mod._NpyRows(tmp_path / "cut.npy").read(np.array([0, 49]))
    finally:
        fake_gcs.unregister()


def test_chunked_topk_exact_and_approx():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((1000, 24)).astype(np.float32)
    gallery[500] = gallery[3]  # an exact tie across chunks: the lower index first
    gallery[777] = 2.0 * gallery[10]  # same cosine, other norm
    queries = np.concatenate([gallery[[3, 10]], rng.standard_normal((6, 24)).astype(np.float32)])
    chunks = [gallery[:300], gallery[300:301], gallery[301:700], gallery[700:]]
    ref_idx, ref_val = topk_search(queries, gallery, 20)
    # One chunk: the very computation of topk_search (same shapes), bit for bit.
    idx, val = S.chunked_topk(queries, [gallery], 20)
    np.testing.assert_array_equal(idx, np.asarray(ref_idx))
    np.testing.assert_array_equal(val, np.asarray(ref_val))
    # Chunks of other sizes: XLA:CPU's matmul sums in a shape-dependent order, so a cosine may
    # differ in its last bit (1.2e-7); the ranking here is the same.
    for block in (None, 128):
        idx, val = S.chunked_topk(queries, chunks, 20, block_rows=block)
        np.testing.assert_array_equal(idx, np.asarray(ref_idx))
        np.testing.assert_allclose(val, np.asarray(ref_val), rtol=0, atol=2.5e-7)
    assert list(idx[0, :2]) == [3, 500]
    idx, _ = S.chunked_topk(queries, chunks, 1000)  # k = N
    assert sorted(idx[0]) == list(range(1000))
    approx, _ = S.chunked_topk(queries, chunks, 20, recall_target=0.9)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(approx, np.asarray(ref_idx))])
    assert recall >= 0.9  # 1.0 on CPU/GPU, where XLA computes approx_max_k exactly
    with pytest.raises(S.SearchError, match=r"k must be in \[1, 1000\]"):
        S.chunked_topk(queries, chunks, 1001)


def test_foreign_and_old_formats_are_named(gallery, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(gallery["root"] / "idx", old)
    manifest = json.loads((old / "index.json").read_text())
    (old / "index.json").write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(S.SearchError, match="format version 3.*reads version 2.*rebuild it"):
        S.load_index(str(old))
    npz = tmp_path / "v0.npz"
    meta = {**gallery["memory"].meta, "version": 0}
    np.savez(npz, **{"global": gallery["memory"].global_features, "paths": np.asarray(PATHS),
                     "meta": np.asarray(json.dumps(meta))})
    capsys.readouterr()
    assert S.main(["query", "--index", str(npz), "--text", "a"]) == 2
    err = capsys.readouterr().err
    assert "version 0" in err and "rebuild it" in err and len(err.strip().splitlines()) == 1
    # The model check applies to index folders as to .npz files.
    other = clip_from_config({**CLIP_CFG, "embed_dim": 8})
    with pytest.raises(S.IndexMismatchError, match="embed_dim 16 .index. vs 8"):
        S.search(gallery["store"], other, init_clip_params(other, jax.random.key(2)), ["a"], k=2)
    with pytest.raises(S.SearchError, match="--shard_gallery"):
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        S.search(gallery["store"], gallery["enc"], None, ["a"], k=2, mesh=mesh)


def test_synthetic_gallery_store_equals_memory(tmp_path):
    """3000 random items in chunks of 700 (the last one short), 8 queries: the folder's search
    ranks as topk_search on the whole gallery held in memory. The scores agree to 2 float32 ulps:
    XLA:CPU's matmul sums in an order that depends on the gallery's shape."""
    rng = np.random.default_rng(4)
    n, d, l_img, l_txt = 3000, 32, 5, 7
    glob = rng.standard_normal((n, d), dtype=np.float32)
    toks = (glob[:, None] + rng.standard_normal((n, l_img, d), dtype=np.float32)).astype(np.float16)
    mask = np.ones((n, l_img), bool)
    mask[:, 0] = False
    paths = [f"{i:05d}.jpg" for i in range(n)]
    writer = S.IndexWriter(str(tmp_path / "idx"), paths, 700, d, True, {"fingerprint": "synthetic"})
    for c in writer.pending():
        r = writer.chunk_range(c)
        writer.write_chunk(c, glob[r.start:r.stop], toks[r.start:r.stop], mask[r.start:r.stop],
                           paths[r.start:r.stop])
    writer.finish()
    store = S.IndexStore(str(tmp_path / "idx"))
    memory = S.ImageIndex(glob, toks, mask, paths, {"format": "xmr_jax.search.index", "version": 1})
    q = glob[rng.integers(0, n, 8)] + rng.standard_normal((8, d), dtype=np.float32)
    qt = q[:, None] + rng.standard_normal((8, l_txt, d), dtype=np.float32)
    qm = np.arange(l_txt)[None, :] < rng.integers(2, l_txt + 1, (8, 1))
    for k, rk in ((10, 100), (150, 100), (5, 3000)):
        a = S.search_features(store, q, qt, qm, k, rk)
        b = S.search_features(memory, q, qt, qm, k, rk)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=2.5e-7, atol=2.5e-7)
    a = S.search_features(store, q, None, None, 20)
    b = S.search_features(memory, q, None, None, 20)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=2.5e-7)


def test_benchmark_runs_small(tmp_path, capsys):
    """benchmarks/search_index.py end to end on a small gallery: prints what it promises and
    removes its index folder."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "search_index_bench", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "search_index.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench_idx"
    assert bench.main(["--items", "3000", "--dim", "32", "--tokens", "2", "--chunk_size", "1000",
                       "--queries", "4", "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("load average", "build:", "items/s", "index size on disk: 1.0 MB (350 bytes per item",
                   "global top-10", "two-stage", "recall@10 of approx_max_k vs exact: global 1.0000",
                   "resident memory"):
        assert needle in text, (needle, text)
    assert not out.exists()
