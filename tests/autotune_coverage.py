"""What ``qtip-triton precompile`` compiles vs what ``Registry.prepare`` launches (no tests here).

Shared by the GPU test ``test_autotune_gpu.py::test_precompiled_fresh_process_does_not_jit`` and its
CPU twin in ``test_autotune_coverage.py``: a fresh process with an imported cache compiles nothing
only if every kernel variant prepare() launches was precompiled. A variant is what Triton compiles
separately for one layer: (kind, spec, config, row class of M, shape).

prepare(max_m) looks up *every* bucket up to max_m; a bucket missing from the tuned file borrows a
neighbour's config at row counts the neighbour's precompile never launched (bucket 2 runs bucket 1's
config at M=2, a row class bucket 1 never sees): that is the JIT the GPU test used to hit. Tuning
exactly the buckets prepare() looks up closes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qtip_triton.autotune.buckets import M_BUCKETS, bucket_for, row_class, warm_rows
from qtip_triton.autotune.cmd_precompile import jobs_for
from qtip_triton.autotune.kernel_api import config_key
from qtip_triton.autotune.store import TuneFile

Variant = tuple[str, str, tuple, str, tuple[int, int]]


def buckets_upto(max_m: int) -> tuple[int, ...]:
    """The M buckets ``prepare(max_m=...)`` selects and warms."""
    return tuple(b for b in M_BUCKETS if b <= bucket_for(max_m))


def prepare_variants(spec: str, shape: tuple[int, int], plan: Mapping[int, tuple[str, Mapping[str, Any]]]) -> set[Variant]:
    """Variants prepare() launches for one layer, from its plan ``{bucket: (kind, config)}``."""
    return {(kind, spec, config_key(config), row_class(rows), tuple(shape))
            for bucket, (kind, config) in plan.items() if kind != "reference" for rows in warm_rows(bucket)}


def precompile_variants(files: Iterable[TuneFile], api) -> set[Variant]:
    """Variants ``qtip-triton precompile --file ...`` compiles for these files (what it launches)."""
    jobs, _ = jobs_for(list(files), api)
    return {(j.kind, j.spec, j.config, row_class(j.M), (j.out_features, j.in_features)) for j in jobs}


def file_plan(tf: TuneFile, spec: str, shape: tuple[int, int]) -> dict[int, tuple[str, dict[str, Any]]]:
    """``{bucket: (kind, config)}`` of the file's own entries for one layer."""
    return {k.m_bucket: (e.kind, dict(e.config)) for k, e in tf.entries.items()
            if (k.spec, k.out_features, k.in_features) == (spec, *shape)}
