"""``qtip-triton precompile [--gpu h100] [--file autotune_configs/h100.yaml] [--jobs 8]``

Compiles every (kind, config) of a tuned file, for every row-count variant serving can hit, into
Triton's on-disk cache, so a fresh process loads binaries instead of compiling. Stored configs are
checked against the kernels' config space first; invalid ones are listed and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qtip_triton.autotune.buckets import warm_rows
from qtip_triton.autotune.compile_pool import CompileJob, compile_all, default_workers, make_job
from qtip_triton.autotune.device import check_gpu_name, current_device, current_versions
from qtip_triton.autotune.kernel_api import KernelAPI, KernelsUnavailable, load_kernel_api
from qtip_triton.autotune.lookup import ConfigStore
from qtip_triton.autotune.space import check_config
from qtip_triton.autotune.store import StoreError, TuneFile, load
from qtip_triton.spec import TrellisSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", default=None, help="check that this GPU (e.g. h100) is the one present")
    p.add_argument("--file", type=Path, action="append", default=None,
                   help="tuned file(s) to compile (default: every file the registry would use on this GPU)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default min(8, cores/2))")
    p.add_argument("--dtypes", default="float16", help="activation dtypes to compile for, e.g. float16,bfloat16")
    p.add_argument("--no-progress", action="store_true")


def jobs_for(files: list[TuneFile], api: KernelAPI) -> tuple[list[CompileJob], list[str]]:
    """Compile jobs for every valid entry (all row classes of its bucket) and the reasons others were skipped."""
    jobs, skipped = [], []
    for tf in files:
        for entry in tf.entries.values():
            k = entry.key
            spec = TrellisSpec.parse(k.spec)
            ok, why = check_config(api, entry.kind, entry.config, spec, k.out_features, k.in_features, k.m_bucket)
            if not ok:
                skipped.append(f"{k}: {why}")
                continue
            jobs += [make_job(spec, k.out_features, k.in_features, rows, entry.kind, dict(entry.config))
                     for rows in warm_rows(k.m_bucket)]
    return jobs, skipped


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
            files = [load(f) for f in args.file]
        else:
            files = [tf for _, tf in ConfigStore(device, current_versions()).sources]
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
    jobs, skipped = jobs_for(files, api)
    for why in skipped:
        print(f"skipped {why}")
    errors = {}
    for dtype in dtypes:
        errors.update(compile_all(jobs, args.jobs or default_workers(), RandomWorkload("cuda", dtype),
                                  progress=not args.no_progress, per_shape=True))
    for job, why in errors.items():
        print(f"failed {job.kind} {dict(job.config)} for {job.spec} {job.out_features}x{job.in_features} M={job.M}: {why}")
    print(f"precompiled {len(jobs)} kernel variants x {len(dtypes)} dtypes into {triton_cache_dir()} "
          f"({len(errors)} failed, {len(skipped)} entries skipped)")
    return 1 if errors else 0
