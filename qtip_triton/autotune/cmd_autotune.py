"""``qtip-triton autotune --gpu h100 [--shapes llama] [--bits 2,3,4] [--buckets 1-4096]``

Tunes the shipped shape set on the GPU present (it must be the one named), merges the winners into
``autotune_configs/<gpu>.yaml`` (in a source checkout; else the user cache) and prints tuned vs
default per M bucket. Budget for the whole Llama set on an H100: 10 minutes, enforced by
``--max-minutes`` (results so far are saved, the rest listed). ``--dry-run`` prints the plan and
its cost estimate on any machine, GPU or not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from qtip_triton.autotune.buckets import interior_rows, parse_buckets, row_class
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions, check_gpu_name, current_device, current_versions
from qtip_triton.autotune.kernel_api import KernelsUnavailable, config_key, load_kernel_api
from qtip_triton.autotune.lookup import shipped_dir, user_cache_dir
from qtip_triton.autotune.shapes import resolve as resolve_shapes
from qtip_triton.autotune.store import Header, StoreError, TuneFile, save_merged
from qtip_triton.autotune.store import load as load_tune_file
from qtip_triton.autotune.timings import failure_lines as timing_failure_lines
from qtip_triton.autotune.timings import timings_document
from qtip_triton.autotune.tuner import (
    SECOND_START_WITHIN,
    Planned,
    TuneReport,
    Workload,
    make_tasks,
    merge_rounds,
    plan,
    refine_plan,
    second_starts,
    tried_in,
    tune,
)
from qtip_triton.fileio import atomic_write_text
from qtip_triton.spec import TrellisSpec

# rough costs for the --dry-run estimate (H100, measured per kernel by the lead; adjust when known)
EST_COMPILE_S = 1.5
EST_BENCH_OVERHEAD_S = 0.01
COMPILE_SHARE = 0.5  # at most this share of --max-minutes goes to the parallel compile phase


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", required=True, help="GPU to tune (must be the one present), e.g. h100")
    p.add_argument("--shapes", nargs="+", default=["llama"],
                   help="shape sets (llama, llama2, llama3), models (llama2-7b, llama3-70b, ...) or OUTxIN")
    p.add_argument("--bits", default="2,3,4", help="K values for the released QTIP spec L16KkV2-hyb9 (default 2,3,4)")
    p.add_argument("--specs", nargs="+", default=None, help="explicit spec names instead of --bits, e.g. L16K2V1-1mad")
    p.add_argument("--buckets", default="1-4096", help="M buckets, e.g. 1-4096 or 1,16,256")
    p.add_argument("--max-minutes", type=float, default=9.5, help="stop tuning after this long and save (default 9.5)")
    p.add_argument("--max-candidates", type=int, default=6, help="configs timed per kernel kind and task (default 6)")
    p.add_argument("--rounds", type=int, default=3,
                   help="tuning rounds: after the first, each task times up to twice --max-candidates untried "
                        "neighbours (one knob changed, each knob both ways) of its winner, and as many of a second "
                        "start (--second-within), until no task has one left, the rounds are done or the time is up "
                        "(default 3; 1: the first round only)")
    p.add_argument("--second-within", type=float, default=SECOND_START_WITHIN,
                   help="rounds after the first also climb from each task's fastest config outside its winner's "
                        "neighbourhood (another kind, or two knobs or more away) when it is within this factor of "
                        f"the winner's time (default {SECOND_START_WITHIN}; 0: from the winner alone)")
    p.add_argument("--timings", type=Path, default=None, metavar="JSON",
                   help="also write every candidate's time and every failure, per task, to this JSON file (what the "
                        "tune file cannot say: whether a config was timed and lost, failed, or never tried)")
    p.add_argument("--warmup-ms", type=float, default=2.0, help="do_bench warmup per candidate (default 2)")
    p.add_argument("--rep-ms", type=float, default=6.0, help="do_bench repetition time per candidate (default 6)")
    p.add_argument("--timer", choices=("graph", "rotated", "do_bench", "cudagraph"), default="graph",
                   help="graph: CUDA-graph replay with L2 flushed before each run (default); rotated: back-to-back "
                        "calls over weight copies > 3x L2 in one graph, as layers run in a served model (its times are "
                        "lower than graph's: tune into a file of its own or with --replace); do_bench: "
                        "uncaptured calls (includes Python launch overhead); cudagraph: replay without flush")
    p.add_argument("--interior-rows", action="store_true",
                   help="also time each candidate of a bucket from 64 rows on at 5/8 of its rows (256 -> 160), where "
                        "a tensor-core kernel's last tile is part-filled as between the buckets' tops, and rank by "
                        "the mean of both times; those times are not the top's: tune into a file of its own (--out) "
                        "or with --replace")
    p.add_argument("--screen", type=float, default=3.0,
                   help="skip the full timing of a candidate whose single run is this many times slower than "
                        "the best so far (default 3; 0 times everything)")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes compiling candidates before timing (default min(8, cores/2); 1 = no pool)")
    p.add_argument("--out", type=Path, default=None,
                   help="file to merge results into (default autotune_configs/<gpu>.yaml in a source checkout, "
                        "else the user cache)")
    p.add_argument("--replace", action="store_true",
                   help="entries tuned now replace those in --out whatever their recorded times (default: the "
                        "faster entry stays; use this after a kernel change)")
    p.add_argument("--seed", type=Path, default=None,
                   help="another GPU's tune file (e.g. autotune_configs/h200.yaml): a task it covers times only "
                        "the default and that file's winners for its M bucket and the neighbouring ones, so a "
                        "first file for a new GPU takes minutes; tasks it lacks get the full space")
    p.add_argument("--fp16-accumulation", action="store_true",
                   help="also time configs that sum products in fp16 (the fp16x2 gemv at one batch row: 4-13%% faster "
                        "M = 1 forwards on the H100, relative error ~5e-4 of the output instead of ~2e-7); the "
                        "entries they win are served like any other")
    p.add_argument("--kinds", default=None,
                   help="time only these kernel kinds (comma-separated, e.g. wgmma) besides each task's default, "
                        "each with the full candidate budget and in reach at every bucket; the results merge by "
                        "time with the file's entries of other kinds (not with --replace). For adding a kind to a "
                        "tuned file in a fraction of a full tune")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate; tune nothing")
    p.add_argument("--no-check", action="store_true", help="skip comparing each candidate's output to the default's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_specs(args: argparse.Namespace) -> list[TrellisSpec]:
    if args.specs:
        return [TrellisSpec.parse(s) for s in args.specs]
    try:
        ks = sorted({int(k) for k in args.bits.split(",") if k.strip()})
    except ValueError:
        raise ValueError(f"--bits {args.bits!r}: expected a comma-separated list of ints, e.g. 2,3,4") from None
    if not ks:
        raise ValueError("--bits selects no K")
    return [TrellisSpec(16, k, 2, "hyb", 9) for k in ks]


def parse_kinds(args: argparse.Namespace, api) -> frozenset[str] | None:
    """``--kinds`` as a set of the kernel package's kinds; an unknown name, an empty list, or ``--replace`` with it
    (which would drop faster entries of the kinds left out, untimed) is an error before anything is timed."""
    raw = getattr(args, "kinds", None)
    if raw is None:
        return None
    kinds = frozenset(k.strip() for k in raw.split(",") if k.strip())
    if not kinds:
        raise ValueError("--kinds selects no kind")
    unknown = sorted(kinds - set(api.kinds()))
    if unknown:
        raise ValueError(f"--kinds: unknown kind(s) {', '.join(unknown)}; the kinds are {', '.join(api.kinds())}")
    if args.replace:
        raise ValueError("--kinds with --replace would replace entries of the kinds left out without timing them; "
                         "tune those kinds too, or merge by time (no --replace)")
    return kinds


def load_seed(path: Path, out) -> dict:
    """The entries of a ``--seed`` file (any GPU's: its configs are checked against this one's space, task by
    task); a file that cannot be read or parsed is an error here, not a silent full tune."""
    try:
        tf = load_tune_file(path)
    except (OSError, StoreError) as e:
        raise ValueError(f"--seed {path}: {e}") from None
    print(f"seeded from {path} ({tf.header.device.name}, {len(tf.entries)} entries)", file=out)
    return dict(tf.entries)


def default_out(device_short: str) -> Path:
    """The repo's ``autotune_configs/`` when running from a checkout (so results can be committed), else the user cache."""
    shipped = shipped_dir().resolve()
    if (shipped.parent / "pyproject.toml").is_file():
        return shipped / f"{device_short}.yaml"
    return user_cache_dir() / f"{device_short}.yaml"


def summarize(report: TuneReport, out=None) -> float | None:
    """Print tuned vs default per M bucket; returns the geometric-mean speed-up over all entries."""
    out = out or sys.stdout
    by_bucket: dict[int, list] = defaultdict(list)
    for r in report.results:
        by_bucket[r.task.m_bucket].append(r)
    print(f"\n{'M bucket':>9} {'tuned':>6} {'failed':>6} {'geomean default/tuned':>22} {'worst':>6}  kinds chosen", file=out)
    all_ratios = []
    for b in sorted(by_bucket):
        rs = by_bucket[b]
        ratios = [r.default_time_us / r.time_us for r in rs if r.time_us and r.default_time_us]
        all_ratios += ratios
        gm = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
        kinds = Counter(r.kind for r in rs if r.kind)
        failed = sum(1 for r in rs if r.kind is None)
        worst = min(ratios) if ratios else float("nan")
        print(f"{b:>9} {len(rs) - failed:>6} {failed:>6} {gm:>21.3f}x {worst:>5.2f}x  "
              + ", ".join(f"{k}:{n}" for k, n in kinds.most_common()), file=out)
    overall = math.exp(sum(map(math.log, all_ratios)) / len(all_ratios)) if all_ratios else None
    if overall is not None:
        print(f"overall geomean speed-up of tuned over default: {overall:.3f}x over {len(all_ratios)} entries", file=out)
    for line in timing_failure_lines(report.results):
        print(line, file=out)
    if report.skipped:
        print(f"time limit reached: {len(report.skipped)} tasks not tuned, e.g. "
              + ", ".join(str(t.key) for t in report.skipped[:3]), file=out)
    print(f"elapsed {report.elapsed_s:.1f} s", file=out)
    return overall


def autotune(args: argparse.Namespace, api, bench, workload: Workload, device: DeviceInfo | None,
             versions: SoftwareVersions, *, clock=time.monotonic, out=None, compile_fn=None, quick=None,
             rotated=None, copies=None) -> int:
    """The command with everything GPU-specific injected (tests pass fakes)."""
    out = out or sys.stdout
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    interior = getattr(args, "interior_rows", False)
    if interior and not (args.replace or args.out is not None):
        raise ValueError("--interior-rows times candidates as a mean over two row counts, which the file's entries "
                         "were not: give --out (a file of its own) or --replace")
    specs = parse_specs(args)
    shapes = resolve_shapes(args.shapes)
    buckets = parse_buckets(args.buckets)
    tasks = make_tasks(specs, shapes, buckets)
    kinds = parse_kinds(args, api)
    seed = load_seed(args.seed, out) if args.seed is not None else None
    planned = plan(tasks, api, args.max_candidates, seed,
                   allow_reduced_precision=getattr(args, "fp16_accumulation", False), kinds=kinds)
    n_cands = sum(len(c) * (len(interior_rows(t.m_bucket)) if interior else 1) for t, c, _ in planned)
    variants = compiled_variants(planned)
    per_cand = (args.warmup_ms + args.rep_ms) / 1e3 + EST_BENCH_OVERHEAD_S
    jobs = args.jobs if args.jobs is not None else _default_jobs()
    est = len(variants) * EST_COMPILE_S / max(jobs, 1) + n_cands * per_cand
    print(f"autotune plan: {len(specs)} specs x {len(shapes)} shapes x {len(buckets)} M buckets = {len(tasks)} tasks, "
          f"{n_cands} timings, {len(variants)} kernel variants to compile; estimated {est / 60:.1f} min with "
          f"{jobs} compile processes (limit {args.max_minutes} min)"
          + (f"; then up to {args.rounds - 1} rounds around the winners" if args.rounds > 1 else ""), file=out)
    empty = [t for t, c, _ in planned if not c]
    if empty:
        print(f"warning: {len(empty)} tasks have no candidate config, e.g. {empty[0].key}", file=out)
    if args.dry_run:
        return 0
    check_gpu_name(args.gpu, device)
    target = args.out or default_out(device.short)
    deadline = args.max_minutes * 60
    start = clock()

    def run_round(round_plan: Planned) -> TuneReport:
        left = deadline - (clock() - start)
        if compile_fn is not None and jobs > 1:
            from qtip_triton.autotune.compile_pool import make_job

            t0 = clock()
            compile_jobs = [make_job(t.spec, t.out_features, t.in_features, t.m_bucket, k, c)
                            for t, cands, _ in round_plan for k, c in cands]
            errors = compile_fn(compile_jobs, jobs, COMPILE_SHARE * left)
            print(f"compiled {len(compiled_variants(round_plan))} kernels in {clock() - t0:.0f} s with {jobs} processes "
                  f"({len(errors)} failed to compile)", file=out)
            for line in failure_lines(errors):
                print(line, file=out)
        return tune(tasks, api, bench, workload, max_candidates=args.max_candidates,
                    deadline_s=max(deadline - (clock() - start), 0.0), clock=clock, progress=not args.no_progress,
                    check=not args.no_check, quick=quick, screen=args.screen, planned=round_plan, rotated=rotated,
                    copies=copies, rows=interior_rows if interior else None)

    report = run_round(planned)
    tried = tried_in(planned)
    for n in range(2, args.rounds + 1):
        if clock() - start >= deadline:
            print(f"time limit reached before round {n}", file=out)
            break
        # twice the first round's budget: each knob of the winner one step both ways (2 and 4 stages around 3)
        within = getattr(args, "second_within", SECOND_START_WITHIN)
        nxt = refine_plan(report, planned, api, 2 * args.max_candidates, tried,
                          allow_reduced_precision=getattr(args, "fp16_accumulation", False), kinds=kinds,
                          second_within=within)
        if not nxt:
            print(f"round {n}: no task has an untried neighbour of its winner left", file=out)
            break
        before = {r.task.key: _winner(r) for r in report.results}
        seconds = sum(1 for r in report.results if second_starts(r, within, kinds))
        print(f"round {n}: {len(nxt)} tasks time {sum(len(c) - 1 for _, c, _ in nxt)} neighbours of their winners"
              + (f" ({seconds} also of a second start)" if seconds else ""), file=out)
        try:
            later = run_round(nxt)
        except Exception as exc:  # noqa: BLE001 - the earlier rounds' timings are worth saving whatever broke
            # a later round only refines: its failure (a driver error, a kernel that faults) must not cost the
            # minutes of GPU time the earlier rounds already spent
            print(f"round {n} failed ({type(exc).__name__}: {exc}); keeping the results of rounds 1-{n - 1}",
                  file=out)
            break
        report = merge_rounds(report, later)
        tried = tried_in(nxt, tried)
        moved = sum(1 for r in report.results if _winner(r) != before.get(r.task.key))
        print(f"round {n}: {moved} tasks found a faster config", file=out)
    if getattr(args, "timings", None) is not None:
        args.timings.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.timings, json.dumps(timings_document(report, device.name), indent=1) + "\n")
        print(f"wrote every timing to {args.timings}", file=out)
    entries = report.entries()
    if entries:
        merged = save_merged(target, TuneFile(Header(device, versions), {e.key: e for e in entries}),
                             replace=args.replace)
        print(f"wrote {len(entries)} entries to {target} ({len(merged.entries)} in the file)", file=out)
    else:
        print("no entry was tuned; nothing written", file=out)
    summarize(report, out)
    return 0 if entries else 1


def _winner(result) -> tuple:
    """A task result's chosen kind and config, comparable across rounds (whether a round moved it)."""
    return result.kind, config_key(result.config or {})


def compiled_variants(planned: Planned) -> set[tuple]:
    """The kernels a plan's candidates compile: one per kind, spec, config and row-count class."""
    return {(k, t.spec.name, config_key(c), row_class(t.m_bucket)) for t, cands, _ in planned for k, c in cands}


def failure_lines(errors: dict, shown: int = 5) -> list[str]:
    """The compile failures by name: a count alone hides whether a whole family (every config of one kind) is
    out of the search, which would skew what the file ships."""
    lines = [f"  failed: {job.kind} {job.spec} {job.out_features}x{job.in_features} M={job.M} "
             f"{dict(job.config)}: {err}" for job, err in list(errors.items())[:shown]]
    if len(errors) > shown:
        lines.append(f"  ... and {len(errors) - shown} more")
    return lines


def _default_jobs() -> int:
    from qtip_triton.autotune.compile_pool import default_workers

    return default_workers()


def run(args: argparse.Namespace) -> int:
    try:
        api = load_kernel_api()
    except KernelsUnavailable as e:
        print(f"qtip-triton autotune: {e}", file=sys.stderr)
        return 2
    from qtip_triton.autotune.compile_pool import compile_all
    from qtip_triton.autotune.tuner import (
        RandomWorkload,
        cuda_graph_timer,
        do_bench_timer,
        graph_flush_timer,
        graph_rotated_timer,
        graph_single_timer,
        single_run_timer,
    )

    device = current_device()
    if not args.dry_run:
        try:
            check_gpu_name(args.gpu, device)
        except (ValueError, RuntimeError) as e:
            print(f"qtip-triton autotune: {e}", file=sys.stderr)
            return 2
    bench = {"graph": lambda: graph_flush_timer(args.warmup_ms, args.rep_ms),
             "rotated": lambda: graph_flush_timer(args.warmup_ms, args.rep_ms),  # not called: rotated= times all
             "do_bench": lambda: do_bench_timer(args.warmup_ms, args.rep_ms),
             "cudagraph": lambda: cuda_graph_timer(args.rep_ms)}[args.timer]()
    workload = RandomWorkload("cuda")

    def compile_fn(jobs, workers, deadline_s):
        return compile_all(jobs, workers, workload, progress=not args.no_progress, deadline_s=deadline_s,
                           per_shape=True)

    try:
        return autotune(args, api, bench, workload, device, current_versions(), compile_fn=compile_fn,
                        quick=graph_single_timer() if args.timer in ("graph", "rotated") else single_run_timer(),
                        rotated=graph_rotated_timer() if args.timer == "rotated" else None)
    except ValueError as e:
        print(f"qtip-triton autotune: {e}", file=sys.stderr)
        return 2
