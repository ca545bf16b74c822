"""Generated kernels in the Triton interpreter: bit-exact decompress, gemv/gemm vs float64, dispatch."""

from __future__ import annotations

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import QTIPLinear, TrellisSpec, kernels, linear
from qtip_triton.kernels import runners
from qtip_triton.kernels.prepare import prepare

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEC = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}


def _generic_specs() -> list[str]:
    """Every code, K in 1..4, V in {1, 2} where the code allows it, L in {12, 16}."""
    out = []
    for i, code in enumerate(("hyb9", "1mad", "3inst", "lut")):
        for K in (1, 2, 3, 4):
            L = 12 if (K + i) % 2 else 16
            V = 2 if code in ("hyb9", "lut") and (K + i) % 2 == 0 else 1
            if code.startswith("hyb") and K == 1:
                V = 1  # also cover hyb with V=1 (odd table width)
            out.append(f"L{L}K{K}V{V}-{code}")
    return out


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("K", [2, 3, 4])
def test_decompress_qtip_bit_exact(gen, K):
    qw = random_qweight(gen, TrellisSpec(16, K, 2, "hyb", 9), 64, 96, layout="qtip")
    ref = qw.decode()
    pw = prepare(qw)
    assert torch.equal(runners.decompress(pw, DEC, torch.float32), ref)
    assert torch.equal(runners.decompress(pw, {"BLOCK_N": 64, "BLOCK_K": 64}, torch.float16), ref.half())


@pytest.mark.parametrize("name,layout", [("L16K2V2-hyb9", "qtip"), ("L12K3V1-3inst", "tile"), ("L16K2V1-mcg", "exl3")])
def test_decompress_rows_are_slabs_of_the_whole(gen, name, layout):
    """Row slabs decoded into one reused buffer (the chunked prefill path) equal the whole matrix's rows."""
    qw = random_qweight(gen, TrellisSpec.parse(name), 96, 64, layout=layout)
    pw = prepare(qw)
    whole = runners.decompress(pw, DEC, torch.float32)
    assert torch.equal(whole, qw.decode())
    buf = torch.full((32, 64), float("nan"))
    for r0 in (0, 32, 64):
        got = runners.decompress(pw, DEC, torch.float32, rows=(r0, r0 + 32), out=buf)
        assert got is buf and torch.equal(buf, whole[r0:r0 + 32])
    assert torch.equal(runners.decompress(pw, DEC, torch.float32, rows=(16, 80)), whole[16:80])


def test_decompress_rows_bad_input(gen):
    pw = prepare(random_qweight(gen, TrellisSpec(16, 2, 2, "hyb", 9), 64, 32, layout="qtip"))
    for rows in ((0, 8), (8, 32), (32, 16), (0, 80), (-16, 16)):
        with pytest.raises(ValueError, match="rows="):
            runners.decompress(pw, DEC, torch.float32, rows=rows)
    for out in (torch.empty(16, 32), torch.empty(32, 32, dtype=torch.float16), torch.empty(32, 64)[:, ::2]):
        with pytest.raises(ValueError, match="out must be"):
            runners.decompress(pw, DEC, torch.float32, rows=(0, 32), out=out)


@pytest.mark.parametrize("name", _generic_specs())
def test_decompress_generic_bit_exact(gen, name):
    spec = TrellisSpec.parse(name)
    qw = random_qweight(gen, spec, 48, 32, layout="tile")  # ragged against the 32x32 blocks
    out = runners.decompress(prepare(qw), DEC, torch.float32)
    assert torch.equal(out, qw.decode())


@pytest.mark.parametrize("name", ["L16K2V1-mcg", "L16K3V1-mul1", "L16K4V1-3inst"])
def test_decompress_exl3_layout_bit_exact(gen, name):
    qw = random_qweight(gen, TrellisSpec.parse(name), 32, 64, layout="exl3")
    assert torch.equal(runners.decompress(prepare(qw), DEC, torch.float32), qw.decode())


CASES = [
    ("gemv", 1, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}),
    ("gemv", 5, {"BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}),
    ("gemv", 2, {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "prefetch": True}),
    ("gemv", 1, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "table": "shared"}),
    ("gemv", 3, {"BLOCK_M": 4, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "table": "shared32"}),
    ("gemv", 1, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2, "table": "shared", "prefetch": 2}),
    ("gemv", 2, {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "table": "shared16", "early_words": True}),
    ("gemm", 20, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}),
    ("gemm", 260, {"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}),
    ("decompress", 9, DEC),
]


@pytest.mark.parametrize("kind,M,config", CASES, ids=[c[0] + str(c[1]) + c[2].get("table", "") + f"pf{int(c[2].get('prefetch', 0))}"
                                              + ("ew" if c[2].get("early_words") else "") for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,layout", [("L16K2V2-hyb9", "qtip"), ("L16K4V2-hyb9", "qtip"), ("L12K3V1-3inst", "tile")])
def test_linear_matches_float64(gen, kind, M, config, dtype, name, layout):
    qw = random_qweight(gen, TrellisSpec.parse(name), 64, 96, layout=layout)
    x = torch.randn(M, 96, generator=gen).to(dtype)
    bias = torch.randn(64, generator=gen).to(dtype)
    y = linear(x, qw, bias, kind=kind, config=config)
    assert y.dtype == dtype and y.shape == (M, 64)
    ref = qw.reference_forward(x.double(), bias.double())
    assert _rel(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("rcp", [1, 2])
def test_linear_tp_blocks_and_batch_shape(gen, rcp):
    qw = random_qweight(gen, TrellisSpec.parse("L16K3V2-hyb9"), 128, 192, rcp=rcp, tp_rank=2)
    x = torch.randn(2, 3, 192, generator=gen).half()
    for kind in ("gemv", "gemm"):
        y = linear(x, qw, kind=kind)
        assert y.shape == (2, 3, 128)
        assert _rel(y, qw.reference_forward(x.double())) <= TOL[torch.float16]


def test_default_dispatch_and_module(gen, monkeypatch):
    monkeypatch.setenv("QTIP_TRITON_NO_REGISTRY", "1")
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 64)
    layer = QTIPLinear(qw, bias=torch.randn(64, generator=gen).half())
    for M in (1, 12):
        x = torch.randn(M, 64, generator=gen).half()
        y = layer(x)
        assert _rel(y, qw.reference_forward(x.double(), layer.bias.double())) <= TOL[torch.float16]
    # the repack happened once for the layer although QTIPLinear builds a new QuantizedWeight per call
    assert prepare(layer.qweight) is prepare(layer.qweight)


def test_prepare_cache_sees_in_place_edits(gen):
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 32, 32)
    a = prepare(qw)
    qw.SU.mul_(2)
    b = prepare(qw)
    assert a is not b and torch.equal(b.SU, qw.SU.float())


def test_fp32_input_takes_reference_path(gen):
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 32, 32)
    x = torch.randn(2, 32, generator=gen, dtype=torch.float64)
    assert torch.allclose(linear(x, qw), qw.reference_forward(x))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        linear(x, qw, kind="gemv")


def test_errors(gen, monkeypatch):
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 32, 32)
    x = torch.randn(1, 32, generator=gen).half()
    with pytest.raises(ValueError, match="unknown kernel kind"):
        linear(x, qw, kind="fast")
    with pytest.raises(ValueError, match="BLOCK_N=48"):
        linear(x, qw, kind="gemv", config={"BLOCK_M": 1, "BLOCK_N": 48, "BLOCK_K": 32})
    with pytest.raises(ValueError, match="SPLIT_K"):
        linear(x, qw, kind="gemv", config={"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 0})
    with pytest.raises(ValueError, match="features"):
        linear(torch.randn(1, 31).half(), qw)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(x, qw, torch.zeros(3).half())
    # a device Triton cannot target: reference path by default, a clear error when a kernel is asked for
    monkeypatch.setattr(runners, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    assert kernels.kernels_available("cpu")[0] is False
    with pytest.raises(RuntimeError, match="cannot run on cpu.*TRITON_INTERPRET"):
        linear(x, qw, kind="gemv")
    ref = qw.reference_forward(x.float()).half()
    assert torch.equal(linear(x, qw), ref)


def test_configs_contract():
    from qtip_triton.autotune.kernel_api import ModuleKernelAPI

    api = ModuleKernelAPI(kernels)
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    for kind in kernels.KINDS:
        if not kernels.can_implement(kind, spec, 4096, 4096, 1)[0]:  # wgmma: Hopper only, no interpreter
            assert kind == "wgmma" and kernels.config_space(kind, spec, 4096, 4096, 256) == []
            continue
        for M in (1, 16, 256):
            space = kernels.config_space(kind, spec, 4096, 4096, M)
            assert space, (kind, M)
            default = kernels.default_config(kind, spec, 4096, 4096, M)
            keys = set(default)
            assert all(set(c) <= keys | {"num_stages", "table", "mma", "split_sum", "hfma", "early_words"} for c in space)
    assert kernels.default_kind(spec, 4096, 4096, 1) == "gemv"
    assert kernels.default_kind(spec, 4096, 4096, 64) == "gemm"
    assert kernels.default_kind(spec, 4096, 4096, 256) == "decompress"
    assert kernels.default_kind(spec, 4096, 4096, 2048) == "decompress"
    assert api.kinds() == ("gemv", "gemm", "decompress", "wgmma")
    ok, why = kernels.can_implement("gemv", spec, 4096, 4008, 1)
    assert not ok and "16x16 tiles" in why


def test_default_configs_run(gen):
    """Each kind's heuristic config for a small layer runs and is right (what dispatch uses by default)."""
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 128)
    for kind, M in (("gemv", 3), ("gemm", 16), ("decompress", 2), ("gemv", 1)):
        x = torch.randn(M, 128, generator=gen).half()
        cfg = kernels.default_config(kind, qw.spec, 64, 128, M)
        y = kernels.launch(kind, x, qw, cfg)
        assert _rel(y, qw.reference_forward(x.double())) <= TOL[torch.float16]


def test_exl3_layout_with_128_blocks(gen):
    """EXL3 weights (exl3 layout, mcg code, fixed 128-wide Hadamard blocks) through every kernel kind."""
    from dataclasses import replace

    qw = replace(random_qweight(gen, TrellisSpec.parse("L16K2V1-mcg"), 256, 128, layout="exl3"), had_block=128)
    assert qw.blocks("in") == 1 and qw.blocks("out") == 2
    x = torch.randn(3, 128, generator=gen).half()
    ref = qw.reference_forward(x.double())
    for kind in ("gemv", "gemm", "decompress"):
        assert _rel(linear(x, qw, kind=kind), ref) <= TOL[torch.float16]


def test_large_batch_gemm_tiles_run(gen):
    """The gemm's prefill-sized tiles (the tuner's centre beyond M = 64: 128 rows x 256 outputs at M = 128,
    256 x 128 with split-K from 256 on, 8 warps) are in its space and right, on a layer smaller than one
    tile (ragged rows and batch)."""
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    at_128 = kernels.default_config("gemm", spec, 4096, 4096, 128)
    assert at_128 == {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 8}
    assert at_128 in kernels.config_space("gemm", spec, 4096, 4096, 128)
    default = kernels.default_config("gemm", spec, 4096, 4096, 256)
    assert default == {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 8}
    space = kernels.config_space("gemm", spec, 4096, 4096, 256)
    assert default in space and at_128 in space
    assert all(c["BLOCK_M"] * c["BLOCK_N"] <= c["num_warps"] * 32 * 128 for c in space)  # accumulators per thread
    # too few k blocks for two splits: one
    assert kernels.default_config("gemm", spec, 4096, 256, 256)["SPLIT_K"] == 1
    qw = random_qweight(gen, spec, 192, 256)
    x = torch.randn(150, 256, generator=gen).half()
    for cfg in (at_128, {**default, "BLOCK_K": 64}):  # the second: 256 rows with split-K 2
        y = kernels.launch("gemm", x, qw, cfg)
        assert _rel(y, qw.reference_forward(x.double())) <= TOL[torch.float16], cfg
