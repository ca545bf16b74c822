"""The fused decode-matmul on Hopper's warpgroup MMA (kind ``wgmma``), emitted as Gluon source.

Why: from ~64 tokens up, the shipped path decodes Ŵ to memory and calls cuBLAS, and that round trip of
Ŵ through DRAM alone caps it at 0.54-0.63x fp16 at 256 tokens on the H100 (bench/NOTES.md, session 21).
The ``gemm`` kind fuses the decode but moves every decoded tile through shared memory into ``tl.dot``'s
operand layout, with barriers (43 % of its stalls, session 8). Here nothing moves: QTIP's layout *is*
the A fragment of an MMA (codegen/mma.py), and ``wgmma`` takes A from registers, so each warp decodes
its 16 output rows straight into the registers one ``wgmma.m64nNk16`` reads, for all N tokens at once,
while x streams into shared memory by TMA. The wgmma is asynchronous: the next k step's decode runs
on the CUDA cores while the tensor cores multiply the previous one.

Layout (one program = ``16 x num_warps`` output rows x ``BLOCK_M`` tokens): word tile ``[RB, CB]``
(``RB = 8 x num_warps`` word rows, ``CB = 4 E`` word columns per k step) laid out as lane (g, t) of warp
w = word row ``8w + g``, columns ``tE .. tE + E - 1``. An element's 16 states are four A fragments
(codegen/mma.py: state of row class c and class pair q + 4h). The A tensor ``[16 x num_warps, 64 E]``
is their register-only rearrangement: row ``16w + 8c + g`` (= output row offset: contiguous rows),
column ``64e + 16q + 8h + 2t + j`` (j: the fp16 half). So h must be stored in that column order
("wgmma order", :func:`wgmma_input_order`): each k step's ``64 E`` columns contiguous, loaded by one TMA.

Gluon has no interpreter: the CPU tests check the source, the order and the A placement with a torch
emulation (tests/test_wgmma.py); the kernel itself runs only on a Hopper GPU (tests/gpu).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from qtip_triton.codegen.emit import _Emitter, _Src, source_options
from qtip_triton.codegen.mma import packed_pairs
from qtip_triton.codegen.plan import TilePlan, make_plan
from qtip_triton.codes import get_code
from qtip_triton.spec import TILE, TrellisSpec

WGMMA_ELEMENTS = (1, 2, 4)  # E: word columns per lane per k step (64 E input columns)
WGMMA_WARPS = (4, 8)  # one or two warpgroups: 64 or 128 output rows per program
WGMMA_BLOCK_M = (16, 32, 64, 128, 256)  # tokens per program = the wgmma's N


def elements(config: Mapping[str, Any]) -> int:
    """A config's ``E`` (word columns per lane per k step), or a clear error: the one launch key the source needs."""
    E = config.get("E", 1)
    if E not in WGMMA_ELEMENTS:
        raise ValueError(f"wgmma config E={E!r} must be one of {WGMMA_ELEMENTS} (word columns per lane per k step)")
    return E


def check_config(config: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(E, BLOCK_M, num_warps, STAGES) of a whole wgmma config (launch keys included), or a clear error."""
    E = elements(config)
    bm = config.get("BLOCK_M", 64)
    nw = config.get("num_warps", 4)
    st = config.get("STAGES", 3)
    ws = warp_specialized(config)
    allowed = WGMMA_BLOCK_M + ((512,) if ws else ())
    if bm not in allowed:
        raise ValueError(f"wgmma config BLOCK_M={bm!r} must be one of {allowed} (tokens per program"
                         + ("" if 512 in allowed else "; 512 with WS=1") + ")")
    if nw not in WGMMA_WARPS:
        raise ValueError(f"wgmma config num_warps={nw!r} must be one of {WGMMA_WARPS} (warpgroups of 64 rows)")
    if not isinstance(st, int) or not 2 <= st <= 6:
        raise ValueError(f"wgmma config STAGES={st!r} must be an int in [2, 6] (x tiles in flight)")
    if ws:
        if nw != 8:
            raise ValueError(f"wgmma config WS=1 needs num_warps=8 (two MMA warpgroups), got {nw}")
        if bm < 64:
            raise ValueError(f"wgmma config WS=1 needs BLOCK_M >= 64 (two warpgroups of BLOCK_M / 2 tokens), got {bm}")
    return E, bm, nw, st


SHARED_HELPERS = '''
@gluon.jit
def _smem_base(like):
    """Byte address of the start of shared memory (Triton's dynamic shared memory symbol)."""
    return gl.inline_asm_elementwise("mov.b32 $0, global_smem;", "=r,r", [like], dtype=gl.uint32, is_pure=True,
                                     pack=1)


@gluon.jit
def _lane_copy(like, REP: gl.constexpr):
    """Byte offset of this lane's copy inside an entry's REP interleaved words: (lane % REP) * 4."""
    return gl.inline_asm_elementwise("{ .reg .b32 l; mov.u32 l, %laneid; and.b32 l, l, @REPM1@; shl.b32 $0, l, 2; }",
                                     "=r,r", [like], dtype=gl.uint32, is_pure=True, pack=1)


@gluon.jit
def _lds(addr, ptr, INTERPRET: gl.constexpr):
    """A 32-bit table word from shared memory at byte address ``addr`` (``ptr``: the generator's global fallback,
    unused here: Gluon has no interpreter)."""
    return gl.inline_asm_elementwise("ld.shared.b32 $0, [$1];", "=r,r", [addr], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _fill_table(tbl, ti, REP: gl.constexpr, toff):
    """Write REP interleaved copies of the table at byte ``toff`` (word i of copy r at toff + 4 (i REP + r))."""
    base = _smem_base(ti) + toff
    if REP == 1:
        gl.inline_asm_elementwise("{ .reg .b32 a; add.u32 a, $1, $2; st.shared.b32 [a], $3; mov.b32 $0, 0; }",
                                  "=r,r,r,r", [base, ti * 4, tbl], dtype=gl.int32, is_pure=False, pack=1)
    else:
        for c in gl.static_range(REP // 4):
            gl.inline_asm_elementwise(
                "{ .reg .b32 a; add.u32 a, $1, $2; st.shared.v4.b32 [a], {$3, $3, $3, $3}; mov.b32 $0, 0; }",
                "=r,r,r,r", [base, ti * (4 * REP) + 16 * c, tbl], dtype=gl.int32, is_pure=False, pack=1)
    @BARRIER@

'''


WGMMA_TABLES = ("gather", "shared1", "shared4", "shared16", "shared32")

# where a program's words are (its RB word rows x CB word columns of step 0, in word_layout), given pid_r and pid_k;
# shared by the register-A kernel and the warp-specialized form's decode partition
WORD_OFFSETS = (
    "step0 = pid_k * ITERS",
    "rows = pid_r * RB + gl.arange(0, RB, layout=gl.SliceLayout(1, word_layout))",
    "cols = step0 * CB + gl.arange(0, CB, layout=gl.SliceLayout(0, word_layout))",
    "gr = rows & 7  # group row inside the tile",
    "w_off = rows[:, None] * Ctot + cols[None, :]",
    "n_off = (rows - gr + ((gr + 1) & 7))[:, None] * Ctot + cols[None, :]  # the next group's word 0",
)


def a_tile_lines(var: str, tree: str, warps: str | int, E: int, strided: bool = False) -> list[str]:
    """Source setting ``var`` to the [2 RB, BK] fp16 A tile of one k step from ``tree`` (the join of the 16 packed
    states into [RB, CB, c, q1, q0, h]): rows 16 w + 8 c + g, columns 64 e + 16 q + 8 h + 2 t + j, the order h is
    stored in (:func:`wgmma_input_order`). One place for it: the register-A kernel and the warp-specialized form's
    decode partition must agree on it, ``warps`` being the warps that decode."""
    return ["# the 16 packed states of each element, as [RB, CB, c, q1, q0, h], split into their fp16 halves (j)",
            f"st = {tree}",
            f"{var} = gl.join(_f16_lo(st), _f16_hi(st))",
            *([f"{var} = gl.reshape({var}, [{warps}, 8, {E}, 4, 2, 2, 2, 2, 2])  # w, g, e, t, c, q1, q0, h, j",
               f"{var} = gl.permute({var}, (0, 4, 1, 2, 5, 6, 7, 3, 8))  # w, c, g | e, q1, q0, h, t, j"]
              if strided else
              [f"{var} = gl.reshape({var}, [{warps}, 8, 4, {E}, 2, 2, 2, 2, 2])  # w, g, t, e, c, q1, q0, h, j",
               f"{var} = gl.permute({var}, (0, 4, 1, 3, 5, 6, 7, 2, 8))  # w, c, g | e, q1, q0, h, t, j"]),
            f"{var} = gl.reshape({var}, [2 * RB, BK])"]


def table_mode(config: Mapping[str, Any]) -> tuple[str, int]:
    """Config ``table``: ("gather", 1), or ("shared", R) for R lane-interleaved copies written once to shared
    memory (lane l reads copy l % R: 32 copies put every lane on its own bank). Why: ``gl.gather`` re-stages its
    source in shared memory with a barrier at every k step; a table written once is read by one ld.shared."""
    mode = config.get("table", "gather")
    if mode not in WGMMA_TABLES:
        raise ValueError(f"wgmma config table={mode!r} must be one of {WGMMA_TABLES}")
    return ("gather", 1) if mode == "gather" else ("shared", int(mode[len("shared"):]))


def table_slots(config: Mapping[str, Any], table_words: int) -> int:
    """x-ring slots past STAGES that hold a shared table (its bytes rounded up to whole [BLOCK_M, BK] tiles)."""
    E, bm, _, _ = check_config(config)
    mode, rep = table_mode(config)
    if mode != "shared":
        return 0
    tile = bm * 64 * E * 2
    return -(-table_words * rep * 4 // tile)


def pipelined(config: Mapping[str, Any]) -> int:
    """Config ``PIPE`` (0 or 1). 0: each step's MMA is waited for before the next step's MMA is issued (the next
    decode overlaps it). 1: two A register sets, the loop unrolled by two, so one MMA stays in flight while the next
    step decodes into the other set and is issued right after: the tensor cores never wait for a wait. Needs an even
    number of k steps per program. Safe only if the compiler keeps the two sets apart (no copy between them): the
    launcher checks the compiled SASS (``kernels.wgmma.a_register_hazards``) and refuses a kernel that does not."""
    pipe = config.get("PIPE", 0)
    if pipe not in (0, 1) or isinstance(pipe, bool):
        raise ValueError(f"wgmma config PIPE={pipe!r} must be 0 or 1 (MMAs in flight across a decode)")
    return pipe


def word_prefetch(config: Mapping[str, Any]) -> int:
    """Config ``WPF`` (0, 1 or 2): load the next k step's words before this step's decode. Gluon does not pipeline
    loads by itself, so without it every step waits for its words' DRAM latency before decoding. The PIPE = 1 loop
    always loads one step ahead (0 and 1 alike there); 2 (PIPE = 1 only) loads two steps ahead into alternating word
    registers, so a load has a whole step of MMA more to land. Why: at 256 tokens the kernel slows with K at equal
    SASS per state (8192^2: 57.0 / 64.5 / 71.6 µs at K = 2 / 3 / 4, 12.3-12.6 per state; H100, session 24), as
    if the larger words' latency were not hidden."""
    wpf = config.get("WPF", 1)
    if wpf not in (0, 1, 2) or isinstance(wpf, bool):
        raise ValueError(f"wgmma config WPF={wpf!r} must be 0, 1 or 2 (k steps of words loaded ahead)")
    if wpf == 2 and not pipelined(config):
        raise ValueError("wgmma config WPF=2 needs PIPE=1 (its two-step loop alternates the word registers)")
    return wpf


def ablated(config: Mapping[str, Any]) -> int:
    """Config ``ABLATE`` (0, 1 or 2), for measurement only: 1 leaves the decode out of the k loop (each step multiplies
    step 0's decoded A again: no word loads, no table reads), so the kernel times its MMAs, x's TMA loads and its
    epilogue alone: the floor the decode adds to. 2 leaves the MMAs out too: x streamed through the ring alone, on
    the same grid (every program re-reads its tokens' x from the L2), which tells whether the MMAs-alone time is
    the tensor cores' or x's. Its results are wrong by design; the tuned space never has it."""
    ab = config.get("ABLATE", 0)
    if ab not in (0, 1, 2) or isinstance(ab, bool):
        raise ValueError(f"wgmma config ABLATE={ab!r} must be 0, 1 or 2 (1: the k loop without its decode; 2: "
                         "without its MMAs too)")
    return ab


def out16(config: Mapping[str, Any]) -> int:
    """Config ``OUT16`` (0 or 1): 1 stores the partial in fp16 instead of fp32, with ``SPLIT_K = 1`` only (one partial,
    nothing left to sum), as the decompress path's cuBLAS matmul hands its fp16 product to the output transform.
    Why: that transform reads half the bytes, and takes its one-fp16-partial launch (8192 columns at 256 tokens on
    the H200: 13.8 µs against 25.9 for fp32 partials, ``h200-2026-12-05-hadamard-stacked.md``). Opt-in until timed."""
    o = config.get("OUT16", 0)
    if o not in (0, 1) or isinstance(o, bool):
        raise ValueError(f"wgmma config OUT16={o!r} must be 0 or 1 (1: the partial stored in fp16)")
    if o and config.get("SPLIT_K", 1) != 1:
        raise ValueError(f"wgmma config OUT16=1 needs SPLIT_K=1 (one partial, nothing to sum), got {config.get('SPLIT_K')}")
    return o


def sharded(config: Mapping[str, Any]) -> int:
    """Source option ``SHARDS`` (0 or 1; the launcher sets it, never the tuned space): 1 emits the kernel for a fused
    weight's stacked shards (q/k/v, gate/up; ``kernels/prepare.fuse_shards``), one launch for all of them. Each
    program finds its shard from its word rows (bounds ``B1``, ``B2``) and reads that shard's rows of h (the TMA
    descriptor spans the shards' (G * M, in) h, ``stride_xg`` rows apart) and its code table (``stride_tg``).
    Why: the per-shard launches of the wgmma kind leave each grid's tail idle and pay a launch each (q/k/v at 64
    tokens on the H100, session 28: 40.7 µs for the three decodes against 15.5 for o alone)."""
    sh = config.get("SHARDS", 0)
    if sh not in (0, 1) or isinstance(sh, bool):
        raise ValueError(f"wgmma SHARDS={sh!r} must be 0 or 1 (1: a fused weight's stacked shards in one launch)")
    if sh and warp_specialized(config):
        raise ValueError("wgmma SHARDS=1 (stacked shards) has no warp-specialized form (WS=1)")
    return sh


def warp_specialized(config: Mapping[str, Any]) -> int:
    """Config ``WS`` (0 or 1): 1 emits the warp-specialized form (codegen/wgmma_ws.py): a 4-warp partition decodes A
    tiles into shared memory for two MMA warpgroups that each take half of up to 512 tokens, so each weight is decoded
    once per ``BLOCK_M`` <= 512 tokens. It needs ``num_warps`` 8 (the two MMA warpgroups), ``PIPE`` 0 (A is not in
    registers), ``BLOCK_M`` >= 64 (each warpgroup's MMA at least 32 tokens wide; :func:`check_config` checks the
    launch keys). Opt-in until timed on a GPU."""
    ws = config.get("WS", 0)
    if ws not in (0, 1):  # True / False too: the tuned space writes True (a variant flag, like the gemv's mma)
        raise ValueError(f"wgmma config WS={ws!r} must be 0 or 1 (1: the warp-specialized shared-A form)")
    if ws and (pipelined(config) or ablated(config)):
        raise ValueError("wgmma config WS=1 takes neither PIPE=1 (A is in shared memory) nor ABLATE=1")
    return int(ws)


def _check_plan(plan: TilePlan) -> None:
    if plan.GRN != 8 or plan.GCN != 1 or plan.NA != 2 or plan.NC != 16:
        raise ValueError(f"wgmma needs QTIP's layout (8 group rows, 2 row classes x 16 columns per group); "
                         f"{plan.spec.name} in layout {plan.layout!r} has {plan.GRN} group rows, {plan.NA} x {plan.NC}")


LANE_STRIDE_ENV = "QTIP_TRITON_WGMMA_LANE_STRIDE"


def lane_stride_env() -> bool | None:
    """``QTIP_TRITON_WGMMA_LANE_STRIDE``: 1 strides every E > 1 kernel's word columns over lanes, 0 none, unset: where
    it folds the order into B's columns (:func:`qtip_triton.kernels.wgmma.strided_for`); else a clear error.

    What: with E > 1, lane t of a word row decodes word columns ``t, t + 4, ...`` of a k step (E loads of one word)
    instead of ``tE .. tE + E - 1`` (one E-word vector load). The A columns a lane's element ``e`` fills are
    ``64 e + ...`` either way, so with strided lanes word column C of a step lands in the 64 A columns of ``C // 4``,
    its own 64 natural columns: every 64-column segment of h stays in place, and 11008 inputs (the Hadamard's
    64-column segments) take the kernel's order through B's columns (:func:`qtip_triton.kernels.hadamard.segment_cols`)
    at E = 2 too, instead of scattered stores. Why only there (H100, session 30, ``*-fused-layers-session30-sg1*``):
    Llama-2-7B's down projection at 64 tokens 56.4 -> 50.6 µs, while the split loads cost the decode kernels 1-2 µs
    elsewhere (q/k/v 40.5 -> 41.4, gate/up 65.2 -> 67.3). Read at each call, so the order and the source agree."""
    raw = os.environ.get(LANE_STRIDE_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{LANE_STRIDE_ENV}={raw!r}: expected 1 (always), 0 (never) or unset (where the order folds)")
    return None if raw == "" else raw == "1"


def lane_strided(E: int, strided: bool | None = None) -> bool:
    """Whether the kernel for ``E`` strides word columns over lanes: ``strided`` if given, else only when the switch
    says 1 (the per-weight automatic choice is :func:`qtip_triton.kernels.wgmma.strided_for`'s). E = 1 is the same
    kernel either way (one word per lane), so it never counts as strided."""
    return E > 1 and (bool(lane_stride_env()) if strided is None else strided)


def word_layout_src(E: int, warps: str | int, strided: bool) -> str:
    """The words' register layout over ``[RB, CB]``: lane (g, t) holds row g and columns ``tE ..`` (contiguous, one
    vector load) or, ``strided``, columns ``t, t + 4, ...`` (the layout wraps over the 4 lanes E times)."""
    return f"gl.BlockedLayout([1, {1 if strided else E}], [8, 4], [{warps}, 1], [1, 0])"


def wgmma_input_order(plan: TilePlan, n: int, E: int, strided: bool | None = None) -> torch.Tensor:
    """int64 (n,): position in the wgmma kernel's h of each natural input column (see the module doc), for the
    kernel with lanes strided or not (:func:`lane_strided`: ``strided``, else the environment switch)."""
    _check_plan(plan)
    ctot = n // TILE
    if ctot % (4 * E):
        raise ValueError(f"wgmma with E={E} needs in_features divisible by {64 * E}, got {n}")
    C = torch.arange(ctot).view(-1, 1)  # word column
    cc = torch.arange(plan.NC).view(1, -1)  # class column
    cconst = torch.tensor([v.cconst for v in plan.classes[0]])
    src = (C // plan.GCN) * TILE + cconst[cc]  # natural column of (C, cc) (GCN = 1: no group column term)
    if lane_strided(E, strided):  # lane t's element e holds word column 4 e + t of the step
        step, e, t = C // (4 * E), (C % (4 * E)) // 4, C % 4
    else:  # ... or tE + e
        step, t, e = C // (4 * E), (C % (4 * E)) // E, C % E
    q, h, j = (cc % 8) // 2, cc // 8, cc % 2
    dst = step * (64 * E) + e * 64 + q * 16 + h * 8 + t * 2 + j
    pos = torch.empty(n, dtype=torch.int64)
    pos[src.reshape(-1)] = dst.expand_as(src).reshape(-1)
    return pos


def emit_wgmma(spec: TrellisSpec, config: Mapping[str, Any] | None = None, *, layout: str | None = None) -> str:
    """Readable Gluon source of the wgmma kernel for ``spec`` (module defines ``kernel`` and ``E``)."""
    from qtip_triton.codegen.emit import default_layout

    config = dict(config or {})
    E = elements(config)
    ws = warp_specialized(config)
    wpf = word_prefetch(config)
    pipe = pipelined(config)
    ablate = ablated(config)
    half = out16(config)
    shards = sharded(config)
    strided = lane_strided(E, bool(config.get("LS", 0)))  # the launcher's source config says (kernels/wgmma.py)
    layout = layout or default_layout(spec)
    plan = make_plan(spec, layout)
    _check_plan(plan)
    dec = get_code(spec.code).triton_decoder()
    if dec.helpers:
        raise ValueError(f"wgmma: code {spec.code!r} needs Triton helpers the Gluon kernel does not carry")
    mode, rep = table_mode(config)
    if dec.table != "packed16":
        mode, rep = "global", 1
    kind = "gemv" if mode == "shared" else "gemm"  # the emitter writes ld.shared lookups for the gemv's tables
    opts = source_options(spec, {"table": "gather" if mode != "shared" else f"shared{rep if rep > 1 else ''}"}, kind)
    em = _Emitter(plan, kind, opts, dec)
    em.src.level = 2
    em.decode_values(cast=None, emit_values=False)
    # the split tree's leaves come out in a layout equal to the words' but spelled differently (Gluon does not
    # convert implicitly): name the words' layout, and let the compiler prove the conversion moves nothing
    leaf = re.compile(r"^(\s*)(s\d+_t\d+) = (gv\w+)$")
    decode = [leaf.sub(r"\1\2 = gl.convert_layout(\3, word_layout, assert_trivial=True)", line)
              for line in em.src.lines]
    pairs = packed_pairs(plan, em.state_vals, what="wgmma")
    table_words = em.table_words() if dec.table == "packed16" else None
    loads = em.word_loads()
    # A: [RB, CB] states of (row class c, class pair q + 4h) -> [2 RB, BK] rows 16w+8c+g, cols 64e+16q+8h+2t+j
    names = [pairs[c][q + 4 * h] for c in range(2) for q in range(4) for h in range(2)]
    tree = _join_tree_gl(names)

    s = _Src()
    s('"""Generated by qtip_triton.codegen.wgmma; do not edit.',
      "",
      f"spec {spec.name}, layout {plan.layout}, kind wgmma, E {E}{' lane-strided' if strided else ''}, word prefetch {wpf}, "
      f"pipeline {pipe}, table {mode} x{rep}."
      + ({0: "", 1: " ABLATED: the k loop has no decode (timing only; results are wrong).",
          2: " ABLATED: the k loop only streams x (no decode, no MMA; timing only; results are wrong)."}[ablate])
      + (" Partial stored in fp16." if half else "")
      + (" Warp-specialized: A decoded into shared memory by its own partition." if ws else "")
      + (" Stacked shards: each program reads its own shard's h and code table." if shards else ""),
      '"""',
      "",
      "from triton.experimental import gluon",
      "from triton.experimental.gluon import language as gl",
      "from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait"
      + (", fence_async_shared" if ws else ""),
      "",
      "tl = gl  # the code's decode snippet is written against triton.language; Gluon exports the same builtins",
      f"E = {E}",
      "",
      "",
      "@gluon.jit",
      "def _f16_lo(p):",
      '    """fp16 in the low half of a uint32."""',
      "    return (p & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True)",
      "",
      "",
      "@gluon.jit",
      "def _f16_hi(p):",
      '    """fp16 in the high half of a uint32."""',
      "    return (p >> 16).to(gl.uint16).to(gl.float16, bitcast=True)",
      "",
      "")
    helpers = SHARED_HELPERS.replace("@REPM1@", str(rep - 1)).replace("@BARRIER@", _barrier_call()).splitlines()
    if ws:
        from qtip_triton.codegen.wgmma_ws import WS_DECODE_REGS, emit_ws_kernel

        emit_ws_kernel(s, E=E, strided=strided, mode=mode, rep=rep, table_words=table_words, loads=loads,
                       decode=decode, tree=tree, wpf=wpf, half=half, decode_regs=WS_DECODE_REGS,
                       shared_helpers=lambda: helpers)
        return s.text()
    if mode == "shared":
        s(*helpers)
    s("@gluon.jit",
      "def kernel(W, TBL, x_desc, Y, M, Rtot, Ctot, ITERS, stride_wq, stride_ys, stride_ym,",
      *(["           B1, B2, stride_xg, stride_tg,"] if shards else []),
      "           BLOCK_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr, TSLOTS: gl.constexpr = 0):")
    s.indent()
    s('"""Y[pid_k, m, rows] = partial Ŵ x[m] over this program\'s k range: decode into wgmma A registers,',
      "x (h in wgmma order) by TMA into a ring of STAGES shared tiles.",
      '"""',
      "RB: gl.constexpr = 8 * num_warps  # word rows per program: one row group of 8 per warp",
      f"CB: gl.constexpr = 4 * {E}  # word columns per k step: 4 lanes x E elements",
      f"BK: gl.constexpr = 64 * {E}  # input columns per k step",
      f"word_layout: gl.constexpr = {word_layout_src(E, 'num_warps', strided)}",
      "acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],",
      "                                                      instr_shape=[16, BLOCK_M, 16])",
      "a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)",
      "pid_r = gl.program_id(0)",
      "pid_k = gl.program_id(1)",
      "pid_m = gl.program_id(2)",
      *WORD_OFFSETS)
    x_row = "xrow" if shards else "pid_m * BLOCK_M"  # the first row of this program's x tiles in x_desc
    if shards:
        s("# stacked shards: word rows [0, B1) are shard 0, [B1, B2) shard 1, the rest shard 2 (a program's rows never",
          "# straddle two); its shard's h rows start stride_xg * shard rows into x_desc, its code table stride_tg in",
          "shard = (pid_r * RB >= B1).to(gl.int32) + (pid_r * RB >= B2).to(gl.int32)",
          "TBL = TBL + shard * stride_tg",
          "xrow = shard * stride_xg + pid_m * BLOCK_M")
    if table_words is not None:
        s(f"tbl = gl.load(TBL + gl.arange(0, {table_words}, layout=gl.BlockedLayout([1], [32], [num_warps], [0])))")
    slots = "STAGES"
    if mode == "shared":
        slots = "STAGES + TSLOTS"
        s(f"# the code table ({rep} lane-interleaved copies) lives in the x ring's last TSLOTS tiles, written once: the",
          "# ring is the kernel's first and largest allocation, at offset 0 of shared memory (the launcher checks it)",
          "INTERPRET: gl.constexpr = False",
          "toff = STAGES * BLOCK_M * BK * 2  # byte offset of the table",
          "sbase = _smem_base(w_off) + toff",
          f"lcopy = _lane_copy(w_off, {rep})")
    s(f"x_smem = gl.allocate_shared_memory(gl.float16, [{slots}, BLOCK_M, BK], x_desc.layout)",
      "bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())",
      "for i in gl.static_range(STAGES):",
      "    mbarrier.init(bars.index(i), count=1)",
      "for i in gl.static_range(STAGES):  # the first x tiles in flight before any decode",
      "    mbarrier.expect(bars.index(i), x_desc.block_type.nbytes, pred=i < ITERS)",
      f"    tma.async_copy_global_to_shared(x_desc, [{x_row}, (step0 + i) * BK], bars.index(i),",
      "                                    x_smem.index(i), pred=i < ITERS)",
      "acc = gl.zeros([2 * RB, BLOCK_M], gl.float32, acc_layout)")
    if mode == "shared":
        s(f"_fill_table(tbl, gl.arange(0, {table_words}, layout=gl.BlockedLayout([1], [32], [num_warps], [0])), {rep}, "
          "toff)")
    def assemble(var: str) -> None:
        s(*a_tile_lines(var, tree, "num_warps", E, strided),
          f"{var} = gl.convert_layout({var}, a_layout, assert_trivial=True)")

    if pipe:
        _two_buffer_loop(s, loads, decode, assemble, ablate, ahead=2 if wpf == 2 else 1, x_row=x_row)
    else:
        s("# step 0 decoded before the loop: inside it, step it + 1 decodes while the tensor cores multiply step it")
        for name, off in loads:
            s(f"{name} = gl.load(W + {off}).to(gl.uint32, bitcast=True)")
        s.lines.extend(line[4:] for line in decode)
        assemble("a")
        if wpf:
            for name, off in loads:
                s(f"{name}_next = gl.load(W + {off} + CB, mask=ITERS > 1, other=0)  # step 1's words")
        s("for it in range(ITERS):")
        s.indent()
        s("slot = it % STAGES",
          "mbarrier.wait(bars.index(slot), (it // STAGES) & 1)")
        if ablate < 2:
            s("acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)")
        s("# the next step's words and decode run on the CUDA cores meanwhile (past the last step: masked, unused)")
        if ablate:
            s("a_next = a  # ABLATE: no decode")
        elif wpf:
            for name, _ in loads:
                s(f"{name} = {name}_next.to(gl.uint32, bitcast=True)")
            for name, off in loads:
                s(f"{name}_next = gl.load(W + {off} + 2 * CB, mask=it + 2 < ITERS, other=0)")
        else:
            for name, off in loads:
                s(f"{name} = gl.load(W + {off} + CB, mask=it + 1 < ITERS, other=0).to(gl.uint32, bitcast=True)")
        if not ablate:
            s.lines.extend(decode)
            assemble("a_next")
        s("# wgmma reads its A registers while it runs: `a` (live until this wait) keeps them; only after it may they",
          "# take the next step's values, and this step's x slot the tile STAGES steps ahead")
        if ablate < 2:
            s("acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))")
        s("nxt = it + STAGES",
          "mbarrier.expect(bars.index(slot), x_desc.block_type.nbytes, pred=nxt < ITERS)",
          f"tma.async_copy_global_to_shared(x_desc, [{x_row}, (step0 + nxt) * BK], bars.index(slot),",
          "                                x_smem.index(slot), pred=nxt < ITERS)",
          "a = a_next",
          "w_off += CB",
          "n_off += CB")
        s.dedent()
        s("acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))")
    s("for i in gl.static_range(STAGES):",
      "    mbarrier.invalidate(bars.index(i))",
      "orow = pid_r * 2 * RB + gl.arange(0, 2 * RB, layout=gl.SliceLayout(1, acc_layout))",
      "m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))",
      "mask = (orow < 2 * Rtot)[:, None] & (m < M)[None, :]",
      "gl.store(Y + pid_k * stride_ys + m[None, :] * stride_ym + orow[:, None], "
      + ("acc.to(gl.float16)" if half else "acc") + ", mask=mask)")
    s.dedent()
    return s.text()


def _two_buffer_loop(s: _Src, loads: list[tuple[str, str]], decode: list[str], assemble, ablate: int = 0,
                     ahead: int = 1, x_row: str = "pid_m * BLOCK_M") -> None:
    """The PIPE = 1 main loop (see :func:`pipelined`): steps alternate between A register sets ``a0`` and ``a1``; after
    issuing a step's MMA the kernel waits until only it is in flight (retiring the other set's MMA), refills that
    step's x slot, loads and decodes the step after into the freed set. ``ahead`` = 2 (``WPF=2``): each half loads the
    words of the step after the one it decodes, into word registers of its parity (``_ahead0`` / ``_ahead1``), and decodes
    from those the other half loaded. ``x_row``: the first x_desc row of the program's x tiles."""
    def half(cur: str, other: str, k: str) -> None:
        s(f"# step it + {k} on {cur}; the MMA of the step before (on {other}) retires, and {other} takes step it + {k} + 1")
        if not ablate:
            for name, off in loads:
                if ahead == 2:
                    s(f"{name}_ahead{k} = gl.load(W + {off} + ({k} + 2) * CB, mask=it + {k} + 2 < ITERS, other=0)"
                      f"  # step it + {k} + 2")
                else:
                    s(f"{name}_n = gl.load(W + {off} + ({k} + 1) * CB, mask=it + {k} + 1 < ITERS, other=0)")
        s(f"slot = (it + {k}) % STAGES",
          f"mbarrier.wait(bars.index(slot), ((it + {k}) // STAGES) & 1)")
        if ablate < 2:
            s(f"acc = warpgroup_mma({cur}, x_smem.index(slot).permute((1, 0)), acc, is_async=True)",
              f"acc, {other} = warpgroup_mma_wait(num_outstanding=1, deps=(acc, {other}))")
        s(f"done = it + {k} - 1  # the retired step: its x slot takes the step STAGES ahead",
          "nxt = done + STAGES",
          "ok = (done >= 0) & (nxt < ITERS)",
          "mbarrier.expect(bars.index(nxt % STAGES), x_desc.block_type.nbytes, pred=ok)",
          f"tma.async_copy_global_to_shared(x_desc, [{x_row}, (step0 + nxt) * BK], bars.index(nxt % STAGES),",
          "                                x_smem.index(nxt % STAGES), pred=ok)")
        if ablate:
            s(f"{other} = {cur}  # ABLATE: no decode")
            return
        src = f"_ahead{1 - int(k)}" if ahead == 2 else "_n"  # step it + k + 1: loaded by the half before this one
        for name, _ in loads:
            s(f"{name} = {name}{src}.to(gl.uint32, bitcast=True)")
        s.lines.extend(decode)
        assemble(other)

    s("# step 0 decoded before the loop into a0; a1 starts as zeros (its first MMA wait has nothing to retire)")
    for name, off in loads:
        s(f"{name} = gl.load(W + {off}).to(gl.uint32, bitcast=True)")
    if ahead == 2 and not ablate:
        for name, off in loads:
            s(f"{name}_ahead1 = gl.load(W + {off} + CB, mask=1 < ITERS, other=0)  # step 1's words, two steps ahead")
    s.lines.extend(line[4:] for line in decode)
    assemble("a0")
    s("a1 = gl.zeros([2 * RB, BK], gl.float16, a_layout)",
      "for it in range(0, ITERS, 2):")
    s.indent()
    half("a0", "a1", "0")
    half("a1", "a0", "1")
    s("w_off += 2 * CB",
      "n_off += 2 * CB")
    s.dedent()
    s("acc, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a1))  # the last MMA (on a1) still reads a1")


def _barrier_call() -> str:
    """The CTA barrier under this Triton's Gluon name (``thread_barrier`` in 3.6, ``barrier`` later)."""
    from triton.experimental.gluon import language as gl

    return "gl.thread_barrier()" if hasattr(gl, "thread_barrier") else "gl.barrier()"


def _join_tree_gl(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return f"gl.join({_join_tree_gl(names[0::2])}, {_join_tree_gl(names[1::2])})"
