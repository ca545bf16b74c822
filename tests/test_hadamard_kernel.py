"""Triton Hadamard transform (interpreter) vs the float64 reference transforms."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import hadamard, kernels
from qtip_triton.kernels.hadamard import factor, supported, transform

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)


def _reference(x64: torch.Tensor, blocks: int, transpose: bool) -> torch.Tensor:
    parts = x64.reshape(*x64.shape[:-1], blocks, x64.shape[-1] // blocks)
    fn = hadamard.apply_mt if transpose else hadamard.apply_m
    return fn(parts).reshape(x64.shape)


def _rel(y, ref) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("kh", (1,) + hadamard.HADK_ORDERS)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("p", [16, 256], ids=["p16", "p256"])
def test_every_hadk(gen, kh, transpose, p):
    """p = 256 splits the power of two as 2 x 128: hadK ⊗ H_2 (5120, 14336, 28672 take this path).
    One token there (tokens are independent programs, and the interpreter's cost grows with each;
    several tokens are covered at p = 16 and in the tests below)."""
    n = kh * p if kh > 1 else 1024 * p // 16
    x = torch.randn(3 if p == 16 else 1, n, generator=gen)
    y = transform(x, 1, transpose=transpose, out_dtype=torch.float32, interpret=True)
    assert _rel(y, _reference(x.double(), 1, transpose)) < 1e-6


@pytest.mark.parametrize("n,blocks", [(4096, 1), (2752, 1), (768, 3), (1024, 8), (512, 4), (96, 1), (32, 2)])
def test_fused_scales_bias_and_blocks(gen, n, blocks):
    x = torch.randn(5, n, generator=gen).half()
    su, sv, bias = (torch.randn(n, generator=gen) for _ in range(3))
    for transpose in (False, True):
        y = transform(x, blocks, transpose=transpose, pre=su, post=sv, bias=bias, out_dtype=torch.float32,
                      interpret=True)
        ref = _reference(x.double() * su.double(), blocks, transpose) * sv.double() + bias.double()
        assert _rel(y, ref) < 1e-6


def test_split_partials_are_summed(gen):
    parts = torch.randn(4, 3, 320, generator=gen)  # 320 = 20 * 16
    y = transform(parts, 1, transpose=False, out_dtype=torch.float16, interpret=True)
    ref = _reference(parts.double().sum(0), 1, False)
    assert y.dtype == torch.float16 and _rel(y, ref) < 1e-3
    # 7 partials, unrolled 4 at a time: the second round trip masks the missing eighth
    parts = torch.randn(7, 2, 1024, generator=gen)
    y = transform(parts, 1, transpose=False, out_dtype=torch.float32, interpret=True, unroll_splits=True)
    assert _rel(y, _reference(parts.double().sum(0), 1, False)) < 1e-6


def test_exl3_blocks_of_128(gen):
    """EXL3: fixed 128-wide blocks of the plain Sylvester H128 (single-stage kernel, many blocks per program)."""
    x = torch.randn(7, 1024, generator=gen)
    y = transform(x, 1024 // 128, transpose=True, out_dtype=torch.float32, interpret=True)
    h = hadamard.hadamard_matrix(128)
    ref = (x.double().reshape(7, 8, 128) @ h).reshape(7, 1024)  # H128 is symmetric: Mᵀ = M
    assert _rel(y, ref) < 1e-6


def test_factor_and_errors():
    assert factor(28672) == (28, 8, 128)
    assert factor(11008) == (172, 1, 64)
    assert factor(8192) == (1, 64, 128)
    assert supported(4096) == (True, None)
    ok, why = supported(352)
    assert not ok and "no Hadamard transform of size 352" in why
    with pytest.raises(ValueError, match="equal Hadamard blocks"):
        transform(torch.zeros(1, 96), 5, transpose=False, interpret=True)
    with pytest.raises(ValueError, match="pre must be"):
        transform(torch.zeros(1, 96), 1, transpose=False, pre=torch.ones(95), interpret=True)


@pytest.mark.parametrize("col_split,unroll,rblk,cblk,zb", [(True, False, None, None, None), (False, True, None, None, None),
                                                           (True, True, None, None, None), (True, True, 16, 16, None),
                                                           (False, False, 16, 64, None), (None, True, None, None, True),
                                                           (True, False, 16, 16, True)])
@pytest.mark.parametrize("n,blocks", [(5120, 1), (4096, 2), (2752, 1)])
def test_small_batch_launch_variants(gen, col_split, unroll, rblk, cblk, zb, n, blocks):
    """Column-split grid, unrolled split-K loads and the A · (Z · B_c) order give the same transform, partial
    sums, scales, bias and destination permutation included."""
    parts = torch.randn(3, 2, n, generator=gen)
    su, sv, bias = (torch.randn(n, generator=gen) for _ in range(3))
    dst = torch.randperm(n, generator=gen).to(torch.int32)
    for transpose in (False, True):
        y = transform(parts, blocks, transpose=transpose, pre=su, post=sv, bias=bias, out_dtype=torch.float32,
                      dst=dst, interpret=True, col_split=col_split, unroll_splits=unroll, rblk=rblk, cblk=cblk,
                      zb_first=zb)
        ref = _reference(parts.double().sum(0) * su.double(), blocks, transpose) * sv.double() + bias.double()
        placed = torch.empty_like(ref)
        placed[:, dst.long()] = ref
        assert _rel(y, placed) < 1e-6


def test_writes_into_a_strided_out_view(gen):
    """``out``: one shard's columns of a wider output (fused layers need no concatenation); the other
    columns are left alone."""
    parts = torch.randn(2, 3, 1024, generator=gen)
    sv = torch.randn(1024, generator=gen)
    wide = torch.full((3, 1024 + 512), 7.0)
    y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float32, interpret=True, out=wide[:, 256:1280])
    assert y.data_ptr() == wide[:, 256:].data_ptr()
    ref = _reference(parts.double().sum(0), 1, False) * sv.double()
    assert _rel(wide[:, 256:1280], ref) < 1e-6
    assert (wide[:, :256] == 7).all() and (wide[:, 1280:] == 7).all()
    with pytest.raises(ValueError, match="out must be"):
        transform(parts, 1, transpose=False, interpret=True, out=wide[:, :1000])
    with pytest.raises(ValueError, match="out is torch.float32"):
        transform(parts, 1, transpose=False, interpret=True, out=wide[:, :1024], out_dtype=torch.float16)
    with pytest.raises(ValueError, match="rblk must be a power of two"):
        transform(parts, 1, transpose=False, interpret=True, rblk=24)


@pytest.mark.parametrize("n,blocks", [(5120, 1), (4096, 2), (256, 2)])
def test_grouped_input_transform(gen, n, blocks):
    """One launch, one x, several groups (fused shards): each group uses its own pre and destination order;
    n = 256 in two blocks takes the Sylvester-only path (a launch per group)."""
    x = torch.randn(3, n, generator=gen)
    pre = torch.randn(3, n, generator=gen)
    dst = torch.stack([torch.randperm(n, generator=gen) for _ in range(3)]).to(torch.int32)
    y = transform(x, blocks, transpose=True, pre=pre, dst=dst, out_dtype=torch.float32, interpret=True)
    assert y.shape == (3, 3, n)
    for g in range(3):
        ref = _reference(x.double() * pre[g].double(), blocks, True)
        placed = torch.empty_like(ref)
        placed[:, dst[g].long()] = ref
        assert _rel(y[g], placed) < 1e-6
    shared = transform(x, blocks, transpose=True, pre=pre, dst=dst[0], out_dtype=torch.float32, interpret=True)
    assert _rel(shared[2], torch.empty_like(y[2]).index_copy_(1, dst[0].long(), _reference(
        x.double() * pre[2].double(), blocks, True).float()).double()) < 1e-6
    with pytest.raises(ValueError, match="grouped pre"):
        transform(x, blocks, transpose=True, pre=pre[:, 1:], interpret=True)
    with pytest.raises(ValueError, match=r"out must be a \(3, 3, \d+\) view"):  # grouped: one (T, n) per group
        transform(x, blocks, transpose=True, pre=pre, interpret=True, out=torch.empty(3, n))
    into = torch.zeros(3, 5, n)[:, 1:4]  # a strided (groups, T, n) view: each group's rows, written in place
    transform(x, blocks, transpose=True, pre=pre, dst=dst, out_dtype=torch.float32, interpret=True, out=into)
    assert torch.equal(into, y.float())


@pytest.mark.parametrize("n,blocks", [(5120, 1), (1024, 1), (256, 2)])
@pytest.mark.parametrize("S", [1, 6])
def test_grouped_output_transform(gen, n, blocks, S):
    """(groups, splits, T, n) partials: each group summed, transformed, scaled by its own post row, into its
    columns of one wide output (a fused layer's shards); n = 256 in two blocks takes the per-group path."""
    parts = torch.randn(3, S, 2, n, generator=gen)
    post = torch.randn(3, n, generator=gen)
    wide = torch.full((2, 3 * n + 8), 5.0)
    y = transform(parts, blocks, transpose=False, post=post, out_dtype=torch.float32, interpret=True,
                  out=wide[:, 4:4 + 3 * n])
    assert y.shape == (2, 3 * n)
    for g in range(3):
        ref = _reference(parts[g].double().sum(0), blocks, False) * post[g].double()
        assert _rel(wide[:, 4 + g * n:4 + (g + 1) * n], ref) < 1e-6
    assert (wide[:, :4] == 5).all() and (wide[:, 4 + 3 * n:] == 5).all()
    fresh = transform(parts, blocks, transpose=False, post=post, out_dtype=torch.float32, interpret=True)
    assert torch.equal(fresh, wide[:, 4:4 + 3 * n])
    with pytest.raises(ValueError, match="grouped post"):
        transform(parts, blocks, transpose=False, post=post[:2], interpret=True)
    with pytest.raises(ValueError, match="post only"):
        transform(parts, blocks, transpose=False, bias=post[0], interpret=True)


TALL = {"tall": True}
STACKED = {"stacked": True}


@pytest.mark.parametrize("n,blocks,T,kw", [
    (2752, 1, 5, TALL), (5120, 1, 3, TALL), (4096, 2, 3, TALL), (768, 3, 4, TALL), (96, 1, 7, TALL),
    (4096, 1, 5, STACKED), (5120, 1, 3, STACKED), (768, 3, 4, STACKED), (1536, 2, 7, {**STACKED, "stack_rows": 64}),
    (4096, 1, 3, {**STACKED, "stack_rows": 32}), (2752, 1, 3, STACKED), (4096, 1, 9, {**STACKED, "stack_rows": 256}),
    (11008, 1, 2, {**STACKED, "stack_cols": 32}), (11008, 1, 2, {**STACKED, "stack_cols": 16, "stack_warps": 4}),
    (11008, 1, 2, {**STACKED, "stack_kc": 32, "stack_warps": 4})])
def test_many_token_kernels_match_reference(gen, n, blocks, T, kw):
    """The many-token kernels (several tokens per GEMM tile, T x blocks not a multiple of the tile; tall: side
    by side, stacked: along the rows, other tile heights): partial sums, scales, bias and the destination order
    as the per-token kernel, both directions."""
    parts = torch.randn(3, T, n, generator=gen)
    su, sv, bias = (torch.randn(n, generator=gen) for _ in range(3))
    dst = torch.randperm(n, generator=gen).to(torch.int32)
    for transpose in (False, True):
        y = transform(parts, blocks, transpose=transpose, pre=su, post=sv, bias=bias, out_dtype=torch.float32,
                      dst=dst, interpret=True, **kw)
        ref = _reference(parts.double().sum(0) * su.double(), blocks, transpose) * sv.double() + bias.double()
        placed = torch.empty_like(ref)
        placed[:, dst.long()] = ref
        assert _rel(y, placed) < 1e-6
    x16 = parts[0].half()  # an fp16 input transform into a strided view of a wider output
    wide = torch.full((T, n + 8), 3.0, dtype=torch.float16)
    transform(x16, blocks, transpose=True, pre=su, interpret=True, out=wide[:, 8:], **kw)
    assert _rel(wide[:, 8:], _reference(x16.double() * su.double(), blocks, True)) < 1e-3
    assert (wide[:, :8] == 3).all()


@pytest.mark.parametrize("n,T,tokens,bm", [(11008, 3, 2, 32), (2752, 5, 8, 16), (5120, 3, 2, None)])
def test_tall_kernel_tiles(gen, n, T, tokens, bm):
    """Other tall tiles (several tokens per tile where CP = 128, fewer rows of A per program): same results,
    input with destination order and grouped output alike."""
    parts = torch.randn(2, T, n, generator=gen)
    su = torch.randn(n, generator=gen)
    dst = torch.randperm(n, generator=gen).to(torch.int32)
    y = transform(parts, 1, transpose=True, pre=su, dst=dst, out_dtype=torch.float32, interpret=True, tall=True,
                  tall_tokens=tokens, tall_bm=bm)
    placed = torch.empty(T, n, dtype=torch.float64)
    placed[:, dst.long()] = _reference(parts.double().sum(0) * su.double(), 1, True)
    assert _rel(y, placed) < 1e-6
    wide = transform(torch.stack([parts, 2 * parts]), 1, transpose=False, out_dtype=torch.float32, interpret=True,
                     tall=True, tall_tokens=tokens, tall_bm=bm)
    ref = _reference(parts.double().sum(0), 1, False)
    assert _rel(wide[:, :n], ref) < 1e-6 and _rel(wide[:, n:], 2 * ref) < 1e-6


@pytest.mark.parametrize("kw", [{"tall_tokens": 3}, {"tall_tokens": 32}, {"tall_bm": 8}, {"tall_bm": 48}])
def test_tall_tile_must_be_a_power_of_two(kw):
    with pytest.raises(ValueError, match="power of two"):
        transform(torch.zeros(2, 256), 1, transpose=False, interpret=True, tall=True, **kw)


@pytest.mark.parametrize("n,kw", [(2752, TALL), (4096, STACKED)], ids=["tall", "stacked"])
def test_many_token_kernel_groups(gen, n, kw):
    """Grouped input (own pre and destination per group) and grouped output (own partials and post, into
    one wide output) through the many-token kernels (the stacked one: 4 tokens per tile, a ragged last one)."""
    T = 5
    x = torch.randn(T, n, generator=gen)
    pre = torch.randn(3, n, generator=gen)
    dst = torch.stack([torch.randperm(n, generator=gen) for _ in range(3)]).to(torch.int32)
    y = transform(x, 1, transpose=True, pre=pre, dst=dst, out_dtype=torch.float32, interpret=True, **kw)
    for g in range(3):
        placed = torch.empty(T, n, dtype=torch.float64)
        placed[:, dst[g].long()] = _reference(x.double() * pre[g].double(), 1, True)
        assert _rel(y[g], placed) < 1e-6
    parts = torch.randn(3, 2, T, n, generator=gen)
    wide = transform(parts, 1, transpose=False, post=pre, out_dtype=torch.float32, interpret=True, **kw)
    for g in range(3):
        ref = _reference(parts[g].double().sum(0), 1, False) * pre[g].double()
        assert _rel(wide[:, g * n:(g + 1) * n], ref) < 1e-6


def test_tall_kernel_is_chosen_by_size(gen, monkeypatch):
    """From TALL_MIN_ROWS (token, block) rows on the many-token kernel runs, unless a small-batch variant is
    asked for or the environment switch turns it off; both kernels agree."""
    from qtip_triton.kernels import hadamard as hk

    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(hk, "_had2_tall_kernel", Spy("tall", hk._had2_tall_kernel))
    monkeypatch.setattr(hk, "_had2_kernel", Spy("per-token", hk._had2_kernel))
    monkeypatch.setattr(hk, "TALL_MIN_ROWS", 8)  # small, so the interpreter stays quick
    x = torch.randn(4, 2752, generator=gen)
    few = transform(x, 1, transpose=False, out_dtype=torch.float32, interpret=True)
    many = transform(torch.cat([x, x]), 1, transpose=False, out_dtype=torch.float32, interpret=True)
    blocks = transform(torch.randn(4, 5504, generator=gen), 2, transpose=False, interpret=True)  # 4 x 2 rows
    small_a = transform(torch.cat([x[:, :1024]] * 4), 1, transpose=False, interpret=True)  # A: 16 rows
    assert launched == ["per-token", "tall", "tall", "per-token"] and blocks.shape == (4, 5504)
    assert small_a.shape == (16, 1024)
    assert _rel(many[:4], few.double()) < 1e-6 and _rel(many[4:], few.double()) < 1e-6
    launched.clear()
    transform(torch.cat([x, x]), 1, transpose=False, interpret=True, col_split=True)
    monkeypatch.setenv(hk.NO_TALL_ENV, "1")
    transform(torch.cat([x, x]), 1, transpose=False, interpret=True)
    transform(torch.cat([x, x]), 1, transpose=False, interpret=True, tall=True)  # an explicit choice wins
    assert launched == ["per-token", "per-token", "tall"]


def test_zb_first_order_for_grouped_shards_and_its_errors(gen):
    """The A · (Z · B_c) order through the grouped launches a fused layer makes (input shards sharing x,
    output shards into one wide output), and a clear error where it does not apply."""
    n, G = 2752, 3  # 172 x 16: A of 172 rows (padded 256), several row blocks
    x = torch.randn(2, n, generator=gen).half()
    su = torch.randn(G, n, generator=gen)
    y = transform(x, 1, transpose=True, pre=su, out_dtype=torch.float32, interpret=True, zb_first=True)
    for g in range(G):
        assert _rel(y[g], _reference(x.double() * su[g].double(), 1, True)) < 1e-6
    parts = torch.randn(G, 2, 2, n, generator=gen)
    sv = torch.randn(G, n, generator=gen)
    y = transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float32, interpret=True, zb_first=True)
    for g in range(G):
        ref = _reference(parts[g].double().sum(0), 1, False) * sv[g].double()
        assert _rel(y[:, g * n:(g + 1) * n], ref) < 1e-6
    for bad in ({"col_split": False}, {"tall": True}, {"gemm": True}):
        with pytest.raises(ValueError, match="zb_first"):
            transform(x.float(), 1, transpose=False, interpret=True, zb_first=True, **bad)


def test_an_explicit_zb_first_false_keeps_the_default_choices(gen, monkeypatch):
    """``zb_first=False`` is the default launch, not a small-batch variant that would turn off the tall kernel."""
    from qtip_triton.kernels import hadamard as had

    seen = []
    monkeypatch.setattr(had, "_use_tall", lambda tall, rows, variant, *a: seen.append(variant) or False)
    transform(torch.randn(2, 1024, generator=gen), 1, transpose=False, interpret=True, zb_first=False)
    assert seen and all(v is None for v in seen[0])


def test_zb_first_is_the_default_where_a_is_small_unless_switched_off(gen, monkeypatch):
    """The column-split launches of A with at most 32 padded rows run the A · (Z · B_c) order unless the call
    says otherwise or QTIP_TRITON_HADAMARD_ZB_FIRST=0; same results as the other order."""
    from qtip_triton.kernels import hadamard as had

    seen = []

    class Spy:
        def __getitem__(self, grid, kernel=had._had2_kernel):
            run = kernel[grid]
            return lambda *a, **kw: seen.append(kw["ZB_FIRST"]) or run(*a, **kw)

    monkeypatch.setattr(had, "_had2_kernel", Spy())
    x = torch.randn(2, 4096, generator=gen)
    su = torch.randn(4096, generator=gen)
    monkeypatch.setenv(had.ZB_ENV, "0")
    plain = transform(x, 1, transpose=True, pre=su, out_dtype=torch.float32, interpret=True)
    monkeypatch.delenv(had.ZB_ENV, raising=False)
    zb = transform(x, 1, transpose=True, pre=su, out_dtype=torch.float32, interpret=True)
    transform(x, 1, transpose=True, pre=su, interpret=True, zb_first=False)  # the call's choice wins
    transform(torch.randn(2, 2752, generator=gen), 1, transpose=False, interpret=True)  # A: 256 padded rows
    assert seen == [False, True, False, False]
    assert _rel(zb, plain.double()) < 1e-6
