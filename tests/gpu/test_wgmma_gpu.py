"""GPU tests of the wgmma decode-matmul (Gluon; Hopper only): Ŵ h against float64 on fresh random data."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import QuantizedWeight, TrellisSpec, kernels
from qtip_triton.bitstream import get_layout
from qtip_triton.kernels import wgmma

pytestmark = pytest.mark.gpu

CONFIGS = [
    {"E": 1, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3},
    {"E": 2, "BLOCK_M": 16, "num_warps": 8, "STAGES": 2, "SPLIT_K": 4},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "SPLIT_K": 2},
    {"E": 4, "BLOCK_M": 128, "num_warps": 4, "STAGES": 2, "WPF": 0},
    {"E": 2, "BLOCK_M": 16, "num_warps": 4, "STAGES": 3, "SPLIT_K": 2, "table": "shared32"},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 3, "table": "shared4"},
    {"E": 1, "BLOCK_M": 64, "num_warps": 4, "STAGES": 2, "table": "shared1"},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "PIPE": 1, "table": "shared32"},
    {"E": 4, "BLOCK_M": 16, "num_warps": 8, "STAGES": 2, "PIPE": 1, "SPLIT_K": 2},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "PIPE": 1, "WPF": 2, "table": "shared32"},
    {"E": 2, "BLOCK_M": 16, "num_warps": 4, "STAGES": 3, "PIPE": 1, "WPF": 2, "SPLIT_K": 2, "table": "shared16"},
    # the warp-specialized shared-A form (WS = 1): one decode for two warpgroups of tokens
    {"E": 1, "BLOCK_M": 512, "num_warps": 8, "STAGES": 2, "WS": 1, "table": "shared16"},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 3, "WS": 1, "table": "gather", "SPLIT_K": 2},
    {"E": 2, "BLOCK_M": 128, "num_warps": 8, "STAGES": 2, "WS": 1, "table": "shared32", "WPF": 0},
]


def _weight(m: int, n: int, K: int) -> QuantizedWeight:
    g = torch.Generator(device="cuda")
    g.seed()
    spec = TrellisSpec(16, K, 2, "hyb", 9)
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=g, device="cuda",
                          dtype=torch.int64)
    return QuantizedWeight(spec, m, n, get_layout("qtip").pack(words, spec), torch.randn(n, device="cuda"),
                           torch.randn(m, device="cuda"), torch.randn(512, 2, generator=g, device="cuda").half())


@pytest.fixture(autouse=True)
def _hopper():
    if not wgmma.available():
        pytest.skip("wgmma needs a Hopper GPU (sm_90)")


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("M", [1, 37, 256])
def test_wgmma_matches_float64(K, cfg, M):
    m, n = 1024, 2048
    qw = _weight(m, n, K)
    pw = kernels.prepare(qw)
    h = torch.randn(M, n, device="cuda").half()
    y = wgmma.decode_matmul(pw, wgmma.to_wgmma_order(pw, h, cfg["E"]), cfg).sum(0)
    ref = h.double() @ qw.decode().double().t()
    assert torch.isfinite(y).all()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5


def test_wgmma_rejects_bad_input():
    qw = _weight(256, 512, 2)
    pw = kernels.prepare(qw)
    h = torch.randn(4, 512, device="cuda").half()
    cfg = {"E": 1, "BLOCK_M": 16, "num_warps": 8, "STAGES": 2}
    with pytest.raises(ValueError, match="float16"):
        wgmma.decode_matmul(pw, h.float(), cfg)
    with pytest.raises(ValueError, match="SPLIT_K"):
        wgmma.decode_matmul(pw, wgmma.to_wgmma_order(pw, h, 1), {**cfg, "SPLIT_K": 3})
    with pytest.raises(ValueError, match="Hopper|sm_90"):
        wgmma.decode_matmul(pw, h.cpu(), cfg)
    hw = wgmma.to_wgmma_order(pw, h, 1)
    with pytest.raises(ValueError, match="wgmma out must be"):  # a shard's slice of stacked partials, wrong shape
        wgmma.decode_matmul(pw, hw, {**cfg, "SPLIT_K": 2}, out=torch.empty(1, 4, 256, device="cuda"))
    with pytest.raises(ValueError, match="wgmma out must be"):
        wgmma.decode_matmul(pw, hw, cfg, out=torch.empty(1, 4, 256, device="cuda", dtype=torch.float16))
    big = {"E": 4, "BLOCK_M": 256, "num_warps": 8, "STAGES": 6, "table": "shared32"}  # ~1.1 MB of x ring
    with pytest.raises(ValueError, match="shared memory"):
        wgmma.decode_matmul(pw, wgmma.to_wgmma_order(pw, h, 4), big)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 100, 256, 300])
def test_wgmma_kind_forward_matches_reference(dtype, M):
    """The kind end to end (input transform into wgmma order, decode-matmul, output transform summing the split):
    y = x W_effᵀ + b against the float64 reference forward, with every config the heuristic and the space's
    corners give at this M."""
    m, n = 1024, 2048
    qw = _weight(m, n, 2)
    spec = qw.spec
    x = torch.randn(3, M, n, device="cuda").to(dtype)[1]
    bias = torch.randn(m, device="cuda")
    ref = qw.reference_forward(x.double(), bias.double())
    space = kernels.config_space("wgmma", spec, m, n, max(M, 16))
    picks = [kernels.default_config("wgmma", spec, m, n, M), space[0], space[-1],
             next(c for c in space if c["PIPE"] == 1)]
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for cfg in picks:
        y = kernels.launch("wgmma", x, qw, cfg, bias.to(dtype))
        assert y.dtype == dtype and y.shape == (M, m)
        err = float((y.double() - ref).norm() / ref.norm())
        assert err < tol, (cfg, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [37, 256])
def test_wgmma_out16_forward_matches_reference(dtype, M):
    """OUT16 (one fp16 partial, opt-in): the kind end to end against the float64 reference forward, at the same
    bounds as the fp32 partials (the fp16 rounding of the partial is ~5e-4 relative)."""
    m, n = 1024, 2048
    qw = _weight(m, n, 2)
    x = torch.randn(M, n, device="cuda").to(dtype)
    ref = qw.reference_forward(x.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for cfg in ({"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "SPLIT_K": 1, "table": "shared32", "PIPE": 1},
                {"E": 2, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "SPLIT_K": 1, "table": "shared16", "PIPE": 0}):
        parts = kernels.kernel_partials("wgmma", kernels.prepare(qw), kernels.kernel_input("wgmma", kernels.prepare(qw),
                                        x, {**cfg, "OUT16": 1}), {**cfg, "OUT16": 1})
        assert parts.dtype == torch.float16 and parts.shape == (1, M, m)
        y = kernels.launch("wgmma", x, qw, {**cfg, "OUT16": 1})
        err = float((y.double() - ref).norm() / ref.norm())
        assert y.dtype == dtype and err < tol, (cfg, err)


@pytest.mark.parametrize("M", [300, 512, 1100])
def test_wgmma_ws_forward_matches_reference(M):
    """WS = 1 end to end (input transform, the warp-specialized kernel over several 512-token tiles, output
    transform) against the float64 reference forward, at K = 2 and 4."""
    m, n = 1024, 2048
    for K in (2, 4):
        qw = _weight(m, n, K)
        x = torch.randn(M, n, device="cuda").half()
        ref = qw.reference_forward(x.double())
        for cfg in ({"E": 1, "BLOCK_M": 512, "num_warps": 8, "STAGES": 2, "WS": 1, "table": "shared32"},
                    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "WS": 1, "table": "shared16", "SPLIT_K": 2}):
            y = kernels.launch("wgmma", x, qw, cfg)
            err = float((y.double() - ref).norm() / ref.norm())
            assert torch.isfinite(y).all() and err < 2e-3, (K, cfg, err)


def test_wgmma_is_the_heuristic_kind_between_gemm_and_decompress(monkeypatch):
    monkeypatch.setenv("QTIP_TRITON_NO_REGISTRY", "1")
    monkeypatch.delenv("QTIP_TRITON_WGMMA", raising=False)  # on by default
    from qtip_triton.dispatch import linear

    qw = _weight(1024, 2048, 2)
    assert kernels.default_kind(qw.spec, 1024, 2048, 256) == "wgmma"
    assert kernels.default_kind(qw.spec, 1024, 2048, 64) == "gemm"
    assert kernels.default_kind(qw.spec, 1024, 2048, 1024) == "decompress"
    monkeypatch.setenv("QTIP_TRITON_WGMMA", "0")
    assert kernels.default_kind(qw.spec, 1024, 2048, 256) == "decompress"
    monkeypatch.delenv("QTIP_TRITON_WGMMA")
    x = torch.randn(200, 2048, device="cuda").half()
    y = linear(x, qw)
    ref = qw.reference_forward(x.double())
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.parametrize("outs", [(1024, 1024, 1024), (1024, 512)], ids=["equal", "unequal"])
@pytest.mark.parametrize("M", [64, 300])
def test_wgmma_shards_with_one_input_transform_match_reference(monkeypatch, outs, M):
    """Fused shards on the wgmma kind through launch_shards (QTIP_TRITON_WGMMA_SHARED_INPUT=1): one grouped input
    transform (scattered into the kernel's order at 64 tokens, natural then gathered at 300), each shard's decode
    into its slice of one partials tensor, then one grouped output transform (equal shards) or one per shard;
    every shard's columns against the float64 reference forward."""
    monkeypatch.setenv(kernels.WGMMA_SHARED_INPUT_ENV, "1")
    n = 2048
    qws = [_weight(m, n, 2) for m in outs]
    pws = [kernels.prepare(qw) for qw in qws]
    x = torch.randn(M, n, device="cuda").half()
    ref = torch.cat([qw.reference_forward(x.double()) for qw in qws], -1)
    pre = torch.stack([qw.SU.float() for qw in qws]).contiguous()
    post = torch.stack([qw.SV.float() for qw in qws]).contiguous() if len(set(outs)) == 1 else None
    for cfg in ({"E": 1, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "SPLIT_K": 2},
                {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "PIPE": 1, "table": "shared32"}):
        out = torch.full((M, sum(outs)), float("nan"), device="cuda", dtype=torch.float16)
        kernels.launch_shards("wgmma", x, pws, [cfg] * len(qws), pre, out, post)
        err = float((out.double() - ref).norm() / ref.norm())
        assert torch.isfinite(out).all() and err < 2e-3, (cfg, err)


FUSED_CONFIGS = [
    {"E": 2, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "SPLIT_K": 4, "WPF": 1, "table": "shared16"},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "PIPE": 1, "table": "shared32"},
    {"E": 1, "BLOCK_M": 64, "num_warps": 4, "STAGES": 2, "table": "gather", "SPLIT_K": 2},
    # one warpgroup over 256 tokens: the 11008-row shards' shipped config at 256, which bench/gpu_refresh.sh's
    # "pending36" step runs over gate/up's both shards in one launch
    {"E": 1, "BLOCK_M": 256, "num_warps": 4, "STAGES": 2, "PIPE": 1, "table": "shared16"},
]


@pytest.mark.parametrize("cfg", FUSED_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("outs", [(1024, 1024, 1024), (1024, 512, 512), (2048, 1024)], ids=["3eq", "3uneq", "2"])
@pytest.mark.parametrize("M", [5, 64, 300])
def test_wgmma_stacked_shards_in_one_launch_are_each_shards_own_decode(cfg, outs, M):
    """A fused weight's stacked shards (each with its own code table) in ONE launch (source option SHARDS): every
    shard's columns of the partials bit for bit as that shard's own launch on its own h (same words, table, k split
    and order), with rows of the next shard's h inside each TMA box at M = 5 and 300 (not multiples of BLOCK_M)."""
    n = 2048
    qws = [_weight(m, n, 2) for m in outs]
    for g, qw in enumerate(qws):
        qw.table = qw.table * (1.0 + 0.01 * g)  # own tables: the fused weight stacks them
    pws = [kernels.prepare(qw) for qw in qws]
    fused = kernels.fuse_shards(pws)
    assert fused is not None and fused.table.dim() == 2
    hs = torch.stack([wgmma.to_wgmma_order(pw, torch.randn(M, n, device="cuda").half(), cfg["E"]) for pw in pws])
    y = wgmma.decode_matmul(fused, hs.contiguous(), cfg)
    col = 0
    for g, pw in enumerate(pws):
        own = wgmma.decode_matmul(pw, hs[g], cfg)
        assert torch.equal(y[..., col:col + pw.out_features], own), (g, cfg)
        col += pw.out_features


@pytest.mark.parametrize("M", [64, 300])
def test_wgmma_fused_decode_through_dispatch_matches_reference(monkeypatch, M):
    """QTIP_TRITON_WGMMA_FUSED_DECODE=1: linear_shards takes launch_fused's one wgmma launch (the registry's config
    for the fused shape pinned here to a wgmma config); the output matches the float64 forward and the per-shard
    launches' (the same partials: the test above)."""
    from qtip_triton import dispatch

    n = 2048
    qws = [_weight(1024, n, 2) for _ in range(3)]
    pws = [kernels.prepare(qw) for qw in qws]
    fused = kernels.fuse_shards(pws)
    cfg = FUSED_CONFIGS[0]
    monkeypatch.setattr(dispatch, "_select_shape", lambda spec, m, k, rows: ("wgmma", cfg))
    monkeypatch.setattr(dispatch, "_select", lambda qw, rows: ("wgmma", cfg))
    x = torch.randn(M, n, device="cuda").half()
    pre = torch.stack([qw.SU.float() for qw in qws]).contiguous()
    post = torch.stack([qw.SV.float() for qw in qws]).contiguous()
    ref = torch.cat([qw.reference_forward(x.double()) for qw in qws], -1)
    calls = []
    real = wgmma.decode_matmul
    monkeypatch.setattr(wgmma, "decode_matmul", lambda pw, h, c, out=None: calls.append(h.dim()) or real(pw, h, c, out))
    outs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(kernels.WGMMA_FUSED_DECODE_ENV, switch)
        calls.clear()
        out = torch.full((M, 3 * 1024), float("nan"), device="cuda", dtype=torch.float16)
        dispatch.linear_shards(x, qws, pre, out, post, fused=fused)
        outs[switch] = (out, list(calls))
    assert outs["1"][1] == [3] and outs["0"][1] == [2, 2, 2]  # one stacked launch against one per shard
    err = float((outs["1"][0].double() - ref).norm() / ref.norm())
    assert torch.isfinite(outs["1"][0]).all() and err < 2e-3, err
    one, each = outs["1"][0].double(), outs["0"][0].double()
    assert float((one - each).norm() / each.norm()) < 1e-3


@pytest.mark.parametrize("strided", ["0", "1", ""])
@pytest.mark.parametrize("M", [16, 64, 200])
def test_wgmma_lane_strided_forward_matches_reference(monkeypatch, strided, M):
    """``QTIP_TRITON_WGMMA_LANE_STRIDE``: the kind end to end at an 11008-column input (Llama-2-7B's down) with E = 2
    and 4 matches the float64 reference either way; strided (1, or unset: the default there), its order folds into
    B's columns (no scattered transform), contiguous (0) it does not for E = 2."""
    from qtip_triton.codegen.wgmma import LANE_STRIDE_ENV

    monkeypatch.setenv(LANE_STRIDE_ENV, strided)
    m, n = 256, 11008
    qw = _weight(m, n, 2)
    pw = kernels.prepare(qw)
    x = torch.randn(M, n, device="cuda").half()
    ref = qw.reference_forward(x.double(), None)
    assert (wgmma.input_cols(pw, 2) is not None) == (strided != "0")
    for cfg in ({"E": 2, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "SPLIT_K": 2, "table": "shared16"},
                {"E": 4, "BLOCK_M": 16, "num_warps": 4, "STAGES": 3, "table": "shared16"},
                {"E": 2, "BLOCK_M": 16, "num_warps": 4, "STAGES": 3, "PIPE": 1, "WPF": 2, "table": "shared16"}):
        y = kernels.launch("wgmma", x, qw, cfg)
        err = float((y.double() - ref).norm() / ref.norm())
        assert torch.isfinite(y).all() and err < 2e-3, (cfg, err)


def test_launch_stats_describe_the_launch():
    """``last_launch``: the grid of the launch, the compiled kernel's registers and shared memory (at least the x ring
    and table the kind's space sizes configs by), and the programs an SM that those allow."""
    from qtip_triton.kernels.wgmma_configs import smem_bytes, table_words

    cfg = {"E": 2, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "SPLIT_K": 2, "WPF": 1, "table": "shared16", "PIPE": 0}
    qw = _weight(1024, 2048, 2)
    pw = kernels.prepare(qw)
    h = torch.randn(48, 2048, device="cuda").half()
    wgmma.decode_matmul(pw, wgmma.to_wgmma_order(pw, h, 2), cfg)
    stats = wgmma.last_launch(cfg)
    assert stats is not None and stats.grid == (pw.words.shape[1] // wgmma.word_rows(cfg), 2, 1)
    ring = smem_bytes(cfg, table_words(qw.spec))
    assert ring - 4096 <= stats.shared_bytes <= ring + 4096 and 32 <= stats.registers <= 255
    assert stats.per_sm() == wgmma.programs_per_sm(stats.registers, stats.shared_bytes, 4) >= 1


def _with_nan_behind(h: torch.Tensor) -> torch.Tensor:
    """A copy of h (rows or stacked shards) in an ``h_buffer`` whose reserved rows behind it hold NaN."""
    buf = wgmma.h_buffer(tuple(h.shape[:-2]), h.shape[-2], h.shape[-1], h.device)
    flat = torch.empty(0, dtype=buf.dtype, device=buf.device).set_(buf.untyped_storage())
    flat.fill_(float("nan"))
    buf.copy_(h)
    return buf


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[7], CONFIGS[12],
                                 {"E": 1, "BLOCK_M": 256, "num_warps": 4, "STAGES": 3, "PIPE": 1, "table": "gather"}],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("M", [37, 160, 256])
def test_rows_described_past_h_change_no_stored_value(monkeypatch, cfg, M):
    """Rows described past h (the default; QTIP_TRITON_WGMMA_PAD_ROWS=0 turns it off): TMA boxes read the reserved
    rows behind h (here NaN) instead of zero-filling past its end; every stored partial is bit for bit the exact
    descriptor's, for one weight and for stacked shards in one launch (the last shard's tail reaches the reserve)."""
    n = 2048
    qw = _weight(1024, n, 2)
    pw = kernels.prepare(qw)
    h = wgmma.to_wgmma_order(pw, torch.randn(M, n, device="cuda").half(), cfg["E"])
    monkeypatch.setenv(wgmma.PAD_ROWS_ENV, "0")
    exact = wgmma.decode_matmul(pw, h, cfg)
    monkeypatch.setenv(wgmma.PAD_ROWS_ENV, "1")
    past = wgmma.decode_matmul(pw, _with_nan_behind(h), cfg)
    assert torch.equal(past, exact), cfg
    pws = [kernels.prepare(_weight(m, n, 2)) for m in (1024, 512, 512)]
    fused = kernels.fuse_shards(pws)
    if wgmma.warp_specialized(cfg):
        assert not wgmma.fused_ok(fused, cfg)  # stacked shards take register-A configs only
        return
    assert wgmma.fused_ok(fused, cfg), cfg
    hs = torch.stack([wgmma.to_wgmma_order(p, torch.randn(M, n, device="cuda").half(), cfg["E"]) for p in pws])
    monkeypatch.setenv(wgmma.PAD_ROWS_ENV, "0")
    exact = wgmma.decode_matmul(fused, hs.contiguous(), cfg)
    monkeypatch.setenv(wgmma.PAD_ROWS_ENV, "1")
    assert torch.equal(wgmma.decode_matmul(fused, _with_nan_behind(hs), cfg), exact), cfg
