"""GPU tests of the generated kernels at Llama layer shapes (run on the device: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import QuantizedWeight, TrellisSpec, kernels, linear
from qtip_triton.bitstream import get_layout
from qtip_triton.kernels import runners

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
MS = [1, 4, 16, 64, 256, 2048]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

_last: dict = {}


def weight(m: int, n: int, K: int) -> tuple[QuantizedWeight, torch.Tensor]:
    """A random QTIP-layout weight on the GPU and its decoded Ŵ in float64 (cached for the last key)."""
    key = (m, n, K)
    if _last.get("key") != key:
        _last.clear()
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda")
        g.seed()
        spec = TrellisSpec(16, K, 2, "hyb", 9)
        words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=g, device="cuda",
                              dtype=torch.int64)
        qw = QuantizedWeight(spec, m, n, get_layout("qtip").pack(words, spec),
                             torch.randn(n, generator=g, device="cuda"), torch.randn(m, generator=g, device="cuda"),
                             torch.randn(512, 2, generator=g, device="cuda").half())
        _last.update(key=key, qw=qw, w64=qw.decode().double())
    return _last["qw"], _last["w64"]


def one_row_gemv(bk: int, split: int, **extra) -> dict:
    """The one-row gemv config of the M = 1 variant tests (64 rows, 4 warps, 16 table copies)."""
    return {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4, "table": "shared16",
            **extra}


def assert_variant_in_pdl_graph(monkeypatch, cfg: dict, variant: dict) -> None:
    """``cfg`` with ``variant``'s keys on, three launches captured in one CUDA graph with PDL ``early``, gives
    ``cfg``'s partials bit for bit (8192^2, K = 2, one row)."""
    monkeypatch.setenv("QTIP_TRITON_PDL", "early")
    qw, _ = weight(8192, 8192, 2)
    pw = kernels.prepare(qw)
    h = torch.randn(1, 8192, device="cuda")
    want = kernels.decode_matmul("gemv", pw, h, cfg, h_order="kernel").clone()
    other = {**cfg, **variant}
    kernels.decode_matmul("gemv", pw, h, other, h_order="kernel")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [kernels.decode_matmul("gemv", pw, h, other, h_order="kernel") for _ in range(3)]
    graph.replay()
    torch.cuda.synchronize()
    for out in outs:
        assert torch.equal(out, want)


def reference(qw: QuantizedWeight, w64: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return qw.output_transform(qw.input_transform(x.double()) @ w64.t())


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("m,n", SHAPES)
def test_decompress_bit_exact(m, n, K):
    qw, w64 = weight(m, n, K)
    pw = kernels.prepare(qw)
    cfg = kernels.default_config("decompress", qw.spec, m, n, 2048)
    out = runners.decompress(pw, cfg, torch.float16)
    assert torch.equal(out, w64.half())


@pytest.mark.parametrize("K", [2, 4])
def test_decompress_row_slabs_bit_exact(K):
    """Row slabs decoded into one reused buffer (many programs each) equal the whole matrix's rows."""
    m, n = 1024, 4096
    qw, w64 = weight(m, n, K)
    pw = kernels.prepare(qw)
    cfg = kernels.default_config("decompress", qw.spec, m, n, 2048)
    want = w64.half()
    buf = torch.empty(256, n, dtype=torch.float16, device="cuda")
    for r0 in range(0, m, 256):
        runners.decompress(pw, cfg, torch.float16, rows=(r0, r0 + 256), out=buf)
        assert torch.equal(buf, want[r0:r0 + 256])


def _cases():
    for m, n in SHAPES:
        for K in (2, 3, 4):
            for M in MS:
                for dt in (torch.float16, torch.bfloat16):
                    if K != 2 and M not in (1, 16, 256):
                        continue
                    if dt == torch.bfloat16 and (K != 3 or M not in (1, 16, 2048)):
                        continue
                    yield pytest.param(m, n, K, M, dt, id=f"{m}x{n}-K{K}-M{M}-{str(dt)[6:]}")


@pytest.mark.parametrize("m,n,K,M,dtype", list(_cases()))
def test_linear_default_dispatch(m, n, K, M, dtype, monkeypatch):
    monkeypatch.setenv("QTIP_TRITON_NO_REGISTRY", "1")
    qw, w64 = weight(m, n, K)
    x = torch.randn(M, n, device="cuda").to(dtype)
    y = linear(x, qw)
    assert y.dtype == dtype and y.shape == (M, m)
    assert rel(y, reference(qw, w64, x)) <= TOL[dtype]


@pytest.mark.parametrize("kind,M", [("gemv", 8), ("gemm", 1), ("gemm", 256), ("decompress", 1)])
def test_every_kind_at_other_batch_sizes(kind, M):
    qw, w64 = weight(4096, 11008, 3)
    x = torch.randn(2, M, 11008, device="cuda").half()
    bias = torch.randn(4096, device="cuda").half()
    y = linear(x, qw, bias, kind=kind)
    assert rel(y, reference(qw, w64, x) + bias.double()) <= TOL[torch.float16]


def test_tp_blocks_on_gpu():
    g = torch.Generator(device="cuda")
    g.seed()
    spec = TrellisSpec(16, 2, 2, "hyb", 9)
    m, n = 4096, 11008
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=g, device="cuda",
                          dtype=torch.int64)
    for rcp in (1, 2):
        qw = QuantizedWeight(spec, m, n, get_layout("qtip").pack(words, spec), torch.randn(n, device="cuda"),
                             torch.randn(m, device="cuda"), torch.randn(512, 2, device="cuda").half(), rcp=rcp,
                             tp_rank=8 if rcp == 2 else 2)
        x = torch.randn(3, n, device="cuda").half()
        assert rel(linear(x, qw, kind="gemv"), qw.reference_forward(x.double())) <= 2e-3
