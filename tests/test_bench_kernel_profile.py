"""bench/kernel_profile.py: profiler events -> GPU time per kernel and per group, and per decode step as the
difference of a long and a short run (the e2e benchmark's --profile-batch)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.bench_scripts import load_script

kp = load_script("kernel_profile")


def _ev(name: str, us: float, device: str = "DeviceType.CUDA"):
    return SimpleNamespace(name=name, device_type=device, device_time_total=us)


def test_groups_of_kernel_names():
    assert kp.group_of("kernel") == "qtip decode"
    assert kp.group_of("_had2_kernel") == "qtip transforms" and kp.group_of("_had2_stack_kernel") == "qtip transforms"
    assert kp.group_of("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64") == "gemm (cuBLAS / CUTLASS)"
    assert kp.group_of("kernel_unified_attention_2d") == "attention"  # vLLM's Triton attention, not ours
    assert kp.group_of("triton_red_fused_add_rms_norm_0") == "norm / activation"
    assert kp.group_of("void at::native::elementwise_kernel<128, 2>") == "other"


def test_kernel_times_keep_cuda_kernels_only():
    events = [_ev("kernel", 10.0), _ev("kernel", 12.5), _ev("_had2_kernel", 4.0),
              _ev("cudaLaunchKernel", 99.0, "DeviceType.CPU"),
              SimpleNamespace(name="old", device_type="DeviceType.CUDA", cuda_time_total=2.0),
              SimpleNamespace(name="kernel", device_type="DeviceType.CUDA", device_time_total=0.0,
                              time_range=SimpleNamespace(elapsed_us=lambda: 7.5))]
    assert kp.kernel_times(events) == {"kernel": (30.0, 3), "_had2_kernel": (4.0, 1), "old": (2.0, 1)}


def test_per_step_is_the_difference_over_the_steps():
    long = {"kernel": (700.0, 70), "_had2_kernel": (320.0, 40), "rms_norm": (90.0, 18), "prefill_only": (5.0, 1)}
    short = {"kernel": (100.0, 10), "_had2_kernel": (40.0, 5), "rms_norm": (10.0, 2), "prefill_only": (5.0, 1)}
    prof = kp.per_step(long, short, 20, top=2)
    assert prof["total_us"] == pytest.approx((600 + 280 + 80) / 20)
    assert [r["kernel"] for r in prof["kernels"]] == ["kernel", "_had2_kernel", "(2 others)"]
    assert prof["kernels"][0] == {"kernel": "kernel", "group": "qtip decode", "us": 30.0, "calls": 3.0}
    assert prof["kernels"][2]["us"] == 4.0  # rms_norm 80 / 20 + prefill_only 0
    assert list(prof["groups"]) == ["qtip decode", "qtip transforms", "norm / activation", "other"]
    assert prof["groups"]["qtip transforms"] == {"us": 14.0, "calls": 1.75}
    md = "\n".join(kp.markdown("llama2-7b, QTIP K=2, batch 1", prof))
    assert "| qtip transforms | 14.0 | 1.75 |" in md and "| `kernel` | qtip decode | 30.0 | 3 |" in md
    with pytest.raises(ValueError, match="steps"):
        kp.per_step(long, short, 0)
