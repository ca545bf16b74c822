"""The gemv's tensor-core variant (config ``mma``, codegen/mma.py) on this GPU-less machine: the interpreter
runs the mma's operand/result placement written with tensor reshapes, so the whole mapping (packed states as
A, each lane's batch row as B, C back to output rows and batch rows) is checked against float64 here; sm_90
compiles check that Triton lays the tile out as the mma needs and that the layout check catches it when not.
The hardware instruction itself runs in tests/gpu/test_mma_gpu.py."""

from __future__ import annotations

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import TrellisSpec, kernels, linear
from qtip_triton.codegen.emit import emit
from qtip_triton.kernels.configs import config_space, mma_supported
from qtip_triton.kernels.prepare import prepare

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _cfg(bm: int, warps: int = 2, split: int = 1, groups: int = 1, **extra) -> dict:
    """``groups``: 8-row word groups per warp (past one they share x's registers)."""
    return {"BLOCK_M": bm, "BLOCK_N": 16 * warps * groups, "BLOCK_K": 256, "SPLIT_K": split, "num_warps": warps,
            "table": "shared", "mma": True, **extra}


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_gemv_matches_float64(gen, K, dtype):
    qw = random_qweight(gen, TrellisSpec(16, K, 2, "hyb", 9), 96, 512, layout="qtip")  # 96 rows: a ragged block
    bias = torch.randn(96, generator=gen).to(dtype)
    # every batch shape in fp16; bf16 differs only in how x is rounded for the tensor cores: one per BLOCK_M
    shapes = ((1, 8, 2), (5, 8, 1), (8, 8, 1), (11, 16, 2), (16, 16, 1), (19, 16, 1))
    for M, bm, split in shapes if dtype == torch.float16 else shapes[::3]:  # split-K 2; a ragged 16-row block
        x = torch.randn(M, 512, generator=gen).to(dtype)
        y = linear(x, qw, bias, kind="gemv", config=_cfg(bm, split=split))
        ref = qw.reference_forward(x.double(), bias.double())
        err = float((y.double() - ref).norm() / ref.norm())
        assert y.shape == (M, 96) and err <= TOL[dtype], (M, bm, err)


def test_row_groups_sharing_x_give_the_same_results(gen):
    """2 or 4 row groups per warp read x once and repeat it in registers (codegen/mma.py): the same mma
    sequence per element, so the same partials bit for bit as one group per warp, here with ragged row
    blocks (96 rows) and a ragged last k split (768 inputs: 3 k steps over 2 splits), where x is masked."""
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 96, 768, layout="qtip")
    pw = prepare(qw)
    for M, bm in ((1, 8), (13, 16)):
        h = torch.randn(M, 768, generator=gen)
        want = kernels.decode_matmul("gemv", pw, h, _cfg(bm, warps=2, split=2), h_order="natural")
        for warps, groups in ((2, 2), (1, 4)) if bm == 8 else ((2, 2),):
            got = kernels.decode_matmul("gemv", pw, h, _cfg(bm, warps=warps, split=2, groups=groups),
                                        h_order="natural")
            assert torch.equal(got, want), (M, warps, groups)


def test_mma_gemv_reads_partials_like_the_gemv(gen):
    """Same partials layout as the CUDA-core gemv: (splits, M, out) summed by the output transform."""
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 1024, layout="qtip")
    pw = prepare(qw)
    h = torch.randn(3, 1024, generator=gen)
    a = kernels.decode_matmul("gemv", pw, h, _cfg(8, warps=4, split=2), h_order="natural")
    b = kernels.decode_matmul("gemv", pw, h, {"BLOCK_M": 4, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 2,
                                              "table": "shared"}, h_order="natural")
    assert a.shape == b.shape
    assert float((a - b).norm() / b.norm()) < 2e-3  # x rounded to fp16 for the tensor cores


@pytest.mark.parametrize("config,match", [
    (_cfg(4), "BLOCK_M 8 or 16"),
    (_cfg(8, fuse_in=True), "fuse_in"),
    (_cfg(8, prefetch=1), "prefetch"),
    ({**_cfg(8), "mma": "yes"}, "must be a bool"),
])
def test_bad_mma_configs_are_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        emit(TrellisSpec.parse("L16K2V2-hyb9"), "gemv", config)


def test_launch_shapes_the_mma_needs(gen):
    pw = prepare(random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 512, layout="qtip"))
    h = torch.randn(2, 512, generator=gen)
    with pytest.raises(ValueError, match="BLOCK_K=256"):
        kernels.decode_matmul("gemv", pw, h, {**_cfg(8), "BLOCK_K": 128}, h_order="natural")
    with pytest.raises(ValueError, match="16 x num_warps x 1 or 2 or 4"):
        kernels.decode_matmul("gemv", pw, h, {**_cfg(8), "BLOCK_N": 16, "num_warps": 2}, h_order="natural")
    with pytest.raises(ValueError, match="8-row word groups per warp"):
        kernels.decode_matmul("gemv", pw, h, {**_cfg(8), "BLOCK_N": 256}, h_order="natural")  # 8 per warp


def test_only_layouts_with_packed_pairs_get_mma():
    assert mma_supported(TrellisSpec.parse("L16K2V2-hyb9"))
    assert not mma_supported(TrellisSpec.parse("L16K2V1-hyb9"))  # one weight per state: no fp16x2 register
    with pytest.raises(ValueError, match="mma needs"):
        emit(TrellisSpec.parse("L12K3V1-3inst"), "gemv", _cfg(8))
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    for M, bm in ((1, 8), (8, 8), (16, 16)):
        mma = [c for c in config_space("gemv", spec, 4096, 4096, M) if c.get("mma")]
        assert mma and all(c["BLOCK_M"] == bm for c in mma)
        groups = {c["BLOCK_N"] // (16 * c["num_warps"]) for c in mma}
        assert all(c["BLOCK_N"] % (16 * c["num_warps"]) == 0 for c in mma)
        assert groups == {1, 2}, (M, groups)  # 4 (probes only) lost to 2 on the H200
    assert not [c for c in config_space("gemv", spec, 4096, 4096, 32) if c.get("mma")]


def test_the_tuner_times_mma_configs_next_to_the_plain_gemv():
    """The mma configs are a family of their own in the tuner's pruning (they differ from the default in several
    keys at once, so a single prune could leave all of them out)."""
    from qtip_triton.autotune.kernel_api import load_kernel_api
    from qtip_triton.autotune.space import candidates

    api = load_kernel_api()
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    for M in (1, 8, 16):
        got = candidates(api, spec, 4096, 4096, M, max_candidates=12)
        mma = [c for k, c in got if k == "gemv" and c.get("mma")]
        plain = [c for k, c in got if k == "gemv" and not c.get("mma")]
        summed = [c for c in mma if c.get("split_sum")]  # the in-kernel split sum: a twin of each chosen config
        assert 2 <= len(mma) - len(summed) <= 4, (M, got)
        assert all(c["SPLIT_K"] > 1 for c in summed)
        assert bool(plain) == (M <= 8)  # the CUDA-core gemv only within two buckets of where it is the default
        assert all(c["BLOCK_M"] == (8 if M <= 8 else 16) for c in mma)
    got = candidates(api, TrellisSpec.parse("L16K2V1-hyb9"), 4096, 4096, 8, max_candidates=12)
    assert not [c for k, c in got if c.get("mma")]  # no fp16x2 states: no mma family


@pytest.mark.parametrize("own_tables", [False, True], ids=["one_table", "own_tables"])
def test_mma_gemv_decodes_fused_shards_in_one_launch(gen, own_tables):
    """Stacked shards (fused q/k/v, gate/up): each row block reads its own shard's h, as in the plain gemv, and
    its own code table when the shards have their own (bit for bit as each shard alone)."""
    qws = [random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 32, 512, layout="qtip") for _ in range(3)]
    if not own_tables:
        for qw in qws[1:]:
            qw.table = qws[0].table
    pws = [prepare(q) for q in qws]
    fused = kernels.fuse_shards(pws)
    assert fused.table.dim() == (2 if own_tables else 1)
    h = torch.randn(3, 5, 512, generator=gen)
    cfg = _cfg(8, warps=2, split=2)
    assert kernels.shard_blocks_ok(fused, (32, 32, 32), cfg)
    together = kernels.decode_matmul("gemv", fused, h, cfg, h_order="kernel", shard_out=(32, 32, 32))
    alone = torch.cat([kernels.decode_matmul("gemv", pw, h[g], cfg, h_order="kernel") for g, pw in enumerate(pws)], -1)
    assert torch.equal(together, alone)


def test_on_sm80_the_heuristic_runs_the_mma_gemv_for_two_to_sixteen_rows(gen, monkeypatch):
    """What an untuned layer gets on a GPU with mma.sync (faked here; the interpreter runs the config):
    the mma gemv for 2 <= M <= 16 (8 or 16 batch rows per program), a config the tuner's space holds,
    and results within the fp16 bound."""
    from qtip_triton.kernels import configs

    monkeypatch.setattr(configs, "_mma_device", lambda: True)
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    assert [kernels.default_kind(spec, 4096, 4096, M) for M in (1, 2, 8, 9, 16, 17)] == \
        ["gemv", "gemv", "gemv", "gemv", "gemv", "gemm"]
    for m, n, M in ((4096, 4096, 8), (22016, 4096, 4), (4096, 11008, 2), (8192, 8192, 16), (4096, 4096, 9)):
        cfg = kernels.default_config("gemv", spec, m, n, M)
        assert cfg.get("mma") is True and cfg in config_space("gemv", spec, m, n, M), cfg
        assert cfg["BLOCK_M"] == (8 if M <= 8 else 16), cfg
    assert not kernels.default_config("gemv", spec, 4096, 4096, 1).get("mma")  # the CUDA-core gemv keeps M = 1
    # the in-kernel split sum where the retune chose it: split mma configs with >= 8192 outputs up to 8 rows
    summed = {(m, M): kernels.default_config("gemv", spec, m, 8192, M).get("split_sum", False)
              for m in (4096, 8192, 28672) for M in (2, 8, 16)}
    assert summed == {(m, M): m >= 8192 and M <= 8 for m, M in summed}, summed
    assert all(kernels.default_config("gemv", spec, 8192, 8192, M)["SPLIT_K"] > 1 for M in (2, 8))
    assert not kernels.default_config("gemv", spec, 4096, 4096, 8, mma=False).get("mma")  # asked for by name
    assert not kernels.default_config("gemv", TrellisSpec.parse("L16K2V1-hyb9"), 4096, 4096, 8).get("mma")
    assert kernels.default_kind(spec, 4096, 4112, 8) == "gemm"  # 257 word columns: not 16-byte aligned
    qw = random_qweight(gen, spec, 64, 1024, layout="qtip")
    for M in (5, 12):
        x = torch.randn(M, 1024, generator=gen).half()
        y = linear(x, qw)
        ref = qw.reference_forward(x.double())
        assert float((y.double() - ref).norm() / ref.norm()) <= TOL[torch.float16], M


def test_mma_gemv_takes_h_in_fp16_with_identical_results(gen):
    """The input transform writes h in fp16 for the mma gemv (half the x bytes it re-reads per k step): the
    kernel rounds an fp32 h to fp16 itself, so both give bit-identical partials; mixed shards keep fp32."""
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 512, layout="qtip")
    pw = prepare(qw)
    h = torch.randn(6, 512, generator=gen)
    a = kernels.decode_matmul("gemv", pw, h, _cfg(8, warps=4, split=2), h_order="kernel")
    b = kernels.decode_matmul("gemv", pw, h.half(), _cfg(8, warps=4, split=2), h_order="kernel")
    assert torch.equal(a, b)
    plain = {"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 2}
    assert kernels.h_dtype("gemv", [_cfg(8)], torch.bfloat16) == torch.float16
    assert kernels.h_dtype("gemv", [_cfg(8), plain], torch.float16) == torch.float32
    assert kernels.h_dtype("gemv", [plain], torch.float16) == torch.float32
    assert kernels.h_dtype("gemm", [plain], torch.bfloat16) == torch.bfloat16


def test_fused_and_sharded_launches_give_the_mma_gemv_fp16_h(gen):
    """A fused layer through launch_fused / launch_shards with mma configs: one grouped input transform
    writing h in fp16 (kernels.h_dtype), then the decode; every shard's columns against float64."""
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    qws = [random_qweight(gen, spec, 32, 512, layout="qtip") for _ in range(3)]
    for qw in qws[1:]:
        qw.table = qws[0].table
    pws = [prepare(q) for q in qws]
    x = torch.randn(5, 512, generator=gen).half()
    ref = torch.cat([qw.reference_forward(x.double()) for qw in qws], -1)
    pre = torch.stack([qw.SU.float() for qw in qws]).contiguous()
    post = torch.stack([qw.SV.float() for qw in qws]).contiguous()
    cfg = _cfg(8, warps=2, split=2)
    fused = kernels.fuse_shards(pws)
    for run in (lambda out: kernels.launch_fused("gemv", x, fused, pws, cfg, pre, post, out),
                lambda out: kernels.launch_shards("gemv", x, pws, [cfg] * 3, pre, out, post)):
        out = torch.empty(5, 96, dtype=torch.float16)
        run(out)
        assert float((out.double() - ref).norm() / ref.norm()) <= TOL[torch.float16]


@pytest.mark.parametrize("M", [1, 5, 11])  # 8 rows per quad (one row, a partial block), 16 (a partial second)
def test_the_input_transform_writes_h_in_mma_order(gen, M):
    """h for the mma gemv (kernels/mma_layout.py: hq[q, m, e] = h[m, 4q + e], kernel-order h) written by the
    input transform through its destination index and a row stride of 4, alone and for three shards at once,
    is bit for bit the kernel-order transform rearranged."""
    from qtip_triton.kernels import _transform_in, _transform_in_mma, mma_layout

    qws = [random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 32, 512, layout="qtip") for _ in range(3)]
    pws = [prepare(q) for q in qws]
    x = torch.randn(M, 512, generator=gen).half()
    kernel_order = _transform_in(pws[0], x, torch.float16, "gemv")
    hq = _transform_in(pws[0], x, torch.float16, "gemv", order="mma")
    assert hq.shape == (128, M, 4) and hq.stride() == (4 * mma_layout.rows_padded(M), 4, 1)
    assert torch.equal(hq, mma_layout.from_kernel_order(kernel_order))
    assert torch.equal(hq[5, M - 1], kernel_order[M - 1, 20:24])  # the definition, spelled out once
    pre = torch.stack([pw.SU for pw in pws]).contiguous()
    grouped = _transform_in_mma(x, pws[0], pre, torch.float16, (3,))
    assert grouped.shape == (3, 128, M, 4)
    for g, pw in enumerate(pws):
        assert torch.equal(grouped[g], _transform_in(pw, x, torch.float16, "gemv", order="mma"))


def test_mma_order_h_is_checked(gen):
    from qtip_triton.kernels import mma_layout

    pw = prepare(random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 512, layout="qtip"))
    h = torch.randn(3, 512, generator=gen).half()
    hq = mma_layout.from_kernel_order(h)
    assert torch.equal(kernels.decode_matmul("gemv", pw, hq, _cfg(8), h_order="mma"),
                       kernels.decode_matmul("gemv", pw, h, _cfg(8), h_order="kernel"))
    with pytest.raises(ValueError, match="only by the gemv's tensor-core variant"):
        kernels.decode_matmul("gemv", pw, hq, {**_cfg(8), "mma": False}, h_order="mma")
    with pytest.raises(ValueError, match="mma-order h for 512 inputs"):
        kernels.decode_matmul("gemv", pw, h, _cfg(8), h_order="mma")  # a kernel-order h called mma-order
    with pytest.raises(ValueError, match="mma-order h for 512 inputs"):
        kernels.decode_matmul("gemv", pw, hq.transpose(0, 1), _cfg(8), h_order="mma")
    with pytest.raises(ValueError, match="h_order must be"):
        kernels.decode_matmul("gemv", pw, h, _cfg(8), h_order="quads")
    with pytest.raises(ValueError, match="at least one row"):
        mma_layout.rows_padded(0)
    # one quad stride (a compile-time constant of the kernel) per autotune bucket (b/2, b], as warmed at load
    from qtip_triton.autotune.buckets import warm_rows
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        assert {mma_layout.rows_padded(M) for M in range(b // 2 + 1, b + 1)} == \
            {mma_layout.rows_padded(M) for M in warm_rows(b)} == {max(8, b)}
    odd = prepare(random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 16 * 18, layout="qtip"))
    with pytest.raises(ValueError, match="divisible by 64"):  # class blocks of 18 word columns: not whole quads
        kernels.decode_matmul("gemv", odd, torch.randn(2, 16 * 18, generator=gen), _cfg(8), h_order="kernel")


def test_a_register_cap_is_a_launch_option(gen):
    """``maxnreg`` (for probes; not in the tuner's space) changes nothing the interpreter computes, and a bad
    value is a clear error; tests/test_sass_count.py checks that ptxas gets it."""
    pw = prepare(random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 512, layout="qtip"))
    h = torch.randn(3, 512, generator=gen).half()
    assert torch.equal(kernels.decode_matmul("gemv", pw, h, _cfg(8, maxnreg=96), h_order="kernel"),
                       kernels.decode_matmul("gemv", pw, h, _cfg(8), h_order="kernel"))
    for bad in (100, 16, 256, True, "96"):
        with pytest.raises(ValueError, match="maxnreg"):
            kernels.decode_matmul("gemv", pw, h, _cfg(8, maxnreg=bad), h_order="kernel")


def _ttgir(layout: str, name: str = "#blocked") -> str:
    """A compiled kernel's TTGIR reduced to what the layout check reads: one layout and one mma on it."""
    return (f"{name} = {layout}\n"
            '%1:4 = tt.elementwise_inline_asm "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0}" '
            f"%a : tensor<64x16xi32, {name}> -> (tensor<64x16xf32, {name}>, tensor<64x16xf32, {name}>)\n")


def test_the_layout_check_accepts_only_the_mma_placement():
    """The launcher refuses an mma gemv that Triton laid out otherwise (its results would be wrong): the
    blocked layout of one row group per warp, and the linear layout Triton gives row groups that share x."""
    from qtip_triton.codegen.mma import layout_ok

    blocked = "#ttg.blocked<{{sizePerThread = [1, 4], threadsPerWarp = [{}], warpsPerCTA = [4, 1], order = [1, 0]}}>"
    assert layout_ok(_ttgir(blocked.format("8, 4"))) == (True, "")
    ok, why = layout_ok(_ttgir(blocked.format("4, 8")))
    assert not ok and "threadsPerWarp (4, 8)" in why
    linear = ("#ttg.linear<{{register = [{}], lane = [{}], warp = [[8, 0], [16, 0]], block = []}}>")
    good_lanes = "[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]"
    assert layout_ok(_ttgir(linear.format("[32, 0], [0, 1], [0, 2]", good_lanes), "#linear")) == (True, "")
    for reg, lanes in (("[4, 0], [0, 1], [0, 2]", good_lanes),  # a register holding a row of the same group
                       ("[32, 0], [0, 1], [0, 4]", good_lanes),  # columns not a quad
                       ("[32, 0], [0, 1], [0, 2]", "[0, 4], [1, 0], [0, 8], [2, 0], [4, 0]")):  # lanes swapped
        ok, why = layout_ok(_ttgir(linear.format(reg, lanes), "#linear"))
        assert not ok and "#linear" in why, (reg, lanes)
    assert layout_ok("") == (False, "no mma.sync found in the compiled kernel")
