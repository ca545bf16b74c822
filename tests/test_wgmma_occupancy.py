"""Programs an SM and waves of a wgmma launch (pure arithmetic on the compiled kernel's registers and shared memory;
the GPU test checks ``last_launch`` against a real launch)."""

from __future__ import annotations

import pytest

from qtip_triton.kernels import wgmma


@pytest.mark.parametrize("regs,shared,warps,per_sm", [
    (104, 57368, 4, 3),   # 32 tokens, 3 stages, shared16 (sm_90 compile, session 31): shared memory allows 3
    (124, 81944, 4, 2),   # 64 tokens, 3 stages: 82 KB, 2 an SM
    (124, 65552, 4, 3),   # 64 tokens, 2 stages: 66 KB, 3 again
    (168, 1024, 8, 1),    # registers bind: 168 x 32 = 5376 a warp, x 8 warps = 43008 of 65536
    (32, 0, 1, 32),       # the program slots bind
    (32, 0, 4, 16),       # the warp slots bind (64 warps)
])
def test_programs_per_sm(regs, shared, warps, per_sm):
    assert wgmma.programs_per_sm(regs, shared, warps) == per_sm


def test_registers_are_allocated_per_warp_in_units_of_256():
    # 64 registers: 2048 a warp, 8 programs of 4 warps; 65: 2080 rounded up to 2304, 7; 72 (2304 exactly): 7;
    # 80 (2560): 6
    assert [wgmma.programs_per_sm(r, 0, 4) for r in (64, 65, 72, 80)] == [8, 7, 7, 6]


def test_waves_of_a_grid():
    stats = wgmma.LaunchStats(124, 81944, 4, (192, 2, 1))  # q/k/v's fused decode at 64 tokens
    assert stats.programs == 384 and stats.per_sm() == 2
    assert stats.waves(132) == pytest.approx(384 / 264)
    assert wgmma.LaunchStats(104, 57368, 4, (192, 2, 1)).waves(132) == pytest.approx(384 / 396)


def test_bad_counts_are_errors():
    with pytest.raises(ValueError, match="registers >= 1"):
        wgmma.programs_per_sm(0, 100, 4)
    with pytest.raises(ValueError, match="warps >= 1"):
        wgmma.programs_per_sm(32, 100, 0)


def test_no_launch_no_stats():
    assert wgmma.last_launch({"E": 3, "BLOCK_M": 7}) is None


def _model_per_sm(cfg: dict, spec) -> int:
    from qtip_triton.kernels import wgmma_configs as wc

    return wgmma.programs_per_sm(wc.estimated_registers(cfg), wc.smem_bytes(cfg, wc.table_words(spec)),
                                 cfg["num_warps"])


@pytest.mark.parametrize("shape,M", [((12288, 4096), 128), ((22016, 4096), 128), ((11008, 4096), 128),
                                     ((4096, 11008), 64), ((12288, 4096), 32), ((8192, 8192), 256)])
def test_occupancy_candidates_fill_one_wave(shape, M):
    """Each pick is in the space, one warpgroup, the bucket's whole token tile, the default's loop form and a
    16-copy table, at most one E each, its grid within one wave of resident programs; and no other such config of
    the same E keeps more warps busy in one wave."""
    from qtip_triton.kernels import wgmma_configs as wc
    from qtip_triton.spec import TrellisSpec

    spec = TrellisSpec.parse("L16K2V2-hyb9")
    m, n = shape
    space = wc.config_space(spec, m, n, M)
    picks = wc.occupancy_candidates(spec, m, n, M, sms=132)
    assert picks and len({c["E"] for c in picks}) == len(picks)
    pipe = wc.default_config(spec, m, n, M)["PIPE"]

    def programs(c):
        return m // 64 * c["SPLIT_K"] * -(-M // c["BLOCK_M"])

    for c in picks:
        assert c in space and c["num_warps"] == 4 and c["BLOCK_M"] == min(256, max(16, M))
        assert c["PIPE"] == pipe and c["table"] == "shared16"
        assert programs(c) <= 132 * _model_per_sm(c, spec)
        rivals = [r for r in space if r["E"] == c["E"] and r["num_warps"] == 4 and r["BLOCK_M"] == c["BLOCK_M"]
                  and r["PIPE"] == pipe and r["table"] == "shared16" and r["WPF"] == c["WPF"] and not r.get("WS")
                  and programs(r) <= 132 * _model_per_sm(r, spec)]
        assert max(programs(r) for r in rivals) == programs(c)


def test_occupancy_candidates_follow_the_sm_count():
    """Fewer SMs, fewer programs in one wave: a 114-SM part (H100 PCIe) gets no pick a 132-SM wave needed more
    than 114 SMs for."""
    from qtip_triton.kernels import wgmma_configs as wc
    from qtip_triton.spec import TrellisSpec

    spec = TrellisSpec.parse("L16K2V2-hyb9")
    for c in wc.occupancy_candidates(spec, 22016, 4096, 128, sms=114):
        assert 22016 // 64 * c["SPLIT_K"] <= 114 * _model_per_sm(c, spec)
    assert wc.occupancy_candidates(spec, 22016, 4096, 128, sms=132) != wc.occupancy_candidates(spec, 22016, 4096, 128,
                                                                                             sms=100)
