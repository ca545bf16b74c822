"""Trellis codes: the map from an L-bit state to V weight values.

Each code is one :class:`Code` entry in :data:`CODES` holding its exact reference (integer math in
torch, uint32 wrap-around emulated with int64 masks) and its validation rules. The Triton code
generator reads the same entry for the snippet it splices into kernels, so adding a code means
adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qtip_triton.spec import TrellisSpec

U32 = 0xFFFFFFFF


def _u32(x: torch.Tensor) -> torch.Tensor:
    return x & U32


def fp16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret the low 16 bits of an integer tensor as fp16."""
    b = (bits & 0xFFFF).to(torch.int32)
    b = torch.where(b >= 0x8000, b - 0x10000, b)
    return b.to(torch.int16).view(torch.float16)


def byte_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the four bytes of a uint32 held in int64."""
    return (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF)


# ---------------------------------------------------------------------------------------------
# Reference decoders. Each takes int64 states (any shape), the spec and the table (or None) and
# returns float32 values of shape states.shape + (V,).


def _hyb(states: torch.Tensor, spec: TrellisSpec, table: torch.Tensor | None) -> torch.Tensor:
    assert table is not None and spec.Q is not None
    h = _u32(states * (states + 1))
    idx = (h >> (15 - spec.Q)) & ((1 << spec.Q) - 1)
    vals = table.to(torch.float32)[idx]  # (..., V)
    flip = ((h >> 15) & 1).bool()
    # only the first weight of the pair carries the sign bit
    first = torch.where(flip, -vals[..., 0], vals[..., 0])
    return torch.cat([first.unsqueeze(-1), vals[..., 1:]], dim=-1)


ONEMAD_A, ONEMAD_B, ONEMAD_SCALE = 34038481, 76625530, 147.800537109375


def _onemad(states: torch.Tensor, spec: TrellisSpec, table: torch.Tensor | None) -> torch.Tensor:
    x = _u32(states * ONEMAD_A + ONEMAD_B)
    y = byte_sum(x).to(torch.float32)
    # the divisor is a tensor on y's device, not a Python float: PyTorch's CUDA division by a CPU
    # scalar multiplies by its reciprocal, which is not the correctly rounded quotient for 398 of the
    # 1021 numerators (the reference must equal the golden values on every device; found on the H200)
    return ((y - 510.0) / torch.full_like(y, ONEMAD_SCALE)).unsqueeze(-1)


THREEINST_A, THREEINST_B = 89226354, 64248484
THREEINST_MASK, THREEINST_XOR = 0x8FFF8FFF, 0x3B603B60


def three_inst_value(x: torch.Tensor) -> torch.Tensor:
    """The 3INST bit trick on an already-hashed uint32: two fp16 halves added in fp16."""
    r = (x & THREEINST_MASK) ^ THREEINST_XOR
    hi = fp16_from_bits(r >> 16).to(torch.float32)
    lo = fp16_from_bits(r).to(torch.float32)
    # both halves share an exponent range near 1, so the fp32 sum is exact and one rounding to
    # fp16 reproduces the hardware's fp16 addition
    return (hi + lo).to(torch.float16).to(torch.float32)


def _threeinst(states: torch.Tensor, spec: TrellisSpec, table: torch.Tensor | None) -> torch.Tensor:
    return three_inst_value(_u32(states * THREEINST_A + THREEINST_B)).unsqueeze(-1)


def _lut(states: torch.Tensor, spec: TrellisSpec, table: torch.Tensor | None) -> torch.Tensor:
    assert table is not None
    return table.to(torch.float32)[states]


# ---------------------------------------------------------------------------------------------
# Validation helpers shared by entries


def _need_q(spec: TrellisSpec, lo: int = 1, hi: int = 15) -> None:
    if spec.Q is None:
        raise ValueError(f"code {spec.code!r} needs Q (the table index width), e.g. '{spec.code}9'")
    if not lo <= spec.Q <= hi:
        raise ValueError(f"TrellisSpec.Q={spec.Q} is out of range for code {spec.code!r}: Q must be in {lo}..{hi}")


def _no_q(spec: TrellisSpec) -> None:
    if spec.Q is not None:
        raise ValueError(f"code {spec.code!r} takes no Q, got Q={spec.Q}")


@dataclass(frozen=True)
class Code:
    """One trellis code. ``table_shape`` is None for computed codes (no table)."""

    name: str
    description: str
    reference: Callable[[torch.Tensor, TrellisSpec, torch.Tensor | None], torch.Tensor]
    allowed_V: tuple[int, ...]
    uses_q: bool = False
    table_shape: Callable[[TrellisSpec], tuple[int, int]] | None = None
    rms: float | None = None  # RMS of the values over uniformly random states, when fixed
    extra_checks: tuple[Callable[[TrellisSpec], None], ...] = field(default=())
    # How generated Triton kernels decode a state (qtip_triton.codegen); None: no kernel support yet.
    triton: TritonDecoder | None = None

    @property
    def needs_table(self) -> bool:
        return self.table_shape is not None

    def triton_decoder(self) -> TritonDecoder:
        """The Triton snippet of this code; ValueError when it has none (the kernels cannot run it)."""
        if self.triton is None:
            raise ValueError(
                f"no Triton snippet for code {self.name!r}: add a TritonDecoder as Code.triton in "
                "qtip_triton/codes.py to run it in the generated kernels"
            )
        return self.triton

    def validate(self, spec: TrellisSpec) -> None:
        if spec.V not in self.allowed_V:
            raise ValueError(
                f"code {self.name!r} decodes V in {self.allowed_V} weights per state, got TrellisSpec.V={spec.V}"
            )
        if self.uses_q:
            _need_q(spec)
        else:
            _no_q(spec)
        for check in self.extra_checks:
            check(spec)

    def check_table(self, spec: TrellisSpec, table: torch.Tensor | None) -> None:
        """Raise a clear error when a table is missing, superfluous or of the wrong shape."""
        if self.table_shape is None:
            if table is not None:
                raise ValueError(f"code {self.name!r} is computed and takes no table")
            return
        want = self.table_shape(spec)
        if table is None:
            raise ValueError(f"code {self.name!r} needs a table of shape {want}")
        if tuple(table.shape) != want:
            raise ValueError(f"code {self.name!r} table must have shape {want}, got {tuple(table.shape)}")
        if not table.is_floating_point():
            raise ValueError(f"code {self.name!r} table must be floating point, got {table.dtype}")
        if not torch.isfinite(table).all():
            raise ValueError(f"code {self.name!r} table holds NaN or Inf")


# ---------------------------------------------------------------------------------------------
# Triton snippets: what the code generator splices into kernels for each code. A snippet gets the
# name of a uint32 tensor holding states (< 2^L) and a ``lookup(index_expr) -> expr`` that reads
# the kernel's table (see qtip_triton.kernels.prepare.kernel_table) and returns source lines plus V
# value expressions. Temporaries are named after the state variable so snippets never collide.
# Integer math is uint32 with wrap-around, exactly like the references above.

Lookup = Callable[[str], str]


@dataclass(frozen=True)
class TritonDecoder:
    """One code's Triton decode.

    ``table``: ``"none"`` (computed code), ``"packed16"`` (int32 words of fp16 pairs, small enough to
    gather from registers/shared memory) or ``"float32"`` (read by pointer). ``value_dtype``: the dtype
    the values come out in, exactly (``"fp16"`` or ``"fp32"``).
    """

    table: str
    value_dtype: str
    emit: Callable[[TrellisSpec, str, Lookup], tuple[list[str], list[str]]]
    # The values depend only on the state mod 2^state_bits (HYB: the low 16 bits of s*(s+1)), so the
    # generator may leave garbage above that bit instead of masking each window (one op per state).
    state_bits: int | None = None
    # Triton source of @triton.jit helpers the snippet's expressions call, spliced into the generated
    # module once (each with a pure-Triton path for the interpreter and inline PTX for the GPU).
    helpers: str = ""


def _fp16_half(expr: str, high: bool) -> str:
    """fp16 held in the high or low 16 bits of a uint32 expression (helpers defined by the generator:
    ``_f16_lo``/``_f16_hi``; it may swap them for fused fp32 conversions)."""
    return f"_f16_{'hi' if high else 'lo'}({expr})"


def _hyb_triton(spec: TrellisSpec, s: str, lookup: Lookup) -> tuple[list[str], list[str]]:
    assert spec.Q is not None
    words = (spec.V + 1) // 2
    lines = [
        f"{s}_h = {s} * ({s} + 1)",
        f"{s}_i = (({s}_h >> {15 - spec.Q}) & {(1 << spec.Q) - 1}).to(tl.int32)",
    ]
    vals: list[str] = []
    for w in range(words):
        idx = f"{s}_i" if words == 1 else f"{s}_i * {words} + {w}"
        word = f"{lookup(idx)}.to(tl.uint32, bitcast=True)"
        if w == 0:  # bit 15 of the hash is the sign of the first weight: bit 15 of the first word
            word = f"({word} ^ ({s}_h & 0x8000))"
        lines.append(f"{s}_p{w} = {word}")
        vals.append(_fp16_half(f"{s}_p{w}", high=False))
        vals.append(_fp16_half(f"{s}_p{w}", high=True))
    return lines, vals[: spec.V]


def _byte_sum_expr(x: str) -> str:
    return f"(({x} & 0xFF) + (({x} >> 8) & 0xFF) + (({x} >> 16) & 0xFF) + ({x} >> 24))"


# Why the helpers: the byte sum is one dp4a (x · 0x01010101 bytewise, plus an addend) instead of ~10
# shifts, masks and adds; 1MAD's correctly rounded division by a constant is a reciprocal multiply
# with one FMA correction (exact for all 1021 possible numerators, checked in tests/test_codes.py)
# instead of div.rn's slow-path check; mul1's fp16 FMA is one HFMA on the fp16 whose bits the dp4a
# already assembled. The interpreter runs the plain formulas.
ONEMAD_RCP = float(torch.tensor(1.0 / ONEMAD_SCALE, dtype=torch.float32))
ONEMAD_HELPER = f'''
@triton.jit
def _onemad_value(x, INTERPRET: tl.constexpr):
    """1MAD: (byte sum of the uint32 x - 510) / {ONEMAD_SCALE!r}, correctly rounded in float32."""
    if INTERPRET:
        y = {_byte_sum_expr('x')}.to(tl.float32) - 510.0
        return tl.math.div_rn(y, {ONEMAD_SCALE!r})
    else:
        # one dp4a: bytes of x dotted with 1,1,1,1, plus -510 (0xFFFFFE02 as a signed int32)
        y = tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, 0x01010101, 0xFFFFFE02;", "=r,r", [x],
                                      dtype=tl.int32, is_pure=True, pack=1).to(tl.float32)
        q = y * {ONEMAD_RCP!r}
        return tl.fma(tl.fma(-q, {ONEMAD_SCALE!r}, y), {ONEMAD_RCP!r}, q)
'''


def _onemad_triton(spec: TrellisSpec, s: str, lookup: Lookup) -> tuple[list[str], list[str]]:
    return [f"{s}_x = {s} * {ONEMAD_A} + {ONEMAD_B}"], [f"_onemad_value({s}_x, INTERPRET)"]


def _three_inst_lines(s: str, hashed: str) -> tuple[list[str], list[str]]:
    lines = [f"{s}_r = ({hashed} & {THREEINST_MASK:#x}) ^ {THREEINST_XOR:#x}"]
    return lines, [f"({_fp16_half(f'{s}_r', high=True)} + {_fp16_half(f'{s}_r', high=False)})"]


def _threeinst_triton(spec: TrellisSpec, s: str, lookup: Lookup) -> tuple[list[str], list[str]]:
    return _three_inst_lines(s, f"({s} * {THREEINST_A} + {THREEINST_B})")


def _lut_triton(spec: TrellisSpec, s: str, lookup: Lookup) -> tuple[list[str], list[str]]:
    lines = [f"{s}_i = {s}.to(tl.int32) * {spec.V}"]
    return lines, [lookup(f"{s}_i + {f}" if f else f"{s}_i") for f in range(spec.V)]


HYB_TRITON = TritonDecoder("packed16", "fp16", _hyb_triton, state_bits=16)
ONEMAD_TRITON = TritonDecoder("none", "fp32", _onemad_triton, helpers=ONEMAD_HELPER)
THREEINST_TRITON = TritonDecoder("none", "fp16", _threeinst_triton)
LUT_TRITON = TritonDecoder("float32", "fp32", _lut_triton)


CODES: dict[str, Code] = {}


def register_code(code: Code) -> Code:
    """Add a code; its name becomes valid in :class:`TrellisSpec` and spec names."""
    if code.name in CODES:
        raise ValueError(f"code {code.name!r} is already registered")
    CODES[code.name] = code
    return code


register_code(
    Code(
        "hyb",
        "hash s*(s+1), look up a 2^Q x V table, bit 15 of the hash flips the first weight's sign",
        _hyb,
        allowed_V=(1, 2, 4),
        uses_q=True,
        table_shape=lambda s: (1 << s.Q, s.V),
        triton=HYB_TRITON,
    )
)
register_code(
    Code("1mad", "one multiply-add, sum of the four bytes, affine", _onemad, allowed_V=(1,), rms=1.0,
         triton=ONEMAD_TRITON)
)
register_code(
    Code("3inst", "multiply-add, mask and xor, two fp16 halves added", _threeinst, allowed_V=(1,), rms=1.2437,
         triton=THREEINST_TRITON)
)
register_code(
    Code("lut", "plain 2^L x V table indexed by the state (research)", _lut, allowed_V=(1, 2, 4),
         table_shape=lambda s: (1 << s.L, s.V), triton=LUT_TRITON)
)


def get_code(name: str) -> Code:
    try:
        return CODES[name]
    except KeyError:
        raise ValueError(f"unknown trellis code {name!r}; known codes: {', '.join(sorted(CODES))}") from None


def decode_states(states: torch.Tensor, spec: TrellisSpec, table: torch.Tensor | None = None) -> torch.Tensor:
    """Values of ``states`` (integers < 2^L) under ``spec``'s code: float32, shape ``states.shape + (V,)``."""
    code = get_code(spec.code)
    code.check_table(spec, table)
    s = states.to(torch.int64)
    if s.numel() and (int(s.min()) < 0 or int(s.max()) >= (1 << spec.L)):
        raise ValueError(f"states must lie in [0, 2^{spec.L})")
    return code.reference(s, spec, table)


def all_state_values(spec: TrellisSpec, table: torch.Tensor | None = None) -> torch.Tensor:
    """The (2^L, V) codebook: what the Viterbi encoder searches."""
    return decode_states(torch.arange(1 << spec.L), spec, table)


# ---------------------------------------------------------------------------------------------
# EXL3 (ExLlamaV3) codes. EXL3's "3inst" is QTIP's 3INST above (same constants); these are its two
# other computed codes, both V=1 over uint32 states.

MCG_MULT = 0xCBAC1FED  # multiplicative congruential hash, no additive constant
MUL1_MULT = 0x83DCD12D
# mul1's affine map is one fp16 fused multiply-add h*kinv + kbias with h = 1024 + b:
# kinv = fp16 bits 0x1EEE = 1774 / 2^18, kbias = fp16 bits 0xC931 = -1329 / 2^7, so the exact
# result is (1774*b - 905216) / 2^18.
MUL1_NUM, MUL1_OFFSET, MUL1_SHIFT = 1774, 905216, 18
MUL1_H_BITS, MUL1_KINV_BITS, MUL1_KBIAS_BITS = 0x6400, 0x1EEE, 0xC931  # fp16 bits of h(b=0), kinv, kbias


def _mcg(states: torch.Tensor, spec: TrellisSpec, table: torch.Tensor | None) -> torch.Tensor:
    return three_inst_value(_u32(states * MCG_MULT)).unsqueeze(-1)


def mul1_value(x: torch.Tensor) -> torch.Tensor:
    """mul1 on an already-hashed uint32: fp16_RNE((1774*b - 905216) / 2^18), b = byte sum of x.

    Why this is the FMA bit for bit: the numerator is an integer of magnitude < 2^20, exact in
    fp32, and dividing by 2^18 is exact, so the only rounding is the final fp32 -> fp16 (RNE),
    which is the single rounding of the hardware's fused multiply-add.
    """
    b = byte_sum(x)
    exact = (b * MUL1_NUM - MUL1_OFFSET).to(torch.float32) / float(1 << MUL1_SHIFT)
    return exact.to(torch.float16).to(torch.float32)


def _mul1(states: torch.Tensor, spec: TrellisSpec, table: torch.Tensor | None) -> torch.Tensor:
    return mul1_value(_u32(states * MUL1_MULT)).unsqueeze(-1)


def _mcg_triton(spec: TrellisSpec, s: str, lookup: Lookup) -> tuple[list[str], list[str]]:
    return _three_inst_lines(s, f"({s} * {MCG_MULT:#x})")


MUL1_HELPER = f'''
@triton.jit
def _mul1_value(x, INTERPRET: tl.constexpr):
    """EXL3 mul1 on the hashed uint32 x: fp16 h = 1024 + byte sum (bits 0x6400 + b), h * kinv + kbias in one
    fp16 FMA (the interpreter: the same number exactly in float32, then the single fp16 rounding)."""
    if INTERPRET:
        b = {_byte_sum_expr('x')}.to(tl.int32)
        return ((b * {MUL1_NUM} - {MUL1_OFFSET}).to(tl.float32) * {1.0 / (1 << MUL1_SHIFT)!r}).to(tl.float16)
    else:
        return tl.inline_asm_elementwise(
            "{{ .reg .b32 t; .reg .b16 h, k, c; dp4a.u32.u32 t, $1, 0x01010101, {MUL1_H_BITS:#x}; cvt.u16.u32 h, t; "
            "mov.b16 k, {MUL1_KINV_BITS:#x}; mov.b16 c, {MUL1_KBIAS_BITS:#x}; fma.rn.f16 $0, h, k, c; }}",
            "=h,r", [x], dtype=tl.float16, is_pure=True, pack=1)
'''


def _mul1_triton(spec: TrellisSpec, s: str, lookup: Lookup) -> tuple[list[str], list[str]]:
    return [], [f"_mul1_value({s} * {MUL1_MULT:#x}, INTERPRET)"]


register_code(
    Code("mcg", "EXL3: multiply by 0xCBAC1FED, then 3INST's mask, xor and fp16 halves", _mcg, allowed_V=(1,),
         rms=1.2441, triton=TritonDecoder("none", "fp16", _mcg_triton))
)
register_code(
    Code("mul1", "EXL3: multiply by 0x83DCD12D, byte sum, one fp16 fused multiply-add", _mul1, allowed_V=(1,),
         rms=1.0003, triton=TritonDecoder("none", "fp16", _mul1_triton, helpers=MUL1_HELPER))
)
