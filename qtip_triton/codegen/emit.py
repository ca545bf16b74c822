"""Emit the Triton source of one kernel for one (spec, tile order, kind, source options).

Everything that the trellis fixes is folded into the text: which word of a group holds each state's
window, the shifts and masks that cut it out, the code's arithmetic, the bit scatter from (s, f) to
the tile row/column, and the per-class row offsets. Only block sizes (``TR``, ``TC``, ``BLOCK_M``),
the shape and the split are left to ``tl.constexpr``/run-time arguments, so one generated module
serves every tuning config of its spec.

Kinds (signatures are documented in :mod:`qtip_triton.kernels`):

* ``gemv``: decode, then multiply-accumulate on CUDA cores into a ``[BLOCK_M, RB, CB]`` fp32 tile per
  row class; reduce over k once at the end. Split-K partials go to ``Y[split]``.
* ``gemm``: decode, convert to x's dtype, and ``tl.dot`` each row class with the x tile
  (``[BK, BLOCK_M]`` gathered in the class's column order); split-K partials as gemv.
* ``decompress``: decode and store Ŵ (out x in) in the output's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from qtip_triton.codegen.mma import (
    MMA_COLS,
    MMA_HELPERS,
    MMA_ROW_GROUPS,
    MMA_ROWS,
    PACK_HELPER,
    ROWS_REPEAT_HELPERS,
    packed_pairs,
)
from qtip_triton.codegen.plan import TilePlan, make_plan
from qtip_triton.codes import get_code
from qtip_triton.spec import TrellisSpec

KINDS = ("gemv", "gemm", "decompress")
TABLE_MODES = ("gather", "gather2", "gather4", "gather8", "shared", "shared2", "shared4", "shared8", "shared16",
               "shared32", "global")
SHARED_TABLE_KINDS = ("gemv",)  # kinds with no Triton shared-memory use inside the k loop
SOURCE_KEYS = ("table", "BLOCK_M", "prefetch", "l2_prefetch")  # config keys that can change the text (BLOCK_M,
# prefetch: gemv only; l2_prefetch: gemv and gemm)
GENERATOR_VERSION = "1"
SUM_UNROLL = 4  # split-K partials the in-kernel sum loads per step (split_sum)
L2_PREFETCH_KINDS = ("gemv", "gemm")  # kinds with a k loop over word steps
L2_PREFETCH_MAX = 8  # k steps of words an l2_prefetch config may prefetch ahead


def default_layout(spec: TrellisSpec) -> str:
    """QTIP's kernel format for the released shape (L=16, V=2), the generic tile layout otherwise."""
    return "qtip" if spec.L == 16 and spec.V == 2 else "tile"


def source_options(spec: TrellisSpec, config: Mapping[str, Any] | None, kind: str | None = None) -> dict[str, Any]:
    """The subset of ``config`` that shapes the source, with defaults filled in and checked.

    gemv unrolls its batch rows (one 2-D accumulator per row and class keeps every tensor in the
    layout of the word loads), so its ``BLOCK_M`` is part of the source.
    """
    config = dict(config or {})
    extra: dict[str, Any] = {}
    if kind == "gemv":
        bm = config.get("BLOCK_M", 1)
        if isinstance(bm, bool) or not isinstance(bm, int) or bm < 1 or bm > 16:
            raise ValueError(f"config BLOCK_M={bm!r} must be an int in [1, 16] for gemv")
        extra["BLOCK_M"] = bm
        pf = config.get("prefetch", 0)
        if pf not in (0, 1, 2) and pf not in (False, True):
            raise ValueError(f"config prefetch={pf!r} must be 0, 1 or 2 (k steps of words loaded ahead)")
        extra["prefetch"] = int(pf)
        fuse_in = config.get("fuse_in", False)
        if not isinstance(fuse_in, bool):
            raise ValueError(f"config fuse_in={fuse_in!r} must be a bool (input transform inside the gemv)")
        if fuse_in:  # only when on: every existing config keeps its source (and cache key)
            extra["fuse_in"] = True
        mma = config.get("mma", False)
        if not isinstance(mma, bool):
            raise ValueError(f"config mma={mma!r} must be a bool (the gemv on tensor cores)")
        if mma:
            if bm not in (8, 16):
                raise ValueError(f"config mma needs BLOCK_M 8 or 16 (batch rows per mma), got {bm}")
            if fuse_in or extra["prefetch"]:
                raise ValueError("config mma does not combine with fuse_in or prefetch")
            extra["mma"] = True
            groups = mma_row_groups(config)
            if groups > 1:  # only when above one: every existing config keeps its source (and cache key)
                extra["mma_groups"] = groups
        hfma = config.get("hfma", False)
        if not isinstance(hfma, bool):
            raise ValueError(f"config hfma={hfma!r} must be a bool (fp16x2 multiply-adds in the gemv)")
        if hfma:  # only when on: every existing config keeps its source (and cache key)
            if mma or fuse_in or extra["prefetch"]:
                raise ValueError("config hfma does not combine with mma, fuse_in or prefetch")
            extra["hfma"] = True
        early = config.get("early_words", False)
        if not isinstance(early, bool):
            raise ValueError(f"config early_words={early!r} must be a bool (first k step's words loaded before the "
                             "table fill and the PDL wait)")
        if early:  # only when on: every existing config keeps its source (and cache key)
            if fuse_in or extra["prefetch"]:
                raise ValueError("config early_words does not combine with fuse_in or prefetch")
            extra["early_words"] = True
    if kind in L2_PREFETCH_KINDS:
        l2 = config.get("l2_prefetch", 0)
        if isinstance(l2, bool) or not isinstance(l2, int) or not 0 <= l2 <= L2_PREFETCH_MAX:
            raise ValueError(f"config l2_prefetch={l2!r} must be an int in [0, {L2_PREFETCH_MAX}] (k steps of words "
                             "prefetched into L2 ahead)")
        if l2:  # only when on: every existing config keeps its source (and cache key)
            extra["l2_prefetch"] = l2
    elif config.get("l2_prefetch"):
        raise ValueError(f"config l2_prefetch is only for kinds {L2_PREFETCH_KINDS}, not {kind!r}")
    dec = get_code(spec.code).triton_decoder()
    table = config.get("table", "gather")
    if table not in TABLE_MODES:
        raise ValueError(f"config 'table' must be one of {TABLE_MODES}, got {table!r}")
    if dec.table != "packed16":
        table = "global"  # large or absent tables are read by pointer
    if table.startswith("shared") and kind not in SHARED_TABLE_KINDS:
        raise ValueError(f"table={table!r} is only for kinds {SHARED_TABLE_KINDS}, not {kind!r}")
    return {"table": table, **extra}


def mma_row_groups(config: Mapping[str, Any]) -> int:
    """8-row word groups per warp of an mma gemv config: BLOCK_N / (16 x num_warps), 1, 2 or 4.

    Why it shapes the source: a warp's row groups multiply the same x, so with more than one the kernel
    loads x for one group and repeats it in registers (codegen/mma.py); the other groups read no x."""
    bn, warps = config.get("BLOCK_N"), config.get("num_warps", 4)
    if bn is None:  # source options (emit's input) carry the count itself
        groups = config.get("mma_groups", 1)
        if groups not in MMA_ROW_GROUPS or isinstance(groups, bool):
            raise ValueError(f"mma_groups={groups!r} must be one of {MMA_ROW_GROUPS}")
        return groups
    if (isinstance(bn, bool) or isinstance(warps, bool) or not isinstance(bn, int) or not isinstance(warps, int)
            or warps < 1 or bn % (16 * warps) or bn // (16 * warps) not in MMA_ROW_GROUPS):
        raise ValueError(f"config mma needs BLOCK_N = 16 x num_warps x {' or '.join(map(str, MMA_ROW_GROUPS))} "
                         f"(8-row word groups per warp), got BLOCK_N={bn!r} with num_warps={warps!r}")
    return bn // (16 * warps)


def table_replicas(opts: Mapping[str, Any]) -> int:
    """Copies of the on-chip table ("gatherR"/"sharedR"): lane-spread copies cut bank conflicts."""
    t = opts["table"]
    for mode in ("gather", "shared"):
        if t.startswith(mode) and len(t) > len(mode):
            return int(t[len(mode):])
    return 1


HFMA_HELPERS = '''
@triton.jit
def _hfma2(a, b, c, INTERPRET: tl.constexpr):
    """a * b + c on packed fp16x2 registers: one HFMA2 (two weights) on the GPU; the interpreter rounds
    the exact fp32 product-sum to fp16 per half."""
    if INTERPRET:
        lo = (_f16_lo(a).to(tl.float32) * _f16_lo(b).to(tl.float32) + _f16_lo(c).to(tl.float32)).to(tl.float16)
        hi = (_f16_hi(a).to(tl.float32) * _f16_hi(b).to(tl.float32) + _f16_hi(c).to(tl.float32)).to(tl.float16)
        return _pack_f16x2(lo, hi)
    else:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.uint32,
                                         is_pure=True, pack=1)

'''

L2_PREFETCH_HELPER = '''
@triton.jit
def _prefetch_l2(ptrs, INTERPRET: tl.constexpr):
    """Ask the L2 for the 128-byte lines holding ``ptrs`` (prefetch.global.L2: no register result, nothing
    to wait for). A hint only: results never depend on it, so the interpreter skips it."""
    if not INTERPRET:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)

'''

SHARED_TABLE_HELPERS = '''
@triton.jit
def _smem_base(like, INTERPRET: tl.constexpr):
    """Byte address of the kernel-owned table in shared memory (the start of Triton's dynamic shared
    memory, which this kernel uses for nothing else inside its k loop)."""
    if INTERPRET:
        return (like * 0).to(tl.uint32)
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, global_smem;", "=r,r", [like], dtype=tl.uint32,
                                         is_pure=True, pack=1)


@triton.jit
def _lane_copy(like, REP: tl.constexpr, INTERPRET: tl.constexpr):
    """Byte offset of this lane's copy inside an entry's REP interleaved words: (lane % REP) * 4.

    Its bits sit below the entry offset's (entry * 4 * REP), so the lookup ORs them in: the mask and
    the OR fold into one LOP3 and the uniform base stays in the LDS's immediate operand."""
    if INTERPRET:
        return (like * 0).to(tl.uint32)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 l; mov.u32 l, %laneid; and.b32 l, l, @REPM1@; shl.b32 $0, l, 2; }",
            "=r,r", [like], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _fill_table(tbl, TBL, TW: tl.constexpr, REP: tl.constexpr, seed, INTERPRET: tl.constexpr):
    """Write REP interleaved copies of the TW-word table (word i of copy r at i*REP + r) to the start
    of shared memory, then barrier.

    The dummy gather makes Triton size its dynamic shared memory for TW*REP words (its scratch
    buffer); its source is a splat of a run-time value (one register, not TW*REP) and its result
    only feeds the fill so that it is not removed. With copies, the REP consecutive words of one
    entry are written by 128-bit stores whose element e covers bytes [16e, 16e + 16): consecutive
    lanes write consecutive 16-byte chunks, so no store conflicts (one scalar store per copy would
    put the lanes of a warp on two banks: a 16-way conflict that cost more than the lookups saved).
    """
    if not INTERPRET:
        if REP == 1:
            z = tl.gather(tl.full([TW], seed, tl.int32), tl.zeros([TW], dtype=tl.int32), 0)
            tl.inline_asm_elementwise(
                "{ .reg .b32 a; mov.b32 a, global_smem; add.u32 a, a, $1; st.shared.b32 [a], $2; mov.b32 $0, $3; }",
                "=r,r,r,r", [tl.arange(0, TW) * 4, tbl, z], dtype=tl.int32, is_pure=False, pack=1)
        elif REP == 2:
            e = tl.arange(0, TW)
            z = tl.gather(tl.full([TW * REP], seed, tl.int32), tl.zeros([TW], dtype=tl.int32), 0)
            tl.inline_asm_elementwise(
                "{ .reg .b32 a; mov.b32 a, global_smem; add.u32 a, a, $1; st.shared.v2.b32 [a], {$2, $2}; "
                "mov.b32 $0, $3; }", "=r,r,r,r", [e * 8, tbl, z], dtype=tl.int32, is_pure=False, pack=1)
        else:  # REP // 4 rounds of TW chunks (a few registers each): chunk e holds 4 copies of entry e // (REP // 4)
            z = tl.gather(tl.full([TW * REP], seed, tl.int32), tl.zeros([TW], dtype=tl.int32), 0)
            for c in tl.static_range(REP // 4):
                e = c * TW + tl.arange(0, TW)
                v = tl.load(TBL + e // (REP // 4))
                tl.inline_asm_elementwise(
                    "{ .reg .b32 a; mov.b32 a, global_smem; add.u32 a, a, $1; "
                    "st.shared.v4.b32 [a], {$2, $2, $2, $2}; mov.b32 $0, $3; }",
                    "=r,r,r,r", [e * 16, v, z], dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()


@triton.jit
def _lds(addr, ptr, INTERPRET: tl.constexpr):
    """A 32-bit table word from shared memory at byte address ``addr`` (the interpreter has no
    shared memory: it reads the same word from global memory at ``ptr``)."""
    if INTERPRET:
        return tl.load(ptr)
    else:
        return tl.inline_asm_elementwise("ld.shared.b32 $0, [$1];", "=r,r", [addr], dtype=tl.int32,
                                         is_pure=True, pack=1)

'''


class _Src:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.level = 0

    def __call__(self, *lines: str) -> None:
        for line in lines:
            self.lines.append(("    " * self.level + line) if line else "")

    def indent(self) -> None:
        self.level += 1

    def dedent(self) -> None:
        self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _deposit(var: str, pairs: Iterable[tuple[int, int]]) -> str:
    """Expression moving bit k of ``var`` to bit d for each (k, d); runs of adjacent bits move together."""
    runs: list[list[int]] = []  # [k0, d0, length]
    for k, d in sorted(pairs):
        if runs and runs[-1][0] + runs[-1][2] == k and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([k, d, 1])
    terms = []
    for k, d, n in runs:
        field = f"({var} >> {k})" if k else var
        field = f"({field} & {(1 << n) - 1})"
        terms.append(f"({field} << {d})" if d else field)
    return " | ".join(terms) if terms else "0"


def _state_lines(plan: TilePlan, s: int, need_mask: bool) -> str:
    """Source for state ``s`` of a group (uint32 [RB, CB]) from the word tensors w<q> / wn.

    Without ``need_mask`` the bits above the window are left in place (the code ignores them).
    """
    L = plan.spec.L
    w = plan.windows[s]
    mask = (1 << L) - 1
    cur = f"w{w.slot}"
    if not w.spills:
        shift = 32 - L - w.offset
        expr = f"({cur} >> {shift})" if shift else cur
        if w.offset and need_mask:  # bits above the window must go
            expr = f"({expr} & {mask:#x})"
        return f"s{s} = {expr}"
    nxt = "wn" if w.slot + 1 == plan.G else f"w{w.slot + 1}"
    left = w.offset + L - 32  # bits of the window that come from the next word
    expr = f"({cur} << {left}) | ({nxt} >> {32 - left})"  # a funnel shift
    return f"s{s} = ({expr}) & {mask:#x}" if need_mask else f"s{s} = {expr}"


def _join_tree(names: list[str]) -> str:
    """tl.join tree whose flattened trailing axes enumerate ``names`` in order (last axis = index bit 0)."""
    if len(names) == 1:
        return names[0]
    return f"tl.join({_join_tree(names[0::2])}, {_join_tree(names[1::2])})"


def table_words(spec: TrellisSpec) -> int:
    """Words of the kernel table the generated kernels read for ``spec``'s code (1: a dummy, for computed codes)."""
    dec = get_code(spec.code).triton_decoder()
    if dec.table == "packed16":
        assert spec.Q is not None
        return (1 << spec.Q) * ((spec.V + 1) // 2)
    if dec.table == "float32":
        return (1 << spec.L) * spec.V
    return 1


def emit(spec: TrellisSpec, kind: str, config: Mapping[str, Any] | None = None, *, layout: str | None = None) -> str:
    """Readable Triton source of the ``kind`` kernel for ``spec`` stored in ``layout``.

    The module defines ``kernel`` (the @triton.jit function) and metadata constants (``SPEC``,
    ``LAYOUT``, ``KIND``, ``GRN``, ``GCN``, ``G``, ``TABLE_WORDS``). ``config`` may hold any tuning keys;
    only :data:`SOURCE_KEYS` affect the text.
    """
    if not isinstance(spec, TrellisSpec):
        raise TypeError(f"spec must be a TrellisSpec, got {type(spec).__name__}")
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; kinds: {', '.join(KINDS)}")
    layout = layout or default_layout(spec)
    plan = make_plan(spec, layout)
    opts = source_options(spec, config, kind)
    dec = get_code(spec.code).triton_decoder()
    return _Emitter(plan, kind, opts, dec).emit()


class _Emitter:
    def __init__(self, plan: TilePlan, kind: str, opts: dict[str, Any], dec) -> None:
        self.plan, self.kind, self.opts, self.dec = plan, kind, opts, dec
        self.src = _Src()
        self._cur = ""
        self._pending: list[tuple[str, str]] = []

    # -------------------------------------------------------------------------------- pieces
    def joined_gather(self) -> bool:
        return self.dec.table == "packed16" and self.opts["table"].startswith("gather")

    def shared_table(self) -> bool:
        return self.dec.table == "packed16" and self.opts["table"].startswith("shared")

    def lookup(self, idx: str) -> str:
        if self.shared_table():
            rep = table_replicas(self.opts)
            off = f"({idx}).to(tl.uint32) * {4 * rep}"
            if rep > 1:  # this lane's copy: low address bits the entry offset leaves clear
                off = f"({off} | lcopy)"
            return f"_lds(sbase + {off}, TBL + ({idx}), INTERPRET)"
        if self.joined_gather():
            # placeholder: the generator gathers every state's entries of a k step in one tl.gather
            name = f"{self._cur}_t{len(self._pending)}"
            self._pending.append((name, idx))
            return name
        return f"tl.load(TBL + ({idx}))"

    def table_words(self) -> int:
        return table_words(self.plan.spec)

    def header(self) -> None:
        p, spec, s = self.plan, self.plan.spec, self.src
        cols = [v.cconst for v in p.classes[0]]
        s(
            f'"""Generated by qtip_triton.codegen (v{GENERATOR_VERSION}); do not edit.',
            "",
            f"spec {spec.name}, layout {p.layout}, kind {self.kind}, options {self.opts}.",
            f"Groups: {p.S} states in {p.G} word(s), {p.NG} per tile; per tile {p.GRN} group rows x {p.GCN} group cols.",
            f"Row classes (row offset in tile): {[p.rconst(a) for a in range(p.NA)]}; "
            f"column offsets per class: {cols}.",
            '"""',
            "",
            "import triton",
            "import triton.language as tl",
            "",
            "from qtip_triton.kernels.pdl import grid_dependency_sync",
            *(["", "from qtip_triton.kernels.hadamard_jit import _split_dot, _split_dot_rhs"]
              if self.opts.get("fuse_in") else []),
            "",
            "",
            "@triton.jit",
            "def _f16_lo(p):",
            '    """fp16 in the low half of a uint32."""',
            "    return (p & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)",
            "",
            "",
            "@triton.jit",
            "def _f16_hi(p):",
            '    """fp16 in the high half of a uint32."""',
            "    return (p >> 16).to(tl.uint16).to(tl.float16, bitcast=True)",
            "",
            "",
            "@triton.jit",
            "def _f16_lo_f32(p, INTERPRET: tl.constexpr):",
            '    """float32 of the fp16 in the low half: one cvt from the packed register on the GPU."""',
            "    if INTERPRET:",
            "        return _f16_lo(p).to(tl.float32)",
            "    else:",
            '        return tl.inline_asm_elementwise("{ .reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, l; }",',
            '                                         "=r,r", [p], dtype=tl.float32, is_pure=True, pack=1)',
            "",
            "",
            "@triton.jit",
            "def _f16_hi_f32(p, INTERPRET: tl.constexpr):",
            '    """float32 of the fp16 in the high half."""',
            "    if INTERPRET:",
            "        return _f16_hi(p).to(tl.float32)",
            "    else:",
            '        return tl.inline_asm_elementwise("{ .reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, h; }",',
            '                                         "=r,r", [p], dtype=tl.float32, is_pure=True, pack=1)',
            "",
        )
        if self.shared_table():
            rep = table_replicas(self.opts)
            helpers = SHARED_TABLE_HELPERS.replace("@REPM1@", str(rep - 1))
            s(*helpers.splitlines(), "")
        if self.opts.get("mma") or self.opts.get("hfma"):
            s(*PACK_HELPER.splitlines(), "")
        if self.opts.get("mma"):
            s(*MMA_HELPERS.splitlines(), "")
        if self.opts.get("mma_groups", 1) > 1:
            s(*ROWS_REPEAT_HELPERS.splitlines(), "")
        if self.opts.get("hfma"):
            s(*HFMA_HELPERS.splitlines(), "")
        if self.opts.get("l2_prefetch"):
            s(*L2_PREFETCH_HELPER.splitlines(), "")
        if self.dec.helpers:  # the code's own helpers (e.g. one dp4a for a byte sum)
            s("", *self.dec.helpers.strip("\n").splitlines(), "", "")
        s(
            f"SPEC = {spec.name!r}",
            f"LAYOUT = {p.layout!r}",
            f"KIND = {self.kind!r}",
            f"GRN = {p.GRN}",
            f"GCN = {p.GCN}",
            f"G = {p.G}",
            f"TABLE_WORDS = {self.table_words()}",
            "",
            "",
        )

    def prologue(self, split: bool, defer_table: bool = False, l2_head: bool = True) -> None:
        """Program coordinates, offsets of words, next-group words, x columns and output rows.

        ``defer_table``: the caller writes the shared-memory table itself (``shared_table_fill``) after
        code that uses Triton's shared memory (``fuse_in``'s dots), which would overwrite it.
        ``l2_head``: with ``l2_prefetch``, its first prefetches go here, before the table fill (False: the
        caller issues them itself, after loads that must go first).
        """
        p, s = self.plan, self.src
        s(f"RB: tl.constexpr = TR * {p.GRN}  # rows of the word matrix per program (tile rows x group rows)")
        s(f"CB: tl.constexpr = TC * {p.GCN}  # cols of the word matrix per k step (tile cols x group cols)")
        s(f"BK: tl.constexpr = TC * 16  # input columns per k step ({p.GCN} group cols x {p.NC} values)")
        s("pid_r = tl.program_id(0)")
        if split:
            s("pid_k = tl.program_id(1)")
            s("pid_m = tl.program_id(2)")
            s("col0 = pid_k * ITERS * CB")
            s("# fused shards decoded in one launch (up to 3, word rows split at b1 <= b2): this row block's")
            s("# shard reads its own h (its own SU) and its own code table (0 apart when they share one)")
            s("shard = (pid_r * RB >= shard_b1).to(tl.int32) + (pid_r * RB >= shard_b2).to(tl.int32)")
            s("X += shard * stride_xg")
            s("TBL += shard * stride_tg")
        else:
            s("pid_k = tl.program_id(1)")
            s("col0 = pid_k * CB")
        s("rows = pid_r * RB + tl.arange(0, RB)")
        s("cols = col0 + tl.arange(0, CB)")
        s("rmask = rows < Rtot")
        s(f"gr = rows & {p.GRN - 1}  # group row inside the tile" if p.GRN > 1 else "gr = rows * 0")
        s(f"gc = cols & {p.GCN - 1}  # group col inside the tile" if p.GCN > 1 else "gc = cols * 0")
        rv = _deposit("gr", [(k, p.bit_map[i] - 4) for k, i in enumerate(p.gr_bits)])
        s(f"orow = (rows // {p.GRN}) * 16 + {rv}  # output row of class 0")
        s(f"n_in = Ctot * {16 // p.GCN}")
        s("w_off = rows[:, None] * Ctot + cols[None, :]")
        if any(w.spills and w.slot + 1 == p.G for w in p.windows):
            gb = p.g_base
            terms = []
            if p.gr_bits:
                terms.append(_deposit("gr[:, None]", [(k, i - gb) for k, i in enumerate(p.gr_bits)]))
            if p.gc_bits:
                terms.append(_deposit("gc[None, :]", [(k, i - gb) for k, i in enumerate(p.gc_bits)]))
            s(f"g = {' | '.join(terms)}  # group index in the tile")
            s(f"gn = (g + 1) & {p.NG - 1}  # the next group, circularly: its word 0 ends the last window")
            n_off = "(rows - gr)[:, None] * Ctot + (cols - gc)[None, :]"
            if p.gr_bits:
                n_off += f" + ({_deposit('gn', [(i - gb, k) for k, i in enumerate(p.gr_bits)])}) * Ctot"
            if p.gc_bits:
                n_off += f" + ({_deposit('gn', [(i - gb, k) for k, i in enumerate(p.gc_bits)])})"
            s(f"n_off = {n_off}")
        if split and l2_head:
            self.l2_prefetch_head()
        if self.shared_table() and not defer_table:
            self.shared_table_fill()
        if self.joined_gather():
            rep = table_replicas(self.opts)
            if rep == 1:
                s(f"tbl = tl.load(TBL + tl.arange(0, {self.table_words()}))  # the whole code table, gathered on chip")
            else:
                s(f"# {rep} interleaved copies of the table; neighbouring columns (lanes) read different copies,")
                s("# so random entries spread over more shared-memory banks")
                s(f"tbl = tl.load(TBL + tl.arange(0, {self.table_words() * rep}) // {rep})")
                s(f"rep = (tl.arange(0, CB) % {rep})[None, :]")

    def _l2_prefetch_words(self, step: str) -> None:
        """Prefetch into L2 the lines of k step ``step`` (absolute, from the program's first) of every word slot."""
        s = self.src
        for q in self.word_slots():
            base = f"W + {q} * stride_wq + pf_off" if q else "W + pf_off"
            s(f"_prefetch_l2({base} + {step} * CB, INTERPRET)")
            s("if not PF_ALIGNED:")
            s(f"    _prefetch_l2({base.replace('pf_off', 'pf_end')} + {step} * CB, INTERPRET)")

    def l2_prefetch_head(self) -> None:
        """``l2_prefetch`` = D: the words of k steps 1..D are requested into L2 before the table fill and the
        PDL wait (they are constants of the layer); the k loop keeps D steps requested ahead.

        Why: at M = 1 a layer that fills the GPU in one wave (8192x8192: every program 2 k steps) has all
        programs load their step at the same moment, then compute while DRAM idles, then load again. A
        prefetch has no register result: the whole program's words stream into L2 from its first cycle
        at no register cost (a register prefetch of the next step costs a step's words in registers), and
        the step's own loads then hit L2. Next-group words (``wn``) lie in the same rows and columns."""
        d = self.opts.get("l2_prefetch", 0)
        if not d:
            return
        s = self.src
        s(f"# L2 prefetch of the next {d} k step(s) of words: one prefetch.global.L2 per 128-byte line of each")
        s("# word row's CB words (plus the row's last word when rows may straddle a line: PF_ALIGNED)")
        s("PFL: tl.constexpr = (CB + 31) // 32  # prefetches per word row and k step")
        if self.kind == "gemv":  # Ctot is a compile-time constant there
            s("PF_ALIGNED: tl.constexpr = (Ctot % 32 == 0) and (CB % 32 == 0)")
        else:
            s("PF_ALIGNED: tl.constexpr = False  # Ctot is a run-time value: always prefetch each row's last word")
        s("pf_off = rows[:, None] * Ctot + col0 + tl.arange(0, PFL)[None, :] * 32")
        s("pf_end = rows * Ctot + col0 + (CB - 1)")
        s(f"for pf in tl.static_range(1, {d + 1}):")
        s.indent()
        s("if pf < ITERS:")
        s.indent()
        self._l2_prefetch_words("pf")
        s.dedent()
        s.dedent()

    def l2_prefetch_step(self, it: str = "it") -> None:
        """At the top of k step ``it``: request step it + D + 1, so D steps stay requested ahead."""
        d = self.opts.get("l2_prefetch", 0)
        if not d:
            return
        s = self.src
        s(f"if {it} + {d + 1} < ITERS:  # keep {d} k step(s) of words requested into L2 ahead")
        s.indent()
        self._l2_prefetch_words(f"({it} + {d + 1})")
        s.dedent()

    def shared_table_fill(self) -> None:
        """Write the code table to the start of shared memory (the k loop reads it with ld.shared)."""
        s = self.src
        rep = table_replicas(self.opts)
        copies = f" ({rep} interleaved copies: lane l reads copy l % {rep})" if rep > 1 else ""
        s(f"# the code table{copies} is written")
        s("# once to shared memory that this kernel owns for the whole k loop: one ld.shared per lookup,")
        s("# no per-step table store or barriers (tl.gather re-stages its source at every call)")
        s(f"tbl = tl.load(TBL + tl.arange(0, {self.table_words()}))")
        s("sbase = _smem_base(rows[:, None] * 0 + cols[None, :], INTERPRET)")
        if rep > 1:
            s(f"lcopy = _lane_copy(rows[:, None] * 0 + cols[None, :], {rep}, INTERPRET)")
        s(f"_fill_table(tbl, TBL, {self.table_words()}, {rep}, ITERS, INTERPRET)")

    def dependency_sync(self) -> None:
        """PDL: everything above reads only the layer's constants (words' offsets, the code table);
        the activations, partials and outputs are touched only after the previous kernels finish."""
        self.src("grid_dependency_sync(PDL)  # programmatic dependent launch (kernels/pdl.py)")

    def word_slots(self) -> list[int]:
        """The word slots (planes ``stride_wq`` apart) a k step reads: each window's, and the next one where a
        window spills into it (a spill past the last slot reads the next group's word 0 instead: ``wn``)."""
        p = self.plan
        return sorted({w.slot for w in p.windows} | {w.slot + 1 for w in p.windows if w.spills and w.slot + 1 < p.G})

    def word_loads(self) -> list[tuple[str, str]]:
        """(variable, offset expression) of every word tensor a k step reads."""
        p = self.plan
        loads = [(f"w{q}", "w_off" if q == 0 else f"w_off + {q} * stride_wq") for q in self.word_slots()]
        if any(w.spills and w.slot + 1 == p.G for w in p.windows):
            loads.append(("wn", "n_off"))
        return loads

    def load_words(self) -> None:
        s = self.src
        s("wmask = rmask[:, None] & (cols < Ctot)[None, :]")
        loads = self.word_loads()
        s("if EVEN:  # the launcher proved every block full: no masks (and no zero fill)")
        s.indent()
        for name, off in loads:
            s(f"{name} = tl.load(W + {off}).to(tl.uint32, bitcast=True)")
        s.dedent()
        s("else:")
        s.indent()
        for name, off in loads:
            s(f"{name} = tl.load(W + {off}, mask=wmask, other=0).to(tl.uint32, bitcast=True)")
        s.dedent()

    def _prefetch_loads(self, loads: list[tuple[str, str]], suffix: str, step: str) -> None:
        """Load the words ``step`` word columns ahead of the current offsets into ``<name><suffix>``."""
        s = self.src
        ahead = "" if step == "0" else f" + {step}"
        s("if EVEN:")
        s.indent()
        for name, off in loads:
            s(f"{name}{suffix} = tl.load(W + {off}{ahead})")
        s.dedent()
        s("else:")
        s.indent()
        for name, off in loads:
            s(f"{name}{suffix} = tl.load(W + {off}{ahead}, mask=rmask[:, None] & (cols{ahead} < Ctot)[None, :], "
              "other=0)")
        s.dedent()

    def decode_values(self, cast: str | None, emit_values: bool = True) -> dict[tuple[int, int], str]:
        """Emit states and values; returns (s, f) -> variable name (cast to ``cast`` if given).

        With an on-chip table, every table read of the k step is one ``tl.gather``: Triton stages the
        gathered-from tensor in shared memory with a barrier on each side of every gather, so one
        gather per k step (not one per state) keeps the warps from synchronizing S times per step.
        """
        p, s = self.plan, self.src
        names: dict[tuple[int, int], str] = {}
        need_mask = self.dec.state_bits is None or self.dec.state_bits > p.spec.L
        per_state = []
        for st in range(p.S):
            self._cur, self._pending = f"s{st}", []
            lines, vals = self.dec.emit(p.spec, f"s{st}", self.lookup)
            per_state.append((lines, vals, list(self._pending)))
        pending = [pend for _, _, pl in per_state for pend in pl]
        post: list[list[str]] = []
        for st, (lines, _, pl) in enumerate(per_state):
            s(f"# state {st}: bits {p.spec.K * p.spec.V * st}..+{p.spec.L} of the group")
            s(_state_lines(p, st, need_mask))
            tokens = [n for n, _ in pl]
            cut = next((i for i, line in enumerate(lines) if any(t in line for t in tokens)), len(lines))
            s(*lines[:cut])
            rep = table_replicas(self.opts) if self.joined_gather() else 1
            for n, idx in pl:
                s(f"{n}_i = {idx}" if rep == 1 else f"{n}_i = ({idx}) * {rep} + rep")
            post.append(lines[cut:])
        if pending:
            if len(pending) & (len(pending) - 1):
                raise AssertionError("joined gather needs a power-of-two number of table reads per group")
            s(f"# one on-chip gather for all {len(pending)} table reads of the group")
            tree = _join_tree([f"{n}_i" for n, _ in pending])
            s(f"gi = tl.reshape({tree}, [RB * CB * {len(pending)}])")
            shape = ", ".join(["RB", "CB"] + ["2"] * (len(pending).bit_length() - 1))
            s(f"gv = tl.reshape(tl.gather(tbl, gi, 0), [{shape}])")
            self._split_tree("gv", [n for n, _ in pending])
        self.state_vals = [vals for _, vals, _ in per_state]  # the mma variant reads the packed registers
        for st, (_, vals, _) in enumerate(per_state):
            s(*post[st])
            if not emit_values:
                continue
            for f, v in enumerate(vals):
                name = f"v{st}_{f}"
                half = re.fullmatch(r"_f16_(lo|hi)\((.*)\)", v)
                if cast == "tl.float32" and half:  # fused unpack + convert (no separate extract op)
                    s(f"{name} = _f16_{half.group(1)}_f32({half.group(2)}, INTERPRET)")
                else:
                    s(f"{name} = {v}" if cast is None else f"{name} = ({v}).to({cast})")
                names[(st, f)] = name
        return names

    def _split_tree(self, var: str, names: list[str]) -> None:
        """Inverse of :func:`_join_tree`: assign the leaves of ``var`` to ``names``."""
        if len(names) == 1:
            self.src(f"{names[0]} = {var}")
            return
        self.src(f"{var}e, {var}o = tl.split({var})")
        self._split_tree(f"{var}e", names[0::2])
        self._split_tree(f"{var}o", names[1::2])

    def advance(self) -> None:
        p, s = self.plan, self.src
        s("w_off += CB", "cols += CB")
        if self.kind == "gemm":
            s("xk += BK")
        if any(w.spills and w.slot + 1 == p.G for w in p.windows):
            s("n_off += CB")

    def _orow(self, a: int) -> str:
        """Row class ``a``'s output rows: the tile's ``orow`` plus the class's constant row offset."""
        rc = self.plan.rconst(a)
        return f"orow + {rc}" if rc else "orow"

    def store_rows(self, a: int, value: str, layout_m_first: bool) -> None:
        """Store class ``a``'s partial rows ([BLOCK_M, RB] or [RB, BLOCK_M]) into Y[pid_k]."""
        s = self.src
        row = self._orow(a)
        if layout_m_first:
            s(f"tl.store(Y + pid_k * stride_ys + mrow[:, None] * stride_ym + ({row})[None, :], {value}, "
              "mask=mmask[:, None] & rmask[None, :])")
        else:
            s(f"tl.store(Y + pid_k * stride_ys + mrow[None, :] * stride_ym + ({row})[:, None], {value}, "
              "mask=rmask[:, None] & mmask[None, :])")

    def split_sum(self) -> None:
        """``SPLIT_SUM``: the split-K partials summed by the kernel itself (a "serial split-K" fix-up).

        Why: the output transform otherwise reads every partial, and with few tokens it spreads one token
        over column blocks that each re-read all of them, so its time grew ~3 µs per split at 8192 outputs
        and ~6 at 28672 (H200, session 9: linear - kernel 18.5 / 30.4 / 48.5 µs at 2 / 4 / 8 splits). Here
        each program counts itself in on its (row block, batch block)'s counter after its partial is
        stored; the last one adds the partials in split order (the order the transform used: the results
        are bit-identical), writes the sum to Y[0] and zeroes the counter for the next launch, so the
        transform reads one partial. The counters (``CNT``, int32, zero between launches) belong to the
        prepared weight; launches that share them must not run concurrently (one stream, as serving does).
        """
        p, s = self.plan, self.src
        s("if SPLIT_SUM:")
        s.indent()
        s("# split-K summed here (see the generator's split_sum): the last program of this row block to")
        s("# finish adds every split's partial, in split order, into Y[0]")
        # the barrier orders every thread's partial stores before the arrival; the arrival's release
        # (a GPU-scope fence by the one thread that counts, cumulative over what the barrier ordered)
        # makes them visible to the program that arrives last. Only that program acquires: the
        # exchange that zeroes the counter, then a barrier that orders every thread's reads after it
        # (an acq_rel arrival made every program pay for an acquire that one needs)
        s("tl.debug_barrier()")
        s("cnt = CNT + pid_m * tl.num_programs(0) + pid_r")
        s("arrived = tl.atomic_add(cnt, 1, sem='release', scope='gpu')")
        s("if arrived == tl.num_programs(1) - 1:")
        s.indent()
        s("tl.atomic_xchg(cnt, 0, sem='acquire', scope='gpu')  # every split has arrived: zero it for the next launch")
        s("tl.debug_barrier()")
        s("fm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        s("fk = (fm < M)[:, None] & rmask[None, :]  # the rows this program wrote (every row class alike)")
        for a in range(p.NA):
            row = self._orow(a)
            s(f"fo{a} = fm[:, None] * stride_ym + ({row})[None, :]")
            s(f"tot{a} = tl.load(Y + fo{a}, mask=fk, other=0.0, cache_modifier='.cg')  # L2: not a stale L1 line")
        # SUM_UNROLL partials in flight per step (the loop is not pipelined, and each step otherwise waited
        # one L2 round trip); past the last split a load gives -0.0, which leaves every sum unchanged
        s("nsp = tl.num_programs(1)")
        s(f"for sp in range(1, nsp, {SUM_UNROLL}):")
        s.indent()
        for a in range(p.NA):
            for j in range(SUM_UNROLL):
                sp = f"sp + {j}" if j else "sp"
                split = f"({sp})" if j else sp
                s(f"p{a}_{j} = tl.load(Y + {split} * stride_ys + fo{a}, mask=fk & ({sp} < nsp), other=-0.0, "
                  "cache_modifier='.cg')")
        for a in range(p.NA):
            for j in range(SUM_UNROLL):  # one add at a time, in split order: the transform's sum, bit for bit
                s(f"tot{a} += p{a}_{j}")
        s.dedent()
        for a in range(p.NA):
            s(f"tl.store(Y + fo{a}, tot{a}, mask=fk)")
        s.dedent()
        s.dedent()

    # -------------------------------------------------------------------------------- kinds
    def emit(self) -> str:
        self.header()
        getattr(self, f"_{self.kind}")()
        return self.src.text()

    def _gemv(self) -> None:
        if self.opts.get("mma"):
            self._gemv_mma()
            return
        if self.opts.get("hfma"):
            self._gemv_hfma()
            return
        p, s = self.plan, self.src
        bm = self.opts["BLOCK_M"]
        fuse_in = self.opts.get("fuse_in", False)
        self._gemv_signature(fuse_in)
        s('"""Y[pid_k, m, :] = partial Ŵ x[m] over this program\'s k range (CUDA-core multiply-add).')
        s("")
        s(f"X is h in gemv order: row m holds {p.NC} blocks of Ctot values, block cc = the input columns of")
        s("value class column cc of every word column, so each x operand is a contiguous row like the words.")
        s(f"Batch rows are unrolled ({bm}): one 2-D accumulator per row and row class.")
        s('"""')
        s(f"tl.static_assert(BLOCK_M == {bm})")
        # fuse_in: the transform's dots use Triton's shared memory, where the shared table lives: the
        # table is written after them (found on the H200: the table written first read back as NaNs)
        early, loads = self._gemv_head(defer_table=fuse_in)
        if fuse_in:
            self._input_transform(bm)
            if self.shared_table():
                self.shared_table_fill()
        self._gemv_rows(bm)
        depth = self.opts.get("prefetch", 0)
        if depth:
            s(f"# software pipelining: the words of the next {depth} k step(s) are in flight while this one is")
            s("# decoded (the compiler may sink a load to the end of the loop body, so depth 2 still leaves a")
            s("# whole step between a load and its use); steps past the end re-read the last one: no masks")
            for d in range(1, depth + 1):
                step = "0" if d == 1 else f"tl.minimum({d - 1}, ITERS - 1) * CB"
                self._prefetch_loads(loads, f"_nx{d}", step)
        s("for it in range(ITERS):")
        s.indent()
        self.l2_prefetch_step()
        if depth or early:  # this step's words are in flight already (loaded ahead, or early / by the step before)
            s("wmask = rmask[:, None] & (cols < Ctot)[None, :]")
            for name, _ in loads:
                s(f"{name} = {name}{'_nx1' if depth else '_nx'}.to(tl.uint32, bitcast=True)")
                for d in range(1, depth):
                    s(f"{name}_nx{d} = {name}_nx{d + 1}")
            if depth:
                s(f"nxt = tl.minimum(it + {depth}, ITERS - 1) * CB - it * CB  # offset of the step loaded now")
                self._prefetch_loads(loads, f"_nx{depth}", "nxt")
        else:
            self.load_words()
        names = self.decode_values(cast="tl.float32")
        for a, cls in enumerate(p.classes):
            for j, vs in enumerate(cls):
                for m in range(bm):
                    s(f"xv = {self._x_load(m, j)}")
                    s(f"acc{a}_{m} += {names[(vs.s, vs.f)]} * xv.to(tl.float32)")
        if early:
            self._early_words_next(loads)
        self._end_gemv_loop()
        self._store_gemv_rows(bm)

    def _gemv_head(self, defer_table: bool = False) -> tuple[bool, list[tuple[str, str]]]:
        """A gemv variant's set-up through the PDL wait: the prologue, and with ``early_words`` the first k step's
        words, the L2 prefetches and the table fill before the wait (``defer_table``: the caller fills the table
        itself, after code that uses Triton's shared memory). Returns (early words on, the word loads)."""
        early = self.opts.get("early_words", False)
        loads = self.word_loads()
        self.prologue(split=True, defer_table=defer_table or early, l2_head=not early)
        if early:
            self._early_words_head(loads)
        self.dependency_sync()
        return early, loads

    def _step_words(self, early: bool, loads: list[tuple[str, str]]) -> None:
        """Top of a k step (gemvs without a register prefetch): the L2 prefetches ahead, then this step's words,
        loaded early or by the step before (``early``) or now."""
        self.l2_prefetch_step()
        if early:
            self._early_words_take(loads)
        else:
            self.load_words()

    def _early_words_head(self, loads: list[tuple[str, str]]) -> None:
        """``early_words``: the first k step's words (into ``<name>_nx``), then the L2 prefetches and the table
        fill, all before the PDL wait (the caller's prologue deferred the last two)."""
        s = self.src
        s("# the first k step's words are constants of the layer: their loads are issued before the table")
        s("# fill and the PDL wait, so their DRAM latency overlaps both (and the previous kernel's tail);")
        s("# each later step's words are loaded at the end of the step before, once its words are dead")
        self._prefetch_loads(loads, "_nx", "0")
        self.l2_prefetch_head()
        if self.shared_table():
            self.shared_table_fill()

    def _early_words_take(self, loads: list[tuple[str, str]]) -> None:
        """``early_words``, top of a k step: this step's words are the ones loaded early or by the step before."""
        s = self.src
        s("wmask = rmask[:, None] & (cols < Ctot)[None, :]")
        for name, _ in loads:
            s(f"{name} = {name}_nx.to(tl.uint32, bitcast=True)")

    def _early_words_next(self, loads: list[tuple[str, str]]) -> None:
        """``early_words``, end of a k step (its words are dead): load the next step's."""
        self.src("nxt = tl.minimum(it + 1, ITERS - 1) * CB - it * CB  # the next step's words (the last re-reads its own)")
        self._prefetch_loads(loads, "_nx", "nxt")

    @staticmethod
    def _x_load(m: int, cc: int) -> str:
        """The CUDA-core gemvs' load of batch row ``m``'s x at class column ``cc`` (row 0 of a block
        always exists, so it needs no row mask)."""
        off = f"x_off + {cc} * Ctot" if cc else "x_off"
        if m == 0:
            return f"tl.load(x{m} + {off}) if EVEN else tl.load(x{m} + {off}, mask=wmask, other=0.0)"
        return (f"tl.load(x{m} + {off}, mask=ok{m}, other=0.0) if EVEN else "
                f"tl.load(x{m} + {off}, mask=wmask & ok{m}, other=0.0)")

    def _gemv_rows(self, bm: int) -> None:
        """The CUDA-core gemvs' batch rows: x pointers, row masks, one fp32 accumulator per row and class."""
        p, s = self.plan, self.src
        for m in range(bm):
            s(f"x{m} = X + (pid_m * {bm} + {m}) * stride_xm")
            s(f"ok{m} = pid_m * {bm} + {m} < M")
            for a in range(p.NA):
                s(f"acc{a}_{m} = tl.zeros([RB, CB], dtype=tl.float32)")
        s("x_off = rows[:, None] * 0 + cols[None, :]  # same shape and contiguity as the word offsets")

    def _store_gemv_rows(self, bm: int) -> None:
        """Each row's partial (its accumulator summed over the tile's columns) into Y[pid_k], then the
        optional in-kernel split sum; closes the kernel body."""
        p, s = self.plan, self.src
        for a in range(p.NA):
            row = self._orow(a)
            for m in range(bm):
                s(f"tl.store(Y + pid_k * stride_ys + (pid_m * {bm} + {m}) * stride_ym + {row}, "
                  f"tl.sum(acc{a}_{m}, axis=1), mask=rmask & ok{m})")
        self.split_sum()
        s.dedent()

    def _gemv_signature(self, fuse_in: bool, mma: bool = False) -> None:
        """The gemv kernels' parameters (plain and mma alike; ``fuse_in`` adds the input transform's; the mma
        gemv reads h in mma order, kernels/mma_layout.py, whose step is a quad of columns, not a row)."""
        s = self.src
        s("@triton.jit")
        # Ctot is a compile-time constant: x's class blocks sit Ctot apart, so every x load of a k step
        # is an immediate offset from one pointer (measured 16.5 -> 12.4 SASS per state at BLOCK_K=32)
        # the mma's quad stride (4 x rows per quad: 32 or 64) is a constant too, for the same immediate offsets
        # (as a run-time value it cost 49 more registers at BLOCK_M 16: one address per class column)
        xs = "stride_xq: tl.constexpr" if mma else "stride_xm"
        s(f"def kernel(W, TBL, X, Y, M, Rtot, Ctot: tl.constexpr, ITERS, stride_wq, {xs}, stride_ys, stride_ym,")
        s("           shard_b1, shard_b2, stride_xg, stride_tg,")
        if fuse_in:
            s("           XN, PRE, HA, HB, DSTI, stride_xn, z_rows, z_cols, hscale, HRP: tl.constexpr,")
            s("           HCP: tl.constexpr, HRB: tl.constexpr, HKB: tl.constexpr,")
        s("           TR: tl.constexpr, TC: tl.constexpr, BLOCK_M: tl.constexpr, EVEN: tl.constexpr, INTERPRET: tl.constexpr,")
        s("           CNT=None, SPLIT_SUM: tl.constexpr = False, PDL: tl.constexpr = 0):")
        s.indent()

    def _end_gemv_loop(self, x_step: str = "CB") -> None:
        """Advance the gemv's offsets (x's by ``x_step``), close its k loop and, with the table in shared
        memory, wait for every warp before Triton reuses that memory."""
        s = self.src
        self.advance()
        s(f"x_off += {x_step}")
        s.dedent()
        if self.shared_table():
            s("if not INTERPRET:  # every warp is done with the table before Triton reuses its shared memory")
            s("    tl.debug_barrier()")

    def _gemv_hfma(self) -> None:
        """The CUDA-core gemv multiplying in fp16x2: one HFMA2 per decoded state (its two weights at once)."""
        p, s = self.plan, self.src
        bm = self.opts["BLOCK_M"]
        self._gemv_signature(fuse_in=False)
        s('"""Y[pid_k, m, :] = partial Ŵ x[m] over this program\'s k range (fp16x2 multiply-adds, fp32 sums).')
        s("")
        s("Each decoded state is one fp16x2 register holding the weights of two adjacent input columns; x of those")
        s("columns is packed the same way, so one fma.rn.f16x2 multiplies both (no fp16 -> fp32 conversions, half the")
        s("FMAs of the fp32 gemv). Per k step each row sums its 8 column pairs in fp16x2, then adds both halves to")
        s("the fp32 accumulator: 8 products per fp16 partial (relative error ~3e-4 of the output's scale).")
        s('"""')
        s(f"tl.static_assert(BLOCK_M == {bm})")
        early, loads = self._gemv_head()
        self._gemv_rows(bm)
        s("for it in range(ITERS):")
        s.indent()
        self._step_words(early, loads)
        self.decode_values(cast=None, emit_values=False)
        pairs = packed_pairs(p, self.state_vals, "hfma")
        for m in range(bm):
            s(f"# batch row {m}: x of each class column pair packed as fp16x2, then the pairs' products in fp16x2")
            for cc in range(p.NC):
                s(f"xc{cc} = ({self._x_load(m, cc)}).to(tl.float16)")
            for j in range(p.NC // 2):
                s(f"xp{j} = _pack_f16x2(xc{2 * j}, xc{2 * j + 1})")
            for a in range(p.NA):
                s(f"h{a} = tl.zeros([RB, CB], dtype=tl.uint32)")
                for j in range(p.NC // 2):
                    s(f"h{a} = _hfma2({pairs[a][j]}, xp{j}, h{a}, INTERPRET)")
                s(f"acc{a}_{m} += _f16_lo_f32(h{a}, INTERPRET) + _f16_hi_f32(h{a}, INTERPRET)")
        if early:
            self._early_words_next(loads)
        self._end_gemv_loop()
        self._store_gemv_rows(bm)

    def _gemv_mma(self) -> None:
        """The gemv on tensor cores: one mma.sync per four decoded states (see codegen/mma.py)."""
        p, s = self.plan, self.src
        bm = self.opts["BLOCK_M"]
        nb = bm // MMA_ROWS
        self._gemv_signature(fuse_in=False, mma=True)
        s('"""Y[pid_k, m, :] = partial Ŵ x[m] over this program\'s k range (tensor cores: mma.sync straight from')
        s("the decoded fp16x2 registers, no conversion, no shared-memory staging).")
        s("")
        s("X is h in mma order (kernels/mma_layout.py): gemv-order column j of batch row m at (j // 4) * stride_xq +")
        s(f"4 m + j % 4, so a warp's x load spans few cache lines. Each [RB, {MMA_COLS}] word tile is laid out as lane (g, t) =")
        s("rows 8i + g, columns 4t..4t+3 (the launcher checks it in the compiled kernel); every element a lane holds")
        s(f"feeds four m16n8k16: A = its packed states, B = x of batch row (row % 8) at its columns ({nb} block(s)")
        s(f"of {MMA_ROWS} batch rows), C = row group g's outputs for batch rows 2t, 2t+1.")
        s('"""')
        s(f"tl.static_assert(BLOCK_M == {bm})")
        s(f"tl.static_assert(TC * {p.GCN} == {MMA_COLS})  # {MMA_COLS} word columns per k step: 4 lanes x 4 elements")
        early, loads = self._gemv_head()
        ng = self.opts.get("mma_groups", 1)
        if ng > 1:
            s(f"# the {ng} row groups of a warp multiply the same x: it is loaded for the first (XR rows, one group per")
            s("# warp) and repeated in registers for the others (_rows_repeat), so they issue no x loads of their own")
            s(f"XR: tl.constexpr = RB // {ng}")
            s("xr = tl.arange(0, XR)")
            s(f"lane_b = xr % {MMA_ROWS}  # the batch row whose x this lane brings to the mma (its row in the row group)")
        else:
            s(f"lane_b = rows % {MMA_ROWS}  # the batch row whose x this lane brings to the mma (its row in the row group)")
        for n in range(nb):
            s(f"xrow{n} = pid_m * {bm} + {n * MMA_ROWS} + lane_b")
            s(f"xok{n} = (xrow{n} < M)[:, None]")
            s(f"xp{n} = X + xrow{n}[:, None] * 4  # batch rows sit 4 apart inside a quad of columns")
            for h in range(4):
                s(f"c{n}_{h} = tl.zeros([RB, CB], dtype=tl.float32)")
        s("# the word tile's shape; each lane's 4 columns are one quad (contiguous), class columns (Ctot // 4) quads apart")
        s(f"x_off = {'xr' if ng > 1 else 'rows'}[:, None] * 0 + ((cols // 4) * stride_xq + cols % 4)[None, :]")
        s("x_cls = (Ctot // 4) * stride_xq")
        s("for it in range(ITERS):")
        s.indent()
        self._step_words(early, loads)
        self.decode_values(cast=None, emit_values=False)
        pairs = packed_pairs(p, self.state_vals)
        if ng > 1:
            s("xcols = (cols < Ctot)[None, :]  # x does not depend on the word rows: only its columns can run past the end")
        for n in range(nb):
            s(f"# batch rows {n * MMA_ROWS}..{n * MMA_ROWS + MMA_ROWS - 1} of the block: x of every class column, as fp16")
            for cc in range(p.NC):
                off = f"x_off + {cc} * x_cls" if cc else "x_off"
                load = (f"tl.load(xp{n} + {off}, mask=xok{n}, other=0.0) if EVEN else "
                        f"tl.load(xp{n} + {off}, mask=xok{n} & {'xcols' if ng > 1 else 'wmask'}, other=0.0)")
                if ng > 1:
                    load = f"_rows_repeat({load}, {ng})"
                s(f"xc{cc} = ({load}).to(tl.float16)")
            for q in range(4):
                P, Q = q, q + 4
                s(f"# mma {q}: class pairs ({2 * P}, {2 * P + 1}) and ({2 * Q}, {2 * Q + 1}), rows of class 0 and 1")
                s(f"c{n}_0, c{n}_1, c{n}_2, c{n}_3 = _mma({pairs[0][P]}, {pairs[1][P]}, {pairs[0][Q]}, {pairs[1][Q]}, "
                  f"_pack_f16x2(xc{2 * P}, xc{2 * P + 1}), _pack_f16x2(xc{2 * Q}, xc{2 * Q + 1}), "
                  f"c{n}_0, c{n}_1, c{n}_2, c{n}_3, RB, CB, INTERPRET)")
        if early:
            self._early_words_next(loads)
        self._end_gemv_loop(x_step="(CB // 4) * stride_xq")
        s("tcol = tl.arange(0, 4)[None, :]  # lane t of the row group: batch rows 2t and 2t + 1")
        for n in range(nb):
            for h in range(4):
                a, odd = h >> 1, h & 1
                row = self._orow(a)
                s(f"b = pid_m * {bm} + {n * MMA_ROWS + odd} + 2 * tcol")
                s(f"tl.store(Y + pid_k * stride_ys + b * stride_ym + ({row})[:, None], "
                  f"tl.sum(tl.reshape(c{n}_{h}, [RB, 4, 4]), axis=2), mask=rmask[:, None] & (b < M))")
        self.split_sum()
        s.dedent()

    def _input_transform(self, bm: int) -> None:
        """``fuse_in``: this program's slice of h = M_nᵀ (SU ⊙ x), computed here instead of by a launch.

        The program's word columns are one contiguous range of natural inputs (16 per tile column; the
        kernel order only permutes inside it), i.e. a few rows of the Z view (z_rows x z_cols) of the
        Hadamard transform: h = (A · Z · B) · hscale restricted to rows r0 .. r0+HRB, accumulated over
        32-column blocks of Z (the prologue's registers set the whole kernel's: 127 instead of 237 with
        whole-width tiles, sm_90). It is stored into X (a per-call scratch in the kernel's order) and
        read back after a barrier; programs of the same k split write the same values there.

        Opt-in and off the tuner's space: on the H200 (2026-11-29, h200-2026-11-29-probe-fusein.md) it
        was 1.5-5x slower than the separate transform + gemv (8192^2 M=1: 113 vs 32 us), since every
        program of a k split recomputes the same transform rows.
        """
        p, s = self.plan, self.src
        s("# fused input transform: rows r0.. of the Z view hold this program's natural inputs [j0, j1)")
        s(f"j0 = col0 * {16 // p.GCN}")
        s(f"j1 = tl.minimum(col0 + ITERS * CB, Ctot) * {16 // p.GCN}")
        s("hr = j0 // z_cols + tl.arange(0, HRB)")
        s("hc = tl.arange(0, HCP)")
        s("HC2: tl.constexpr = 32 if HCP > 32 else HCP  # columns of Z per block: few live registers")
        for m in range(bm):
            s(f"row = pid_m * {bm} + {m}")
            s("hout = tl.zeros([HRB, HCP], dtype=tl.float32)")
            s("for c0 in tl.static_range(0, HCP, HC2):  # (A · Z[:, block]) · B[block, :], block by block")
            s.indent()
            s("hcc = c0 + tl.arange(0, HC2)")
            s("t = tl.zeros([HRB, HC2], dtype=tl.float32)")
            s("for k0 in range(0, z_rows, HKB):")
            s.indent()
            s("hk = k0 + tl.arange(0, HKB)")
            s("hidx = hk[:, None] * z_cols + hcc[None, :]")
            s("hmsk = (hk < z_rows)[:, None] & (hcc < z_cols)[None, :] & (row < M)")
            s("z = tl.load(XN + row * stride_xn + hidx, mask=hmsk, other=0.0).to(tl.float32)")
            s("z *= tl.load(PRE + hidx, mask=hmsk, other=0.0)")
            s("a = tl.load(HA + hr[:, None] * HRP + hk[None, :], mask=(hr < HRP)[:, None], other=0.0)")
            s("t = _split_dot(a, z, t, INTERPRET)")
            s.dedent()
            s("hout = _split_dot_rhs(t, tl.load(HB + hcc[:, None] * HCP + hc[None, :]), hout, INTERPRET)")
            s.dedent()
            s("nat = hr[:, None] * z_cols + hc[None, :]")
            s("keep = (nat >= j0) & (nat < j1) & (hc < z_cols)[None, :] & (row < M)")
            s("dsti = tl.load(DSTI + nat, mask=keep, other=0)")
            s("tl.store(X + row * stride_xm + dsti, (hout * hscale).to(X.dtype.element_ty), mask=keep)")
        s("tl.debug_barrier()  # the whole program's h is written before any of it is read")

    def natural_perm(self) -> tuple[int, ...] | None:
        """Axis permutation that puts a class tile's columns in natural order (None if already)."""
        p = self.plan
        cbits = sorted({p.bit_map[i] for i in range(p.g_base) if p.bit_map[i] < 4})
        # axes after [RB, TC]: gc bits MSB..LSB, then the join tree's list-index bits MSB..LSB
        axis_cbit = [p.bit_map[i] for i in reversed(p.gc_bits)] + list(reversed(cbits))
        order = sorted(range(len(axis_cbit)), key=lambda k: -axis_cbit[k])
        if order == list(range(len(axis_cbit))):
            return None
        return (0, 1) + tuple(2 + k for k in order)

    def _class_tiles(self, names: dict[tuple[int, int], str], cast: str, natural: bool = False) -> list[str]:
        """One [RB, BK] tile per row class: columns in (group col, class column offset) order, or in the
        natural input-column order with ``natural`` (a register permute, so stores are contiguous)."""
        p, s = self.plan, self.src
        perm = self.natural_perm() if natural else None
        out = []
        for a, cls in enumerate(p.classes):
            tree = _join_tree([names[(vs.s, vs.f)] for vs in cls])
            if perm is not None:
                bits = ", ".join(["2"] * (len(perm) - 2))
                s(f"t{a} = tl.reshape(tl.permute(tl.reshape({tree}, [RB, TC, {bits}]), {perm}), [RB, BK]).to({cast})")
            elif p.NC == 1:
                s(f"t{a} = {tree}.to({cast})")
            else:
                s(f"t{a} = tl.reshape({tree}, [RB, BK]).to({cast})")
            out.append(f"t{a}")
        return out

    def _gemm(self) -> None:
        p, s = self.plan, self.src
        s("@triton.jit")
        s("def kernel(W, TBL, X, Y, M, Rtot, Ctot, ITERS, stride_wq, stride_xm, stride_ys, stride_ym, shard_b1, shard_b2,")
        s("           stride_xg, stride_tg,")
        s("           TR: tl.constexpr, TC: tl.constexpr, BLOCK_M: tl.constexpr, EVEN: tl.constexpr, INTERPRET: tl.constexpr,")
        s("           CNT=None, SPLIT_SUM: tl.constexpr = False, PDL: tl.constexpr = 0):")
        s.indent()
        s('"""Y[pid_k, m, :] = partial Ŵ x[m] over this program\'s k range (tensor cores, tl.dot).')
        s("")
        s("X is h in gemm order (the BK tile columns of each k step contiguous), so x tiles load like a plain matmul.")
        s('"""')
        self.prologue(split=True)
        self.dependency_sync()
        s("mrow = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        s("mmask = mrow < M")
        for a in range(p.NA):
            s(f"acc{a} = tl.zeros([RB, BLOCK_M], dtype=tl.float32)")
        s(f"xk = col0 * {p.NC} + tl.arange(0, BK)  # X is h in gemm order: tile columns contiguous")
        s(f"for {'it' if self.opts.get('l2_prefetch') else '_'} in range(ITERS):")
        s.indent()
        self.l2_prefetch_step()
        self.load_words()
        s("xt = tl.load(X + mrow[None, :] * stride_xm + xk[:, None], mask=(xk < n_in)[:, None] & mmask[None, :], "
          "other=0.0)")
        names = self.decode_values(cast=None)
        tiles = self._class_tiles(names, "xt.dtype")
        s("if INTERPRET:  # the CPU interpreter's bf16 dot is wrong: same products in fp32 (exact for 16-bit inputs)")
        s.indent()
        for a, t in enumerate(tiles):
            s(f"acc{a} = tl.dot({t}.to(tl.float32), xt.to(tl.float32), acc{a})")
        s.dedent()
        s("else:")
        s.indent()
        for a, t in enumerate(tiles):
            s(f"acc{a} = tl.dot({t}, xt, acc{a})")
        s.dedent()
        self.advance()
        s.dedent()
        for a in range(p.NA):
            self.store_rows(a, f"acc{a}", layout_m_first=False)
        self.split_sum()
        s.dedent()

    def _decompress(self) -> None:
        s = self.src
        s("@triton.jit")
        s("def kernel(W, TBL, OUT, Rtot, Ctot, stride_wq, stride_o, TR: tl.constexpr, TC: tl.constexpr,")
        s("           EVEN: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = 0):")
        s.indent()
        s('"""OUT[rows, cols] = Ŵ for one [TR*16, TC*16] block, in OUT\'s dtype."""')
        self.prologue(split=False)
        self.dependency_sync()
        self.load_words()
        # class tiles come out in natural column order (permuted in registers if needed), so the
        # stores are plain contiguous rows (vectorized, coalesced)
        s("xcol = pid_k * BK + tl.arange(0, BK)")
        s("kmask = xcol < n_in")
        names = self.decode_values(cast=None)
        tiles = self._class_tiles(names, "OUT.dtype.element_ty", natural=True)
        for a, t in enumerate(tiles):
            row = self._orow(a)
            s(f"tl.store(OUT + ({row})[:, None] * stride_o + xcol[None, :], {t}, mask=rmask[:, None] & kmask[None, :])")
        s.dedent()
