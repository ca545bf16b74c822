"""Quantizing into EXL3: block rotations against dense products, bad input, and (slow) end to end."""

import pytest
import torch

from qtip_triton import hadamard
from qtip_triton.formats import exl3
from qtip_triton.ldlq import proxy_loss


def block_h(size):
    h = hadamard.hadamard_matrix(128, torch.float64)
    return torch.block_diag(*([h] * (size // 128)))


def test_had_is_exl3_block_transform(gen):
    x = torch.randn(3, 384, generator=gen, dtype=torch.float64)
    assert torch.allclose(exl3.had(x), x @ block_h(384), atol=1e-12)
    assert torch.allclose(exl3.had(exl3.had(x)), x, atol=1e-12)  # self-inverse
    with pytest.raises(ValueError, match="not a multiple of the Hadamard block 128"):
        exl3.had(torch.zeros(2, 96))


def test_rotations_match_dense(gen):
    m, n = 256, 128
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    su = torch.randn(n, generator=gen, dtype=torch.float64).sign()
    sv = torch.randn(m, generator=gen, dtype=torch.float64).sign()
    expect = block_h(m) @ torch.diag(sv) @ W @ torch.diag(su) @ block_h(n)
    assert torch.allclose(exl3.rotate_weight(W, su, sv), expect, atol=1e-10)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    H = A @ A.t()
    Ht = block_h(n) @ torch.diag(su) @ H @ torch.diag(su) @ block_h(n)
    assert torch.allclose(exl3.rotate_hessian(H, su), Ht, atol=1e-9)
    # the dense meaning of an EXL3 weight inverts the rotation: diag(SV)·B_m·W̃·B_n·diag(SU) = W
    back = torch.diag(sv) @ block_h(m) @ expect @ block_h(n) @ torch.diag(su)
    assert torch.allclose(back, W, atol=1e-10)


def test_quantize_bad_input(gen):
    W = torch.randn(128, 128, generator=gen)
    with pytest.raises(ValueError, match="multiples of 128"):
        exl3.quantize_linear(torch.randn(128, 96, generator=gen), 4)
    with pytest.raises(ValueError, match="K \\(bits per weight\\) must be an int in 1..8"):
        exl3.quantize_linear(W, 9)
    with pytest.raises(ValueError, match="code must be one of"):
        exl3.quantize_linear(W, 4, "hyb")
    with pytest.raises(ValueError, match="NaN or Inf"):
        exl3.quantize_linear(W * float("nan"), 4)
    with pytest.raises(ValueError, match="all zeros"):
        exl3.quantize_linear(torch.zeros(128, 128), 4, data_scale=1.0)
    with pytest.raises(ValueError, match="hessian must be \\(128, 128\\)"):
        exl3.quantize_linear(W, 4, hessian=torch.eye(64))


@pytest.mark.slow
def test_quantize_end_to_end(gen):
    """K=4 mcg on a 128x128 matrix: spec-level distortion, EXL3 tensors round trip, served forward."""
    W = torch.randn(128, 128, generator=gen) * 0.02
    qw = exl3.quantize_linear(W, 4, "mcg", seed=5, data_scale=1.25, progress=False)
    assert qw.layout == "exl3" and qw.had_block == 128 and qw.spec.name == "L16K4V1-mcg"
    rel = float(((qw.dequantize() - W) ** 2).sum() / (W**2).sum())
    assert 0.003 < rel < 0.0065  # spec: ~0.0046 for 3INST-like codes at K=4 (bound 0.0039)
    tensors = exl3.to_tensors(qw)
    back, _ = exl3.load_linear(tensors)
    assert torch.equal(back.dequantize(), qw.dequantize())  # SV was already fp16
    x = torch.randn(4, 128, generator=gen)
    y = x @ W.t()
    assert float((back.reference_forward(x) - y).norm() / y.norm()) < 0.1


@pytest.mark.slow
def test_quantize_with_hessian_reduces_proxy_loss(gen):
    n = 128
    W = torch.randn(128, n, generator=gen)
    idx = torch.arange(n, dtype=torch.float64)
    u = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    H = 0.9 ** (idx[:, None] - idx[None, :]).abs() + u @ u.t() * 2.0
    plain = exl3.quantize_linear(W, 3, "mul1", data_scale=1.1, progress=False)
    aware = exl3.quantize_linear(W, 3, "mul1", hessian=H, data_scale=1.1, progress=False)
    assert proxy_loss(W, aware.dequantize(), H) < 0.8 * proxy_loss(W, plain.dequantize(), H)
