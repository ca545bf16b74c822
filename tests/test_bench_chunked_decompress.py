"""bench/chunked_decompress.py: the row-slab path it times computes the same product as the whole Ŵ (Triton
interpreter, small shapes), in both result layouts."""

from __future__ import annotations

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import TrellisSpec, kernels
from qtip_triton.kernels import runners
from qtip_triton.kernels.prepare import prepare
from tests.bench_scripts import load_script

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)


@pytest.mark.parametrize("transposed", [False, True])
def test_row_slabs_give_the_whole_product(gen, transposed):
    chunked = load_script("chunked_decompress")
    pw = prepare(random_qweight(gen, TrellisSpec(16, 2, 2, "hyb", 9), 96, 64, layout="qtip"))
    cfg = {"BLOCK_N": 32, "BLOCK_K": 32}
    h = torch.randn(5, 64, generator=gen).half()
    want = h.float() @ runners.decompress(pw, cfg, torch.float32).t()
    fns, y = chunked.row_slabs([pw], h, cfg, 32, transposed)  # 3 slabs, the last one reusing the buffer
    y.fill_(float("nan"))
    fns[0]()
    got = (y.t() if transposed else y).float()
    assert torch.allclose(got, want, rtol=2e-3, atol=2e-2)
