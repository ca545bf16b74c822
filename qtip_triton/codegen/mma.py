"""The gemv's tensor-core variant (config ``mma``): decoded registers fed straight to ``mma.sync``.

Why: the CUDA-core gemv spends, per decoded state (two weights), two fp16->fp32 conversions and two
FMAs per batch row on top of the decode; the ``gemm`` kind multiplies on tensor cores but first moves
every decoded tile through shared memory into ``tl.dot``'s operand layout (15 SASS per state, 165
registers, barriers per k step; 1.6-1.8x the gemv's time for the same decode on the H200). QTIP's layout
*is* the A fragment of ``mma.m16n8k16``: a V=2 state is one fp16x2 register holding two adjacent input
columns, and a group's 16 states cover output rows {r, r+8} x 16 input columns. So one ``mma`` per
four states multiplies them by up to 8 batch rows with no conversion and no shared memory.

The lanes of one mma must be arranged as (g, t) = (lane // 4, lane % 4): the four lanes t of row group
g supply the k columns, the B operand (x) of batch row n comes from lanes (n, t). With the word tile
loaded as [RB, 16] int32 rows, Triton lays it out as ``sizePerThread=[1, 4], threadsPerWarp=[8, 4],
order=[1, 0]``: lane (g, t) holds rows 8i + g, columns 4t..4t+3. Every element a lane holds is then one
mma's worth of operands for it:

* A: a0/a1 = the packed state of row class 0/1 for class pair P, a2/a3 the same for pair Q (so four
  mmas per element: P = q, Q = q + 4, q = 0..3);
* B: b0/b1 = x of batch row (row % 8) at the element's columns for pairs P and Q (each lane loads the
  x of "its" batch row; the mma then pairs row group g's weights with every batch row n);
* C: lane (g, t) gets rows g, g+8 for batch rows 2t, 2t+1, summed over the four lanes t' of group g,
  i.e. over the 4 x 4 columns of the element index; the elements are summed in registers at the end.

x reaches the tensor cores in fp16 (the gemv's h is fp32): exact for fp16 models; bf16 models lose the
bits past fp16's and would overflow past 65504, which Hadamard-transformed activations stay far below.

A warp may hold 2 (or 4) row groups (config ``BLOCK_N = 16 x num_warps x groups``): they multiply the same
x, yet Triton would give each group its own x registers and loads (two groups at 16 batch rows, sm_90: 70
global loads per k step; 38 with what follows). So x is loaded as the [RB / groups, 16] tile of one group per warp and repeated
with ``tl.join`` + permute + reshape (``_rows_repeat``): Triton then writes the tile's layout as a linear
layout with the same lanes and the copy in registers, and no data moves (session 12, H200: 8192^2 at
M = 16 38.2 -> 31.1 us).

The launcher checks that layout in the compiled kernel (``layout_ok``) and refuses the config if
Triton chose another one. The interpreter runs ``_mma_emulated``, the same placement written with
tensor reshapes, so the operand and result mapping is tested on the CPU; the hardware instruction
itself only on a GPU (tests/gpu).
"""

from __future__ import annotations

import re

from qtip_triton.codegen.plan import TilePlan

# words per k step of one program (the tile's column count) and batch rows per mma
MMA_COLS = 16
MMA_ROWS = 8
# 8-row word groups per warp (config BLOCK_N = 16 x num_warps x groups); past one they share x's registers
MMA_ROW_GROUPS = (1, 2, 4)

PACK_HELPER = '''
@triton.jit
def _pack_f16x2(lo, hi):
    """Two fp16 tensors as one uint32 each (``lo`` in bits 0-15): an mma operand, or an fp16x2 FMA's."""
    return lo.to(tl.uint16, bitcast=True).to(tl.uint32) | (hi.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)

'''

MMA_HELPERS = '''
@triton.jit
def _products(a, b, RB: tl.constexpr, CB: tl.constexpr):
    """[RB//8, 8 (g), 8 (n), 4 (e)]: for element e, sum over the 4 lanes t of row group g of the fp16x2
    register ``a`` times batch row n's ``b`` (both halves)."""
    lo = tl.reshape(_f16_lo(a).to(tl.float32), [RB // 8, 8, 1, CB // 4, 4]) * \
        tl.reshape(_f16_lo(b).to(tl.float32), [RB // 8, 1, 8, CB // 4, 4])
    hi = tl.reshape(_f16_hi(a).to(tl.float32), [RB // 8, 8, 1, CB // 4, 4]) * \
        tl.reshape(_f16_hi(b).to(tl.float32), [RB // 8, 1, 8, CB // 4, 4])
    return tl.sum(lo + hi, axis=3)


@triton.jit
def _pair_products(x, y, b0, b1, RB: tl.constexpr, CB: tl.constexpr):
    """A row's two k pairs (x with b0, y with b1) times every batch row, as one m16n8k16 computes them."""
    return _products(x, b0, RB, CB) + _products(y, b1, RB, CB)


@triton.jit
def _batch_pairs(d, RB: tl.constexpr, CB: tl.constexpr):
    """Split [RB//8, 8, 8 (n = 2t + h), 4 (e)] into the [RB, CB] tensors of batch rows 2t and 2t+1
    (element (8i + g, 4t + e))."""
    d = tl.permute(tl.reshape(d, [RB // 8, 8, 4, 2, 4]), (0, 1, 2, 4, 3))
    even, odd = tl.split(d)
    return tl.reshape(even, [RB, CB]), tl.reshape(odd, [RB, CB])


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, RB: tl.constexpr, CB: tl.constexpr):
    """The interpreter's stand-in for one mma.sync.m16n8k16 per element: the same operand and result
    placement (lane (g, t) = rows 8i + g, columns 4t..4t+3), written with tensor reshapes."""
    e0, e1 = _batch_pairs(_pair_products(a0, a2, b0, b1, RB, CB), RB, CB)
    e2, e3 = _batch_pairs(_pair_products(a1, a3, b0, b1, RB, CB), RB, CB)
    return c0 + e0, c1 + e1, c2 + e2, c3 + e3


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, RB: tl.constexpr, CB: tl.constexpr, INTERPRET: tl.constexpr):
    """c += A · B for one m16n8k16 per element: A rows {g, g+8} x k pairs of lanes t (a0..a3, fp16x2),
    B = x of batch row g at the same k (b0, b1, fp16x2), C fp32 (lane (g, t): batch rows 2t, 2t+1)."""
    if INTERPRET:
        return _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, RB, CB)
    else:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)

'''

ROWS_REPEAT_HELPERS = '''
@triton.jit
def _rows_twice(x):
    """[R, C] -> [2R, C], row r + R = row r. Triton lays the copy out in the registers of the lanes that
    hold the original (the join's new dimension stays in registers), so this moves no data."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.reshape(tl.permute(tl.join(x, x), (2, 0, 1)), [2 * R, C])


@triton.jit
def _rows_repeat(x, TIMES: tl.constexpr):
    """[R, C] -> [TIMES * R, C] (TIMES 1, 2 or 4), row r + jR = row r: x of one row group per warp, given to
    the warp's other row groups without loading it again."""
    if TIMES >= 2:
        x = _rows_twice(x)
    if TIMES >= 4:
        x = _rows_twice(x)
    return x

'''

_HALF = re.compile(r"_f16_(lo|hi)\((\w+)\)")


def packed_pairs(plan: TilePlan, vals: list[list[str]], what: str = "mma") -> list[list[str]]:
    """``[row class][class pair j]`` -> the variable holding the packed fp16x2 state whose low half is
    class column 2j and high half 2j+1, for the mma's A operand; ``vals[s]`` are the decoder's value
    expressions of state ``s``. A clear error (naming the ``what`` config) when the plan or the code does not
    give such registers."""
    if plan.NA != 2 or plan.NC != 16 or plan.GCN != 1:
        raise ValueError(f"{what} needs a tile of 2 row classes x 16 columns per group (QTIP's layout, V=2); "
                         f"{plan.spec.name} in layout {plan.layout!r} has {plan.NA} x {plan.NC}")
    out = []
    for a, cls in enumerate(plan.classes):
        row = []
        for j in range(8):
            lo, hi = cls[2 * j], cls[2 * j + 1]
            if lo.s != hi.s or (lo.f, hi.f) != (0, 1):
                raise ValueError(f"{what} needs class columns {2 * j}, {2 * j + 1} of row class {a} in one state "
                                 f"(layout {plan.layout!r}: states {lo.s}, {hi.s})")
            m_lo = _HALF.fullmatch(vals[lo.s][0])
            m_hi = _HALF.fullmatch(vals[hi.s][1])
            if not (m_lo and m_hi and m_lo.group(1) == "lo" and m_hi.group(1) == "hi"
                    and m_lo.group(2) == m_hi.group(2)):
                raise ValueError(f"{what} needs a code that decodes a state into one fp16x2 register "
                                 f"({plan.spec.code} gives {vals[lo.s]})")
            row.append(m_lo.group(2))
        out.append(row)
    return out


_BLOCKED = re.compile(r"(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = "
                      r"\[([\d, ]+)\], warpsPerCTA = \[([\d, ]+)\], order = \[([\d, ]+)\]")


_LINEAR = re.compile(r"(#linear\d*) = #ttg\.linear<\{register = (\[[\[\]\d, ]*\]), lane = (\[[\[\]\d, ]*\]), "
                     r"warp = (\[[\[\]\d, ]*\]), block")
# lane (g, t) = lane bits t0 t1 g0 g1 g2 -> columns 4t, rows g: what every mma operand tensor's lanes must hold
_MMA_LANES = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]


def _bases(text: str) -> list[list[int]]:
    return [[int(v) for v in b.split(",")] for b in re.findall(r"\[(\d+, \d+)\]", text)]


def _linear_ok(register: list[list[int]], lane: list[list[int]], warp: list[list[int]]) -> bool:
    """A linear layout (as ``_rows_repeat``'s tensors get) that places [R, 16] as the mma needs: the lanes as
    above, each lane's registers its quad's columns 1 and 2 plus whole row groups (rows 8 apart or more),
    the warps whole row groups (or copies of one)."""
    def row_group(b: list[int]) -> bool:
        return b[1] == 0 and b[0] >= 8 and b[0] & (b[0] - 1) == 0
    cols = [b for b in register if b[0] == 0]
    return (lane == _MMA_LANES and sorted(cols) == [[0, 1], [0, 2]]
            and all(row_group(b) for b in register if b[0] != 0)
            and all(b == [0, 0] or row_group(b) for b in warp))


def layout_ok(ttgir: str) -> tuple[bool, str]:
    """Whether every mma in a compiled kernel's TTGIR runs on [RB, 16] tensors laid out as lane (g, t) =
    rows 8i + g, columns 4t..4t+3: sizePerThread [1, 4], threadsPerWarp [8, 4], warps along rows, or the
    same placement written as a linear layout (row groups of a warp that share x, ``_rows_repeat``)."""
    layouts = {m.group(1): tuple(tuple(int(v) for v in m.group(k).split(",")) for k in range(2, 6))
               for m in _BLOCKED.finditer(ttgir)}
    linear = {m.group(1): tuple(_bases(m.group(k)) for k in range(2, 5)) for m in _LINEAR.finditer(ttgir)}
    used = re.findall(r"mma\.sync[^\n]*?->\s*\(?tensor<(\d+)x(\d+)xf32, (#(?:blocked|linear)\d*)>", ttgir)
    if not used:
        return False, "no mma.sync found in the compiled kernel"
    for rows, cols, name in used:
        if name.startswith("#linear"):
            reg, lane, warp = linear.get(name, ([], [], []))
            if int(cols) != MMA_COLS or not _linear_ok(reg, lane, warp):
                return False, (f"mma operands of {rows}x{cols} laid out as {name}: registers {reg}, lanes {lane}, "
                               f"warps {warp}")
            continue
        spt, tpw, wpc, order = layouts.get(name, ((), (), (), ()))
        if int(cols) != MMA_COLS or spt != (1, 4) or tpw != (8, 4) or order != (1, 0) or wpc[1:] != (1,):
            return False, (f"mma operands of {rows}x{cols} laid out as {name}: sizePerThread {spt}, threadsPerWarp "
                           f"{tpw}, warpsPerCTA {wpc}, order {order}")
    return True, ""
