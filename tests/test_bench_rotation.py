"""bench/common.py's rotated timing: how many weight copies defeat the L2, and the rotated section of the
kernel table (the timing itself runs on the GPU, in ``tests/gpu/test_bench_rotation_gpu.py``)."""

from __future__ import annotations

import types

import pytest

from tests.bench_scripts import load_script

common = load_script("common")
kernels_bench = load_script("kernels")


@pytest.fixture
def l2_50mb(monkeypatch):
    props = types.SimpleNamespace(L2_cache_size=50 * 2**20)
    monkeypatch.setattr(common.torch.cuda, "get_device_properties", lambda *_: props)


def test_rotation_copies_cover_three_l2s(l2_50mb):
    mib = 2**20
    assert common.rotation_copies(16 * mib) == 10  # a 2-bit 8192^2 trellis: 160 MiB >= 150 MiB
    assert common.rotation_copies(150 * mib) == 2  # never one copy: the next call must not find its own tail
    assert common.rotation_copies(151 * mib) == 2
    assert common.rotation_copies(49 * mib) == 4
    assert common.rotation_copies(50 * mib, l2_multiple=1, minimum=1) == 1


def test_time_rotated_needs_callables():
    with pytest.raises(ValueError, match="at least one"):
        common.time_rotated_us([])


def test_kernel_table_lists_rotated_rows_only_when_timed():
    row = {"m": 8192, "n": 8192, "spec": "L16K2V2-hyb9", "K": 2, "M": 1, "kind": "gemv", "kernel_us": 24.0,
           "linear_us": 30.0, "fp16_us": 60.0, "ratio_kernel": 2.5, "ratio_linear": 2.0}
    env = {"card": "test card", "torch": "t", "triton": "t"}
    assert "Rotated weights" not in kernels_bench.markdown(env, [row], [])
    rot = {**row, "copies": [10, 2], "kernel_rot_us": 16.0, "linear_rot_us": 22.0, "fp16_rot_us": 48.0,
           "ratio_kernel_rot": 3.0, "ratio_linear_rot": 48.0 / 22.0}
    md = kernels_bench.markdown(env, [row, rot], [])
    section = md.split("## Rotated weights")[1]
    assert "| 8192x8192 | 2 | 1 | gemv | 10 / 2 | 16.0 | 22.0 | 48.0 | 3.00 | 2.18 |" in section
    assert section.count("| 8192x8192 |") == 1
