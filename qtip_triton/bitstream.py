"""Tile bitstreams: packing, unpacking and the random-access reference decoder.

Every layout is described by the same intermediate form, the **stream words**: for each 16x16
tile (ti, tj) an int64 tensor of 8*K values in [0, 2^32), the tile's 256*K-bit circular stream
S read MSB-first (bit 0 of S is bit 31 of word 0). State j of a tile is the L-bit window
S[K*V*j .. K*V*j + L - 1] (indices mod 256*K, first bit most significant); it decodes to the
V weights at sequence positions V*j .. V*j + V - 1, and a layout's ``order`` maps sequence
position t to the element 16*r + c of the tile.

Layouts:

* ``qtip`` — QTIP's kernel format for L=16, V=2 (released checkpoints): an int16 tensor of shape
  ((m/16)*(n/16), 16*K) read as a little-endian byte buffer. Lane l of tile (ti, tj) stores the
  K-byte chunk S[8K*l .. 8K*l + 8K - 1] little-endian at byte
  ((ti>>1)*(n/32) + (tj>>1))*128K + 4K*l + (2*(tj&1) + (ti&1))*K, and sequence position
  t = 32b + 8e + 4d + 2a + f lands on tile row 8a + b, column 8d + 2e + f (mma A-fragment order).
* ``tile`` — the generic research format for every valid spec: an int32 tensor of shape
  (m/16, n/16, 8*K) holding the stream words themselves (uint32 bit patterns), tiles row-major,
  sequence position t on tile element t (row-major inside the tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import torch

from qtip_triton.codes import decode_states
from qtip_triton.spec import TILE, TILE_WEIGHTS, TrellisSpec

# ---------------------------------------------------------------------------------------------
# stream words <-> states


def window_states(words: torch.Tensor, spec: TrellisSpec, start_bits: torch.Tensor) -> torch.Tensor:
    """L-bit windows of circular streams starting at ``start_bits`` (any shape, broadcast).

    ``words`` is (..., nw) int64; the result is (..., len(start_bits)).
    """
    nw = words.shape[-1]
    nbits = nw * 32
    start = start_bits % nbits
    i0 = start >> 5
    i1 = (i0 + 1) % nw
    off = start & 31
    w0 = words[..., i0]
    w1 = words[..., i1]
    both = (w0 << 32) | w1  # bits of w0 then w1, MSB first (sign bits fall outside the window)
    return (both >> (64 - off - spec.L)) & ((1 << spec.L) - 1)


def states_from_words(words: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
    """All 256/V states of each tile stream: (..., 8K) -> (..., 256/V) int64."""
    _check_words(words, spec)
    starts = torch.arange(spec.steps_per_tile, dtype=torch.int64, device=words.device) * spec.bits_per_step
    return window_states(words, spec, starts)


def words_from_states(states: torch.Tensor, spec: TrellisSpec, *, check: bool = True) -> torch.Tensor:
    """Stream words of a state sequence: each state contributes its top K*V bits.

    With ``check`` the sequence must be a valid tail-biting path (each state's low L-KV bits are the
    next state's high bits, circularly); a ValueError says where it is not.
    """
    T, kv, L = spec.steps_per_tile, spec.bits_per_step, spec.L
    if states.shape[-1] != T:
        raise ValueError(f"expected {T} states per tile for {spec.name}, got {states.shape[-1]}")
    s = states.to(torch.int64)
    if check:
        low = s & ((1 << (L - kv)) - 1)
        nxt_high = torch.roll(s, -1, dims=-1) >> kv
        bad = low != nxt_high
        if bool(bad.any()):
            where = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"state sequence is not a tail-biting trellis path (first break at index {where})")
    top = s >> (L - kv)  # (..., T) groups of kv bits
    bits_per_word = 32
    # expand to individual bits, MSB first, then regroup into 32-bit words
    shifts = torch.arange(kv - 1, -1, -1, device=s.device)
    bits = ((top.unsqueeze(-1) >> shifts) & 1).reshape(*s.shape[:-1], T * kv)
    bits = bits.reshape(*s.shape[:-1], -1, bits_per_word)
    weights = torch.tensor([1 << (31 - i) for i in range(32)], dtype=torch.int64, device=s.device)
    return (bits * weights).sum(-1)


def _check_words(words: torch.Tensor, spec: TrellisSpec) -> None:
    if words.dtype != torch.int64:
        raise ValueError(f"stream words must be int64 holding uint32 values, got {words.dtype}")
    if words.shape[-1] != spec.words_per_tile:
        raise ValueError(
            f"a tile stream of {spec.name} has {spec.words_per_tile} words (256*K bits), got {words.shape[-1]}"
        )


# ---------------------------------------------------------------------------------------------
# sequence orders inside a tile


@cache
def qtip_order() -> torch.Tensor:
    """QTIP kernel order: sequence position t -> tile element 16*r + c."""
    t = torch.arange(TILE_WEIGHTS)
    b, e, d, a, f = t >> 5, (t >> 3) & 3, (t >> 2) & 1, (t >> 1) & 1, t & 1
    r = 8 * a + b
    c = 8 * d + 2 * e + f
    return r * TILE + c


@cache
def row_order() -> torch.Tensor:
    return torch.arange(TILE_WEIGHTS)


# ---------------------------------------------------------------------------------------------
# layouts


@dataclass(frozen=True)
class Layout:
    """A storage format for the tile streams of an m x n matrix."""

    name: str
    description: str

    def order(self) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, spec: TrellisSpec, m: int, n: int) -> None:
        if m <= 0 or n <= 0 or m % TILE or n % TILE:
            raise ValueError(f"matrix dims must be positive multiples of {TILE}, got {m}x{n}")

    def packed_shape(self, spec: TrellisSpec, m: int, n: int) -> tuple[int, ...]:
        raise NotImplementedError

    packed_dtype: ClassVar[torch.dtype] = torch.int32

    def pack(self, words: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, packed: torch.Tensor, spec: TrellisSpec, m: int, n: int) -> torch.Tensor:
        raise NotImplementedError

    def check_packed(self, packed: torch.Tensor, spec: TrellisSpec, m: int, n: int) -> None:
        self.validate(spec, m, n)
        want = self.packed_shape(spec, m, n)
        if packed.dtype != self.packed_dtype:
            raise ValueError(f"{self.name} trellis must be {self.packed_dtype}, got {packed.dtype}")
        if tuple(packed.shape) != want:
            raise ValueError(
                f"{self.name} trellis for a {m}x{n} {spec.name} matrix must have shape {want}, "
                f"got {tuple(packed.shape)}"
            )


class TileLayout(Layout):
    packed_dtype = torch.int32

    def order(self) -> torch.Tensor:
        return row_order()

    def packed_shape(self, spec: TrellisSpec, m: int, n: int) -> tuple[int, ...]:
        return (m // TILE, n // TILE, spec.words_per_tile)

    def pack(self, words: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
        _check_words(words, spec)
        return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)

    def unpack(self, packed: torch.Tensor, spec: TrellisSpec, m: int, n: int) -> torch.Tensor:
        self.check_packed(packed, spec, m, n)
        return packed.to(torch.int64) & 0xFFFFFFFF


class QtipLayout(Layout):
    packed_dtype = torch.int16

    def order(self) -> torch.Tensor:
        return qtip_order()

    def validate(self, spec: TrellisSpec, m: int, n: int) -> None:
        if spec.L != 16 or spec.V != 2:
            raise ValueError(f"the qtip kernel layout holds L=16, V=2 trellises only, got {spec.name}")
        if m <= 0 or n <= 0 or m % 32 or n % 32:
            raise ValueError(f"the qtip kernel layout needs dims that are multiples of 32, got {m}x{n}")

    def packed_shape(self, spec: TrellisSpec, m: int, n: int) -> tuple[int, ...]:
        return ((m // TILE) * (n // TILE), TILE * spec.K)

    def pack(self, words: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
        _check_words(words, spec)
        tm, tn = words.shape[0], words.shape[1]
        self.validate(spec, tm * TILE, tn * TILE)
        stream_bytes = _bytes_from_words(words)  # (tm, tn, 32K)
        pos = _qtip_byte_positions(tm, tn, spec.K, words.device)
        buf = torch.empty(tm * tn * 32 * spec.K, dtype=torch.uint8, device=words.device)
        buf[pos.reshape(-1)] = stream_bytes.reshape(-1).to(torch.uint8)
        return buf.view(torch.int16).reshape(self.packed_shape(spec, tm * TILE, tn * TILE))

    def unpack(self, packed: torch.Tensor, spec: TrellisSpec, m: int, n: int) -> torch.Tensor:
        self.check_packed(packed, spec, m, n)
        tm, tn = m // TILE, n // TILE
        buf = packed.contiguous().view(torch.uint8).reshape(-1).to(torch.int64)
        pos = _qtip_byte_positions(tm, tn, spec.K, packed.device)
        return _words_from_bytes(buf[pos])


def _bytes_from_words(words: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([24, 16, 8, 0], device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).reshape(*words.shape[:-1], -1)


def _words_from_bytes(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(*b.shape[:-1], -1, 4)
    return (b[..., 0] << 24) | (b[..., 1] << 16) | (b[..., 2] << 8) | b[..., 3]


def _qtip_byte_positions(tm: int, tn: int, K: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat byte offset of stream byte q of tile (ti, tj): int64 (tm, tn, 32K)."""
    ti = torch.arange(tm, device=device).view(tm, 1, 1)
    tj = torch.arange(tn, device=device).view(1, tn, 1)
    q = torch.arange(32 * K, device=device).view(1, 1, -1)
    lane, i = q // K, q % K
    n32 = tn // 2
    base = ((ti >> 1) * n32 + (tj >> 1)) * 128 * K
    # chunk bytes are stored little-endian: the stream's first byte of a chunk is its last byte
    return base + lane * 4 * K + (2 * (tj & 1) + (ti & 1)) * K + (K - 1 - i)


LAYOUTS: dict[str, Layout] = {
    "qtip": QtipLayout("qtip", "QTIP kernel format (L=16, V=2; released checkpoints)"),
    "tile": TileLayout("tile", "generic: uint32 stream words per tile, row-major tiles and elements"),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown trellis layout {name!r}; known layouts: {', '.join(sorted(LAYOUTS))}") from None


# ---------------------------------------------------------------------------------------------
# tiles <-> matrices


def tiles_to_matrix(tile_values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(tm, tn, 256) values in sequence order -> (16*tm, 16*tn) matrix."""
    tm, tn, _ = tile_values.shape
    tiles = torch.empty_like(tile_values)
    tiles[..., order.to(tile_values.device)] = tile_values
    return tiles.reshape(tm, tn, TILE, TILE).permute(0, 2, 1, 3).reshape(tm * TILE, tn * TILE)


def matrix_to_tiles(matrix: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(m, n) matrix -> (m/16, n/16, 256) values in sequence order (the encoder's input)."""
    m, n = matrix.shape
    if m % TILE or n % TILE:
        raise ValueError(f"matrix dims must be multiples of {TILE}, got {m}x{n}")
    tiles = matrix.reshape(m // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(m // TILE, n // TILE, -1)
    return tiles[..., order.to(matrix.device)]


def decode_words(words: torch.Tensor, spec: TrellisSpec, table: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor:
    """Reference decode of stream words (tm, tn, 8K) into the float32 matrix Ŵ."""
    states = states_from_words(words, spec)
    values = decode_states(states, spec, table)  # (tm, tn, T, V)
    return tiles_to_matrix(values.reshape(*values.shape[:2], TILE_WEIGHTS), order)


def decode_packed(
    packed: torch.Tensor, spec: TrellisSpec, m: int, n: int, table: torch.Tensor | None, layout: str
) -> torch.Tensor:
    """Reference random-access decode of a packed trellis: the test oracle for every kernel."""
    lay = get_layout(layout)
    return decode_words(lay.unpack(packed, spec, m, n), spec, table, lay.order())


# ---------------------------------------------------------------------------------------------
# EXL3 (ExLlamaV3) tiles, mapped into our conventions.
#
# EXL3 stores W_hat as [in, out] with trellis [in/16, out/16, 16K] int16; our Ŵ is (out x in), so
# our tile (ti, tj) is EXL3's tile [tk=tj, tn=ti] and Ŵ = W_hatᵀ. Inside a tile, EXL3's stream
# words are little-endian int16 pairs (Wd[i] = d[2i] | d[2i+1] << 16, read MSB-first) and its
# state p is the 16-bit window that *ends* at bit (p+1)K. Our state p *starts* at bit pK, so our
# stream is EXL3's rotated right by L - K bits. Positions follow the mma.m16n8k16 B fragment:
# p = 8l + j lands on EXL3 row 2(l&3) + (j&1) + 8((j>>1)&1) (input offset) and column
# (l>>2) + 8(j>>2) (output offset), i.e. on our tile element 16*column + row.


@cache
def exl3_order() -> torch.Tensor:
    """EXL3 order in our (out x in) tiles: sequence position p -> tile element 16*r + c."""
    p = torch.arange(TILE_WEIGHTS)
    lane, j = p >> 3, p & 7
    row_in = 2 * (lane & 3) + (j & 1) + 8 * ((j >> 1) & 1)
    col_out = (lane >> 2) + 8 * (j >> 2)
    return col_out * TILE + row_in


def rotate_stream(words: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate circular MSB-first streams (..., nw) of uint32 words: result bit b = input bit b - shift.

    ``shift`` may be negative (rotate left) and any size; whole words move by roll, the rest by shifts.
    """
    nbits = words.shape[-1] * 32
    shift %= nbits
    whole, r = divmod(shift, 32)
    w = torch.roll(words, whole, dims=-1) if whole else words
    if r == 0:
        return w
    prev = torch.roll(w, 1, dims=-1)
    return ((prev << (32 - r)) | (w >> r)) & 0xFFFFFFFF


class Exl3Layout(Layout):
    """ExLlamaV3's ``trellis`` tensor: int16 [in/16, out/16, 16K] (see the comment above)."""

    packed_dtype = torch.int16

    def order(self) -> torch.Tensor:
        return exl3_order()

    def validate(self, spec: TrellisSpec, m: int, n: int) -> None:
        if spec.L != 16 or spec.V != 1:
            raise ValueError(f"the exl3 layout holds L=16, V=1 trellises only, got {spec.name}")
        super().validate(spec, m, n)

    def packed_shape(self, spec: TrellisSpec, m: int, n: int) -> tuple[int, ...]:
        return (n // TILE, m // TILE, TILE * spec.K)

    def pack(self, words: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
        _check_words(words, spec)
        self.validate(spec, words.shape[0] * TILE, words.shape[1] * TILE)
        w = rotate_stream(words, -(spec.L - spec.K))  # back to EXL3's window-ends-at-step stream
        halves = torch.stack((w & 0xFFFF, w >> 16), dim=-1).reshape(*w.shape[:-1], TILE * spec.K)
        halves = torch.where(halves >= 1 << 15, halves - (1 << 16), halves).to(torch.int16)
        return halves.transpose(0, 1).contiguous()

    def unpack(self, packed: torch.Tensor, spec: TrellisSpec, m: int, n: int) -> torch.Tensor:
        self.check_packed(packed, spec, m, n)
        d = packed.transpose(0, 1).to(torch.int64) & 0xFFFF  # (m/16, n/16, 16K) as uint16
        w = d[..., 0::2] | (d[..., 1::2] << 16)
        return rotate_stream(w, spec.L - spec.K).contiguous()


LAYOUTS["exl3"] = Exl3Layout("exl3", "ExLlamaV3 trellis: int16 [in/16, out/16, 16K], mma B-fragment order")
