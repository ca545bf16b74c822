"""Launch the wgmma decode-matmul (codegen/wgmma.py): h in wgmma order in, fp32 partials out.

Why a launcher of its own: the kernel is Gluon (explicit layouts, TMA, warpgroup MMA), so it takes x as a TMA
descriptor and runs only on Hopper (sm_90); everything else about it (prepared words, code table, split-K
partials summed by the output transform) is what the other kinds use.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qtip_triton.autotune.kernel_api import config_key
from qtip_triton.codegen.cache import load_source
from qtip_triton.codegen.nvtools import cuobjdump
from qtip_triton.codegen.wgmma import (
    ablated,
    check_config,
    elements,
    emit_wgmma,
    lane_stride_env,
    lane_strided,
    out16,
    pipelined,
    sharded,
    table_mode,
    table_slots,
    warp_specialized,
    wgmma_input_order,
    word_prefetch,
)
from qtip_triton.codegen.wgmma_ws import WS_MAXNREG, WS_ROWS
from qtip_triton.kernels.prepare import PreparedWeight
from qtip_triton.kernels.runners import _shard_bounds
from qtip_triton.kernels.wgmma_configs import SMEM_LIMIT, smem_bytes, table_words

_modules: dict[tuple, Any] = {}


def available(device: torch.device | str | None = None) -> bool:
    """Whether this device can run the kernel: a CUDA GPU of compute capability 9.x and a Triton with Gluon."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    return _hopper_with_gluon(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.cache
def _hopper_with_gluon(index: int) -> bool:
    """Cached: asked at every launch and every registry lookup."""
    if torch.cuda.get_device_capability(index)[0] != 9:
        return False
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        return False
    return True


def _source_config(config: Mapping[str, Any], strided: bool | None = None) -> dict[str, Any]:
    """The keys that shape the kernel's source (``strided``: lane-strided words, :func:`strided_for`; None: as the
    switch says)."""
    src = {"E": config.get("E", 1), "WPF": word_prefetch(config), "PIPE": pipelined(config),
           "table": config.get("table", "gather")}
    if ablated(config):  # measurement only (bench/wgmma_probe.py --ablate)
        src["ABLATE"] = ablated(config)
    if out16(config):  # the partial in fp16 (SPLIT_K = 1 only)
        src["OUT16"] = 1
    if warp_specialized(config):  # the shared-A form (codegen/wgmma_ws.py)
        src["WS"] = 1
    if sharded(config):  # a fused weight's stacked shards in one launch (set by decode_matmul, never tuned)
        src["SHARDS"] = 1
    if lane_strided(src["E"], strided):  # word columns strided over lanes: the order (input_index, ...) follows
        src["LS"] = 1
    return src


def word_rows(config: Mapping[str, Any]) -> int:
    """Word rows a program decodes (half its output rows): 8 per warp, or the warp-specialized form's decode
    partition's 32."""
    return WS_ROWS // 2 if warp_specialized(config) else 8 * check_config(config)[2]


def tma_box(config: Mapping[str, Any]) -> list[int]:
    """x's TMA box: BLOCK_M tokens x 64 E columns, in boxes of at most 256 tokens (TMA's limit on a box side; the
    warp-specialized form loads 512 tokens as two)."""
    E, bm, _, _ = check_config(config)
    return [min(bm, 256), 64 * E]


def launch_options(config: Mapping[str, Any]) -> dict[str, int]:
    """Launch options beyond the warps: the warp-specialized form's register cap, so that its 16 warps fit the SM's
    64 K registers at launch (its partitions then move them with setmaxnreg)."""
    return {"maxnreg": WS_MAXNREG} if warp_specialized(config) else {}


def _module(pw: PreparedWeight, config: Mapping[str, Any]) -> Any:
    src = _source_config(config, strided_for(pw, elements(config)))
    key = (pw.spec, pw.layout, tuple(sorted(src.items())))
    mod = _modules.get(key)
    if mod is None:
        mod = load_source(emit_wgmma(pw.spec, src, layout=pw.layout))
        _modules[key] = mod
    return mod


def _folded_cols(pw: PreparedWeight, E: int, strided: bool) -> tuple[int, ...] | None:
    """The order for ``E`` with lanes ``strided`` or not as the input transform's ``cols``
    (:func:`hadamard.segment_cols`; None where it moves columns across the transform's segments), cached with the
    weight: :func:`strided_for` asks about both mappings, :func:`input_cols` about the one chosen."""
    key = ("input_cols_wgmma", E, strided)
    if key not in pw.cache:
        from qtip_triton.kernels.hadamard import segment_cols

        pw.cache[key] = segment_cols(wgmma_input_order(pw.plan, pw.in_features, E, strided),
                                     pw.in_features // pw.blocks_in)
    return pw.cache[key]


def strided_for(pw: PreparedWeight, E: int) -> bool:
    """Whether this weight's kernel for ``E`` takes lane-strided words (:func:`~qtip_triton.codegen.wgmma.lane_stride_env`
    when set, else exactly where the contiguous order moves columns across the input transform's segments and the
    strided one does not: 11008 features with E = 2 among Llama sizes)."""
    setting = lane_stride_env()
    if E == 1 or setting is not None:
        return lane_strided(E, setting)
    return _folded_cols(pw, E, False) is None and _folded_cols(pw, E, True) is not None


def _order(pw: PreparedWeight, E: int) -> torch.Tensor:
    return wgmma_input_order(pw.plan, pw.in_features, E, strided_for(pw, E))


def _order_key(name: str, pw: PreparedWeight, E: int) -> tuple:
    """The weight-cache key of an order for ``E``: the lane mapping it follows is part of it (:func:`strided_for`)."""
    return name, E, strided_for(pw, E)


def input_index(pw: PreparedWeight, E: int) -> torch.Tensor:
    """int32 (in_features,): where each natural input column goes in the kernel's h (cached with the weight)."""
    return pw.cached(_order_key("input_index_wgmma", pw, E), lambda: _order(pw, E).to(torch.int32))


def input_cols(pw: PreparedWeight, E: int) -> tuple[int, ...] | None:
    """The kernel's order for ``E`` as the input transform's ``cols`` (:func:`hadamard.segment_cols`), or None where
    it moves columns across the transform's segments (11008 features with E = 2 with contiguous lanes only: by
    default those take strided ones, :func:`strided_for`), cached with the weight."""
    return _folded_cols(pw, E, strided_for(pw, E))


def input_gather(pw: PreparedWeight, E: int) -> torch.Tensor:
    """int64 (in_features,): the natural column each position of the kernel's h takes (the inverse of
    :func:`input_index`; ``h_natural.index_select(1, ...)`` is h in the kernel's order), built on the host and
    cached on the weight's device at first use (the load-time warm-up), as :func:`input_index`."""
    return pw.cached(_order_key("input_gather_wgmma", pw, E), lambda: torch.argsort(_order(pw, E)))


def to_wgmma_order(pw: PreparedWeight, h: torch.Tensor, E: int) -> torch.Tensor:
    """h (M, in) in natural column order -> a new (M, in) fp16 tensor in the kernel's order (tests, benches;
    the layers have the input transform write it directly through :func:`input_index`)."""
    out = h_buffer((), h.shape[0], h.shape[1], h.device)  # whole tiles behind it, as the layers' h
    out[:, input_index(pw, E).long()] = h.to(torch.float16)
    return out


def steps(pw: PreparedWeight, config: Mapping[str, Any]) -> tuple[int, int]:
    """(k steps per program, split) for this weight, or a clear error when the k range does not divide."""
    E, _, _, _ = check_config(config)
    split = config.get("SPLIT_K", 1)
    cb = 4 * E
    Ctot = pw.words.shape[2]
    if Ctot % cb:
        raise ValueError(f"wgmma E={E} needs in_features divisible by {16 * cb}, got {pw.in_features}")
    nsteps = Ctot // cb
    if not isinstance(split, int) or split < 1 or nsteps % split:
        raise ValueError(f"wgmma SPLIT_K={split!r} must divide the {nsteps} k steps of {pw.in_features} inputs")
    if pipelined(config) and (nsteps // split) % 2:
        raise ValueError(f"wgmma PIPE=1 needs an even number of k steps per program, got {nsteps // split} "
                         f"({nsteps} steps, SPLIT_K={split})")
    return nsteps // split, split


def shard_word_bounds(pw: PreparedWeight, config: Mapping[str, Any]) -> tuple[int, int]:
    """(B1, B2): the word rows where a fused weight's (:func:`~qtip_triton.kernels.prepare.fuse_shards`) second and
    third shards start (past the end where there are fewer), or a clear error where a program's rows would straddle
    two shards (each shard's out_features must be a multiple of the config's 2 x word rows)."""
    rb = word_rows(config)
    bounds = _shard_bounds(pw, pw.shard_out) if len(pw.shard_out) >= 2 else None  # the gemv/gemm fused decode's
    if bounds is None:
        raise ValueError(f"wgmma stacked shards: expected a fused weight of 2 or 3 shards, got shard_out {pw.shard_out}")
    if any(m % (2 * rb) for m in pw.shard_out):
        raise ValueError(f"wgmma config {dict(config)} splits rows in blocks of {2 * rb}: the shards' out_features "
                         f"{list(pw.shard_out)} must be multiples of it")
    return bounds


def fused_ok(pw: PreparedWeight, config: Mapping[str, Any]) -> bool:
    """Whether :func:`decode_matmul` can run ``config`` on fused weight ``pw``'s stacked shards in one launch: a
    register-A config (no ``WS``) with fp32 partials, k steps that divide, and row blocks inside the shards."""
    try:
        if warp_specialized(config) or out16(config):
            return False
        steps(pw, config)
        shard_word_bounds(pw, config)
    except ValueError:
        return False
    return True


PAD_ROWS_ENV = "QTIP_TRITON_WGMMA_PAD_ROWS"
# h buffers reserve rows up to a whole TMA box of the largest height (tma_box: 256 tokens). The warp-specialized
# form's 512-token tiles load two boxes; where the first is part-filled the second lies wholly past h, as before.
TILE_ROWS = 256


def tile_slack() -> bool:
    """Whether :func:`decode_matmul` describes h's rows past its end to TMA where h's storage holds them
    (:func:`h_buffer`). On by default since session 42; ``QTIP_TRITON_WGMMA_PAD_ROWS=0`` describes exactly h's rows
    (TMA zero-fills the last box's rows past them).

    Why: session 40 (H100, ``*-session39-gateup160.md``, ``*-session40-pad{0,1}.md``) timed the 4-warp 256-token
    entry of 22016x4096 at 161 µs for 160 tokens against 102 µs for 256 (the same tiles and MMAs), and the 128-token
    entry slowed the same way with its second tile part-filled: a TMA box reaching past the tensor's end (its rows
    zero-filled) is slow. With h copied into whole tiles first (the measured form of this switch) the entry took
    113 µs at 160 tokens and 104 at 192, and one layer at 160 tokens 370 -> 328 µs; but the copies cost the layer
    10 µs at 96 tokens. Storage reserved behind h when it is written costs nothing. Those rows are never written:
    each feeds only its own output column, which the kernel does not store. Session 42 (H100, the switch's GPU
    tests passed, ``*-fused-layers-session42-slack{0,1}.md``): the layer 96 / 160 / 192 tokens 201.7 / 371.8 /
    348.7 -> 196.4 / 305.9 / 312.5 µs."""
    return os.environ.get(PAD_ROWS_ENV, "1") != "0"


def h_buffer(lead: tuple[int, ...], rows: int, n: int, device: torch.device) -> torch.Tensor:
    """An empty fp16 (*lead, rows, n) tensor whose storage runs on to a whole ``TILE_ROWS`` tile past its last row,
    for the input transform to write h into (:func:`tile_slack`): at most 255 rows of ``n`` more."""
    count = math.prod(lead) * rows
    flat = torch.empty((count + (-rows % TILE_ROWS)) * n, dtype=torch.float16, device=device)
    return flat[:count * n].view(*lead, rows, n)


def described_rows(h2: torch.Tensor, needed: int) -> int:
    """Rows of the 2-D ``h2`` (unit column stride) that a TMA descriptor may cover: up to ``needed`` where the
    storage behind ``h2`` holds them, never fewer than its own."""
    left = h2.untyped_storage().nbytes() // h2.element_size() - h2.storage_offset()
    avail = (left - h2.shape[1]) // h2.stride(0) + 1 if left >= h2.shape[1] else 0
    return max(h2.shape[0], min(needed, avail))


def decode_matmul(pw: PreparedWeight, hw: torch.Tensor, config: Mapping[str, Any],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Partials (SPLIT_K, M, out) fp32 of Ŵ hᵀ (with ``OUT16``: one fp16 partial), with ``hw`` (M, in) fp16 in wgmma
    order (:func:`to_wgmma_order`). ``out``: where to write them (a fused layer's shard of one stacked partials
    tensor, so that one output transform serves every shard), with unit stride along out_features.

    ``hw`` of shape (G, M, in), contiguous: a fused weight's G stacked shards (``pw.shard_out``), each shard's rows
    decoded against its own h and code table, in ONE launch (source option ``SHARDS``)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    E, bm, nw, stages = check_config(config)
    stats_key = config_key(config)  # the caller's config: SHARDS is added below for stacked shards
    stacked = hw.dim() == 3
    if (hw.dtype != torch.float16 or hw.dim() not in (2, 3) or hw.shape[-1] != pw.in_features or hw.stride(-1) != 1
            or (stacked and not hw.is_contiguous())):
        raise ValueError(f"wgmma h must be (M, {pw.in_features}) float16 with unit column stride (or a contiguous "
                         f"(shards, M, {pw.in_features}) for stacked shards), got {tuple(hw.shape)} {hw.dtype} "
                         f"strides {hw.stride()}")
    if hw.device != pw.device or not available(hw.device):
        raise ValueError(f"wgmma runs on a Hopper GPU (sm_90) holding the weight; h is on {hw.device}")
    G = hw.shape[0] if stacked else 1
    if stacked and len(pw.shard_out) != G:
        raise ValueError(f"wgmma h has {G} shards but the weight stacks {len(pw.shard_out) or 'no'} shards "
                         f"({pw.shard_out})")
    if pw.table.dim() != 1 and not (stacked and pw.table.dim() == 2 and pw.table.shape[0] == G):
        raise ValueError("wgmma takes one code table, or one per shard with per-shard h (shards, M, in); got tables "
                         f"{tuple(pw.table.shape)} and h {tuple(hw.shape)}")
    _, Rtot, Ctot = pw.words.shape
    rb = word_rows(config)
    if Rtot % rb:
        raise ValueError(f"wgmma config {dict(config)} needs out_features divisible by {2 * rb}, got {pw.out_features}")
    iters, split = steps(pw, config)
    M = hw.shape[-2]
    shard_args: tuple = ()
    if stacked:  # (a warp-specialized config is refused with SHARDS by codegen.wgmma.sharded)
        shard_args = (*shard_word_bounds(pw, config), M, pw.table.stride(0) if pw.table.dim() == 2 else 0)
        config = {**config, "SHARDS": 1}
        hw = hw.view(G * M, pw.in_features)
    # the last shard's last tile reaches (G - 1) M + whole tiles of M rows (earlier shards' tiles read the next
    # shard's rows, in bounds): described where h's storage holds them, so no TMA box runs past the tensor's end
    rows = described_rows(hw, (G - 1) * M + -(-M // bm) * bm) if tile_slack() else hw.shape[0]
    box = tma_box(config)
    layout = gl.NVMMASharedLayout.get_default_for(box, gl.float16)
    desc = TensorDescriptor(hw, [rows, pw.in_features], list(hw.stride()), box, layout)
    ydtype = torch.float16 if out16(config) else torch.float32
    if out is None:
        y = torch.empty(split, M, pw.out_features, dtype=ydtype, device=hw.device)
    elif (out.shape != (split, M, pw.out_features) or out.dtype != ydtype or out.device != hw.device
          or out.stride(2) != 1):
        raise ValueError(f"wgmma out must be ({split}, {M}, {pw.out_features}) {ydtype} on {hw.device} with unit stride "
                         f"along out_features, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    else:
        y = out
    grid = (Rtot // rb, split, -(-M // bm))
    words = table_words(pw.spec)  # the same count the kind's space sizes its configs by
    tslots = table_slots(config, words)
    smem = smem_bytes(config, words)
    if smem > SMEM_LIMIT:
        raise ValueError(f"wgmma config {dict(config)} needs ~{smem // 1024} KB of shared memory (x ring of STAGES "
                         f"tiles plus the table), more than the {SMEM_LIMIT // 1024} KB a block may have: fewer STAGES, "
                         "a smaller BLOCK_M or E, or table='gather'")
    compiled = _module(pw, config).kernel[grid](
        pw.words, pw.table, desc, y, M, Rtot, Ctot, iters, pw.words.stride(0), y.stride(0), y.stride(1), *shard_args,
        BLOCK_M=bm, STAGES=stages, num_warps=nw, TSLOTS=tslots, **launch_options(config))
    _last_launch[stats_key] = LaunchStats(compiled.n_regs, compiled.metadata.shared, nw, grid)
    if table_mode(config)[0] == "shared":
        _require_ring_first(compiled, (stages + tslots) * bm * 64 * E * 2)
    if pipelined(config):
        _require_no_hazards(compiled)
    return y


# Hopper (sm_90) per-SM limits: 228 KB of shared memory with 1 KB reserved per program, 64K 32-bit registers
# allocated per warp in 256-register units, 64 warps, 32 programs.
SM_SHARED_BYTES = 233472
SHARED_RESERVED_BYTES = 1024
SM_REGISTERS = 65536
REGISTER_UNIT = 256
SM_WARPS = 64
SM_PROGRAMS = 32


@dataclass(frozen=True)
class LaunchStats:
    """What one launch of a config asked of the GPU: registers a thread, shared memory a program, warps, grid."""

    registers: int
    shared_bytes: int
    num_warps: int
    grid: tuple[int, int, int]

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def per_sm(self, sm_shared: int = SM_SHARED_BYTES, sm_registers: int = SM_REGISTERS) -> int:
        """Programs resident on one SM at once (:func:`programs_per_sm`)."""
        return programs_per_sm(self.registers, self.shared_bytes, self.num_warps, sm_shared, sm_registers)

    def waves(self, sms: int, sm_shared: int = SM_SHARED_BYTES, sm_registers: int = SM_REGISTERS) -> float:
        """The grid in units of what ``sms`` SMs hold at once: 1.45 is a full wave and a tail of 45 %."""
        return self.programs / max(1, self.per_sm(sm_shared, sm_registers) * sms)


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int, sm_shared: int = SM_SHARED_BYTES,
                    sm_registers: int = SM_REGISTERS) -> int:
    """How many programs of a kernel one SM holds at once: the least of what its shared memory, its registers and
    its warp and program slots allow.

    Why: the kind's time at 48-64 tokens jumped where the grid stopped fitting one wave (H100, session 31: 82 KB a
    program at 64 tokens fits 2 an SM, 57 KB at 32 fits 3; q/k/v's 384 programs went from one wave to 1.45)."""
    if registers < 1 or shared_bytes < 0 or num_warps < 1:
        raise ValueError(f"expected registers >= 1, shared >= 0 and warps >= 1, got {registers}, {shared_bytes}, "
                         f"{num_warps}")
    warp_regs = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    return max(0, min(sm_shared // (shared_bytes + SHARED_RESERVED_BYTES), sm_registers // (warp_regs * num_warps),
                      SM_WARPS // num_warps, SM_PROGRAMS))


_last_launch: dict[tuple, LaunchStats] = {}


def last_launch(config: Mapping[str, Any]) -> LaunchStats | None:
    """The :class:`LaunchStats` of ``config``'s latest launch in this process (benchmarks report occupancy with
    it); None before its first launch."""
    return _last_launch.get(config_key(config))


def sass_of(cubin: bytes) -> str:
    """SASS text of a cubin, by the cuobjdump that ships with Triton."""
    return cuobjdump(cubin, "-sass")


_checked: set[tuple[int, str]] = set()


def _check_once(compiled: Any, what: str, failure) -> None:
    """Run a check of a compiled kernel the first time it launches (Triton keeps its kernels, so ``id`` names one):
    ``failure()`` returns None when the kernel passes, else the error message."""
    if (id(compiled), what) in _checked:
        return
    msg = failure()
    if msg:
        raise RuntimeError(msg)
    _checked.add((id(compiled), what))


def _require_no_hazards(compiled: Any) -> None:
    """PIPE = 1 relies on the compiler keeping its two A register sets apart: refuse a kernel whose SASS writes an A
    register of an MMA still in flight (:func:`a_register_hazards`)."""
    def failure() -> str | None:
        bad = a_register_hazards(sass_of(compiled.asm["cubin"]))
        return (f"wgmma PIPE=1: the compiled loop writes {len(bad)} A register(s) of in-flight MMAs (e.g. {bad[0]!r}); "
                "use PIPE=0") if bad else None
    _check_once(compiled, "hazards", failure)


def ring_at_zero(ptx: str, ring_bytes: int) -> bool:
    """Whether the x ring (``ring_bytes``) starts at offset 0 of shared memory, where the ``shared`` table modes
    assume it (their table sits in the ring's last slots, addressed from the shared memory symbol). The ring and
    the mbarriers are the kernel's only allocations, so the ring is at 0 exactly when every barrier lies past it."""
    base = set(re.findall(r"mov\.b32\s+(%r\d+),\s*global_smem;", ptx))
    offsets = {m.group(1): int(m.group(3)) for m in re.finditer(r"add\.s32\s+(%r\d+),\s*(%r\d+),\s*(\d+);", ptx)
               if m.group(2) in base}
    inits = re.findall(r"mbarrier\.init\.shared::cta\.b64\s+\[(%r\d+)\]", ptx)
    if not inits:
        return False
    return all((0 if r in base else offsets.get(r, -1)) >= ring_bytes for r in inits)


def _require_ring_first(compiled: Any, ring_bytes: int) -> None:
    _check_once(compiled, "ring", lambda: None if ring_at_zero(compiled.asm["ptx"], ring_bytes) else (
        "wgmma: Triton did not place the x ring at offset 0 of shared memory, where the shared table modes keep "
        "their table; use table='gather'"))


def compile_offline(spec, config: Mapping[str, Any], n: int = 8192, arch: int = 90, layout: str | None = None):
    """The kernel compiled for ``sm_<arch>`` without a GPU (ptxas ships with Triton): its SASS and resources can be
    checked on any machine (tests, bench/sass_count.py). ``n`` only shapes the TMA descriptor's global extent."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    E, bm, nw, stages = check_config(config)
    mod = load_source(emit_wgmma(spec, _source_config(config), layout=layout))
    fn = mod.kernel
    names = fn.arg_names
    x = torch.empty(bm, n, dtype=torch.float16)
    box = tma_box(config)
    desc = TensorDescriptor(x, list(x.shape), list(x.stride()), box, gl.NVMMASharedLayout.get_default_for(box, gl.float16))
    const = {"BLOCK_M": bm, "STAGES": stages, "num_warps": nw, "TSLOTS": table_slots(config, table_words(spec))}
    ptrs = {"W": "*i32", "TBL": "*i32", "Y": "*fp16" if out16(config) else "*fp32", "x_desc": mangle_type(desc)}
    sig = {a: "constexpr" if a in const else ptrs.get(a, "i32") for a in names}
    aligned = ("W", "TBL", "Y", "Ctot", "stride_wq", "stride_ys", "stride_ym")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": nw, **launch_options(config)})


_SASS_ROW = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def a_register_hazards(sass: str) -> list[str]:
    """Instructions of the main loop that write a register an in-flight HGMMA still reads as its A operand.

    Why: wgmma reads its register A operand while it runs, and neither LLVM nor ptxas keeps those registers from
    being reused before the ``wgmma.wait_group`` that retires it. Session 22's first kernel (wait for all but one
    group) reused them for the next step's decode: 47 such writes at 8192^2 M = 256, NaN results on the H100 with
    two warpgroups. The loop is walked twice, so writes after the back edge count too."""
    rows = [(int(m.group(1), 16), m.group(2).strip()) for m in map(_SASS_ROW.match, sass.splitlines()) if m]
    hgmma = [a for a, t in rows if "HGMMA" in t]
    loop: list[str] = []
    for a, t in rows:
        m = re.search(r"BRA (0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and any(int(m.group(1), 16) <= h <= a for h in hgmma):
            loop = [u for b, u in rows if int(m.group(1), 16) <= b <= a]
            break
    pending: list[set[int]] = []
    cur: set[int] = set()
    bad = []
    for t in loop + loop:
        op = t.split()[1] if t.startswith("@") else t.split()[0]
        if "HGMMA" in op:
            m = re.search(r"HGMMA\S*\s+R\d+,\s*R(\d+),", t)
            if m:
                cur |= set(range(int(m.group(1)), int(m.group(1)) + 4))
            if "gsb0" in t:
                pending.append(cur)
                cur = set()
            continue
        m = re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x(\d+)", t)
        if m:
            keep = int(m.group(1))
            pending = pending[len(pending) - keep:] if keep else []
            continue
        live = set().union(*pending) if pending else set()
        if live and not op.startswith(("ST", "BRA", "BAR", "SYNCS", "WARPGROUP", "UTMA", "RED", "ATOM")):
            m = re.match(r"(?:@!?U?P\w+\s+)?\S+\s+R(\d+)", t)
            if m and int(m.group(1)) in live:
                bad.append(t)
    return bad
