"""Random Hadamard transforms M_n = (hadK ⊗ H_{n/Kh}) / sqrt(n) as QTIP checkpoints use them.

hadK must be exactly the shipped Sloane matrices: another Hadamard matrix of the same order is a
different basis and decodes checkpoints into garbage. M_n is not symmetric when Kh > 1, so the two
sides of the forward pass (M_n^T on the input, M_m on the output) are kept apart by name.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources

import torch

# The order matters: QTIP picks the first factor that divides n with a power-of-two quotient.
HADK_ORDERS = (172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12)


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def hadamard_factor(n: int) -> int:
    """The Kh of n = Kh * 2^p (Kh = 1 for powers of two); ValueError if n is unsupported."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"Hadamard size must be a positive int, got {n!r}")
    for kh in HADK_ORDERS:
        if n % kh == 0 and _is_pow2(n // kh):
            return kh
    if _is_pow2(n):
        return 1
    raise ValueError(
        f"no Hadamard transform of size {n}: n must be a power of two or Kh*2^p with Kh in "
        f"{', '.join(map(str, HADK_ORDERS))}"
    )


def is_supported(n: int) -> bool:
    try:
        hadamard_factor(n)
    except ValueError:
        return False
    return True


@cache
def _hadk_cpu(kh: int) -> torch.Tensor:
    if kh == 1:
        return torch.ones(1, 1)
    text = resources.files("qtip_triton.data.hadamard").joinpath(f"had.{kh}.txt").read_text()
    rows = [line.strip() for line in text.splitlines() if line.strip()]
    mat = torch.tensor([[1.0 if ch == "+" else -1.0 for ch in row] for row in rows])
    if mat.shape != (kh, kh):
        raise RuntimeError(f"packaged had.{kh}.txt is corrupt: shape {tuple(mat.shape)}")
    return mat


def hadk(kh: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The shipped ±1 Hadamard matrix of order kh (kh = 1 gives [[1]]).

    Cached per (dtype, device) and shared: treat it as read-only. The cache keeps the transforms of
    the reference forward from copying the matrix host-to-device on every call.
    """
    if kh != 1 and kh not in HADK_ORDERS:
        raise ValueError(f"no shipped Hadamard matrix of order {kh}; shipped: {HADK_ORDERS}")
    return _hadk_on(kh, dtype, torch.device(device))


@cache
def _hadk_on(kh: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _hadk_cpu(kh).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester (natural order) Walsh-Hadamard transform over the last dim."""
    n = x.shape[-1]
    if not _is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def _apply(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    n = x.shape[-1]
    kh = hadamard_factor(n)
    y = fwht(x.reshape(*x.shape[:-1], kh, n // kh)) * (1.0 / math.sqrt(n))
    if kh == 1:
        return y.reshape(x.shape)
    h = hadk(kh, y.dtype, y.device)
    if transpose:
        h = h.t()
    return torch.matmul(h, y).reshape(x.shape)


def apply_m(x: torch.Tensor) -> torch.Tensor:
    """Each row vector v of x (last dim n) becomes M_n v."""
    return _apply(x, transpose=False)


def apply_mt(x: torch.Tensor) -> torch.Tensor:
    """Each row vector v of x (last dim n) becomes M_n^T v."""
    return _apply(x, transpose=True)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense M_n, built by Kronecker product (tests and small research shapes)."""
    kh = hadamard_factor(n)
    p = n // kh
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.kron(hadk(kh, dtype), h) / math.sqrt(n)
