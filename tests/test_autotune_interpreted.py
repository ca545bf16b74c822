"""The tuner and the registry driving the real Triton kernels (in Triton's CPU interpreter), fake timer."""

from __future__ import annotations

import random

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import kernels
from qtip_triton import registry as reg
from qtip_triton.autotune.kernel_api import ModuleKernelAPI, config_key
from qtip_triton.autotune.tuner import RandomWorkload, make_tasks, plan, tune
from qtip_triton.spec import TrellisSpec

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)
SPEC = TrellisSpec(16, 2, 2, "hyb", 9)


class Recording(ModuleKernelAPI):
    """The real kernel API, remembering what it launched last (for the fake timer)."""

    last = None

    def launch(self, kind, x, qw, config, bias=None):
        self.last = (kind, config_key(config), x.shape[0])
        return super().launch(kind, x, qw, config, bias)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_tuner_with_real_kernels():
    api = Recording(kernels)
    seed = random.randrange(1 << 30)

    def cost(kind, key, M):
        return random.Random(f"{seed}{kind}{key}{M}").uniform(1, 100)

    def bench(fn):
        fn()
        return cost(*api.last)

    tasks = make_tasks([SPEC], [(64, 96)], [1, 16])
    report = tune(tasks, api, bench, RandomWorkload("cpu", torch.float16), max_candidates=2, progress=False)
    for (task, cands, default), res in zip(plan(tasks, api, 2), report.results, strict=True):
        assert not res.failures, res.failures  # every candidate ran and agreed with the default's output
        best = min(cands, key=lambda kc: cost(kc[0], config_key(kc[1]), task.m_bucket))
        assert (res.kind, res.config) == best
        assert res.default_kind == default[0]


def test_registry_prepare_with_real_kernels(gen):
    qw = random_qweight(gen, SPEC, 64, 96)
    r = reg.Registry(ModuleKernelAPI(kernels), device=None)
    prepared = r.prepare(qw, max_m=16)
    assert {s.kind for s in prepared.plan.values()} <= set(kernels.KINDS)
    assert all(s.source == "heuristic default" for s in prepared.plan.values())
    for M in (1, 5, 16):
        x = torch.randn(M, 96, generator=gen).half()
        y = prepared(x)
        assert y.dtype == torch.float16 and y.shape == (M, 64)
        assert rel(y, qw.reference_forward(x.double())) < 1e-2
