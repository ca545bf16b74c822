"""GPU tests of the Hadamard transform kernels at every Llama feature size: the per-token and the many-token
(tall) kernels against the float64 transforms, in both directions (run on the device: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from qtip_triton.kernels.hadamard import transform
from tests.test_hadamard_kernel import _reference

pytestmark = pytest.mark.gpu

SIZES = [4096, 5120, 8192, 11008, 13824, 14336, 28672]


def _case(n: int, T: int, splits: int):
    """Fresh random x, SU, split-K partials, SV and destination order for ``n`` features and ``T`` tokens, with
    the float64 input transform (placed at the destinations) and output transform they must give."""
    g = torch.Generator(device="cuda")
    g.seed()
    x = torch.randn(T, n, generator=g, device="cuda").half()
    su = torch.randn(n, generator=g, device="cuda")
    parts = torch.randn(splits, T, n, generator=g, device="cuda")
    sv = torch.randn(n, generator=g, device="cuda")
    dst = torch.randperm(n, generator=g, device="cuda").to(torch.int32)
    ref_in = torch.empty(T, n, dtype=torch.float64, device="cuda")
    ref_in[:, dst.long()] = _reference(x.double() * su.double(), 1, True)
    ref_out = _reference(parts.double().sum(0), 1, False) * sv.double()
    return x, su, parts, sv, dst, ref_in, ref_out


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("T", [1, 128, 2048])
def test_transform_kernels_match_float64(n, T):
    x, su, parts, sv, dst, ref_in, ref_out = _case(n, T, 3)
    for tall in (False, True):
        y = transform(x, 1, transpose=True, pre=su, dst=dst, tall=tall)
        assert torch.isfinite(y).all() and float((y.double() - ref_in).norm() / ref_in.norm()) < 1e-3, tall
        y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float32, tall=tall)
        assert float((y.double() - ref_out).norm() / ref_out.norm()) < 1e-4, tall  # fp32 out: bf16 hi + lo, ~16 bits


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("T", [1, 4, 16])
def test_zb_first_order_matches_float64(n, T):
    """The A · (Z · B_c) launch variant (bf16 hi + lo products in the other order) at decoding batch sizes."""
    x, su, parts, sv, dst, ref_in, ref_out = _case(n, T, 4)
    y = transform(x, 1, transpose=True, pre=su, dst=dst, out_dtype=torch.float32, zb_first=True)
    assert float((y.double() - ref_in).norm() / ref_in.norm()) < 1e-4
    y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float32, zb_first=True)
    assert float((y.double() - ref_out).norm() / ref_out.norm()) < 1e-4


@pytest.mark.parametrize("n", [4096, 5120, 8192, 13824, 14336])
@pytest.mark.parametrize("T", [1, 5, 128, 2048])
@pytest.mark.parametrize("rows", [None, 32, 64])
def test_stacked_kernel_matches_float64(n, T, rows):
    """The stacked many-token kernel (wgmma-sized tiles on sm_90; every size whose A pads to at most 128 rows),
    a ragged last tile at T = 5, both directions, grouped output into one wide tensor."""
    x, su, parts, sv, dst, ref_in, ref_out = _case(n, T, 3)
    y = transform(x, 1, transpose=True, pre=su, dst=dst, out_dtype=torch.float32, stacked=True, stack_rows=rows)
    assert float((y.double() - ref_in).norm() / ref_in.norm()) < 1e-4
    y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float32, stacked=True, stack_rows=rows)
    assert float((y.double() - ref_out).norm() / ref_out.norm()) < 1e-4
    wide = transform(torch.stack([parts, -parts]), 1, transpose=False, post=torch.stack([sv, sv]),
                     out_dtype=torch.float32, stacked=True, stack_rows=rows)
    assert float((wide[:, n:].double() + ref_out).norm() / ref_out.norm()) < 1e-4


@pytest.mark.parametrize("n", [11008, 28672])
@pytest.mark.parametrize("T", [5, 160, 256])
@pytest.mark.parametrize("warps", [None, 4, 8])
def test_sliced_stacked_tiles_match_float64(n, T, warps):
    """Tiles of A with 256 padded rows, sliced into 64-row steps, with the default warps
    (:func:`~qtip_triton.kernels.hadamard.default_stack_warps`) and each count forced: natural and scattered
    inputs, fp16 and fp32 outputs, a grouped output."""
    x, su, parts, sv, dst, ref_in, ref_out = _case(n, T, 3)
    kw = dict(stacked=True, stack_warps=warps)
    for d in (None, dst):
        y = transform(x, 1, transpose=True, pre=su, dst=d, out_dtype=torch.float32, **kw)
        ref = ref_in if d is not None else _reference(x.double() * su.double(), 1, True)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-4, d is None
    y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float16, **kw)
    assert torch.isfinite(y).all() and float((y.double() - ref_out).norm() / ref_out.norm()) < 1e-3
    wide = transform(torch.stack([parts, -parts]), 1, transpose=False, post=torch.stack([sv, sv]),
                     out_dtype=torch.float32, **kw)
    assert float((wide[:, n:].double() + ref_out).norm() / ref_out.norm()) < 1e-4


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("T", [1, 16, 2048])
def test_f16_dots_match_float64(n, T):
    """One fp16 dot per product (``f16_dots``, fp16 outputs) on the hardware's tensor cores, in every kernel the
    dispatch picks at this size and batch and in both product orders of the per-token kernel: fp16's accuracy
    (the hi + lo pair keeps ~16 bits; this ~11, as the fp16 output does; the default for fp16 outputs)."""
    x, su, parts, sv, dst, ref_in, ref_out = _case(n, T, 4)
    for kw in ({}, {"zb_first": True}) if T <= 16 else ({}, {"tall": True}, {"stacked": True}):
        y = transform(x, 1, transpose=True, pre=su, dst=dst, out_dtype=torch.float16, f16_dots=True, **kw)
        assert torch.isfinite(y).all() and float((y.double() - ref_in).norm() / ref_in.norm()) < 2e-3, kw
        y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float16, f16_dots=True, **kw)
        assert torch.isfinite(y).all() and float((y.double() - ref_out).norm() / ref_out.norm()) < 2e-3, kw


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("T,kw", [(1, {}), (5, {}), (64, {}), (200, {}), (64, {"stacked": True}),
                                  (64, {"tall": True}), (5, {"zb_first": True}), (5, {"col_split": False})],
                         ids=["1", "5", "64", "200", "stacked", "tall", "zb", "rows"])
def test_cols_order_is_the_natural_transform_gathered_bit_for_bit(n, T, kw):
    """``cols`` (a kernel's order folded into B's columns, what the wgmma and gemm kinds' inputs now take) against
    the natural-order launch with the same variant, gathered: equal bit for bit on the tensor cores too, single and
    grouped (three shards' SU)."""
    from qtip_triton.kernels.hadamard import factor, segment_cols

    if kw.get("zb_first") and factor(n)[0] * factor(n)[1] > 32:
        pytest.skip("A · (Z · B_c) is for A of at most 32 rows")
    g = torch.Generator(device="cuda")
    g.seed()
    p2 = factor(n)[2]
    where = torch.randperm(p2, generator=g, device="cuda")
    i = torch.arange(n, device="cuda")
    pos = (i // p2) * p2 + where[i % p2]
    cols = segment_cols(pos, n)
    x = torch.randn(T, n, generator=g, device="cuda").half()
    for pre in (torch.randn(n, generator=g, device="cuda"), torch.randn(3, n, generator=g, device="cuda")):
        natural = transform(x, 1, transpose=True, pre=pre, out_dtype=torch.float16, **kw)
        got = transform(x, 1, transpose=True, pre=pre, out_dtype=torch.float16, cols=cols, **kw)
        want = torch.empty_like(natural)
        want[..., pos] = natural
        assert torch.equal(got, want), (n, T, kw, tuple(pre.shape))
