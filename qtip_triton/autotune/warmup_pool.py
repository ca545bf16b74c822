"""Compile a layer's kernel variants in parallel worker processes before the serial load-time warm-up.

Why: :meth:`qtip_triton.registry.Registry.prepare` selects, JIT-compiles and launches every variant a
layer uses for M up to the engine's largest batch, one after the other, in the process that loads the
model. On an H100, Llama-2-7B QTIP K=2 spent ~57 s of vLLM's engine start in that serial Triton JIT,
almost all of it on the first decoder layer (later layers have the same specs and shapes and hit the
cache). Compiling is single-threaded CPU work, so :func:`compile_ahead` hands the variants the
registry is about to launch to the same pool ``qtip-triton precompile`` uses
(:func:`~qtip_triton.autotune.compile_pool.compile_all`): its workers fill Triton's on-disk cache and
the serial ``prepare`` that follows only loads binaries and launches them.

How the pool is started, and why that way: vLLM builds the model inside its EngineCore process (or
its TP worker processes), which ``multiprocessing`` starts as *daemonic*, and a daemonic process may
not start ``multiprocessing`` children (nor use a ``ProcessPoolExecutor``). So the pool is run by a
*driver*: a fresh interpreter started with :mod:`subprocess` (``python -m
qtip_triton.autotune.warmup_pool REQUEST RESULT``), which ``multiprocessing`` knows nothing about;
the driver is an ordinary, non-daemonic main process and starts ``compile_all``'s spawn workers
itself. It gets the parent's environment, with ``TRITON_CACHE_DIR`` pinned to the directory the
parent reads (so binaries land where ``prepare`` looks), ``CUDA_VISIBLE_DEVICES`` narrowed to the
parent's GPU, and the parent's ``qtip_triton`` first on ``PYTHONPATH``. Whatever goes wrong there
(spawn refused, a crash, a timeout) raises :class:`PoolUnavailable`: the caller falls back to the
serial path, and later layers of this process do not try the pool again.

What is compiled: for each shard, ``Registry.plan`` / ``Registry.launches`` (the very list ``prepare``
follows), one job per (kind, config, row class, shape) in the layer's dtype and with its bias flag,
minus variants this process already warmed (the registry's ``_warm`` set) or already sent to the pool.
Workers launch each job on a random layer of the same spec, shape, layout, TP/Hadamard geometry and
tensor dtypes as the shard, so they compile the same binaries. When a set of jobs compiled without
error, a marker named by a hash of the jobs and of everything a binary depends on (GPU, Triton, torch,
kernel sources, ``TRITON_*`` settings) is written into Triton's cache directory; the next process that
finds it skips the pool (those binaries are on disk; a binary evicted since is compiled by ``prepare``
as before). Deleting the cache deletes the markers with it.

Several layers can go in one run (:func:`compile_ahead_many`: the vLLM warm-up sends a whole model's distinct
layers at once); their jobs merge into one group per workload and bias flag, and the driver runs the groups side by
side, the workers shared out by their jobs (:func:`share_workers`).

``QTIP_TRITON_WARMUP_JOBS``: worker processes (default :func:`compile_pool.default_workers`);
``1`` (or ``0``) keeps the old serial path. ``QTIP_TRITON_WARMUP_TIMEOUT``: seconds the pool may take
(default 600); what it did not compile by then, ``prepare`` compiles.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from qtip_triton.autotune.compile_pool import (
    CompileJob,
    compile_all,
    dedupe,
    default_workers,
    make_job,
    op_job,
    resolve,
    variant_key,
)
from qtip_triton.autotune.tuner import RandomWorkload
from qtip_triton.registry import LayerGeometry, warm_key

JOBS_ENV = "QTIP_TRITON_WARMUP_JOBS"
TIMEOUT_ENV = "QTIP_TRITON_WARMUP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
STARTUP_SLACK_S = 120.0  # on top of the pool's deadline: interpreter, torch and CUDA start-up
MARKER_DIR = "qtip_triton_warmup"
DEFAULT_API = "qtip_triton.autotune.kernel_api:load_kernel_api"
# set by the driver for its pool workers (spawned children inherit the driver's environment)
_WORKER_API_ENV = "_QTIP_TRITON_WARMUP_API"
_PLAIN_FACTORY = "qtip_triton.autotune.warmup_pool:worker_api"
_BIAS_FACTORY = "qtip_triton.autotune.warmup_pool:worker_api_with_bias"


class PoolUnavailable(RuntimeError):
    """The worker pool could not run (or did not finish): warm up serially instead."""


# ------------------------------------------------------------------------------------------ settings
def warmup_workers(env: dict[str, str] | None = None) -> tuple[int, str | None]:
    """``(workers, problem)`` from ``QTIP_TRITON_WARMUP_JOBS``: unset or empty -> the pool's default;
    an integer -> that many (``<= 1``: serial); anything else -> the default and a line saying so."""
    text = (os.environ if env is None else env).get(JOBS_ENV, "").strip()
    if not text:
        return default_workers(), None
    try:
        return max(0, int(text)), None
    except ValueError:
        n = default_workers()
        return n, f"{JOBS_ENV}={text!r} is not an integer; using {n} workers"


def pool_timeout(env: dict[str, str] | None = None) -> float:
    text = (os.environ if env is None else env).get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


# ------------------------------------------------------------------------------------------ what workers build
@dataclass(frozen=True)
class ShardWorkload(RandomWorkload):
    """A random layer shaped like one shard in every way Triton specializes on: spec and shape (the job),
    layout, TP/Hadamard geometry (``rcp``, ``tp_rank``, ``had_block``) and the dtypes of SU, SV and the
    table; activations in the warm-up dtype. Picklable: it travels to the pool's workers."""

    device: str = "cuda"
    dtype: Any = torch.float16
    layout: str = "qtip"
    rcp: int = 0
    tp_rank: int = 1
    had_block: int = 0
    su_dtype: Any = None
    sv_dtype: Any = None
    table_dtype: Any = None

    @classmethod
    def like(cls, qw, dtype: torch.dtype, device: str = "cuda") -> ShardWorkload:
        table = getattr(qw, "table", None)
        return cls(device, dtype, qw.layout, int(qw.rcp), int(qw.tp_rank), int(qw.had_block), qw.SU.dtype, qw.SV.dtype,
                   None if table is None else table.dtype)

    def layer(self, spec, out_features, in_features):
        from qtip_triton.autotune.workload import random_layer

        qw = random_layer(spec, out_features, in_features, layout=self.layout, device=self.device)
        changes: dict[str, Any] = {"rcp": self.rcp, "tp_rank": self.tp_rank, "had_block": self.had_block}
        if self.su_dtype is not None:
            changes["SU"] = qw.SU.to(self.su_dtype)
        if self.sv_dtype is not None:
            changes["SV"] = qw.SV.to(self.sv_dtype)
        if qw.table is not None and self.table_dtype is not None:
            changes["table"] = qw.table.to(self.table_dtype)
        return replace(qw, **changes)


class BiasKernelAPI:
    """The kernel API with a zero bias on every launch: a layer whose forward passes its bias runs the
    kernels' bias variant, a binary of its own (``Registry.prepare(bias=True)`` warms that one)."""

    def __init__(self, api) -> None:
        self._api = api
        self._out: dict[int, int] = {}  # id(prepared layer) -> out_features (a prepared form need not say)

    def __getattr__(self, name):
        return getattr(self._api, name)

    def prepare(self, qw):
        prepared = self._api.prepare(qw)
        prepared = qw if prepared is None else prepared
        self._out[id(prepared)] = qw.out_features
        return prepared

    def launch(self, kind, x, qw, config, bias=None):
        if bias is None:
            out_features = self._out.get(id(qw)) or qw.out_features
            bias = torch.zeros(out_features, device=x.device, dtype=x.dtype)
        return self._api.launch(kind, x, qw, config, bias)


def worker_api():
    """Factory the pool's workers resolve: the API named by the driver."""
    return resolve(os.environ.get(_WORKER_API_ENV) or DEFAULT_API)()


def worker_api_with_bias():
    """Factory the workers of a group with a bias resolve: the driver's API, with a zero bias on every launch."""
    return BiasKernelAPI(worker_api())


# ------------------------------------------------------------------------------------------ planning
@dataclass
class Group:
    """Jobs that share a workload (shard geometry, dtype) and a bias flag: one ``compile_all`` call."""

    workload: ShardWorkload
    bias: bool
    jobs: list[CompileJob] = field(default_factory=list)


@dataclass
class Plan:
    groups: list[Group]
    layers: int = 0  # shards newly planned (others were done before in this process)

    @property
    def variants(self) -> int:
        return sum(len(dedupe(g.jobs, per_shape=True)) for g in self.groups)


@dataclass
class Result:
    """What :func:`compile_ahead` did: ``compiled`` variants in ``workers`` processes in ``seconds``."""

    compiled: int = 0
    failed: int = 0
    workers: int = 0
    seconds: float = 0.0
    cached: int = 0  # variants skipped: a marker says a previous process compiled them into the disk cache
    complete: bool = True


# process-wide memory: layers already handled, variants already sent, and why the pool is off (if it is)
_layers_done: set[tuple] = set()
_submitted: set[tuple] = set()
_pool_off: str | None = None


def reset() -> None:
    """Forget what this process compiled ahead (tests; after changing the cache or the kernels)."""
    global _pool_off
    _layers_done.clear()
    _submitted.clear()
    _pool_off = None


def disable(reason: str) -> None:
    """Stop using the pool in this process (it failed once: later layers go straight to the serial path)."""
    global _pool_off
    _pool_off = reason


def _layer_key(qw, dtype, bias: bool, max_m: int, wl: ShardWorkload) -> tuple:
    return (qw.spec, qw.out_features, qw.in_features, dtype, bias, max_m, wl)


def _variant_key(job: CompileJob, wl: ShardWorkload, bias: bool) -> tuple:
    return (*variant_key(job), job.out_features, job.in_features, wl, bias)


def _op_key(shards: Sequence, dtype, max_m: int, wl: ShardWorkload) -> tuple:
    q0 = shards[0]
    return ("op", q0.spec, tuple(q.out_features for q in shards), q0.in_features, dtype, max_m, wl)


def plan_layer(reg, shards: Sequence, dtype: torch.dtype, *, bias: bool, max_m: int,
               op_rows: Sequence[int] = ()) -> Plan:
    """The compile jobs of a layer's shards that this process has neither warmed nor sent to the pool.

    Pure planning (``Registry.plan`` + ``Registry.launches``, the list ``prepare`` follows); it does not
    mark anything as done: :func:`compile_ahead` does once the pool has run. ``op_rows``: for a fused layer
    (several shards of one spec), the row counts at which the load-time warm-up runs its whole op
    (``vllm.warmup.op_warm_rows``): one op job each (``compile_pool.op_job``), for the grouped launches that
    per-shard jobs never reach (the wgmma kind's one-launch shard decode, grouped transforms).
    """
    groups: dict[tuple, Group] = {}
    seen: set[tuple] = set()
    layers = 0
    if len(shards) > 1 and op_rows and len({q.spec for q in shards}) == 1:
        wl = ShardWorkload.like(shards[0], dtype)
        if _op_key(shards, dtype, max_m, wl) not in _layers_done:
            for M in op_rows:
                job = op_job(shards[0].spec, tuple(q.out_features for q in shards), shards[0].in_features, M)
                if _variant_key(job, wl, False) not in _submitted:
                    groups.setdefault((wl, False), Group(wl, False)).jobs.append(job)
    for qw in shards:
        wl = ShardWorkload.like(qw, dtype)
        lkey = _layer_key(qw, dtype, bias, max_m, wl)
        if lkey in _layers_done or lkey in seen:
            continue
        seen.add(lkey)
        layers += 1
        plan = reg.plan(qw.spec, qw.out_features, qw.in_features, max_m)
        geometry = LayerGeometry.of(qw)
        for _bucket, sel, rows in reg.launches(plan, geometry):
            variant = reg.launch_variant(sel, rows, geometry)
            if warm_key(sel, qw, rows, variant, dtype, bias) in getattr(reg, "_warm", ()):
                continue
            job = make_job(qw.spec, qw.out_features, qw.in_features, rows, sel.kind, dict(sel.config), variant)
            if _variant_key(job, wl, bias) in _submitted:
                continue
            groups.setdefault((wl, bias), Group(wl, bias)).jobs.append(job)
    out = [Group(g.workload, g.bias, dedupe(g.jobs, per_shape=True)) for g in groups.values()]
    return Plan([g for g in out if g.jobs], layers)


def _mark_done(shards, dtype, bias: bool, max_m: int, plan: Plan) -> None:
    for qw in shards:
        _layers_done.add(_layer_key(qw, dtype, bias, max_m, ShardWorkload.like(qw, dtype)))
    if any(j.shards for g in plan.groups for j in g.jobs):
        _layers_done.add(_op_key(shards, dtype, max_m, ShardWorkload.like(shards[0], dtype)))
    for g in plan.groups:
        _submitted.update(_variant_key(j, g.workload, g.bias) for j in g.jobs)


# ------------------------------------------------------------------------------------------ markers
def _kernel_sources_digest() -> str:
    import qtip_triton.kernels as kernels_pkg

    h = hashlib.sha256()
    root = Path(kernels_pkg.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _machine(device: torch.device) -> tuple:
    import triton

    from qtip_triton import __version__

    idx = device.index if device.index is not None else torch.cuda.current_device()
    return (torch.cuda.get_device_name(idx), tuple(torch.cuda.get_device_capability(idx)), triton.__version__,
            torch.__version__, str(torch.version.cuda), __version__)


def marker_path(plan: Plan, device: torch.device, cache_dir: Path) -> Path:
    """Where the "these variants are in the disk cache" marker of ``plan`` lives (see the module docstring)."""
    h = hashlib.sha256()
    h.update(repr(_machine(device)).encode())
    h.update(_kernel_sources_digest().encode())
    # Triton's switches, and ours (QTIP_TRITON_PDL, _SPLIT_SUM, ...: they pick other compiled variants)
    h.update(repr(sorted((k, v) for k, v in os.environ.items()
                         if k.startswith(("TRITON_", "QTIP_TRITON_")) and k != "TRITON_CACHE_DIR")).encode())
    for g in sorted(plan.groups, key=lambda g: repr((g.workload, g.bias))):
        h.update(repr((g.workload, g.bias, sorted(map(repr, g.jobs)))).encode())
    return cache_dir / MARKER_DIR / f"{h.hexdigest()[:32]}.done"


# ------------------------------------------------------------------------------------------ the driver
def worker_env(device: torch.device, cache_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's environment: the parent's, with Triton's cache dir pinned to the parent's, only the
    parent's GPU visible (as device 0), no interpreter mode, and this ``qtip_triton`` importable first."""
    env = dict(os.environ if base is None else base)
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env.pop("TRITON_INTERPRET", None)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    visible = [s.strip() for s in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    if "CUDA_VISIBLE_DEVICES" in env and idx < len(visible):
        env["CUDA_VISIBLE_DEVICES"] = visible[idx]
    elif "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = str(idx)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the qtip_triton package
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_driver(request: dict, env: dict[str, str], timeout_s: float) -> dict:
    """Run the pool in a fresh interpreter (see the module docstring); returns the driver's result dict.

    Raises :class:`PoolUnavailable` if it cannot start, fails, or outlives ``timeout_s`` (then it and its
    workers, one process group of its own, are killed).
    """
    with tempfile.TemporaryDirectory(prefix="qtip-triton-warmup-") as tmp:
        req, res = Path(tmp) / "request.pkl", Path(tmp) / "result.pkl"
        req.write_bytes(pickle.dumps(request))
        try:
            proc = subprocess.Popen([sys.executable, "-m", "qtip_triton.autotune.warmup_pool", str(req), str(res)],
                                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise PoolUnavailable(f"cannot start {sys.executable}: {e}") from e
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            proc.communicate()
            raise PoolUnavailable(f"the compile pool took over {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not res.exists():
            lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
            raise PoolUnavailable(f"the compile driver exited with {proc.returncode}"
                                  + (f": {lines[-1].strip()}" if lines else ""))
        return pickle.loads(res.read_bytes())


def share_workers(sizes: Sequence[int], workers: int) -> list[int]:
    """Workers for groups of ``sizes`` jobs run side by side: in proportion to their jobs, at least one each.

    Why side by side: a group runs its own worker processes, and groups one after another would each pay
    the workers' start-up and wait for their slowest (a model whose layers differ in TP geometry or bias
    has several groups)."""
    shares = [1] * len(sizes)
    for _ in range(max(0, workers - len(sizes))):  # each further worker to the group with most jobs per worker
        i = max(range(len(sizes)), key=lambda g: sizes[g] / shares[g])
        if sizes[i] <= shares[i]:
            break
        shares[i] += 1
    return shares


def _driver(argv: list[str]) -> int:
    """``python -m qtip_triton.autotune.warmup_pool REQUEST RESULT``: compile the groups, side by side."""
    from concurrent.futures import ThreadPoolExecutor

    request = pickle.loads(Path(argv[0]).read_bytes())
    start, deadline = time.monotonic(), float(request["deadline_s"])
    errors: dict[CompileJob, str] = {}
    os.environ[_WORKER_API_ENV] = request.get("api_factory") or DEFAULT_API  # before any worker starts
    groups = request["groups"]
    shares = share_workers([len(g.jobs) for g in groups], request["workers"])

    def run(group: Group, n: int) -> dict[CompileJob, str]:
        left = deadline - (time.monotonic() - start)
        if left <= 0:  # out of time: prepare() compiles these on first use
            return {}
        return compile_all(group.jobs, n, group.workload, api_factory=_BIAS_FACTORY if group.bias else _PLAIN_FACTORY,
                           progress=False, per_shape=True, deadline_s=left)

    # a group of one worker (or one job) compiles in this process: those go one after another on this thread,
    # while the other groups' worker processes run (compiling in two threads of one process is not safe)
    here = [(g, n) for g, n in zip(groups, shares, strict=True) if n <= 1 or len(g.jobs) <= 1]
    pooled = [(g, n) for g, n in zip(groups, shares, strict=True) if n > 1 and len(g.jobs) > 1]
    with ThreadPoolExecutor(max_workers=max(1, len(pooled))) as threads:
        runs = [threads.submit(run, g, n) for g, n in pooled]
        for g, n in here:
            errors.update(run(g, n))
        for r in runs:
            errors.update(r.result())
    complete = time.monotonic() - start < deadline
    Path(argv[1]).write_bytes(pickle.dumps({"errors": errors, "complete": complete}))
    return 0


# ------------------------------------------------------------------------------------------ entry point
def _on_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


@dataclass(frozen=True)
class LayerRequest:
    """One layer's part of a batched compile: what ``Registry.prepare(max_m=max_m, dtypes=(dtype,), bias=bias)``
    will launch for ``shards`` (and, with ``op_rows``, the fused op at those rows: :func:`plan_layer`)."""

    shards: tuple
    dtype: Any
    bias: bool
    max_m: int
    op_rows: tuple[int, ...] = ()


def compile_ahead(shards: Sequence, dtype: torch.dtype, *, bias: bool, max_m: int, reg=None,
                  workers: int | None = None, runner: Callable[[dict, dict, float], dict] | None = None,
                  api_factory: str | None = None, op_rows: Sequence[int] = ()) -> Result | None:
    """Compile the variants ``Registry.prepare(max_m=max_m, dtypes=(dtype,), bias=bias)`` will launch for
    ``shards`` in parallel worker processes, into Triton's disk cache (and, with ``op_rows``, what a fused layer's
    op launches at those rows: :func:`plan_layer`). One layer's :func:`compile_ahead_many`."""
    request = LayerRequest(tuple(shards), dtype, bias, max_m, tuple(op_rows))
    return compile_ahead_many([request], reg=reg, workers=workers, runner=runner, api_factory=api_factory)


def _merge(plans: Sequence[Plan]) -> Plan:
    """One plan of several layers' jobs: a group per (workload, bias), each variant once."""
    groups: dict[tuple, list[CompileJob]] = {}
    for plan in plans:
        for g in plan.groups:
            groups.setdefault((g.workload, g.bias), []).extend(g.jobs)
    out = [Group(wl, bias, dedupe(jobs, per_shape=True)) for (wl, bias), jobs in groups.items()]
    return Plan([g for g in out if g.jobs], sum(p.layers for p in plans))


def compile_ahead_many(layers: Sequence[LayerRequest], *, reg=None, workers: int | None = None,
                       runner: Callable[[dict, dict, float], dict] | None = None,
                       api_factory: str | None = None) -> Result | None:
    """Compile the variants of several layers in one pool run.

    Why one run: each run starts a driver interpreter and its worker processes (torch, Triton and CUDA
    start-up in every one) and ends waiting for its slowest worker; a model's q/k/v, o, gate/up and down
    layers compiled one pool after another paid that three or four times over (~11 s each on an H100 host
    for ~20 variants, 14 workers). Together their ~65 variants keep the workers busy for one start-up.

    Returns None when the pool is not used (no layers, not CUDA, ``QTIP_TRITON_WARMUP_JOBS <= 1``, or it
    failed earlier in this process), else a :class:`Result` (``compiled == 0``: nothing new to compile).
    Raises :class:`PoolUnavailable` (once: later calls return None) when the pool fails.
    ``runner`` replaces :func:`run_driver` (tests); ``api_factory`` the kernel API the workers load.
    """
    global _pool_off
    layers = [r for r in layers if r.shards]
    if not layers or not _on_cuda(layers[0].shards[0].trellis.device) or _pool_off is not None:
        return None
    if workers is None:
        workers = warmup_workers()[0]
    if workers <= 1:
        return None
    if reg is None:
        from qtip_triton import registry

        reg = registry.get_registry()
    if reg.api is None:
        return None  # no Triton kernels here: the registry serves the reference path, nothing compiles
    plans = [plan_layer(reg, r.shards, r.dtype, bias=r.bias, max_m=r.max_m, op_rows=r.op_rows) for r in layers]
    plan = _merge(plans)

    def mark_done() -> None:  # each layer with its own plan: only a layer that planned op jobs has its op done
        for r, own in zip(layers, plans, strict=True):
            _mark_done(r.shards, r.dtype, r.bias, r.max_m, own)

    if not plan.groups:
        mark_done()
        return Result()
    from qtip_triton.autotune.triton_cache import triton_cache_dir

    device = torch.device(layers[0].shards[0].trellis.device)
    cache_dir = triton_cache_dir()
    n = plan.variants
    try:
        marker = marker_path(plan, device, cache_dir)
    except Exception:  # no marker (GPU query or kernel sources unreadable): just compile
        marker = None
    if marker is not None and marker.exists():
        mark_done()
        return Result(cached=n)
    timeout = pool_timeout()
    request = {"groups": plan.groups, "workers": workers, "deadline_s": timeout, "api_factory": api_factory}
    t0 = time.perf_counter()
    try:
        out = (runner or run_driver)(request, worker_env(device, cache_dir), timeout + STARTUP_SLACK_S)
    except Exception as e:
        _pool_off = f"{type(e).__name__}: {e}" if not isinstance(e, PoolUnavailable) else str(e)
        raise PoolUnavailable(_pool_off) from e
    errors = out.get("errors", {})
    result = Result(compiled=n - len(errors), failed=len(errors), workers=min(workers, n),
                    seconds=time.perf_counter() - t0, complete=bool(out.get("complete", True)))
    mark_done()
    if marker is not None and not errors and result.complete:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{n} variants\n")
        except OSError:
            pass
    return result


if __name__ == "__main__":
    sys.exit(_driver(sys.argv[1:]))
