"""Two-stage (TGDT) search benchmark: JAX vs TGDT's own per-query evaluation loop vs the GEMM floor.

Default problem: Flickr30K test size, as TGDT evaluates it (evaluation.py): 1000 images x (1 + 36)
tokens (token 0 = the global feature, 36 regions), 5000 captions x 88 positions (token 0 = global,
15-20 words, 2 end tokens, then zero padding), dim 1024, features L2-normalized, float32;
t2i reranks the global top 100 images, i2t the top 50 captions. ``--problem coco5k``: 5000 images x
197 tokens (CLS + 196 patches), 25000 captions x 77, dim 512.

Timed in the same run, each after a warm-up run on the same shapes:
  * JAX: ``retrieval.topk_search`` on features prepared once (``retrieval.prepare_features``:
    normalized, stored in the compute dtype, token axes compacted to the valid window), all
    queries of each direction (``--queries N`` times the first N and extrapolates, marked);
  * the reference: a transcription in torch of TGDT's per-query i2t / t2i rerank loops
    (evaluate_utils/evaluation.py: global scores from token 0, numpy argsort, gather of the
    top-k candidates, AlignmentContrastiveLoss(return_similarity_mat=True) on them: broadcast
    matmul over positions 1..-2, length masks filled with 0, max over regions, sum over words,
    x10, then argsort of s_g + s_l), on ``--ref-t2i-images`` / ``--ref-i2t-images`` query images
    and extrapolated linearly to all queries (marked);
  * the GEMM floor: the real multiply-adds (candidates x valid image tokens x real words x dim,
    summed over all queries, plus the global scoring) divided by the float32 matmul rate of a
    large jnp matmul measured in the same run (torch's rate is reported too).
Prints os.getloadavg() (the machine may be shared: the ratios, measured in one run, are what
count). Does not import TensorFlow.

    python benchmarks/search.py                               # Flickr30K, float32 + bfloat16
    python benchmarks/search.py --problem coco5k --queries 500
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

PROBLEMS = {   # images, region/patch tokens (+1 global), captions, positions, dim
    "f30k": dict(images=1000, image_tokens=37, captions=5000, text_tokens=88, dim=1024),
    "coco5k": dict(images=5000, image_tokens=197, captions=25000, text_tokens=77, dim=512),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problem", default="f30k", choices=sorted(PROBLEMS))
    for name in ("images", "image-tokens", "captions", "text-tokens", "dim"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the problem's size")
    p.add_argument("--min-words", type=int, default=15)
    p.add_argument("--max-words", type=int, default=20)
    p.add_argument("--k-t2i", type=int, default=100)
    p.add_argument("--k-i2t", type=int, default=50)
    p.add_argument("--queries", type=int, default=0,
                   help="JAX queries timed per direction (0: all, no extrapolation)")
    p.add_argument("--query-chunk", type=int, default=None, help="JAX queries per step")
    p.add_argument("--directions", default="t2i,i2t", help="directions to time")
    p.add_argument("--compute-dtypes", default="float32,bfloat16",
                   help="JAX token compute dtypes to time (features stored in that dtype)")
    p.add_argument("--ref-t2i-images", type=int, default=40,
                   help="reference t2i loop: images whose 5 captions are timed (0: skip)")
    p.add_argument("--ref-i2t-images", type=int, default=100,
                   help="reference i2t loop: image queries timed (0: skip)")
    p.add_argument("--exhaustive", action="store_true",
                   help="also time exhaustive local scoring on a 32 x 160 subset (extrapolated)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for key, value in PROBLEMS[a.problem].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def make_data(a):
    """Normalized float32 numpy features laid out like TGDT's encode_data: images [Ni, Li, D]
    (token 0 = global), captions [Nc, Lt, D] (token 0 = global, words 1..w, 2 end tokens, then
    zeros), caption lengths w + 3 (TGDT's cap_lengths), 5 captions per image."""
    rng = np.random.default_rng(a.seed)
    d = a.dim

    def unit(shape):
        x = rng.standard_normal(shape, np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    img = np.empty((a.images, a.image_tokens, d), np.float32)
    for s in range(0, a.images, 500):
        img[s:s + 500] = unit((min(500, a.images - s), a.image_tokens, d))
    words = rng.integers(a.min_words, a.max_words + 1, size=a.captions)
    words = np.minimum(words, a.text_tokens - 3)
    cap = np.zeros((a.captions, a.text_tokens, d), np.float32)
    used = int(words.max()) + 3
    for s in range(0, a.captions, 1000):
        m = min(1000, a.captions - s)
        block = unit((m, used, d))
        block[np.arange(used)[None, :] >= (words[s:s + m] + 3)[:, None]] = 0.0
        cap[s:s + m, :used] = block
    return img, cap, words


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


_MM = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))


def matmul_rates(n=2048):
    """Multiply-adds per second of a large float32 matmul: (jnp, torch), best of 3."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    t_jax, _ = timed(_MM, x, x, repeat=3)
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    xt = torch.from_numpy(np.asarray(x))
    xt @ xt
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        xt @ xt
        best = min(best, time.perf_counter() - t0)
    return n ** 3 / t_jax, n ** 3 / best


# ---------------------------------------------------------------------------------------------
# TGDT's evaluation loop, transcribed to torch on CPU (the .cuda() calls are no-ops here).


def tgdt_reference(images, captions, img_lengths, cap_lengths, k_t2i, k_i2t):
    """(t2i(n_images) -> rankings [5n, k], i2t(n_images) -> rankings [n, k]), TGDT's loops.

    images [Ni, Li, D] / captions [5 Ni, Lt, D] torch float32, normalized; lengths: lists.
    """
    import torch

    def alignment_similarity(im_set, s_seq, im_len, s_len):
        # TGDT AlignmentContrastiveLoss.forward with return_similarity_mat=True.
        im_set, s_seq = im_set[:, 1:, :], s_seq[:, 1:-2, :]           # drop global / end tokens
        im_len = [n - 1 for n in im_len]
        s_len = [n - 3 for n in s_len]
        n_im, l_im = im_set.size(0), im_set.size(1)
        n_s, l_s = s_seq.size(0), s_seq.size(1)
        im_b = im_set.unsqueeze(1).expand(-1, n_s, -1, -1)             # [n_im, n_s, l_im, D]
        s_b = s_seq.unsqueeze(0).expand(n_im, -1, -1, -1)              # [n_im, n_s, l_s, D]
        align = torch.matmul(im_b, s_b.permute(0, 1, 3, 2))            # [n_im, n_s, l_im, l_s]
        im_mask = torch.zeros(n_im, l_im).bool()
        if l_im != im_len:                                             # (always true: int vs list)
            for row, n in zip(im_mask, im_len):
                row[n:] = True
        im_mask = im_mask.unsqueeze(2).unsqueeze(1).expand(-1, n_s, -1, l_s)
        s_mask = torch.zeros(n_s, l_s).bool()
        for row, n in zip(s_mask, s_len):
            row[n:] = True
        s_mask = s_mask.unsqueeze(1).unsqueeze(0).expand(n_im, -1, l_im, -1)
        align.masked_fill_(im_mask | s_mask, value=0)
        return align.max(2)[0].sum(2) * 10                             # [n_im, n_s]

    @torch.no_grad()
    def t2i(n_images):
        ims_len = img_lengths
        out = []
        for index in range(n_images):
            queries = captions[5 * index:5 * index + 5]
            queries_len = cap_lengths[5 * index:5 * index + 5]
            d_g = torch.mm(queries[:, 0, :], images[:, 0, :].t()).numpy()
            for i in range(len(d_g)):
                g_inds = np.argsort(d_g[i])[::-1]
                cand = list(g_inds[0:k_t2i])
                d_l = alignment_similarity(images[cand], queries[i].unsqueeze(0),
                                           list(np.array(ims_len)[cand]),
                                           [queries_len[i]]).t().numpy()[0]
                d_f = d_l + d_g[i][cand]
                out.append(g_inds[np.argsort(d_f)[::-1]])
        return np.stack(out)

    @torch.no_grad()
    def i2t(n_images):
        out = []
        for index in range(n_images):
            im = images[index].reshape(1, images.shape[1], images.shape[2])
            d_g = torch.mm(im[:, 0, :], captions[:, 0, :].t()).numpy().flatten()
            g_inds = np.argsort(d_g)[::-1]
            top = list(g_inds[0:k_i2t])
            d_l = alignment_similarity(im, captions[top], [img_lengths[index]],
                                       list(np.array(cap_lengths)[top])).numpy().flatten()
            d_f = d_l + d_g[top]
            out.append(g_inds[np.argsort(d_f)[::-1]])
        return np.stack(out)

    return t2i, i2t


def fmt(seconds):
    if seconds >= 60:
        return f"{seconds / 60:.2f} min"
    return f"{seconds:.3g} s" if seconds >= 1e-2 else f"{seconds * 1e3:.3g} ms"


def main(argv=None):
    a = parse_args(argv)
    directions = [d for d in ("t2i", "i2t") if d in a.directions.split(",")]
    dtypes = [s for s in a.compute_dtypes.split(",") if s]
    print(f"# {jax.devices()[0].platform} x{len(jax.devices())} ({os.cpu_count()} CPU cores); "
          f"load average {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    img, cap, words = make_data(a)
    n_img, n_cap, li, lt, d = a.images, a.captions, a.image_tokens, a.text_tokens, a.dim
    print(f"# data ({a.problem}): {n_img} images x {li} tokens, {n_cap} captions x {lt} "
          f"positions ({a.min_words}-{a.max_words} words), dim {d}, float32; made in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    img_mask = np.zeros((n_img, li), bool)
    img_mask[:, 1:] = True                                           # regions / patches
    cap_mask = (np.arange(lt)[None] >= 1) & (np.arange(lt)[None] <= words[:, None])
    total = {"t2i": n_cap, "i2t": n_img}
    nq = {dr: min(a.queries or total[dr], total[dr]) for dr in directions}
    k = {"t2i": a.k_t2i, "i2t": a.k_i2t}
    n_ref = {"t2i": min(a.ref_t2i_images, n_img), "i2t": min(a.ref_i2t_images, n_img)}

    ref_fns = None
    if any(n_ref[dr] for dr in directions):
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t2i_ref, i2t_ref = tgdt_reference(torch.from_numpy(img), torch.from_numpy(cap),
                                          [li] * n_img, list(words + 3), a.k_t2i, a.k_i2t)
        ref_fns = {"t2i": (t2i_ref, 5), "i2t": (i2t_ref, 1)}

    # The machine may be shared: every JAX timing sits between two matmul-rate measurements
    # (the floor uses their mean) and is followed by the reference loop of the same direction.
    results, ref, prep_times = {}, {}, {}
    rates = []
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        t_prep = time.perf_counter()
        imgs = retrieval.prepare_features(img[:, 0], img, img_mask, compute_dtype=dtype)
        caps = retrieval.prepare_features(cap[:, 0], cap, cap_mask, compute_dtype=dtype)
        jax.block_until_ready((imgs, caps))
        prep_times[dtype_name] = time.perf_counter() - t_prep
        print(f"# {dtype_name}: prepared (normalize + compact, once) in "
              f"{fmt(prep_times[dtype_name])}: image tokens {imgs.tokens.shape}, caption "
              f"tokens {caps.tokens.shape}", flush=True)
        for direction in directions:
            queries, gallery = (caps, imgs) if direction == "t2i" else (imgs, caps)
            n = nq[direction]
            q = retrieval.Features(*(x[:n] for x in queries))
            fn = lambda q, g: retrieval.topk_search(
                q.global_features, g.global_features, k=k[direction],
                query_tokens=q.tokens, query_mask=q.mask, gallery_tokens=g.tokens,
                gallery_mask=g.mask, rerank_k=k[direction], direction=direction,
                query_chunk=a.query_chunk, normalized=True)
            jax.block_until_ready(fn(q, gallery))                     # compile + warm-up
            before = matmul_rates()
            t0 = time.perf_counter()
            idx, _ = jax.block_until_ready(fn(q, gallery))
            seconds = time.perf_counter() - t0
            after = matmul_rates()
            rates += [before, after]
            rate = (before[0] + after[0]) / 2
            results[dtype_name, direction] = (seconds, seconds * total[direction] / n,
                                              np.asarray(idx), rate, os.getloadavg())
            print(f"# JAX {dtype_name} {direction}: {n} queries in {fmt(seconds)} (jnp matmul "
                  f"{before[0] / 1e9:.1f} / {after[0] / 1e9:.1f} GMAC/s before / after; load "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
            if ref_fns and n_ref[direction] and direction not in ref:
                ref_fn, per_image = ref_fns[direction]
                ref_fn(1)                                             # warm-up
                t0 = time.perf_counter()
                ranks = ref_fn(n_ref[direction])
                r_sec = time.perf_counter() - t0
                n_queries = n_ref[direction] * per_image
                jax_idx = np.asarray(idx)
                agree = None
                if dtype_name == "float32" and jax_idx.shape[0] >= n_queries:
                    agree = float(np.mean(np.all(ranks[:, :10] == jax_idx[:n_queries, :10], 1)))
                ref[direction] = (r_sec, r_sec * total[direction] / n_queries, n_queries, agree)
                print(f"# reference {direction}: {n_queries} queries in {fmt(r_sec)}"
                      + ("" if agree is None else f"; top-10 lists equal to JAX float32 for "
                         f"{agree:.1%}"), flush=True)
        del imgs, caps

    # Real multiply-adds of the two-stage search (the floor), per direction.
    img_valid = li - 1
    glob = n_cap * n_img * d
    macs = {"t2i": n_cap * a.k_t2i * img_valid * float(words.mean()) * d + glob,
            "i2t": n_img * a.k_i2t * img_valid * float(words.mean()) * d + glob}
    i2t_runs = [v[2] for (_, direction), v in results.items() if direction == "i2t"]
    if i2t_runs:   # the candidates' real word counts
        words_i2t = words[i2t_runs[0][:, :a.k_i2t]].sum() * n_img / i2t_runs[0].shape[0]
        macs["i2t"] = img_valid * float(words_i2t) * d + glob

    rate_jax = np.mean([r[0] for r in rates])
    rate_torch = np.mean([r[1] for r in rates])
    print()
    print(f"JAX {jax.__version__}, torch reference float32, {os.cpu_count()} CPU cores; "
          f"load average (1, 5, 15 min) at the end {tuple(round(x, 2) for x in os.getloadavg())}")
    print(f"Problem {a.problem}: {n_img} images x {li} tokens, {n_cap} captions x {lt} positions "
          f"(mean {words.mean():.2f} words), dim {d}; t2i k={a.k_t2i}, i2t k={a.k_i2t}. "
          f"Matmul rate float32 (mean of {len(rates)} measurements around the JAX runs): jnp "
          f"{rate_jax / 1e9:.1f}, torch {rate_torch / 1e9:.1f} GMAC/s.")
    print()
    print("| direction | JAX compute | JAX, all queries | TGDT per-query loop, all queries | "
          "loop / JAX | real MACs | GEMM floor (MACs / jnp rate) | JAX / floor | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (dtype_name, direction), (sec, full, _, rate, load) in results.items():
        jax_note = "" if nq[direction] == total[direction] else \
            f" (extrapolated from {nq[direction]})"
        if direction in ref:
            r_full = ref[direction][1]
            ref_txt = f"{fmt(r_full)} (extrapolated from {ref[direction][2]})"
            ratio = f"{r_full / full:.1f}x"
        else:
            ref_txt, ratio = "-", "-"
        floor = macs[direction] / rate
        print(f"| {direction} | {dtype_name} | {fmt(full)}{jax_note} | {ref_txt} | {ratio} | "
              f"{macs[direction]:.3g} | {fmt(floor)} | {full / floor:.2f}x | {load[0]:.2f} |")
    print()
    print("Prepare once (normalize, store in the compute dtype, compact token axes; both sides): "
          + ", ".join(f"{key} {fmt(v)}" for key, v in prep_times.items()))
    agreement = {dr: r[3] for dr, r in ref.items() if r[3] is not None}
    if agreement:
        print("Top-10 lists of the reference loop equal to JAX float32: "
              + ", ".join(f"{dr} {v:.1%}" for dr, v in agreement.items()))

    if a.exhaustive:
        li_sub, lc_sub = min(32, n_img), min(160, n_cap)
        loc = jax.jit(lambda it, im, tt, tm: local_similarity(it, im, tt, tm, 10.0))
        t_loc, _ = timed(loc, img[:li_sub], img_mask[:li_sub], cap[:lc_sub], cap_mask[:lc_sub])
        scale = n_img * n_cap / (li_sub * lc_sub)
        print(f"Exhaustive local (all pairs, float32): {li_sub}x{lc_sub} pairs in {fmt(t_loc)}, "
              f"all {n_img}x{n_cap} pairs extrapolated: {fmt(t_loc * scale)}.")


if __name__ == "__main__":
    main()
