"""``qtip-triton precompile [--gpu h100] [--file autotune_configs/h100.yaml] [--max-m 256] [--jobs 8]``

Fills Triton's on-disk cache with every kernel variant the registry will launch for the layers of a
tuned file, so a fresh process (a vLLM worker) loads binaries instead of compiling.

What is compiled is asked of the registry itself, with the file as its only source of entries: for
every (spec, layer shape) in the file and every M bucket up to ``--max-m``, the (kind, config) that
``Registry.prepare(max_m=...)`` would select there (the bucket's own entry, else the nearest usable
neighbour's, else the heuristic default), launched at that bucket's row counts
(``Registry.launches``). A bucket that borrows a neighbour's config runs it at row counts the
neighbour never sees (bucket 2 runs bucket 1's gemv at M=2), which Triton compiles as another binary:
those are compiled too. Entries the registry would reject (config not in the kernel's space, kernel
disabled or unable to run the layer) are listed as skipped; entries above ``--max-m`` are not used.

With several files (``--file`` repeated, or the default: every file the registry reads on this GPU)
each file is planned on its own and the union is compiled; that covers any lookup order of the same
files (the registry's, user cache first, included).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qtip_triton.autotune.buckets import MAX_BUCKET, bucket_for, buckets_upto
from qtip_triton.autotune.compile_pool import CompileJob, compile_all, dedupe, default_workers, make_job
from qtip_triton.autotune.device import DeviceInfo, check_gpu_name, current_device, current_versions
from qtip_triton.autotune.kernel_api import KernelAPI, KernelsUnavailable, load_kernel_api
from qtip_triton.autotune.lookup import ConfigStore
from qtip_triton.autotune.store import AutotuneWarning, StoreError, TuneFile, load
from qtip_triton.registry import HEURISTIC, REFERENCE, LayerGeometry, Registry, Request
from qtip_triton.spec import TrellisSpec

DEFAULT_MAX_M = 256  # the vLLM warm-up's default (qtip_triton.vllm.warmup.DEFAULT_MAX_M): decode batches


def parse_max_m(text: str) -> int:
    """``--max-m``: a row count >= 1 (above 4096 means every bucket), or ``all`` for every bucket (4096)."""
    if text.strip().lower() in ("all", "max"):
        return MAX_BUCKET
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a row count >= 1 or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a row count >= 1 or 'all', got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", default=None, help="check that this GPU (e.g. h100) is the one present")
    p.add_argument("--file", type=Path, action="append", default=None,
                   help="tuned file(s) to compile (default: every file the registry would use on this GPU)")
    p.add_argument("--max-m", type=parse_max_m, default=DEFAULT_MAX_M, metavar="M",
                   help=f"compile what serving launches for batches of up to M rows, like "
                        f"registry.prepare(max_m=M) (default {DEFAULT_MAX_M}, the vLLM warm-up default; use the "
                        f"engine's largest batch, or 'all' = {MAX_BUCKET} for every bucket)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default min(8, cores/2))")
    p.add_argument("--dtypes", default="float16", help="activation dtypes to compile for, e.g. float16,bfloat16")
    p.add_argument("--no-progress", action="store_true")


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PlannedLaunch:
    """One launch ``prepare()`` makes: a bucket's selection (``source`` says whose entry) at one row count."""

    file: str
    bucket: int
    source: str  # Selection.source: "<file label> (M<=B)" or "heuristic default"
    job: CompileJob

    @property
    def origin(self) -> str:
        return origin(self.source, self.bucket)


def origin(source: str, bucket: int) -> str:
    """Where a bucket's selection came from: ``own`` (the bucket's entry), ``borrowed`` (a neighbouring
    bucket's) or ``default`` (no usable entry: the heuristic)."""
    if source == HEURISTIC:
        return "default"
    return "own" if source.endswith(f"(M<={bucket})") else "borrowed"


@dataclass
class PrecompilePlan:
    max_m: int
    launches: list[PlannedLaunch] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # entries (or layers) the registry cannot use
    notes: list[str] = field(default_factory=list)  # the registry's warnings, entries above max_m
    selections: Counter = field(default_factory=Counter)  # (file, layer, bucket) decisions by origin
    layers: int = 0  # (file, layer) pairs planned

    @property
    def jobs(self) -> list[CompileJob]:
        """One job per launch, in plan order (the compile pool dedupes them into variants)."""
        return [launch.job for launch in self.launches]

    @property
    def variants(self) -> list[CompileJob]:
        """One job per kernel variant and layer shape: what is actually compiled."""
        return dedupe(self.jobs, per_shape=True)


def _labelled(files: Iterable[TuneFile | tuple[str, TuneFile]]) -> list[tuple[str, TuneFile]]:
    out = []
    for i, f in enumerate(files):
        out.append(f if isinstance(f, tuple) else (f"tuned file #{i + 1} ({f.header.device.short})", f))
    return out


def plan_precompile(files: Iterable[TuneFile | tuple[str, TuneFile]], api: KernelAPI, *, max_m: int = DEFAULT_MAX_M,
                    device: DeviceInfo | None = None, disabled: frozenset[str] | None = None) -> PrecompilePlan:
    """Every launch ``Registry.prepare(max_m=max_m)`` makes for the layers of each file, when that file is
    the registry's only source of entries.

    ``device``: the GPU the registry runs on (default: the one each file was tuned on); ``disabled``:
    kernels switched off (default: ``QTIP_TRITON_DISABLED_KERNELS``, as the registry reads it).
    """
    plan = PrecompilePlan(max_m)
    top = bucket_for(max_m)
    for label, tf in _labelled(files):
        store = ConfigStore.of_files(device or tf.header.device, tf.header.versions, [(label, tf)])
        reg = Registry(api, device=device or tf.header.device, store=store, disabled=disabled)
        for key, entry in sorted(tf.entries.items()):
            why = reg.rejection(entry, Request(TrellisSpec.parse(key.spec), key.out_features, key.in_features,
                                               key.m_bucket))
            if why is not None:
                plan.skipped.append(f"{key}: {why}")
        above = sorted({k.m_bucket for k in tf.entries if k.m_bucket > top})
        if above:
            n = sum(k.m_bucket > top for k in tf.entries)
            plan.notes.append(f"{label}: {n} entries for M buckets {', '.join(map(str, above))} are above --max-m "
                              f"{max_m} (bucket {top}) and not compiled")
        layers = sorted({(k.spec, k.out_features, k.in_features) for k in tf.entries})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AutotuneWarning)
            for spec_name, out_f, in_f in layers:
                spec = TrellisSpec.parse(spec_name)
                try:
                    layer_plan = reg.plan(spec, out_f, in_f, max_m)
                except ValueError as e:  # every kernel (reference included) disabled
                    plan.skipped.append(f"{spec_name} {out_f}x{in_f}: {e}")
                    continue
                plan.layers += 1
                for bucket, sel in layer_plan.items():
                    plan.selections[REFERENCE if sel.kind == REFERENCE else origin(sel.source, bucket)] += 1
                # the workers launch random QTIP-layout layers: whole-matrix transforms (one block each side)
                geometry = LayerGeometry(in_f, out_f)
                for bucket, sel, rows in reg.launches(layer_plan, geometry):
                    job = make_job(spec, out_f, in_f, rows, sel.kind, dict(sel.config),
                                   reg.launch_variant(sel, rows, geometry))
                    plan.launches.append(PlannedLaunch(label, bucket, sel.source, job))
        for w in caught:
            if issubclass(w.category, AutotuneWarning):
                plan.notes.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return plan


def jobs_for(files: list[TuneFile], api: KernelAPI, *, max_m: int = DEFAULT_MAX_M, device: DeviceInfo | None = None,
             disabled: frozenset[str] | None = None) -> tuple[list[CompileJob], list[str]]:
    """Compile jobs (one per launch ``prepare(max_m)`` makes, see :func:`plan_precompile`) and the reasons
    entries were skipped."""
    plan = plan_precompile(files, api, max_m=max_m, device=device, disabled=disabled)
    return plan.jobs, plan.skipped


def describe(plan: PrecompilePlan, n_files: int) -> str:
    """One line: how many layers and buckets were planned and where their configs came from."""
    sel = plan.selections
    parts = [f"{sel['own']} the bucket's own entry", f"{sel['borrowed']} borrowed from a neighbouring bucket",
             f"{sel['default']} heuristic default"]
    if sel["reference"]:
        parts.append(f"{sel['reference']} reference (nothing to compile)")
    return (f"plan: {plan.layers} layers of {n_files} file(s) x M buckets {', '.join(map(str, buckets_upto(plan.max_m)))} "
            f"(--max-m {plan.max_m}); selections: " + ", ".join(parts))


def run(args: argparse.Namespace) -> int:
    import torch

    from qtip_triton.autotune.triton_cache import triton_cache_dir
    from qtip_triton.autotune.tuner import RandomWorkload

    device = current_device()
    try:
        if args.gpu is not None:
            check_gpu_name(args.gpu, device)
        elif device is None:
            raise RuntimeError("no CUDA GPU is visible: precompile fills the cache for the GPU it runs on")
        api = load_kernel_api()
        if args.file:
            files = [(f"file {f}", load(f)) for f in args.file]
        else:
            files = list(ConfigStore(device, current_versions()).sources)
        dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
        if not all(isinstance(d, torch.dtype) for d in dtypes):
            raise ValueError(f"--dtypes {args.dtypes!r}: expected torch dtype names like float16,bfloat16")
    except (KernelsUnavailable, StoreError, ValueError, RuntimeError, OSError, AttributeError) as e:
        print(f"qtip-triton precompile: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"qtip-triton precompile: no tuned file applies to {device}; run `qtip-triton autotune` first",
              file=sys.stderr)
        return 2
    max_m = getattr(args, "max_m", DEFAULT_MAX_M)
    plan = plan_precompile(files, api, max_m=max_m, device=device)
    for why in plan.skipped:
        print(f"skipped {why}")
    for note in plan.notes:
        print(f"note: {note}")
    print(describe(plan, len(files)))
    jobs, variants = plan.jobs, plan.variants
    errors = {}
    for dtype in dtypes:
        errors.update(compile_all(jobs, args.jobs or default_workers(), RandomWorkload("cuda", dtype),
                                  progress=not args.no_progress, per_shape=True))
    for job, why in errors.items():
        print(f"failed {job.kind} {dict(job.config)} for {job.spec} {job.out_features}x{job.in_features} M={job.M}: {why}")
    print(f"precompiled {len(variants)} kernel variants x {len(dtypes)} dtypes into {triton_cache_dir()} "
          f"for M <= {max_m} ({len(errors)} failed, {len(plan.skipped)} entries skipped)")
    return 1 if errors else 0
