"""Triton kernels for trellis-quantized linear layers: the interface the registry/autotuner use.

Forward pass of one layer (y = x · W_effᵀ, W_eff = diag(SV)·M_m·Ŵ·M_nᵀ·diag(SU)), three launches:

1. input transform  ``h = M_nᵀ (x ⊙ SU)`` per Hadamard block (Triton, :mod:`.hadamard`), in x's dtype;
2. decode-matmul by *kind* (generated per spec by :mod:`qtip_triton.codegen`):
   ``gemv`` (M <= ~8, CUDA cores), ``gemm`` (M <= ~128, ``tl.dot``), ``wgmma`` (Hopper only, 64 < M <= 512:
   Gluon's warpgroup MMA fed from the decode's registers, :mod:`.wgmma`) -> fp32 split-K partials of h·Ŵᵀ,
   or ``decompress`` -> Ŵ in x's dtype, then ``torch.matmul``;
3. output transform ``y = (M_m Σ partials) ⊙ SV + bias`` (Triton; sums the split-K partials).

Contract (what :mod:`qtip_triton.autotune` and :mod:`qtip_triton.registry` call):

- ``KINDS`` = ``("gemv", "gemm", "decompress", "wgmma")`` in priority order; ``CONFIG_VERSION``.
- ``default_config(kind, spec, m, n, M) -> dict``: the documented heuristic (:mod:`.configs`).
- ``config_space(kind, spec, m, n, M) -> list[dict]``: candidates valid for every M' <= M.
- ``can_implement(kind, spec, m, n, M) -> (ok, reason)``; ``default_kind(spec, m, n, M) -> str``.
- ``prepare(qw) -> PreparedWeight``: load-time repack (cached per trellis tensor; idempotent).
- ``launch(kind, x, qw_or_prepared, config, bias=None) -> y``: the whole forward with an explicit
  kind and config, x of shape (..., in_features) in fp16/bf16, y in x's dtype, same leading shape.
- lower level: :func:`.runners.decode_matmul`, :func:`.runners.decompress`, :func:`.hadamard.transform`.

Config keys are documented in :mod:`.configs`. ``m``/``n`` are the layer's out/in features, ``M`` the
number of rows of x (the autotuner passes its bucket). Kernels run on CUDA devices, and on the CPU
under ``TRITON_INTERPRET=1`` (tests); :func:`kernels_available` says why not elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from qtip_triton.kernels import hadamard, mma_layout, pdl, wgmma
from qtip_triton.kernels.configs import (
    CONFIG_VERSION,
    KINDS,
    REDUCED_PRECISION_KEYS,
    TUNE_RANGES,
    can_implement,
    config_space,
    default_config,
    default_kind,
    extra_candidates,
)
from qtip_triton.kernels.prepare import PreparedWeight, fuse_shards, fused_is_current, prepare
from qtip_triton.kernels.runners import (
    ACT_DTYPES,
    decode_matmul,
    decompress,
    interpreting,
    shard_blocks_ok,
    split_count,
)
from qtip_triton.weight import QuantizedWeight

__all__ = [
    "fused_is_current",
    "shard_blocks_ok",
    "fuse_shards",
    "launch_fused",
    "launch_shards",
    "h_dtype",
    "can_share_input",
    "wgmma_shares_input",
    "wgmma_gather_from",
    "fused_decode_ok",
    "wgmma_fused_decode_on",
    "wgmma_fused_ok",
    "CONFIG_VERSION",
    "KINDS",
    "REDUCED_PRECISION_KEYS",
    "TUNE_RANGES",
    "PreparedWeight",
    "can_implement",
    "config_space",
    "extra_candidates",
    "decode_matmul",
    "decompress",
    "default_config",
    "default_kind",
    "kernels_available",
    "launch",
    "prepare",
    "launch_variant",
    "kernel_input",
    "kernel_partials",
    "transform_rows",
]


def kernels_available(device: torch.device | str) -> tuple[bool, str | None]:
    """Whether Triton can run the kernels on ``device`` (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if device.type == "cuda":
        return (True, None) if torch.cuda.is_available() else (False, "CUDA is not available")
    if device.type == "cpu":
        if interpreting():
            return True, None
        return False, "Triton cannot compile for the CPU (set TRITON_INTERPRET=1 to run the kernels in its interpreter)"
    return False, f"Triton cannot target device type {device.type!r}"


def h_dtype(kind: str, configs: Iterable[Mapping[str, Any]], x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the input transform writes h in for decode kernels run with ``configs``.

    gemv: float32 (its multiply-adds are fp32: one 16-bit rounding less, half the bf16 error), but float16
    when every config is the tensor-core (``mma``) or fp16x2 (``hfma``) variant: those take fp16 operands anyway, and the
    transform's round-to-nearest is the one the kernel would do, so results are bit-identical, while x,
    re-read by every row block of the layer, costs half the bytes (at M = 8 an fp32 x step is twice the
    bytes of the weight words it multiplies). wgmma: float16 (its MMA's operand type; the decoded weights are fp16).
    The other tensor-core kinds: x's dtype."""
    if kind == "wgmma":
        return torch.float16
    if kind != "gemv":
        return x_dtype
    cfgs = list(configs)
    return torch.float16 if cfgs and all(c.get("mma") or c.get("hfma") for c in cfgs) else torch.float32


def transform_rows(kind: str, in_features: int, out_features: int, blocks_in: int, blocks_out: int,
                   lo: int, hi: int) -> tuple[int, ...]:
    """Row counts in ``lo..hi`` that reach every compiled variant of the two transforms a ``kind`` launch on
    a (``out_features`` x ``in_features``) layer makes: the smallest M of each distinct pair of
    :func:`hadamard.launch_key` (input transform into the kernel's order, natural order for decompress;
    output transform), with M's row class.

    Why: the transforms switch kernels at token counts of their own (stacked from 128-1024 rows by
    direction, the column split, the tall kernel), not at the decode kernel's buckets, so warming one M per
    row class left some to compile on first use: a precompiled cache still compiled 73 files of them in a
    fresh process's first forwards (H100, 2026-12-05, ``bench/cold_start.py``). ``()`` when the reference
    transform serves the layer (nothing of it compiles).
    """
    if not 1 <= lo <= hi:
        raise ValueError(f"expected 1 <= lo <= hi, got {lo}..{hi}")
    # cached per switch state (:func:`_switches`): a layer geometry costs ~6 µs per row count otherwise
    return _transform_rows(kind, in_features, out_features, blocks_in, blocks_out, lo, hi, _switches())


def _switches() -> tuple:
    """The QTIP_TRITON_* environment: the transforms' launch choices read them at every call (a benchmark flips them
    between engines in one process), so caches of those choices key on it. Inside :func:`pinned_switches`, the
    snapshot taken when the block began."""
    return _PINNED_SWITCHES if _PINNED_SWITCHES is not None else _read_switches()


def _read_switches() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("QTIP_TRITON_")))


_PINNED_SWITCHES: tuple | None = None


@contextlib.contextmanager
def pinned_switches():
    """Read the QTIP_TRITON_* environment once for a block of launch-choice queries (nested blocks keep the outer
    snapshot), where each query would otherwise walk the whole environment.

    Why: the vLLM warm-up asks the launch choices of 8192 token counts per distinct layer
    (:func:`qtip_triton.vllm.warmup.op_warm_rows`), and a third of that walk's ~2 s was this read (profile on the
    2-core CI machine, 2026-12-07), once per token count. The environment does not change during the walk."""
    global _PINNED_SWITCHES
    outer = _PINNED_SWITCHES
    if outer is None:
        _PINNED_SWITCHES = _read_switches()
    try:
        yield
    finally:
        _PINNED_SWITCHES = outer


@functools.lru_cache(maxsize=4096)
def _transform_rows(kind: str, in_features: int, out_features: int, blocks_in: int, blocks_out: int, lo: int, hi: int,
                    switches: tuple) -> tuple[int, ...]:
    transforms = _transforms(kind, in_features, out_features, blocks_in, blocks_out)
    if not transforms:
        return ()
    return tuple(hadamard.first_tokens(transforms, range(lo, hi + 1)))


def launch_variant(kind: str, in_features: int, out_features: int, blocks_in: int, blocks_out: int,
                   rows: int) -> tuple:
    """What selects the compiled variants a ``kind`` launch of ``rows`` tokens reaches, beyond its config and
    the decode kernel's row class: the PDL mode (:func:`pdl.launch_side`) and each transform's
    :func:`hadamard.launch_key`. Two launches of one config with equal row classes and equal variants
    compile nothing new for each other, so warm-ups may deduplicate by it; with the row class alone they
    folded a launch at 129 tokens (the stacked kernel's 'other' class) into one at 33 (per-token kernel)
    and a 5-token launch (PDL exit) into a 3-token one (early), and both compiled in a fresh process's
    first forwards (H100, 2026-12-05, bench/jit_audit.py)."""
    if rows < 1:
        raise ValueError(f"expected rows >= 1, got {rows}")
    transforms = _transforms(kind, in_features, out_features, blocks_in, blocks_out)
    keys = tuple(hadamard.launch_key(n, b, rows, g, t, d) for n, b, g, t, d in transforms)
    return (pdl.launch_side(rows), *keys)


def _transforms(kind: str, in_features: int, out_features: int, blocks_in: int, blocks_out: int) -> list[tuple]:
    """The (n, blocks, groups, transpose, dst) of a ``kind`` launch's two transforms (:func:`hadamard.launch_key`'s
    arguments); [] when the reference transform serves the layer (nothing of it compiles)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; kinds: {', '.join(KINDS)}")
    transforms = [(in_features, blocks_in, 1, True, kind != "decompress"), (out_features, blocks_out, 1, False, False)]
    if kind in ("wgmma", "gemm"):  # their input transforms run in natural order where the kernel's order is B's
        # columns permuted (hadamard.segment_cols), and the wgmma's also where gathering is faster (gather_after_transform)
        transforms.append((in_features, blocks_in, 1, True, False))
    return transforms if hadamard.has_kernels(transforms) else []


def h_order(kind: str, configs: Iterable[Mapping[str, Any]]) -> str:
    """The order the input transform writes h in for decode kernels run with ``configs``: "mma" (kernels/
    mma_layout.py) when every config is the gemv's tensor-core variant, else the kernel's column order."""
    cfgs = list(configs)
    return "mma" if kind == "gemv" and cfgs and all(c.get("mma") for c in cfgs) else "kernel"


def _transform_in(pw: PreparedWeight, x2: torch.Tensor, dtype: torch.dtype, kind: str | None = None,
                  order: str = "kernel") -> torch.Tensor:
    """h = M_nᵀ (x ⊙ SU), written in the ``kind`` kernel's column order (natural order if None), or in mma
    order (``order="mma"``: the (in // 4, M, 4) view of kernels/mma_layout.py)."""
    if order == "mma":
        return _transform_in_mma(x2, pw, pw.SU, dtype, ())
    return _ordered_transform(x2, pw, pw.SU, dtype, kind)


def _ordered_transform(x2: torch.Tensor, pw: PreparedWeight, pre: torch.Tensor, dtype: torch.dtype,
                       kind: str | None) -> torch.Tensor:
    """The input transform into the gemv/gemm ``kind`` kernel's column order (natural order if None or
    decompress): through B's columns where that order allows (:meth:`PreparedWeight.input_cols`), else by
    storing each column at its destination."""
    if kind in (None, "decompress"):
        return hadamard.transform(x2, pw.blocks_in, transpose=True, pre=pre, out_dtype=dtype, interpret=interpreting())
    cols = pw.input_cols(kind)
    return hadamard.transform(x2, pw.blocks_in, transpose=True, pre=pre, out_dtype=dtype, interpret=interpreting(),
                              **({"cols": cols} if cols is not None else {"dst": pw.input_index(kind)}))


def _transform_in_mma(x2: torch.Tensor, pw: PreparedWeight, pre: torch.Tensor, dtype: torch.dtype,
                      lead: tuple[int, ...]) -> torch.Tensor:
    """The input transform written straight into an mma-order buffer (``lead`` = () or (shards,), with
    ``pre`` of one row per shard then): its destination index puts each column in its quad, and its
    row stride of 4 interleaves the batch rows."""
    M, n = x2.shape
    hq, target = mma_layout.new_buffer(lead, M, n, dtype, x2.device)
    hadamard.transform(x2, pw.blocks_in, transpose=True, pre=pre, out_dtype=dtype,
                       dst=pw.input_index_mma(mma_layout.rows_padded(M)), interpret=interpreting(), out=target)
    return hq


def kernel_input(kind: str, pw: PreparedWeight, x2: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """h = M_nᵀ (x ⊙ SU) of rows ``x2`` (M, in) in the dtype and column order the ``kind`` kernel with ``config``
    reads (the mma gemv's own layout; the wgmma kernel's order for its E, in fp16)."""
    if kind == "wgmma":
        if interpreting() or not wgmma.available(x2.device):
            raise RuntimeError(f"kernel 'wgmma' cannot run on {x2.device}: it needs a Hopper GPU (sm_90) and Triton's "
                               "Gluon, outside Triton's interpreter (TRITON_INTERPRET=1 is "
                               f"{'set' if interpreting() else 'not set'})")
        return _wgmma_input(pw, x2, config.get("E", 1))
    return _transform_in(pw, x2, h_dtype(kind, [config], x2.dtype), kind, h_order(kind, [config]))


def gather_after_transform(n: int, blocks: int, tokens: int, groups: int = 1) -> bool:
    """Whether the wgmma kind's input transform of ``tokens`` rows (for ``groups`` shards at once: a fused layer's
    grouped input) runs in natural order and its h is then gathered into the kernel's order (one more launch),
    rather than storing each column at its destination. Only asked where that order does not fold into B's columns
    (:func:`wgmma.input_cols`: 11008 inputs with E = 2 among Llama sizes); elsewhere neither happens.

    Why: the transform's scattered stores keep it off the stacked many-token kernel, which takes natural order from
    96 (token, block) rows (``hadamard.stack_min_rows``): at 256 tokens an 8192-column input transform took 49.5-56.5
    µs into a kernel's order against 14.1 in natural order (H200, ``h200-2026-12-05-hadamard-stacked.md``), and the
    gather moves 2 x 4 MB. So: exactly where the natural-order launch is the stacked kernel and the other is not.
    On the H100 (session 24, ``*-session24-ktable{,-gather}.md``) this took 8192^2's whole forward at 256 tokens from
    128.6 to 94.6 µs and 28672x8192's from 345.5 to 309.2.

    Shards count together: the natural-order launch is asked about all ``groups`` shards' rows. The grouped ordered
    transform pays its scattered stores once per shard, and at 64 tokens (H100, session 28,
    ``*-fused-layers-session28-pending27-gather-{rule,64}.md``) gathering took q/k/v (3 x 4096 columns) from 71.0
    to 63.8 µs and gate/up (2 x 4096) from 101.8 to 99.4, while o alone (4096) lost 31.4 -> 33.2 and down (11008)
    stayed 57.2 -> 57.0; at 32 tokens every op but q/k/v lost (o 27.9 -> 31.0, down 50.2 -> 53.3)."""
    if groups < 1:
        raise ValueError(f"expected groups >= 1, got {groups}")
    return _gather_after(n, blocks, tokens, groups, _switches())


WGMMA_GATHER_ENV = "QTIP_TRITON_WGMMA_GATHER_FROM"


def wgmma_gather_from() -> int | None:
    """``QTIP_TRITON_WGMMA_GATHER_FROM=N``: the wgmma kind gathers its h from N (token, block) rows on (a grouped
    input's shards' rows counted together; 0: never), wherever the ordered transform is not itself the stacked
    kernel; unset: :func:`gather_after_transform`'s rule.

    Why a switch: the rule's row count was found with it. Alone (H100, session 28,
    ``*-hadamard-session28-pending27-gather.md``) the gathered input beats the ordered one at 64 tokens from 8192 features
    (28672: 59.8 against 48.6 µs) and loses at 4096 (8.5 against 10.0), but inside one layer only the grouped
    shards gained (see :func:`gather_after_transform`)."""
    return hadamard.env_rows(WGMMA_GATHER_ENV, "0: never; unset: the measured rule")


@functools.lru_cache(maxsize=4096)
def _gather_after(n: int, blocks: int, tokens: int, groups: int, switches: tuple) -> bool:
    if not hadamard.has_kernels([(n, blocks, 1, True, False)]):
        return False  # the reference transform serves this size
    ordered = hadamard.launch_key(n, blocks, tokens, transpose=True, dst=True)
    if ordered[0] == "stacked":
        return False
    rows = wgmma_gather_from()
    if rows is not None:
        return rows > 0 and groups * tokens * blocks >= rows
    return hadamard.launch_key(n, blocks, groups * tokens, transpose=True, dst=False)[0] == "stacked"


def _wgmma_input(pw: PreparedWeight, x2: torch.Tensor, E: int, pre: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 h in the wgmma kernel's order for its ``E``: through B's columns where that order keeps the Hadamard
    segments in place (:func:`wgmma.input_cols`), else stored there by the transform, or transformed in natural
    order and gathered (:func:`gather_after_transform`). ``pre``: the shards' stacked SU (grouped input, h of shape
    (shards, rows, in)); default ``pw.SU``."""
    grouped = pre is not None and pre.dim() == 2
    groups = pre.shape[0] if grouped else 1
    # written into storage reaching whole tiles past h's last row (wgmma.tile_slack): no TMA box runs off its end
    buf = wgmma.h_buffer((groups,) if grouped else (), x2.shape[0], pw.in_features, x2.device)
    cols = wgmma.input_cols(pw, E)
    if cols is not None:  # the kernel's order is B's columns permuted: natural-order cost, no scatter, no gather
        return hadamard.transform(x2, pw.blocks_in, transpose=True, pre=pw.SU if pre is None else pre,
                                  out_dtype=torch.float16, cols=cols, interpret=interpreting(), out=buf)
    gather = gather_after_transform(pw.in_features, pw.blocks_in, x2.shape[0], groups)
    h = hadamard.transform(x2, pw.blocks_in, transpose=True, pre=pw.SU if pre is None else pre,
                           out_dtype=torch.float16, dst=None if gather else wgmma.input_index(pw, E),
                           interpret=interpreting(), out=None if gather else buf)
    return torch.index_select(h, -1, wgmma.input_gather(pw, E), out=buf) if gather else h


def kernel_partials(kind: str, pw: PreparedWeight, h: torch.Tensor, config: Mapping[str, Any], *,
                    order: str | None = None, ws: torch.Tensor | None = None) -> torch.Tensor:
    """The decode-matmul alone on ``h`` from :func:`kernel_input`: fp32 partials (splits, M, out) of Ŵ hᵀ for the
    output transform (decompress: Ŵ decoded, then ``torch.matmul``, one partial in h's dtype; wgmma with ``OUT16``:
    one fp16 partial). ``order``: h's order when a grouped input transform chose it for several shards' configs
    (default: this config's, :func:`h_order`); ``ws``: where to write the partials (a shard's slice of one stacked
    tensor, :func:`launch_shards`; gemv/gemm may return it with the split already summed)."""
    if kind == "wgmma":
        return wgmma.decode_matmul(pw, h, config, out=ws)
    if kind == "decompress":
        if ws is not None:
            raise ValueError("decompress writes one partial through torch.matmul: no ws")
        return torch.matmul(h, decompress(pw, config, dtype=h.dtype).t()).unsqueeze(0)
    return decode_matmul(kind, pw, h, config, h_order=order or h_order(kind, [config]), ws=ws)


def _transform_out(pw: PreparedWeight, parts: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    if bias is not None:
        if bias.shape != (pw.out_features,):
            raise ValueError(f"bias must have shape ({pw.out_features},), got {tuple(bias.shape)}")
        bias = bias.to(device=parts.device).contiguous()
    return hadamard.transform(parts, pw.blocks_out, transpose=False, post=pw.SV, bias=bias, out_dtype=dtype,
                              interpret=interpreting(), out=out)


def launch(
    kind: str,
    x: torch.Tensor,
    qw: QuantizedWeight | PreparedWeight,
    config: Mapping[str, Any],
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x · W_effᵀ (+ bias) with kernel ``kind`` and an explicit ``config``; y in x's dtype.

    ``out``: a (rows of x, out_features) view in x's dtype that the output transform writes into (a
    fused layer's shard columns), returned reshaped to x's leading shape.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; kinds: {', '.join(KINDS)}")
    pw = prepare(qw)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != pw.in_features:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (..., {pw.in_features}), got {shape}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"the Triton kernels take float16 or bfloat16 activations, got {x.dtype}")
    if x.device != pw.device:
        raise ValueError(f"x is on {x.device} but the weight is on {pw.device}")
    ok, why = kernels_available(x.device)
    if not ok:
        raise RuntimeError(f"kernel {kind!r} cannot run on {x.device}: {why}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.in_features)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, pw.out_features)
    # gemv multiplies in fp32 anyway: keeping h in fp32 costs a few KB of reads and removes one
    # 16-bit rounding (it halves the bf16 error); tensor-core kinds need h in x's dtype
    if kind == "gemv" and config.get("fuse_in"):  # the gemv computes its own slices of h
        h = torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
        parts = decode_matmul(kind, pw, h, config, h_order="kernel", fuse_x=x2.contiguous())
        return _transform_out(pw, parts, bias, x.dtype, out).reshape(*lead, pw.out_features)
    h = kernel_input(kind, pw, x2, config)
    parts = kernel_partials(kind, pw, h, config)
    y = _transform_out(pw, parts, bias, x.dtype, out)
    return y.reshape(*lead, pw.out_features)


WGMMA_SHARED_INPUT_ENV = "QTIP_TRITON_WGMMA_SHARED_INPUT"


def wgmma_shares_input() -> bool:
    """Whether wgmma shards of a fused layer take one grouped input transform and, when equal, one grouped output
    transform (:func:`launch_shards`) instead of running as separate linears; ``QTIP_TRITON_WGMMA_SHARED_INPUT=0``
    turns it off.

    Why on by default: one Llama-2-7B layer (K = 2, four ops in one graph, H100, session 27,
    ``bench/results/h100-80gb-hbm3-2026-12-06-fused-layers-session26-shared-input-{0,1}.md``) went 234.6 -> 209.3 µs
    at 32 tokens, 283.3 -> 266.9 at 64, 390.2 -> 325.8 at 128 and 475.8 -> 433.5 at 256: q/k/v no longer runs three
    input transforms of the same x."""
    return os.environ.get(WGMMA_SHARED_INPUT_ENV, "1") != "0"


WGMMA_FUSED_DECODE_ENV = "QTIP_TRITON_WGMMA_FUSED_DECODE"


# Up to this many rows a fused layer's wgmma shards decode in one launch by default. H100, session 29
# (``*-fused-layers-session29-{timeline,fused-decode-1}.md``, one Llama-2-7B layer, the same run): the layer at 32 tokens
# 210.0 -> 187.0 µs, 64 238.7 -> 233.4, 128 315.0 -> 300.5; at 256 q/k/v still gained (124.3 -> 117.0) but gate/up lost
# (173.1 -> 188.0: the 22016-row config's one grid against two 11008-row ones). Since sessions 36-38 retuned the
# 256-token bucket, one launch wins there too, in two runs (the same process each, PDL off): 343.8 -> 335.4 µs
# (session 37) and 332.9 -> 317.1 (session 38; gate/up 149.7 -> 139.7, q/k/v 89.5 -> 84.5), in
# ``*-fused-layers-session37-{shipped256,onelaunch-shipped}.md`` and ``*-fused-layers-session38-256-{shipped,onelaunch}.md``.
WGMMA_FUSED_DECODE_MAX_ROWS = 256


def wgmma_fused_decode_on(rows: int) -> bool:
    """``QTIP_TRITON_WGMMA_FUSED_DECODE``: 1 (one launch at every batch), 0 (a launch per shard), unset (one launch up
    to ``WGMMA_FUSED_DECODE_MAX_ROWS`` rows); anything else is a clear error."""
    raw = os.environ.get(WGMMA_FUSED_DECODE_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{WGMMA_FUSED_DECODE_ENV}={raw!r}: expected 1 (one launch for a fused layer's wgmma shards), "
                         f"0 (a launch per shard) or unset (one launch up to {WGMMA_FUSED_DECODE_MAX_ROWS} rows)")
    return raw == "1" or (raw == "" and rows <= WGMMA_FUSED_DECODE_MAX_ROWS)


def wgmma_fused_ok(fused: PreparedWeight, config: Mapping[str, Any], rows: int) -> bool:
    """Whether a fused layer's wgmma shards decode ``rows`` rows in ONE launch over the stacked words
    (:func:`launch_fused`, the kernel's ``SHARDS`` source) with ``config``: where :func:`wgmma_fused_decode_on` says
    so, on a Hopper GPU, for configs whose row blocks stay inside the shards (:func:`wgmma.fused_ok`).

    Why: the per-shard launches it replaces leave each shard's tail wave and launch gap; one grid over all the
    shards' rows took q/k/v at 32 tokens from 63.8 to 56.3 µs and gate/up from 81.1 to 67.4 (H100, session 29)."""
    return (wgmma_fused_decode_on(rows) and wgmma_shares_input() and not interpreting()
            and wgmma.available(fused.device) and wgmma.fused_ok(fused, config))


def fused_decode_ok(kind: str, fused: PreparedWeight, config: Mapping[str, Any], rows: int) -> bool:
    """Whether a fused layer's shards decode ``rows`` rows in ONE ``kind`` launch over their stacked words
    (:func:`launch_fused`) with ``config``: gemv/gemm where its row blocks never straddle two shards
    (:func:`shard_blocks_ok`), wgmma where :func:`wgmma_fused_ok` says so; no other kind."""
    if kind in ("gemv", "gemm"):
        return shard_blocks_ok(fused, fused.shard_out, config)
    return kind == "wgmma" and wgmma_fused_ok(fused, config, rows)


def can_share_input(kind: str, pws: list[PreparedWeight], configs: list[Mapping[str, Any]] | None = None) -> bool:
    """Whether shards can take one grouped input transform: one tile plan (so one column order), one Hadamard block
    size and a decode kind that reads h in its kernel's order: gemv/gemm, or wgmma (with the switch of
    :func:`wgmma_shares_input`) when every shard's config has the same E (the order depends on it) and fp32 partials."""
    p0 = pws[0]
    same = all(pw.plan == p0.plan and pw.blocks_in == p0.blocks_in and pw.in_features == p0.in_features for pw in pws)
    if kind == "wgmma":
        return (same and wgmma_shares_input() and configs is not None and len(configs) == len(pws)
                and len({c.get("E", 1) for c in configs}) == 1 and not any(c.get("OUT16") for c in configs))
    return kind in ("gemv", "gemm") and same


def _grouped_input(kind: str, x: torch.Tensor, pws: list[PreparedWeight], pre: torch.Tensor, total: int,
                   out: torch.Tensor, configs: list[Mapping[str, Any]]) -> torch.Tensor | None:
    """Check a fused layer's x, ``pre`` (the shards' SU stacked) and ``out`` ((rows of x, ``total``)), then
    run the one input-transform launch for all shards: h (shards, rows, in) in the ``kind`` kernel's
    column order (in mma order, (shards, in // 4, rows, 4), when :func:`h_order` says so), or None when x
    has no rows."""
    n = pws[0].in_features
    if pre.shape != (len(pws), n) or pre.dtype != torch.float32 or not pre.is_contiguous():
        raise ValueError(f"pre must be contiguous float32 ({len(pws)}, {n}), got {pre.dtype} {tuple(pre.shape)}")
    x2 = x.reshape(-1, n)
    if out.shape != (x2.shape[0], total) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be ({x2.shape[0]}, {total}) {x.dtype}, got {out.dtype} {tuple(out.shape)}")
    if x2.shape[0] == 0:
        return None
    if h_order(kind, configs) == "mma":
        return _transform_in_mma(x2, pws[0], pre, h_dtype(kind, configs, x.dtype), (len(pws),))
    if kind == "wgmma":  # every shard at once: (shards, rows, in) fp16 in the kernel's order
        return _wgmma_input(pws[0], x2, configs[0].get("E", 1), pre)
    return _ordered_transform(x2, pws[0], pre, h_dtype(kind, configs, x.dtype), kind)


def _one_output_launch(pws: list[PreparedWeight], post: torch.Tensor | None) -> bool:
    """Whether the shards' output transforms can be one grouped launch: ``post`` is their SV stacked
    (shards, out) float32 and the shards are equal in out_features and transform blocks."""
    m0 = pws[0].out_features
    return (post is not None and post.shape == (len(pws), m0) and post.dtype == torch.float32
            and post.is_contiguous() and all(pw.out_features == m0 and pw.blocks_out == pws[0].blocks_out for pw in pws))


def _equal_runs(pws: list[PreparedWeight]) -> list[tuple[int, int]]:
    """(first shard, count) of each run of consecutive shards equal in out_features and output transform blocks:
    Llama-3's q/k/v (4096, 1024, 1024) -> [(0, 1), (1, 2)]."""
    runs, first = [], 0
    for _, run in itertools.groupby(pws, key=lambda pw: (pw.out_features, pw.blocks_out)):
        count = len(list(run))
        runs.append((first, count))
        first += count
    return runs


def _outputs_by_runs(pws: list[PreparedWeight], sv: torch.Tensor, parts: torch.Tensor, dtype: torch.dtype,
                     out: torch.Tensor) -> torch.Tensor:
    """The output transforms of unequal shards from one decode's partials ``parts`` (S, T, sum out): one grouped
    launch per run of equal shards (``sv``: their SV concatenated, float32), one launch per lone shard.

    Why: at decoding batch sizes each transform is a launch of a few microseconds whatever its size, and
    Llama-3's k and v are equal (1024 each) though q is not: three launches become two."""
    col = 0
    for first, count in _equal_runs(pws):
        pw, width = pws[first], pws[first].out_features * count
        if count > 1:
            grouped = parts[:, :, col:col + width].unflatten(-1, (count, pw.out_features)).permute(2, 0, 1, 3)
            hadamard.transform(grouped, pw.blocks_out, transpose=False, post=sv[col:col + width].view(count, -1),
                               out_dtype=dtype, interpret=interpreting(), out=out[:, col:col + width])
        else:
            _transform_out(pw, parts[:, :, col:col + width], None, dtype, out[:, col:col + width])
        col += width
    return out


def _outputs_per_shard(pws: list[PreparedWeight], parts: list[torch.Tensor], dtype: torch.dtype,
                       out: torch.Tensor) -> torch.Tensor:
    """Each shard's output transform of its partials into its columns of ``out``."""
    col = 0
    for pw, p in zip(pws, parts, strict=True):
        _transform_out(pw, p, None, dtype, out[:, col:col + pw.out_features])
        col += pw.out_features
    return out


def launch_shards(
    kind: str,
    x: torch.Tensor,
    qws: list[QuantizedWeight | PreparedWeight],
    configs: list[Mapping[str, Any]],
    pre: torch.Tensor,
    out: torch.Tensor,
    post: torch.Tensor | None = None,
) -> torch.Tensor:
    """The shards of a fused layer (q/k/v, gate/up) on one x: ONE input-transform launch for all of them
    (``pre`` = their SU stacked, (shards, in_features) float32), then each shard's decode kernel and
    output transform writing its columns of ``out`` ((rows of x, sum of out_features), x's dtype).
    With ``post`` (their SV stacked, (shards, out_features) float32) and equal-shaped shards that split
    K alike (Llama-2's q/k/v, any gate/up), the output transforms are one launch as well.

    Why: at decoding batch sizes each transform is a few-microsecond launch whatever the layer's
    size, so a fused layer's count of launches, not its bytes, sets its time.
    """
    pws = [prepare(qw) for qw in qws]
    if not can_share_input(kind, pws, list(configs)):
        raise ValueError(f"shards of kind {kind!r} with these plans, Hadamard blocks or configs cannot share an input "
                         "transform" + (f" (wgmma needs {WGMMA_SHARED_INPUT_ENV} unset or 1, one E, no OUT16)"
                                        if kind == "wgmma" else ""))
    h = _grouped_input(kind, x, pws, pre, sum(pw.out_features for pw in pws), out, configs)
    if h is None:
        return out
    order = h_order(kind, configs)
    splits = [config.get("SPLIT_K", 1) if kind == "wgmma" else split_count(pw, config)
              for pw, config in zip(pws, configs, strict=True)]
    if _one_output_launch(pws, post) and len(set(splits)) == 1:
        parts = torch.empty(len(pws), splits[0], h.shape[-2], pws[0].out_features, dtype=torch.float32, device=x.device)
        sums = [kernel_partials(kind, pw, h[g], config, order=order, ws=parts[g])
                for g, (pw, config) in enumerate(zip(pws, configs, strict=True))]
        if len({p.shape[0] for p in sums}) > 1:  # split-K summed in some kernels only (counters made in capture)
            return _outputs_per_shard(pws, sums, x.dtype, out)
        hadamard.transform(parts[:, :sums[0].shape[0]], pws[0].blocks_out, transpose=False, post=post,
                           out_dtype=x.dtype, interpret=interpreting(), out=out)
        return out
    parts = [kernel_partials(kind, pw, h[g], config, order=order)
             for g, (pw, config) in enumerate(zip(pws, configs, strict=True))]
    return _outputs_per_shard(pws, parts, x.dtype, out)


def launch_fused(
    kind: str,
    x: torch.Tensor,
    fused: PreparedWeight,
    qws: list[QuantizedWeight | PreparedWeight],
    config: Mapping[str, Any],
    pre: torch.Tensor,
    post: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """A fused layer in few launches: the grouped input transform (each shard's SU), ONE decode kernel over
    the stacked words (:func:`fuse_shards`; each shard's rows read its own h) and the output transforms
    into ``out``: one grouped launch with ``post`` (the shards' SV stacked; equal shards), else one per run
    of equal shards reading their columns of the partials (Llama-3's q/k/v, 4096, 1024, 1024: q alone, then k
    and v grouped).

    Why: at decoding batch sizes a launch costs about what a small layer's work does; Llama-2's q/k/v
    otherwise take 1 + 3 + 1 launches and gate/up 1 + 2 + 1.

    The wgmma kind (behind :func:`wgmma_fused_ok`'s switch) takes h as (shards, rows, in) in its E's order and
    runs the kernel's ``SHARDS`` source once over the stacked words.
    """
    if kind not in ("gemv", "gemm", "wgmma"):
        raise ValueError(f"a fused decode runs kinds 'gemv', 'gemm' and 'wgmma', got {kind!r}")
    pws = [prepare(qw) for qw in qws]
    G = len(pws)
    if not fused_is_current(fused, pws):
        raise ValueError("the fused weight does not hold these shards' words (re-prepared since it was made)")
    if post is not None and post.shape != (G, fused.out_features // G):
        raise ValueError(f"post must be ({G}, {fused.out_features // G}), got {tuple(post.shape)}")
    h = _grouped_input(kind, x, pws, pre, fused.out_features, out, [config])
    if h is None:
        return out
    if kind == "wgmma":  # h (shards, T, in) in the kernel's order for the config's E: one SHARDS launch
        parts = wgmma.decode_matmul(fused, h, config)
    else:
        parts = decode_matmul(kind, fused, h, config, h_order=h_order(kind, [config]),
                              shard_out=fused.shard_out)  # (splits, T, out)
    if _one_output_launch(pws, post):
        S, T = parts.shape[:2]
        grouped = parts.view(S, T, G, fused.shard_out[0]).permute(2, 0, 1, 3)  # (shards, splits, T, m), no copy
        hadamard.transform(grouped, pws[0].blocks_out, transpose=False, post=post, out_dtype=x.dtype,
                           interpret=interpreting(), out=out)
        return out
    return _outputs_by_runs(pws, fused.SV, parts, x.dtype, out)  # fused.SV: the shards' float32 SV concatenated
