"""What ``qtip-triton precompile`` compiles vs what ``Registry.prepare`` launches (no tests here).

Shared by the GPU test ``test_autotune_gpu.py::test_precompiled_fresh_process_does_not_jit`` and its
CPU twin in ``test_autotune_coverage.py``: a fresh process with an imported cache compiles nothing
only if every kernel variant prepare() launches was precompiled. A variant is what Triton compiles
separately for one layer: (kind, spec, config, row class of M, shape).

prepare(max_m) looks up *every* bucket up to max_m; a bucket missing from the tuned file borrows a
neighbour's config at row counts the neighbour never sees (bucket 2 runs bucket 1's config at M=2, a
row class bucket 1 never sees). precompile asks the registry for the same plan (``Registry.plan`` /
``Registry.launches``), so it compiles those borrowed launches too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qtip_triton.autotune.buckets import buckets_upto, row_class, warm_rows
from qtip_triton.autotune.cmd_precompile import DEFAULT_MAX_M, jobs_for
from qtip_triton.autotune.kernel_api import config_key
from qtip_triton.autotune.store import TuneFile

Variant = tuple[str, str, tuple, str, tuple[int, int]]

__all__ = ["Variant", "buckets_upto", "file_plan", "job_variant", "precompile_variants", "prepare_variants"]


def prepare_variants(spec: str, shape: tuple[int, int], plan: Mapping[int, tuple[str, Mapping[str, Any]]]) -> set[Variant]:
    """Variants prepare() launches for one layer, from its plan ``{bucket: (kind, config)}``."""
    return {(kind, spec, config_key(config), row_class(rows), tuple(shape))
            for bucket, (kind, config) in plan.items() if kind != "reference" for rows in warm_rows(bucket)}


def job_variant(job) -> Variant:
    """The variant a compile job (or anything with the same fields) builds."""
    return job.kind, job.spec, job.config, row_class(job.M), (job.out_features, job.in_features)


def precompile_variants(files: Iterable[TuneFile], api, max_m: int = DEFAULT_MAX_M) -> set[Variant]:
    """Variants ``qtip-triton precompile --file ... --max-m max_m`` compiles for these files (what it launches)."""
    jobs, _ = jobs_for(list(files), api, max_m=max_m)
    return {job_variant(j) for j in jobs}


def file_plan(tf: TuneFile, spec: str, shape: tuple[int, int]) -> dict[int, tuple[str, dict[str, Any]]]:
    """``{bucket: (kind, config)}`` of the file's own entries for one layer."""
    return {k.m_bucket: (e.kind, dict(e.config)) for k, e in tf.entries.items()
            if (k.spec, k.out_features, k.in_features) == (spec, *shape)}
