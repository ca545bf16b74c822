"""Autotune end to end on the GPU (run on the device: ``pytest -m gpu tests/test_autotune_gpu.py``).

A small tuning run through the CLI, then: the registry serves the tuned configs, a prepared layer
matches the float64 reference, replays inside a CUDA graph, and a fresh process with a precompiled
cache prepares its layer without compiling anything.

The run tunes every M bucket that ``prepare(max_m=MAX_M)`` looks up (1..256), not a sparse subset:
an untuned bucket borrows a neighbour's config at a row-count class that precompile never compiled
(bucket 2 ran bucket 1's config at M=2 and JIT-compiled, depending on which configs won the tuning),
and where the user cache lacks a bucket a shipped file may answer instead (see ``autotune_coverage``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from autotune_coverage import buckets_upto, file_plan, precompile_variants, prepare_variants

pytestmark = pytest.mark.gpu

SHAPE = (4096, 4096)
SPEC = "L16K2V2-hyb9"
MAX_M = 256
TUNED = buckets_upto(MAX_M)  # exactly the buckets prepare(max_m=MAX_M) selects and warms
BUCKETS = ",".join(map(str, TUNED))


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
    assert sorted(k.m_bucket for k in tf.entries) == list(TUNED), "the tuning run left buckets untuned (time limit?)"
    api = ModuleKernelAPI(kernels)
    for key, e in tf.entries.items():
        assert e.default_time_us is not None and e.time_us <= e.default_time_us * 1.05
        ok, why = check_config(api, e.kind, e.config, TrellisSpec.parse(key.spec), key.out_features,
                               key.in_features, key.m_bucket)
        assert ok, why
    print(f"tuned {len(TUNED)} tasks in {tuned['seconds']:.1f} s:",
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
    prepared = r.prepare(qw, max_m=MAX_M)
    assert sorted(prepared.plan) == list(TUNED)
    for b in TUNED:
        assert prepared.plan[b].source.startswith("user cache") and prepared.plan[b].source.endswith(f"(M<={b})")
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
import json, sys, time, torch
t0 = time.perf_counter()
from qtip_triton import registry
from qtip_triton.autotune.workload import random_layer
from qtip_triton.spec import TrellisSpec
qw = random_layer(TrellisSpec.parse(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), device="cuda")
torch.cuda.synchronize()
t1 = time.perf_counter()
prepared = registry.prepare(qw, max_m=int(sys.argv[4]))
t2 = time.perf_counter()
for M in range(1, int(sys.argv[4]) + 1):  # every batch size: the transforms switch kernels inside buckets
    prepared(torch.randn(M, qw.in_features, device="cuda").half())
torch.cuda.synchronize()
print(json.dumps({"import_and_layer_s": t1 - t0, "prepare_s": t2 - t1, "forwards_s": time.perf_counter() - t2,
                  "plan": {b: [s.source, s.kind, dict(s.config)] for b, s in prepared.plan.items()}}))
"""


def test_precompiled_fresh_process_does_not_jit(tuned, tmp_path):
    from qtip_triton import kernels
    from qtip_triton.autotune import store
    from qtip_triton.autotune.kernel_api import ModuleKernelAPI

    tf = store.load(tuned["file"])
    want = file_plan(tf, SPEC, SHAPE)
    assert sorted(want) == list(TUNED), "the tuning run left buckets untuned (time limit?): see test_tuned_file"
    # what precompile compiles covers what prepare() will launch (same rule as the CPU twin in test_autotune_coverage)
    assert prepare_variants(SPEC, SHAPE, want) <= precompile_variants([tf], ModuleKernelAPI(kernels))

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
    out = subprocess.run([sys.executable, "-c", _FRESH, SPEC, str(SHAPE[0]), str(SHAPE[1]), str(MAX_M)],
                         env={**env, "TRITON_CACHE_DIR": str(fresh_cache)},
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print({k: v for k, v in result.items() if k != "plan"})
    plan = {int(b): v for b, v in result["plan"].items()}
    assert sorted(plan) == list(TUNED)
    for b, (source, kind, config) in plan.items():
        # every bucket is served by its own tuned entry from the user cache (not a neighbour, a shipped file
        # or the heuristic)
        assert source.startswith("user cache") and source.endswith(f"(M<={b})"), (b, source)
        assert (kind, config) == want[b], (b, kind, config, want[b])
    # loading binaries, not compiling, in prepare() and in the forwards at every M up to MAX_M: a JIT compile would
    # add files to the imported cache (the transforms' variants did until 2026-12-05).
    # (prepare_s is printed for the report; timings are never asserted.)
    after = sorted(fresh_cache.rglob("*"))
    new = [p.name for p in after if p not in set(imported)]
    assert after == imported, f"the fresh process compiled kernels despite the cache: {new[:8]}"


def _triton_cache_files() -> set:
    """Files in this process's Triton binary cache: a new one means a kernel was JIT-compiled."""
    from pathlib import Path

    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return set(root.rglob("*")) if root.exists() else set()
