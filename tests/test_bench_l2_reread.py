"""bench/l2_reread.py: its kernel reads (and sums) exactly the h tiles a wgmma program of its grid reads (Triton's
interpreter; the timing itself runs on the GPU only)."""

from __future__ import annotations

import pytest
import torch

from tests.bench_scripts import load_script

l2 = load_script("l2_reread")


@pytest.mark.parametrize("M,block_m,split", [(40, 16, 2), (32, 32, 1)])
def test_each_program_sums_its_token_tile_over_its_k_range(M, block_m, split):
    n, rows, bk = 256, 2, 64
    h = torch.randn(M, n, generator=torch.Generator().manual_seed(M))
    tiles = -(-M // block_m)
    out = torch.empty(rows * split * tiles)
    l2._reread[(rows, split, tiles)](h, out, M, n, n // bk // split, BLOCK_M=block_m, BK=bk)
    per = n // split
    ref = [h[t * block_m:(t + 1) * block_m, s * per:(s + 1) * per].sum() for _ in range(rows) for s in range(split)
           for t in range(tiles)]
    torch.testing.assert_close(out, torch.stack(ref), rtol=1e-5, atol=1e-3)


def test_a_split_that_leaves_part_of_a_step_is_refused():
    with pytest.raises(ValueError, match="whole number of 64-column steps"):
        l2.reread_us(256, 192, 16, 16, 2)
