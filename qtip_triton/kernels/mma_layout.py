"""h for the tensor-core gemv (config ``mma``): batch rows interleaved inside each quad of columns.

Why: each lane of the mma gemv brings the x of one batch row to the tensor cores, four adjacent kernel-order
columns at a time. In the plain (M, in) layout the eight lanes of a row group read eight different rows, so
every x load of a warp touches eight 128-byte lines, and x, not the table lookups, filled most of the L1
wavefronts at 16 batch rows (H200, 2026-11-29: with every row reading one row's h the M = 16 kernel went
from 38.0 to 26.7 us at 8192^2, `bench/results/h200-2026-11-29-session11-probe-xrow.md`). Here the four
columns of a quad sit together for all batch rows, so a warp's load covers 256 contiguous bytes at up to 8
rows (8192^2 M = 8: 29.8 -> 25.7 us) and four half-used lines at 16 (no measurable gain there: a load still
spans 8 sectors, and x's bytes, not its lines, count).

The layout, as a tensor: ``hq[q, m, e] = h[m, 4q + e]`` (h in the kernel's column order), shape
(in // 4, M, 4); the buffer holds ``R = rows_padded(M)`` rows per quad, so ``hq`` is a view with strides
(4R, 4, 1) and its rows beyond M are never read. The input transform writes it directly through its
destination index: column j of batch row m goes to ``quad_index(order, R)[j] + 4 m``.
"""

from __future__ import annotations

import torch

QUAD = 4  # kernel-order columns per quad: one 8-byte fp16 load per lane


def rows_padded(M: int) -> int:
    """Rows per quad in the buffer: the power of two at or above M, at least 8 (one mma's batch block).

    Why powers of two: the kernel's quad stride (4 R) is a compile-time constant, so every R is a binary of
    its own; with R a power of two all M of an autotune bucket (b/2, b] share one, the one the load-time
    warm-up compiles (autotune.buckets.warm_rows). The input index depends on R too: 8 and 16 cover every
    bucket the mma gemv is tuned for."""
    if M < 1:
        raise ValueError(f"an mma-order h needs at least one row, got {M}")
    return max(8, 1 << (M - 1).bit_length())


def quad_index(order: torch.Tensor, rows: int) -> torch.Tensor:
    """Where column j of batch row 0 lands in an mma-order buffer of ``rows`` rows per quad, given
    ``order`` (int32 (in,)), the column's kernel-order position; row m adds ``QUAD * m``."""
    o = order.long()
    return ((o // QUAD) * (QUAD * rows) + o % QUAD).to(torch.int32)


def new_buffer(lead: tuple[int, ...], M: int, n: int, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(hq, target) for ``lead`` groups (() or (shards,)) of M rows and n columns: ``hq`` the mma-order view
    the kernel reads, ``target`` the (..., M, n) view (row stride 4) the input transform writes through its
    destination index. ``target``'s elements are not h[m, j]: only the transform's index gives meaning to it."""
    if n % QUAD:
        raise ValueError(f"an mma-order h needs in_features divisible by {QUAD}, got {n}")
    R = rows_padded(M)
    buf = torch.empty(*lead, n * R, dtype=dtype, device=device)
    base = tuple(buf.stride()[:-1])
    hq = buf.as_strided((*lead, n // QUAD, M, QUAD), (*base, QUAD * R, QUAD, 1))
    target = buf.as_strided((*lead, M, n), (*base, QUAD, 1))
    return hq, target


def from_kernel_order(h: torch.Tensor) -> torch.Tensor:
    """``hq`` from h in the kernel's column order ((M, in) or (shards, M, in)), as a copy: for callers that
    hold such an h (tests, benches); the layers have the input transform write ``hq`` directly."""
    if h.dim() not in (2, 3) or h.shape[-1] % QUAD:
        raise ValueError(f"h must be (M, in) or (shards, M, in) with in divisible by {QUAD}, got {tuple(h.shape)}")
    M, n = h.shape[-2:]
    hq, _ = new_buffer(tuple(h.shape[:-2]), M, n, h.dtype, h.device)
    hq.copy_(h.reshape(*h.shape[:-1], n // QUAD, QUAD).transpose(-3, -2))
    return hq


def check(h: torch.Tensor, n: int) -> int:
    """M of an mma-order h for ``n`` inputs ((in // 4, M, 4) or (shards, in // 4, M, 4), strides (·, 4, 1)),
    or a clear error."""
    if h.dim() not in (3, 4) or h.shape[-3] * QUAD != n or h.shape[-1] != QUAD or h.stride(-1) != 1 \
            or h.stride(-2) != QUAD or h.stride(-3) < QUAD * h.shape[-2]:
        raise ValueError(f"an mma-order h for {n} inputs must be ({n // QUAD}, M, {QUAD}) (or per shard) with "
                         f"strides (>= 4M, 4, 1) (kernels.mma_layout), got {tuple(h.shape)} strides {h.stride()}")
    return h.shape[-2]
