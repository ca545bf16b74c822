"""The wgmma decode-matmul's layout algebra, config checks and sm_90 compile, on the CPU.

The kernel is Gluon, which has no interpreter, so its arithmetic runs only on a GPU (tests/gpu/test_wgmma_gpu.py).
Here a torch emulation builds the A operand exactly as the generated source does (join tree, fp16 halves, reshape,
permute) from a random Ŵ, multiplies it with h in wgmma order step by step, and must give Ŵ h: that checks the
state-to-fragment placement and the h order together, which a wrong index in either breaks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qtip_triton import TrellisSpec
from qtip_triton.codegen.mma import packed_pairs
from qtip_triton.codegen.plan import make_plan
from qtip_triton.codegen.wgmma import (
    ablated,
    check_config,
    emit_wgmma,
    pipelined,
    table_mode,
    table_slots,
    wgmma_input_order,
    word_prefetch,
)
from qtip_triton.kernels import hadamard  # imported at collection, under TRITON_INTERPRET=1: its kernels interpret

SPEC = TrellisSpec(16, 2, 2, "hyb", 9)


def _join(names: list, leaf):
    """Evaluate the generator's join tree (codegen.wgmma._join_tree_gl) with torch.stack as gl.join."""
    if len(names) == 1:
        return leaf(names[0])
    return torch.stack([_join(names[0::2], leaf), _join(names[1::2], leaf)], dim=-1)


def _emulate(W: torch.Tensor, h: torch.Tensor, E: int, nw: int, strided: bool = False) -> torch.Tensor:
    """Ŵ h computed the way the kernel does: per program and k step, each element's packed states (class c,
    class pair P) read from Ŵ, arranged into A as the generated source does, times h's wgmma-order slice
    (``strided``: the lane-strided kernel's reshape, a_tile_lines)."""
    plan = make_plan(SPEC, "qtip")
    m, n = W.shape
    RB, CB, BK = 8 * nw, 4 * E, 64 * E
    order = wgmma_input_order(plan, n, E, strided)
    hw = torch.empty_like(h)
    hw[:, order] = h
    cconst = [v.cconst for v in plan.classes[0]]
    # which state holds (class c, pair P): the same lookup the generator makes
    vals = [[f"_f16_lo(s{s}_p)", f"_f16_hi(s{s}_p)"] for s in range(plan.S)]
    pairs = packed_pairs(plan, vals, what="wgmma")
    state_of = {pairs[c][P]: (c, P) for c in range(2) for P in range(8)}
    names = [pairs[c][q + 4 * hh] for c in range(2) for q in range(4) for hh in range(2)]
    y = torch.zeros(h.shape[0], m, dtype=torch.float64)
    rows = torch.arange(RB)
    for pr in range(m // (2 * RB)):
        wrow = pr * RB + rows  # word rows of this program
        orow0 = (wrow // 8) * 16 + wrow % 8  # class 0 output row (class 1: + 8)
        for step in range(n // BK):
            cols = step * CB + torch.arange(CB)  # word columns

            def leaf(name, half, orow0=orow0, cols=cols):
                c, P = state_of[name]
                return W[(orow0 + 8 * c)[:, None], (cols * 16)[None, :] + cconst[2 * P + half]]

            # the packed states' tree, then their fp16 halves as the last axis (j), as the source does
            st = torch.stack([_join(names, lambda nm: leaf(nm, 0)), _join(names, lambda nm: leaf(nm, 1))],
                             dim=-1)  # [RB, CB, c, q1, q0, h, j]
            if strided:  # word column 4 e + t: [w, g, e, t, ...]
                a = st.reshape(nw, 8, E, 4, 2, 2, 2, 2, 2).permute(0, 4, 1, 2, 5, 6, 7, 3, 8).reshape(2 * RB, BK)
            else:  # word column t E + e: [w, g, t, e, ...]
                a = st.reshape(nw, 8, 4, E, 2, 2, 2, 2, 2).permute(0, 4, 1, 3, 5, 6, 7, 2, 8).reshape(2 * RB, BK)
            out_rows = pr * 2 * RB + torch.arange(2 * RB)  # A's rows are the program's contiguous output rows
            y[:, out_rows] += hw[:, step * BK:(step + 1) * BK] @ a.t()
    return y


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "lane-strided"])
@pytest.mark.parametrize("E,nw", [(1, 4), (2, 8), (4, 4)])
def test_emulated_a_operand_and_order_give_w_h(E, nw, strided):
    g = torch.Generator().manual_seed(E * 10 + nw)
    m, n = 2 * 8 * nw * 2, 64 * E * 3
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    h = torch.randn(5, n, generator=g, dtype=torch.float64)
    y = _emulate(W, h, E, nw, strided)
    assert torch.allclose(y, h @ W.t(), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("E", [2, 4])
def test_lane_strided_order_keeps_64_column_segments(E, monkeypatch):
    """With strided lanes every 64-column segment of h stays in place (the point of the switch), the orders of the
    two mappings differ (so the kernel and the order must agree: the emulation above checks each pair), and the
    environment switch picks the mapping for the order and the source alike."""
    from qtip_triton.codegen.wgmma import LANE_STRIDE_ENV, lane_strided

    plan = make_plan(SPEC, "qtip")
    n = 64 * E * 3
    i = torch.arange(n)
    strided = wgmma_input_order(plan, n, E, True)
    contiguous = wgmma_input_order(plan, n, E, False)
    assert torch.equal(strided // 64, i // 64)
    assert not torch.equal(contiguous // 64, i // 64) and not torch.equal(strided, contiguous)
    assert torch.equal(wgmma_input_order(plan, 64 * 3, 1, True), wgmma_input_order(plan, 64 * 3, 1, False))
    monkeypatch.setenv(LANE_STRIDE_ENV, "1")
    assert lane_strided(E) and not lane_strided(1)
    assert torch.equal(wgmma_input_order(plan, n, E), strided)
    assert "gl.BlockedLayout([1, 1], [8, 4]" in emit_wgmma(SPEC, {"E": E, "LS": 1})
    monkeypatch.delenv(LANE_STRIDE_ENV)
    assert not lane_strided(E)
    assert torch.equal(wgmma_input_order(plan, n, E), contiguous)
    assert f"gl.BlockedLayout([1, {E}], [8, 4]" in emit_wgmma(SPEC, {"E": E})
    monkeypatch.setenv(LANE_STRIDE_ENV, "yes")
    with pytest.raises(ValueError, match="LANE_STRIDE='yes'"):
        lane_strided(E)


def test_lane_stride_by_default_only_where_it_folds_the_order(gen, monkeypatch):
    """Unset, the switch strides a weight's lanes exactly where that folds its order into B's columns (11008 inputs,
    64-column Hadamard segments, at E 2 and 4; 4096 inputs, 128-column segments, at E 4 only), and the orders, the
    fold and the source follow the weight's choice; 1 and 0 force it everywhere (E > 1) or nowhere."""
    from test_weight import random_qweight

    from qtip_triton import kernels
    from qtip_triton.codegen.wgmma import LANE_STRIDE_ENV
    from qtip_triton.kernels import wgmma

    monkeypatch.delenv(LANE_STRIDE_ENV, raising=False)
    down = kernels.prepare(random_qweight(gen, SPEC, 64, 11008))
    square = kernels.prepare(random_qweight(gen, SPEC, 64, 4096))
    assert [wgmma.strided_for(down, E) for E in (1, 2, 4)] == [False, True, True]
    assert [wgmma.strided_for(square, E) for E in (1, 2, 4)] == [False, False, True]
    for E in (1, 2, 4):
        assert wgmma.input_cols(down, E) is not None and wgmma.input_cols(square, E) is not None
        assert torch.equal(wgmma.input_index(down, E).long(),
                           wgmma_input_order(down.plan, 11008, E, E > 1))
        assert torch.equal(torch.argsort(wgmma.input_gather(down, E)), wgmma.input_index(down, E).long())
    assert wgmma._source_config({"E": 2}, wgmma.strided_for(down, 2))["LS"] == 1
    assert "LS" not in wgmma._source_config({"E": 2}, wgmma.strided_for(square, 2))
    monkeypatch.setenv(LANE_STRIDE_ENV, "0")
    assert not wgmma.strided_for(down, 2) and wgmma.input_cols(down, 2) is None
    monkeypatch.setenv(LANE_STRIDE_ENV, "1")
    assert wgmma.strided_for(square, 2) and not wgmma.strided_for(square, 1)


def test_emulation_catches_a_wrong_order():
    """The check above is not vacuous: a transposed pair of h columns inside one step breaks it."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 64, generator=g, dtype=torch.float64)
    h = torch.randn(2, 64, generator=g, dtype=torch.float64)
    h_swapped = h.clone()
    h_swapped[:, [0, 1]] = h[:, [1, 0]]
    assert not torch.allclose(_emulate(W, h_swapped, 1, 4), h @ W.t())


@pytest.mark.parametrize("E", [1, 2, 4])
def test_input_order_is_a_permutation(E):
    plan = make_plan(SPEC, "qtip")
    pos = wgmma_input_order(plan, 64 * E * 5, E)
    assert torch.equal(pos.sort().values, torch.arange(64 * E * 5))


def test_bad_configs_and_shapes_raise_clear_errors():
    plan = make_plan(SPEC, "qtip")
    with pytest.raises(ValueError, match="divisible by 128"):
        wgmma_input_order(plan, 192, 2)
    for bad, what in [({"E": 3}, "E="), ({"BLOCK_M": 48}, "BLOCK_M="), ({"num_warps": 2}, "num_warps="),
                      ({"STAGES": 1}, "STAGES=")]:
        with pytest.raises(ValueError, match=what):
            check_config(bad)
    with pytest.raises(ValueError, match="table="):
        table_mode({"table": "shared8"})
    with pytest.raises(ValueError, match="WPF="):
        word_prefetch({"WPF": 3})
    with pytest.raises(ValueError, match="WPF=2 needs PIPE=1"):
        word_prefetch({"WPF": 2})
    assert word_prefetch({"WPF": 2, "PIPE": 1}) == 2
    with pytest.raises(ValueError, match="PIPE="):
        pipelined({"PIPE": True})
    with pytest.raises(ValueError, match="QTIP's layout"):
        emit_wgmma(TrellisSpec(16, 2, 1, "1mad"), {})
    with pytest.raises(ValueError, match="ABLATE="):
        ablated({"ABLATE": 3})
    with pytest.raises(ValueError, match="ABLATE="):
        ablated({"ABLATE": True})


@pytest.mark.parametrize("pipe", [0, 1])
def test_ablated_source_multiplies_without_decoding(pipe):
    """ABLATE = 1 (measurement only): the k loop keeps its MMAs and x loads but loses its word loads and table reads,
    and says so in its header; the default source is untouched by the option."""
    cfg = {"E": 1, "PIPE": pipe, "table": "shared32"}
    plain, abl = emit_wgmma(SPEC, cfg), emit_wgmma(SPEC, {**cfg, "ABLATE": 1})
    assert "ABLATED" in abl and "ABLATED" not in plain and emit_wgmma(SPEC, {**cfg, "ABLATE": 0}) == plain
    loop = abl.split("for it in range")[1].split("for i in gl.static_range(STAGES):")[0]
    assert "warpgroup_mma(" in loop and "tma.async_copy_global_to_shared" in loop
    assert "gl.load(W" not in loop and "_lds(" not in loop and "ABLATE: no decode" in loop
    sass = _compiled({"BLOCK_M": 128, "num_warps": 8, "STAGES": 4, **cfg, "ABLATE": 1}, 1024).sass
    assert sass.count("HGMMA.64x128x16.F32") >= 4 * (1 + pipe) and "LDS" not in sass.split("HGMMA")[1]


@pytest.mark.parametrize("pipe", [0, 1])
def test_ablated_2_streams_x_alone(pipe):
    """ABLATE = 2 (measurement only): the k loop keeps x's mbarrier waits and TMA refills and nothing else (no MMA,
    no MMA wait, no word loads); compiled for sm_90 its SASS has no HGMMA and still its TMA loads."""
    cfg = {"E": 1, "PIPE": pipe, "table": "shared32"}
    abl = emit_wgmma(SPEC, {**cfg, "ABLATE": 2})
    assert "only streams x" in abl
    loop = abl.split("for it in range")[1].split("for i in gl.static_range(STAGES):")[0]
    assert "warpgroup_mma(" not in loop and "mbarrier.wait(bars.index(slot)" in loop
    assert "tma.async_copy_global_to_shared" in loop and "gl.load(W" not in loop
    sass = _compiled({"BLOCK_M": 128, "num_warps": 8, "STAGES": 4, **cfg, "ABLATE": 2}, 1024).sass
    assert "HGMMA" not in sass and "UTMALDG" in sass


def test_source_is_readable_gluon():
    src = emit_wgmma(SPEC, {"E": 2})
    compile(src, "<wgmma>", "exec")
    assert "@gluon.jit" in src and "warpgroup_mma(a, x_smem.index(slot)" in src
    assert "assert_trivial=True" in src  # the A placement is proven register-only at compile time


_COMPILE = """
import json, re, sys
from qtip_triton.codegen.nvtools import cuobjdump
from qtip_triton.kernels.wgmma import compile_offline, sass_of
from qtip_triton.spec import TrellisSpec
k = compile_offline(TrellisSpec.parse(sys.argv[1]), json.loads(sys.argv[2]), n=int(sys.argv[3]))
regs = int(re.search(r"\\bREG:(\\d+)", cuobjdump(k.asm["cubin"], "-res-usage")).group(1))
json.dump({"shared": k.metadata.shared, "regs": regs, "ptx": k.asm["ptx"], "sass": sass_of(k.asm["cubin"])},
          sys.stdout)
"""


def _compiled(cfg: dict, n: int, spec: TrellisSpec = SPEC) -> SimpleNamespace:
    """The kernel compiled for sm_90 (no GPU: ptxas ships with Triton): its shared memory, PTX and SASS.

    Why a fresh process without TRITON_INTERPRET: the suite runs Triton's interpreter, and once a process has run
    an interpreted kernel, compiling a Gluon kernel in it fails (``'ir.value' object has no attribute 'dtype'``)
    unless Triton's cache already holds the result, so an in-process compile passed only on a warm cache."""
    import json
    import os
    import subprocess
    import sys

    from qtip_triton.codegen.nvtools import has_cuobjdump

    pytest.importorskip("triton.experimental.gluon")
    if not has_cuobjdump():
        pytest.skip("no cuobjdump with this Triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE, spec.name, json.dumps(cfg), str(n)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return SimpleNamespace(**json.loads(out.stdout))


def test_compiles_for_sm90_with_register_a_and_no_spills():
    """The generated source compiles for the H100 here: register-A HGMMAs, TMA loads of x, no local memory."""
    sass = _compiled({"E": 1, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3}, 1024).sass
    hgmma = [line for line in sass.splitlines() if "HGMMA.64x64x16.F32" in line]
    assert len(hgmma) == 4  # one per 16 columns of the 64-column k step
    assert all("gdesc" in line and ", R" in line.split("HGMMA")[1] for line in hgmma)  # A from registers
    assert "UTMALDG" in sass
    assert "STL" not in sass and "LDL" not in sass


def test_occupancy_model_holds_for_the_compiled_kernels():
    """The tuner's occupancy picks (``occupancy_candidates``) count programs an SM from estimated registers and
    modelled shared memory: the compiled kernels of its 128-token picks must not hold more of either (fewer programs
    an SM than modelled would make a "one-wave" pick a second wave), and the model must not be far above them (it
    would drop good picks)."""
    from qtip_triton.kernels import wgmma_configs as wc

    spec = TrellisSpec.parse("L16K2V2-hyb9")
    picks = wc.occupancy_candidates(spec, 12288, 4096, 128)
    assert {(c["E"], c["STAGES"], c["SPLIT_K"]) for c in picks} == {(1, 2, 2), (2, 2, 1)}
    for cfg in picks:
        k = _compiled(cfg, 4096, spec)
        model = wc.estimated_registers(cfg)
        assert k.regs <= model <= k.regs + 24, (cfg, k.regs, model)
        assert k.shared <= wc.smem_bytes(cfg, wc.table_words(spec)), (cfg, k.shared)


@pytest.mark.parametrize("table,slots", [("shared1", 1), ("shared32", 4)])
def test_shared_table_sits_past_the_ring_at_offset_zero(table, slots):
    """The shared table modes address their table from the start of shared memory, past the x ring: the compiled
    kernel must place the ring at offset 0 (the launcher refuses the config otherwise), with room for the table."""
    from qtip_triton.kernels.wgmma import ring_at_zero

    cfg = {"E": 1, "BLOCK_M": 128, "num_warps": 4, "STAGES": 2, "table": table}
    assert table_slots(cfg, 512) == slots  # 512 words x R copies in 16 KB tiles
    k = _compiled(cfg, 1024)
    ring = (2 + slots) * 128 * 64 * 2
    assert ring_at_zero(k.ptx, ring)
    assert not ring_at_zero(k.ptx, ring + 16)  # the check can fail: no barrier lies that far out
    assert k.shared >= ring


@pytest.mark.parametrize("cfg", [
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4},
    {"E": 2, "BLOCK_M": 16, "num_warps": 4, "STAGES": 3, "table": "shared16"},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "PIPE": 1, "table": "shared32"},
    {"E": 2, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "table": "shared16", "LS": 1},
], ids=["m256-w8", "m16-shared16", "m256-w8-pipe", "m64-lane-strided"])
def test_no_write_to_a_registers_while_their_wgmma_runs(cfg, monkeypatch):
    """The SASS of the main loop never writes an A register of an HGMMA that has not been waited for (the first
    kernel did, 47 times at these configs, and gave NaN on the H100; the checker finds those writes). The
    lane-strided kernel (``LS``: set through its switch, as the launcher does) compiles too, its A placement proven
    register-only (``assert_trivial``), without spills."""
    from qtip_triton.codegen.wgmma import LANE_STRIDE_ENV
    from qtip_triton.kernels.wgmma import a_register_hazards

    if cfg.pop("LS", 0):
        monkeypatch.setenv(LANE_STRIDE_ENV, "1")
    k = _compiled(cfg, 2048)
    sass = k.sass
    assert "STL" not in sass and "LDL" not in sass
    assert "HGMMA" in sass
    assert a_register_hazards(sass) == []


def test_hazard_check_finds_a_write_to_an_in_flight_a_register():
    from qtip_triton.kernels.wgmma import a_register_hazards

    loop = """
        /*0100*/                   WARPGROUP.ARRIVE ;
        /*0110*/                   HGMMA.64x64x16.F32 R24, R60, gdesc[UR12], R24, gsb0 ;
        /*0120*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0130*/                   IMAD.SHL.U32 R61, R20, 0x2, RZ ;
        /*0140*/               @P3 BRA 0x100 ;
    """
    assert a_register_hazards(loop) == ["IMAD.SHL.U32 R61, R20, 0x2, RZ"] * 2
    assert a_register_hazards(loop.replace("0x1 ;", "0x0 ;")) == []


def test_pipelined_config_needs_an_even_step_count():
    """PIPE = 1 runs its loop two steps at a time: an odd count per program is refused before any launch."""
    from types import SimpleNamespace

    from qtip_triton.kernels.wgmma import steps

    pw = SimpleNamespace(words=torch.zeros(2, 8, 88), in_features=16 * 88)  # 22 steps of 4 columns
    assert steps(pw, {"E": 1, "SPLIT_K": 2, "PIPE": 0}) == (11, 2)
    with pytest.raises(ValueError, match="even number of k steps"):
        steps(pw, {"E": 1, "SPLIT_K": 2, "PIPE": 1})
    assert steps(pw, {"E": 1, "SPLIT_K": 1, "PIPE": 1}) == (22, 1)


def test_codegen_cli_prints_the_wgmma_source(capsys):
    from qtip_triton.cli import main

    assert main(["codegen", "--spec", "L16K2V2-hyb9", "--kind", "wgmma", "--config", '{"E": 2, "PIPE": 1}']) == 0
    out = capsys.readouterr().out
    assert "@gluon.jit" in out and "pipeline 1" in out and "a1 = gl.zeros" in out
    assert main(["codegen", "--spec", "L16K2V2-hyb9", "--kind", "wgmma", "--config", '{"E": 3}']) == 2


SHAPES = [(4096, 4096), (4096, 11008), (28672, 8192), (1024, 2048)]


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("M", [1, 16, 100, 256, 2048])
def test_space_and_default_launch_on_the_shape(m, n, M):
    """Every config of the kind's space (and its default) passes the launcher's own checks for this shape and fits
    shared memory: the tuner never times, and the registry never serves, a config the launcher would refuse."""
    from types import SimpleNamespace

    from qtip_triton.kernels import wgmma_configs
    from qtip_triton.kernels.wgmma import steps

    pw = SimpleNamespace(words=torch.zeros(1, m // 16, n // 16), in_features=n)
    space = wgmma_configs.config_space(SPEC, m, n, M)
    assert space and wgmma_configs.default_config(SPEC, m, n, M) in space
    top = min(256, max(16, 1 << (M - 1).bit_length()))
    for cfg in space:
        check_config(cfg)
        assert cfg["BLOCK_M"] in (top, max(16, top // 2))
        assert wgmma_configs.smem_bytes(cfg, 512) <= wgmma_configs.SMEM_LIMIT
        per, _ = steps(pw, cfg)
        assert per >= 2
    assert {c["PIPE"] for c in space} == {0, 1} and {c["table"] for c in space} == {"gather", "shared16", "shared32"}


def test_smem_estimate_bounds_the_compiled_kernel():
    """The space's shared memory bound is an upper bound of what the compiled kernel allocates (its largest
    configs compiled for sm_90 here)."""
    from qtip_triton.kernels import wgmma_configs

    space = wgmma_configs.config_space(SPEC, 8192, 8192, 256)
    for table in ("gather", "shared32"):
        cfg = max((c for c in space if c["table"] == table), key=lambda c: wgmma_configs.smem_bytes(c, 512))
        k = _compiled(cfg, 8192)
        assert k.shared <= wgmma_configs.smem_bytes(cfg, 512) <= wgmma_configs.SMEM_LIMIT, cfg


def test_heuristic_switch(monkeypatch):
    """QTIP_TRITON_WGMMA: 1 or unset lets the heuristic take the kind (on Hopper only), 0 keeps it out; anything else
    is a clear error, not a silent default."""
    from qtip_triton.kernels import wgmma_configs

    monkeypatch.delenv("QTIP_TRITON_WGMMA", raising=False)
    assert wgmma_configs.heuristic_on()
    monkeypatch.setenv("QTIP_TRITON_WGMMA", "0")
    assert not wgmma_configs.heuristic_on()
    monkeypatch.setenv("QTIP_TRITON_WGMMA", "1")
    assert wgmma_configs.heuristic_on()
    from qtip_triton import kernels

    assert kernels.default_kind(SPEC, 1024, 2048, 256) == "decompress"  # on, but no Hopper here
    monkeypatch.setenv("QTIP_TRITON_WGMMA", "yes")
    with pytest.raises(ValueError, match="QTIP_TRITON_WGMMA"):
        wgmma_configs.heuristic_on()


def test_kind_off_hopper_says_why(gen):
    """Here (CPU, Triton's interpreter) the kind is listed but cannot run: the heuristic never picks it, its space is
    empty, and asking for it by name is a clear error."""
    from test_weight import random_qweight

    from qtip_triton import kernels
    from qtip_triton.dispatch import linear

    ok, why = kernels.can_implement("wgmma", SPEC, 1024, 2048, 256)
    assert not ok and "Hopper" in why
    assert kernels.default_kind(SPEC, 1024, 2048, 256) == "decompress"
    assert kernels.config_space("wgmma", SPEC, 1024, 2048, 256) == []
    assert kernels.can_implement("wgmma", TrellisSpec.parse("L16K2V1-1mad"), 1024, 2048, 256)[1].startswith(
        "wgmma needs QTIP's layout")
    assert "64-row" in kernels.wgmma_configs.can_implement(SPEC, 1000, 2048, 256)[1]
    qw = random_qweight(gen, SPEC, 64, 128)
    x = torch.randn(4, 128).half()
    with pytest.raises(RuntimeError, match="Hopper"):
        linear(x, qw, kind="wgmma", config={"E": 1, "BLOCK_M": 16})


def test_kind_under_the_interpreter_says_why_even_on_hopper(gen, monkeypatch):
    """TRITON_INTERPRET=1 on a Hopper machine: Gluon has no interpreter, so asking for the kind is a clear error
    naming the variable, not a failure inside Gluon."""
    from test_weight import random_qweight

    from qtip_triton import kernels
    from qtip_triton.kernels import wgmma

    monkeypatch.setattr(wgmma, "available", lambda device=None: True)
    monkeypatch.setattr(kernels, "interpreting", lambda: True)
    pw = kernels.prepare(random_qweight(gen, SPEC, 64, 128))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is set"):
        kernels.kernel_input("wgmma", pw, torch.randn(4, 128).half(), {"E": 1, "BLOCK_M": 16})


@pytest.mark.parametrize("E", [1, 2])
def test_natural_transform_then_gather_gives_the_kernels_h(gen, E):
    """The kind's input the two ways (Triton's interpreter): transformed in natural order and gathered into the
    kernel's order, or stored there by the transform. Same transform kernel at these sizes, so bit for bit."""
    from test_weight import random_qweight

    from qtip_triton import kernels
    from qtip_triton.kernels import wgmma

    pw = kernels.prepare(random_qweight(gen, SPEC, 64, 256))
    x = torch.randn(5, 256, generator=gen).half()
    direct = hadamard.transform(x, pw.blocks_in, transpose=True, pre=pw.SU, out_dtype=torch.float16,
                                dst=wgmma.input_index(pw, E), interpret=True)
    natural = hadamard.transform(x, pw.blocks_in, transpose=True, pre=pw.SU, out_dtype=torch.float16, interpret=True)
    gathered = natural.index_select(1, wgmma.input_gather(pw, E))
    assert torch.equal(gathered, direct) and not torch.equal(natural, direct)
    assert torch.equal(gathered, wgmma.to_wgmma_order(pw, natural, E))


def test_gather_only_where_the_natural_transform_is_the_stacked_kernel(monkeypatch):
    """The rule follows the transforms' own launch choice: from the stacked kernel's 96 natural-order rows (it
    is never taken with a destination order below 1024 rows), and not at all with the stacked kernel off."""
    from qtip_triton import kernels

    monkeypatch.delenv(hadamard.STACK_ENV, raising=False)
    picks = {T: kernels.gather_after_transform(8192, 1, T) for T in (1, 64, 95, 96, 256, 512, 1024)}
    assert picks == {1: False, 64: False, 95: False, 96: True, 256: True, 512: True, 1024: False}, picks
    assert all(hadamard.launch_key(8192, 1, T, transpose=True)[0] == "stacked" for T in (96, 256, 512))
    monkeypatch.setenv(hadamard.STACK_ENV, "0")
    assert not any(kernels.gather_after_transform(8192, 1, T) for T in (128, 256, 512))
    assert "wgmma" in kernels.KINDS and (8192, 1, 1, True, False) in kernels._transforms("wgmma", 8192, 8192, 1, 1)


def test_grouped_shards_count_their_rows_together(monkeypatch):
    """A grouped input of G shards asks the natural-order launch about G x rows: three 4096-column shards gather
    from 32 tokens (3 x 32 >= 96), two from 48, one from 96; the switch counts the same rows; bad groups fail."""
    from qtip_triton import kernels

    monkeypatch.delenv(hadamard.STACK_ENV, raising=False)
    monkeypatch.delenv(kernels.WGMMA_GATHER_ENV, raising=False)
    first = {G: min(T for T in range(1, 300) if kernels.gather_after_transform(4096, 1, T, G)) for G in (1, 2, 3)}
    assert first == {1: 96, 2: 48, 3: 32}, first
    monkeypatch.setenv(kernels.WGMMA_GATHER_ENV, "96")
    assert kernels.gather_after_transform(4096, 1, 32, 3) and not kernels.gather_after_transform(4096, 1, 31, 3)
    with pytest.raises(ValueError, match="groups"):
        kernels.gather_after_transform(4096, 1, 64, 0)


def test_gather_switch_sets_the_rows_and_never_replaces_a_stacked_ordered_transform(monkeypatch):
    """QTIP_TRITON_WGMMA_GATHER_FROM=N gathers from N (token, block) rows on, 0 never; where the ordered transform
    is the stacked kernel itself (1024+ rows) it still writes the order directly; a bad value is a clear error."""
    from qtip_triton import kernels

    monkeypatch.delenv(hadamard.STACK_ENV, raising=False)
    monkeypatch.setenv(kernels.WGMMA_GATHER_ENV, "32")
    picks = {T: kernels.gather_after_transform(8192, 1, T) for T in (1, 31, 32, 64, 128, 1024)}
    assert picks == {1: False, 31: False, 32: True, 64: True, 128: True, 1024: False}, picks
    assert kernels.gather_after_transform(4096, 2, 16)  # rows count (token, block) pairs
    monkeypatch.setenv(kernels.WGMMA_GATHER_ENV, "0")
    assert not any(kernels.gather_after_transform(8192, 1, T) for T in (1, 64, 128, 256))
    monkeypatch.setenv(kernels.WGMMA_GATHER_ENV, "soon")
    with pytest.raises(ValueError, match=kernels.WGMMA_GATHER_ENV):
        kernels.gather_after_transform(8192, 1, 64)


def test_default_up_to_64_tokens_is_the_session24_winner():
    """Up to 64 tokens the default is the config that won the H100 probe at 16 tokens (one warpgroup, E 2, 3 stages,
    16 table copies, 4 splits), falling back to fewer splits or E 1 where the layer has too few k steps."""
    from qtip_triton.kernels import wgmma_configs

    want = {"E": 2, "BLOCK_M": 16, "num_warps": 4, "STAGES": 3, "SPLIT_K": 4, "table": "shared16", "PIPE": 0}
    got = wgmma_configs.default_config(SPEC, 8192, 8192, 16)
    assert {k: got[k] for k in want} == want
    small = wgmma_configs.default_config(SPEC, 1024, 256, 64)  # 256 inputs: 2 steps of E 2, too few for 4 splits
    assert small["BLOCK_M"] == 64 and small["num_warps"] == 4 and small["SPLIT_K"] * small["E"] <= 2


def test_out16_stores_one_fp16_partial():
    """OUT16 = 1 (opt-in): the epilogue stores the accumulators as fp16, only with one split; compiled for sm_90 the
    kernel takes an fp16 Y; the default source is untouched by the option."""
    from qtip_triton.codegen.wgmma import out16

    cfg = {"E": 1, "PIPE": 1, "table": "shared32"}
    plain, half = emit_wgmma(SPEC, cfg), emit_wgmma(SPEC, {**cfg, "OUT16": 1})
    assert "acc.to(gl.float16), mask=mask)" in half and "acc.to(gl.float16)" not in plain
    assert emit_wgmma(SPEC, {**cfg, "OUT16": 0}) == plain
    with pytest.raises(ValueError, match="OUT16=1 needs SPLIT_K=1"):
        out16({"OUT16": 1, "SPLIT_K": 2})
    with pytest.raises(ValueError, match="OUT16="):
        out16({"OUT16": True})
    sass = _compiled({"BLOCK_M": 128, "num_warps": 8, "STAGES": 4, "SPLIT_K": 1, **cfg, "OUT16": 1}, 1024).sass
    assert "HGMMA.64x128x16.F32" in sass and ("F2F.F16.F32" in sass or "F2FP.F16.F32.PACK_AB" in sass)


def test_words_two_steps_ahead_alternate_their_registers():
    """WPF = 2 (PIPE = 1): each half loads the words of two steps ahead into the registers of its parity and decodes
    from the other parity's, which the half before loaded (step 1's words before the loop)."""
    src = emit_wgmma(SPEC, {"E": 1, "PIPE": 1, "WPF": 2, "table": "shared32"})
    loop = src.split("for it in range")[1]
    halves = loop.split("# step it + 1 on a1")
    assert "w0_ahead1 = gl.load(W + w_off + CB, mask=1 < ITERS" in src.split("for it in range")[0]
    assert "w0_ahead0 = gl.load(W + w_off + (0 + 2) * CB, mask=it + 0 + 2 < ITERS" in halves[0]
    assert "w0 = w0_ahead1.to(gl.uint32" in halves[0] and "w0 = w0_ahead0.to(gl.uint32" in halves[1]
    assert "w0_ahead1 = gl.load(W + w_off + (1 + 2) * CB, mask=it + 1 + 2 < ITERS" in halves[1]
    assert "_n = gl.load" not in src
    assert "w0_n = gl.load" in emit_wgmma(SPEC, {"E": 1, "PIPE": 1, "WPF": 1, "table": "shared32"})


def test_words_two_steps_ahead_from_k3():
    """From K = 3 the space gives each PIPE 1 config a WPF = 2 twin and the default of 128+ tokens takes it (measured
    7-9 % faster at K = 4); at K = 2 (measured slightly slower) the space and default keep WPF = 1; WPF = 2 never
    appears without PIPE = 1 (the codegen refuses it)."""
    from qtip_triton.codegen.wgmma import word_prefetch
    from qtip_triton.kernels import wgmma_configs

    k4 = TrellisSpec(16, 4, 2, "hyb", 9)
    space2 = wgmma_configs.config_space(SPEC, 8192, 8192, 256)
    space4 = wgmma_configs.config_space(k4, 8192, 8192, 256)
    assert {c["WPF"] for c in space2} == {1}
    assert {c["WPF"] for c in space4} == {1, 2}
    for cfg in space4:
        word_prefetch(cfg)
    twins = {tuple(sorted({**c, "WPF": 2}.items())) for c in space4 if c["PIPE"] == 1}
    assert twins <= {tuple(sorted(c.items())) for c in space4}
    assert wgmma_configs.default_config(SPEC, 8192, 8192, 256)["WPF"] == 1
    d4 = wgmma_configs.default_config(k4, 8192, 8192, 256)
    assert d4["WPF"] == (2 if d4["PIPE"] == 1 else 1) and d4 in space4
    assert wgmma_configs.default_config(k4, 8192, 8192, 16)["WPF"] == 1


WS_CONFIGS = [
    {"E": 1, "BLOCK_M": 512, "num_warps": 8, "STAGES": 2, "WS": 1, "table": "shared16"},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 3, "WS": 1, "table": "gather", "SPLIT_K": 2},
    {"E": 2, "BLOCK_M": 128, "num_warps": 8, "STAGES": 2, "WS": 1, "table": "shared32", "WPF": 0},
]


def test_ws_config_checks():
    """WS = 1 (the warp-specialized shared-A form) takes 8 warps, BLOCK_M 64-512, neither PIPE nor ABLATE; 512 tokens
    only with it; anything else is a clear error before any compile."""
    from qtip_triton.codegen.wgmma import warp_specialized

    base = {"E": 1, "BLOCK_M": 512, "num_warps": 8, "STAGES": 2, "WS": 1}
    assert check_config(base) == (1, 512, 8, 2) and warp_specialized(base) == 1
    assert check_config({**base, "WS": True}) == (1, 512, 8, 2) and warp_specialized({**base, "WS": True}) == 1
    for bad, why in (({**base, "num_warps": 4}, "num_warps=8"), ({**base, "BLOCK_M": 32}, "BLOCK_M >= 64"),
                     ({**base, "WS": 0}, "512 with WS=1"), ({**base, "WS": 2}, "WS=2"), ({**base, "WS": "1"}, "WS='1'"),
                     ({**base, "PIPE": 1}, "neither PIPE"), ({**base, "ABLATE": 1}, "neither PIPE")):
        with pytest.raises(ValueError, match=why):
            check_config(bad)
            warp_specialized(bad)


@pytest.mark.parametrize("cfg", WS_CONFIGS, ids=lambda c: f"{c['BLOCK_M']}tok-{c['table']}-E{c['E']}")
def test_ws_source_and_sm90_compile(cfg):
    """The warp-specialized form: a decode partition of 4 warps storing A tiles into a shared ring, the kernel's 8
    warps multiplying them with two warpgroups along the tokens; compiled for sm_90 (12 warps, within the launch's
    register cap, no spills), in the shared memory its estimate bounds, x ring at offset 0 where a shared table needs
    it, and the same A order as the register-A kernel's (the same h order)."""
    from qtip_triton.codegen.wgmma_ws import WS_DECODE_WARPS

    src = emit_wgmma(SPEC, {k: v for k, v in cfg.items() if k in ("E", "WS", "WPF", "table")})
    assert "gl.warp_specialize([" in src and "def _decode_part(" in src and "def _mma_part(" in src
    assert "a_smem.index(a_s).store(a)" in src and "fence_async_shared()" in src
    assert f"gl.BlockedLayout([1, {cfg['E']}], [8, 4], [{WS_DECODE_WARPS}, 1], [1, 0])" in src
    assert "warps_per_cta=[4, 2]" in src and "instr_shape=[16, BLOCK_M // 2, 16]" in src
    plain = emit_wgmma(SPEC, {"E": cfg["E"], "table": cfg["table"]})
    assert "warp_specialize" not in plain
    import re

    from qtip_triton.kernels import wgmma_configs
    from qtip_triton.kernels.wgmma import ring_at_zero

    k = _compiled(cfg, 8192)
    assert ".reqntid 384" in k.ptx  # 8 MMA warps + 4 decode warps
    assert k.shared <= wgmma_configs.smem_bytes(cfg, 512) <= wgmma_configs.SMEM_LIMIT
    sass = k.sass
    assert not re.search(r"\b(STL|LDL)\b", sass), "the warp-specialized kernel spills"
    assert "HGMMA" in sass
    if cfg["table"] != "gather":
        from qtip_triton.codegen.wgmma import table_slots

        ring = (cfg["STAGES"] + table_slots(cfg, 512)) * cfg["BLOCK_M"] * 64 * cfg["E"] * 2
        assert ring_at_zero(k.ptx, ring)


def test_ws_space_follows_its_switch(monkeypatch):
    """QTIP_TRITON_WGMMA_WS: off (the default) the space has no WS config; on, it lists the form from 256 tokens
    (512 tokens a program from the 512 bucket up), every config passing the launcher's checks and fitting shared memory,
    with WS the boolean True (its own family for the tuner); anything but 0/1 is a clear error."""
    from qtip_triton.autotune.space import _families
    from qtip_triton.kernels import wgmma_configs

    monkeypatch.delenv("QTIP_TRITON_WGMMA_WS", raising=False)
    assert not any(c.get("WS") for c in wgmma_configs.config_space(SPEC, 8192, 8192, 512))
    monkeypatch.setenv("QTIP_TRITON_WGMMA_WS", "1")
    assert wgmma_configs.ws_space(SPEC, 8192, 8192, 128) == []
    at256 = wgmma_configs.ws_space(SPEC, 8192, 8192, 256)
    at512 = wgmma_configs.ws_space(SPEC, 8192, 8192, 512)
    assert {c["BLOCK_M"] for c in at256} == {256} and {c["BLOCK_M"] for c in at512} == {512}
    assert len(at512) >= 12 and {c["table"] for c in at512} == {"gather", "shared16", "shared32"}
    for cfg in at512:
        assert cfg["WS"] is True and check_config(cfg)[1] == cfg["BLOCK_M"]
        assert wgmma_configs.smem_bytes(cfg, 512) <= wgmma_configs.SMEM_LIMIT
    space = wgmma_configs.config_space(SPEC, 8192, 8192, 512)
    default = wgmma_configs.default_config(SPEC, 8192, 8192, 512)
    families = _families(space, default)
    assert any(all(c.get("WS") for c in members) and members for _, members in families[1:])
    monkeypatch.setenv("QTIP_TRITON_WGMMA_WS", "yes")
    with pytest.raises(ValueError, match="QTIP_TRITON_WGMMA_WS"):
        wgmma_configs.ws_on()


def test_stacked_shards_source_reads_each_shards_h_and_table():
    """SHARDS = 1 (set by the launcher for a fused weight) adds the shard bounds and strides, finds the program's
    shard from its word rows and starts every x load at that shard's rows; without it the source is unchanged."""
    cfg = {"E": 2, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "SPLIT_K": 4, "table": "shared16"}
    plain, stacked = emit_wgmma(SPEC, cfg), emit_wgmma(SPEC, {**cfg, "SHARDS": 1})
    compile(stacked, "<wgmma>", "exec")
    assert "xrow" not in plain and "B1" not in plain
    assert "B1, B2, stride_xg, stride_tg," in stacked and "TBL = TBL + shard * stride_tg" in stacked
    assert "x_desc, [pid_m * BLOCK_M, " not in stacked and stacked.count("x_desc, [xrow, ") == 2
    pipe = emit_wgmma(SPEC, {**cfg, "PIPE": 1, "SHARDS": 1})
    assert "x_desc, [pid_m * BLOCK_M, " not in pipe and pipe.count("x_desc, [xrow, ") >= 2
    with pytest.raises(ValueError, match="WS=1"):
        emit_wgmma(SPEC, {"E": 1, "BLOCK_M": 512, "num_warps": 8, "STAGES": 2, "WS": 1, "SHARDS": 1})
    with pytest.raises(ValueError, match="SHARDS"):
        emit_wgmma(SPEC, {**cfg, "SHARDS": 2})


@pytest.mark.parametrize("cfg", [
    {"E": 2, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "SPLIT_K": 4, "table": "shared16"},
    {"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "PIPE": 1, "table": "shared32"},
], ids=["m64-shared16", "m256-w8-pipe"])
def test_stacked_shards_compile_for_sm90_without_spills_or_hazards(cfg):
    """The SHARDS source compiles for the H100 here like the plain one: register-A HGMMAs, TMA loads, no local
    memory, and no write to an A register of an HGMMA in flight."""
    from qtip_triton.kernels.wgmma import a_register_hazards

    sass = _compiled({**cfg, "SHARDS": 1}, 2048).sass
    assert "HGMMA" in sass and "UTMALDG" in sass
    assert "STL" not in sass and "LDL" not in sass
    assert a_register_hazards(sass) == []
