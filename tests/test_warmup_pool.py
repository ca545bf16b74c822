"""The parallel compile before the load-time warm-up (:mod:`qtip_triton.autotune.warmup_pool`), on CPU.

Planning runs the real registry against the fake kernel package (``test_autotune_fakes``); the pool
itself is replaced by a recording runner, except in the driver tests, which start the real
``python -m qtip_triton.autotune.warmup_pool`` driver (fake kernels, CPU) — once from a daemonic
process, the situation inside vLLM's EngineCore, where ``multiprocessing`` children are refused.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from test_autotune_fakes import BROKEN_FOR_POOL, FakeAPI
from test_registry import H100, SPEC, VERS
from test_weight import random_qweight

from qtip_triton import registry as reg
from qtip_triton.autotune import warmup_pool as wp
from qtip_triton.autotune.compile_pool import dedupe, default_workers, make_job
from qtip_triton.autotune.lookup import ConfigStore
from qtip_triton.spec import TrellisSpec

TESTS = Path(__file__).resolve().parent
REAL_WORKER_ENV = wp.worker_env
MAX_M = 64


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """A clean process memory, 'CUDA' shards (the pool is CUDA only) and a driver environment without a GPU."""
    wp.reset()
    monkeypatch.setattr(wp, "_on_cuda", lambda device: True)
    monkeypatch.setattr(wp, "worker_env", lambda device, cache_dir, base=None: {"CACHE": str(cache_dir)})
    monkeypatch.setattr("qtip_triton.autotune.triton_cache.triton_cache_dir", lambda: tmp_path / "triton")
    monkeypatch.delenv(wp.JOBS_ENV, raising=False)
    yield
    wp.reset()


def registry(tmp_path, api=None):
    return reg.Registry(api or FakeAPI(), device=H100, store=ConfigStore(H100, VERS, tmp_path / "u", tmp_path / "s"))


class Runner:
    """Stands for the driver: records each request and answers with ``errors``."""

    def __init__(self, errors=None, exc=None):
        self.requests, self.errors, self.exc = [], errors or {}, exc

    def __call__(self, request, env, timeout_s):
        self.requests.append((request, env, timeout_s))
        if self.exc is not None:
            raise self.exc
        return {"errors": self.errors, "complete": True}


def qkv(gen, n=96):
    return [random_qweight(gen, SPEC, 64, n), random_qweight(gen, SPEC, 32, n), random_qweight(gen, SPEC, 32, n)]


# ------------------------------------------------------------------------------ env var
@pytest.mark.parametrize("text, workers", [(None, None), ("", None), ("  ", None), ("1", 1), ("0", 0), ("6", 6),
                                           ("-3", 0)])
def test_worker_count_from_env(text, workers):
    env = {} if text is None else {wp.JOBS_ENV: text}
    assert wp.warmup_workers(env) == (default_workers() if workers is None else workers, None)


def test_bad_worker_count_uses_the_default_and_says_so():
    n, problem = wp.warmup_workers({wp.JOBS_ENV: "many"})
    assert n == default_workers() and wp.JOBS_ENV in problem and "'many'" in problem


def test_timeout_from_env():
    assert wp.pool_timeout({}) == wp.DEFAULT_TIMEOUT_S
    assert wp.pool_timeout({wp.TIMEOUT_ENV: "90"}) == 90.0
    assert wp.pool_timeout({wp.TIMEOUT_ENV: "soon"}) == wp.pool_timeout({wp.TIMEOUT_ENV: "-1"}) == wp.DEFAULT_TIMEOUT_S


# ------------------------------------------------------------------------------ planning
def test_a_layer_plans_exactly_what_prepare_launches(tmp_path, gen):
    r = registry(tmp_path)
    shards = qkv(gen)
    plan = wp.plan_layer(r, shards, torch.float16, bias=False, max_m=MAX_M)
    want = dedupe([make_job(q.spec, q.out_features, q.in_features, rows, sel.kind, dict(sel.config))
                   for q in shards for _, sel, rows in r.launches(r.plan(q.spec, q.out_features, q.in_features, MAX_M))],
                  per_shape=True)
    (group,) = plan.groups  # one geometry, one bias flag
    assert group.jobs == want and plan.variants == len(want) and not group.bias
    assert plan.layers == 2  # k and v have the same spec and shape: planned once
    assert {(j.out_features, j.in_features) for j in group.jobs} == {(64, 96), (32, 96)}
    assert group.workload == wp.ShardWorkload("cuda", torch.float16, "qtip", 0, 1, 0, torch.float32, torch.float32,
                                              torch.float16)
    # what prepare() already warmed in this process is not compiled again
    for q in shards[:2]:
        r.prepare(q, max_m=MAX_M, dtypes=(torch.float16,))
    assert wp.plan_layer(r, shards, torch.float16, bias=False, max_m=MAX_M).groups == []
    # ... but another dtype or the bias variant is a binary of its own
    assert wp.plan_layer(r, shards, torch.bfloat16, bias=False, max_m=MAX_M).variants == len(want)
    assert wp.plan_layer(r, shards, torch.float16, bias=True, max_m=MAX_M).variants == len(want)


def test_shard_workload_copies_the_geometry(gen):
    q = random_qweight(gen, SPEC, 64, 96, rcp=1, tp_rank=2)
    wl = wp.ShardWorkload.like(q, torch.bfloat16, device="cpu")
    layer = wl.layer(SPEC, 64, 96)
    assert (layer.rcp, layer.tp_rank, layer.had_block, layer.layout) == (q.rcp, q.tp_rank, q.had_block, q.layout)
    assert (layer.SU.dtype, layer.SV.dtype, layer.table.dtype) == (q.SU.dtype, q.SV.dtype, q.table.dtype)
    assert wl.inputs(layer, 3).dtype == torch.bfloat16 and wl.inputs(layer, 3).shape == (3, 96)


# ------------------------------------------------------------------------------ orchestration
def test_compiled_once_per_distinct_layer(tmp_path, gen):
    r, run = registry(tmp_path), Runner()
    first = wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=r, workers=4, runner=run)
    (request, env, timeout), = run.requests
    assert request["workers"] == 4 and env == {"CACHE": str(tmp_path / "triton")}
    assert timeout == wp.DEFAULT_TIMEOUT_S + wp.STARTUP_SLACK_S
    assert first.compiled == sum(len(g.jobs) for g in request["groups"]) > 0 and first.failed == 0
    # the 31 later layers: same specs and shapes, new tensors -> nothing to compile, no pool started
    for _ in range(3):
        assert wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=r, workers=4,
                                runner=run) == wp.Result()
    assert len(run.requests) == 1
    # a layer of another shape (o_proj) is new
    other = wp.compile_ahead([random_qweight(gen, SPEC, 96, 64)], torch.float16, bias=False, max_m=MAX_M, reg=r,
                             workers=4, runner=run)
    assert other.compiled > 0 and len(run.requests) == 2
    # a larger max M only adds variants not sent yet: here buckets 128 and 256 reuse bucket 64's gemm config
    # at the same row classes, so there is nothing new to compile
    bigger = wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=256, reg=r, workers=4, runner=run)
    assert bigger == wp.Result() and len(run.requests) == 2


def test_a_models_layers_compile_in_one_pool_run(tmp_path, gen):
    """Several layers in one request: the union of what each would compile alone, each variant once, one driver;
    afterwards each layer counts as done (its op only if it planned op jobs)."""
    from qtip_triton.autotune.compile_pool import OP_KIND

    r = registry(tmp_path)
    layers = [qkv(gen), [random_qweight(gen, SPEC, 96, 64)], qkv(gen, n=64)]
    alone = []
    for shards, rows in zip(layers, [(1, 5), (), ()], strict=True):
        wp.reset()
        plan = wp.plan_layer(r, shards, torch.float16, bias=False, max_m=MAX_M, op_rows=rows)
        alone += [(g.workload, g.bias, j) for g in plan.groups for j in g.jobs]
    wp.reset()
    run = Runner()
    requests = [wp.LayerRequest(tuple(layers[0]), torch.float16, False, MAX_M, (1, 5)),
                wp.LayerRequest(tuple(layers[1]), torch.float16, False, MAX_M),
                wp.LayerRequest(tuple(layers[2]), torch.float16, False, MAX_M)]
    result = wp.compile_ahead_many(requests, reg=r, workers=4, runner=run)
    (request, _, _), = run.requests
    sent = [(g.workload, g.bias, j) for g in request["groups"] for j in g.jobs]
    assert len(sent) == len(set(sent)) == result.compiled
    assert set(sent) == set(alone) and sum(1 for *_, j in sent if j.kind == OP_KIND) == 2
    # nothing is left for any of them, the same geometry with new tensors included
    for shards in (qkv(gen), [random_qweight(gen, SPEC, 96, 64)], qkv(gen, n=64)):
        assert wp.compile_ahead(shards, torch.float16, bias=False, max_m=MAX_M, reg=r, workers=4,
                                runner=run) == wp.Result()
    # the third layer planned no op jobs: asked for them now, it still gets them
    late = wp.plan_layer(r, qkv(gen, n=64), torch.float16, bias=False, max_m=MAX_M, op_rows=(1,))
    assert [j.kind for g in late.groups for j in g.jobs] == [OP_KIND]
    assert len(run.requests) == 1


def test_serial_when_one_worker_or_not_cuda(tmp_path, gen, monkeypatch):
    r, run = registry(tmp_path), Runner()
    for workers in (0, 1):
        assert wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=r, workers=workers,
                                runner=run) is None
    monkeypatch.setenv(wp.JOBS_ENV, "1")  # the env var reaches it when no count is passed
    assert wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=r, runner=run) is None
    monkeypatch.setattr(wp, "_on_cuda", lambda device: False)
    assert wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=r, workers=8, runner=run) is None
    assert run.requests == []
    no_kernels = reg.Registry(None, device=None)  # the reference path compiles nothing
    monkeypatch.setattr(wp, "_on_cuda", lambda device: True)
    assert wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=no_kernels, workers=8,
                            runner=run) is None


def test_a_failing_pool_is_reported_once_then_skipped(tmp_path, gen):
    r, run = registry(tmp_path), Runner(exc=wp.PoolUnavailable("daemonic processes are not allowed to have children"))
    with pytest.raises(wp.PoolUnavailable, match="daemonic"):
        wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=r, workers=4, runner=run)
    # later layers (even new shapes) go straight to the serial path: no second attempt, no second error
    assert wp.compile_ahead([random_qweight(gen, SPEC, 96, 64)], torch.float16, bias=False, max_m=MAX_M, reg=r,
                            workers=4, runner=run) is None
    assert len(run.requests) == 1
    wp.reset()
    crash = Runner(exc=OSError("fork failed"))
    with pytest.raises(wp.PoolUnavailable, match="OSError: fork failed"):
        wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=r, workers=4, runner=crash)


def test_failed_variants_are_counted_and_leave_no_marker(tmp_path, gen, monkeypatch):
    monkeypatch.setattr(wp, "_machine", lambda device: ("H100", (9, 0)))
    r = registry(tmp_path)
    plan = wp.plan_layer(r, qkv(gen), torch.float16, bias=False, max_m=MAX_M)
    bad = plan.groups[0].jobs[0]
    res = wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=r, workers=4,
                           runner=Runner(errors={bad: "CompilationError: out of resources"}))
    assert res.failed == 1 and res.compiled == plan.variants - 1
    assert not (tmp_path / "triton" / wp.MARKER_DIR).exists()


def test_marker_lets_the_next_process_skip_the_pool(tmp_path, gen, monkeypatch):
    monkeypatch.setattr(wp, "_machine", lambda device: ("H100", (9, 0)))
    run = Runner()
    first = wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=registry(tmp_path), workers=4,
                             runner=run)
    assert len(list((tmp_path / "triton" / wp.MARKER_DIR).iterdir())) == 1
    wp.reset()  # a new process, same disk cache
    again = wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=registry(tmp_path), workers=4,
                             runner=run)
    assert again == wp.Result(cached=first.compiled) and len(run.requests) == 1
    # another GPU / Triton / kernel source is another marker: compiled again
    wp.reset()
    monkeypatch.setattr(wp, "_machine", lambda device: ("H200", (9, 0)))
    wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=registry(tmp_path), workers=4, runner=run)
    assert len(run.requests) == 2
    # so is another launch switch of ours (another PDL mode compiles other variants)
    wp.reset()
    monkeypatch.setenv("QTIP_TRITON_PDL", "exit")
    wp.compile_ahead(qkv(gen), torch.float16, bias=False, max_m=MAX_M, reg=registry(tmp_path), workers=4, runner=run)
    assert len(run.requests) == 3


def test_bias_api_adds_a_zero_bias(gen):
    api = wp.BiasKernelAPI(FakeAPI())
    q = random_qweight(gen, SPEC, 64, 96)
    layer = api.prepare(q)
    x = torch.randn(2, 96, generator=gen)
    torch.testing.assert_close(api.launch("gemv", x, layer, {"BLOCK_N": 32, "SPLIT_K": 1, "num_warps": 4}),
                               FakeAPI().launch("gemv", x, layer, {"BLOCK_N": 32, "SPLIT_K": 1, "num_warps": 4}))
    assert api.kinds() == ("gemv", "gemm")


def test_worker_env_keeps_the_parents_cache_and_gpu():
    env = REAL_WORKER_ENV(torch.device("cuda", 1), Path("/cache/triton"),
                        base={"CUDA_VISIBLE_DEVICES": "4,5", "TRITON_INTERPRET": "1", "PYTHONPATH": "/x", "HOME": "/h"})
    assert env["TRITON_CACHE_DIR"] == "/cache/triton" and env["CUDA_VISIBLE_DEVICES"] == "5" and env["HOME"] == "/h"
    assert "TRITON_INTERPRET" not in env
    root = str(Path(wp.__file__).resolve().parents[2])
    assert env["PYTHONPATH"] == os.pathsep.join([root, "/x"])
    assert REAL_WORKER_ENV(torch.device("cuda", 2), Path("/c"), base={})["CUDA_VISIBLE_DEVICES"] == "2"


# ------------------------------------------------------------------------------ the real driver (fake kernels, CPU)
def _request(gen, bias):
    r = reg.Registry(FakeAPI(), device=H100, store=None)
    plan = wp.plan_layer(r, qkv(gen), torch.float32, bias=bias, max_m=16)
    for g in plan.groups:
        g.workload = wp.ShardWorkload("cpu", torch.float32, g.workload.layout)
        g.jobs.append(make_job(SPEC, 64, 96, 1, "gemv", BROKEN_FOR_POOL))
    return {"groups": plan.groups, "workers": 2, "deadline_s": 300, "api_factory": "test_autotune_fakes:broken_api"}


def _driver_env():
    root = str(Path(wp.__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(TESTS)]))


def _in_daemon(request, queue):
    """Body of a daemonic process (like vLLM's EngineCore): multiprocessing children are refused, the driver is not."""
    try:
        mp.get_context("spawn").Process(target=print).start()
        refused = None
    except AssertionError as e:
        refused = str(e)
    try:
        queue.put((refused, wp.run_driver(request, _driver_env(), 300)))
    except Exception as e:  # report, so the test fails with the reason
        queue.put((refused, e))


@pytest.mark.slow
def test_driver_compiles_in_worker_processes_from_a_daemon(gen):
    request = _request(gen, bias=True)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_in_daemon, args=(request, queue), daemon=True)
    p.start()
    refused, out = queue.get(timeout=300)
    p.join(timeout=30)
    assert refused and "daemonic" in refused
    assert isinstance(out, dict), out
    assert out["complete"] and set(out["errors"]) == {make_job(SPEC, 64, 96, 1, "gemv", BROKEN_FOR_POOL)}


@pytest.mark.parametrize("sizes, workers, shares", [([30], 14, [14]), ([3], 14, [3]), ([21, 7], 8, [6, 2]),
                                                    ([1, 1], 14, [1, 1]), ([3, 40, 2], 4, [1, 2, 1]),
                                                    ([5, 5, 5], 2, [1, 1, 1])])
def test_groups_share_the_workers_by_their_jobs(sizes, workers, shares):
    assert wp.share_workers(sizes, workers) == shares


@pytest.mark.slow
def test_driver_runs_a_bias_and_a_plain_group_side_by_side(gen):
    """Two groups in one driver run, each with its own API: only the bias group gets a zero bias on every launch
    (the API here refuses launches without one), and both groups' jobs were run."""
    r = reg.Registry(FakeAPI(), device=H100, store=None)
    groups = []
    for shards, bias in ((qkv(gen), False), ([random_qweight(gen, SPEC, 96, 96)], True)):
        for g in wp.plan_layer(r, shards, torch.float32, bias=bias, max_m=16).groups:
            groups.append(wp.Group(wp.ShardWorkload("cpu", torch.float32, g.workload.layout), g.bias, g.jobs))
    assert [g.bias for g in groups] == [False, True] and all(len(g.jobs) > 1 for g in groups)
    request = {"groups": groups, "workers": 4, "deadline_s": 300, "api_factory": "test_autotune_fakes:bias_required_api"}
    out = wp.run_driver(request, _driver_env(), 300)
    assert out["complete"] and set(out["errors"]) == set(groups[0].jobs)  # the plain group's, all of them
    assert all("without a bias" in e for e in out["errors"].values())


def test_driver_failure_raises_pool_unavailable(gen, tmp_path):
    request = _request(gen, bias=False)
    request["api_factory"] = "no_such_module_here:api"  # workers die importing it; the driver exits non-zero
    request["workers"] = 1
    with pytest.raises(wp.PoolUnavailable, match="exited with"):
        wp.run_driver(request, _driver_env(), 300)


# ------------------------------------------------------------------------------ a fused layer's op
def test_a_fused_layer_plans_its_op_at_the_given_rows(tmp_path, gen):
    """With ``op_rows``, a fused layer (shards of one spec) adds one op job per row count, in the no-bias group (the
    op adds a fused layer's bias after it); a single shard or mixed specs add none; once sent, never again."""
    from qtip_triton.autotune.compile_pool import OP_KIND, variant_key

    r, run = registry(tmp_path), Runner()
    shards = qkv(gen)
    plain = wp.plan_layer(r, shards, torch.float16, bias=False, max_m=MAX_M)
    plan = wp.plan_layer(r, shards, torch.float16, bias=False, max_m=MAX_M, op_rows=[1, 5, 16])
    (group,) = plan.groups
    ops = [j for j in group.jobs if j.kind == OP_KIND]
    assert [(j.M, j.shards, j.in_features, j.out_features) for j in ops] == [(M, (64, 32, 32), 96, 128)
                                                                         for M in (1, 5, 16)]
    assert [j for j in group.jobs if j.kind != OP_KIND] == plain.groups[0].jobs
    assert len({variant_key(j) for j in ops}) == 3  # one compiled-variant key each: dedupe keeps them all
    assert not any(j.shards for g in wp.plan_layer(r, shards, torch.float16, bias=True, max_m=MAX_M,
                                                   op_rows=[1]).groups if g.bias for j in g.jobs)
    assert not any(j.shards for g in wp.plan_layer(r, shards[:1], torch.float16, bias=False, max_m=MAX_M,
                                                   op_rows=[1]).groups for j in g.jobs)
    other = random_qweight(gen, TrellisSpec(16, 3, 2, "hyb", 9), 32, 96)
    assert not any(j.shards for g in wp.plan_layer(r, shards[:2] + [other], torch.float16, bias=False,
                                                   max_m=MAX_M, op_rows=[1]).groups for j in g.jobs)
    wp.compile_ahead(shards, torch.float16, bias=False, max_m=MAX_M, reg=r, workers=4, runner=run, op_rows=[1, 5, 16])
    (request, _, _), = run.requests
    assert sum(1 for g in request["groups"] for j in g.jobs if j.shards) == 3
    assert wp.plan_layer(r, qkv(gen), torch.float16, bias=False, max_m=MAX_M, op_rows=[1, 5, 16]).groups == []


def test_an_op_job_runs_the_fused_op_on_random_shards(gen, monkeypatch):
    """A worker runs an op job as the serving process would: random shards of the job's shapes and the warm-up's
    geometry, packed and registered once, the op at M rows in the activation dtype; a failing one is reported."""
    from qtip_triton import ops
    from qtip_triton.autotune.compile_pool import op_job, run_jobs

    calls = []
    real = ops.qtip_linear

    def spy(x, packed, bias=None):
        calls.append((tuple(x.shape), x.dtype, packed.out_features, id(packed)))
        return real(x, packed, bias)

    monkeypatch.setattr(ops, "qtip_linear", spy)
    q = random_qweight(gen, SPEC, 64, 96)
    wl = wp.ShardWorkload.like(q, torch.float16, device="cpu")
    jobs = [op_job(SPEC, (64, 32, 32), 96, M) for M in (1, 5)]
    assert run_jobs(jobs, None, wl) == {}
    assert [c[:3] for c in calls] == [((1, 96), torch.float16, (64, 32, 32)), ((5, 96), torch.float16, (64, 32, 32))]
    assert calls[0][3] == calls[1][3]  # one packed layer for both rows
    bad = op_job(SPEC, (64, 32, 32), 100, 1)  # 100 columns: not a shape the shards can take
    (err,) = run_jobs([bad], None, wl).values()
    assert err
