"""Search index benchmark: build and query a synthetic gallery stored as an index folder (format 2).

A synthetic gallery of ``--items`` images (default 1M) with global features of ``--dim`` (512)
and ``--tokens`` token features each (default 4 plus a CLS position that the mask excludes;
float16 as the indexer stores them) is written chunk by chunk with
``xmr_jax.search.store.IndexWriter`` (what ``python -m xmr_jax.search index`` uses, minus the
image encoder), then opened with ``IndexStore`` (global features memory-mapped, tokens read per
candidate) and searched with ``xmr_jax.search.search_features`` by ``--queries`` synthetic text
queries (noisy copies of gallery items, ``--query_tokens`` words each).

Printed: build throughput (items/s and MB/s of writing; generating the random features is timed
apart), index size on disk, query latency of the global top-k scan and of the two-stage search
(top ``--rerank_k`` by global cosine, reranked by s_g + s_l), exact and with
``jax.lax.approx_max_k`` (``--recall_target``), each the median of ``--repeats`` runs after a
warm-up, and the recall@k of the approximate results against the exact ones. XLA computes
approx_max_k exactly on CPU and GPU (recall 1.0 there); it is approximate on TPU. Prints
os.getloadavg() too: the machine may be shared. Refuses to start when the index would not fit
on the disk of ``--out``; the folder is removed at the end unless ``--keep``.

    python benchmarks/search_index.py                       # 1M items, ~6.3 GB under /tmp
    python benchmarks/search_index.py --items 200000 --tokens 16
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000, help="gallery size")
    p.add_argument("--dim", type=int, default=512, help="feature width D")
    p.add_argument("--tokens", type=int, default=4, help="token features per image (plus CLS)")
    p.add_argument("--chunk_size", type=int, default=16384, help="images per chunk")
    p.add_argument("--queries", type=int, default=16, help="queries per search call")
    p.add_argument("--query_tokens", type=int, default=12, help="words per query")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rerank_k", type=int, default=100)
    p.add_argument("--recall_target", type=float, default=0.95, help="approx_max_k recall target")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--out", default="/tmp/xmr_search_index_bench", help="index folder (removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the index folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("items", "dim", "tokens", "chunk_size", "queries", "query_tokens", "k", "rerank_k",
                 "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.k > args.items or args.rerank_k > args.items:
        p.error(f"--k ({args.k}) and --rerank_k ({args.rerank_k}) must be <= --items ({args.items})")
    if not 0.0 < args.recall_target <= 1.0:
        p.error(f"--recall_target must be in (0, 1], got {args.recall_target}")
    return args


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _chunk_features(seed: int, c: int, n: int, dim: int, tokens: int):
    """Deterministic synthetic features of chunk c: global f32 [n, D], tokens f16 [n, 1+T, D]
    (token j = the global feature plus noise), mask [n, 1+T] (False for CLS)."""
    rng = np.random.default_rng([seed, c])
    glob = rng.standard_normal((n, dim), dtype=np.float32)
    toks = np.empty((n, 1 + tokens, dim), np.float16)
    toks[:, 0] = glob
    for j in range(tokens):
        toks[:, 1 + j] = glob + rng.standard_normal((n, dim), dtype=np.float32)
    mask = np.ones((n, 1 + tokens), bool)
    mask[:, 0] = False
    return glob, toks, mask


def _timed(fn, repeats: int):
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def _rss_mb() -> float:
    """Current resident memory (MB) from /proc (0 where there is none)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx, exact)]))


def main(argv=None) -> int:
    args = _parse(argv)
    import jax

    from xmr_jax.search import IndexStore, IndexWriter, chunked_topk, search_features

    n, d, t = args.items, args.dim, args.tokens
    est = n * (4 * d + 2 * (1 + t) * d + (1 + t)) + n * 20  # + paths.json
    parent = os.path.dirname(os.path.abspath(args.out)) or "."
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs)")
    print(f"gallery: {n} items, global float32 [{n}, {d}], tokens float16 [{n}, 1+{t}, {d}], "
          f"chunks of {args.chunk_size}; estimated {est / 1e9:.2f} GB, {free / 1e9:.1f} GB free "
          f"under {parent}")
    if est > 0.9 * free:
        print(f"error: the index would need {est / 1e9:.2f} GB but {parent} has {free / 1e9:.1f} GB "
              "free: lower --items / --tokens or pick another --out", file=sys.stderr)
        return 2
    if os.path.exists(args.out):
        shutil.rmtree(args.out)

    paths = [f"synthetic/{i:08d}.jpg" for i in range(n)]
    model = {"kind": "synthetic", "source": None, "embed_dim": d, "image_size": [224, 224],
             "fingerprint": f"synthetic:{args.seed}"}
    writer = IndexWriter(args.out, paths, args.chunk_size, d, True, model)
    gen_s = write_s = 0.0
    t_all = time.perf_counter()
    for c in writer.pending():
        rows = writer.chunk_range(c)
        t0 = time.perf_counter()
        glob, toks, mask = _chunk_features(args.seed, c, len(rows), d, t)
        t1 = time.perf_counter()
        writer.write_chunk(c, glob, toks, mask, paths[rows.start:rows.stop])
        write_s += time.perf_counter() - t1
        gen_s += t1 - t0
    writer.finish()
    total_s = time.perf_counter() - t_all
    size = _folder_bytes(args.out)
    print(f"build: {total_s:.1f} s ({gen_s:.1f} s generating features, {write_s:.1f} s writing "
          f"{writer.num_chunks} chunks): {n / write_s:,.0f} items/s, {size / 1e6 / write_s:,.0f} MB/s "
          f"written ({n / total_s:,.0f} items/s with generation)")
    print(f"index size on disk: {size / 1e6:,.1f} MB ({size / n:,.0f} bytes per item; global "
          f"{n * d * 4 / 1e6:,.1f} MB, tokens {n * (1 + t) * d * 2 / 1e6:,.1f} MB)")

    rss_before = _rss_mb()
    t0 = time.perf_counter()
    store = IndexStore(args.out)
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng([args.seed, 10**6])
    targets = rng.integers(0, n, args.queries)
    q_glob = store.global_rows(targets) + 0.5 * rng.standard_normal((args.queries, d), dtype=np.float32)
    q_tok = (q_glob[:, None, :] + rng.standard_normal((args.queries, args.query_tokens, d),
                                                      dtype=np.float32)).astype(np.float32)
    q_mask = np.ones((args.queries, args.query_tokens), bool)
    print(f"open: {open_s * 1e3:.1f} ms (global features memory-mapped); {args.queries} queries x "
          f"{args.query_tokens} words, k={args.k}, rerank_k={args.rerank_k}")

    chunks = store.global_chunks()
    results = {}
    for name, recall in (("exact", None), (f"approx_max_k({args.recall_target})", args.recall_target)):
        g_s, (g_idx, _) = _timed(lambda: chunked_topk(q_glob, chunks, args.k, recall_target=recall),
                                 args.repeats)
        ts_s, (ts_idx, _) = _timed(lambda: search_features(store, q_glob, q_tok, q_mask, args.k,
                                                           args.rerank_k, recall_target=recall),
                                   args.repeats)
        results[name] = (g_idx, ts_idx)
        print(f"query {name:>20s}: global top-{args.k} {g_s:.3f} s per {args.queries} queries "
              f"({g_s / args.queries * 1e3:.1f} ms/query); two-stage {ts_s:.3f} s "
              f"({ts_s / args.queries * 1e3:.1f} ms/query)")
    (ge, te), (ga, ta) = results.values()
    found = np.mean([targets[q] in ge[q] for q in range(args.queries)])
    print(f"recall@{args.k} of approx_max_k vs exact: global {_recall(ga, ge):.4f}, two-stage "
          f"{_recall(ta, te):.4f} (backend {jax.default_backend()}); the noisy query's source item "
          f"is in the exact top-{args.k} for {found:.0%} of the queries")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"resident memory: {rss_before:,.0f} MB before opening the index, {_rss_mb():,.0f} MB after "
          f"the queries (counting the memory-mapped global features, {n * d * 4 / 1e6:,.0f} MB; tokens "
          f"{n * (1 + t) * d * 2 / 1e6:,.0f} MB stay on disk); peak {rss:,.0f} MB")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if not args.keep:
        shutil.rmtree(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
