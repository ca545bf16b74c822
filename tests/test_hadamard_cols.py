"""The input transform's ``cols`` order (a decode kernel's column order folded into B's columns, interpreter): equal,
bit for bit, to the natural-order transform gathered into that order, on every kernel and the two-GEMM path, with
grouped shards; which kernel orders fold (segment_cols); clear errors."""

from __future__ import annotations

import pytest
import torch
from blas_ties import assert_equal_but_blas_ties

from qtip_triton import kernels
from qtip_triton.codegen.emit import default_layout
from qtip_triton.codegen.plan import input_order, make_plan
from qtip_triton.codegen.wgmma import wgmma_input_order
from qtip_triton.kernels import hadamard as had
from qtip_triton.kernels.hadamard import segment_cols, transform
from qtip_triton.spec import TrellisSpec

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

SPEC = TrellisSpec.parse("L16K2V2-hyb9")
PLAN = make_plan(SPEC, default_layout(SPEC))

KERNELS = [  # (T, launch keywords): which kernel and product order runs
    (3, {"col_split": False}),  # per token, (A · Z) · B by column blocks
    (3, {"zb_first": True}),  # per token, column split, A · (Z · B_c)
    (5, {"tall": True}),  # tokens side by side
    (5, {"stacked": True}),  # tokens stacked
    (3, {"gemm": True}),  # two GEMMs through torch (it stores through a dst index)
]


def _local_order(n: int, nb: int, gen: torch.Generator) -> torch.Tensor:
    """A random order that keeps every P2 segment in place, the same permutation in each."""
    p2 = had.factor(nb)[2]
    where = torch.randperm(p2, generator=gen)
    i = torch.arange(n)
    return (i // p2) * p2 + where[i % p2]


@pytest.mark.parametrize("n,blocks", [(1024, 1), (2752, 1), (512, 4)])  # H_8 ⊗ H_128; hadK 172 x H_16; H_128 only
@pytest.mark.parametrize("T,kw", KERNELS, ids=["rows", "zb", "tall", "stacked", "gemm"])
def test_cols_equal_the_natural_transform_gathered(gen, n, blocks, T, kw):
    nb = n // blocks
    if kw.get("zb_first") and had.factor(nb)[0] * had.factor(nb)[1] == 1:
        pytest.skip("blocks without A have no product order to pick")
    pos = _local_order(n, nb, gen)
    cols = segment_cols(pos, nb)
    assert cols is not None
    x = torch.randn(T, n, generator=gen).half()
    su = torch.randn(n, generator=gen)
    natural = transform(x, blocks, transpose=True, pre=su, out_dtype=torch.float16, interpret=True, **kw)
    got = transform(x, blocks, transpose=True, pre=su, out_dtype=torch.float16, interpret=True, cols=cols, **kw)
    want = torch.empty_like(natural)
    want[:, pos] = natural
    assert_equal_but_blas_ties(got, want)


@pytest.mark.parametrize("stacked", [False, True])
def test_cols_with_grouped_shards(gen, stacked):
    n, G, T = 1024, 3, 4
    pos = _local_order(n, n, gen)
    x = torch.randn(T, n, generator=gen).half()
    pre = torch.randn(G, n, generator=gen)
    natural = transform(x, 1, transpose=True, pre=pre, out_dtype=torch.float16, interpret=True, stacked=stacked)
    got = transform(x, 1, transpose=True, pre=pre, out_dtype=torch.float16, interpret=True, stacked=stacked,
                    cols=segment_cols(pos, n))
    want = torch.empty_like(natural)
    want[:, :, pos] = natural
    assert got.shape == (G, T, n)
    assert_equal_but_blas_ties(got, want)


def test_which_kernel_orders_fold_into_b():
    """The wgmma order folds for every Llama size but 11008 with E = 2 (64-column segments there, a 128-column
    order); the gemm's folds; the gemv's (value class major) does not."""
    for n in (4096, 5120, 8192, 13824, 14336, 28672):
        for E in (1, 2):
            assert segment_cols(wgmma_input_order(PLAN, n, E), n) is not None, (n, E)
        assert segment_cols(input_order(PLAN, n, "gemm"), n) is not None, n
        assert segment_cols(input_order(PLAN, n, "gemv"), n) is None, n
    assert segment_cols(wgmma_input_order(PLAN, 11008, 1), 11008) is not None
    assert segment_cols(wgmma_input_order(PLAN, 11008, 2, False), 11008) is None
    for n in (4096, 8192, 11008, 13824, 14336, 28672):  # lane-strided words (QTIP_TRITON_WGMMA_LANE_STRIDE=1)
        for E in (2, 4):
            assert segment_cols(wgmma_input_order(PLAN, n, E, True), n) is not None, (n, E)
    gen = torch.Generator().manual_seed(0)
    pos = _local_order(1024, 1024, gen)
    pos[[0, 200]] = pos[[200, 0]]  # one column leaves its segment
    assert segment_cols(pos, 1024) is None
    pos = _local_order(1024, 1024, gen)
    pos[[0, 1]] = pos[[1, 0]]  # one segment ordered unlike the others
    assert segment_cols(pos, 1024) is None
    assert segment_cols(torch.arange(2816), 2816) is None  # 11 x 256: a block the kernels do not transform


def test_cols_errors(gen):
    x = torch.randn(2, 1024, generator=gen).half()
    cols = tuple(range(128))
    with pytest.raises(ValueError, match="cols"):
        transform(x, 1, transpose=True, dst=torch.arange(1024, dtype=torch.int32), cols=cols, interpret=True)
    with pytest.raises(ValueError, match="cols"):
        transform(x, 1, transpose=False, post=torch.ones(1024), cols=cols, interpret=True)
    with pytest.raises(ValueError, match="cols"):
        transform(x, 1, transpose=True, cols=cols[:64], interpret=True)
    with pytest.raises(ValueError, match="cols"):
        transform(x, 1, transpose=True, cols=(0,) * 128, interpret=True)
