"""Search benchmark: exhaustive vs two-stage (TGDT) retrieval, JAX vs PyTorch, COCO-5K sized.

Synthetic COCO-5K problem (default 5000 images x 25000 captions): image tokens CLS + 196 patches
(ViT-B/16 at 224), text tokens 77 with 15-20 valid words, dim 512. Tokens are STORED in bfloat16
(5000x197x512 + 25000x77x512 = 3 GB instead of 6 GB); global features float32.

Measured (steady state, after a compile/warm-up run on the same shapes):
  * exhaustive global scoring, all captions x all images (full size);
  * exhaustive local scoring on an --local-images x --local-captions subset, extrapolated
    linearly in the number of pairs to the full matrix (it is ~2 PFLOP at full size);
  * two-stage t2i (k=100 images per caption) and i2t (k=50 captions per image): global scoring
    against the FULL gallery + rerank, for --queries queries, extrapolated linearly to all queries;
  * the same work in PyTorch: batched (chunks of queries, like ours) and the reference TGDT way
    (a Python loop over queries, local similarities of one query's candidates per iteration).
Every extrapolated number is marked as such. Does not import TensorFlow.

    python benchmarks/search.py                          # defaults (CPU: a few minutes)
    python benchmarks/search.py --queries 25000 ...      # no extrapolation on an accelerator
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xmr_jax import retrieval  # noqa: E402
from xmr_jax.similarity import local_similarity  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions", type=int, default=25000)
    p.add_argument("--image-tokens", type=int, default=197, help="CLS + patches (197: ViT-B/16)")
    p.add_argument("--text-tokens", type=int, default=77)
    p.add_argument("--min-words", type=int, default=15)
    p.add_argument("--max-words", type=int, default=20)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k-t2i", type=int, default=100)
    p.add_argument("--k-i2t", type=int, default=50)
    p.add_argument("--queries", type=int, default=64, help="queries timed per direction")
    p.add_argument("--query-chunk", type=int, default=16)
    p.add_argument("--local-images", type=int, default=32, help="exhaustive-local subset")
    p.add_argument("--local-captions", type=int, default=160, help="exhaustive-local subset")
    p.add_argument("--torch-loop-queries", type=int, default=16,
                   help="queries for the per-query Python-loop torch reference (0: skip)")
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="JAX token-matmul dtype (accumulation is float32)")
    p.add_argument("--torch-dtype", default="float32", choices=["bfloat16", "float32"],
                   help="torch compute dtype (float32: torch's bf16 matmul is slow on CPU)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_tokens(rng, n, length, dim, chunk=500):
    """Random normal tokens [n, length, dim] stored bfloat16 (NumPy generator: much faster on
    CPU than jax.random's threefry at this size), made in chunks to bound memory."""
    out = np.empty((n, length, dim), jnp.bfloat16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        out[start:start + m] = rng.standard_normal((m, length, dim), np.float32)
    return jnp.asarray(out)


def text_mask(rng, n, length, lo, hi):
    """SOT, 15-20 words, EOT, padding: True on the words only."""
    words = rng.integers(lo, hi + 1, size=n)
    pos = np.arange(length)[None]
    return (pos >= 1) & (pos <= np.minimum(words, length - 2)[:, None])


def timed(fn, *args, repeat=1):
    """(seconds of the best steady-state run, result); one untimed warm-up/compile run."""
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return best, out


# ---------------------------------------------------------------------------------------------
# PyTorch references (same math: cosine global, masked max over image tokens, sum over words).


def torch_impl(dtype_name):
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    tdt = getattr(torch, dtype_name)

    def to_torch(x):   # zero-copy view of the (read-only) JAX CPU buffer; never written to
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = np.asarray(x)
        if x.dtype == jnp.bfloat16:
            return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(x))

    def norm(x):
        return torch.nn.functional.normalize(x.to(tdt), dim=-1)

    def reduce(cos, img_valid, txt_valid, img_dim):
        cos = cos.float().masked_fill(~img_valid, torch.finfo(torch.float32).min)
        best = cos.amax(dim=img_dim)
        best = best * (txt_valid & img_valid.any(dim=img_dim)).float()
        return 10.0 * best.sum(-1)

    def local_cands(q_tok, q_mask, c_tok, c_mask, query_is_text):
        if query_is_text:   # c: images [Q,K,Li,D], q: words [Q,Lt,D] -> cos [Q,K,Li,Lt]
            cos = torch.einsum("qkld,qjd->qklj", norm(c_tok), norm(q_tok))
            return reduce(cos, c_mask[..., None], q_mask[:, None, :], 2)
        cos = torch.einsum("qld,qkjd->qklj", norm(q_tok), norm(c_tok))
        return reduce(cos, q_mask[:, None, :, None], c_mask, 2)

    @torch.inference_mode()
    def global_scores(q, g):
        return torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(g, dim=-1).T

    @torch.inference_mode()
    def two_stage_batched(qg, qt, qm, gg, gt, gm, k, query_is_text, chunk):
        gn = torch.nn.functional.normalize(gg, dim=-1)
        out = []
        for s in range(0, qg.shape[0], chunk):
            sg = torch.nn.functional.normalize(qg[s:s + chunk], dim=-1) @ gn.T
            vals, idx = sg.topk(k, dim=1)
            sl = local_cands(qt[s:s + chunk], qm[s:s + chunk], gt[idx], gm[idx], query_is_text)
            new, order = (vals + sl).sort(dim=1, descending=True)
            out.append(idx.gather(1, order))
        return torch.cat(out)

    @torch.inference_mode()
    def two_stage_loop(qg, qt, qm, gg, gt, gm, k, query_is_text):
        """The reference way: one query at a time in Python."""
        gn = torch.nn.functional.normalize(gg, dim=-1)
        out = []
        for i in range(qg.shape[0]):
            sg = torch.nn.functional.normalize(qg[i], dim=-1) @ gn.T
            vals, idx = sg.topk(k)
            sl = local_cands(qt[i:i + 1], qm[i:i + 1], gt[idx][None], gm[idx][None],
                             query_is_text)[0]
            out.append(idx[(vals + sl).argsort(descending=True)])
        return torch.stack(out)

    @torch.inference_mode()
    def exhaustive_local(it, im, tt, tm):
        cos = torch.einsum("ild,tjd->itlj", norm(it), norm(tt))
        return reduce(cos, im[:, None, :, None], tm[None], 2)

    return to_torch, global_scores, two_stage_batched, two_stage_loop, exhaustive_local


def fmt(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.3g} s" if seconds >= 1e-2 else f"{seconds * 1e3:.3g} ms"


def main(argv=None):
    a = parse_args(argv)
    n_img, n_cap, li, lt, d = a.images, a.captions, a.image_tokens, a.text_tokens, a.dim
    nq_t2i, nq_i2t = min(a.queries, n_cap), min(a.queries, n_img)
    li_sub, lc_sub = min(a.local_images, n_img), min(a.local_captions, n_cap)
    rng = np.random.default_rng(a.seed)
    print(f"# devices: {jax.devices()}  ({os.cpu_count()} CPU cores)", flush=True)
    t0 = time.perf_counter()
    img_g = jnp.asarray(rng.standard_normal((n_img, d), np.float32))
    cap_g = jnp.asarray(rng.standard_normal((n_cap, d), np.float32))
    img_t = make_tokens(rng, n_img, li, d)
    cap_t = make_tokens(rng, n_cap, lt, d)
    img_m = np.ones((n_img, li), bool)
    img_m[:, 0] = False                                             # CLS excluded
    cap_m = text_mask(rng, n_cap, lt, a.min_words, a.max_words)
    img_m, cap_m = jnp.asarray(img_m), jnp.asarray(cap_m)
    jax.block_until_ready((img_t, cap_t))
    gb = (img_t.nbytes + cap_t.nbytes) / 2**30
    print(f"# data: {n_img} images x {li} tokens, {n_cap} captions x {lt} tokens "
          f"({a.min_words}-{a.max_words} words), dim {d}; bf16 token storage {gb:.2f} GiB; "
          f"made in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []   # (what, measured work, jax time, full-size jax time, torch batched, torch loop)
    dtype = jnp.dtype(a.compute_dtype)

    # 1. exhaustive global scoring (full size, t2i orientation [captions, images]).
    t_glob, _ = timed(jax.jit(retrieval.exhaustive_global), cap_g, img_g)
    rows.append(["exhaustive global (s_g)", f"{n_cap}x{n_img} (full)", t_glob, t_glob])
    print("# global done", flush=True)

    # 2. exhaustive local scoring on a subset, extrapolated by pairs.
    sub = (img_t[:li_sub], img_m[:li_sub], cap_t[:lc_sub], cap_m[:lc_sub])
    loc = jax.jit(lambda it, im, tt, tm: local_similarity(it, im, tt, tm, 10.0,
                                                          compute_dtype=dtype))
    t_loc, jax_loc = timed(loc, *sub)
    pair_scale = (n_img * n_cap) / (li_sub * lc_sub)
    t_loc_full = t_loc * pair_scale + t_glob
    rows.append(["exhaustive local (s_g + s_l), both directions",
                 f"{li_sub}x{lc_sub} pairs, extrapolated x{pair_scale:.0f}", t_loc, t_loc_full])
    print("# exhaustive local done", flush=True)

    # 3/4. two-stage, full gallery, a subset of queries.
    def two_stage(direction, qg, qt, qm, gg, gt, gm, k):
        fn = lambda *xs: retrieval.topk_search(*xs[:2], k=k, query_tokens=xs[2],
                                               query_mask=xs[3], gallery_tokens=xs[4],
                                               gallery_mask=xs[5], rerank_k=k,
                                               direction=direction, query_chunk=a.query_chunk,
                                               compute_dtype=dtype)
        return timed(fn, qg, gg, qt, qm, gt, gm)

    t_t2i, (jax_t2i, _) = two_stage("t2i", cap_g[:nq_t2i], cap_t[:nq_t2i], cap_m[:nq_t2i],
                                    img_g, img_t, img_m, a.k_t2i)
    rows.append([f"two-stage t2i (k={a.k_t2i})",
                 f"{nq_t2i} captions vs {n_img} images, extrapolated x{n_cap / nq_t2i:.0f}",
                 t_t2i, t_t2i * n_cap / nq_t2i])
    print("# two-stage t2i done", flush=True)
    t_i2t, (jax_i2t, _) = two_stage("i2t", img_g[:nq_i2t], img_t[:nq_i2t], img_m[:nq_i2t],
                                    cap_g, cap_t, cap_m, a.k_i2t)
    rows.append([f"two-stage i2t (k={a.k_i2t})",
                 f"{nq_i2t} images vs {n_cap} captions, extrapolated x{n_img / nq_i2t:.0f}",
                 t_i2t, t_i2t * n_img / nq_i2t])
    print("# two-stage i2t done", flush=True)

    torch_cols = {}
    if not a.no_torch:
        to_t, t_global, t_batched, t_loop, t_exh = torch_impl(a.torch_dtype)
        import torch
        T = lambda x: to_t(x)
        cg, ig = T(cap_g), T(img_g)
        ct, it, cm, im = T(cap_t), T(img_t), T(cap_m), T(img_m)
        tt, _ = timed(t_global, cg, ig)
        torch_cols[0] = (tt, None)
        tt, tl = timed(t_exh, it[:li_sub], im[:li_sub], ct[:lc_sub], cm[:lc_sub])
        err = float(np.max(np.abs(tl.numpy() - np.asarray(jax_loc))))
        torch_cols[1] = (tt, None)
        print(f"# torch exhaustive local done (max |jax - torch| = {err:.3g})", flush=True)
        for row, (direction, qg, qt, qm, gg, gt, gm, k, nq, jax_idx) in enumerate([
                ("t2i", cg, ct, cm, ig, it, im, a.k_t2i, nq_t2i, jax_t2i),
                ("i2t", ig, it, im, cg, ct, cm, a.k_i2t, nq_i2t, jax_i2t)], start=2):
            is_text = direction == "t2i"
            tb, idx = timed(t_batched, qg[:nq], qt[:nq], qm[:nq], gg, gt, gm, k, is_text,
                            a.query_chunk)
            agree = float(np.mean(idx.numpy()[:, 0] == np.asarray(jax_idx)[:, 0]))
            tloop = None
            nl = min(a.torch_loop_queries, nq)
            if nl:
                tl_, _ = timed(t_loop, qg[:nl], qt[:nl], qm[:nl], gg, gt, gm, k, is_text)
                tloop = tl_ * nq / nl   # per-query cost scaled to the same query count
            torch_cols[row] = (tb, tloop)
            print(f"# torch {direction} done (top-1 agreement with JAX {agree:.2%})", flush=True)

    print()
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} "
          f"({os.cpu_count()} cores), JAX token compute {a.compute_dtype}, "
          f"torch {a.torch_dtype}; tokens stored bf16.")
    print()
    print("| work | measured on | JAX | torch batched | torch per-query loop | "
          "JAX vs torch batched / loop | JAX, full COCO-5K (extrapolated) |")
    print("|---|---|---|---|---|---|---|")
    for i, (what, work, t_jax, t_full) in enumerate(rows):
        tb, tl = torch_cols.get(i, (None, None))
        ratio = "-" if tb is None else f"{tb / t_jax:.2f}x"
        if tl is not None:
            ratio += f" / {tl / t_jax:.1f}x"
        loop = "-" if tl is None else fmt(tl) + (
            f" ({min(a.torch_loop_queries, nq_t2i if i == 2 else nq_i2t)} timed)")
        print(f"| {what} | {work} | {fmt(t_jax)} | {'-' if tb is None else fmt(tb)} | {loop} | "
              f"{ratio} | {fmt(t_full)} |")
    t_two = rows[2][3] + rows[3][3]
    print()
    print(f"Two-stage speed-up over exhaustive local at full size (both directions): "
          f"{t_loc_full:.1f} s / ({rows[2][3]:.1f} + {rows[3][3]:.1f}) s = "
          f"{t_loc_full / t_two:.1f}x (extrapolated from the measured subsets above).")


if __name__ == "__main__":
    main()
