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
