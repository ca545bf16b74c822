"""Launchers of the generated decode kernels with an explicit config (no heuristics here).

Each launcher checks its inputs with clear errors, sizes the grid and returns plain tensors:

* :func:`decompress` -> Ŵ (out x in) in the requested dtype;
* :func:`decode_matmul` (kinds ``gemv``/``gemm``) -> fp32 partials ``(splits, M, out)`` of Ŵ·hᵀ, to be
  summed by the output transform; with config ``split_sum`` the kernel sums them itself (the last
  program of each row block adds the others' partials, counted on per-weight int32 counters that it
  zeroes again; no memset launch) and returns one partial (:func:`split_sum_in_kernel`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qtip_triton.codegen.cache import load
from qtip_triton.codegen.emit import mma_row_groups
from qtip_triton.codegen.mma import MMA_COLS, layout_ok
from qtip_triton.kernels import mma_layout, pdl
from qtip_triton.kernels.prepare import PreparedWeight

ACT_DTYPES = (torch.float16, torch.bfloat16)
SPLIT_SUM_ENV = "QTIP_TRITON_SPLIT_SUM"
_SPLIT_SUM_MODES = ("kernel", "transform")
_COUNTERS_KEY = "split_counters"
_MIN_COUNTERS = 4096  # int32 counters made at a weight's first split launch (16 KB): most grids fit


def split_sum_in_kernel(config: Mapping[str, Any] | None = None) -> bool:
    """Whether split-K partials are summed by the decode kernel or left to the output transform.

    The config's ``split_sum`` (bool, default False: the transform sums) decides, so the autotuner picks
    it per layer and batch bucket: the in-kernel sum spares the transform re-reading every partial (a
    gain at large outputs, H200 session 9: 8192^2 M = 1 35.6 -> 33.1 µs at 4 splits), but every program
    then pays a GPU-scope release and an atomic, and one program per row block a serial sum (a loss with
    many short programs: 4096x11008 at M = 16 with 16 splits, kernel 36.6 -> 48.4 µs in session 10, after
    the acquire moved to the last program alone; 53.6 before). ``QTIP_TRITON_SPLIT_SUM=kernel|transform``
    overrides every config."""
    raw = os.environ.get(SPLIT_SUM_ENV, "").strip().lower()
    if raw and raw not in _SPLIT_SUM_MODES:
        raise ValueError(f"{SPLIT_SUM_ENV}={raw!r}: expected one of {', '.join(_SPLIT_SUM_MODES)} (or unset)")
    if raw:
        return raw == "kernel"
    flag = (config or {}).get("split_sum", False)
    if not isinstance(flag, bool):
        raise ValueError(f"config split_sum={flag!r} must be a bool (True: the kernel sums its split-K partials)")
    return flag


def split_counters(pw: PreparedWeight, programs: int) -> torch.Tensor | None:
    """The weight's zeroed int32 arrival counters, at least ``programs`` of them, or None when they would
    have to be made or grown during CUDA-graph capture (the caller then leaves the sum to the transform).

    Every launch leaves them zero again (the last program of each row block resets its counter), so one
    allocation serves every later launch and graph replay of this weight on its stream."""
    cnt = pw.cache.get(_COUNTERS_KEY)
    if cnt is not None and cnt.numel() >= programs:
        return cnt
    if pw.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    cnt = torch.zeros(max(programs, _MIN_COUNTERS), dtype=torch.int32, device=pw.device)
    pw.cache[_COUNTERS_KEY] = cnt
    return cnt


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or v > hi or v & (v - 1):
        raise ValueError(f"config {name}={v!r} must be a power of two in [{lo}, {hi}]")
    return v


def _blocks(config: Mapping[str, Any]) -> tuple[int, int]:
    bn = _pow2("BLOCK_N", config.get("BLOCK_N"), 16, 1024)
    bk = _pow2("BLOCK_K", config.get("BLOCK_K"), 16, 4096)
    return bn // 16, bk // 16


def _launch_opts(config: Mapping[str, Any]) -> dict[str, int]:
    opts = {"num_warps": _pow2("num_warps", config.get("num_warps", 4), 1, 32)}
    stages = config.get("num_stages")
    if stages is not None:
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 8:
            raise ValueError(f"config num_stages={stages!r} must be an int in [1, 8]")
        opts["num_stages"] = stages
    regs = config.get("maxnreg")
    if regs is not None:  # a register cap per thread (ptxas .maxnreg): more programs per SM, or spills
        if isinstance(regs, bool) or not isinstance(regs, int) or not 32 <= regs <= 255 or regs % 8:
            raise ValueError(f"config maxnreg={regs!r} must be a multiple of 8 in [32, 255]")
        opts["maxnreg"] = regs
    return opts


def decompress(pw: PreparedWeight, config: Mapping[str, Any], dtype: torch.dtype = torch.float16, *,
               rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ (out x in) decoded by the generated ``decompress`` kernel, bit-exact in ``dtype``.

    ``rows`` = (r0, r1), multiples of 16: only output rows r0..r1 - 1, so that Ŵ can be decoded a slab at a time
    into one reused buffer (``out``: (r1 - r0, in) with unit column stride, in ``dtype``; a new tensor if None),
    which bounds the temporary fp16 Ŵ of a large layer (470 MB at 28672x8192). Not faster: slabs small enough to
    stay in the L2 lost to the whole matrix on the H100 (bench/chunked_decompress.py, NOTES session 21).
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"decompress writes float16, bfloat16 or float32, got {dtype}")
    if pw.table.dim() != 1:
        raise ValueError("decompress takes one weight's code table; a fused weight with per-shard tables decodes "
                         "only through the gemv/gemm kinds (kernels.launch_fused)")
    TR, TC = _blocks(config)
    plan = pw.plan
    r0, r1 = (0, pw.out_features) if rows is None else rows
    if not (0 <= r0 < r1 <= pw.out_features and r0 % 16 == 0 and r1 % 16 == 0):
        raise ValueError(f"rows={rows!r}: need 0 <= r0 < r1 <= {pw.out_features}, both multiples of 16 (tile rows)")
    if out is None:
        out = torch.empty(r1 - r0, pw.in_features, dtype=dtype, device=pw.device)
    elif (out.shape != (r1 - r0, pw.in_features) or out.dtype != dtype or out.device != pw.device
          or out.stride(1) != 1):
        raise ValueError(f"out must be a ({r1 - r0}, {pw.in_features}) {dtype} matrix on {pw.device} with unit column "
                         f"stride, got {tuple(out.shape)} {out.dtype} on {out.device} strides {out.stride()}")
    mod = load(pw.spec, "decompress", config, layout=pw.layout)
    words = pw.words[:, r0 // 16 * plan.GRN:r1 // 16 * plan.GRN]  # tile rows r0 / 16 ..: a view, same strides
    _, Rtot, Ctot = words.shape
    RB, CB = TR * plan.GRN, TC * plan.GCN
    grid = (_cdiv(Rtot, RB), _cdiv(Ctot, CB))
    even = Rtot % RB == 0 and Ctot % CB == 0
    mod.kernel[grid](words, pw.table, out, Rtot, Ctot, words.stride(0), out.stride(0), TR=TR, TC=TC,
                     EVEN=even, INTERPRET=interpreting(), **_launch_opts(config), **pdl.launch_args(out.device))
    return out


def shard_blocks_ok(pw: PreparedWeight, shard_out: Sequence[int], config: Mapping[str, Any]) -> bool:
    """Whether ``config``'s row blocks never straddle two of the shards (``shard_out``: their out_features,
    at most 3) stacked in ``pw``."""
    TR, _ = _blocks(config)
    rb = TR * pw.plan.GRN
    bounds = _shard_bounds(pw, shard_out)
    return bounds is not None and all(b % rb == 0 for b in bounds if b <= pw.words.shape[1])


def _shard_bounds(pw: PreparedWeight, shard_out: Sequence[int]) -> tuple[int, int] | None:
    """Word-row boundaries (b1, b2) of up to 3 stacked shards (unused ones past the end), or None."""
    if not 1 <= len(shard_out) <= 3 or sum(shard_out) != pw.out_features or any(m % 16 for m in shard_out):
        return None
    rows = [m // 16 * pw.plan.GRN for m in shard_out]
    big = pw.words.shape[1] + 1
    b1 = rows[0] if len(rows) > 1 else big
    b2 = rows[0] + rows[1] if len(rows) > 2 else big
    return b1, b2


def k_split(nblk: int, split: int) -> tuple[int, int]:
    """(k steps per program, programs along k) for ``nblk`` k steps asked to split ``split`` ways: equal
    ranges, so fewer programs than asked when ``split`` does not divide ``nblk`` evenly."""
    iters = _cdiv(nblk, min(split, nblk))
    return iters, _cdiv(nblk, iters)


def split_count(pw: PreparedWeight, config: Mapping[str, Any]) -> int:
    """How many split-K partials :func:`decode_matmul` writes for this weight and config."""
    TR, TC = _blocks(config)
    return k_split(_cdiv(pw.words.shape[2], TC * pw.plan.GCN), config.get("SPLIT_K", 1))[1]


def _fused_input_args(pw: PreparedWeight, x: torch.Tensor, h: torch.Tensor, config: Mapping[str, Any],
                      span: int) -> tuple[list[Any], dict[str, int]]:
    """Extra arguments of a ``fuse_in`` gemv: the natural activations ``x`` (M, in), SU, the transform's
    factors and the kernel-order index, for programs spanning ``span`` natural inputs each."""
    from qtip_triton.kernels import hadamard

    if config.get("BLOCK_M", 1) > 4:
        raise ValueError("fuse_in computes the input transform once per batch row: use BLOCK_M <= 4")
    if pw.blocks_in != 1:
        raise ValueError(f"fuse_in needs one Hadamard block over the input, this weight has {pw.blocks_in}")
    if h.dim() != 2:
        raise ValueError("fuse_in runs one weight (no stacked shards)")
    if x.dtype not in ACT_DTYPES or x.shape != h.shape or x.device != h.device or x.stride(-1) != 1:
        raise ValueError(f"fuse_in needs x as a float16/bfloat16 {tuple(h.shape)} tensor with unit column "
                         f"stride on {h.device}, got {x.dtype} {tuple(x.shape)}")
    n = pw.in_features
    consts = fused_input_consts(n, span)
    a, b = hadamard._matrices(n, True, x.device)
    kh, p1, cols = hadamard.factor(n)
    args = [x, pw.SU, a, b, pw.input_index("gemv"), x.stride(0), kh * p1, cols, 1.0 / n ** 0.5]
    return args, consts


def fused_input_consts(n: int, span: int) -> dict[str, int]:
    """Compile-time sizes of a ``fuse_in`` gemv over ``n`` inputs whose programs span ``span`` natural
    inputs each: the padded transform factors (HRP, HCP), the rows of the Z view a program touches (HRB)
    and the k block of its A · Z (HKB); a clear error where the fused form does not apply."""
    from qtip_triton.kernels import hadamard

    kh, p1, cols = hadamard.factor(n)
    if kh * p1 == 1:
        raise ValueError(f"fuse_in needs in_features with a Hadamard factor above 128 rows x cols, got {n}")
    hrb = max(16, 1 << (-(-span // cols)).bit_length())  # rows of Z a program's range can touch
    if hrb > 64:
        raise ValueError(f"fuse_in: a program's {span} inputs span {hrb} rows of the {kh * p1}x{cols} transform "
                         "view (at most 64): use more SPLIT_K or a smaller BLOCK_K")
    hrp, hcp = hadamard.padded_sizes(n)  # as the transform's A and B are padded
    return {"HRP": hrp, "HCP": hcp, "HRB": hrb, "HKB": 16}


def decode_matmul(kind: str, pw: PreparedWeight, h: torch.Tensor, config: Mapping[str, Any],
                  h_order: str = "natural", ws: torch.Tensor | None = None,
                  shard_out: Sequence[int] | None = None, fuse_x: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 partials ``(splits, M, out)`` with ``sum(splits) = h · Ŵᵀ`` (h: (M, in), fp16/bf16), into
    ``ws`` when given (a slice of a fused layer's partials buffer, see :func:`split_count`). With split-K
    summed in the kernel (config ``split_sum``, :func:`split_sum_in_kernel`) the result is ``ws[:1]``, the
    sum; callers use the returned view, not ``ws``.

    ``h`` of shape (shards, M, in) with a fused weight (shards stacked by rows, see
    :func:`qtip_triton.kernels.prepare.fuse_shards`; ``shard_out`` their out_features, equal by default):
    rows of shard g multiply h[g], one launch.

    The kernels read h in their own column order (``pw.input_index(kind)``); the input Hadamard
    kernel writes it that way (``h_order="kernel"``); a natural-order h is permuted here first.
    The tensor-core gemv (config ``mma``) reads h in mma order (``h_order="mma"``: (in // 4, M, 4) or per
    shard, see kernels/mma_layout.py), as the layers' input transform writes it for such configs; given
    in another order it is rearranged here (a copy).

    ``fuse_x`` with a ``fuse_in`` gemv config: the natural activations; each program computes its own
    slice of the input transform into ``h``, which is then only scratch (its contents are ignored).
    """
    if kind not in ("gemv", "gemm"):
        raise ValueError(f"decode_matmul runs kinds 'gemv' and 'gemm', got {kind!r}")
    mma = kind == "gemv" and bool(config.get("mma", False))
    if h_order == "mma":
        if not mma:
            raise ValueError("h in mma order is read only by the gemv's tensor-core variant (config mma)")
        if h.dtype not in ACT_DTYPES + (torch.float32,):
            raise ValueError(f"the mma gemv takes float16, bfloat16 or float32 activations, got {h.dtype}")
        return _launch_mma(kind, pw, h, config, ws, shard_out)
    if h.dim() not in (2, 3) or h.shape[-1] != pw.in_features:
        raise ValueError(f"h must be (M, {pw.in_features}) or (shards, M, {pw.in_features}), got {tuple(h.shape)}")
    if h.dim() == 3 and h_order != "kernel":
        raise ValueError("per-shard h (3-D) must already be in the kernel's column order (h_order='kernel')")
    allowed = ACT_DTYPES + ((torch.float32,) if kind == "gemv" else ())
    if h.dtype not in allowed:
        raise ValueError(f"the {kind} kernel takes {', '.join(map(str, allowed))} activations, got {h.dtype}")
    fuse_in = kind == "gemv" and bool(config.get("fuse_in", False))
    if fuse_in != (fuse_x is not None):
        raise ValueError("a fuse_in gemv config takes the natural activations as fuse_x, and only it does")
    if h_order == "natural" and not fuse_in:
        perm = torch.empty_like(h)
        perm[:, pw.input_index(kind).long()] = h
        h = perm
    elif h_order != "kernel":
        raise ValueError(f"h_order must be 'natural', 'kernel' or 'mma', got {h_order!r}")
    if mma:  # a caller's h (tests, benches): rearranged, as the layers' input transform writes it
        return _launch_mma(kind, pw, mma_layout.from_kernel_order(h), config, ws, shard_out)
    if h.stride(-1) != 1:
        h = h.contiguous()
    return _launch_decode(kind, pw, h, config, h.shape[-2], h.stride(-2), h.stride(0) if h.dim() == 3 else 0,
                          h.dim() == 3, ws, shard_out, fuse_x)


def _launch_mma(kind: str, pw: PreparedWeight, h: torch.Tensor, config: Mapping[str, Any],
                ws: torch.Tensor | None, shard_out: Sequence[int] | None) -> torch.Tensor:
    """The decode launch on an mma-order h (checked here): its quad stride stands for the row stride."""
    M = mma_layout.check(h, pw.in_features)
    return _launch_decode(kind, pw, h, config, M, h.stride(-3), h.stride(0) if h.dim() == 4 else 0, h.dim() == 4,
                          ws, shard_out, None)


def _launch_decode(kind: str, pw: PreparedWeight, h: torch.Tensor, config: Mapping[str, Any], M: int,
                   stride_x: int, stride_xg: int, sharded: bool, ws: torch.Tensor | None,
                   shard_out: Sequence[int] | None, fuse_x: torch.Tensor | None) -> torch.Tensor:
    """The decode launch on a checked h: ``stride_x`` is its row stride (mma order: its quad stride),
    ``stride_xg`` its shard stride when ``sharded``."""
    TR, TC = _blocks(config)
    bm_lo, bm_hi = (1, 16) if kind == "gemv" else (16, 256)
    if kind == "gemv" and config.get("BLOCK_M") not in (1, 2, 4, 8, 16):
        raise ValueError(f"config BLOCK_M={config.get('BLOCK_M')!r} must be a power of two in [1, 16]")
    BM = _pow2("BLOCK_M", config.get("BLOCK_M"), bm_lo, bm_hi)
    split = config.get("SPLIT_K", 1)
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"config SPLIT_K={split!r} must be an int >= 1")
    plan = pw.plan
    mod = load(pw.spec, kind, config, layout=pw.layout)
    G, Rtot, Ctot = pw.words.shape
    RB = TR * plan.GRN
    shards = h.shape[0] if sharded else 1
    if pw.table.dim() == 2 and pw.table.shape[0] != shards:  # per-shard tables: the rows must know their shard
        raise ValueError(f"this fused weight has {pw.table.shape[0]} shards with their own code tables: decode it "
                         f"with per-shard h ({pw.table.shape[0]}, M, in), got {tuple(h.shape)}")
    if shards == 1:
        bounds = (Rtot + 1, Rtot + 1)  # no boundary: every row block reads h
    else:
        if shard_out is None:
            shard_out = [pw.out_features // shards] * shards
        bounds = _shard_bounds(pw, shard_out) if len(shard_out) == shards else None
        if bounds is None:
            raise ValueError(f"h has {shards} shards but their out_features are {list(shard_out)} "
                             f"(of {pw.out_features}; at most 3 shards, multiples of 16)")
        if any(b % RB for b in bounds if b <= Rtot):
            raise ValueError(f"shard boundaries {bounds} (word rows) do not split into row blocks of {RB}")
    CB = TC * plan.GCN
    mma = kind == "gemv" and bool(config.get("mma", False))
    if mma:
        _check_mma(config, CB, RB, Ctot)
    nblk = _cdiv(Ctot, CB)
    iters, splits = k_split(nblk, split)
    if ws is None:
        ws = torch.empty(splits, M, pw.out_features, dtype=torch.float32, device=h.device)
    elif ws.shape != (splits, M, pw.out_features) or ws.dtype != torch.float32 or ws.stride(2) != 1:
        raise ValueError(f"ws must be float32 ({splits}, {M}, {pw.out_features}) with unit last stride, "
                         f"got {ws.dtype} {tuple(ws.shape)}")
    grid = (_cdiv(Rtot, RB), splits, _cdiv(M, BM))
    # no masks when every program's row block and every k step is full
    extra = {"INTERPRET": interpreting(), "EVEN": Rtot % RB == 0 and Ctot % CB == 0 and nblk % iters == 0}
    fused: list[Any] = []
    if fuse_x is not None:
        fused, consts = _fused_input_args(pw, fuse_x, h, config, iters * CB * 16 // plan.GCN)
        extra.update(consts)
    in_kernel = split_sum_in_kernel(config)  # checked even without a split: a bad value is an error
    cnt = split_counters(pw, grid[0] * grid[2]) if splits > 1 and in_kernel else None
    if cnt is not None:
        extra.update(CNT=cnt, SPLIT_SUM=True)
    # a fused weight's shards may each have their own code table, stacked (shards, words): row blocks of shard g
    # read table g (kernels/prepare.fuse_shards); one table: 0 apart
    stride_tg = pw.table.stride(0) if pw.table.dim() == 2 else 0
    compiled = mod.kernel[grid](pw.words, pw.table, h, ws, M, Rtot, Ctot, iters, pw.words.stride(0), stride_x,
                                ws.stride(0), ws.stride(1), *bounds, stride_xg, stride_tg, *fused, TR=TR, TC=TC,
                                BLOCK_M=BM,
                                **extra, **_launch_opts(config), **pdl.launch_args(ws.device, M))
    if mma and not extra["INTERPRET"]:
        _require_mma_layout(compiled, config)
    return ws[:1] if cnt is not None else ws


_MMA_LAYOUT_CHECKED: dict[int, str] = {}  # id of a compiled kernel -> "" (ok) or why not


def _check_mma(config: Mapping[str, Any], cols: int, rows: int, ctot: int) -> None:
    """The shapes under which the mma gemv's lane arrangement holds (codegen/mma.py): 16 word columns per
    k step and 1, 2 or 4 8-row groups per warp (Triton then lays the tile out as the mma needs), and class blocks
    of whole quads of h (kernels/mma_layout.py: word columns a multiple of 4)."""
    warps = config.get("num_warps", 4)
    if ctot % 4:
        raise ValueError(f"config mma needs in_features divisible by 64 (whole quads of h per class block), "
                         f"got {ctot * 16}")
    if cols != MMA_COLS:
        raise ValueError(f"config mma needs {MMA_COLS} word columns per k step (BLOCK_K=256 in QTIP's layout), "
                         f"got {cols}")
    if rows != 8 * warps * mma_row_groups(config):  # the groups count raises its own error for a bad BLOCK_N
        raise ValueError(f"config mma needs 8-row word groups per warp, got {rows} word rows with num_warps={warps}")


def _require_mma_layout(compiled: Any, config: Mapping[str, Any]) -> None:
    """Refuse (once per compiled kernel) an mma gemv that Triton laid out other than the mma assumes: its
    results would be wrong, so this is an error, not a warning."""
    why = _MMA_LAYOUT_CHECKED.get(id(compiled))
    if why is None:
        ttgir = getattr(compiled, "asm", {}).get("ttgir", "")
        ok, why = layout_ok(ttgir) if ttgir else (True, "")  # no TTGIR kept: nothing to check against
        _MMA_LAYOUT_CHECKED[id(compiled)] = "" if ok else why
    if why:
        raise RuntimeError(f"config {dict(config)} cannot run as an mma gemv on this Triton: {why}")
