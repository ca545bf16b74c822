"""Triton random-Hadamard transforms with the diagonal scalings fused, batched over rows and blocks.

Computes, for each row of ``x`` (any number of tokens) and each of ``blocks`` equal blocks of it,
``y = post ⊙ (M_nb z) + bias`` (or ``M_nbᵀ``), ``z = pre ⊙ Σ_s x[s]`` (the sum over leading split-K
partials is fused: the decode kernels write partials and this kernel reduces them).

Why tensor cores: M_nb = (hadK ⊗ H_P1 ⊗ H_P2) / sqrt(nb) with P1·P2 = nb/Kh. Viewing a block as the
matrix Z (Kh·P1 x P2, row-major), M_nb z = A · Z · B with A = hadK ⊗ H_P1 (zero-padded to a power of
two, built once on the host, exact ±1/0) and B = H_P2. Two small dense products per block replace a
strided butterfly, and every Kh of QTIP (12..172) works the same way. When Kh·P1 = 1 (plain Sylvester
blocks of up to 128, e.g. EXL3's 128-wide blocks) only Z·B remains and many blocks share one program.

Precision: each product operand is split into bf16 hi + lo parts (two dots), which keeps ~16 mantissa
bits and fp32's range; accumulation is fp32. The CPU interpreter multiplies in fp32 instead (its bf16
dot is wrong). The default for fp16 outputs (``f16_dots``, ``F16_ENV``; ``=0`` turns it off): one fp16 dot per
product, ~11 bits, as the output keeps anyway.

The kernels themselves are in :mod:`qtip_triton.kernels.hadamard_jit`; this module picks one per call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable

import torch
import triton

from qtip_triton import hadamard
from qtip_triton.autotune.buckets import row_class
from qtip_triton.kernels import hadamard_gemm
from qtip_triton.kernels.hadamard_jit import _had1_kernel, _had2_kernel, _had2_stack_kernel, _had2_tall_kernel
from qtip_triton.kernels.pdl import launch_args

P2_MAX = 128  # columns of the Z view (the B = H_P2 factor)
ROWS_MAX = 2048  # padded rows of the Z view (A is ROWS x ROWS)
# Small-batch launch choices, from bench/hadamard.py on an H200 (2026-11-28; 4.4 us timer floor): at
# one token the column-split grid took the input transform of 4096 from 19.0 to 11.4 us and the
# unrolled partial loads the output transform of 28672 from 45.5 to 15.9 us; past ~64 row programs
# (e.g. 11008 at 16 tokens) the column split recomputes A·Z for nothing and loses.
COL_SPLIT_MAX_PROGRAMS = 64
UNROLL_MAX_TOKENS = 64
# Partials loaded per round trip: 4 measured fast (S = 4: 28672's output 45.5 -> 15.9 us); all 16 at
# once spilled registers (16 x a 32x128 fp32 tile per program: 4096 -> 317 us, H200 2026-11-28).
UNROLL_SPLITS = 4
# Many tokens (prefill, large batches): the per-token kernel re-reads each token's whole row once per
# row block and runs RP/KBLK dependent small dots per program (n=11008 at 2048 tokens: ~300 us for the
# two transforms of one layer, H100 run 5). From this many (token, block) rows on, the tall kernel
# treats the transform as one GEMM, A · [Z_0 | Z_1 | ...], with several tokens per tile.
# Measured on the H200 (bench/results/h200-2026-11-29-hadamard-tall.md, 1..2048 tokens): the tall kernel
# wins for output transforms from 128 rows (11008 at 2048 tokens: 853 -> 462 us; 28672 at 128: 177 -> 93)
# but loses for input transforms (SU, scattered kernel-order stores) up to 256 tokens (28672 at 256:
# 211 vs 286 us) and wins at 2048 (11008: 971 -> 729); with a row factor of at most 32 (n = 4096) it
# never won (4096 at 2048 tokens: input 153 vs 196, output 91 vs 101).
TALL_MIN_ROWS = 128  # output transforms
TALL_MIN_ROWS_INPUT = 1024  # input transforms (transpose=True): between the measured 256 and 2048
TALL_MIN_RP = 64  # padded rows of A below which the per-token kernel always runs
NO_TALL_ENV = "QTIP_TRITON_NO_TALL_HADAMARD"
TALL_BN = 128  # columns of the A · Z tile (TALL_BN / CP tokens)
TALL_BM = 64  # rows of A per program
# sm_90 compile (CPU machine, Triton 3.8): 8 warps keep every Llama size at 132-183 registers with no
# spills; 4 warps reach 242-255 registers and spill for fp32 partials.
TALL_WARPS = 8

# Tokens stacked along the rows of one tile (``_had2_stack_kernel``): for blocks whose A has at most
# STACK_ROWS padded rows, STACK_ROWS // RP tokens' Z views sit on top of each other, so each program
# runs two full [STACK_ROWS, CP] x [., CP] products instead of one token's slivers (the per-token kernel)
# or one token per tile at CP = 128 (the tall kernel: 4096, 8192, 14336); A of 256 padded rows (11008,
# 28672) takes one token per program in 64-row slices.
# sm_90 compile (bench/sass_hadamard.py, 2048 tokens, every Llama size): wgmma, no spills; 128-row tiles
# 184-255 registers and 96 KB shared (one program per SM), 64-row tiles 125 (output) to 175 (input, with SU
# and the destination order) registers; A of 256 rows, one token per program, 170-255 registers, 56-64 KB.
STACK_ROWS = 128
# Below this many (token, block) rows a tile holds one token's A (A's padded rows; A of 32 or 64 rows) by default:
# H100, 64-128 tokens, 4096 output 8.1 -> 4.7 us and natural input 8.3 -> 5.0 against 128-row tiles, 8192 12.5 ->
# 8.5 and 8.2 -> 6.8; from 256 tokens the 128-row tile wins for fp16 outputs and natural inputs (8192 at 256:
# 8.4 against 12.2 us). QTIP_TRITON_HADAMARD_STACKED keeps this choice; ``stack_rows`` overrides it.
STACK_SMALL_TILE_BELOW = 256
# ... for A of at least this many padded rows (4096 features and up, where it was timed): smaller A (1024-2048
# features) keep 128-row tiles and their outputs the stacked kernel from STACK_MIN_ROWS_OUTPUT_SMALL_A rows, as
# before. Why: only 32- and 64-row tiles were timed (H100, session 27); a 16-row tile compiles for sm_90 (564 SASS
# per warp, mma.sync, 60 registers: bench/sass_hadamard.py) but was never timed against the per-token kernel.
STACK_SMALL_TILE_MIN_RP = 32
# From STACK_SMALL_TILE_BELOW rows on, the tile grows towards STACK_ROWS only while the grid keeps at least this many
# programs (one wave on the H100's 132 SMs at the 128-row tile's one program an SM), halving down to one token's A.
# Why: at 256 tokens the 4096-feature transforms of a Llama-2-7B layer ran 128-row tiles, 4 tokens a program, 64
# programs: 0.48 waves, 13-16 µs for 2 MB read (ncu, H100, session 35,
# ``logs/h100-2026-12-07-session35-ncu-linear-*-m256.txt``), and 64-row tiles took the output transform 21.8 -> 18.3
# µs in one run (``*-hadamard-session35-t256.md``), within noise of them in the next (18.0 / 18.3,
# ``*-hadamard-session35-tiles.md``). Inside the layer at 256 tokens, where o's input and output and down's output
# change, its four ops summed 407.9 -> 398.7 µs (o 42.8 -> 39.7, down 86.5 -> 84.8) and the whole layer 390.8 ->
# 385.2 (``*-fused-layers-session35-fill{0,1}.md``). At 512 tokens the 128-row tile stays (and won there: 4096 natural
# input 14.6 µs against 19.5 for 64-row tiles); session 27's 8192 at 256 tokens (128 programs, faster than 64-row
# tiles, again in session 35: 14.8 against 19.3) keeps it too. QTIP_TRITON_HADAMARD_STACK_FILL=0 keeps the 128-row
# tile from STACK_SMALL_TILE_BELOW rows (the rule before it).
STACK_MIN_PROGRAMS = 128
STACK_FILL_ENV = "QTIP_TRITON_HADAMARD_STACK_FILL"
STACK_MAX_RP = 256
STACK_KC = 64  # tiles of more than STACK_ROWS rows (A of 256 padded rows): rows per slice of both products
STACK_CB = 64  # ... and columns of Y per program
STACK_WARPS = 8
# ... but 4 warps there for input transforms into the natural order and for outputs of at most 64 columns of Z (11008 =
# 172 x 64). Why (H100, chained, ``*-hadamard-session40-stack-tiles.md``, session 42): 11008 output 14.2 -> 12.2 µs at
# 256 rows, 28.2 -> 24.5 at 512 (gate/up's grouped output at 256 tokens); 11008 natural input 13.1 -> 11.1 at 256;
# 28672 natural input 44.5 -> 39.5 at 256, 98.6 -> 82.0 at 512. 28672's output (128 columns) lost with 4 warps
# (47.4 -> 52.9 at 256) and so did inputs into a scattered destination (28672: 158.6 -> 181.8), which keep 8; fewer
# columns of Y a program (32, 16) lost everywhere.
STACK_WARPS_SLICED = 4
STACK_ENV = "QTIP_TRITON_HADAMARD_STACKED"
# Where it is the default (H200, bench/results/h200-2026-12-05-hadamard-stacked.md, 1..2048 tokens, against the
# per-token and tall kernels; QTIP_TRITON_HADAMARD_STACKED=N overrides with one threshold, 0 turns it off):
# - output transforms: it beat the tall kernel at every measured size from 64 tokens (11008 at 256: 83.3 -> 43.7
#   us, 28672 at 2048: 1337 -> 902) and the per-token kernel from 256 tokens, so it replaces the tall kernel
#   from its 128 rows; with A of 32 rows (4096, where the tall kernel never won) from 256 rows (4 fp32
#   partials at 256 tokens: 18.6 -> 20.6 us, one fp16 partial 15.9 -> 13.7; at 2048 91 -> 79 and 60 -> 40);
# - input transforms in natural order (the prefill path): faster at every size from 128 tokens (14336 at 128:
#   27.8 -> 13.8 us, h200-2026-12-05-hadamard-defaults.md; 4096 at 2048: 72 -> 41), slower at 64 at 3 of 5 sizes;
# - input transforms into a decode kernel's order (SU, scattered stores): slower at 256 tokens at 4 of 5 sizes
#   (28672: 201 -> 213 us), faster at 2048 where A has 64+ rows (11008: 720 -> 447), slower at 4096 (155 ->
#   164): from the tall kernel's 1024 rows where A has 64+ rows, never at 32.
# H100 (session 27, bench/results/h100-80gb-hbm3-2026-12-06-hadamard-session27-stacked{,-rows}.md, chained timer,
# 16-2048 tokens) moved two of these: with a tile of one token's A (below STACK_SMALL_TILE_BELOW rows) it beats the
# per-token kernel for outputs from 64 tokens at every Llama size (4 fp32 partials at 64 tokens: 4096 5.4 -> 4.3 us,
# 8192 8.7 -> 7.7, 11008 15.8 -> 11.4, 14336 16.3 -> 12.2, 28672 49.1 -> 23.9; one fp16 partial 4.3 -> 4.2 and
# 6.9 -> 6.6), and at 32 tokens it lost for one fp16 partial (8192: 4.8 -> 6.5).
# Session 30 (H100, one Llama-2-7B layer at 32/48/64/96/128 tokens, ``*-fused-layers-session30-sg1{,-out32-nat64}.md``:
# thresholds between the measured powers of two, ``bench/fused_layers.py --stack-min``) moved two more: outputs from
# 32 rows (the layer at 32 tokens 168.2 -> 156.8 µs, q/k/v's op 44.7 -> 35.7; at 48 216.7 -> 201.0) and natural-order
# inputs from 96 (at 96 tokens 273.6 -> 268.2, o's op 35.9 -> 32.1; from 64 the layer lost 209.0 -> 212.7).
STACK_MIN_ROWS_OUTPUT = 32
STACK_MIN_ROWS_OUTPUT_SMALL_A = 256  # A of fewer than STACK_SMALL_TILE_MIN_RP padded rows (the H200's threshold)
STACK_MIN_ROWS_NATURAL = 96  # input transforms without a destination order
STACK_MIN_ROWS_INPUT = 1024  # input transforms with one, A of 64+ padded rows
# The column split in the A · (Z · B_c) order (``ZB_FIRST``), the default where A has at most ZB_MAX_RP padded
# rows: sm_90 compile at 4096 (A of 32 rows), 4 tokens, 1814 -> 992 SASS per warp (input), 255 -> 140 registers;
# at 8192 / 5120 (64 rows) 1033 -> 1173 and 124 -> 255 registers, at 11008 729 -> 828 (bench/NOTES.md, session
# 14). Timed on the H200 (bench/results/h200-2026-12-05-hadamard-zb.md, 1-16 tokens): 4096 input 10.2 -> 9.4 us,
# output 9.7 -> 9.3; slower at 8192, 14336 and 28672 (28672 output 20.5 -> 26.0); one Llama-2-7B layer's four
# ops at one token 99.9 -> 94.4 us (h200-2026-12-05-fused-layers-zb.md). QTIP_TRITON_HADAMARD_ZB_FIRST=0 turns
# it off.
ZB_ENV = "QTIP_TRITON_HADAMARD_ZB_FIRST"
ZB_MAX_RP = 32
# One fp16 dot per product instead of two bf16 ones (hi + lo) where the output is fp16 (``transform(f16_dots=)``):
# half the tensor-core work and no hi/lo splits, at ~11 bits for the products' operands instead of ~16, which an
# fp16 output keeps anyway (its own rounding is 11 bits). Timed on the H100 (bench/NOTES.md, session 21): prefill
# transforms 22-37 % faster, few-token ones ~1 µs, except the output transform of fp32 split-K partials at one token,
# 2x slower at 8192 and 28672 outputs and no faster at 4 tokens: the switch leaves fp32 inputs of up to
# F16_ENV_FP32_MIN_TOKENS - 1 tokens on the hi + lo pair (``f16_dots=True`` still forces it).
# On by default for fp16 outputs since session 35 (QTIP_TRITON_HADAMARD_F16=0: the hi + lo pair everywhere): one
# Llama-2-7B layer on the H100 at 128 tokens 230.8 -> 210.2 µs (0.76x -> 0.83x fp16) and at 256 389.7 -> 358.4
# (``*-fused-layers-session35-f16-{0,1}*.md``). Its cost, measured against float64 on the CPU (4096 and 11008
# features, 4-64 tokens): a relative error of 2.9e-4 for input transforms of fp16 x and 3.6e-4 for outputs of fp32
# partials, against 2.1e-4 for rounding the exact result to fp16 once (the hi + lo pair's own error) -- 1.4x and 1.7x
# the output's rounding, three orders of magnitude under a 2-4 bit weight's quantization error.
F16_ENV = "QTIP_TRITON_HADAMARD_F16"
F16_ENV_FP32_MIN_TOKENS = 8


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def factor(nb: int) -> tuple[int, int, int]:
    """(Kh, P1, P2) with nb = Kh * P1 * P2, P2 <= 128: the A = hadK ⊗ H_P1, B = H_P2 split."""
    kh = hadamard.hadamard_factor(nb)
    p = nb // kh
    p2 = min(p, P2_MAX)
    return kh, p // p2, p2


def supported(nb: int) -> tuple[bool, str | None]:
    """Whether the Triton transform handles blocks of ``nb`` (else the torch reference is used)."""
    try:
        kh, p1, p2 = factor(nb)
    except ValueError as e:
        return False, str(e)
    if kh * p1 > ROWS_MAX:
        return False, f"Hadamard block {nb} needs a {kh * p1}-row factor, more than the kernel's {ROWS_MAX}"
    return True, None


_MATS: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}


def padded_sizes(nb: int) -> tuple[int, int]:
    """(RP, CP): the rows of A and of B as the kernels hold them, zero-padded to powers of two >= 16
    (RP = 16 also when A is absent). One rule for the matrices, the launch choices and fuse_in's sizes."""
    kh, p1, p2 = factor(nb)
    return max(16, _next_pow2(kh * p1)), max(16, p2)


def _matrices(nb: int, transpose: bool, device: torch.device,
              dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(A or None, B) in bf16 (or ``dtype``: fp16 for ``f16_dots``; both hold ±1/0 exactly) on ``device``:
    A = hadK(ᵀ) ⊗ H_P1 zero-padded, B = H_P2 zero-padded."""
    if dtype != torch.bfloat16:
        key = (nb, transpose, str(device), dtype)
        hit = _MATS.get(key)
        if hit is None:
            a, b = _matrices(nb, transpose, device)
            hit = _MATS[key] = (b.to(dtype), None if a is None else a.to(dtype))
        return hit[1], hit[0]
    key = (nb, transpose, str(device))
    hit = _MATS.get(key)
    if hit is not None:
        return hit[1], hit[0]
    kh, p1, p2 = factor(nb)
    rp, cp = padded_sizes(nb)
    b = torch.zeros(cp, cp)
    b[:p2, :p2] = _sylvester(p2)
    a = None
    if kh * p1 > 1:
        rows = kh * p1
        hk = hadamard.hadk(kh).double().cpu()  # a private copy of the shared, cached matrix
        if transpose:
            hk = hk.t().contiguous()  # kron rejects the transposed view (p1 > 1: 5120, 14336, 28672, ...)
        a = torch.zeros(rp, rp)
        a[:rows, :rows] = torch.kron(hk, _sylvester(p1).to(hk.dtype)).float()
        a = a.to(device=device, dtype=torch.bfloat16).contiguous()
    b = b.to(device=device, dtype=torch.bfloat16).contiguous()
    _MATS[key] = (b, a)
    return a, b


def _block_size(n: int, blocks: int) -> int:
    """The Hadamard block size of ``n`` features in ``blocks`` equal blocks (a clear error if unsupported)."""
    if blocks < 1 or n % blocks:
        raise ValueError(f"{n} features do not split into {blocks} equal Hadamard blocks")
    nb = n // blocks
    ok, why = supported(nb)
    if not ok:
        raise ValueError(why)
    return nb


def _had2_launch(rows: int, T: int, S: int, rp: int, cp: int, rblk: int, cblk: int, col_split: bool | None,
                 unroll_splits: bool | None, rows_a: int | None = None) -> tuple[tuple[int, int, int], bool, int, dict]:
    """Grid, column split, partials per round trip (NSPLIT) and launch options of ``_had2_kernel`` for
    ``rows`` (groups x tokens x blocks) rows; ``None`` choices are picked by size (module constants).
    ``rows_a``: A's rows before padding (default ``rp``): row blocks wholly in the zero padding get no program
    (11008 = 172 x 64: 6 of 8; the column-split choice still counts ``rp``, as it was measured)."""
    if col_split is None:  # spread few programs over column blocks too (H200, bench/hadamard.py, 2026-11-28)
        col_split = rows * (rp // rblk) <= COL_SPLIT_MAX_PROGRAMS
    if unroll_splits is None:
        unroll_splits = T <= UNROLL_MAX_TOKENS
    grid = (rows, triton.cdiv(rows_a or rp, rblk), cp // cblk if col_split else 1)
    nsplit = min(S, UNROLL_SPLITS) if (unroll_splits and S > 1) else 0
    # Unrolled partial loads must not be software-pipelined: the pipeliner stages every partial's
    # KBLK x CP fp32 tile in shared memory per stage (16 partials at 8192: 266 KB, over the 227 KB
    # limit) -- the loads are independent and already in flight together.
    stages = {"num_stages": 1} if nsplit else {}
    return grid, bool(col_split), nsplit, stages


def _use_tall(tall: bool | None, rows: int, variant: tuple, transpose: bool, rp: int) -> bool:
    """Whether ``rows`` (token, block) rows per group take the tall kernel: ``tall`` if given, else by
    size and direction (``transpose``: an input transform) for A of ``rp`` padded rows, unless a
    small-batch launch variant was asked for or ``QTIP_TRITON_NO_TALL_HADAMARD`` is set."""
    if tall is not None:
        return bool(tall)
    if any(v is not None for v in variant) or os.environ.get(NO_TALL_ENV, "") not in ("", "0"):
        return False
    return rp >= TALL_MIN_RP and rows >= (TALL_MIN_ROWS_INPUT if transpose else TALL_MIN_ROWS)


def zb_first_on() -> bool:
    """Whether the A · (Z · B_c) order is the default where A is small (``QTIP_TRITON_HADAMARD_ZB_FIRST=0``: not)."""
    return os.environ.get(ZB_ENV, "").strip() != "0"


def _zb_first(zb_first: bool | None, col_split: bool, rp: int) -> bool:
    """Whether a launch with A of ``rp`` padded rows takes the A · (Z · B_c) order: ``zb_first`` if the call says,
    else for column-split launches where :func:`zb_first_on` and A has at most ``ZB_MAX_RP`` rows."""
    if zb_first is not None:
        return bool(zb_first)
    return col_split and rp <= ZB_MAX_RP and zb_first_on()


def _use_gemm(gemm: bool | None, rows: int, variant: tuple) -> bool:
    """Whether ``rows`` (token, block) rows take the two-GEMM path (kernels/hadamard_gemm.py): ``gemm`` if
    given, else from ``QTIP_TRITON_HADAMARD_GEMM`` rows on (off by default) unless a kernel variant was
    asked for."""
    if gemm is not None:
        return bool(gemm)
    if any(v is not None for v in variant):
        return False
    lo = hadamard_gemm.min_rows()
    return lo is not None and rows >= lo


def env_rows(name: str, meaning: str) -> int | None:
    """An environment switch holding a (token, block) row count: None when unset, else the count (0 included); a
    value that is not one is a clear error naming the switch and ``meaning`` (what 0 and unset do)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"{name}={raw!r}: expected a row count ({meaning})")
    return int(raw)


def stack_override() -> int | None:
    """``QTIP_TRITON_HADAMARD_STACKED`` as a row count: None when unset (the measured thresholds apply), 0 for off,
    else the one threshold for every transform."""
    return env_rows(STACK_ENV, "0: off; unset: the measured thresholds")


def stack_min_rows(transpose: bool, dst: bool, rp: int) -> int | None:
    """(token, block) rows from which :func:`transform` takes the stacked kernel by default for A of ``rp`` padded
    rows (``transpose``: an input transform, ``dst``: with a destination order); None: never. The measured
    thresholds (``STACK_MIN_ROWS_*``) unless ``QTIP_TRITON_HADAMARD_STACKED`` says otherwise."""
    if rp > STACK_MAX_RP:
        return None
    override = stack_override()
    if override is not None:
        return override or None
    if not transpose:
        return STACK_MIN_ROWS_OUTPUT if rp >= STACK_SMALL_TILE_MIN_RP else STACK_MIN_ROWS_OUTPUT_SMALL_A
    if not dst:
        return STACK_MIN_ROWS_NATURAL
    return STACK_MIN_ROWS_INPUT if rp >= 64 else None


STACK_GROUPS_ENV = "QTIP_TRITON_HADAMARD_STACK_GROUPS"


def stack_groups_on() -> bool:
    """Whether grouped input transforms count every group's rows (:func:`stack_rows_counted`): unless
    ``QTIP_TRITON_HADAMARD_STACK_GROUPS=0``."""
    return os.environ.get(STACK_GROUPS_ENV, "").strip() != "0"


def stack_rows_counted(rows: int, groups: int, transpose: bool) -> int:
    """The (token, block) rows a transform of ``rows`` rows per group asks the stacked kernel's threshold about:
    every group's for grouped input transforms (a fused layer's shards), unless ``QTIP_TRITON_HADAMARD_STACK_GROUPS=0``
    (then one group's, as before session 30); outputs and single inputs count one group's.

    Why: the wgmma kind's gather rule already counts all shards' rows (``gather_after_transform``), while this choice
    looked at one shard's, so at 64 tokens q/k/v's grouped input (3 x 64 rows) ran the per-token kernel: 9.7 µs inside
    the layer, where 128 rows of one input took 6.0 on the stacked kernel (H100, session 29). Timed in session 30
    (``*-fused-layers-session30-stack-groups-{0,1}.md``): the layer's four ops summed 0.4-4.9 µs less at every M of
    32-128 tokens (64: 231.7 -> 226.8), the whole layer in one graph within noise."""
    if transpose and groups > 1 and stack_groups_on():
        return rows * groups
    return rows


def _use_stacked(stacked: bool | None, rows: int, variant: tuple, rp: int, transpose: bool, dst: bool) -> bool:
    """Whether ``rows`` (token, block) rows per group take ``_had2_stack_kernel``: ``stacked`` if given (a clear
    error where A has more than ``STACK_MAX_RP`` padded rows), else from :func:`stack_min_rows` rows on where A
    is small enough and no other launch variant was asked for."""
    if stacked is not None:
        if stacked and rp > STACK_MAX_RP:
            raise ValueError(f"the stacked Hadamard kernel takes blocks whose row factor pads to at most "
                             f"{STACK_MAX_RP} rows, this one pads to {rp}")
        return bool(stacked)
    if any(v is not None for v in variant):
        return False
    lo = stack_min_rows(transpose, dst, rp)
    return lo is not None and rows >= lo


def _stacked_a(nb: int, transpose: bool, tt: int, device: torch.device,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """I_tt ⊗ A in bf16 or ``dtype`` (A as :func:`_matrices` pads it): the stacked kernel's stage-2 matrix, cached."""
    key = ("stack", nb, transpose, tt, str(device), dtype)
    hit = _MATS.get(key)
    if hit is None:
        a, _ = _matrices(nb, transpose, device)
        hit = _MATS[key] = (torch.block_diag(*([a.float()] * tt)).to(dtype).contiguous(), None)
    return hit[0]


def _use_f16(f16_dots: bool | None, out_dtype: torch.dtype, in_dtype: torch.dtype | None = None,
             tokens: int | None = None) -> bool:
    """Whether a transform writing ``out_dtype`` takes one fp16 dot per product: ``f16_dots`` if given (a clear
    error for another output dtype), else on for fp16 outputs unless ``QTIP_TRITON_HADAMARD_F16=0``, except fp32
    inputs (``in_dtype``: split-K partials) of fewer than ``F16_ENV_FP32_MIN_TOKENS`` ``tokens``, where it measured
    slower."""
    if f16_dots:
        if out_dtype != torch.float16:
            raise ValueError(f"f16_dots rounds the products' operands to fp16: only for float16 outputs, not {out_dtype}")
        return True
    if f16_dots is None:
        on = f16_on()
        if in_dtype == torch.float32 and tokens is not None and not f16_fp32_tokens(tokens):
            return False
        return on and out_dtype == torch.float16
    return False


def f16_fp32_tokens(tokens: int) -> bool:
    """Whether fp32 inputs (split-K partials) of ``tokens`` tokens may take fp16 dots by default: the one token-count
    rule of :func:`_use_f16`, which :func:`first_tokens` also keys on (a compiled variant of its own)."""
    return tokens >= F16_ENV_FP32_MIN_TOKENS


def f16_on() -> bool:
    """``QTIP_TRITON_HADAMARD_F16``: fp16 products for fp16 outputs unless ``0`` (a clear error for other values)."""
    raw = os.environ.get(F16_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{F16_ENV}={raw!r}: expected 1/unset (on for fp16 outputs) or 0 (off)")
    return raw != "0"


def _f16_launch(f16: bool, scale: float, fan_in: int | None = None) -> tuple[float, dict]:
    """(final scale, kernel constants) of a launch with or without ``f16_dots``. Off: ``scale`` and no constants, so
    the sources compiled without the option stay as they were. On: ``F16``, and for two-product kernels (``fan_in``:
    the first product's) ``MID`` = 1/sqrt(fan_in), by which the first product's result is scaled before it is
    rounded to fp16 for the second (no larger than the output can get); the final scale is what remains."""
    if not f16:
        return scale, {}
    if fan_in is None:
        return scale, {"F16": True}
    mid = 1.0 / math.sqrt(fan_in)
    return scale / mid, {"F16": True, "MID": mid}


def stack_fill_on() -> bool:
    """Whether tiles shrink to keep ``STACK_MIN_PROGRAMS`` programs (:func:`stack_tile_rows`): unless
    ``QTIP_TRITON_HADAMARD_STACK_FILL=0``."""
    return os.environ.get(STACK_FILL_ENV, "").strip() != "0"


def stack_tile_rows(rows: int, rp: int, groups: int = 1) -> int:
    """The stacked kernel's default tile rows for ``rows`` (token, block) rows in each of ``groups`` groups and A of
    ``rp`` padded rows: one token's A below ``STACK_SMALL_TILE_BELOW`` rows where A has at least
    ``STACK_SMALL_TILE_MIN_RP`` rows (more programs, each a single product pair, when few tokens would leave most
    SMs idle with 128-row tiles), else ``STACK_ROWS`` (or A's rows where larger), halved there while the grid
    would have fewer than ``STACK_MIN_PROGRAMS`` programs (:func:`stack_fill_on`)."""
    if rp < STACK_SMALL_TILE_MIN_RP:
        return max(rp, STACK_ROWS)
    if rows < STACK_SMALL_TILE_BELOW:
        return rp
    tile = max(rp, STACK_ROWS)
    if stack_fill_on():
        while tile > rp and max(groups, 1) * triton.cdiv(rows, tile // rp) < STACK_MIN_PROGRAMS:
            tile //= 2
    return tile


def _stack_launch(rows: int, groups: int, rp: int, cp: int, stack_rows: int | None = None,
                  stack_cols: int | None = None, stack_warps: int | None = None, stack_kc: int | None = None,
                  transpose: bool = False, dst: bool = False) -> tuple[tuple[int, int], dict]:
    """Grid and constants of ``_had2_stack_kernel`` for ``rows`` (token, block) rows per group; ``stack_rows``:
    the tile's rows (None: :func:`stack_tile_rows`), at least A's. A tile of at most ``STACK_ROWS`` rows runs its
    products whole; past that (A of 256 padded rows) by ``STACK_KC``-row slices, ``STACK_CB`` columns per program
    (``stack_cols``: another count there, for benches; ``stack_kc``: another slice height) and
    :func:`default_stack_warps` warps (``stack_warps`` overrides; ``transpose`` / ``dst``: an input transform, into
    a destination order)."""
    br = max(rp, stack_rows or stack_tile_rows(rows, rp, groups))
    kc, cb = (br, cp) if br <= STACK_ROWS else (stack_kc or STACK_KC, min(cp, stack_cols or STACK_CB))
    warps = stack_warps or default_stack_warps(br, cp, transpose, dst)
    return (groups * triton.cdiv(rows, br // rp), cp // cb), dict(RP=rp, CP=cp, TT=br // rp, KC=kc, CB=cb,
                                                                  num_warps=warps)


def default_stack_warps(tile_rows: int, cp: int, transpose: bool, dst: bool) -> int:
    """Warps of a stacked tile of ``tile_rows`` rows: ``STACK_WARPS``, or ``STACK_WARPS_SLICED`` for sliced tiles
    (more than ``STACK_ROWS`` rows) of natural-order inputs and of outputs of at most 64 columns of Z."""
    if tile_rows > STACK_ROWS and not dst and (transpose or cp <= 64):
        return STACK_WARPS_SLICED
    return STACK_WARPS


def launch_key(n: int, blocks: int, tokens: int, groups: int = 1, transpose: bool = False, dst: bool = False) -> tuple:
    """Which compiled variant :func:`transform` launches for ``tokens`` rows of ``n`` features in ``blocks``
    blocks (``groups`` grouped transforms), by default choices: the kernel, its token-dependent constants
    and Triton's classes of the token-dependent integer arguments (``transpose``: an input transform, ``dst``:
    with a destination order). Two token counts with the same key
    reuse one compiled kernel; the load-time warm-up (:mod:`qtip_triton.vllm.warmup`) launches one token
    count per key so that no transform compiles during inference. The split-K partial count is not in
    the key: it is fixed per M bucket, and the warm-up covers every bucket."""
    nb = _block_size(n, blocks)
    kh, p1, _ = factor(nb)
    rows = tokens * blocks
    if _use_gemm(None, rows, ()):
        return ("gemm",)  # torch/cuBLAS: nothing of ours to compile
    if kh * p1 == 1:
        return ("had1", row_class(rows))
    rp, cp = padded_sizes(nb)
    if _use_stacked(None, stack_rows_counted(rows, groups, transpose), (), rp, transpose, dst):
        return ("stacked", stack_tile_rows(rows, rp, groups), row_class(rows))
    if _use_tall(None, rows, (), transpose, rp):
        return ("tall", row_class(rows))
    # the per-token kernel's own choice, with 2 partials so that unrolled partial loads show in NSPLIT
    _, col_split, nsplit, _ = _had2_launch(max(groups, 1) * rows, tokens, 2, rp, cp, min(rp, 32), min(cp, 32),
                                           None, None)
    return ("had2", col_split, nsplit > 0, row_class(tokens), _zb_first(None, col_split, rp))


Transform = tuple[int, int, int, bool, bool]  # launch_key's (n, blocks, groups, transpose, dst)


def has_kernels(transforms: Iterable[Transform]) -> bool:
    """Whether every one of ``transforms`` runs a kernel of ours (False: the reference transform serves a size
    without a Hadamard factorisation, and nothing of it compiles)."""
    try:
        for n, blocks, *_ in transforms:
            _block_size(n, blocks)
    except ValueError:
        return False
    return True


def first_tokens(transforms: Iterable[Transform], tokens: Iterable[int],
                 extra: Callable[[int], tuple] = lambda T: ()) -> list[int]:
    """The smallest of ``tokens`` for each distinct (``extra(T)``, Triton's class of T, :func:`f16_fp32_tokens` of T,
    every transform's :func:`launch_key` at T): one launch per compiled variant, what the warm-ups
    (``kernels.transform_rows``, the vLLM op warm-up) launch so that no transform compiles during inference. The
    fp16-dot switch point is there because fp32 partials of fewer tokens keep the hi + lo pair
    (:func:`f16_fp32_tokens`): 7 and 9 tokens share a row class and every launch key but not the ``F16`` constant."""
    order = sorted(transforms)
    first: dict[tuple, int] = {}
    for T in tokens:
        key = (*extra(T), row_class(T), f16_fp32_tokens(T),
               *(launch_key(n, b, T, g, t, d) for n, b, g, t, d in order))
        first.setdefault(key, T)
    return sorted(first.values())


def _tall_launch(rows: int, groups: int, rows_a: int, rp: int, cp: int,
                 tile: tuple[int | None, int | None] = (None, None)) -> tuple[tuple[int, int], dict]:
    """Grid and tile constants of ``_had2_tall_kernel`` for ``rows`` (token, block) rows per group;
    ``tile`` = (tokens per tile, rows of A per program), None: the defaults (TALL_BN // CP, TALL_BM)."""
    tt = tile[0] or max(1, TALL_BN // cp)
    bm = min(tile[1] or TALL_BM, rp)
    grid = (groups * triton.cdiv(rows, tt), triton.cdiv(rows_a, bm))
    return grid, dict(RP=rp, CP=cp, BM=bm, BK=min(32, rp), TT=tt, CB2=min(cp, 32), num_warps=TALL_WARPS)


def transform(
    x: torch.Tensor,
    blocks: int,
    *,
    transpose: bool,
    pre: torch.Tensor | None = None,
    post: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    dst: torch.Tensor | None = None,
    interpret: bool = False,
    col_split: bool | None = None,
    unroll_splits: bool | None = None,
    rblk: int | None = None,
    cblk: int | None = None,
    num_warps: int = 4,
    out: torch.Tensor | None = None,
    tall: bool | None = None,
    tall_tokens: int | None = None,
    tall_bm: int | None = None,
    gemm: bool | None = None,
    zb_first: bool | None = None,
    stacked: bool | None = None,
    stack_rows: int | None = None,
    f16_dots: bool | None = None,
    cols: tuple[int, ...] | None = None,
    stack_cols: int | None = None,
    stack_warps: int | None = None,
    stack_kc: int | None = None,
) -> torch.Tensor:
    """Block-diagonal Hadamard over the last dim of ``x`` (T, n) or split partials (S, T, n).

    Returns (T, n) in ``out_dtype`` (default x's dtype): ``post ⊙ (M z) + bias`` with
    ``M = M_nbᵀ`` if ``transpose`` else ``M_nb``, ``z = pre ⊙ Σ_s x[s]``, ``nb = n / blocks``.
    ``dst`` (int32 (n,), a permutation) stores column j of each row at position ``dst[j]`` instead.

    Groups: ``pre`` of shape (G, n) (and ``dst`` (G, n) or (n,)) transforms the same x once per row
    of ``pre`` in one launch and returns (G, T, n): the input transforms of a fused layer's shards.

    ``col_split`` / ``unroll_splits`` / ``rblk`` / ``cblk`` / ``num_warps``: launch variants for few
    tokens (see ``_had2_kernel``; row and column block sizes are powers of two >= 16; ``num_warps`` is the
    per-token kernel's, the tall one uses ``TALL_WARPS``), timed on the GPU
    by ``bench/hadamard.py``. ``None`` (default) picks by size: column split while the row programs
    alone would leave most SMs idle, unrolled partial loads up to a decoding batch. ``out``: a (T, n)
    (grouped: (groups, T, n)) view to write into (one shard's columns of a fused layer's output, so no
    concatenation follows; or, with ``dst``, a buffer in another layout, kernels/mma_layout.py); its rows
    and groups may be strided, its columns must not. ``tall``: the many-token kernel (several tokens per
    GEMM tile); ``None`` picks it from ``TALL_MIN_ROWS`` (output) or ``TALL_MIN_ROWS_INPUT`` (input)
    (token, block) rows on where A has at least ``TALL_MIN_RP`` rows, unless one of the
    small-batch variants above is given or ``QTIP_TRITON_NO_TALL_HADAMARD=1``. ``tall_tokens`` /
    ``tall_bm``: the tall kernel's tile, (token, block) rows per tile and rows of A per program (powers
    of two; default ``TALL_BN`` // CP, i.e. one token at CP = 128, and ``TALL_BM``), for
    ``bench/hadamard.py``. ``gemm``: the two-GEMM torch path for many tokens (kernels/hadamard_gemm.py);
    ``None``: from ``QTIP_TRITON_HADAMARD_GEMM`` rows on (off unless set) when no kernel variant is given.
    ``zb_first``: the per-token kernel with the column split, in the A · (Z · B_c) order (``_had2_kernel``'s
    ``ZB_FIRST``; blocks of at most 128 have no A and ignore it; ``None``: for column-split launches where A has at
    most ``ZB_MAX_RP`` padded rows, unless ``QTIP_TRITON_HADAMARD_ZB_FIRST=0``). ``stacked``: the many-token kernel
    with several tokens stacked along the rows of one tile (``_had2_stack_kernel``; A of at most ``STACK_MAX_RP``
    padded rows; blocks without A ignore it); ``None``: from :func:`stack_min_rows` (token, block) rows on (the
    measured thresholds by direction and destination order, or ``QTIP_TRITON_HADAMARD_STACKED=N``; 0: off) when
    no other variant is given.
    ``stack_rows``: that kernel's tile rows (a power of two in [16, 256], at least A's padded rows; default
    :func:`stack_tile_rows`), for ``bench/hadamard.py``; ``stack_cols`` / ``stack_warps``: its columns of Y per
    program where A has more than ``STACK_ROWS`` padded rows (a power of two in [16, 128]; default ``STACK_CB``) and
    its warps (4 or 8; default :func:`default_stack_warps`) and ``stack_kc``: the rows of each slice of both
    products there (16, 32 or 64; default ``STACK_KC``), for the same bench.
    ``f16_dots``: one fp16 dot per product instead of a bf16 hi + lo pair, float16 outputs only (``F16_ENV``;
    ``None``: on for float16 outputs unless ``QTIP_TRITON_HADAMARD_F16=0``, except fp32 partials of fewer than
    ``F16_ENV_FP32_MIN_TOKENS`` tokens (slower there on the H100); the two-GEMM path ignores it).
    ``cols``: a decode kernel's column order that keeps every P2-wide segment of a block in place
    (:func:`segment_cols`): position j of each segment holds the segment's natural column ``cols[j]``. The kernels
    take it as B's columns permuted, so h comes out in that order at the natural-order launch's cost, with
    contiguous stores (``dst`` scatters them; the alternative, natural order and a gather, is one more launch).
    Not with ``dst``, ``post`` or ``bias``.
    """
    if stacked and (tall or gemm or zb_first):
        raise ValueError("stacked is a kernel of its own: not with tall, gemm or zb_first")
    if cols is not None and (dst is not None or post is not None or bias is not None or x.dim() == 4):
        raise ValueError("cols orders an input transform's columns: not with dst, post, bias or grouped outputs")
    if stack_rows is not None and (stack_rows < 16 or stack_rows > STACK_MAX_RP or stack_rows & (stack_rows - 1)):
        raise ValueError(f"stack_rows must be a power of two in [16, {STACK_MAX_RP}], got {stack_rows}")
    if stack_cols is not None and (stack_cols < 16 or stack_cols > P2_MAX or stack_cols & (stack_cols - 1)):
        raise ValueError(f"stack_cols must be a power of two in [16, {P2_MAX}], got {stack_cols}")
    if stack_warps not in (None, 4, 8):
        raise ValueError(f"stack_warps must be 4 or 8, got {stack_warps}")
    if stack_kc not in (None, 16, 32, 64):
        raise ValueError(f"stack_kc must be 16, 32 or 64, got {stack_kc}")
    if zb_first:
        if col_split is False or tall or gemm:
            raise ValueError("zb_first is a variant of the per-token kernel's column split: not with "
                             "col_split=False, tall or gemm")
        col_split = True  # a small-batch variant: so neither the tall kernel nor the two GEMMs are picked
    if tall_tokens is not None or tall_bm is not None:  # bench options: no per-call cost when unused
        for name, v, lo, hi in (("tall_tokens", tall_tokens, 1, 16), ("tall_bm", tall_bm, 16, 128)):
            if v is not None and (v < lo or v > hi or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {v}")
    out_groups = x.dim() == 4  # (groups, splits, T, n): one output transform per fused shard
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (T, n), (splits, T, n) or (groups, splits, T, n), got {tuple(x.shape)}")
    if out_groups:
        return _grouped_output(x, blocks, transpose=transpose, post=post, out_dtype=out_dtype, interpret=interpret,
                               col_split=col_split, unroll_splits=unroll_splits, out=out, pre=pre, dst=dst, bias=bias,
                               tall=tall, tile=(tall_tokens, tall_bm), gemm=gemm, zb_first=zb_first,
                               stacked=stacked, stack_rows=stack_rows, f16_dots=f16_dots,
                               stack_tile=(stack_cols, stack_warps, stack_kc))
    S, T, n = x.shape
    nb = _block_size(n, blocks)
    if x.stride(-1) != 1:
        x = x.contiguous()
    groups = pre.shape[0] if pre is not None and pre.dim() == 2 else 0
    if pre is not None and pre.dim() == 2 and groups == 0:
        raise ValueError(f"grouped pre must have at least one row, got {tuple(pre.shape)}")
    if dst is not None and (dst.dtype != torch.int32 or dst.shape not in ((n,), (max(groups, 1), n))):
        raise ValueError(f"dst must be an int32 ({n},) permutation (or one per group), got {dst.dtype} {tuple(dst.shape)}")
    if groups and (pre.shape != (groups, n) or not pre.is_contiguous()):
        raise ValueError(f"grouped pre must be a contiguous (groups, {n}) tensor, got {tuple(pre.shape)}")
    for name, v in (("pre", None if groups else pre), ("post", post), ("bias", bias)):
        if v is not None and (v.shape != (n,) or not v.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({n},) vector, got {tuple(v.shape)}")
    for name, v in (("rblk", rblk), ("cblk", cblk)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if out is not None:
        want = (groups, T, n) if groups else (T, n)
        if out.shape != want or out.stride(-1) != 1 or out.device != x.device:
            raise ValueError(f"out must be a {want} view with unit column stride on {x.device}, "
                             f"got {tuple(out.shape)} strides {out.stride()} on {out.device}")
        if out_dtype is not None and out.dtype != out_dtype:
            raise ValueError(f"out is {out.dtype} but out_dtype={out_dtype}")
        y = out
    elif groups:
        y = torch.empty(groups, T, n, dtype=out_dtype or x.dtype, device=x.device)
    else:
        y = torch.empty(T, n, dtype=out_dtype or x.dtype, device=x.device)
    f16 = _use_f16(f16_dots, y.dtype, x.dtype, T)
    if T == 0:
        return y
    if dst is not None and out is not None:  # dst may index a buffer in another layout: kernels only
        if gemm:
            raise ValueError("the two-GEMM transform writes dst into a (T, n) result, not into out=")
        gemm = False
    variant = (col_split, unroll_splits, rblk, cblk, tall, tall_tokens, tall_bm)
    if _use_gemm(gemm, T * blocks, (*variant, stacked or None)):
        if cols is not None:
            dst = _cols_dst(cols, nb, n, x.device)
        return hadamard_gemm.transform(x, nb, transpose=transpose, pre=pre, post=post, bias=bias, dst=dst, y=y)
    a, b = _matrices(nb, transpose, x.device, torch.float16 if f16 else torch.bfloat16)
    if a is None and groups:  # Sylvester-only blocks (nb <= 128): one launch per group
        for g in range(groups):
            d = None if dst is None else (dst[g] if dst.dim() == 2 else dst)
            transform(x, blocks, transpose=transpose, pre=pre[g], post=post, bias=bias, dst=d, interpret=interpret,
                      out=y[g], out_dtype=y.dtype, f16_dots=f16, cols=cols)
        return y
    if cols is not None:
        b = _cols_b(b, cols, nb)
    dummy = x  # never read: the HAS_* flags are off
    args = dict(HAS_PRE=pre is not None, HAS_POST=post is not None, HAS_BIAS=bias is not None,
                HAS_DST=dst is not None, INTERPRET=interpret)
    dst_arg = dst if dst is not None else dummy
    scale = 1.0 / math.sqrt(nb)
    cp = b.shape[0]
    ym = y.stride(-2)
    if a is None:
        nrows = T * blocks
        rblk = 16 if interpret else 32
        grid = (triton.cdiv(nrows, rblk),)
        _had1_kernel[grid](x, y, b, pre if pre is not None else dummy, post if post is not None else dummy,
                           bias if bias is not None else dummy, dst_arg, nb, nrows, blocks, S, x.stride(0), x.stride(1),
                           ym, scale, CP=cp, RBLK=rblk, CBLK=min(cp, 32), num_warps=4, **args, **launch_args(x.device, T),
                           **_f16_launch(f16, scale)[1])
        return y
    kh, p1, p2 = factor(nb)
    rp = a.shape[0]
    if _use_stacked(stacked, stack_rows_counted(T * blocks, groups, transpose), variant, rp, transpose, dst is not None):
        grid, consts = _stack_launch(T * blocks, max(groups, 1), rp, cp, stack_rows, stack_cols, stack_warps,
                                     stack_kc, transpose, dst is not None)
        sc, f16c = _f16_launch(f16, scale, p2)  # Z · B first
        _had2_stack_kernel[grid](x, y, _stacked_a(nb, transpose, consts["TT"], x.device, a.dtype), b,
                                 pre if pre is not None else dummy, post if post is not None else dummy,
                                 bias if bias is not None else dummy, dst_arg, nb, blocks, S, x.stride(0), x.stride(1),
                                 ym, sc, kh * p1, p2, T * blocks, n, y.stride(0) if groups else 0,
                                 n if dst is not None and dst.dim() == 2 else 0, 0, 0, **consts, **args,
                                 **launch_args(x.device, T), **f16c)
        return y
    if _use_tall(tall, T * blocks, (col_split, unroll_splits, rblk, cblk, stacked or None), transpose, rp):
        grid, consts = _tall_launch(T * blocks, max(groups, 1), kh * p1, rp, cp, (tall_tokens, tall_bm))
        sc, f16c = _f16_launch(f16, scale, kh * p1)  # A · Z first
        _had2_tall_kernel[grid](x, y, a, b, pre if pre is not None else dummy, post if post is not None else dummy,
                                bias if bias is not None else dummy, dst_arg, nb, blocks, S, x.stride(0), x.stride(1),
                                ym, sc, kh * p1, p2, T * blocks, n, y.stride(0) if groups else 0,
                                n if dst is not None and dst.dim() == 2 else 0, 0, 0, **consts, **args,
                                **launch_args(x.device, T), **f16c)
        return y
    rblk = min(rp, rblk or 32)
    kblk = min(rp, 32)
    cblk = min(cp, cblk or 32)
    grid, col_split, nsplit_c, stages = _had2_launch(max(groups, 1) * T * blocks, T, S, rp, cp, rblk, cblk,
                                                     col_split, unroll_splits, kh * p1)
    zb = _zb_first(zb_first, col_split, rp)
    sc, f16c = _f16_launch(f16, scale, p2 if zb else kh * p1)
    _had2_kernel[grid](x, y, a, b, pre if pre is not None else dummy, post if post is not None else dummy,
                       bias if bias is not None else dummy, dst_arg, nb, blocks, S, x.stride(0), x.stride(1),
                       ym, sc, kh * p1, p2, T, n, y.stride(0) if groups else 0,
                       n if dst is not None and dst.dim() == 2 else 0, 0, 0, RP=rp, CP=cp, RBLK=rblk,
                       KBLK=kblk, CBLK=cblk, num_warps=num_warps, COL_SPLIT=col_split, NSPLIT=nsplit_c, **stages,
                       **args, **launch_args(x.device, T), ZB_FIRST=zb, **f16c)
    return y


def segment_cols(pos: torch.Tensor, nb: int) -> tuple[int, ...] | None:
    """A decode kernel's input order ``pos`` ((n,): where each natural column goes) as ``transform``'s ``cols``: the
    one order of every P2-wide segment of the ``nb``-column blocks, where ``pos`` keeps each segment in place and
    orders all of them alike; else None (that order needs ``dst`` or a gather), as for blocks the kernels do not
    transform (:func:`supported`).

    Why: the wgmma kernel's order (every Llama size but 11008 with E = 2) and the gemm's are such orders, and
    into them the input transform costs what the natural order does: at 64 tokens on the H100 (session 29's
    layer timeline) o's 4096-column input took 10.3 µs into the kernel's order and q/k/v's 9.7 + 6.2 for its
    gather, against 4.6 µs for the natural order alone (``*-hadamard-session27-stacked-rows.md``)."""
    if not supported(nb)[0]:
        return None
    n = pos.numel()
    p2 = factor(nb)[2]
    if n % p2:
        return None
    pos = pos.to("cpu", torch.int64)
    i = torch.arange(n)
    if not bool((pos // p2 == i // p2).all()):
        return None
    seg = (pos % p2).view(-1, p2)
    if not bool((seg == seg[0]).all()):
        return None
    return tuple(torch.argsort(seg[0]).tolist())


def _check_cols(cols: tuple[int, ...], p2: int) -> None:
    if len(cols) != p2 or sorted(cols) != list(range(p2)):
        raise ValueError(f"cols must order the {p2} columns of a block's segment, got {len(cols)} entries")


def _cols_b(b: torch.Tensor, cols: tuple[int, ...], nb: int) -> torch.Tensor:
    """B (padded, as :func:`_matrices` holds it; the same in both directions) with its first P2 columns in ``cols``'
    order, cached."""
    key = ("cols", nb, str(b.device), b.dtype, cols)
    hit = _MATS.get(key)
    if hit is None:
        p2 = factor(nb)[2]
        _check_cols(cols, p2)
        bp = b.clone()
        bp[:, :p2] = b[:, list(cols)]
        hit = _MATS[key] = (bp.contiguous(), None)
    return hit[0]


def _cols_dst(cols: tuple[int, ...], nb: int, n: int, device: torch.device) -> torch.Tensor:
    """``cols`` as a ``dst`` index over all ``n`` columns (the two-GEMM path stores through one), cached."""
    key = ("cols_dst", nb, n, str(device), cols)
    hit = _MATS.get(key)
    if hit is None:
        p2 = factor(nb)[2]
        _check_cols(cols, p2)
        where = torch.argsort(torch.tensor(cols))  # natural column j of a segment -> its position
        pos = (torch.arange(n) // p2) * p2 + where[torch.arange(n) % p2]
        hit = _MATS[key] = (pos.to(device=device, dtype=torch.int32), None)
    return hit[0]


def _grouped_output(x: torch.Tensor, blocks: int, *, transpose: bool, post: torch.Tensor | None,
                    out_dtype: torch.dtype | None, interpret: bool, col_split: bool | None,
                    unroll_splits: bool | None, out: torch.Tensor | None, pre, dst, bias,
                    tall: bool | None = None, tile: tuple[int | None, int | None] = (None, None),
                    gemm: bool | None = None, zb_first: bool | None = None, stacked: bool | None = None,
                    stack_rows: int | None = None, f16_dots: bool | None = None,
                    stack_tile: tuple[int | None, int | None, int | None] = (None, None, None)) -> torch.Tensor:
    """x (G, S, T, n): group g's partials summed, transformed, scaled by post[g], into columns
    [g*n, (g+1)*n) of ``out`` (T, G*n) (default a new (T, G*n) tensor): the output transforms of
    a fused layer's equal-shaped shards (q/k/v of Llama-2, gate/up) in one launch."""
    G, S, T, n = x.shape
    if pre is not None or dst is not None or bias is not None:
        raise ValueError("grouped output transforms take post only (no pre, dst or bias)")
    nb = _block_size(n, blocks)
    if post is not None and (post.shape != (G, n) or not post.is_contiguous()):
        raise ValueError(f"grouped post must be a contiguous ({G}, {n}) tensor, got {tuple(post.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(T, G * n, dtype=out_dtype or x.dtype, device=x.device)
    elif out.shape != (T, G * n) or out.stride(1) != 1 or out.device != x.device or (
            out_dtype is not None and out.dtype != out_dtype):
        raise ValueError(f"out must be a ({T}, {G * n}) view with unit column stride on {x.device}"
                         f"{'' if out_dtype is None else f' in {out_dtype}'}, got {tuple(out.shape)} {out.dtype}")
    f16 = _use_f16(f16_dots, out.dtype, x.dtype, T)
    if T == 0:
        return out
    if _use_gemm(gemm, T * blocks, (col_split, unroll_splits, tall, *tile, stacked or None)):
        return hadamard_gemm.transform(x, nb, transpose=transpose, pre=None, post=post, bias=None, dst=None, y=out)
    a, b = _matrices(nb, transpose, x.device, torch.float16 if f16 else torch.bfloat16)
    if a is None:  # Sylvester-only blocks: one launch per group
        for g in range(G):
            transform(x[g], blocks, transpose=transpose, post=None if post is None else post[g], interpret=interpret,
                      out=out[:, g * n:(g + 1) * n], out_dtype=out.dtype, f16_dots=f16)
        return out
    kh, p1, p2 = factor(nb)
    rp, cp = a.shape[0], b.shape[0]
    scale = 1.0 / math.sqrt(nb)
    if _use_stacked(stacked, T * blocks, (col_split, unroll_splits, tall, *tile), rp, transpose, False):
        grid, consts = _stack_launch(T * blocks, G, rp, cp, stack_rows, *stack_tile, transpose)
        sc, f16c = _f16_launch(f16, scale, p2)
        _had2_stack_kernel[grid](x, out, _stacked_a(nb, transpose, consts["TT"], x.device, a.dtype), b, x,
                                 post if post is not None else x, x, x, nb, blocks, S, x.stride(1), x.stride(2),
                                 out.stride(0), sc, kh * p1, p2, T * blocks, n, n, 0, x.stride(0),
                                 n if post is not None else 0, **consts, HAS_PRE=False, HAS_POST=post is not None,
                                 HAS_BIAS=False, HAS_DST=False, INTERPRET=interpret, **launch_args(x.device, T),
                                 **f16c)
        return out
    if _use_tall(tall, T * blocks, (col_split, unroll_splits, stacked or None), transpose, rp):
        grid, consts = _tall_launch(T * blocks, G, kh * p1, rp, cp, tile)
        sc, f16c = _f16_launch(f16, scale, kh * p1)
        _had2_tall_kernel[grid](x, out, a, b, x, post if post is not None else x, x, x, nb, blocks, S, x.stride(1),
                                x.stride(2), out.stride(0), sc, kh * p1, p2, T * blocks, n, n, 0,
                                x.stride(0), n if post is not None else 0, **consts, HAS_PRE=False,
                                HAS_POST=post is not None, HAS_BIAS=False, HAS_DST=False, INTERPRET=interpret,
                                **launch_args(x.device, T), **f16c)
        return out
    rblk, kblk, cblk = min(rp, 32), min(rp, 32), min(cp, 32)
    grid, col_split, nsplit_c, stages = _had2_launch(G * T * blocks, T, S, rp, cp, rblk, cblk, col_split,
                                                     unroll_splits, kh * p1)
    zb = _zb_first(zb_first, col_split, rp)
    sc, f16c = _f16_launch(f16, scale, p2 if zb else kh * p1)
    _had2_kernel[grid](x, out, a, b, x, post if post is not None else x, x, x, nb, blocks, S, x.stride(1), x.stride(2),
                       out.stride(0), sc, kh * p1, p2, T, n, n, 0, x.stride(0),
                       n if post is not None else 0, RP=rp, CP=cp, RBLK=rblk, KBLK=kblk, CBLK=cblk, num_warps=4,
                       COL_SPLIT=col_split, NSPLIT=nsplit_c, HAS_PRE=False, HAS_POST=post is not None,
                       HAS_BIAS=False, HAS_DST=False, INTERPRET=interpret, **stages,
                       **launch_args(x.device, T), ZB_FIRST=zb, **f16c)
    return out
