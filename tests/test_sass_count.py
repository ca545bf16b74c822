"""bench/sass_count.py compiles generated kernels for sm_90 on this (GPU-less) machine: the computed codes'
byte sums become one dp4a each, and 1MAD's division leaves no slow path (instruction counts, not timings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tests.bench_scripts import load_script

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "cuobjdump").exists(), reason="the Triton wheel has no NVIDIA tools")
CFG = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4}
SCRIPT = Path(__file__).parents[1] / "bench" / "sass_count.py"


def compiled(*names: str, extra: tuple[str, ...] = (), config: dict | None = None, kind: str = "gemv") -> list[dict]:
    """The script's JSON, run in a process without TRITON_INTERPRET (the suite runs interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [a for name in names for a in ("--spec", name)]
    out = subprocess.run([sys.executable, str(SCRIPT), *args, "--kind", kind, "--config", json.dumps(config or CFG),
                          "--shape", "1024x1024", "--json", *extra], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_byte_sum_codes_compile_to_dp4a():
    for r in compiled("L16K2V1-1mad", "L16K2V1-mul1"):
        ops = r["opcodes"]
        assert ops.get("IDP", 0) == r["states_per_thread_iter"], r  # one dp4a per state
        assert "FCHK" not in ops and "BSSY" not in ops, r  # no division slow path
        assert r["per_state"] < 14 and r["stack"] == 0, r


def test_pdl_adds_one_wait_and_one_trigger_outside_the_loop():
    """With PDL the kernel waits once (ACQBULK), and in mode ``early`` releases its dependents once
    (PREEXIT), not per k step: the decode costs the same instructions; off, neither is compiled in."""
    plain, = compiled("L16K2V2-hyb9")
    exit_, = compiled("L16K2V2-hyb9", extra=("--pdl", "exit"))
    early, = compiled("L16K2V2-hyb9", extra=("--pdl", "early"))
    assert plain["pdl_ops"] == {"ACQBULK": 0, "PREEXIT": 0}, plain
    assert exit_["pdl_ops"] == {"ACQBULK": 1, "PREEXIT": 0}, exit_
    assert early["pdl_ops"] == {"ACQBULK": 1, "PREEXIT": 1}, early
    for r in (exit_, early):
        assert abs(r["loop_instructions"] - plain["loop_instructions"]) <= 4, (plain, r)


def test_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        load_script("sass_count").count("L16K2V1-mul1", "gemv", CFG, 1024, 1024, 1)


def test_loop_body_finds_the_backward_branch():
    sass_count = load_script("sass_count")
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IMAD R2, R2, R3, RZ ;
        /*0020*/              @!P0 LOP3.LUT R4, R2, 0xff, RZ, 0xc0, !PT ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
"""
    assert sass_count.loop_body(listing) == ["IMAD", "LOP3", "BRA"]


def test_loop_body_reads_cuobjdump_addresses():
    """cuobjdump -sass prints branch targets as addresses, not labels: the largest loop is still found
    (a listing without any loop would otherwise count the whole kernel, prologue and epilogue included)."""
    sass_count = load_script("sass_count")
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R2, R3, RZ ;
        /*0020*/                   LDS R4, [R2+UR4] ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   FADD R5, R5, R4 ;
        /*0050*/               @P1 BRA 0x40 ;
        /*0060*/                   EXIT ;
"""
    assert sass_count.loop_body(listing) == ["IMAD", "LDS", "BRA"]


def test_loop_body_skips_a_span_with_an_exit():
    """A wait's retry stub after the kernel's end jumps back into the loop (the wgmma kernel's mbarrier waits): that
    span is larger than the loop but holds the EXIT, so the loop is taken, not the loop plus the epilogue."""
    sass_count = load_script("sass_count")
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R2, R3, RZ ;
        /*0020*/                   LDS R4, [R2+UR4] ;
        /*0030*/              @!P0 BRA 0x80 ;
        /*0040*/               @P1 BRA 0x10 ;
        /*0050*/                   STG.E [R2], R4 ;
        /*0060*/                   STG.E [R2+0x4], R4 ;
        /*0070*/                   EXIT ;
        /*0080*/              @!P0 BRA 0x80 ;
        /*0090*/                   BRA 0x40 ;
"""
    assert sass_count.loop_body(listing) == ["IMAD", "LDS", "BRA", "BRA"]


@pytest.mark.parametrize("pipe", [0, 1])
def test_wgmma_loop_counts_its_hgmmas_and_states(pipe):
    """The Gluon wgmma kernel (needs Gluon): its k loop holds 4 E register-A HGMMAs and 16 E table reads per step
    (two steps with PIPE = 1), and no epilogue store."""
    pytest.importorskip("triton.experimental.gluon")
    cfg = {"E": 1, "BLOCK_M": 128, "num_warps": 8, "STAGES": 4, "SPLIT_K": 1, "table": "shared32", "PIPE": pipe}
    r, = compiled("L16K2V2-hyb9", config=cfg, kind="wgmma")
    ops, steps = r["opcodes"], 1 + pipe
    assert r["states_per_thread_iter"] == 16 * steps, r
    assert ops.get("HGMMA") == 4 * steps and ops.get("LDS") == 16 * steps and "STG" not in ops, r
    assert 6 < r["per_state"] < 20 and r["stack"] == 0, r


def test_ws_decode_loop_is_the_partitions_own():
    """The warp-specialized form (WS = 1): the count is of its decode partition's k loop (16 table reads, the A tile
    stored by stmatrix, no MMA), not of the loop that dispatches the partition (the kernel's largest); and
    decode_partition_loop refuses a kernel without one."""
    pytest.importorskip("triton.experimental.gluon")
    cfg = {"E": 1, "BLOCK_M": 512, "num_warps": 8, "STAGES": 2, "SPLIT_K": 1, "table": "shared16", "WS": 1}
    r, = compiled("L16K2V2-hyb9", config=cfg, kind="wgmma")
    ops = r["opcodes"]
    assert r["states_per_thread_iter"] == 16 and ops.get("LDS") == 16 and ops.get("STSM", 0) >= 1, r
    assert "HGMMA" not in ops and r["stack"] == 0 and 5 < r["per_state"] < 15, r
    sass_count = load_script("sass_count")
    with pytest.raises(ValueError, match="no decode loop"):
        sass_count.decode_partition_loop("        /*0000*/                   LDS R1, [R2] ;\n"
                                         "        /*0010*/                   BRA 0x0 ;\n")


def test_mma_gemv_compiles_to_hmma_in_the_layout_it_needs():
    """The mma gemv (codegen/mma.py) for sm_90: one HMMA per four states, no shared-memory staging beyond the
    code table, fewer instructions per state than the CUDA-core gemv; Triton lays the word tile out as
    lane (g, t) = rows 8i + g, columns 4t..4t+3 (tests/test_mma_gemv.py checks that the layout check refuses
    other placements)."""
    good = {"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 4, "table": "shared", "mma": True}
    r, = compiled("L16K2V2-hyb9", config=good)
    assert r["mma_layout"] == [True, ""], r
    assert r["opcodes"].get("HMMA", 0) * 4 == r["states_per_thread_iter"], r
    assert r["per_state"] < 12 and r["stack"] == 0 and r["shared_bytes"] <= 4096, r
    capped, = compiled("L16K2V2-hyb9", config={**good, "BLOCK_M": 16, "maxnreg": 104})  # 125 uncapped
    assert capped["reg"] <= 104 and capped["stack"] == 0, capped
    # two row groups per warp share x (codegen/mma.py): Triton writes their layout as a linear one, which the
    # check accepts; x is loaded once per warp, so the k loop issues about half the global loads per state
    for bm in (8, 16):
        one, = compiled("L16K2V2-hyb9", config={**good, "BLOCK_M": bm})
        two, = compiled("L16K2V2-hyb9", config={**good, "BLOCK_M": bm, "BLOCK_N": 128})
        assert two["mma_layout"] == [True, ""] and two["stack"] == 0, two
        assert two["opcodes"]["HMMA"] * 4 == two["states_per_thread_iter"] * bm // 8, two  # per 8 batch rows
        ldg = [r["opcodes"]["LDG"] / r["states_per_thread_iter"] for r in (one, two)]
        assert ldg[1] < 0.7 * ldg[0] and two["per_state"] < one["per_state"], (bm, ldg, one, two)


def test_prefill_gemm_tiles_fit_without_spills():
    """The gemm's 8-warp prefill tiles (128 x 256 and 256 x 128 accumulators, configs.config_space) compile
    for sm_90 within the register file and Hopper's 227 KB of shared memory per block, with no local-memory spills."""
    for bm, bn in ((128, 256), (256, 128)):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 8}
        r, = compiled("L16K2V2-hyb9", config=cfg, kind="gemm")
        assert r["stack"] == 0 and r["local"] == 0 and r["reg"] <= 255 and r["shared_bytes"] <= 227 * 1024, r


def test_hfma_gemv_multiplies_two_weights_per_instruction():
    """The fp16x2 variant: one HFMA2 per decoded state in the k loop, no fp32 FMAs there, and fewer
    instructions per state than the fp32 gemv with the same tile."""
    cfg = {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 4, "table": "shared"}
    fp32, = compiled("L16K2V2-hyb9", config=cfg)
    half, = compiled("L16K2V2-hyb9", config={**cfg, "hfma": True})
    assert half["opcodes"].get("HFMA2") == half["states_per_thread_iter"], half
    assert "FFMA" not in half["opcodes"] and fp32["opcodes"].get("FFMA", 0) > 0
    assert half["per_state"] < fp32["per_state"] - 1.5, (half["per_state"], fp32["per_state"])
