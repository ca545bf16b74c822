"""GPU test: after the load-time warm-up's compile pool, nothing compiles in the serving process.

The vLLM warm-up (:func:`qtip_triton.vllm.warmup.warm_up_layers`, called here without vLLM) compiles a model's
variants in worker processes, then launches them once per distinct variant serially, which should only load
binaries; every forward after it, at any batch size up to the warmed M, should compile nothing. A variant the
pool misses costs 1-3 s of single-threaded compile at engine start, and one the warm-up misses a JIT stall while
serving. Run in a fresh process with an empty Triton cache, with Llama-2-7B's fused q/k/v (grouped transforms,
one-launch shard decode) and down (11008 input features) at K = 2 from 1 to 96 tokens, where the kinds (gemv,
mma gemv, wgmma), the transforms' kernels and the gathered input all switch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MAX_M = 96

_CHILD = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_fused_gpu import shards
from qtip_triton import ops
from qtip_triton.compile_watch import watch_compiles
from qtip_triton.ops import PackedShards
from qtip_triton.vllm import warmup

max_m = int(sys.argv[2])
layers = {"qkv": PackedShards.from_qweights(shards(3, 4096, 4096, 2), key="coverage.qkv"),
          "down": PackedShards.from_qweights(shards(1, 4096, 11008, 2), key="coverage.down")}
for p in layers.values():
    p.register()
report = warmup.warm_up_layers([warmup.PendingWarmup(p, torch.float16, False, max_m, "test", name)
                                for name, p in layers.items()])
with torch.no_grad(), watch_compiles() as serving:
    for M in range(1, max_m + 1):
        for p in layers.values():
            ops.qtip_linear(torch.randn(M, p.in_features, dtype=torch.float16, device="cuda"), p, None)
    torch.cuda.synchronize()
print("REPORT " + json.dumps({
    "pool_compiled": report.pool_compiled, "available": report.watch.available,
    "warm_compiled": [e.name for e in report.watch.compiled], "warm_loaded": len(report.watch.loaded),
    "warm_summary": report.watch.summary(),
    "serving_compiled": [e.name for e in serving.compiled], "serving_summary": serving.summary()}))
"""


def test_warmup_after_the_pool_and_every_forward_after_it_compile_nothing(tmp_path):
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "QTIP_TRITON_CACHE_DIR": str(tmp_path / "q"),
           "QTIP_TRITON_WARMUP_JOBS": "8", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in ("TRITON_INTERPRET", "QTIP_TRITON_NO_WARMUP", "QTIP_TRITON_NO_REGISTRY"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), str(MAX_M)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    if not report["available"]:
        pytest.skip("this Triton has no compilation listener")
    assert report["pool_compiled"], f"the compile pool did not run: {out.stderr[-3000:]}"
    assert report["warm_loaded"] > 0, report["warm_summary"]
    assert report["warm_compiled"] == [], f"the pool missed variants the warm-up launched: {report['warm_summary']}"
    assert report["serving_compiled"] == [], f"forwards after the warm-up compiled: {report['serving_summary']}"
