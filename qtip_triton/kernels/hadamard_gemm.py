"""The Hadamard transforms of many tokens as two dense GEMMs through torch (cuBLAS), for prefill batches.

Why: with A = hadK ⊗ H_P1 and B = H_P2, a block's transform is A · Z · B (Z: the block viewed as
ROWS x COLS). Per token that is two tiny matrix products, which the Triton kernels run one token (or a few)
per program: on the H200 (2026-11-29, bench/results/h200-2026-11-29-hadamard-tall*.md) 28672 features at 2048
tokens took 2.2 ms (input) and 1.3 ms (output) against a few hundred microseconds of arithmetic, and a
Llama-2-70B MLP's fp16 matmul at that batch takes about 1.4 ms. Here the first product is one batched GEMM
over all (token, block) rows (A · Z_t for every t) and the second one GEMM of all rows at once ((T·ROWS) x COLS
times B); the scalings, the split-K sum, the bias and the kernel-order destination are elementwise passes.

Precision: float32 GEMMs with TF32 off, i.e. what the Triton kernels' bf16 hi/lo dots approximate (they keep
~16 mantissa bits; this keeps 24).

Opt-in until timed: ``transform(..., gemm=True)`` or ``QTIP_TRITON_HADAMARD_GEMM=N`` (from N (token, block)
rows on); ``bench/hadamard.py --variants gemm`` times it against the kernels.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

GEMM_ENV = "QTIP_TRITON_HADAMARD_GEMM"

_MATS: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}


def min_rows() -> int | None:
    """(token, block) rows from which :func:`qtip_triton.kernels.hadamard.transform` takes this path by
    default (``QTIP_TRITON_HADAMARD_GEMM``; unset or 0: never)."""
    raw = os.environ.get(GEMM_ENV, "").strip()
    if not raw or raw == "0":
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{GEMM_ENV}={raw!r}: expected a row count (0 or unset: off)") from None
    if n < 1:
        raise ValueError(f"{GEMM_ENV}={raw!r}: expected a row count (0 or unset: off)")
    return n


def matrices(nb: int, transpose: bool, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(A or None, B) in float32, unpadded: the kernels' matrices (exact ±1/0 in bf16) without their zero
    padding, A = hadK(ᵀ) ⊗ H_P1 (None when it is 1 x 1), B = H_P2."""
    from qtip_triton.kernels.hadamard import _matrices, factor  # that module calls this one

    key = (nb, transpose, str(device))
    hit = _MATS.get(key)
    if hit is None:
        kh, p1, p2 = factor(nb)
        a, b = _matrices(nb, transpose, device)
        rows = kh * p1
        hit = _MATS[key] = (None if a is None else a[:rows, :rows].float().contiguous(),
                            b[:p2, :p2].float().contiguous())
    return hit


@contextlib.contextmanager
def _exact_fp32():
    """Full fp32 products on the GPU (no TF32) for the duration, whatever the process chose."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def transform(x: torch.Tensor, nb: int, *, transpose: bool, pre: torch.Tensor | None, post: torch.Tensor | None,
              bias: torch.Tensor | None, dst: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Write into ``y`` what the Triton transform computes: x (S, T, n) split-K partials (or (G, S, T, n), one
    group each), ``pre`` (n,) or (G, n), ``post`` (n,) or (G, n), ``bias`` (n,), ``dst`` (n,) or (G, n);
    ``y`` (T, n), (G, T, n) or (T, G·n) for grouped outputs. Arguments are already checked by the caller."""
    grouped_out = x.dim() == 4
    z = x.sum(dim=-3, dtype=torch.float32)  # (T, n) or (G, T, n): the split-K reduction
    if pre is not None:
        z = z * (pre.float() if pre.dim() == 1 else pre.float().unsqueeze(1))
    G, T, n = (z.shape if z.dim() == 3 else (0, *z.shape))
    a, b = matrices(nb, transpose, z.device)
    rows, p2 = (1 if a is None else a.shape[0]), b.shape[0]
    with _exact_fp32():
        v = z.reshape(-1, rows, p2)  # one (ROWS, COLS) view per (group, token, block)
        if a is not None:
            v = torch.matmul(a, v)  # batched: A · Z for every view
        v = torch.matmul(v.reshape(-1, p2), b).reshape(z.shape)  # all rows at once: (· B)
    v = v * (1.0 / math.sqrt(nb))
    if post is not None:
        v = v * (post.float() if post.dim() == 1 else post.float().unsqueeze(1))
    if bias is not None:
        v = v + bias.float()
    if dst is not None:  # column j of each row goes to dst[j]
        idx = dst.long() if dst.dim() == 1 else dst.long().unsqueeze(1)
        v = torch.empty_like(v).scatter_(-1, idx.expand_as(v), v)
    if grouped_out:  # group g into columns [g*n, (g+1)*n) of y (T, G*n)
        y.view(T, G, n).copy_(v.permute(1, 0, 2))
    else:
        y.copy_(v)
    return y
