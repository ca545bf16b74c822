import pytest
import torch

from qtip_triton import hadamard


def _sylvester(p):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("kh", hadamard.HADK_ORDERS)
def test_shipped_matrices_are_hadamard(kh):
    h = hadamard.hadk(kh, torch.float64)
    assert torch.equal(h @ h.t(), kh * torch.eye(kh, dtype=torch.float64))


@pytest.mark.parametrize(
    "n,kh", [(11008, 172), (13824, 108), (5120, 20), (14336, 28), (28672, 28), (4096, 1), (96, 12), (64, 1)]
)
def test_factor(n, kh):
    assert hadamard.hadamard_factor(n) == kh


@pytest.mark.parametrize("n", [100, 3, 44, 352])
def test_unsupported(n):
    with pytest.raises(ValueError, match="power of two or Kh\\*2\\^p with Kh in 172"):
        hadamard.hadamard_factor(n)


@pytest.mark.parametrize("n", [32, 96, 160, 172 * 4, 108 * 8, 1024])
def test_fast_transforms_match_float64_dense(gen, n):
    kh = hadamard.hadamard_factor(n)
    dense = torch.kron(hadamard.hadk(kh, torch.float64), _sylvester(n // kh)) / n**0.5
    assert torch.allclose(dense @ dense.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64, generator=gen)
    assert torch.allclose(hadamard.apply_m(x), x @ dense.t(), atol=1e-12)
    assert torch.allclose(hadamard.apply_mt(x), x @ dense, atol=1e-12)
    assert torch.allclose(hadamard.apply_mt(hadamard.apply_m(x)), x, atol=1e-12)
    x32 = x.float()
    err = (hadamard.apply_m(x32).double() - x @ dense.t()).norm() / (x @ dense.t()).norm()
    assert err < 1e-6


def test_sides_differ_when_kh_gt_1(gen):
    x = torch.randn(2, 96, dtype=torch.float64, generator=gen)
    assert not torch.allclose(hadamard.apply_m(x), hadamard.apply_mt(x))
