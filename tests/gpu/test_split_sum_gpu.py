"""GPU tests of split-K summed inside the decode kernels (runners.split_sum_in_kernel): the real atomics,
fences and L2 reads at Llama shapes, bit-identical to the output transform's sum, in eager launches and in
CUDA-graph replays (which rely on every launch leaving its counters zero)."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import TOL, reference, weight

from qtip_triton import kernels, linear
from qtip_triton.kernels import runners

pytestmark = pytest.mark.gpu

CASES = [
    ("gemv", 1, {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 1024, "num_warps": 4, "table": "shared16"}, (2, 4, 8)),
    ("gemv", 8, {"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "table": "shared", "mma": True}, (2, 4, 16)),
    ("gemv", 3, {"BLOCK_M": 4, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "table": "shared"}, (3,)),
    ("gemm", 16, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4}, (4, 8)),
]


def _in_order(parts: torch.Tensor) -> torch.Tensor:
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


@pytest.mark.parametrize("shape", [(4096, 4096), (28672, 8192), (4096, 11008)])
def test_kernel_sum_is_the_partials_in_split_order(shape, monkeypatch):
    qw, _ = weight(*shape, 2)
    pw = kernels.prepare(qw)
    for kind, M, base, splits in CASES:
        h = torch.randn(M, shape[1], device="cuda")
        h = h if kind == "gemv" and not base.get("mma") else h.half()
        for split in splits:
            cfg = {**base, "SPLIT_K": split}
            monkeypatch.setenv(runners.SPLIT_SUM_ENV, "transform")
            parts = kernels.decode_matmul(kind, pw, h, cfg, h_order="kernel")
            want = _in_order(parts)
            monkeypatch.setenv(runners.SPLIT_SUM_ENV, "kernel")
            for _ in range(3):  # each launch finds the counters zeroed by the one before
                got = kernels.decode_matmul(kind, pw, h, cfg, h_order="kernel")
                assert got.shape[0] == 1 and torch.equal(got[0], want), (shape, kind, cfg)
            torch.cuda.synchronize()
            assert not pw.cache[runners._COUNTERS_KEY].any()


def test_graph_replays_match_eager_and_the_reference(monkeypatch):
    monkeypatch.delenv(runners.SPLIT_SUM_ENV, raising=False)  # the config asks for the in-kernel sum
    qw, w64 = weight(8192, 8192, 2)
    cfg = {**CASES[0][2], "SPLIT_K": 4, "split_sum": True}
    x = torch.randn(1, 8192, device="cuda").half()
    eager = linear(x, qw, kind="gemv", config=cfg)  # makes the counters before capture
    assert float((eager.double() - reference(qw, w64, x)).norm() / reference(qw, w64, x).norm()) < TOL[torch.float16]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, qw, kind="gemv", config=cfg)
    for _ in range(5):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
    x.copy_(torch.randn(1, 8192, device="cuda").half())  # new input through the same graph
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, linear(x, qw, kind="gemv", config=cfg))
    assert torch.equal(y, linear(x, qw, kind="gemv", config={**cfg, "split_sum": False}))  # same sum, same order


def test_capture_before_any_launch_still_sums_right(monkeypatch):
    """No counters yet at capture time: the launcher leaves the sum to the output transform."""
    qw, w64 = weight(4096, 11008, 3)
    cfg = {**CASES[1][2], "SPLIT_K": 2}
    x = torch.randn(8, 11008, device="cuda").half()
    monkeypatch.setenv(runners.SPLIT_SUM_ENV, "transform")
    linear(x, qw, kind="gemv", config=cfg)  # compiles the kernel without the in-kernel sum, makes no counters
    monkeypatch.setenv(runners.SPLIT_SUM_ENV, "kernel")
    pw = kernels.prepare(qw)
    pw.cache.pop(runners._COUNTERS_KEY, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, qw, kind="gemv", config=cfg)
    graph.replay()
    torch.cuda.synchronize()
    assert runners._COUNTERS_KEY not in pw.cache
    ref = reference(qw, w64, x)
    assert float((y.double() - ref).norm() / ref.norm()) < TOL[torch.float16]
