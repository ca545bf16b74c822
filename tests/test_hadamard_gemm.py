"""The two-GEMM Hadamard path for many tokens (kernels/hadamard_gemm.py) against the float64 transforms and
against the Triton kernels (interpreter) on every argument the kernels take: split-K partials, pre/post
scales, bias, kernel-order destinations, grouped inputs (fused shards' SU), grouped outputs into one wide
output, blocks, every hadK and the Sylvester-only case; and the switch that turns it on."""

from __future__ import annotations

import pytest
import torch
from test_hadamard_kernel import _reference, _rel

from qtip_triton import hadamard, kernels
from qtip_triton.kernels import hadamard_gemm
from qtip_triton.kernels.hadamard import launch_key, transform

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)


@pytest.mark.parametrize("kh", (1,) + hadamard.HADK_ORDERS)
@pytest.mark.parametrize("transpose", [False, True])
def test_every_hadk_matches_float64(gen, kh, transpose):
    n = kh * 256 if kh > 1 else 4096  # p = 256: hadK ⊗ H_2 ⊗ H_128, the 5120/14336/28672 factoring
    parts = torch.randn(3, 5, n, generator=gen)
    su, sv, bias = (torch.randn(n, generator=gen) for _ in range(3))
    y = transform(parts, 1, transpose=transpose, pre=su, post=sv, bias=bias, out_dtype=torch.float32, gemm=True)
    ref = _reference(parts.double().sum(0) * su.double(), 1, transpose) * sv.double() + bias.double()
    assert _rel(y, ref) < 1e-6


@pytest.mark.parametrize("n,blocks", [(4096, 1), (2752, 1), (768, 3), (1024, 8), (96, 1), (256, 2)])
def test_same_as_the_kernels_with_destinations_and_dtypes(gen, n, blocks):
    x = torch.randn(4, n, generator=gen).half()
    su, sv = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    dst = torch.randperm(n, generator=gen).int()
    for transpose in (False, True):
        kw = dict(pre=su, post=sv, dst=dst, out_dtype=torch.float16)
        a = transform(x, blocks, transpose=transpose, gemm=True, **kw)
        b = transform(x, blocks, transpose=transpose, gemm=False, interpret=True, **kw)
        assert a.dtype == torch.float16 and _rel(a, b.double()) < 2e-3  # both rounded to fp16 once
        ref = _reference(x.double() * su.double(), blocks, transpose) * sv.double()
        moved = torch.empty_like(ref)
        moved[:, dst.long()] = ref
        assert _rel(a, moved) < 1e-3


def test_grouped_inputs_and_outputs(gen):
    n, G, T = 1024, 3, 4
    x = torch.randn(T, n, generator=gen)
    pre = torch.randn(G, n, generator=gen)
    dst = torch.randperm(n, generator=gen).int()
    a = transform(x, 1, transpose=True, pre=pre, dst=dst, out_dtype=torch.float32, gemm=True)
    b = transform(x, 1, transpose=True, pre=pre, dst=dst, out_dtype=torch.float32, gemm=False, interpret=True)
    assert a.shape == (G, T, n) and _rel(a, b.double()) < 1e-6
    parts = torch.randn(G, 2, T, n, generator=gen)  # (groups, splits, T, n) -> columns of one (T, G*n)
    post = torch.randn(G, n, generator=gen)
    wide = torch.zeros(T + 2, G * n + 5)
    out = wide[1:T + 1, 5:]
    transform(parts, 1, transpose=False, post=post, out=out, gemm=True)
    ref = torch.cat([_reference(parts[g].double().sum(0), 1, False) * post[g].double() for g in range(G)], -1)
    assert _rel(out, ref) < 1e-6 and wide[0].eq(0).all() and wide[:, :5].eq(0).all()


def test_off_unless_asked(gen, monkeypatch):
    monkeypatch.delenv(hadamard_gemm.GEMM_ENV, raising=False)
    assert hadamard_gemm.min_rows() is None and launch_key(4096, 1, 4096)[0] != "gemm"
    monkeypatch.setenv(hadamard_gemm.GEMM_ENV, "512")
    assert hadamard_gemm.min_rows() == 512
    assert launch_key(4096, 1, 512)[0] == "gemm" and launch_key(4096, 1, 511)[0] != "gemm"
    calls = []
    real = hadamard_gemm.transform
    monkeypatch.setattr(hadamard_gemm, "transform", lambda *a, **k: calls.append(1) or real(*a, **k))
    transform(torch.randn(600, 256, generator=gen), 1, transpose=False, interpret=True)
    transform(torch.randn(8, 256, generator=gen), 1, transpose=False, interpret=True)
    assert calls == [1]  # from 512 rows on only
    for bad in ("-1", "many"):
        monkeypatch.setenv(hadamard_gemm.GEMM_ENV, bad)
        with pytest.raises(ValueError, match="QTIP_TRITON_HADAMARD_GEMM"):
            hadamard_gemm.min_rows()
