"""Bit-for-bit checks of outputs that differ only in column order, under the Triton interpreter.

Why a helper: the interpreter runs ``tl.dot`` through numpy's matmul (OpenBLAS). OpenBLAS's kernels round an
output column by where it falls in their register tile (main and edge kernels sum differently), so the same
column computed at another position can come out one fp16 ulp apart: with numpy 2.3 / OpenBLAS 0.3.30,
2 of 3072 values of a 1024-wide transform did. A transform that rounds to fp16 between its two products carries
such a tie into the second product, where it is an error of the size of the other terms, not of the result: a
result near zero then sits many of its own ulps off (12 for a few of 25600 values of three grouped 512-wide shards
at 50 tokens). A GPU's MMA sums each column the same way wherever it sits.
"""

from __future__ import annotations

import torch

MAX_TIED = 0.01  # fraction of values allowed apart
ULPS = 2  # how far apart, in units of the rounding at max(|value|, the tensor's RMS)


def assert_equal_but_blas_ties(got: torch.Tensor, want: torch.Tensor, what: object = "") -> None:
    """Equal bit for bit, but for at most 1 % of the values, each within two roundings at the larger of its own
    size and the tensor's RMS (see the module docstring); a wrong order, sign or scale breaks either bound."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    if torch.equal(got, want):
        return
    g, w = got.double(), want.double()
    size = torch.maximum(w.abs(), w.pow(2).mean().sqrt())
    off = (g - w).abs() / (torch.finfo(got.dtype).eps * size)
    apart = int((g != w).sum())
    assert float(off.max()) <= ULPS and apart <= MAX_TIED * got.numel(), (
        what, f"{apart} of {got.numel()} values differ, by up to {float(off.max()):.2f} roundings")
