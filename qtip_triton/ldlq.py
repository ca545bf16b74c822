"""Hessian-aware BlockLDLQ: quantize 16-column blocks last-first with feedback through an LDL factor.

Why it works: with the proxy loss tr(E H Eᵀ) (E = W - Ŵ, H the input second moment) and the block
factorization H = L D Lᵀ (L unit lower block-triangular, D block-diagonal, blocks of 16 columns),
tr(E H Eᵀ) = Σ_k tr((EL)_k D_k (EL)_kᵀ) and (EL)_k = E_k + Σ_{j>k} E_j L_jk depends only on block k
and the blocks after it. Quantizing block k as Q(W_k + Σ_{j>k} E_j L_jk), last block first, makes
(EL)_k exactly block k's own quantization error, so each block's trellis search only has to be
good on its own target; the errors of later blocks are compensated rather than accumulated.

The factor comes from a Cholesky H = C Cᵀ: with Δ = blockdiag(C_kk), L = C Δ⁻¹ and D_k = C_kk C_kkᵀ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qtip_triton import hadamard

BLOCK = 16
DEFAULT_DAMP = 0.01  # ridge added as a fraction of the mean diagonal: keeps the factor well conditioned
_PSD_JITTER = 1e-6  # relative jitter that a positive semi-definite matrix always survives in float64


def check_hessian(H: torch.Tensor, n: int) -> None:
    """Raise a ValueError naming the problem unless H is a finite, symmetric, PSD (n, n) matrix."""
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"hessian must be a torch.Tensor, got {type(H).__name__}")
    if tuple(H.shape) != (n, n):
        raise ValueError(f"hessian must be ({n}, {n}) for a matrix with {n} input features, got {tuple(H.shape)}")
    if not H.is_floating_point():
        raise ValueError(f"hessian must be floating point, got {H.dtype}")
    h = H.detach().to(torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("hessian holds NaN or Inf")
    scale = float(h.abs().max())
    if scale == 0.0:
        raise ValueError("hessian is all zeros")
    if float((h - h.t()).abs().max()) > 1e-4 * scale:
        raise ValueError("hessian is not symmetric")
    diag = h.diagonal()
    if float(diag.min()) < -1e-9 * scale or float(diag.mean()) <= 0.0:
        raise ValueError("hessian is not positive semi-definite (negative diagonal)")
    jitter = _PSD_JITTER * float(diag.mean())
    eye = torch.eye(n, dtype=torch.float64, device=h.device)
    _, info = torch.linalg.cholesky_ex((h + h.t()) / 2 + jitter * eye)
    if int(info) != 0:
        raise ValueError("hessian is not positive semi-definite (Cholesky failed)")


def transform_hessian(H: torch.Tensor, su: torch.Tensor) -> torch.Tensor:
    """H̃ = M_nᵀ diag(SU) H diag(SU) M_n in float64: the Hessian in the rotated input space."""
    h = H.to(torch.float64)
    s = su.to(device=h.device, dtype=torch.float64)
    a = (h + h.t()) / 2 * s[:, None] * s[None, :]
    b = hadamard.apply_mt(a)  # rows v -> M_nᵀ v, i.e. A -> A M_n
    return hadamard.apply_mt(b.t().contiguous()).t().contiguous()  # M_nᵀ (A M_n)


def block_ldl(H: torch.Tensor, block: int = BLOCK, damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDL of H + damp·mean(diag)·I: (L (n, n) unit block-lower-triangular, D (n/block, block, block))."""
    n = H.shape[0]
    if n % block:
        raise ValueError(f"hessian size {n} is not a multiple of the block size {block}")
    h = H.to(torch.float64)
    h = (h + h.t()) / 2 + damp * float(h.diagonal().mean()) * torch.eye(n, dtype=h.dtype, device=h.device)
    C, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError("hessian is not positive definite even after damping")
    nb = n // block
    diag_blocks = torch.stack([C[k * block : (k + 1) * block, k * block : (k + 1) * block] for k in range(nb)])
    inv = torch.linalg.inv(diag_blocks)  # lower-triangular blocks, well conditioned after damping
    # block column k of L is C[:, block k] @ C_kk^-1
    Lfac = (C.view(n, nb, block).transpose(0, 1) @ inv).transpose(0, 1).contiguous()
    for k in range(nb):  # exact zeros / identity where they belong (removes round-off)
        Lfac[: k * block, k] = 0.0
        Lfac[k * block : (k + 1) * block, k] = torch.eye(block, dtype=h.dtype, device=h.device)
    D = diag_blocks @ diag_blocks.transpose(1, 2)
    return Lfac.reshape(n, n), D


def block_ldlq(
    X: torch.Tensor,
    Lfac: torch.Tensor,
    quantize_block: Callable[[int, torch.Tensor], torch.Tensor],
    block: int = BLOCK,
) -> torch.Tensor:
    """Quantize X (m, n) block column by block column, last first, feeding errors back through Lfac.

    ``quantize_block(k, target)`` quantizes the (m, block) target of block column k and returns
    its reconstruction (same units as X). Returns Ŵ (m, n).
    """
    m, n = X.shape
    nb = n // block
    Lf = Lfac.to(device=X.device, dtype=X.dtype)
    err = torch.zeros_like(X)  # W - Ŵ for the blocks already done (zero elsewhere)
    out = torch.empty_like(X)
    for k in range(nb - 1, -1, -1):
        lo, hi = k * block, (k + 1) * block
        target = X[:, lo:hi]
        if hi < n:
            target = target + err[:, hi:] @ Lf[hi:, lo:hi]
        recon = quantize_block(k, target.contiguous())
        out[:, lo:hi] = recon
        err[:, lo:hi] = X[:, lo:hi] - recon
    return out


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ), float64: the layer-output error the Hessian predicts."""
    E = (W.to(torch.float64) - W_hat.to(torch.float64)).to(H.device)
    return float(((E @ H.to(torch.float64)) * E).sum())
