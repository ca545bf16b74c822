"""Compile many kernels in parallel worker processes, filling Triton's on-disk binary cache.

Tuning ~all Llama shapes x K in 10 minutes is bound by compile time (each (kind, spec, config)
compiles once, ~1 s of ptxas/LLVM), not by timing. Worker processes compile disjoint jobs by
launching each once; the tuning process then finds every binary in the disk cache and only loads it.
``qtip-triton precompile`` uses the same pool to fill the cache from a tuned file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from qtip_triton.autotune.buckets import row_class
from qtip_triton.autotune.kernel_api import Config, config_key


@dataclass(frozen=True)
class CompileJob:
    """Launch ``kind`` with ``config`` once on a random ``out x in`` layer with ``M`` rows."""

    spec: str
    out_features: int
    in_features: int
    M: int
    kind: str
    config: tuple  # config_key(config): hashable and picklable
    variant: tuple = ()  # more that selects compiled variants at this M (PDL mode, transforms: Registry.launch_variant)
    # A fused layer's shards (their out_features; kind OP_KIND): the job runs the whole op (ops.qtip_linear) on random
    # shards of these shapes at M rows, which compiles what only its grouped launches reach: the grouped transforms
    # and the one-launch decode of all shards (the wgmma kind's SHARDS source). Per-shard jobs never launch those.
    shards: tuple[int, ...] = ()

    @property
    def layer_key(self) -> tuple[str, int, int]:
        return self.spec, self.out_features, self.in_features


OOM_ATTEMPTS = 5  # tries of a job that runs out of GPU memory (14 workers once held 5.7 GiB each at 57344 x 8192)
OOM_WAIT_S = 2.0  # the first wait after running out, growing and jittered on each retry so workers spread out
OP_KIND = "op"  # a CompileJob that runs a fused layer's whole op (``CompileJob.shards``)


def op_job(spec, shards: tuple[int, ...], in_features: int, M: int) -> CompileJob:
    """The job that runs a fused layer's op at ``M`` rows (one per distinct set of launches: the caller's rows)."""
    shards = tuple(int(o) for o in shards)
    return CompileJob(getattr(spec, "name", spec), sum(shards), in_features, M, OP_KIND, (), (M,), shards)


def variant_key(job: CompileJob) -> tuple:
    """What Triton compiles separately, shape aside: kernel kind, spec, config and the row-count class (and the
    job's ``variant``: a row count chosen for the transforms' own variants; an op job's shards)."""
    return (job.kind, job.spec, job.config, row_class(job.M)) + job.variant + job.shards


def dedupe(jobs: Iterable[CompileJob], per_shape: bool = False) -> list[CompileJob]:
    """One job per compiled variant: (kind, spec, config) plus the row-count class Triton specializes on.

    ``per_shape`` keeps one per layer shape too: integer arguments derived from the shape (k steps per
    split, ...) are specialized on ``== 1`` / divisibility by 16 as well, so only launching every shape
    guarantees that serving that shape finds its binary in the cache (``precompile`` does this).
    """
    seen, out = set(), []
    for j in jobs:
        key = variant_key(j) + ((j.out_features, j.in_features) if per_shape else ())
        if key not in seen:
            seen.add(key)
            out.append(j)
    return out


def make_job(spec, out_features: int, in_features: int, M: int, kind: str, config: Config,
             variant: tuple = ()) -> CompileJob:
    return CompileJob(getattr(spec, "name", spec), out_features, in_features, M, kind, config_key(config), variant)


def resolve(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (workers rebuild the API from a name, not a pickle)."""
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)


def run_jobs(jobs: list[CompileJob], api, workload, progress: Callable[[], None] | None = None,
             stop_at: float | None = None) -> dict[CompileJob, str]:
    """Compile ``jobs`` here, in this process (until ``time.monotonic() >= stop_at``); returns ``{job: error}``."""
    import time

    from qtip_triton.autotune.tuner import prepared_layer
    from qtip_triton.spec import TrellisSpec

    errors: dict[CompileJob, str] = {}
    layer_key, raw, layer = None, None, None
    ops_built: dict[tuple, Any] = {}

    def compile_one(job: CompileJob) -> None:
        nonlocal layer_key, raw, layer
        if job.shards:
            run_op_job(job, workload, ops_built)
            return
        if job.layer_key != layer_key:
            # the previous layer goes first, and the key is set only once the new one is built: a failed build
            # (out of memory) is retried by the next job of that layer, never launched as ``None``
            layer_key, raw, layer = None, None, None
            release_cached_memory()
            spec = TrellisSpec.parse(job.spec)
            raw, layer = prepared_layer(api, workload, (spec, job.out_features, job.in_features))
            layer_key = job.layer_key
        api.launch(job.kind, workload.inputs(raw, job.M), layer, dict(job.config))

    for job in sorted(jobs, key=lambda j: (j.layer_key, j.shards)):
        if stop_at is not None and time.monotonic() >= stop_at:
            break
        try:
            with_memory_retries(lambda job=job: compile_one(job))
        except Exception as e:  # a config that fails to compile is reported, not fatal
            errors[job] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            if progress is not None:
                progress()
    return errors


def release_cached_memory() -> None:
    """Hand the caching allocator's free blocks back to the driver: the pool's workers share one GPU, and blocks
    one keeps from a layer it is done with are memory another needs for the 57344 x 8192 layer it is building."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_memory_retries(fn: Callable[[], Any]) -> Any:
    """``fn()``, retried after a wait when the GPU is out of memory. Every worker of the pool builds the same large
    layer at about the same time (jobs run in layer order); a worker that waits finds the memory the others free
    when they move on, where failing would drop the config from the tuning."""
    import random
    import time

    import torch

    for attempt in range(OOM_ATTEMPTS):
        try:
            return fn()
        except torch.OutOfMemoryError:
            if attempt == OOM_ATTEMPTS - 1:
                raise
            release_cached_memory()
            time.sleep(OOM_WAIT_S * (1 + random.random()) * (attempt + 1))
    raise AssertionError("unreachable")


def run_op_job(job: CompileJob, workload, built: dict[tuple, Any]) -> None:
    """Run a fused layer's op once at ``job.M`` rows on random shards shaped as ``job.shards`` (``workload.layer``:
    the warm-up's geometry), built once per shard set in ``built``; the registry picks each launch as it will in
    the serving process (same configs, switches and device), so the binaries it compiles are the ones served."""
    import torch

    from qtip_triton import ops
    from qtip_triton.spec import TrellisSpec

    key = (job.spec, job.shards, job.in_features)
    packed = built.get(key)
    if packed is None:
        spec = TrellisSpec.parse(job.spec)
        qws = [workload.layer(spec, out, job.in_features) for out in job.shards]
        packed = built[key] = ops.PackedShards.from_qweights(qws, key=f"compile_pool.{job.spec}.{job.shards}")
        packed.register()
    x = torch.zeros(job.M, job.in_features, dtype=workload.dtype, device=packed.trellis.device)
    with torch.no_grad():
        ops.qtip_linear(x, packed)


def _worker(api_factory: str, workload, jobs: list[CompileJob], queue) -> None:
    api = resolve(api_factory)()
    errors = run_jobs(jobs, api, workload, progress=lambda: queue.put(("tick", None)))
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        queue.put(("done", errors))


def compile_all(jobs: list[CompileJob], workers: int, workload, *, api=None,
                api_factory: str = "qtip_triton.autotune.kernel_api:load_kernel_api",
                progress: bool = True, start_method: str = "spawn", per_shape: bool = False,
                deadline_s: float | None = None) -> dict[CompileJob, str]:
    """Compile every job, in ``workers`` processes (``workers <= 1``: here, with ``api``).

    Jobs are spread round-robin over the workers; each builds a random layer per shape it meets.
    Returns ``{job: error}``. Past ``deadline_s`` the workers are stopped: whatever they did not
    compile is compiled later, on first use.
    """
    import time

    from tqdm.auto import tqdm

    start = time.monotonic()
    jobs = dedupe(jobs, per_shape)
    bar = tqdm(total=len(jobs), unit="kernel", desc="compile", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            if api is None:
                api = resolve(api_factory)()
            return run_jobs(jobs, api, workload, progress=lambda: bar.update(1),
                            stop_at=None if deadline_s is None else start + deadline_s)
        # every shape of one variant goes to the same worker (the first launch compiles, the others
        # mostly hit Triton's in-memory cache); variants are dealt round-robin so workers finish together
        variants: dict[tuple, list[CompileJob]] = {}
        for j in jobs:
            variants.setdefault(variant_key(j), []).append(j)
        shards: list[list[CompileJob]] = [[] for _ in range(min(workers, len(variants)))]
        for i, group in enumerate(variants.values()):
            shards[i % len(shards)].extend(group)
        ctx = mp.get_context(start_method)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(api_factory, workload, shard, queue), daemon=True) for shard in shards]
        for p in procs:
            p.start()
        errors: dict[CompileJob, str] = {}
        done = 0
        while done < len(procs):
            wait = 600.0 if deadline_s is None else deadline_s - (time.monotonic() - start)
            if wait <= 0:
                break
            try:
                what, payload = queue.get(timeout=min(wait, 600.0))
            except Exception:  # nothing for a while: past the deadline, or workers died (killed, out of memory)
                if deadline_s is None or not any(p.is_alive() for p in procs):
                    break
                continue
            if what == "tick":
                bar.update(1)
            else:
                errors.update(payload)
                done += 1
        for p in procs:
            p.join(timeout=30 if done == len(procs) else 0)
            if p.is_alive():
                p.kill()
        return errors
    finally:
        bar.close()


def default_workers() -> int:
    """All cores but two (Triton compiles are single-threaded CPU work; the GPU idles meanwhile)."""
    return max(1, min(16, (os.cpu_count() or 2) - 2))
