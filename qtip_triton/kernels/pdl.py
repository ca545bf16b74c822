"""Programmatic dependent launch (PDL) for our kernels on Hopper and newer.

Why: at decoding batch sizes one QTIP linear is three short launches (input transform, decode, output
transform), twelve per Llama layer, and each waits for the previous one to finish and drain before
its programs are even scheduled. With PDL (compute capability 9.0+, CUDA graphs keep it) a kernel is
launched while the previous one is still running; its programs do the set-up that reads only the
layer's constants (offsets, the code table written into shared memory) and then wait on
``griddepcontrol.wait``, which returns once every earlier kernel of the stream has finished and its
writes are visible. Nothing that a previous kernel writes or reads may be touched before that wait
(activations, partials, outputs), so correctness does not depend on which kernel ran before ours.

Every kernel that is launched with PDL also calls ``griddepcontrol.launch_dependents`` right after its
wait: the next PDL kernel may then be scheduled as soon as all of this kernel's programs are running.

``QTIP_TRITON_NO_PDL=1`` turns it off (the kernels then compile without the two instructions); it is
off in the interpreter, on pre-Hopper GPUs and with a Triton without the ``launch_pdl`` option.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

NO_PDL_ENV = "QTIP_TRITON_NO_PDL"


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


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use PDL now (env read per call: tests and benchmarks flip it)."""
    if device.type != "cuda" or os.environ.get(NO_PDL_ENV, "0") not in ("", "0"):
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not triton_supports_pdl():
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict[str, Any]:
    """Extra launch keywords for a kernel that takes ``PDL: tl.constexpr`` (empty when PDL is off)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {}


@triton.jit
def grid_dependency_sync(PDL: tl.constexpr):
    """Wait for the previous kernels of the stream (their writes visible), then let the next PDL kernel
    be scheduled. A no-op unless ``PDL``; must precede every access to data another kernel touches."""
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


__all__ = ["NO_PDL_ENV", "enabled", "grid_dependency_sync", "launch_args", "triton_supports_pdl"]
