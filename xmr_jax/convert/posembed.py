"""Resize a ViT positional embedding to a new patch grid (bilinear, torch align_corners=False, no
antialiasing), keeping the CLS row.

Implemented as two separable interpolation matrices in numpy (weights computed in float32 like
torch's CPU kernel, sums in float64), deterministic and framework-free:
out[y, x] = sum_ij Wh[y, i] Ww[x, j] in[i, j], with torch's source-index rule
`src = (dst + 0.5) * in / out - 0.5` clamped below at 0, linear weights, edge index clamped.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 matrix of torch's 1-D linear interpolation (align_corners=False)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be >= 1, got in={in_size}, out={out_size}")
    mat = np.zeros((out_size, in_size), np.float64)
    f32 = np.float32
    # Index and weight arithmetic in float32, exactly as torch's CPU kernel does for float tensors.
    scale = f32(in_size) / f32(out_size)
    for dst in range(out_size):
        src = max(scale * (f32(dst) + f32(0.5)) - f32(0.5), f32(0.0))
        i0 = min(int(np.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        frac = min(max(src - f32(i0), f32(0.0)), f32(1.0))
        mat[dst, i0] += float(f32(1.0) - frac)
        mat[dst, i1] += float(frac)
    return mat


def resize_positional_embedding(pos, old_grid: Sequence[int], new_grid: Sequence[int]) -> np.ndarray:
    """pos [1 + g0*g1, C] (CLS row first, then patches row-major) -> [1 + n0*n1, C] float32 numpy.

    old_grid / new_grid: (rows, cols) of the patch grid, e.g. (14, 14) -> (24, 8) for 224 -> 384x128
    with patch 16.
    """
    pos = np.asarray(pos)
    g0, g1 = (int(v) for v in old_grid)
    n0, n1 = (int(v) for v in new_grid)
    if pos.ndim != 2 or pos.shape[0] != 1 + g0 * g1:
        raise ValueError(
            f"positional embedding: expected shape [1 + {g0}*{g1} = {1 + g0 * g1}, C] for grid {(g0, g1)}, "
            f"got {tuple(pos.shape)}")
    if (g0, g1) == (n0, n1):
        return pos.astype(np.float32)
    cls, grid = pos[:1], pos[1:].astype(np.float64).reshape(g0, g1, -1)
    out = np.einsum("yi,xj,ijc->yxc", linear_resize_matrix(g0, n0), linear_resize_matrix(g1, n1), grid)
    return np.concatenate([cls.astype(np.float32), out.reshape(n0 * n1, -1).astype(np.float32)], axis=0)
