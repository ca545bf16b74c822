"""TilePlan: how one 16x16 trellis tile is laid out for the kernels, derived once from (spec, order).

Why this exists: a kernel decodes a tile as ``S`` consecutive states per *group* of ``G`` stream words
(``S * K * V`` = ``32 * G`` bits, the smallest whole number of words holding whole steps). Inside a group
the window of every state sits at a bit offset known when the code is generated, so word indices and
shifts become constants. What varies at run time is only the group index ``g`` (and the tile).

Every supported tile order (``qtip``, ``tile``, ``exl3``) is a *bit permutation*: bit i of the sequence
position ``t`` lands on one fixed bit of the tile element ``16 r + c``. Write ``t = V (S g + s) + f``:
the low bits of ``t`` are the compile-time pair ``(s, f)`` and the high bits are ``g``. Then

* the bits of ``g`` that land on ``r`` form ``gr`` and those on ``c`` form ``gc``; the kernel keeps the
  groups of a block of tiles as a 2-D tensor, rows ``(tile_row, gr)`` x columns ``(tile_col, gc)``;
* the bits of ``(s, f)`` that land on ``r`` pick one of ``NA`` output-row *classes* ``a`` (a constant
  row offset), those on ``c`` one of ``NC`` constant column offsets.

So each class ``a`` of decoded values is a dense 2-D block ``[TR * 2^|gr|, TC * 2^|gc| * NC]`` whose rows
map to output rows ``16 tr + rvar(gr) + rconst(a)`` and whose columns map to input columns
``16 tc + cvar(gc) + cconst(cc)``: the kernels multiply it with x gathered in that column order and
store rows in that row order. No data is ever permuted in registers.

The repacked weight tensor (see :mod:`qtip_triton.kernels.prepare`) stores word ``q`` of group
``(gr, gc)`` of tile ``(tr, tc)`` at ``[q, tr * 2^|gr| + gr, tc * 2^|gc| + gc]``: each word slot is a
row-major int32 matrix the kernels read with plain coalesced 2-D block loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from qtip_triton.bitstream import get_layout
from qtip_triton.spec import TILE, TILE_WEIGHTS, TrellisSpec

T_BITS = 8  # log2(256) bits of a sequence position


def _log2(x: int) -> int:
    return x.bit_length() - 1


@dataclass(frozen=True)
class StateWindow:
    """Where state ``s`` of a group sits: word slot, bit offset, and whether it spills into the next word."""

    s: int
    slot: int  # word of the group holding the window's first bit (0..G-1)
    offset: int  # bit offset of the window's first bit in that word (0 = MSB)
    spills: bool  # window continues into word slot+1 (slot+1 == G means the next group's word 0)


@dataclass(frozen=True)
class ValueSlot:
    """One compile-time decoded value: state ``s``, element ``f`` of its V, and its in-tile offsets."""

    s: int
    f: int
    rconst: int  # row offset within the tile contributed by the (s, f) bits
    cconst: int  # column offset within the tile contributed by the (s, f) bits


@dataclass(frozen=True)
class TilePlan:
    spec: TrellisSpec
    layout: str
    S: int  # states per group
    G: int  # words per group
    NG: int  # groups per tile
    bit_map: tuple[int, ...]  # bit_map[i] = element bit (0..7; >=4 is a row bit) of sequence bit i
    gr_bits: tuple[int, ...]  # sequence-bit index of each gr bit, LSB first (ordered by row bit)
    gc_bits: tuple[int, ...]  # sequence-bit index of each gc bit, LSB first (ordered by column bit)
    windows: tuple[StateWindow, ...]
    classes: tuple[tuple[ValueSlot, ...], ...]  # per row class a: slots sorted by cconst

    # ------------------------------------------------------------------ sizes
    @property
    def GRN(self) -> int:
        """Groups of one tile along the row direction (2^|gr|)."""
        return 1 << len(self.gr_bits)

    @property
    def GCN(self) -> int:
        """Groups of one tile along the column direction (2^|gc|)."""
        return 1 << len(self.gc_bits)

    @property
    def NA(self) -> int:
        return len(self.classes)

    @property
    def NC(self) -> int:
        return len(self.classes[0])

    @property
    def g_base(self) -> int:
        """Sequence bit of g's bit 0."""
        return _log2(self.S * self.spec.V)

    def rconst(self, a: int) -> int:
        return self.classes[a][0].rconst

    # ------------------------------------------------------------------ maps (host side, for repacking and tests)
    def rvar(self, gr: int) -> int:
        return sum(((gr >> k) & 1) << (self.bit_map[i] - 4) for k, i in enumerate(self.gr_bits))

    def cvar(self, gc: int) -> int:
        return sum(((gc >> k) & 1) << self.bit_map[i] for k, i in enumerate(self.gc_bits))

    def group(self, gr: int, gc: int) -> int:
        """Group index g of the group at (gr, gc)."""
        g = 0
        for k, i in enumerate(self.gr_bits):
            g |= ((gr >> k) & 1) << (i - self.g_base)
        for k, i in enumerate(self.gc_bits):
            g |= ((gc >> k) & 1) << (i - self.g_base)
        return g

    def split_group(self, g: int) -> tuple[int, int]:
        gr = sum(((g >> (i - self.g_base)) & 1) << k for k, i in enumerate(self.gr_bits))
        gc = sum(((g >> (i - self.g_base)) & 1) << k for k, i in enumerate(self.gc_bits))
        return gr, gc

    def word_positions(self) -> torch.Tensor:
        """int64 (G, GRN, GCN): stream word index held at each (slot, gr, gc) of a tile."""
        out = torch.empty(self.G, self.GRN, self.GCN, dtype=torch.int64)
        for gr in range(self.GRN):
            for gc in range(self.GCN):
                g = self.group(gr, gc)
                for q in range(self.G):
                    out[q, gr, gc] = g * self.G + q
        return out


def input_order(plan: TilePlan, n: int, kind: str) -> torch.Tensor:
    """int64 (n,): position in the kernel's x layout of each natural input column.

    ``gemv`` reads x as ``[NC, Ctot]`` (value-class column ``cc`` major, word column minor) so that the
    x operand of each decoded value is a contiguous row like the word loads; ``gemm`` reads the
    ``[BK]`` column order of its tiles contiguously (``C * NC + cc``). The input Hadamard kernel writes
    h in this order, so the permutation costs nothing at run time.
    """
    ctot = (n // TILE) * plan.GCN
    C = torch.arange(ctot).view(-1, 1)
    cc = torch.arange(plan.NC).view(1, -1)
    cvar = torch.tensor([plan.cvar(g) for g in range(plan.GCN)])
    cconst = torch.tensor([v.cconst for v in plan.classes[0]])
    src = (C // plan.GCN) * TILE + cvar[C % plan.GCN] + cconst[cc]  # natural column of (C, cc)
    if kind == "gemv":
        dst = cc * ctot + C
    elif kind == "gemm":
        dst = C * plan.NC + cc
    else:
        raise ValueError(f"no kernel input order for kind {kind!r}")
    pos = torch.empty(n, dtype=torch.int64)
    pos[src.reshape(-1)] = dst.expand_as(src).reshape(-1)
    return pos


def _bit_permutation(order: torch.Tensor) -> tuple[int, ...] | None:
    """bit_map if ``order`` (t -> 16r + c) is a permutation of index bits, else None."""
    order = order.to(torch.int64)
    if order.shape != (TILE_WEIGHTS,) or int(order[0]) != 0:
        return None
    bit_map = []
    for i in range(T_BITS):
        e = int(order[1 << i])
        if e <= 0 or e & (e - 1):
            return None
        bit_map.append(_log2(e))
    if sorted(bit_map) != list(range(T_BITS)):
        return None
    t = torch.arange(TILE_WEIGHTS)
    rebuilt = sum(((t >> i) & 1) << b for i, b in enumerate(bit_map))
    if not torch.equal(rebuilt, order):
        return None
    return tuple(bit_map)


@cache
def make_plan(spec: TrellisSpec, layout: str) -> TilePlan:
    """The plan for ``spec`` stored in ``layout``; ValueError if the kernels cannot handle it."""
    lay = get_layout(layout)
    lay.validate(spec, 32, 32)  # the layout's own spec restrictions (e.g. qtip: L=16, V=2)
    bit_map = _bit_permutation(lay.order())
    if bit_map is None:
        raise ValueError(
            f"layout {layout!r}: its tile order is not a permutation of index bits, which the Triton kernels "
            "require (repack it into the 'tile' layout first)"
        )
    K, V, L = spec.K, spec.V, spec.L
    kv = K * V
    S = 32 // math.gcd(kv, 32)  # fewest states that fill whole words
    # Grow the group until every column bit of the order lies in (s, f): then a block of groups is
    # [tile rows x group rows] x [tile cols] and neighbouring word columns are neighbouring tiles.
    # Measured on the H100 (bench/NOTES.md, run 2): plans with group bits on columns ran 2x slower.
    top_c = max(i for i in range(T_BITS) if bit_map[i] < 4)
    need = 2 << top_c  # values per group that cover every column bit
    while need > S * V and TILE_WEIGHTS > S * V:
        S *= 2
    G = kv * S // 32
    T = spec.steps_per_tile
    if T % S:
        raise ValueError(f"{spec.name}: {T} states per tile is not a whole number of {S}-state groups")
    NG = T // S
    g_base = _log2(S * V)
    g_seq_bits = list(range(g_base, T_BITS))
    gr_bits = tuple(sorted((i for i in g_seq_bits if bit_map[i] >= 4), key=lambda i: bit_map[i]))
    gc_bits = tuple(sorted((i for i in g_seq_bits if bit_map[i] < 4), key=lambda i: bit_map[i]))

    windows = []
    for s in range(S):
        start = kv * s
        slot, offset = start >> 5, start & 31
        windows.append(StateWindow(s, slot, offset, offset + L > 32))

    slots: dict[int, list[ValueSlot]] = {}
    for s in range(S):
        for f in range(V):
            t = V * s + f
            e = sum(((t >> i) & 1) << bit_map[i] for i in range(g_base))
            vs = ValueSlot(s, f, e >> 4, e & (TILE - 1))
            slots.setdefault(vs.rconst, []).append(vs)
    classes = tuple(tuple(sorted(v, key=lambda x: x.cconst)) for _, v in sorted(slots.items()))
    ncs = {len(c) for c in classes}
    if len(ncs) != 1:  # impossible for a bit permutation; guard the invariant the kernels rely on
        raise AssertionError(f"unequal row classes for {spec.name}/{layout}")
    plan = TilePlan(spec, layout, S, G, NG, bit_map, gr_bits, gc_bits, tuple(windows), classes)
    # invariant: every class has the same column offsets in the same order (x gathers are shared)
    cols = [tuple(v.cconst for v in c) for c in classes]
    if len(set(cols)) != 1:
        raise AssertionError(f"row classes of {spec.name}/{layout} disagree on columns")
    return plan
