"""The transforms' ``f16_dots`` variant (one fp16 dot per product instead of a bf16 hi + lo pair, fp16 outputs
only), in the interpreter: every kernel (per token in both product orders, tall, stacked, Sylvester-only),
input and output transforms with their scales, partial sums and destination order, against the float64
reference at fp16's accuracy; the intermediate scaling keeps large activations finite; clear errors."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import kernels
from qtip_triton.kernels import hadamard as had
from qtip_triton.kernels.hadamard import transform
from tests.test_hadamard_kernel import _reference, _rel

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

# fp16 output rounding alone is ~3e-4 relative; operands rounded to fp16 in both products add about as much
F16_TOL = 2e-3


KERNELS = [  # (T, launch keywords): which kernel and product order runs
    (3, {"col_split": False}),  # per token, (A · Z) · B by column blocks
    (3, {"col_split": True, "zb_first": False}),  # per token, column split, (A · Z) · B_c
    (3, {"zb_first": True}),  # per token, column split, A · (Z · B_c)
    (5, {"tall": True}),  # tokens side by side
    (5, {"stacked": True}),  # tokens stacked
]


@pytest.mark.parametrize("n", [1024, 2752])  # A of 8 rows (H_8 ⊗ H_128) and of 172 rows (hadK 172 ⊗ H_1 x H_16)
@pytest.mark.parametrize("T,kw", KERNELS, ids=["rows", "az", "zb", "tall", "stacked"])
def test_f16_dots_match_the_reference(gen, n, T, kw):
    x = torch.randn(T, n, generator=gen).half()
    su, sv = torch.randn(n, generator=gen), torch.rand(n, generator=gen) + 0.5
    dst = torch.randperm(n, generator=gen).to(torch.int32)
    y = transform(x, 1, transpose=True, pre=su, out_dtype=torch.float16, dst=dst, interpret=True, f16_dots=True, **kw)
    want = torch.empty(T, n, dtype=torch.float64)
    want[:, dst.long()] = _reference(x.double() * su.double(), 1, True)
    assert y.dtype == torch.float16 and _rel(y, want) < F16_TOL
    parts = torch.randn(4, T, n, generator=gen)
    y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float16, interpret=True, f16_dots=True, **kw)
    assert _rel(y, _reference(parts.double().sum(0), 1, False) * sv.double()) < F16_TOL


def test_f16_dots_sylvester_blocks_and_grouped_outputs(gen):
    x = torch.randn(4, 512, generator=gen).half()  # four 128-blocks: Sylvester only
    y = transform(x, 4, transpose=True, out_dtype=torch.float16, interpret=True, f16_dots=True)
    assert _rel(y, _reference(x.double(), 4, True)) < F16_TOL
    parts = torch.randn(2, 2, 3, 1024, generator=gen)  # two shards' partials: one grouped output launch
    sv = torch.rand(2, 1024, generator=gen) + 0.5
    y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float16, interpret=True, f16_dots=True)
    for g in range(2):
        want = _reference(parts[g].double().sum(0), 1, False) * sv[g].double()
        assert _rel(y[:, g * 1024:(g + 1) * 1024], want) < F16_TOL


def test_large_activations_stay_finite():
    """The first product's sums are scaled to the output's size before they are rounded to fp16. 1024 = 8 x 128:
    every row of the Z view is c v, where v = [b, b] with b a bent sign pattern on 6 bits, so v · H_128 has
    entries 0 and ±16 only. Unscaled, A · Z sums 8 rows coherently (80000 at c = 10000) and Z · B reaches
    160000, both past fp16's 65504, while the output itself stays at 40000."""
    i = torch.arange(64)
    b = 1.0 - 2.0 * ((i >> 3) & (i & 7)).apply_(lambda t: bin(t).count("1") & 1).double()
    v = torch.cat([b, b])
    x = (10000.0 * v.repeat(8)).reshape(1, 1024).half()
    ref = _reference(x.double(), 1, False)
    assert 35000 < ref.abs().max() < 45000
    for kw in ({"col_split": False}, {"zb_first": True}, {"tall": True}, {"stacked": True}):
        y = transform(x, 1, transpose=False, out_dtype=torch.float16, interpret=True, f16_dots=True, **kw)
        assert torch.isfinite(y).all() and _rel(y, ref) < F16_TOL, kw


def test_f16_dots_errors_and_switch(gen, monkeypatch):
    x = torch.randn(2, 1024, generator=gen).half()
    with pytest.raises(ValueError, match="only for float16 outputs"):
        transform(x, 1, transpose=True, out_dtype=torch.float32, interpret=True, f16_dots=True)
    with pytest.raises(ValueError, match="only for float16 outputs"):
        transform(x.bfloat16(), 1, transpose=True, interpret=True, f16_dots=True)
    monkeypatch.delenv(had.F16_ENV, raising=False)
    assert had._use_f16(None, torch.float16) and not had._use_f16(None, torch.bfloat16)  # on for fp16 unless switched off
    monkeypatch.setenv(had.F16_ENV, "0")
    assert not had._use_f16(None, torch.float16) and not had._use_f16(None, torch.float16, torch.float16, 64)
    monkeypatch.setenv(had.F16_ENV, "1")
    assert had._use_f16(None, torch.float16) and not had._use_f16(None, torch.float32)
    assert not had._use_f16(False, torch.float16)  # an explicit False wins over the switch
    # the switch leaves few-token fp32 partials (one-token output transforms) on the hi + lo pair: slower there
    few, many = had.F16_ENV_FP32_MIN_TOKENS - 1, had.F16_ENV_FP32_MIN_TOKENS
    assert not had._use_f16(None, torch.float16, torch.float32, 1) and not had._use_f16(None, torch.float16, torch.float32, few)
    assert had._use_f16(None, torch.float16, torch.float32, many) and had._use_f16(None, torch.float16, torch.float16, 1)
    assert had._use_f16(True, torch.float16, torch.float32, 1)  # asked for explicitly: on
    monkeypatch.setenv(had.F16_ENV, "yes")
    with pytest.raises(ValueError, match="expected 1"):
        had._use_f16(None, torch.float16)


def test_the_default_is_fp16_dots_and_the_switch_off_the_hi_lo_pair(gen, monkeypatch):
    """Unset, fp16 outputs of 8+ tokens take one fp16 dot per product, identical to asking for f16_dots=True, bf16
    outputs the bf16 hi + lo pair; QTIP_TRITON_HADAMARD_F16=0 keeps the pair (~16 bits) for fp16 outputs too,
    closer to the reference than one fp16 dot can be, and identical to f16_dots=False."""
    parts = torch.randn(4, 8, 1024, generator=gen)
    ref = _reference(parts.double().sum(0), 1, False)
    pair = transform(parts, 1, transpose=False, out_dtype=torch.float16, interpret=True, f16_dots=False)
    y16 = transform(parts, 1, transpose=False, out_dtype=torch.float16, interpret=True, f16_dots=True)
    monkeypatch.delenv(had.F16_ENV, raising=False)
    assert torch.equal(transform(parts, 1, transpose=False, out_dtype=torch.float16, interpret=True), y16)
    b16 = transform(parts, 1, transpose=False, out_dtype=torch.bfloat16, interpret=True)
    assert _rel(b16, ref) < 1e-2
    monkeypatch.setenv(had.F16_ENV, "0")
    assert torch.equal(transform(parts, 1, transpose=False, out_dtype=torch.float16, interpret=True), pair)
    assert _rel(pair, ref) < _rel(y16, ref) < F16_TOL


@pytest.mark.parametrize("switch", ["1", None])
def test_the_switch_skips_few_token_fp32_partials(gen, monkeypatch, switch):
    """QTIP_TRITON_HADAMARD_F16=1 or unset, through ``transform`` itself: one-token fp32 partials (the decode's output
    transform, slower with one fp16 dot on the H100) keep the hi + lo pair; more tokens, or fp16 input, switch."""
    if switch is None:
        monkeypatch.delenv(had.F16_ENV, raising=False)
    else:
        monkeypatch.setenv(had.F16_ENV, switch)
    few = torch.randn(4, 1, 1024, generator=gen)
    many = torch.randn(4, had.F16_ENV_FP32_MIN_TOKENS, 1024, generator=gen)
    for parts, f16 in ((few, False), (many, True)):
        y = transform(parts, 1, transpose=False, out_dtype=torch.float16, interpret=True)
        want = transform(parts, 1, transpose=False, out_dtype=torch.float16, interpret=True, f16_dots=f16)
        other = transform(parts, 1, transpose=False, out_dtype=torch.float16, interpret=True, f16_dots=not f16)
        assert torch.equal(y, want) and not torch.equal(y, other)
    x16 = torch.randn(1, 1024, generator=gen).half()
    y = transform(x16, 1, transpose=True, out_dtype=torch.float16, interpret=True)
    assert torch.equal(y, transform(x16, 1, transpose=True, out_dtype=torch.float16, interpret=True, f16_dots=True))
