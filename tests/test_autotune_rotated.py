"""``qtip-triton autotune --timer rotated``: each candidate is timed over prepared copies of its layer (as many as
the weight bytes ask for), every copy fed the same input, and the winner is the one the rotated timer ranks
first. Run on CPU with the fake kernel package; the timer itself runs on the GPU (tests/gpu)."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from test_autotune_fakes import FakeAPI, FakeClock, fake_bench

from qtip_triton import cli
from qtip_triton.autotune import cmd_autotune, store
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions
from qtip_triton.autotune.kernel_api import config_key
from qtip_triton.autotune.tuner import RandomWorkload, Workload, make_tasks, plan, tune
from qtip_triton.spec import TrellisSpec

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132)
VERS = SoftwareVersions("3.6.0", "2.11.0", "0.1.0", "1")
SPEC = TrellisSpec(16, 2, 2, "hyb", 9)
WORKLOAD = RandomWorkload("cpu", torch.float32)


class RotatedFake:
    """A rotated timer that runs every copy's launch once, records which layers and inputs it saw, and
    reports a cost of its own (the flushed fake's cost reversed), so the rotated ranking is the one used."""

    def __init__(self, api: FakeAPI) -> None:
        self.api, self.calls = api, []

    def __call__(self, fns) -> float:
        layers, inputs = [], []
        for fn in fns:
            before = len(self.api.log)
            fn()
            assert len(self.api.log) == before + 1  # one launch per copy
            layers.append(id(self.api.last_prepared))
            inputs.append(id(self.api.last_x))
        self.calls.append((layers, inputs))
        kind, cfg, spec, m, n, M = self.api.last
        return 1000.0 / self.api.cost(kind, cfg, spec, m, n, M)


class TrackingAPI(FakeAPI):
    def launch(self, kind, x, prepared, config, bias=None):
        self.last_prepared, self.last_x = prepared, x
        return super().launch(kind, x, prepared, config, bias)


def test_each_candidate_is_timed_over_distinct_copies_with_one_input():
    api = TrackingAPI(seed=5)
    rotated = RotatedFake(api)
    sizes = []

    def copies(nbytes):
        sizes.append(nbytes)
        return 4

    tasks = make_tasks([SPEC], [(64, 96)], [1, 16])
    report = tune(tasks, api, fake_bench(api), WORKLOAD, max_candidates=4, progress=False, rotated=rotated,
                  copies=copies)
    assert sizes == [WORKLOAD.weight_bytes(WORKLOAD.layer(SPEC, 64, 96))]  # one rotation per layer, both buckets
    assert api.calls["prepare"] == 4  # the layer and three more copies, shared by the tasks of that layer
    assert rotated.calls and all(len(set(layers)) == 4 and len(set(inputs)) == 1 for layers, inputs in rotated.calls)
    for res, (task, cands, _) in zip(report.results, plan(tasks, api, 4), strict=True):
        # the winner is the rotated timer's fastest, not the flushed fake's
        costs = {config_key(c): 1000.0 / api.cost(k, c, SPEC.name, 64, 96, task.m_bucket) for k, c in cands}
        assert res.time_us == min(costs.values()) and costs[config_key(res.config)] == res.time_us


def test_a_workload_that_cannot_size_its_weights_is_a_clear_error():
    class Sizeless(Workload):
        def layer(self, spec, out_features, in_features):
            return WORKLOAD.layer(spec, out_features, in_features)

        def inputs(self, layer, M):
            return WORKLOAD.inputs(layer, M)

    api = FakeAPI()
    with pytest.raises(NotImplementedError, match="weight bytes"):
        tune(make_tasks([SPEC], [(64, 96)], [1]), api, fake_bench(api), Sizeless(), progress=False,
             rotated=RotatedFake(api), copies=lambda n: 2)


def test_command_passes_the_rotated_timer(tmp_path):
    api, clock = TrackingAPI(seed=2), FakeClock()
    p = argparse.ArgumentParser()
    cmd_autotune.add_arguments(p)
    args = p.parse_args(["--gpu", "h100", "--shapes", "64x96", "--bits", "2", "--buckets", "1", "--max-candidates",
                         "3", "--out", str(tmp_path / "h100.yaml"), "--no-progress", "--jobs", "1", "--timer",
                         "rotated"])
    rotated = RotatedFake(api)
    assert cmd_autotune.autotune(args, api, fake_bench(api, clock), WORKLOAD, H100, VERS, clock=clock,
                                 out=io.StringIO(), rotated=rotated, copies=lambda n: 3) == 0
    tf = store.load(tmp_path / "h100.yaml")
    assert len(tf.entries) == 1 and len(rotated.calls) >= 1


def test_cli_accepts_the_rotated_timer(monkeypatch, capsys):
    monkeypatch.setattr(cmd_autotune, "load_kernel_api", lambda: FakeAPI())
    assert cli.main(["autotune", "--gpu", "h100", "--timer", "rotated", "--dry-run", "--no-progress", "--bits", "2",
                     "--shapes", "64x96", "--buckets", "1"]) == 0
    assert "1 tasks" in capsys.readouterr().out
