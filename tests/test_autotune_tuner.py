"""The tuner loop and the `autotune` command, on CPU with a fake kernel package and a fake timer."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from test_autotune_fakes import FakeAPI, FakeClock, fake_bench

from qtip_triton import cli
from qtip_triton.autotune import cmd_autotune, store
from qtip_triton.autotune.buckets import interior_rows
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions
from qtip_triton.autotune.kernel_api import config_key
from qtip_triton.autotune.space import candidates, check_config, knobs_apart, prune, wasteful
from qtip_triton.autotune.tuner import (
    RandomWorkload,
    TaskResult,
    make_tasks,
    merge_rounds,
    plan,
    refine_plan,
    second_starts,
    tried_in,
    tune,
)
from qtip_triton.spec import TrellisSpec

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132)
VERS = SoftwareVersions("3.6.0", "2.11.0", "0.1.0", "1")
SPECS = [TrellisSpec(16, 2, 2, "hyb", 9), TrellisSpec(16, 3, 2, "hyb", 9)]
SHAPES = [(64, 96), (96, 64)]
WORKLOAD = RandomWorkload("cpu", torch.float32)


def test_prune_keeps_default_and_budget():
    api = FakeAPI()
    spec = SPECS[0]
    space = api.config_space("gemm", spec, 4096, 4096, 4)
    default = api.default_config("gemm", spec, 4096, 4096, 4)
    got = prune(space, default, 4096, 4, 3)
    assert got[0] == default and len(got) == 3 and len({config_key(c) for c in got}) == 3
    every = prune(space, default, 4096, 4, 100)
    assert len(every) == 4 and all(c["BLOCK_M"] == 16 for c in every)  # bigger row blocks are wasteful for M=4
    assert len(prune(space, default, 4096, 256, 100)) == len(space)
    assert wasteful({"SPLIT_K": 8, "BLOCK_K": 64}, 256, 1)  # 4 k-blocks cannot feed 8 splits
    assert wasteful({"SPLIT_K": 2, "BLOCK_K": 64}, 256, 1) is None
    # kinds are timed only within two buckets of where the heuristic picks them (gemv: M <= 16)
    assert [k for k, _ in candidates(api, spec, 64, 96, 1, 3)] == ["gemv"] * 3
    assert [k for k, _ in candidates(api, spec, 64, 96, 8, 3)] == ["gemv"] * 3 + ["gemm"] * 2
    assert [k for k, _ in candidates(api, spec, 64, 96, 16, 6)] == ["gemv"] * 6 + ["gemm"] * 2
    assert [k for k, _ in candidates(api, spec, 64, 96, 32, 6)] == ["gemm"] * 6  # gemv cannot run M=32
    assert [k for k, _ in candidates(api, spec, 64, 96, 256, 3)] == ["gemm"] * 3
    # ... or within the buckets the kernel package lists for them (TUNE_RANGES), whatever the heuristic picks
    wide = FakeAPI()
    wide.tune_range = lambda kind: (4, 8) if kind == "gemm" else None
    assert [k for k, _ in candidates(wide, spec, 64, 96, 1, 3)] == ["gemv"] * 3  # below the range: as before
    assert [k for k, _ in candidates(wide, spec, 64, 96, 4, 3)] == ["gemv"] * 3 + ["gemm"] * 2  # was out of reach
    from qtip_triton import kernels
    from qtip_triton.autotune.kernel_api import ModuleKernelAPI

    assert ModuleKernelAPI(kernels).tune_range("wgmma") == (16, 512) and ModuleKernelAPI(kernels).tune_range("gemv") is None
    # neighbours of the default are taken one knob at a time, so each knob gets explored
    gemv_space = api.config_space("gemv", spec, 64, 96, 1)
    gemv_default = api.default_config("gemv", spec, 64, 96, 1)
    got = prune(gemv_space, gemv_default, 96, 1, 4)
    changed = [[k for k in c if c[k] != gemv_default[k]] for c in got[1:]]
    assert sorted(map(tuple, changed)) == [("BLOCK_N",), ("SPLIT_K",), ("num_warps",)]
    with pytest.raises(ValueError):
        prune(space, default, 4096, 4, 0)


def test_check_config():
    api, spec = FakeAPI(), SPECS[0]
    good = api.default_config("gemv", spec, 64, 96, 1)
    assert check_config(api, "gemv", good, spec, 64, 96, 1) == (True, None)
    ok, why = check_config(api, "gemv", {**good, "BLOCK_N": 48}, spec, 64, 96, 1)
    assert not ok and "not in gemv's config space" in why
    ok, why = check_config(api, "gemv", good, spec, 64, 96, 64)
    assert not ok and "M <= 16" in why
    ok, why = check_config(api, "fancy", good, spec, 64, 96, 1)
    assert not ok and "not one of the available kernels" in why


def _expected_best(api, cands, task):
    ok = [(k, c) for k, c in cands if config_key(c) not in api.broken | api.wrong]
    return min(ok, key=lambda kc: api.cost(kc[0], kc[1], task.spec.name, task.out_features, task.in_features, task.m_bucket))


def test_tuner_picks_fastest_skips_broken_and_wrong():
    tasks = make_tasks(SPECS, SHAPES, [1, 16, 256])
    probe = plan(tasks, FakeAPI(), 4)
    # a non-default gemv config present in several tasks fails to compile; another one is fast but wrong
    gemv_nondefault = [c for t, cands, d in probe for k, c in cands[1:] if k == "gemv"]
    broken = gemv_nondefault[0]
    wrong = next(c for c in gemv_nondefault if config_key(c) != config_key(broken))
    assert sum(config_key(c) == config_key(broken) for c in gemv_nondefault) >= 2
    api = FakeAPI(broken=[broken], wrong=[wrong], seed=torch.randint(0, 1 << 30, ()).item())
    report = tune(tasks, api, fake_bench(api), WORKLOAD, max_candidates=4, progress=False)
    assert not report.skipped and len(report.results) == len(tasks)
    for (task, cands, default), res in zip(plan(tasks, api, 4), report.results, strict=True):
        kind, cfg = _expected_best(api, cands, task)
        assert (res.kind, res.config) == (kind, cfg), task
        assert res.time_us == api.cost(kind, cfg, task.spec.name, task.out_features, task.in_features, task.m_bucket)
        assert res.default_kind == default[0]
        assert res.default_time_us == api.cost(default[0], default[1], task.spec.name, task.out_features,
                                               task.in_features, task.m_bucket)
        assert res.time_us <= res.default_time_us
        if any(config_key(c) == config_key(wrong) for _, c in cands):
            assert any("wrong result" in why for _, _, why in res.failures)
    # a compile failure is not retried on other shapes: one attempt per spec (a spec is another kernel)
    specs_with_broken = {t.spec for t, cands, _ in probe if any(config_key(c) == config_key(broken) for _, c in cands)}
    tasks_with_broken = [t for t, cands, _ in probe if any(config_key(c) == config_key(broken) for _, c in cands)]
    assert len(tasks_with_broken) > len(specs_with_broken)
    assert api.launches[("gemv", config_key(broken))] == len(specs_with_broken)
    entries = report.entries()
    assert len(entries) == len(tasks) and all(e.speedup >= 1 for e in entries)


def test_tuner_times_the_plan_it_is_given():
    """The command plans once (to print the plan's size) and hands that plan to the tuner: a plan cut to each task's
    default alone is what gets timed, with no candidate of a fresh plan slipping in."""
    tasks = make_tasks(SPECS[:1], SHAPES[:1], [1, 16])
    api = FakeAPI()
    defaults_only = [(t, cands[:1], d) for t, cands, d in plan(tasks, api, 4)]
    report = tune(tasks, api, fake_bench(api), WORKLOAD, max_candidates=4, progress=False, planned=defaults_only)
    assert [(r.kind, config_key(r.config)) for r in report.results] == \
        [(d[0], config_key(d[1])) for _, _, d in defaults_only]
    assert sum(api.launches.values()) >= len(tasks) and all(
        (k, key) in {(d[0], config_key(d[1])) for _, _, d in defaults_only} for k, key in api.launches)


def test_interior_rows_rank_by_the_mean_over_the_bucket_and_five_eighths_of_it():
    """``rows=interior_rows``: a bucket from 64 rows on times every candidate at its top and at 5/8 of it and keeps
    the config of the lowest mean; smaller buckets are timed at their top alone. The fake costs differ per row
    count, so the winners by the mean are not all the top's."""
    tasks = make_tasks(SPECS, SHAPES, [16, 256])
    api = FakeAPI(seed=3)
    report = tune(tasks, api, fake_bench(api), WORKLOAD, max_candidates=4, progress=False, rows=interior_rows)
    moved = 0
    for (task, cands, _), res in zip(plan(tasks, api, 4), report.results, strict=True):
        counts = interior_rows(task.m_bucket)
        assert counts == ((task.m_bucket,) if task.m_bucket < 64 else (task.m_bucket, task.m_bucket * 5 // 8))

        def mean(kc, counts=counts, task=task):
            return sum(api.cost(*kc, task.spec.name, task.out_features, task.in_features, m) for m in counts) / len(
                counts)

        best = min(cands, key=mean)
        assert (res.kind, config_key(res.config)) == (best[0], config_key(best[1])), task
        assert res.time_us == pytest.approx(mean(best))
        moved += config_key(best[1]) != config_key(_expected_best(api, cands, task)[1])
    assert moved  # the mean chose another config than the top alone somewhere
    assert {m for *_, m in api.log} == {16, 256, 160}  # no 10-row launch: bucket 16 is timed at its top only
    with pytest.raises(ValueError, match="must start with the bucket itself"):
        tune(tasks[:1], api, fake_bench(api), WORKLOAD, max_candidates=2, progress=False, rows=lambda b: (b // 2, b))


def test_interior_rows_command_needs_a_file_of_its_own_or_replace(tmp_path):
    api = FakeAPI(seed=7)
    args = _args(tmp_path, interior_rows=True)
    args.out = None
    with pytest.raises(ValueError, match="--interior-rows"):
        cmd_autotune.autotune(args, api, fake_bench(api), WORKLOAD, H100, VERS, out=io.StringIO())
    out = io.StringIO()
    assert cmd_autotune.autotune(_args(tmp_path, interior_rows=True, buckets="256"), api, fake_bench(api), WORKLOAD,
                                 H100, VERS, out=out) == 0
    assert {m for *_, m in api.log} == {256, 160}


def test_tuner_deadline():
    tasks = make_tasks(SPECS, SHAPES, [1, 16, 256])
    api, clock = FakeAPI(), FakeClock()
    report = tune(tasks, api, fake_bench(api, clock), WORKLOAD, max_candidates=4, deadline_s=20, clock=clock,
                  progress=False)
    assert report.skipped and len(report.results) + len(report.skipped) == len(tasks)
    assert report.elapsed_s <= 20 + 1 + 1e-9  # stops at the first check past the limit
    done = [r for r in report.results if r.kind is not None]
    assert done and all(r.time_us > 0 for r in done)


def _args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    cmd_autotune.add_arguments(p)
    argv = ["--gpu", "h100", "--shapes", "64x96", "96x64", "--bits", "2,3", "--buckets", "1,16,256",
            "--max-candidates", "3", "--out", str(tmp_path / "h100.yaml"), "--no-progress", "--jobs", "1"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return p.parse_args(argv)


def test_autotune_command_end_to_end(tmp_path):
    api, clock = FakeAPI(seed=7), FakeClock()
    out = io.StringIO()
    rc = cmd_autotune.autotune(_args(tmp_path), api, fake_bench(api, clock), WORKLOAD, H100, VERS, clock=clock, out=out)
    assert rc == 0
    text = out.getvalue()
    assert "12 tasks" in text and "geomean default/tuned" in text and "overall geomean" in text
    tf = store.load(tmp_path / "h100.yaml")
    assert len(tf.entries) == 12 and tf.header.device == H100
    assert {e.key.m_bucket for e in tf.entries.values()} == {1, 16, 256}
    # a second run with a slower world merges and keeps the faster entries
    api2 = FakeAPI(seed=8)
    cmd_autotune.autotune(_args(tmp_path), api2, fake_bench(api2), WORKLOAD, H100, VERS, out=io.StringIO())
    merged = store.load(tmp_path / "h100.yaml")
    for key, e in merged.entries.items():
        assert e.time_us <= tf.entries[key].time_us


def test_autotune_command_checks_gpu(tmp_path):
    api = FakeAPI()
    other = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), 108)
    with pytest.raises(ValueError, match="does not match the GPU present"):
        cmd_autotune.autotune(_args(tmp_path), api, fake_bench(api), WORKLOAD, other, VERS, out=io.StringIO())
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        cmd_autotune.autotune(_args(tmp_path), api, fake_bench(api), WORKLOAD, None, VERS, out=io.StringIO())
    assert not (tmp_path / "h100.yaml").exists()


def test_cli_dry_run_full_llama_plan(monkeypatch, capsys):
    """`qtip-triton autotune --gpu h100 --dry-run` plans the whole shipped set on a machine without a GPU."""
    monkeypatch.setattr(cmd_autotune, "load_kernel_api", lambda: FakeAPI())
    assert cli.main(["autotune", "--gpu", "h100", "--dry-run", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "3 specs x 21 shapes x 13 M buckets = 819 tasks" in text and "estimated" in text


def test_quick_screen_skips_clearly_slow_candidates():
    tasks = make_tasks(SPECS[:1], SHAPES[:1], [1])
    (task, cands, default), = plan(tasks, FakeAPI(), 6)
    slow = cands[2][1]
    api = FakeAPI(slow=[slow])
    benched = []

    def bench(fn):
        fn()
        benched.append(config_key(api.last[1]))
        return api.cost(*api.last)

    def quick(fn):
        fn()
        return api.cost(*api.last)

    report = tune(tasks, api, bench, WORKLOAD, max_candidates=6, progress=False, quick=quick, screen=3.0)
    res, = report.results
    assert res.screened == 1 and config_key(slow) not in benched
    assert benched[0] == config_key(default[1]) and len(benched) == len(cands) - 1
    assert res.config != slow and res.default_time_us is not None


def test_autotune_command_compiles_in_parallel_first(tmp_path):
    api, clock = FakeAPI(seed=3), FakeClock()
    calls = []

    def compile_fn(jobs, workers, deadline_s):
        calls.append(dict(jobs=jobs, workers=workers, deadline_s=deadline_s))
        clock.t += 30  # the compile phase takes part of the budget
        return {}

    args = _args(tmp_path, jobs=4, max_minutes=2)
    out = io.StringIO()
    assert cmd_autotune.autotune(args, api, fake_bench(api, clock, 0.0), WORKLOAD, H100, VERS, clock=clock, out=out,
                                 compile_fn=compile_fn) == 0
    planned = plan(make_tasks([TrellisSpec(16, k, 2, "hyb", 9) for k in (2, 3)], [(64, 96), (96, 64)], [1, 16, 256]),
                   api, 3)
    first = calls[0]
    assert first["workers"] == 4 and first["deadline_s"] == pytest.approx(0.5 * 120)
    assert {(j.spec, j.out_features, j.in_features, j.M, j.kind, j.config) for j in first["jobs"]} == {
        (t.spec.name, t.out_features, t.in_features, t.m_bucket, k, config_key(c)) for t, cands, _ in planned
        for k, c in cands}
    # each later round compiles its own candidates first, with half of the time then left
    assert 2 <= len(calls) <= 3 and calls[1]["deadline_s"] == pytest.approx(0.5 * (120 - 30))
    assert "compiled" in out.getvalue() and len(store.load(tmp_path / "h100.yaml").entries) == 12


class Valley(FakeAPI):
    """A world whose fastest config is several knobs from the default, each knob on the way a little faster:
    the first round (default + one-knob neighbours) cannot reach it, climbing from the winner can."""

    TARGET = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8}

    def cost(self, kind, config, spec_name, m, n, M):
        if kind != "gemm":
            return 50.0
        return 10.0 + sum(config.get(k) != v for k, v in self.TARGET.items()) + 0.01 * config.get("BLOCK_M", 0)


def test_rounds_climb_from_the_winner_to_a_config_the_first_round_cannot_time():
    tasks = make_tasks(SPECS[:1], [(64, 96)], [64])
    api = Valley()
    planned = plan(tasks, api, 3)
    (task, cands, default), = planned
    assert config_key(Valley.TARGET) not in {config_key(c) for _, c in cands}
    first = tune(tasks, api, fake_bench(api), WORKLOAD, max_candidates=3, progress=False, planned=planned)
    assert first.results[0].time_us > 10.0
    report, tried, rounds = first, tried_in(planned), 0
    while (nxt := refine_plan(report, planned, api, 3, tried)) and rounds < 10:
        (t, round_cands, d), = nxt
        assert d == default and round_cands[0] == (report.results[0].kind, report.results[0].config)
        assert not {(k, config_key(c)) for k, c in round_cands[1:]} & tried[t.key]  # nothing timed twice
        report = merge_rounds(report, tune(tasks, api, fake_bench(api), WORKLOAD, max_candidates=3, progress=False,
                                           planned=nxt))
        tried, rounds = tried_in(nxt, tried), rounds + 1
    res = report.results[0]
    assert res.config == Valley.TARGET and res.time_us == pytest.approx(10.16)
    assert res.default_time_us == first.results[0].default_time_us and res.tried > first.results[0].tried
    assert 2 <= rounds < 10


class TwoBasins(FakeAPI):
    """A world where the first round's fastest config (an extra candidate several knobs from the default) sits in a
    basin of its own, and the fastest config of all is one knob from a slower first-round config but two or more
    from the winner: climbing from the winner alone never times it (the 11008x4096 wgmma entry at 256 tokens,
    H100, 2026-12-07)."""

    def __init__(self, times: dict[tuple, float], trap: dict) -> None:
        super().__init__()
        self.times, self.trap = times, trap
        self.extra_candidates = lambda kind, *a: [trap] if kind == "gemm" else []

    def cost(self, kind, config, spec_name, m, n, M):
        return self.times.get(config_key(config), 8.0) if kind == "gemm" else 50.0


def _two_basins() -> tuple[TwoBasins, list, dict]:
    """The world, its one task, and the config that is fastest there."""
    spec = SPECS[0]
    trap = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8}
    api = TwoBasins({}, trap)
    tasks = make_tasks([spec], [(64, 96)], [64])
    default = api.default_config("gemm", spec, 64, 96, 64)
    first = [c for k, c in plan(tasks, api, 3)[0][1] if k == "gemm"]
    assert trap in first and knobs_apart(trap, default) == 3
    space = api.config_space("gemm", spec, 64, 96, 64)
    for near in (c for c in first if c not in (trap, default)):
        best = [c for c in space if knobs_apart(c, near) == 1 and knobs_apart(c, trap) >= 2
                and knobs_apart(c, default) >= 2 and c not in first]
        if best:
            break
    api.times = {config_key(trap): 5.0, config_key(default): 6.0, config_key(near): 6.2, config_key(best[0]): 4.0}
    return api, tasks, best[0]


def _climb(api, tasks, **kw):
    planned = plan(tasks, api, 3)
    report = tune(tasks, api, fake_bench(api), WORKLOAD, max_candidates=3, progress=False, planned=planned)
    tried, rounds = tried_in(planned), 0
    while (nxt := refine_plan(report, planned, api, 3, tried, **kw)) and rounds < 10:
        report = merge_rounds(report, tune(tasks, api, fake_bench(api), WORKLOAD, max_candidates=3, progress=False,
                                           planned=nxt))
        tried, rounds = tried_in(nxt, tried), rounds + 1
    return report.results[0]


def test_rounds_also_climb_from_a_second_start_outside_the_winners_neighbourhood():
    api, tasks, best = _two_basins()
    alone = _climb(api, tasks, second_within=0)
    assert alone.config == api.trap and alone.time_us == 5.0  # the winner's basin: its neighbours are all slower
    both = _climb(api, tasks)
    assert both.config == best and both.time_us == 4.0
    assert {config_key(c) for _, c, _ in alone.timed} < {config_key(c) for _, c, _ in both.timed}


def test_the_command_climbs_from_second_starts_unless_told_not_to(tmp_path):
    api, _, best = _two_basins()
    for within, expect in ((None, best), (0.0, api.trap)):
        out, where = io.StringIO(), tmp_path / str(within)
        extra = {} if within is None else {"second_within": within}
        args = _args(where, rounds=6, buckets=64, shapes="64x96", bits="2", **extra)
        assert cmd_autotune.autotune(args, api, fake_bench(api), WORKLOAD, H100, VERS, out=out) == 0
        assert [e.config for e in store.load(where / "h100.yaml").entries.values()] == [expect]
        assert ("also of a second start" in out.getvalue()) == (within is None)


def test_second_start_is_outside_the_winner_neighbourhood_and_near_its_time():
    spec = SPECS[0]
    task = make_tasks([spec], [(64, 96)], [64])[0]
    win = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8}
    one = {**win, "num_warps": 4}
    two = {**win, "num_warps": 4, "BLOCK_N": 64}
    res = TaskResult(task, "gemm", win, 10.0, timed=[("gemm", win, 10.0), ("gemm", one, 10.5), ("gemm", two, 12.0),
                                                     ("gemm", two, 12.5), ("gemv", {"BLOCK_N": 32}, 12.8)])
    # fastest first, each config once at its fastest timing; the one-knob neighbour is the winner's own climb's
    assert second_starts(res) == [("gemm", two), ("gemv", {"BLOCK_N": 32})]
    assert second_starts(res, within=1.22) == [("gemm", two)]  # 12.8 is not within 1.22 x 10.0
    assert second_starts(res, within=1.1) == second_starts(res, within=0) == []
    assert second_starts(res, kinds=("gemv",)) == [("gemv", {"BLOCK_N": 32})]
    assert second_starts(TaskResult(task)) == []  # nothing timed
    assert knobs_apart(win, {**win, "split_sum": True}) == 0  # a launch flag does not move a config


def test_command_rounds_and_what_they_print(tmp_path):
    api, clock = Valley(), FakeClock()
    out = io.StringIO()
    args = _args(tmp_path, rounds=6, buckets=64)
    assert cmd_autotune.autotune(args, api, fake_bench(api, clock), WORKLOAD, H100, VERS, clock=clock, out=out) == 0
    text = out.getvalue()
    assert "round 2:" in text and "found a faster config" in text
    entries = store.load(tmp_path / "h100.yaml").entries.values()
    assert entries and all(e.config == Valley.TARGET for e in entries)
    one = io.StringIO()
    cmd_autotune.autotune(_args(tmp_path / "one", rounds=1, buckets=64), Valley(), fake_bench(api), WORKLOAD, H100,
                          VERS, out=one)
    assert "round 2" not in one.getvalue()
    assert all(e.config != Valley.TARGET for e in store.load(tmp_path / "one" / "h100.yaml").entries.values())
    for extra in ({}, {"dry_run": True}):
        with pytest.raises(ValueError, match="--rounds must be >= 1"):
            cmd_autotune.autotune(_args(tmp_path, rounds=0, **extra), api, fake_bench(api), WORKLOAD, H100, VERS,
                                  out=io.StringIO())


def test_a_failed_later_round_keeps_the_earlier_rounds(tmp_path):
    """A candidate's failure is skipped inside a round; this is a round failing whole (here its compile pool)."""
    api, clock = Valley(), FakeClock()
    calls = []

    def compile_fn(jobs, workers, deadline_s):
        calls.append(len(jobs))
        if len(calls) > 1:
            raise RuntimeError("A process in the process pool was terminated abruptly")
        return {}

    out = io.StringIO()
    args = _args(tmp_path, rounds=4, buckets=64, jobs=2)
    assert cmd_autotune.autotune(args, api, fake_bench(api, clock), WORKLOAD, H100, VERS, clock=clock, out=out,
                                 compile_fn=compile_fn) == 0
    text = out.getvalue()
    assert len(calls) == 2 and "round 2 failed (RuntimeError: A process" in text
    assert "keeping the results of rounds 1-1" in text and "round 3" not in text
    entries = store.load(tmp_path / "h100.yaml").entries.values()
    assert len(entries) == 4 and all(e.config != Valley.TARGET for e in entries)


def test_every_chosen_config_is_timed_with_and_without_its_launch_flags():
    """The in-kernel split sum is a twin of each chosen config, not a family with a budget of its own: the
    config that wins must be timed both ways (H200 session 13: the tuned split-8 mma gemv without it left the
    output transform 31 us of re-reading partials at 28672x8192 M = 2)."""
    from qtip_triton.autotune.kernel_api import load_kernel_api
    from qtip_triton.kernels.configs import config_space, default_config

    api = load_kernel_api()
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    for (m, n), M in (((28672, 8192), 2), ((8192, 8192), 1), ((4096, 4096), 16), ((8192, 8192), 64)):
        got = candidates(api, spec, m, n, M, 6)
        keys = {(k, config_key(c)) for k, c in got}
        assert len(keys) == len(got), "a config listed twice"
        for kind, c in got:
            base = {k: v for k, v in c.items() if k != "split_sum"}
            twin = {**base, "split_sum": True}
            space = {config_key(s) for s in config_space(kind, spec, m, n, M)}
            assert config_key(c) in space
            assert (kind, config_key(base)) in keys
            assert (config_key(twin) in space) == (base.get("SPLIT_K", 1) > 1)
            if config_key(twin) in space:
                assert (kind, config_key(twin)) in keys, (m, n, M, kind, c)
        home = api.default_kind(spec, m, n, M)
        assert got[[k for k, _ in got].index(home)][1] == default_config(home, spec, m, n, M)
    # the fake package has no launch flags: its candidates are the pruned configs, one each
    fake = FakeAPI()
    assert all("split_sum" not in c for _, c in candidates(fake, SPECS[0], 64, 96, 16, 6))


def test_extra_candidates_join_the_first_round():
    """A kernel package's ``extra_candidates`` (e.g. the wgmma kind's by occupancy, several knobs from the default)
    are timed in the first round beside the budgeted neighbours; ones outside the space, wasteful or already chosen
    are dropped; a package without the hook changes nothing."""
    spec = SPECS[0]
    api = FakeAPI()
    plain = candidates(api, spec, 64, 96, 64, 3)
    far = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8}  # 2 knobs from the default
    default = api.default_config("gemm", spec, 64, 96, 64)
    offered = [far, default, {"BLOCK_M": 64, "BLOCK_N": 48, "BLOCK_K": 32, "num_warps": 4},  # not in the space
               {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}]  # 128-row blocks at M = 64: wasteful
    assert config_key(far) not in {config_key(c) for _, c in plain}
    api.extra_candidates = lambda kind, *a: offered if kind == "gemm" else []
    got = candidates(api, spec, 64, 96, 64, 3)
    assert got == plain + [("gemm", far)]
    # and the tuner times it (and takes it when it is the fastest)
    fast = FakeAPI(fast=[far])
    fast.extra_candidates = api.extra_candidates
    report = tune(make_tasks([spec], [(64, 96)], [64]), fast, fake_bench(fast), WORKLOAD, max_candidates=3,
                  progress=False)
    assert [(r.kind, dict(r.config)) for r in report.results] == [("gemm", far)]


def _seed_file(api, entries: dict) -> store.TuneFile:
    """A tune file from another GPU holding ``entries``: {(spec, out, in, bucket): (kind, config)}."""
    h200 = DeviceInfo("NVIDIA H200", (9, 0), 132)
    return store.TuneFile(store.Header(h200, VERS), {
        store.EntryKey(s, o, i, b): store.Entry(store.EntryKey(s, o, i, b), k, c, 10.0) for (s, o, i, b), (k, c)
        in entries.items()})


def test_seeded_plan_times_the_seed_winners_near_each_task():
    """``--seed``: a task the seed file covers times the default and the seed's winners of its bucket and the
    neighbouring ones (only configs this GPU's space lists); a task it lacks keeps the full pruned space."""
    api, spec = FakeAPI(), SPECS[0]
    g = [c for c in api.config_space("gemv", spec, 64, 96, 1) if c != api.default_config("gemv", spec, 64, 96, 1)]
    foreign = {**g[0], "BLOCK_N": 48}  # not in this space: dropped
    seed = _seed_file(api, {(spec.name, 64, 96, 1): ("gemv", g[0]), (spec.name, 64, 96, 2): ("gemv", g[1]),
                            (spec.name, 64, 96, 4): ("gemv", g[2]), (spec.name, 64, 96, 8): ("gemv", foreign),
                            (spec.name, 64, 96, 32): ("gemm", api.config_space("gemm", spec, 64, 96, 32)[3])})
    tasks = make_tasks([spec], [(64, 96), (96, 64)], [1, 2, 4, 16, 32, 256])
    by_task = {(t.out_features, t.m_bucket): (cands, d) for t, cands, d in plan(tasks, api, 4, seed.entries)}
    key = lambda kc: (kc[0], config_key(kc[1]))  # noqa: E731
    cands, default = by_task[(64, 1)]
    assert list(map(key, cands)) == [key(default), ("gemv", config_key(g[0])), ("gemv", config_key(g[1]))]
    cands, default = by_task[(64, 2)]  # own bucket first, then 1 and 4
    assert list(map(key, cands)) == [key(default)] + [("gemv", config_key(c)) for c in (g[1], g[0], g[2])]
    cands, _ = by_task[(64, 4)]  # bucket 8's foreign config is not timed
    assert [config_key(c) for _, c in cands[1:]] == [config_key(g[2]), config_key(g[1])]
    cands, _ = by_task[(64, 16)]  # bucket 32's gemm winner is the 16-row task's neighbour
    assert key(cands[1]) == key(("gemm", api.config_space("gemm", spec, 64, 96, 32)[3])) and len(cands) == 2
    for b in (256,):  # nothing seeded near: the full space, as without a seed
        assert by_task[(64, b)][0] == plan(make_tasks([spec], [(64, 96)], [b]), api, 4)[0][1]
    for b in (1, 2, 4, 16, 32, 256):  # another shape: unseeded
        assert by_task[(96, b)][0] == plan(make_tasks([spec], [(96, 64)], [b]), api, 4)[0][1]


def test_seeded_autotune_command(tmp_path):
    """The command with ``--seed``: fewer timings, the winner among the seeded candidates, a clear error for a
    seed file that cannot be read."""
    api, spec = FakeAPI(seed=5), SPECS[0]
    fast = api.config_space("gemv", spec, 64, 96, 1)[-1]
    seed_path = tmp_path / "h200.yaml"
    seed_path.write_text(store.dumps(_seed_file(api, {(spec.name, 64, 96, 1): ("gemv", fast)})))
    fast_api = FakeAPI(seed=5, fast=[fast])
    out = io.StringIO()
    args = _args(tmp_path, seed=seed_path, rounds=1)  # the seeded round alone (later rounds climb from it)
    assert cmd_autotune.autotune(args, fast_api, fake_bench(fast_api), WORKLOAD, H100, VERS, out=out) == 0
    assert "seeded from" in out.getvalue() and "NVIDIA H200" in out.getvalue()
    tf = store.load(tmp_path / "h100.yaml")
    assert tf.header.device == H100  # the new file is this GPU's, whatever measured the seed
    assert tf.entries[store.EntryKey(spec.name, 64, 96, 1)].config == fast
    seeded = [r for r in fast_api.log if (r[1], r[2], r[3], r[5]) == (spec.name, 64, 96, 1)]
    assert {r[4] for r in seeded} == {config_key(api.default_config("gemv", spec, 64, 96, 1)), config_key(fast)}
    (tmp_path / "bad.yaml").write_text("format: something-else\n")
    for bad in (tmp_path / "bad.yaml", tmp_path / "missing.yaml"):
        with pytest.raises(ValueError, match="--seed"):
            cmd_autotune.autotune(_args(tmp_path, seed=bad), api, fake_bench(api), WORKLOAD, H100, VERS,
                                  out=io.StringIO())


def test_kinds_plan_times_the_default_and_only_those_kinds():
    """``--kinds gemm``: at a bucket where gemv is the heuristic's kind, the plan times the default first (the
    reference every candidate is checked and measured against) and then gemm alone, with the main kind's budget
    even where gemm is out of reach; a seed's winners of other kinds are not timed."""
    api, spec = FakeAPI(), SPECS[0]
    tasks = make_tasks([spec], [(64, 96)], [1, 16, 256])
    key = lambda kc: (kc[0], config_key(kc[1]))  # noqa: E731
    for _t, cands, default in plan(tasks, api, 4, kinds=frozenset({"gemm"})):
        assert key(cands[0]) == key(default)
        rest = cands[1:]
        assert rest and {k for k, _ in rest} == {"gemm"}
        assert len({key(c) for c in cands}) == len(cands) >= 4
    full = {t.m_bucket: cands for t, cands, _ in plan(tasks, api, 4)}
    assert {k for k, _ in full[1]} == {"gemv"}  # gemm is out of reach at one row without --kinds
    gv = [c for c in api.config_space("gemv", spec, 64, 96, 1) if c != api.default_config("gemv", spec, 64, 96, 1)]
    seed = _seed_file(api, {(spec.name, 64, 96, 1): ("gemv", gv[0])})
    seeded = plan(tasks[:1], api, 4, seed.entries, kinds=frozenset({"gemm"}))[0][1]
    assert ("gemv", config_key(gv[0])) not in set(map(key, seeded)) and {k for k, _ in seeded[1:]} == {"gemm"}


def test_kinds_command_merges_by_time_and_refuses_bad_use(tmp_path):
    """The command with ``--kinds``: entries merge by time with those already in the file (a kind left out keeps a
    faster entry); an unknown kind, an empty list, or ``--replace`` with it is a clear error before any timing."""
    api = FakeAPI(seed=3)
    assert cmd_autotune.autotune(_args(tmp_path), api, fake_bench(api), WORKLOAD, H100, VERS, out=io.StringIO()) == 0
    before = store.load(tmp_path / "h100.yaml").entries
    api2 = FakeAPI(seed=4)
    out = io.StringIO()
    assert cmd_autotune.autotune(_args(tmp_path, kinds="gemm"), api2, fake_bench(api2), WORKLOAD, H100, VERS,
                                 out=out) == 0
    timed = {r[0] for r in api2.log}
    defaults = {api2.default_kind(None, 0, 0, b) for b in (1, 16, 256)}
    assert timed <= {"gemm"} | defaults
    after = store.load(tmp_path / "h100.yaml").entries
    assert after.keys() == before.keys()
    for k, e in after.items():
        assert e.time_us <= before[k].time_us
    for bad, why in (({"kinds": "gemm,mystery"}, "unknown kind"), ({"kinds": ","}, "selects no kind"),
                     ({"kinds": "gemm", "replace": True}, "--replace")):
        api3 = FakeAPI()
        with pytest.raises(ValueError, match=why):
            cmd_autotune.autotune(_args(tmp_path, **bad), api3, fake_bench(api3), WORKLOAD, H100, VERS,
                                  out=io.StringIO())
        assert not api3.log


def test_autotune_command_names_the_configs_that_failed_to_compile(tmp_path):
    api, clock = FakeAPI(seed=3), FakeClock()

    def compile_fn(jobs, workers, deadline_s):
        return {job: f"OutOfResources: shared memory {i}" for i, job in enumerate(jobs[:7])}

    out = io.StringIO()
    assert cmd_autotune.autotune(_args(tmp_path, jobs=4, max_minutes=2, rounds=1), api, fake_bench(api, clock, 0.0),
                                 WORKLOAD, H100, VERS, clock=clock, out=out, compile_fn=compile_fn) == 0
    text = out.getvalue()
    assert "(7 failed to compile)" in text
    failed = [line for line in text.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == 5 and "OutOfResources: shared memory 0" in failed[0]
    assert "  ... and 2 more" in text


def test_the_command_writes_every_timing_and_names_the_candidates_that_failed(tmp_path):
    """``--timings``: per task, each candidate's fastest time (fastest first, the winner at the top), its failures
    and the default; the summary counts the failures by reason. What the tune file alone cannot say."""
    import json

    spec = SPECS[0]
    probe = FakeAPI()
    default = probe.default_config("gemm", spec, 64, 96, 64)
    (_, cands, _), = plan(make_tasks([spec], [(64, 96)], [64]), probe, 3)
    wrong, broken = [c for k, c in cands if k == "gemm" and c != default][:2]
    api = FakeAPI(seed=5, wrong=[wrong], broken=[broken])
    out, path = io.StringIO(), tmp_path / "deep" / "timings.json"
    args = _args(tmp_path, rounds=2, buckets=64, shapes="64x96", bits="2", timings=path)
    assert cmd_autotune.autotune(args, api, fake_bench(api), WORKLOAD, H100, VERS, out=out) == 0
    doc = json.loads(path.read_text())
    (task,) = doc["tasks"]
    entry = next(iter(store.load(tmp_path / "h100.yaml").entries.values()))
    assert (task["out_features"], task["in_features"], task["m_bucket"]) == (64, 96, 64)
    times = [t["time_us"] for t in task["timed"]]
    assert times == sorted(times) and len(times) >= 3
    assert task["timed"][0]["config"] == entry.config == task["winner"]["config"]
    assert task["default"]["time_us"] == pytest.approx(api.cost("gemm", default, spec.name, 64, 96, 64))
    reasons = {f["reason"].split(":")[0] for f in task["failures"]}
    assert reasons == {"ValueError", "CompilationError"}  # the wrong result and the broken config
    assert wrong not in [t["config"] for t in task["timed"]]
    text = out.getvalue()
    assert "2 candidates failed when timed: " in text and "wrong result" in text
    assert f"wrote every timing to {path}" in text
