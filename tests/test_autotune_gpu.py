"""Autotune end to end on the GPU (run on the device: ``pytest -m gpu tests/test_autotune_gpu.py``).

A small tuning run through the CLI, then: the registry serves the tuned configs, a prepared layer
matches the float64 reference, replays inside a CUDA graph, and a fresh process with a precompiled
cache prepares its layer without compiling anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.gpu

SHAPE = (4096, 4096)
BUCKETS = "1,16,256"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tuned file for this GPU in a private user cache (QTIP_TRITON_CACHE_DIR layout) and a private Triton cache."""
    from qtip_triton import cli
    from qtip_triton.autotune.device import current_device

    root = tmp_path_factory.mktemp("autotune")
    dev = current_device()
    out = root / "qcache" / "autotune" / f"{dev.short}.yaml"
    env = {"TRITON_CACHE_DIR": str(root / "triton"), "QTIP_TRITON_CACHE_DIR": str(root / "qcache")}
    t0 = time.monotonic()
    rc = cli.main(["autotune", "--gpu", dev.short, "--shapes", f"{SHAPE[0]}x{SHAPE[1]}", "--bits", "2",
                   "--buckets", BUCKETS, "--max-minutes", "3", "--max-candidates", "3", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    return {"root": root, "file": out, "device": dev, "env": env, "seconds": time.monotonic() - t0}


def test_tuned_file(tuned):
    from qtip_triton import kernels
    from qtip_triton.autotune import store
    from qtip_triton.autotune.kernel_api import ModuleKernelAPI
    from qtip_triton.autotune.space import check_config
    from qtip_triton.spec import TrellisSpec

    tf = store.load(tuned["file"])
    assert tf.header.device == tuned["device"]
    assert sorted(k.m_bucket for k in tf.entries) == [1, 16, 256]
    api = ModuleKernelAPI(kernels)
    for key, e in tf.entries.items():
        assert e.default_time_us is not None and e.time_us <= e.default_time_us * 1.05
        ok, why = check_config(api, e.kind, e.config, TrellisSpec.parse(key.spec), key.out_features,
                               key.in_features, key.m_bucket)
        assert ok, why
    print(f"tuned 3 tasks in {tuned['seconds']:.1f} s:",
          {k.m_bucket: (e.kind, round(e.speedup, 2)) for k, e in tf.entries.items()})


def test_registry_serves_tuned_configs_and_graphs(tuned):
    from qtip_triton import kernels
    from qtip_triton.autotune.device import current_versions
    from qtip_triton.autotune.kernel_api import ModuleKernelAPI
    from qtip_triton.autotune.lookup import ConfigStore
    from qtip_triton.autotune.workload import random_layer
    from qtip_triton.registry import Registry
    from qtip_triton.spec import TrellisSpec

    dev = tuned["device"]
    store = ConfigStore(dev, current_versions(), user_dir=tuned["file"].parent, shipped=tuned["root"] / "none")
    r = Registry(ModuleKernelAPI(kernels), device=dev, store=store)
    qw = random_layer(TrellisSpec(16, 2, 2, "hyb", 9), *SHAPE, device="cuda")
    prepared = r.prepare(qw, max_m=256)
    for b in (1, 16, 256):
        assert prepared.plan[b].source.startswith("user cache")
    w64 = qw.decode().double()
    for M in (1, 3, 16, 200):
        x = torch.randn(M, SHAPE[1], device="cuda").half()
        before = _triton_cache_files()
        y = prepared(x)
        torch.cuda.synchronize()
        assert _triton_cache_files() == before, f"M={M}: the first call after prepare compiled a kernel"
        ref = qw.output_transform(qw.input_transform(x.double()) @ w64.t())
        assert float((y.double() - ref).norm() / ref.norm()) < 2e-3
    x = torch.randn(1, SHAPE[1], device="cuda").half()
    static_y = prepared(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = prepared(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(static_y, prepared(x), rtol=1e-3, atol=1e-3)


_FRESH = r"""
import json, time, torch
t0 = time.perf_counter()
from qtip_triton import registry
from qtip_triton.autotune.workload import random_layer
from qtip_triton.spec import TrellisSpec
qw = random_layer(TrellisSpec(16, 2, 2, "hyb", 9), 4096, 4096, device="cuda")
torch.cuda.synchronize()
t1 = time.perf_counter()
prepared = registry.prepare(qw, max_m=256)
t2 = time.perf_counter()
print(json.dumps({"import_and_layer_s": t1 - t0, "prepare_s": t2 - t1,
                  "sources": sorted({s.source for s in prepared.plan.values()})}))
"""


def test_precompiled_fresh_process_does_not_jit(tuned, tmp_path):
    env = {**os.environ, **tuned["env"]}
    cmd = [sys.executable, "-m", "qtip_triton.cli"]
    subprocess.run(cmd + ["precompile", "--file", str(tuned["file"]), "--jobs", "2", "--no-progress"],
                   env=env, check=True)
    archive = tmp_path / "cache.tar.gz"
    subprocess.run(cmd + ["export", str(archive)], env=env, check=True)
    fresh_cache = tmp_path / "imported"
    subprocess.run(cmd + ["import", str(archive), "--cache-dir", str(fresh_cache)], env=env, check=True)
    imported = sorted(fresh_cache.rglob("*"))
    assert imported
    out = subprocess.run([sys.executable, "-c", _FRESH], env={**env, "TRITON_CACHE_DIR": str(fresh_cache)},
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(result)
    assert all(s.startswith("user cache") for s in result["sources"])
    # loading binaries, not compiling: a JIT compile would add files to the imported cache.
    # (prepare_s is printed for the report; timings are never asserted.)
    assert sorted(fresh_cache.rglob("*")) == imported, "the fresh process compiled kernels despite the cache"


def _triton_cache_files() -> set:
    """Files in this process's Triton binary cache: a new one means a kernel was JIT-compiled."""
    from pathlib import Path

    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return set(root.rglob("*")) if root.exists() else set()
