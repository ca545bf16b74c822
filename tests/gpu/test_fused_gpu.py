"""GPU tests of fused layers (Llama-2-7B's q/k/v and gate/up) through the custom op: the grouped input and
output transforms and the one-launch decode of stacked shards, against the float64 reference, at decoding
and small-prefill batch sizes (run on the device: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import QuantizedWeight, TrellisSpec, dispatch, kernels
from qtip_triton.bitstream import get_layout
from qtip_triton.ops import PackedShards, qtip_linear

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
LAYERS = {"qkv": (3, 4096, 4096), "gate_up": (2, 11008, 4096)}


def shards(count: int, m: int | list[int], n: int, K: int, own_tables: bool = False) -> list[QuantizedWeight]:
    """Random QTIP-layout shards on the GPU sharing one code table, or (``own_tables``) each with its own, as
    QTIP checkpoints give every linear its own ``tlut`` (the fused decode then reads table g in shard g)."""
    g = torch.Generator(device="cuda")
    g.seed()
    spec = TrellisSpec(16, K, 2, "hyb", 9)
    table = torch.randn(512, 2, generator=g, device="cuda").half()
    out = []
    for i in range(count):
        rows = m[i] if isinstance(m, list) else m
        if own_tables:
            table = torch.randn(512, 2, generator=g, device="cuda").half()
        words = torch.randint(0, 1 << 32, (rows // 16, n // 16, spec.words_per_tile), generator=g, device="cuda",
                              dtype=torch.int64)
        out.append(QuantizedWeight(spec, rows, n, get_layout("qtip").pack(words, spec),
                                   torch.randn(n, generator=g, device="cuda"),
                                   torch.randn(rows, generator=g, device="cuda") * 0.05, table))
    return out


@pytest.mark.parametrize("own_tables", [False, True], ids=["one_table", "own_tables"])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_fused_layer_matches_reference(layer, K, own_tables, monkeypatch):
    qws = shards(*LAYERS[layer], K, own_tables)
    packed = PackedShards.from_qweights(qws, key=f"gpu.{layer}.{K}.{own_tables}")
    packed.register()
    assert packed._fused is not None and packed._fused.table.dim() == (2 if own_tables else 1)
    decodes = []
    real = kernels.decode_matmul
    monkeypatch.setattr(kernels, "decode_matmul", lambda kind, pw, h, *a, **k: decodes.append(h.dim()) or
                        real(kind, pw, h, *a, **k))
    w64 = [qw.decode().double() for qw in qws]
    for M in (1, 4, 8, 16, 64):
        x = torch.randn(M, qws[0].in_features, device="cuda")
        ref = torch.cat([qw.output_transform(qw.input_transform(x.double()) @ w.t()) for qw, w in zip(qws, w64, strict=True)],
                        dim=-1)
        for dtype, tol in TOL.items():
            decodes.clear()
            y = qtip_linear(x.to(dtype), packed)
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < tol, (M, dtype, err)
            kind, cfg = dispatch._select_shape(qws[0].spec, packed.out_total, qws[0].in_features, M)
            if kind in ("gemv", "gemm") and kernels.shard_blocks_ok(packed._fused, packed._fused.shard_out, cfg):
                # one decode launch for all shards: h per shard, (shards, M, in) or in mma order (shards, in/4, M, 4)
                assert decodes == [4 if kernels.h_order(kind, [cfg]) == "mma" else 3], decodes
        # the per-shard paths give the same numbers
        for env in (dispatch.NO_FUSED_DECODE_ENV, dispatch.NO_SHARED_INPUT_ENV):
            monkeypatch.setenv(env, "1")
        y2 = qtip_linear(x.half(), packed)
        monkeypatch.delenv(dispatch.NO_FUSED_DECODE_ENV)
        monkeypatch.delenv(dispatch.NO_SHARED_INPUT_ENV)
        assert float((y2.double() - ref).norm() / ref.norm()) < TOL[torch.float16]


def test_llama3_qkv_with_own_tables_matches_reference():
    """Llama-3-8B's q/k/v (4096, 1024, 1024), each with its own code table: one fused decode where the row blocks
    allow it, q's output transform alone and k/v's grouped, against float64 at decoding batch sizes."""
    qws = shards(3, [4096, 1024, 1024], 4096, 2, own_tables=True)
    packed = PackedShards.from_qweights(qws, key="gpu.llama3.qkv")
    packed.register()
    assert packed._fused is not None and packed._fused.table.dim() == 2
    w64 = [qw.decode().double() for qw in qws]
    for M in (1, 4, 16):
        x = torch.randn(M, 4096, device="cuda")
        ref = torch.cat([qw.output_transform(qw.input_transform(x.double()) @ w.t()) for qw, w in zip(qws, w64, strict=True)],
                        dim=-1)
        y = qtip_linear(x.half(), packed)
        assert float((y.double() - ref).norm() / ref.norm()) < TOL[torch.float16], M
