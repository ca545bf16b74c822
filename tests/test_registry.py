"""The kernel registry: lookup order, validation of stored configs, fallbacks with reasons, prepare()."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_autotune_fakes import FakeAPI
from test_weight import random_qweight

from qtip_triton import registry as reg
from qtip_triton.autotune import store as st
from qtip_triton.autotune.buckets import M_BUCKETS, row_class, warm_rows
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions
from qtip_triton.autotune.kernel_api import config_key
from qtip_triton.autotune.lookup import ConfigStore
from qtip_triton.autotune.store import AutotuneWarning, Entry, EntryKey, Header, TuneFile
from qtip_triton.spec import TrellisSpec

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132)
VERS = SoftwareVersions("3.6.0", "2.11.0", "0.1.0", "1")
SPEC = TrellisSpec(16, 2, 2, "hyb", 9)
M_, N_ = 64, 96
GEMV_TUNED = {"BLOCK_N": 64, "SPLIT_K": 2, "num_warps": 2}
GEMM_TUNED = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8}


def write(path, entries, device=H100):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(st.dumps(TuneFile(Header(device, VERS), {e.key: e for e in entries})))


def entry(bucket, kind, config, t=1.0, spec=SPEC, shape=(M_, N_)):
    return Entry(EntryKey(spec.name, shape[0], shape[1], bucket), kind, config, t, "gemv", 2 * t)


def make(tmp_path, api=None, disabled=frozenset()):
    store = ConfigStore(H100, VERS, user_dir=tmp_path / "user", shipped=tmp_path / "shipped")
    return reg.Registry(api or FakeAPI(), device=H100, store=store, disabled=disabled)


def test_stored_config_used_and_user_cache_wins(tmp_path):
    write(tmp_path / "shipped" / "h100.yaml", [entry(1, "gemv", GEMV_TUNED), entry(256, "gemm", GEMM_TUNED)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = make(tmp_path)
        sel = r.select(SPEC, M_, N_, 1)
        assert (sel.kind, dict(sel.config)) == ("gemv", GEMV_TUNED) and "shipped h100.yaml" in sel.source
        assert r.lookup_config(SPEC, M_, N_, 200) == ("gemm", GEMM_TUNED)  # 200 -> bucket 256
    user_cfg = {"BLOCK_N": 16, "SPLIT_K": 1, "num_warps": 4}
    write(tmp_path / "user" / "h100.yaml", [entry(1, "gemv", user_cfg, t=9.0)])
    sel = make(tmp_path).select(SPEC, M_, N_, 1)
    assert dict(sel.config) == user_cfg and sel.source.startswith("user cache")


def test_nearest_bucket(tmp_path):
    write(tmp_path / "shipped" / "h100.yaml", [entry(16, "gemm", GEMM_TUNED)])
    r = make(tmp_path)
    sel = r.select(SPEC, M_, N_, 100)  # bucket 128 missing; 16 is the nearest present
    assert (sel.kind, dict(sel.config)) == ("gemm", GEMM_TUNED) and "(M<=16)" in sel.source


def test_invalid_stored_config_falls_back_with_one_warning(tmp_path):
    bad = {**GEMV_TUNED, "BLOCK_N": 48}  # not in the kernel's config space
    write(tmp_path / "shipped" / "h100.yaml", [entry(4, "gemv", bad), entry(8, "nokernel", {"X": 1})])
    r = make(tmp_path)
    api = r.api
    with pytest.warns(AutotuneWarning) as rec:
        sel = r.select(SPEC, M_, N_, 4)
        r.select(SPEC, M_, N_, 3)  # same bucket: memoized, no second warning
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert f"{SPEC.name} {M_}x{N_} M<=4" in msg and "not in gemv's config space" in msg and "autotune --gpu h100" in msg
    assert sel.source == "heuristic default"
    assert (sel.kind, dict(sel.config)) == ("gemv", api.default_config("gemv", SPEC, M_, N_, 4))
    with pytest.warns(AutotuneWarning, match="'nokernel' is not one of the kernels here"):
        assert r.select(SPEC, M_, N_, 8).source == "heuristic default"


def test_missing_entry_warns_once_per_entry(tmp_path):
    write(tmp_path / "shipped" / "h100.yaml", [entry(1, "gemv", GEMV_TUNED)])
    r = make(tmp_path)
    with pytest.warns(AutotuneWarning) as rec:
        for M in (1, 2, 2, 64, 33, 64):
            r.select(SPEC, M_, N_ * 2, M)  # another shape: no entry at all
    assert len(rec) == 3  # buckets 1, 2 and 64, each named once
    assert all(f"{M_}x{N_ * 2}" in str(w.message) for w in rec)


def test_disabled_kernels_and_reasons(tmp_path, monkeypatch):
    write(tmp_path / "shipped" / "h100.yaml", [entry(1, "gemv", GEMV_TUNED)])
    monkeypatch.setenv(reg.DISABLE_ENV, "gemv, other")
    r = reg.Registry(FakeAPI(), device=H100, store=ConfigStore(H100, VERS, tmp_path / "u", tmp_path / "shipped"))
    assert r.disabled == {"gemv", "other"}
    with pytest.warns(AutotuneWarning, match=f"kernel 'gemv' is disabled by {reg.DISABLE_ENV}"):
        sel = r.select(SPEC, M_, N_, 1)
    assert sel.kind == "gemm"
    why = dict(r.why_not(reg.Request(SPEC, M_, N_, 1)))
    assert why == {"gemv": f"disabled by {reg.DISABLE_ENV}", "gemm": None, "reference": None}
    assert dict(r.why_not(reg.Request(SPEC, M_, N_, 64)))["gemv"].startswith("disabled")
    r2 = make(tmp_path, disabled={"gemv", "gemm"})
    with pytest.warns(AutotuneWarning, match="slow reference path"):
        assert r2.select(SPEC, M_, N_, 1).kind == "reference"
    r3 = make(tmp_path, disabled={"gemv", "gemm", "reference"})
    with pytest.raises(ValueError, match="no enabled kernel can run .*gemv: disabled"):
        r3.select(SPEC, M_, N_, 1)


def test_bad_requests():
    r = reg.Registry(None, device=None)
    with pytest.raises(ValueError, match="M"):
        r.select(SPEC, M_, N_, 0)
    with pytest.raises(TypeError):
        r.select(SPEC, M_, N_, 1.5)
    with pytest.raises(ValueError, match="out_features"):
        r.select(SPEC, 100, N_, 1)
    with pytest.raises(TypeError, match="TrellisSpec"):
        r.select("L16K2V2-hyb9", M_, N_, 1)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        r.prepare(torch.zeros(3))


def test_without_kernels_reference_is_exact(gen):
    """No kernel package (or no GPU and no interpreter): the reference path, no warnings off-GPU."""
    qw = random_qweight(gen, SPEC, M_, N_)
    r = reg.Registry(None, device=None, unavailable_reason="qtip_triton.kernels missing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = r.prepare(qw)
    assert {s.kind for s in prepared.plan.values()} == {"reference"}
    x = torch.randn(2, 5, N_, generator=gen, dtype=torch.float64)
    ref = x @ qw.dequantize(torch.float64).t()
    assert torch.allclose(prepared(x), ref, rtol=1e-9, atol=1e-9)
    assert ("triton kernels", "qtip_triton.kernels missing") in r.why_not(reg.Request(SPEC, M_, N_, 1))


def test_triton_kernel_needs_device_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    r = reg.Registry(FakeAPI(), device=None)
    assert r.select(SPEC, M_, N_, 1).kind == "reference"
    assert "no CUDA device" in dict(r.why_not(reg.Request(SPEC, M_, N_, 1)))["gemv"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert reg.Registry(FakeAPI(), device=None).select(SPEC, M_, N_, 1).kind == "gemv"


def test_prepare_warms_every_variant_then_pure_lookups(tmp_path, gen):
    write(tmp_path / "shipped" / "h100.yaml", [entry(b, "gemv" if b <= 16 else "gemm",
                                                      GEMV_TUNED if b <= 16 else GEMM_TUNED) for b in M_BUCKETS])
    r = make(tmp_path)
    api: FakeAPI = r.api
    qw = random_qweight(gen, SPEC, M_, N_)
    prepared = r.prepare(qw, dtypes=(torch.float32,))
    assert api.calls["prepare"] == 1
    expect = {(s.kind, config_key(s.config), row_class(rows))
              for b, s in prepared.plan.items() for rows in warm_rows(b)}
    assert sum(api.launches.values()) == len(expect)  # each compiled variant launched exactly once
    assert {(k, c) for k, c, _ in expect} == {("gemv", config_key(GEMV_TUNED)), ("gemm", config_key(GEMM_TUNED))}
    before = (dict(api.calls), sum(api.launches.values()))
    for M in (1, 3, 16, 17, 1000, 4096, 9999):
        assert r.lookup_config(SPEC, M_, N_, M)[0] == ("gemv" if M <= 16 else "gemm")
    assert dict(api.calls) == before[0]  # no can_implement/config_space on the hot path
    ref_w = qw.dequantize(torch.float64)
    for M in (1, 7, 40):
        x = torch.randn(M, N_, generator=gen)
        y = prepared(x)
        ref = x.double() @ ref_w.t()
        assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
        assert api.last[0] == ("gemv" if M <= 16 else "gemm")
    assert sum(api.launches.values()) == before[1] + 3
    x3 = torch.randn(2, 3, N_, generator=gen)
    assert prepared(x3).shape == (2, 3, M_)
    r.prepare(random_qweight(gen, SPEC, M_, N_), dtypes=(torch.float32,))  # same shape: nothing to warm again
    assert sum(api.launches.values()) == before[1] + 4


def test_prepare_warns_once_per_layer(tmp_path, gen):
    other_shape = (N_, M_)
    gemv_96 = {"BLOCK_N": 32, "SPLIT_K": 2, "num_warps": 2}  # valid for 96 output rows
    write(tmp_path / "shipped" / "h100.yaml", [entry(1, "gemv", gemv_96, shape=other_shape)])
    r = make(tmp_path)
    with pytest.warns(AutotuneWarning) as rec:
        prepared = r.prepare(random_qweight(gen, SPEC, M_, N_), max_m=64, dtypes=(torch.float32,))
        r.prepare(random_qweight(gen, SPEC, M_, N_), max_m=64, dtypes=(torch.float32,))  # same layer shape: silent
    assert len(rec) == 1
    assert f"{SPEC.name} {M_}x{N_} M buckets 1, 2, 4, 8, 16, 32, 64 on {H100.name}" in str(rec[0].message)
    assert all(s.source == "heuristic default" for s in prepared.plan.values())
    with pytest.warns(AutotuneWarning) as rec:
        prepared = r.prepare(random_qweight(gen, SPEC, *other_shape), max_m=64, dtypes=(torch.float32,))
    msg = str(rec[0].message)
    assert len(rec) == 1 and "M buckets 32, 64 " in msg  # gemv cannot serve M > 16
    assert "kernel 'gemv' cannot run it: gemv handles M <= 16" in msg
    assert all(prepared.plan[b].source.startswith("shipped") for b in (1, 2, 4, 8, 16))


def test_prepare_warms_the_bias_variant_when_asked(tmp_path, gen):
    """A layer whose forward passes a bias runs the kernels' bias variant: prepare(bias=True) warms that one."""
    write(tmp_path / "shipped" / "h100.yaml", [entry(1, "gemv", GEMV_TUNED)])
    r = make(tmp_path)
    api: FakeAPI = r.api
    seen = []
    launch = api.launch
    api.launch = lambda kind, x, prepared, config, bias=None: seen.append(bias) or launch(kind, x, prepared, config, bias)
    qw = random_qweight(gen, SPEC, M_, N_)
    r.prepare(qw, max_m=1, dtypes=(torch.float16,), bias=True)
    assert len(seen) == 1 and seen[0].shape == (M_,) and seen[0].dtype == torch.float16 and not seen[0].any()
    r.prepare(qw, max_m=1, dtypes=(torch.float16,), bias=True)  # already warm
    r.prepare(qw, max_m=1, dtypes=(torch.float16,))  # the bias-free variant is another one
    assert len(seen) == 2 and seen[1] is None
