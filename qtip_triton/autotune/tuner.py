"""The tuning loop: for each (spec, layer shape, M bucket), time the candidates and keep the fastest.

Everything that touches a GPU is injected: the kernel API (configs and launcher), the workload (random
layers and inputs) and the timer, so the loop itself runs on CPU in tests with a fake timer and a fake
clock. The production timer is ``triton.testing.do_bench`` (L2 flushed between runs, median).

Budget: candidates that failed to compile for a (kind, spec, config) are not retried on other
shapes; every candidate's output is checked against the default's (a fast wrong config must never
win); the loop stops at ``deadline_s`` and returns what it finished, listing what it skipped.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qtip_triton.autotune.kernel_api import Config, KernelAPI, config_key
from qtip_triton.autotune.space import candidates as space_candidates
from qtip_triton.autotune.space import knobs_apart, refine_candidates, seeded_candidates
from qtip_triton.autotune.store import Entry, EntryKey
from qtip_triton.spec import TrellisSpec

Bench = Callable[[Callable[[], Any]], float]  # runs fn repeatedly, returns microseconds
# runs fns[i] (the same launch on weight copy i) back to back, cycling, returns microseconds per call
RotatedBench = Callable[[list[Callable[[], Any]]], float]

# Exceptions that depend only on (kind, spec, config), not on the shape: never retry those.
_COMPILE_ERRORS = ("CompilationError", "OutOfResources", "PTXASError", "CompileTimeAssertionFailure")
CHECK_RTOL = 2e-2


def do_bench_timer(warmup_ms: float = 2.0, rep_ms: float = 6.0) -> Bench:
    """``triton.testing.do_bench``: flushes L2 before every run, returns the median in µs."""

    def bench(fn: Callable[[], Any]) -> float:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3

    return bench


def graph_flush_timer(warmup_ms: float = 2.0, rep_ms: float = 6.0) -> Bench:
    """``fn`` captured in a CUDA graph, then ``do_bench`` on the replay: L2 flushed before every run
    (cold weights, as in serving) and no Python launch overhead in the number. A layer's forward is
    a few kernels plus Python dispatch; timed uncaptured, the host is the bottleneck and every config
    of a small layer measures the same ~100-300 µs (run 5, 2026-11-28), so the tuner learns nothing."""

    def bench(fn: Callable[[], Any]) -> float:
        from triton.testing import do_bench

        graph = _captured(fn)
        try:
            return float(do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3
        finally:
            del graph

    return bench


def cuda_graph_timer(rep_ms: float = 6.0) -> Bench:
    """CUDA-graph replay (what serving does); no L2 flush, so weights small enough to stay cached look fast."""

    def bench(fn: Callable[[], Any]) -> float:
        from triton.testing import do_bench_cudagraph

        return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")) * 1e3

    return bench


def graph_rotated_timer(min_calls: int = 24, reps: int = 15) -> RotatedBench:
    """Back-to-back calls over weight copies (together >= 3 L2s) in one CUDA graph, no flush: each call reads its
    weights from DRAM and its input from the L2, as a layer of a served model does
    (:mod:`qtip_triton.autotune.rotation` says why this ranks configs closer to serving than the flush)."""

    def bench(fns: list[Callable[[], Any]]) -> float:
        from qtip_triton.autotune.rotation import time_rotated_us

        return time_rotated_us(fns, min_calls=min_calls, reps=reps)

    return bench


def _captured(fn: Callable[[], Any]):
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # allocator warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_single_timer() -> Bench:
    """One CUDA-graph replay between events (no flush): the screen that goes with :func:`graph_flush_timer`
    (an uncaptured single run would time the host, not the kernels)."""

    def bench(fn: Callable[[], Any]) -> float:
        import torch

        graph = _captured(fn)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) * 1e3

    return bench


def single_run_timer() -> Bench:
    """One run between CUDA events, no L2 flush: a cheap lower-bound-ish look used to screen out
    candidates that are clearly slower than the best so far before spending a full ``do_bench`` on them."""

    def bench(fn: Callable[[], Any]) -> float:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) * 1e3

    return bench


@dataclass(frozen=True)
class Task:
    spec: TrellisSpec
    out_features: int
    in_features: int
    m_bucket: int

    @property
    def key(self) -> EntryKey:
        return EntryKey(self.spec.name, self.out_features, self.in_features, self.m_bucket)


@dataclass
class TaskResult:
    task: Task
    kind: str | None = None
    config: Config | None = None
    time_us: float | None = None
    default_kind: str | None = None
    default_time_us: float | None = None
    tried: int = 0
    screened: int = 0
    failures: list[tuple[str, Config, str]] = field(default_factory=list)
    # every full timing of the task, all rounds: (kind, config, µs); where a later round starts a second climb
    timed: list[tuple[str, Config, float]] = field(default_factory=list)

    def fastest_timings(self) -> list[tuple[float, str, Config]]:
        """Each (kind, config) :attr:`timed` holds, once, at its fastest time: ``(µs, kind, config)``, fastest first
        (a winner is timed again each round, so one config may have several timings)."""
        best: dict[tuple, tuple[float, str, Config]] = {}
        for kind, cfg, t in self.timed:
            key = (kind, config_key(cfg))
            if key not in best or t < best[key][0]:
                best[key] = (t, kind, cfg)
        return sorted(best.values(), key=lambda v: v[0])

    def entry(self) -> Entry | None:
        if self.kind is None or self.time_us is None:
            return None
        return Entry(self.task.key, self.kind, dict(self.config), self.time_us, self.default_kind,
                     self.default_time_us)


@dataclass
class TuneReport:
    results: list[TaskResult]
    skipped: list[Task]
    elapsed_s: float

    def entries(self) -> list[Entry]:
        return [e for e in (r.entry() for r in self.results) if e is not None]


class Workload:
    """Makes the layer and inputs a task is timed on (see :mod:`qtip_triton.autotune.workload`)."""

    def layer(self, spec: TrellisSpec, out_features: int, in_features: int):
        """A QuantizedWeight of this spec and shape (the kernel API's ``prepare`` turns it into what it launches)."""
        raise NotImplementedError

    def inputs(self, layer, M: int):
        """M rows of activations for ``layer`` (the QuantizedWeight from :meth:`layer`)."""
        raise NotImplementedError

    def weight_bytes(self, layer) -> int:
        """Bytes of ``layer``'s weights that a forward streams (what a rotation must cycle through)."""
        raise NotImplementedError(f"{type(self).__name__} cannot say a layer's weight bytes (needed by a rotated timer)")

    def rel_error(self, out, ref) -> float:
        """‖out − ref‖ / ‖ref‖ (inf if anything is not finite)."""
        out, ref = out.float(), ref.float()
        if not bool(out.isfinite().all()):
            return math.inf
        return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class RandomWorkload(Workload):
    def __init__(self, device: str = "cuda", dtype=None, layout: str = "qtip") -> None:
        import torch

        self.device, self.dtype, self.layout = device, dtype or torch.float16, layout

    def layer(self, spec, out_features, in_features):
        from qtip_triton.autotune.workload import random_layer

        return random_layer(spec, out_features, in_features, layout=self.layout, device=self.device)

    def inputs(self, layer, M):
        from qtip_triton.autotune.workload import random_input

        return random_input(layer, M, self.dtype)

    def weight_bytes(self, layer) -> int:
        return int(layer.trellis.nbytes)


def default_choice(api: KernelAPI, spec, out_features: int, in_features: int, M: int) -> tuple[str, Config] | None:
    """The untuned heuristic: the kernel's ``default_kind`` (else the first kind that can run), default config."""
    kind = api.default_kind(spec, out_features, in_features, M)
    if kind is None or not api.can_implement(kind, spec, out_features, in_features, M)[0]:
        kind = next((k for k in api.kinds() if api.can_implement(k, spec, out_features, in_features, M)[0]), None)
    if kind is None:
        return None
    return kind, api.default_config(kind, spec, out_features, in_features, M)


def make_tasks(specs: Iterable[TrellisSpec], shapes: Iterable[tuple[int, int]], buckets: Iterable[int]) -> list[Task]:
    """Tasks grouped by layer (one random layer is built per spec and shape), buckets ascending."""
    buckets = sorted(set(buckets))
    return [Task(spec, o, i, b) for (o, i) in shapes for spec in specs for b in buckets]


Planned = list[tuple[Task, list[tuple[str, Config]], tuple[str, Config] | None]]


def plan(tasks: list[Task], api: KernelAPI, max_candidates: int, seed: Mapping[EntryKey, Entry] | None = None,
         allow_reduced_precision: bool = False, kinds: Collection[str] | None = None) -> Planned:
    """Each task with its candidates (default first) and its default choice; pure Python, no GPU.
    With ``seed`` (another tune file's entries), a task it covers times only the default and the seed's
    winners near it (:func:`~qtip_triton.autotune.space.seeded_candidates`). ``allow_reduced_precision``: also
    configs that trade accuracy for speed (the kernel package's ``REDUCED_PRECISION_KEYS``). ``kinds``: only
    configs of these kinds besides the default, which is always timed first (the reference the others' outputs
    are checked against and their speed-up measured by), whatever its kind."""
    out = []
    for t in tasks:
        default = default_choice(api, t.spec, t.out_features, t.in_features, t.m_bucket)
        cands = None
        if seed is not None:
            cands = seeded_candidates(api, t.spec, t.out_features, t.in_features, t.m_bucket, seed,
                                      allow_reduced_precision=allow_reduced_precision, only=kinds)
        if cands is None:
            cands = space_candidates(api, t.spec, t.out_features, t.in_features, t.m_bucket, max_candidates,
                                     allow_reduced_precision=allow_reduced_precision, only=kinds)
        if default is not None:
            dk = (default[0], config_key(default[1]))
            cands = [default] + [c for c in cands if (c[0], config_key(c[1])) != dk]
        out.append((t, cands, default))
    return out


Tried = dict[EntryKey, set[tuple]]  # per task: the (kind, config key) pairs a round has timed

# a later round also climbs from a task's best config outside its winner's neighbourhood when that is within this
# factor of the winner's time (see second_starts)
SECOND_START_WITHIN = 1.3


def tried_in(planned: Planned, tried: Tried | None = None) -> Tried:
    """``tried`` (a new dict by default) with every candidate of ``planned`` added, timed or not (a config that
    failed or was screened out is not worth another round either)."""
    tried = {} if tried is None else tried
    for task, cands, _ in planned:
        tried.setdefault(task.key, set()).update((k, config_key(c)) for k, c in cands)
    return tried


def second_starts(result: TaskResult, within: float = SECOND_START_WITHIN,
                  kinds: Collection[str] | None = None) -> list[tuple[str, Config]]:
    """The configs ``result`` timed outside its winner's neighbourhood (another kind, or two or more knobs
    changed) within ``within`` x the winner's time, fastest first; [] with ``within`` <= 1. A later round climbs
    from the first of them that has untried neighbours (:func:`refine_plan`).

    Why: a round climbs one knob at a time from the winner, so a basin the winner is not in is never explored,
    however close its floor. H100, 2026-12-07: at 256 tokens the 11008x4096 entry was one warpgroup, 2 stages, a
    16-copy table (70.5 µs decode): the first round's occupancy candidate, faster than the default (two warpgroups,
    4 stages, 32 copies, split 2). Two warpgroups, 4 stages, 16 copies, split 1 took 56.5 µs: one knob from two of
    the first round's configs, three from the winner, so no round timed it."""
    if within <= 1 or result.kind is None or result.config is None or result.time_us is None:
        return []
    return [(kind, dict(cfg)) for t, kind, cfg in result.fastest_timings()
            if (kinds is None or kind in kinds) and t <= within * result.time_us
            # the winner, or a neighbour its own climb covers
            and not (kind == result.kind and knobs_apart(cfg, result.config) <= 1)]


def refine_plan(report: TuneReport, planned: Planned, api: KernelAPI, max_candidates: int, tried: Tried,
                allow_reduced_precision: bool = False, kinds: Collection[str] | None = None,
                second_within: float = SECOND_START_WITHIN) -> Planned:
    """The next tuning round: each task's winner (timed again first: the reference its neighbours' outputs are
    checked against, and a same-round time to beat) and up to ``max_candidates`` of its untried neighbours
    (:func:`~qtip_triton.autotune.space.refine_candidates`), then as many around the first of its
    :func:`second_starts` that has any (``second_within``; 0: from the winner alone). Tasks without a winner, whose
    winner's kind is not in ``kinds``, or with no untried neighbour are left out: an empty plan ends the rounds.
    ``planned``: the first round's plan, whose default each task keeps (what its speed-up is measured against)."""
    defaults = {task.key: default for task, _, default in planned}
    out: Planned = []
    for res in report.results:
        t = res.task
        if res.kind is None or res.config is None or (kinds is not None and res.kind not in kinds):
            continue
        timed = tried.get(t.key, set())
        cands = _untried_neighbours(api, t, res.kind, dict(res.config), max_candidates, timed, allow_reduced_precision)
        for kind, center in second_starts(res, second_within, kinds):
            chosen = timed | {(k, config_key(c)) for k, c in cands}
            more = _untried_neighbours(api, t, kind, center, max_candidates, chosen, allow_reduced_precision)
            if more:
                cands += more
                break
        if cands:
            out.append((t, [(res.kind, dict(res.config))] + cands, defaults.get(t.key)))
    return out


def _untried_neighbours(api: KernelAPI, task: Task, kind: str, center: Config, limit: int, timed: Collection[tuple],
                        allow_reduced_precision: bool) -> list[tuple[str, Config]]:
    """``(kind, config)`` pairs of :func:`~qtip_triton.autotune.space.refine_candidates` around ``center``, none of
    them in ``timed`` (``(kind, config key)`` pairs)."""
    done = {key for k, key in timed if k == kind}
    fresh = refine_candidates(api, kind, center, task.spec, task.out_features, task.in_features, task.m_bucket, done,
                              limit, allow_reduced_precision)
    return [(kind, c) for c in fresh]


def merge_rounds(first: TuneReport, later: TuneReport) -> TuneReport:
    """``first`` with a later round's results folded in: per task the faster winner, the first round's default time
    (a later round does not time the default), counts and failures summed. Tasks a later round skipped for time
    keep their result; only the first round's skipped tasks are reported as skipped."""
    later_by_key = {r.task.key: r for r in later.results}
    merged = []
    for r in first.results:
        n = later_by_key.get(r.task.key)
        if n is None:
            merged.append(r)
            continue
        best = n if n.time_us is not None and (r.time_us is None or n.time_us < r.time_us) else r
        merged.append(TaskResult(r.task, best.kind, best.config, best.time_us, r.default_kind,
                                 r.default_time_us if r.default_time_us is not None else n.default_time_us,
                                 r.tried + n.tried, r.screened + n.screened, r.failures + n.failures,
                                 r.timed + n.timed))
    return TuneReport(merged, first.skipped, first.elapsed_s + later.elapsed_s)


def tune(
    tasks: list[Task],
    api: KernelAPI,
    bench: Bench,
    workload: Workload,
    *,
    max_candidates: int = 6,
    deadline_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    progress: bool = True,
    check: bool = True,
    quick: Bench | None = None,
    screen: float = 3.0,
    seed: Mapping[EntryKey, Entry] | None = None,
    planned: Planned | None = None,
    rotated: RotatedBench | None = None,
    copies: Callable[[int], int] | None = None,
    rows: Callable[[int], tuple[int, ...]] | None = None,
) -> TuneReport:
    """Time every task's candidates; returns results, the tasks skipped for time, and the elapsed time.

    With ``quick`` (e.g. :func:`single_run_timer`), a candidate whose single run is more than
    ``screen`` times the best median so far is dropped without a full measurement (the default
    config, timed first, is always measured in full). ``seed``: as for :func:`plan`. ``planned``: that plan,
    when the caller already made it (the command prints its size first), instead of planning again.
    ``rotated`` (e.g. :func:`graph_rotated_timer`): time each candidate with it instead of ``bench``, over
    ``copies(weight bytes)`` prepared copies of the layer (default: :func:`~qtip_triton.autotune.rotation.
    rotation_copies`), all fed the same input; the output check and the screen use the first copy.
    ``rows`` (e.g. :func:`~qtip_triton.autotune.buckets.interior_rows`): the row counts each task's candidates are
    timed at, its bucket first (default: the bucket alone); a candidate's time is the mean over them, so such times
    compare only with times taken the same way. The output check and the screen use the first count.
    """
    from tqdm.auto import tqdm

    start = clock()
    if planned is None:
        planned = plan(tasks, api, max_candidates, seed)
    broken: dict[tuple, str] = {}  # (kind, spec, config) -> compile error, shape-independent
    results: list[TaskResult] = []
    skipped: list[Task] = []
    layer_key, raw, layer, rotation = None, None, None, []
    if rotated is not None and copies is None:
        from qtip_triton.autotune.rotation import rotation_copies as copies
    bar = tqdm(total=sum(len(c) for _, c, _ in planned), unit="cfg", desc="autotune", disable=not progress)
    try:
        for task, cands, default in planned:
            if deadline_s is not None and clock() - start > deadline_s:
                skipped.append(task)
                bar.update(len(cands))
                continue
            lk = (task.spec, task.out_features, task.in_features)
            if lk != layer_key:
                # free the previous layer (and its copies) before building the next
                layer_key, raw, layer, rotation = lk, None, None, []
                raw, layer = prepared_layer(api, workload, lk)
                if rotated is not None:
                    n_copies = copies(workload.weight_bytes(raw))
                    rotation = [layer] + [prepared_layer(api, workload, lk)[1] for _ in range(n_copies - 1)]
            counts = rows(task.m_bucket) if rows is not None else (task.m_bucket,)
            if not counts or counts[0] != task.m_bucket:
                raise ValueError(f"rows({task.m_bucket}) must start with the bucket itself, got {counts!r}")
            xs = [workload.inputs(raw, m) for m in counts]
            x = xs[0]
            res = TaskResult(task, default_kind=default[0] if default else None)
            ref = None
            bar.set_postfix_str(f"{task.spec.name} {task.out_features}x{task.in_features} M={task.m_bucket}")
            for kind, cfg in cands:
                bar.update(1)
                if deadline_s is not None and clock() - start > deadline_s:
                    break
                bkey = (kind, task.spec.name, config_key(cfg))
                if bkey in broken:
                    res.failures.append((kind, cfg, broken[bkey]))
                    continue
                res.tried += 1

                def run(kind=kind, cfg=cfg, x=x, layer=layer):
                    return api.launch(kind, x, layer, cfg)

                try:
                    out = run()  # compiles; also the output to check
                    if check:
                        if ref is None:
                            ref = out
                        else:
                            err = workload.rel_error(out, ref)
                            if not err <= CHECK_RTOL:
                                raise ValueError(f"wrong result: rel. error {err:.3g} vs the first config run")
                    if quick is not None and screen > 0 and res.time_us is not None:
                        q_us = float(quick(run))
                        if q_us > screen * res.time_us:
                            res.screened += 1
                            continue
                    if rotated is not None:
                        t_us = math.fsum(float(rotated([functools.partial(run, x=xi, layer=copy) for copy in rotation]))
                                         for xi in xs) / len(xs)
                    else:
                        t_us = math.fsum(float(bench(functools.partial(run, x=xi))) for xi in xs) / len(xs)
                    if not math.isfinite(t_us) or t_us <= 0:
                        raise ValueError(f"timer returned {t_us!r}")
                except Exception as e:  # a candidate may fail in any way; skip it and say why
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if type(e).__name__ in _COMPILE_ERRORS:
                        broken[bkey] = reason
                    res.failures.append((kind, cfg, reason))
                    continue
                res.timed.append((kind, dict(cfg), t_us))
                if default is not None and kind == default[0] and config_key(cfg) == config_key(default[1]):
                    res.default_time_us = t_us
                if res.time_us is None or t_us < res.time_us:
                    res.kind, res.config, res.time_us = kind, cfg, t_us
            results.append(res)
    finally:
        bar.close()
    return TuneReport(results, skipped, clock() - start)


def prepared_layer(api: KernelAPI, workload: Workload, lk: tuple) -> tuple[Any, Any]:
    """``(QuantizedWeight, what the kernels launch with)`` for a (spec, out, in) layer key."""
    raw = workload.layer(*lk)
    prepared = api.prepare(raw)
    return raw, raw if prepared is None else prepared
