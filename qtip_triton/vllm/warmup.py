"""Load-time warm-up of every kernel a quantized vLLM layer will launch, for every batch size the engine can send.

:meth:`process_weights_after_loading` of the QTIP and EXL3 linear methods repacks the weights
(``PackedShards.register``); that alone leaves the kernel *selection* and the Triton JIT to the first
forward of each M bucket, i.e. to vLLM's profile run, CUDA-graph capture and, for the sizes neither
touches, to live requests (the registry's "no usable autotune entry" warnings and JIT stalls seen
during inference). :func:`warm_up_layer` runs :func:`qtip_triton.registry.prepare` on each logical
matrix of the layer instead: every M bucket up to the engine's largest batch is selected, compiled
(or loaded from Triton's cache) and launched once, before the engine starts.

The largest batch is read from the vLLM config being loaded (:func:`qtip_triton.vllm.compat.engine_max_tokens`:
``scheduler_config.max_num_batched_tokens``, ``max_num_seqs`` and the CUDA-graph capture sizes,
whichever is largest). Without a vLLM config it is :data:`DEFAULT_MAX_M` = 256, the largest bucket of
the shipped autotune files (decode batches). Buckets above 4096 rows do not exist (larger M use 4096).

Only on CUDA: on the CPU (the Triton interpreter included) nothing is compiled ahead of time, so it
is skipped; so are activation dtypes the kernels do not take (the reference path serves them).
``QTIP_TRITON_NO_WARMUP=1`` turns it off (faster start, JIT on first use); so does
``QTIP_TRITON_NO_REGISTRY=1``, since the forward then bypasses the registry it would warm.

Compiling is the slow part and is single-threaded, so before the serial ``prepare`` the variants a
layer will launch are compiled in parallel worker processes into Triton's disk cache
(:func:`qtip_triton.autotune.warmup_pool.compile_ahead`: the ``precompile`` pool, started through a
``subprocess`` driver because vLLM's engine and worker processes are daemonic and may not have
``multiprocessing`` children); ``prepare`` then only loads and launches. A fused layer's op is compiled there
too, at the rows :func:`warm_op` runs it (its grouped transforms and one-launch shard decode are binaries no
per-shard job reaches), so :func:`warm_op` loads those as well. Each distinct layer is
compiled once per process, so the later decoder layers cost nothing. ``QTIP_TRITON_WARMUP_JOBS``
sets the worker count (``1``: the serial path only); if the pool cannot run, one warning says so and
the warm-up is serial, as before.

One pool for the whole model: a layer's warm-up waits (:class:`LoadBatch`) until every layer its
quantization config created has loaded, then the distinct layers (q/k/v, o, gate/up, down) go to one pool
run together, then each layer is prepared. Each pool run pays a driver's and its workers' start-up and waits
for its slowest worker; one run per layer type paid that three or four times. A layer created but never
loaded would hold the batch back: the op's first launch then warms what waits (outside CUDA-graph capture).
``QTIP_TRITON_WARMUP_BATCH=0`` warms each layer as it loads, one pool run per distinct layer.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from qtip_triton import dispatch, registry
from qtip_triton.autotune import warmup_pool
from qtip_triton.compile_watch import CompileWatch, watch_compiles
from qtip_triton.vllm import compat

NO_WARMUP_ENV = "QTIP_TRITON_NO_WARMUP"  # "1": skip the load-time warm-up
BATCH_ENV = "QTIP_TRITON_WARMUP_BATCH"  # "0": warm each layer as it loads (no waiting for the others)
DEFAULT_MAX_M = 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def warmup_disabled() -> bool:
    return os.environ.get(NO_WARMUP_ENV) == "1"


def compiles_ahead(device: torch.device) -> bool:
    """Whether kernels for ``device`` are compiled (so worth warming): CUDA only."""
    return torch.device(device).type == "cuda"


def engine_max_m(cfg: Any = None) -> tuple[int, str]:
    """The largest M the engine can hand a linear layer and where that number came from."""
    found = compat.engine_max_tokens(compat.current_vllm_config() if cfg is None else cfg)
    if found is None:
        return DEFAULT_MAX_M, f"no vLLM config: default {DEFAULT_MAX_M}"
    return found


def forward_passes_bias(layer: torch.nn.Module) -> bool:
    """Whether vLLM's forward of ``layer`` hands its bias to the quant method's ``apply`` (LinearBase:
    a bias that is not ``skip_bias_add``; RowParallelLinear adds it on TP rank 0 only)."""
    if getattr(layer, "bias", None) is None or getattr(layer, "skip_bias_add", False):
        return False
    from vllm.model_executor.layers.linear import RowParallelLinear

    return not (isinstance(layer, RowParallelLinear) and getattr(layer, "tp_rank", 0) > 0)


def _log(message: str, *args) -> None:
    log = compat.logger()
    getattr(log, "info_once", log.info)(message, *args)


@dataclass(frozen=True)
class PendingWarmup:
    """A loaded layer whose kernels are still to warm: what :func:`warm_up_layer` was given."""

    packed: Any
    dtype: torch.dtype
    bias: bool
    max_m: int  # read from the vLLM config while the layer loads (a later flush may run outside that config)
    source: str = ""  # where max_m came from, for the log
    prefix: str = ""

    def geometry(self) -> tuple:
        """What the compiled variants depend on: layers equal here compile the same binaries."""
        table = self.packed.table
        return (*layer_key(self.packed, self.dtype, self.bias), None if table is None else table.dtype, self.max_m)


def layer_key(packed, dtype: torch.dtype, bias: bool) -> tuple:
    """A packed layer's shape, layout, TP/Hadamard geometry, activation dtype, bias flag and device: layers equal
    here launch the same op variants."""
    return (packed.specs, tuple(packed.out_features), packed.in_features, packed.layout, packed.had_block,
            packed.rcp, packed.tp_rank, dtype, bias, str(packed.trellis.device))


def _warm_rows(entry: PendingWarmup) -> list[int] | None:
    """:func:`op_warm_rows` of a layer, None if it cannot be had (the op's own warm-up then meets the same problem
    and says so; the shards' jobs still go to the pool)."""
    try:
        return op_warm_rows(entry.packed.shards(), entry.max_m)
    except Exception as e:
        compat.logger().debug("qtip: no op rows for %s (%s: %s)", entry.prefix or "a layer", type(e).__name__, e)
        return None


def compile_layers_in_parallel(layers, op_rows: dict[tuple, list[int] | None] | None = None) -> int | None:
    """Compile the variants the serial warm-up will launch for ``layers`` (:class:`PendingWarmup`) in one run
    of the compile pool first (see :mod:`qtip_triton.autotune.warmup_pool`); returns how many were compiled,
    None if the pool was not used. Never raises: a pool that cannot run logs one warning and the warm-up
    stays serial. ``op_rows``: :func:`op_warm_rows` by :meth:`PendingWarmup.geometry`, where the caller has them
    (they take ~1 s of CPU a layer, and :func:`warm_op` needs the same)."""
    workers, problem = warmup_pool.warmup_workers()
    if problem:
        _log("qtip: %s", problem)
    # a fused layer's op too, at the rows warm_op runs it: its grouped launches (the one-launch shard decode,
    # grouped transforms) compile there and nowhere else, so serially at load without this
    requests = []
    for entry in layers:
        shards = entry.packed.shards()
        rows: list[int] | None = []
        if len(shards) > 1:  # a single shard's op launches nothing its per-shard jobs do not
            rows = op_rows[entry.geometry()] if op_rows is not None and entry.geometry() in op_rows else _warm_rows(entry)
        requests.append(warmup_pool.LayerRequest(tuple(shards), entry.dtype, entry.bias, entry.max_m,
                                                 tuple(rows or ())))
    what = layers[0].prefix or "a layer" if len(layers) == 1 else f"{len(layers)} distinct layers"
    try:
        result = warmup_pool.compile_ahead_many(requests, workers=workers)
    except Exception as e:  # PoolUnavailable, or a planning error: prepare() does it all, serially, as before
        warmup_pool.disable(f"{type(e).__name__}: {e}")  # one warning, not one per layer
        compat.logger().warning("qtip: parallel kernel compile unavailable (%s); compiling the kernels serially "
                                "(set %s=1 to skip trying)", e, warmup_pool.JOBS_ENV)
        return None
    if result is None:
        return None
    if result.cached:
        compat.logger().info("qtip: %d kernel variants of %s were compiled by an earlier run (Triton's disk cache)",
                             result.cached, what)
    if result.compiled or result.failed:
        compat.logger().info("qtip: compiled %d kernel variants of %s in parallel (%d worker processes) in %.1f s%s",
                             result.compiled, what, result.workers, result.seconds,
                             f"; {result.failed} failed and compile on first use" if result.failed else
                             "" if result.complete else "; stopped at the time limit, the rest compile serially")
    return result.compiled


_OP_WARM: set[tuple] = set()
MAX_WARM_TOKENS = 8192  # the launch choices stop changing long before: tall kernel, largest bucket


def op_warm_rows(shards, max_m: int) -> list[int]:
    """One M per distinct set of compiled variants the op launches for M in 1..max_m: the M bucket (its
    decode kernel and split-K), M's integer class, and each Hadamard transform's launch key (kernel,
    column split, unrolled partials, token classes: :func:`qtip_triton.kernels.hadamard.launch_key`).

    Why not powers of two: the transforms' choices switch at token counts of their own (64 tokens,
    128 (token, block) rows, 64 row programs) and Triton compiles a variant per integer class, so a
    prefill of, e.g., 135 tokens launched a transform that no power of two had compiled (a JIT stall
    seen in vLLM on the H200, 2026-11-29)."""
    from qtip_triton.autotune.buckets import bucket_for
    from qtip_triton.kernels import hadamard as had

    G = len(shards)
    q0 = shards[0]
    # (n, blocks, groups, input transform, destination order): the input transform writes a decode kernel's order
    # or, for the decompress kind, the natural one (their kernels switch at other token counts): both keys count
    transforms = {(q0.in_features, q0.blocks("in"), G, True, d) for d in (False, True)}
    for qw in shards:  # grouped output transforms (equal shards) and per-shard ones: both possible
        n_out, b_out = qw.out_features, qw.blocks("out")
        transforms |= {(n_out, b_out, G, False, False), (n_out, b_out, 1, False, False)}
    if not had.has_kernels(transforms):  # the reference transform serves this layer: nothing of it compiles
        transforms = set()
    from qtip_triton.kernels import gather_after_transform, pinned_switches, wgmma_fused_decode_on

    def extra(M: int) -> tuple:  # switch points of their own: the wgmma kind's gathered input counts all G shards'
        # rows, and its shards decode in one launch up to a row count (the SHARDS source, compiled on first launch)
        gather = bool(transforms) and gather_after_transform(q0.in_features, q0.blocks("in"), M, G)
        return bucket_for(M), gather, G > 1 and wgmma_fused_decode_on(M)

    with pinned_switches():  # one read of the environment for the whole walk, not one per token count
        return had.first_tokens(transforms, range(1, min(max_m, MAX_WARM_TOKENS) + 1), extra=extra)


def warm_op(packed, dtype: torch.dtype, max_m: int, prefix: str = "", bias: bool = False,
            rows: list[int] | None = None) -> None:
    """Run the layer's op once at each M of :func:`op_warm_rows` (``rows``, where the caller has them): the
    transforms' launch variants and a fused layer's grouped launches, which the per-shard ``registry.prepare`` does
    not make. Once per distinct layer geometry per process."""
    from qtip_triton import ops

    key = layer_key(packed, dtype, bias)
    if key in _OP_WARM:
        return
    _OP_WARM.add(key)
    M = 0
    try:
        device = packed.trellis.device
        b = torch.zeros(sum(packed.out_features), dtype=dtype, device=device) if bias else None
        with torch.no_grad():
            for M in op_warm_rows(packed.shards(), max_m) if rows is None else rows:
                ops.qtip_linear(torch.zeros(M, packed.in_features, dtype=dtype, device=device), packed, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # best effort, as the per-shard warm-up
        compat.logger().warning("qtip: warming the op of %s at M=%d failed (%s: %s); it compiles on first use",
                                prefix or "a layer", M, type(e).__name__, e)


def _skip_reason(packed, dtype: torch.dtype) -> str | None:
    """Why ``packed`` is not warmed (None: it is): not CUDA, a dtype the kernels do not take, or switched off."""
    if not compiles_ahead(packed.trellis.device) or dtype not in _KERNEL_DTYPES:
        return "nothing compiles ahead"
    if warmup_disabled():
        _log("qtip: kernel warm-up at load is off (%s=1): kernels compile on first use", NO_WARMUP_ENV)
        return "off"
    if os.environ.get(dispatch.NO_REGISTRY_ENV) == "1":
        _log("qtip: kernel warm-up at load skipped: %s=1 bypasses the registry", dispatch.NO_REGISTRY_ENV)
        return "no registry"
    return None


def warm_up_layer(packed, dtype: torch.dtype, *, bias: bool = False, prefix: str = "",
                  batch: LoadBatch | None = None, layer: torch.nn.Module | None = None) -> int | None:
    """Prepare (select, compile, launch once) every kernel of a packed layer's shards for M up to the
    engine's largest batch. Returns that M, or None when skipped (see the module docstring).

    ``bias``: the op hands the layer's bias to the kernels (a single-shard layer whose forward adds
    one); fused layers add it after the op, so it only applies when there is one shard. A shard whose
    warm-up fails is logged and left to compile on first use (loading does not fail for it).
    ``batch`` and ``layer``: the load this layer belongs to; the warm-up then waits for the load's other
    layers (:class:`LoadBatch`) and runs with them.
    """
    if _skip_reason(packed, dtype) is not None:
        if batch is not None and layer is not None:
            batch.arrive(layer, None)
        return None
    max_m, source = engine_max_m()
    entry = PendingWarmup(packed, dtype, bias and len(packed.shards()) == 1, max_m, source, prefix)
    if batch is not None and layer is not None and batching_on():
        batch.arrive(layer, entry)
    else:
        warm_up_layers([entry])
    return max_m


@dataclass(frozen=True)
class WarmupReport:
    """What one :func:`warm_up_layers` run did: how many kernel variants the pool compiled (None: it did not run)
    and what the serial part that follows compiled itself (``watch``: it should only load)."""

    max_m: int
    layers: int
    distinct: int
    pool_compiled: int | None
    watch: CompileWatch
    seconds: float
    rows_seconds: float = 0.0  # the ops' row plans (op_warm_rows, once a distinct layer: CPU only)
    pool_seconds: float = 0.0  # the pool run (planning and compiling)
    shard_seconds: float = 0.0  # every shard's registry.prepare: selection, loads, one launch per variant
    repeat_seconds: float = 0.0  # the part of shard_seconds spent on layers whose geometry an earlier one had
    op_seconds: float = 0.0  # the ops' row walks (warm_op)

    def breakdown(self) -> str:
        """Where the warm-up's time went, for the engine's log: an engine start that grows shows which part grew
        (the pool compiling, the shards' launches, the layers repeating a geometry, or the ops' walks)."""
        repeats = self.layers - self.distinct
        return (f"row plans {self.rows_seconds:.1f} s, pool {self.pool_seconds:.1f} s, shards {self.shard_seconds:.1f} s "
                f"({self.repeat_seconds:.1f} s of it in {repeats} layer{'' if repeats == 1 else 's'} repeating a "
                f"geometry), op walks {self.op_seconds:.1f} s")


def warm_up_layers(entries) -> WarmupReport | None:
    """Warm several loaded layers (:class:`PendingWarmup`): the distinct ones' variants in one pool run, then
    each layer's ``registry.prepare`` and op warm-up, which only load and launch binaries; a variant compiled
    there is one the pool missed, and the log line says which (:mod:`qtip_triton.compile_watch`). None when
    nothing was to warm."""
    entries = [e for e in entries if _skip_reason(e.packed, e.dtype) is None]
    if not entries:
        return None
    top = max(entries, key=lambda e: e.max_m)
    max_m = top.max_m
    _log("qtip: warming the kernels of every layer for M up to %d (%s)", max_m, top.source)
    t0 = time.perf_counter()
    first_of: dict[tuple, PendingWarmup] = {}
    for e in entries:
        first_of.setdefault(e.geometry(), e)
    distinct = list(first_of.values())
    # once a distinct layer, for the pool (fused layers) and warm_op (layers whose op this process has not yet warmed)
    op_rows = {g: _warm_rows(e) for g, e in first_of.items()
               if len(e.packed.shards()) > 1 or layer_key(e.packed, e.dtype, e.bias) not in _OP_WARM}
    t_pool = time.perf_counter()
    pool_compiled = compile_layers_in_parallel(distinct, op_rows)
    t_serial = time.perf_counter()
    shard_s = repeat_s = op_s = 0.0
    with watch_compiles() as watch:
        for e in entries:
            geometry = e.geometry()
            t1 = time.perf_counter()
            for qw in e.packed.shards():
                try:
                    registry.prepare(qw, max_m=e.max_m, dtypes=(e.dtype,), bias=e.bias)
                except Exception as exc:  # best effort: the same launch fails (or compiles) on first use, as without it
                    compat.logger().warning("qtip: warming %s %s %dx%d failed (%s: %s); its kernels compile on first "
                                            "use", e.prefix or "a layer", qw.spec.name, qw.out_features,
                                            qw.in_features, type(exc).__name__, exc)
            t2 = time.perf_counter()
            shard_s += t2 - t1
            if first_of[geometry] is not e:
                repeat_s += t2 - t1
            warm_op(e.packed, e.dtype, e.max_m, e.prefix, bias=e.bias, rows=op_rows.get(geometry))
            op_s += time.perf_counter() - t2
    report = WarmupReport(max_m, len(entries), len(distinct), pool_compiled, watch, time.perf_counter() - t0,
                          t_pool - t0, t_serial - t_pool, shard_s, repeat_s, op_s)
    # a kernel built here behind a pool is one the pool missed: worth the engine's log even for a single layer
    missed = pool_compiled is not None and bool(watch.compiled)
    log = compat.logger().info if len(entries) > 1 or missed else compat.logger().debug
    log("qtip: warmed %d layers (%d distinct, M <= %d) in %.2f s (%s); %s: %s", len(entries), len(distinct), max_m,
        report.seconds, report.breakdown(), "after the pool" if pool_compiled is not None else "without the pool",
        watch.summary())
    return report


def batching_on() -> bool:
    return os.environ.get(BATCH_ENV, "1").strip() != "0"


class LoadBatch:
    """The layers one quantization config created in a model load, and the warm-ups waiting for the rest.

    Why: the compile pool runs best once for the whole model (see the module docstring), yet vLLM hands
    each layer to ``process_weights_after_loading`` alone, in module order, with nothing after the last.
    Every layer announces itself when its weights are created (:meth:`expect`); once every announced
    layer has loaded (:meth:`arrive`), the waiting warm-ups run together. Layers are held weakly: one
    dropped before it loads does not hold the batch back. Should one stay alive and never load, the op's
    first launch outside CUDA-graph capture warms what waits (:func:`qtip_triton.ops.before_first_run`).
    """

    def __init__(self) -> None:
        self._expected: weakref.WeakSet = weakref.WeakSet()
        self._pending: list[PendingWarmup] = []

    def expect(self, layer: torch.nn.Module) -> None:
        self._expected.add(layer)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def arrive(self, layer: torch.nn.Module, entry: PendingWarmup | None) -> None:
        """``layer`` has loaded; ``entry`` is its warm-up (None: it needs none)."""
        self._expected.discard(layer)
        if entry is not None:
            if not self._pending:
                from qtip_triton import ops

                ops.before_first_run(self.flush)
            self._pending.append(entry)
        if not self._expected:
            self.flush()

    def flush(self) -> None:
        """Warm every waiting layer now (the last layer loaded, or the op's first launch came first)."""
        pending, self._pending = self._pending, []
        if pending:
            warm_up_layers(pending)


def batch_of(config: Any) -> LoadBatch:
    """The :class:`LoadBatch` of a quantization config: one per model load (vLLM builds one config per model)."""
    batch = getattr(config, "_qtip_load_batch", None)
    if batch is None:
        batch = LoadBatch()
        config._qtip_load_batch = batch
    return batch
