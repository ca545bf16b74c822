"""The rotated timing on the GPU: every copy's callable runs inside the graph, in order, and the time is per
call (no timing asserted: two graphs of the same kernel, one doing twice the work per call)."""

from __future__ import annotations

import pytest
import torch

from tests.bench_scripts import load_script

pytestmark = pytest.mark.gpu
common = load_script("common")


def test_rotated_graph_runs_every_copy_in_turn():
    counters = [torch.zeros(1, device="cuda") for _ in range(3)]
    fns = [lambda c=c: c.add_(1) for c in counters]
    t = common.time_rotated_us(fns, min_calls=7, reps=3)
    assert t > 0
    # 2 direct warm-ups + 3 calls per replay of a 9-call graph: 2 warm replays + 3 timed
    assert [int(c.item()) for c in counters] == [2 + 3 * 5] * 3


def test_rotation_copies_exceed_the_l2():
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    n = common.rotation_copies(16 * 2**20)
    assert n * 16 * 2**20 >= 3 * l2 and (n - 1) * 16 * 2**20 < 3 * l2
