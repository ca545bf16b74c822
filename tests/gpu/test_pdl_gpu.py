"""GPU tests of programmatic dependent launch (kernels/pdl.py): with PDL our kernels start while the
previous kernel of the stream still runs, so a missing or misplaced ``griddepcontrol.wait`` would read
stale activations or partials. Each test makes the producer of our input a slow kernel in the same
stream (eagerly and inside one CUDA graph, as vLLM runs) and requires the outputs with PDL to be
bit-identical to those without it (same kernels and configs, so the same arithmetic).
"""

from __future__ import annotations

import pytest
import torch

from qtip_triton import QuantizedWeight, TrellisSpec, kernels
from qtip_triton.bitstream import get_layout
from qtip_triton.kernels import pdl
from qtip_triton.ops import PackedShards, qtip_linear

pytestmark = pytest.mark.gpu


def _weights(m: int, n: int, K: int, g: torch.Generator) -> QuantizedWeight:
    spec = TrellisSpec(16, K, 2, "hyb", 9)
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=g, device="cuda",
                          dtype=torch.int64)
    return QuantizedWeight(spec, m, n, get_layout("qtip").pack(words, spec), torch.randn(n, generator=g, device="cuda"),
                           torch.randn(m, generator=g, device="cuda") * 0.05,
                           torch.randn(512, 2, generator=g, device="cuda").half())


def _chain(packs: list[PackedShards], src: torch.Tensor, slow: torch.Tensor) -> list[torch.Tensor]:
    """Every op's input is written by a non-PDL torch kernel just before it, after a slow one."""
    outs = []
    x = src
    for p in packs:
        slow.mul_(1.0000001)  # a long kernel right before the producer: the window a missing wait would hit
        x = (x * 0.5).contiguous()
        x = qtip_linear(x, p)
        outs.append(x)
    return outs


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL needs compute capability 9.0+")
@pytest.mark.parametrize("mode", ["exit", "early"])
@pytest.mark.parametrize("M", [1, 8, 300])
def test_pdl_bit_identical_eager_and_graph(M, mode, monkeypatch):
    assert pdl.triton_supports_pdl(), "this Triton has no launch_pdl option: PDL would silently stay off"
    g = torch.Generator(device="cuda")
    g.seed()
    # 4096 -> 11008 (fused gate/up-like, 2 shards) -> 4096: gemv/gemm/decompress by M, grouped transforms
    packs = [PackedShards.from_qweights([_weights(4096, 4096, 2, g)], key=f"pdl.a.{M}"),
             PackedShards.from_qweights([_weights(5504, 4096, 2, g) for _ in range(2)], key=f"pdl.b.{M}"),
             PackedShards.from_qweights([_weights(4096, 11008, 3, g)], key=f"pdl.c.{M}")]
    for p in packs:
        p.register()
    src = torch.randn(M, 4096, generator=g, device="cuda").half()
    slow = torch.randn(64 << 20, generator=g, device="cuda")

    monkeypatch.setenv(pdl.PDL_ENV, "off")
    assert not pdl.enabled(src.device)
    ref = _chain(packs, src, slow.clone())
    monkeypatch.setenv(pdl.PDL_ENV, mode)
    assert pdl.enabled(src.device) == pdl.MODES[mode] and pdl.launch_args(src.device)["launch_pdl"]

    eager = _chain(packs, src, slow.clone())
    for r, e in zip(ref, eager, strict=True):
        assert torch.equal(r, e)

    # inside a CUDA graph (captured launches keep their programmatic edges)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _chain(packs, src, slow.clone())
    torch.cuda.current_stream().wait_stream(s)
    static_src = src.clone()
    slow2 = slow.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _chain(packs, static_src, slow2)
    for _ in range(3):
        static_src.copy_(torch.randn(M, 4096, generator=g, device="cuda").half())
        graph.replay()
        monkeypatch.setenv(pdl.PDL_ENV, "off")
        want = _chain(packs, static_src, slow.clone())
        monkeypatch.setenv(pdl.PDL_ENV, mode)
        for w, o in zip(want, outs, strict=True):
            assert torch.equal(w, o)


def test_decode_kernels_identical_with_pdl(monkeypatch):
    """The decode launchers alone (every kind) give the same bits with and without PDL."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0+")
    g = torch.Generator(device="cuda")
    g.seed()
    pw = kernels.prepare(_weights(4096, 4096, 2, g))
    h = torch.randn(4, 4096, generator=g, device="cuda").half()
    runs = []
    for mode in ("off", "exit", "early"):
        monkeypatch.setenv(pdl.PDL_ENV, mode)
        runs.append((kernels.decompress(pw, {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}),
                     kernels.decode_matmul("gemv", pw, h, {"BLOCK_M": 4, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4,
                                                           "num_warps": 4, "table": "shared"}, h_order="kernel"),
                     kernels.decode_matmul("gemm", pw, h, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2,
                                                           "num_warps": 4}, h_order="kernel")))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
