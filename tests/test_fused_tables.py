"""The one-launch decode of stacked shards that each keep their own code table (QTIP gives every linear its own
``tlut``): every kind and table mode reads the right table in each shard's row blocks, bit for bit as each shard
decoded alone (interpreter)."""

from __future__ import annotations

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import TrellisSpec, kernels
from qtip_triton.kernels.prepare import prepare

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

CASES = [
    ("L16K2V2-hyb9", "gemv", {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 2,
                              "table": "shared"}),
    ("L16K2V2-hyb9", "gemv", {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 2,
                              "table": "gather2"}),
    ("L16K3V2-hyb9", "gemv", {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 2,
                              "table": "shared16", "split_sum": True}),
    ("L16K2V2-hyb9", "gemm", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 2}),
    ("L12K2V1-lut", "gemv", {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 2}),
]


@pytest.mark.parametrize("spec_name,kind,cfg", CASES, ids=[f"{c[1]}-{c[2].get('table', 'default')}" for c in CASES])
def test_fused_decode_reads_each_shards_own_table(gen, spec_name, kind, cfg):
    spec = TrellisSpec.parse(spec_name)
    layout = "qtip" if spec.L == 16 and spec.V == 2 else "tile"  # a research spec: the generic layout
    qws = [random_qweight(gen, spec, 32, 256, layout=layout) for _ in range(3)]
    pws = [prepare(q) for q in qws]
    fused = kernels.fuse_shards(pws)
    assert fused is not None and fused.table.dim() == 2 and fused.table.shape[0] == 3
    M = cfg["BLOCK_M"] if kind == "gemv" else 3
    h = torch.randn(3, M, 256, generator=gen).to(kernels.h_dtype(kind, [cfg], torch.float16))
    assert kernels.shard_blocks_ok(fused, (32, 32, 32), cfg)
    together = kernels.decode_matmul(kind, fused, h, cfg, h_order="kernel", shard_out=(32, 32, 32)).sum(0)
    alone = torch.cat([kernels.decode_matmul(kind, pw, h[g], cfg, h_order="kernel").sum(0)
                       for g, pw in enumerate(pws)], -1)
    assert torch.equal(together, alone)


def test_a_fused_weight_with_own_tables_refuses_unsharded_use(gen):
    """Without per-shard h every row block would read shard 0's table: a clear error, not wrong numbers."""
    qws = [random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 32, 256) for _ in range(2)]
    fused = kernels.fuse_shards([prepare(q) for q in qws])
    cfg = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 2}
    with pytest.raises(ValueError, match="per-shard h"):
        kernels.decode_matmul("gemv", fused, torch.randn(1, 256, generator=gen), cfg, h_order="kernel")
    with pytest.raises(ValueError, match="per-shard tables"):
        kernels.decompress(fused, {"BLOCK_N": 32, "BLOCK_K": 128})
