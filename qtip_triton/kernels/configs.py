"""Kernel configs: the untuned heuristic (``default_config``) and the space the autotuner searches.

Config keys (all kinds): ``BLOCK_N`` output rows per program, ``BLOCK_K`` input columns per k step
(both powers of two >= 16), ``num_warps``, optional ``num_stages`` (Triton's pipeline depth), optional
``maxnreg`` (a register cap per thread: more programs per SM, or spills), optional ``table``: how a small
code table (HYB's 512 words) is read --

* ``"gather"`` / ``"gatherR"``: staged in shared memory by ``tl.gather`` at every k step (R = 2, 4, 8
  interleaved copies);
* ``"shared"`` / ``"sharedR"``, gemv only: written once to kernel-owned shared memory and read with
  ``ld.shared``, R = 2-32 interleaved copies read by lane (``shared16``: at most 2-way bank conflicts);
* ``"global"``: read through L1 by pointer (codes with a large or no table always are).

``gemv``/``gemm`` add ``BLOCK_M`` (batch rows per program), ``SPLIT_K`` (k splits) and ``split_sum``
(bool: the split's fp32 partials summed by the last program of each row block, else by the output
Hadamard kernel). ``gemv`` only, each off by default and a source variant of its own (codegen/emit.py
checks the combinations): ``prefetch`` (0-2 k steps of words loaded ahead), ``fuse_in`` (the input
transform inside the gemv), ``mma`` (tensor cores straight from the decoded registers; BLOCK_M 8 or 16,
``BLOCK_N`` = 16 x num_warps x 1/2/4 row groups per warp, codegen/mma.py), ``hfma`` (fp16x2
multiply-adds: reduced precision, ``REDUCED_PRECISION_KEYS``, tuned only with ``--fp16-accumulation``) and
``early_words`` (the first k step's words loaded before the table fill and the PDL wait; plain, hfma or mma; in
the space only beside hfma: alone it gained in some tiles and lost in others, session 19; mma: session 20). ``gemv`` (mma too) and
``gemm``: ``l2_prefetch`` (0-8: the words of that many k steps ahead requested into L2; not in the space: it
lost or tied everywhere but a few mma cells, session 19). ``decompress`` takes the block keys and a gather or
global ``table``.

Heuristic, and why:

* kind: ``gemv`` for M <= 2 (decode is the cost; CUDA-core multiply-adds are cheaper than a padded
  tensor-core tile; at M=4 the gemm with a 16-row tile measured faster than the 4-row gemv, run 2);
  on a GPU with ``mma.sync`` (sm_80+) the gemv's tensor-core variant for 2 <= M <= 16 (``mma``,
  codegen/mma.py; session 7, H200, K=2, M=8: 22016x4096 44 us against the gemm's 69, 4096x4096 13.6
  against 17.3; at M=16 it tied the gemm until two row groups per warp shared x, session 12: then the
  autotuner chose it for 46 of 56 M=16 entries), ``gemm`` up to M = 64 (one decode feeds BLOCK_M rows
  through ``tl.dot``), then
  ``decompress`` + cuBLAS (the decode is amortized over many rows, cuBLAS is the better matmul);
* ``SPLIT_K``: gemv about eight programs per SM (measured: 4 -> 8 per SM took the 8192x8192
  2-bit gemv from 41 to 29 us; run 4, 32x512 tiles: 4 splits = 7.8 programs per SM best, 26.8 us),
  gemm about four; at least two k steps per split;
* block sizes: large enough that the per-program set-up (table load, offsets) is amortized, small
  enough for the fp32 accumulators to stay in registers (~64 fp32 per thread at most).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from qtip_triton.codes import get_code
from qtip_triton.kernels import wgmma_configs
from qtip_triton.spec import TrellisSpec

KINDS = ("gemv", "gemm", "decompress", "wgmma")
GEMV_MAX_M = 2
MMA_GEMV_MAX_M = 16
MMA_MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with fp16 operands and fp32 accumulators
GEMM_MAX_M = 64
WGMMA_MAX_M = 512  # sm_90: the wgmma kind up to here, decompress + cuBLAS past it (the decode amortized)
CONFIG_VERSION = "1"
# bucket ranges in which the tuner times a kind whatever the heuristic's reach (autotune/space.kinds_in_reach).
# wgmma from 16 tokens: at M = 16 it beat the shipped mma gemv at 28672x8192 (84.4 against 99.3 µs, decode-matmul
# alone; H100, bench/results/h100-80gb-hbm3-2026-12-06-session24-wgmma-small.md) and tied it at 8192^2 (32.5 / 32.0),
# though the heuristic keeps the gemv there.
# With the warp-specialized form in the space (QTIP_TRITON_WGMMA_WS=1, read once at import: set it for the tuning
# process), up to 2048 tokens, where decompress + cuBLAS now serves.
TUNE_RANGES = {"wgmma": (16, wgmma_configs.WS_MAX_M if wgmma_configs.ws_on() else WGMMA_MAX_M)}
# config keys that trade accuracy for speed: the tuner times configs with one of these on only when asked
# (``qtip-triton autotune --fp16-accumulation``); the registry serves them once stored, like any config.
# hfma: fp16x2 multiply-adds, 8 products per fp16 partial (relative error ~5e-4 of the output against ~2e-7).
REDUCED_PRECISION_KEYS = ("hfma",)
GEMV_WIDE_BLOCK_K = 2048  # BLOCK_K past 1024: one-row gemv only, 8 warps (session 19: 64x2048x8 tiles)


@functools.cache
def _sm_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132  # the H100 the defaults were chosen on


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def can_implement(kind: str, spec: TrellisSpec, m: int, n: int, M: int) -> tuple[bool, str | None]:
    """Whether ``kind`` can run this layer at all (independent of speed)."""
    if kind not in KINDS:
        return False, f"unknown kernel kind {kind!r}; kinds: {', '.join(KINDS)}"
    try:
        get_code(spec.code).triton_decoder()
    except ValueError as e:
        return False, str(e)
    if m % 16 or n % 16 or m <= 0 or n <= 0:
        return False, f"layer {m}x{n} is not made of 16x16 tiles"
    if M < 1:
        return False, f"M must be >= 1, got {M}"
    if kind == "wgmma":
        return wgmma_configs.can_implement(spec, m, n, M)
    return True, None


@functools.cache
def _mma_device() -> bool:
    """Whether compiled kernels here can use ``mma.sync`` m16n8k16 (sm_80 and newer). False under the
    interpreter, so the CPU tests keep the heuristic they were written against (they ask for mma by config)."""
    from qtip_triton.kernels.runners import interpreting  # runners imports the codegen, which imports this

    if interpreting() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.cuda.current_device()) >= MMA_MIN_CAPABILITY


def _mma_aligned(n: int) -> bool:
    """Whether the word rows of an ``n``-input layer are 16-byte aligned, so Triton loads the mma gemv's
    tile four words per lane (the layout it needs)."""
    return (n // 16) % 4 == 0


def _mma_default(spec: TrellisSpec, n: int, M: int) -> bool:
    """The heuristic uses the mma gemv at this M when this machine, the spec and the shape allow it."""
    return 2 <= M <= MMA_GEMV_MAX_M and _mma_aligned(n) and _mma_device() and mma_supported(spec)


def default_kind(spec: TrellisSpec, m: int, n: int, M: int) -> str:
    if M <= GEMV_MAX_M or _mma_default(spec, n, M):
        return "gemv"
    if M <= GEMM_MAX_M:
        return "gemm"
    if M <= WGMMA_MAX_M and wgmma_configs.heuristic_on() and wgmma_configs.can_implement(spec, m, n, M)[0]:
        return "wgmma"
    return "decompress"


def _split_for(m: int, n: int, block_n: int, block_k: int, waves: float = 7) -> int:
    """Smallest power-of-two split giving >= ``waves`` programs per SM, keeping >= 2 k steps per split.

    Run 3 (H100, 8192x8192, 2-bit, M=1): SPLIT_K 4 -> 8 (4 -> 8 programs per SM) took 41 -> 29 us.
    """
    row_blocks = -(-m // block_n)
    k_steps = -(-n // block_k)
    split = 1
    while row_blocks * split < waves * _sm_count() and k_steps // (split * 2) >= 2:
        split *= 2
    return split


def _gemv_table(spec: TrellisSpec, copies: int = 1) -> dict[str, str]:
    """The gemv's table option: a code with a lookup table keeps it in kernel-owned shared memory
    (run 4: no per-step table staging; 28.5 -> 26.8 us, 8192^2, 2-bit); computed codes have none.

    ``copies`` > 1: that many lane-interleaved copies ("shared16": lanes l and l + 16 share one, so a
    warp's 32 random lookups cost at most 2 shared-memory wavefronts instead of ~3.3). Session 9 (H200,
    bench/results/h200-2026-11-29-session9-probe-tables.md): 8192^2 at M = 1 24.4 -> 21.0 us, 28672x8192
    65.6 -> 54.7 us at 64x1024 tiles."""
    if get_code(spec.code).triton_decoder().table != "packed16":
        return {}
    return {"table": "shared" if copies == 1 else f"shared{copies}"}


def default_config(kind: str, spec: TrellisSpec, m: int, n: int, M: int,
                   mma: bool | None = None) -> dict[str, Any]:
    """The heuristic config for one layer shape and batch size (see the module docstring).

    ``mma=False`` asks for the CUDA-core gemv even where the heuristic would take its tensor-core
    variant (benchmarks and tests that vary the plain gemv's knobs start from it)."""
    ok, why = can_implement(kind, spec, m, n, M)
    if not ok:
        raise ValueError(why)
    if kind == "decompress":
        return {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4}  # best of run 2 (coalesced 16-byte stores)
    if kind == "wgmma":
        return wgmma_configs.default_config(spec, m, n, M)
    if kind == "gemv" and mma is not False and _mma_default(spec, n, M):
        # session 12 probe (H200, h200-2026-11-30-probe-groups.md): 4 warps of two 8-row groups each, which
        # share x's registers (8192^2 M = 8 27.6 -> 22.8 us against one group per warp). Split: about 7
        # programs per SM up to 8 rows, as the plain gemv; at 16 rows about 1.5 were best (8192^2 split 4
        # 31.6 us against split 8 36.4; 22016x4096 split 2; 4096^2 split 8)
        waves = 7 if M <= 8 else 1.5
        cfg = {"BLOCK_M": 8 if M <= 8 else 16, "BLOCK_N": 128, "BLOCK_K": 256,
               "SPLIT_K": _split_for(m, n, 128, 256, waves), "num_warps": 4, **_gemv_table(spec), "mma": True}
        if M <= 8 and cfg["SPLIT_K"] > 1 and m >= 8192:
            # session 13 retune (H200, every config timed with and without it): the in-kernel sum won 36 of
            # 39 split mma entries with >= 8192 outputs at M = 2-8 (the output transform otherwise re-reads
            # every partial: 28672x8192 M = 2 forward 90.0 -> 79.7 us), 8 of 16 below, 3 of 10 at M = 16
            cfg["split_sum"] = True
        return cfg
    if kind == "gemv":
        bm = min(_next_pow2(M), 16)
        # few words per thread per k step: BLOCK_M=1 at 128x128 with 8 warps compiles to 48 registers
        # (sm_90, ~11.6 instructions per decoded state), so many warps hide the load latency
        block_n, block_k, warps = {1: (64, 512, 4), 2: (128, 128, 8), 4: (64, 128, 4), 8: (64, 128, 8),
                                   16: (64, 64, 8)}[bm]
        if bm == 1 and n >= 8192:  # session 9 (H200): 1024-column steps amortize the 16-copy table's fill
            block_k = 1024
        split = _split_for(m, n, block_n, block_k)
        cfg = {"BLOCK_M": bm, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps,
               **_gemv_table(spec, 16 if bm == 1 else 1)}
        if bm == 1 and split > 1 and m >= 8192:  # session 9 (H200): the in-kernel split sum won at 8192^2 and
            cfg["split_sum"] = True  # 28672x8192 (35.6 -> 33.1, 73.7 -> 68.2 µs), lost at 4096 outputs
        return cfg
    if M > GEMM_MAX_M:
        # beyond the gemm's default range (the tuner's centre where it times the gemm against decompress):
        # 8-warp tiles of 32768 accumulators (<= 128 per thread; sm_90: 223-229 registers, no spills). From
        # 256 rows on, all 256 rows in one tile so each weight is decoded once: on the H200 (2026-11-29,
        # bench/results/h200-2026-11-29-session8-probe-gemm-bm256.md) 256x128x128 with split-K 2 took
        # 8192^2 at M = 256 to 102 us against 118.9 for the best 128x256 tile, a tie with decompress +
        # cuBLAS (100 us). At M = 128 a 256-row tile would be half empty, so 128x256x64 (it won 10 of 61
        # M = 128 entries of h200.yaml, e.g. 57344x8192: 667 against decompress's 786 us).
        if M >= 256:
            split = 2 if n // 128 >= 4 else 1
            return {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": split, "num_warps": 8}
        return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 8}
    bm = max(16, min(_next_pow2(M), 64))
    # run 2 (H100, 8192x8192, M=1..16): 128x64 tiles with 4 warps and ~4 waves of programs were best
    block_n, block_k = 128, 64
    # ~4 programs per SM: SPLIT_K=8 on 8192x8192 measured 48 us at M=16 (run 3)
    split = _split_for(m, n, block_n, block_k, waves=3) if M <= 64 else 1
    return {"BLOCK_M": bm, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4}


def extra_candidates(kind: str, spec: TrellisSpec, m: int, n: int, M: int) -> list[dict[str, Any]]:
    """Configs of the space the tuner's first round should time beside the default's neighbours: the wgmma kind's
    best one-wave one-warpgroup configs by occupancy (:func:`wgmma_configs.occupancy_candidates`), none for the
    others (their spaces are small enough, or their defaults near their best)."""
    if kind != "wgmma" or not can_implement(kind, spec, m, n, M)[0]:
        return []
    return wgmma_configs.occupancy_candidates(spec, m, n, M, sms=_sm_count())


def config_space(kind: str, spec: TrellisSpec, m: int, n: int, M: int) -> list[dict[str, Any]]:
    """Every config worth timing for this shape (``[]`` if the kind cannot run it).

    All listed configs are valid for any M <= the given M (a bucket's config serves smaller batches).
    """
    ok, _ = can_implement(kind, spec, m, n, M)
    if not ok:
        return []
    if kind == "wgmma":
        return wgmma_configs.config_space(spec, m, n, M)
    out: list[dict[str, Any]] = []
    if kind == "decompress":
        for bn in (32, 64, 128):
            for bk in (64, 128, 256):
                for nw in (4, 8):
                    out.append({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw})
        return out
    tabled = get_code(spec.code).triton_decoder().table == "packed16"
    bms = [b for b in (1, 2, 4, 8, 16) if b <= _next_pow2(M)] if kind == "gemv" else \
        [b for b in (16, 32, 64, 128, 256) if b <= max(16, _next_pow2(M))]
    fp16x2 = kind == "gemv" and hfma_supported(spec)
    for bm in bms:
        for bn in (32, 64, 128, 256):
            for bk in (64, 128, 256, 512, 1024, GEMV_WIDE_BLOCK_K):
                # register budget: fp32 accumulator elements per program
                acc = bn * bk * bm if kind == "gemv" else bn * bm
                if kind == "gemv" and (acc > 256 * 256 * 2 or (bk > 512 and bm > 1)):
                    continue
                if kind == "gemm" and (acc > 128 * 256 or bn * bk > 128 * 256 or bk > 512):
                    continue
                for split in (1, 2, 4, 8, 16):
                    # at least two k steps per split; one for 2048-column steps (4096-wide layers, split 2:
                    # session 19's fastest 4096^2 kernel)
                    if split > 1 and n // bk < (1 if bk > 1024 else 2) * split:
                        continue
                    for nw in (4, 8):
                        # gemv: at most 512 fp32 accumulators per thread (64x1024 tiles with 4 warps; past
                        # that, and for 2048-column steps, 8 warps)
                        if kind == "gemv" and (acc > nw * 32 * 512 or (bk > 1024 and nw < 8)):
                            continue
                        # gemm: at most 128 fp32 accumulators per thread (128x256 tiles need 8 warps)
                        if kind == "gemm" and acc > nw * 32 * 128:
                            continue
                        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": nw}
                        variants = [cfg]
                        if kind == "gemv" and tabled:
                            variants.append({**cfg, "table": "shared"})
                            if bm == 1:  # lane copies pay at one batch row (the tensor-core gemv takes 2-16)
                                variants.append({**cfg, "table": "shared16"})
                                if fp16x2:  # reduced precision (REDUCED_PRECISION_KEYS): tuned only when asked
                                    variants += [{**cfg, "table": "shared16", "hfma": True},
                                                 {**cfg, "table": "shared16", "hfma": True, "early_words": True}]
                        out += _with_split_sum(variants)
    if kind == "gemv" and M <= 16 and mma_supported(spec):
        out.extend(mma_space(spec, n, M))
    return out


def _gemv_generates(spec: TrellisSpec, config: dict[str, Any]) -> bool:
    """Whether the gemv source variant that ``config`` selects can be generated for ``spec`` in its default layout."""
    from qtip_triton.codegen.emit import default_layout, emit

    try:
        emit(spec, "gemv", config, layout=default_layout(spec))
    except ValueError:
        return False
    return True


@functools.cache
def hfma_supported(spec: TrellisSpec) -> bool:
    """Whether the fp16x2 gemv (config ``hfma``) can be generated for ``spec`` in its default layout (as for
    the mma gemv: a state decodes into one fp16x2 register of two adjacent input columns)."""
    return _gemv_generates(spec, {"hfma": True, "table": "shared16"})


@functools.cache
def mma_supported(spec: TrellisSpec) -> bool:
    """Whether the gemv's tensor-core variant (codegen/mma.py) can be generated for ``spec`` in its
    default layout (QTIP's layout with a code that decodes a state into one fp16x2 register)."""
    return _gemv_generates(spec, {"BLOCK_M": 8, "mma": True})


def mma_space(spec: TrellisSpec, n: int, M: int) -> list[dict[str, Any]]:
    """The mma gemv's configs: 8 or 16 batch rows, BLOCK_K 256 (16 word columns: four lanes x four
    elements), BLOCK_N = 16 x num_warps x 1 or 2 (8-row word groups per warp: past one they share x's
    registers, codegen/mma.py), the table in shared memory when the code has one. sm_90: 10.1 SASS per
    state, 58 registers at 64 x 256 (the CUDA-core gemv 13.5, the gemm 15.2); the heuristic's choice for 2 <= M <= 16 on sm_80+ (:func:`default_config`)."""
    if not _mma_aligned(n):
        return []
    bm = 8 if M <= 8 else 16
    tables = [_gemv_table(spec)]
    if tables[0]:  # session 9 (H200): 16 lane copies won at 4-8 warps on the large shapes (22016x4096,
        tables.append(_gemv_table(spec, 16))  # M = 16: 61.7 -> 53.9 us), lost at 2 warps and at 4096^2
    out = []
    for table in tables:
        for nw in (2, 4, 8):
            # 4 groups per warp (MMA_ROW_GROUPS) lost to 2 at every probed point (session 12); 16 batch rows
            # in 4 groups take 254 registers
            for groups in (1, 2):
                if 16 * nw * groups > 256:
                    continue
                for split in (1, 2, 4, 8, 16):
                    if split > 1 and n // 256 < 2 * split:
                        continue
                    out += _with_split_sum([{"BLOCK_M": bm, "BLOCK_N": 16 * nw * groups, "BLOCK_K": 256,
                                             "SPLIT_K": split, "num_warps": nw, **table, "mma": True}])
    return out


def _with_split_sum(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each config, and with split-K also its variant that sums the partials in the kernel (``split_sum``,
    see kernels.runners.split_sum_in_kernel): which one wins depends on the layer and batch."""
    return [v for c in configs for v in ([c, {**c, "split_sum": True}] if c["SPLIT_K"] > 1 else [c])]
