"""Programmatic dependent launch (PDL) for our kernels on Hopper and newer.

Why: at decoding batch sizes one QTIP linear is three short launches (input transform, decode, output
transform), twelve per Llama layer, and each waits for the previous one to finish and drain before
its programs are even scheduled. With PDL (compute capability 9.0+, CUDA graphs keep it) a kernel is
launched while the previous one is still running; its programs do the set-up that reads only the
layer's constants (offsets, the code table written into shared memory) and then wait on
``griddepcontrol.wait``, which returns once every earlier kernel of the stream has finished and its
writes are visible. Nothing that a previous kernel writes or reads may be touched before that wait
(activations, partials, outputs), so correctness does not depend on which kernel ran before ours.

Modes, chosen by ``QTIP_TRITON_PDL``: ``exit`` (or ``1``): each kernel waits, and the next one may be
scheduled as this one's programs exit; ``early``: each kernel also calls
``griddepcontrol.launch_dependents`` right after its wait, so the next kernel may be scheduled once all
of this kernel's programs are running; ``auto`` (the default): ``early`` for launches of up to four
tokens, ``exit`` for more; ``off`` (or ``0``). Measured on the H200 (2026-11-29,
bench/results/h200-2026-11-29-fused-layers-pdl-modes.md: one Llama-2-7B layer, K=2, the four ops in one
CUDA graph, µs): off 131.9 / 203.4 / 212.3 at M = 1 / 8 / 16, exit 128.5 / 201.3 / 209.6, early
128.7 / 240.2 / 264.4 (waiting programs of the next kernel take the SM slots the gemm's later programs
need). Session 10 (2026-11-29, the same bench): once the few-token transforms loaded their constants
before the wait, early won at M = 1, 2 and 4 (103.9 / 122.5 / 135.7 µs against exit's 117.6 / 130.8 /
139.7; fp16 123-126) and still lost at M = 8 / 16 (186.4 / 226.5 against 160.1 / 212.9), hence ``auto``. The threshold is the
upper edge of an autotune bucket (1, 2, 4, ...): the vLLM warm-up keys its launches by bucket, so every
batch size of a bucket must use the same mode, or one of the two compiled variants could first compile
during inference. In the interpreter, on pre-Hopper GPUs and with a Triton without the ``launch_pdl`` option the
kernels compile without the instructions.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

PDL_ENV = "QTIP_TRITON_PDL"
AUTO = 3  # mode() value of "auto": early for few tokens, exit for more (resolved per launch by enabled())
EARLY_MAX_TOKENS = 4  # auto: launches of at most this many tokens use early; an autotune bucket's edge
MODES = {"0": 0, "off": 0, "": 0, "1": 1, "exit": 1, "early": 2, "auto": AUTO}


@functools.lru_cache(maxsize=1)
def triton_supports_pdl() -> bool:
    """Whether this Triton's CUDA backend has the ``launch_pdl`` launch option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # no CUDA backend in this Triton build
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.lru_cache(maxsize=16)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def mode() -> int:
    """The requested mode (0 off, 1 exit, 2 early, AUTO), from the environment (default auto); unknown
    values are an error."""
    raw = os.environ.get(PDL_ENV, "auto").strip().lower()
    if raw not in MODES:
        raise ValueError(f"{PDL_ENV}={raw!r}: expected one of off, exit, early, auto (or 0/1)")
    return MODES[raw]


def launch_side(tokens: int) -> int:
    """The mode a launch of ``tokens`` rows takes where PDL is available (:func:`enabled` without the device
    checks): the constexpr that tells its compiled variants apart. Why: warm-ups that deduplicate launches of one
    config across buckets must keep a launch of up to ``EARLY_MAX_TOKENS`` tokens (early) apart from a larger
    one (exit); folding them left the exit variant to compile in a fresh process's first forward at 5 tokens
    (H100, 2026-12-05, bench/jit_audit.py)."""
    m = mode()
    return (2 if tokens <= EARLY_MAX_TOKENS else 1) if m == AUTO else m


def enabled(device: torch.device, tokens: int | None = None) -> int:
    """The mode (0, 1 or 2) a kernel launched on ``device`` for ``tokens`` rows of activations uses now
    (env read per call: tests and benchmarks flip it); ``auto`` resolves to early up to
    ``EARLY_MAX_TOKENS`` tokens and to exit otherwise, also when ``tokens`` is unknown (None)."""
    m = mode()
    if not m or device.type != "cuda":
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not triton_supports_pdl():
        return 0
    if not _device_supports(device.index if device.index is not None else torch.cuda.current_device()):
        return 0
    if m == AUTO:
        return 2 if tokens is not None and tokens <= EARLY_MAX_TOKENS else 1
    return m


def launch_args(device: torch.device, tokens: int | None = None) -> dict[str, Any]:
    """Extra launch keywords for a kernel that takes ``PDL: tl.constexpr`` (empty when PDL is off);
    ``tokens``: the launch's rows of activations, which the ``auto`` mode decides by."""
    m = enabled(device, tokens)
    return {"PDL": m, "launch_pdl": True} if m else {}


@triton.jit
def grid_dependency_sync(PDL: tl.constexpr):
    """Wait for the previous kernels of the stream (their writes visible); in mode 2 also let the next PDL
    kernel be scheduled now. A no-op unless ``PDL``; must precede every access to data another kernel
    touches."""
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        if PDL == 2:
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)


__all__ = ["AUTO", "EARLY_MAX_TOKENS", "MODES", "PDL_ENV", "enabled", "mode", "grid_dependency_sync", "launch_args",
           "launch_side", "triton_supports_pdl"]
