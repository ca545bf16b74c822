"""``linear(x, qw, bias)``: the one entry point that computes y = x · W_effᵀ for a QuantizedWeight.

Path selection, in order:

1. ``kind="reference"``, or activations that are not fp16/bf16 (fp32/fp64 inputs are a request for
   exactness) -> the pure-torch reference (transform, decode, matmul, transform) in float32/64;
2. a device Triton cannot target (CPU without ``TRITON_INTERPRET=1``, MPS, ...) -> the reference, or a
   clear RuntimeError when a kernel ``kind`` was asked for explicitly;
3. otherwise the Triton kernels (:mod:`qtip_triton.kernels`): ``kind``/``config`` as given, else what
   the registry picked for this layer and batch bucket (autotuned store, then heuristic), else the
   kernels' own heuristic (``default_kind``/``default_config``) if the registry is not importable.

The weight is repacked once (``prepare``, cached on its trellis tensor); call :func:`prepare` at load
time to keep that off the first forward.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from qtip_triton.weight import QuantizedWeight

REFERENCE = "reference"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
NO_REGISTRY_ENV = "QTIP_TRITON_NO_REGISTRY"  # "1": skip the registry, use the kernels' heuristic
NO_SHARED_INPUT_ENV = "QTIP_TRITON_NO_SHARED_INPUT"  # "1": fused shards transform their input one by one
NO_FUSED_DECODE_ENV = "QTIP_TRITON_NO_FUSED_DECODE"  # "1": fused shards decode in one launch each


def reference_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Decode-then-matmul in torch (float32 for 16-bit inputs): slow, exact, runs anywhere."""
    compute = torch.float32 if x.dtype in _KERNEL_DTYPES else x.dtype
    y = qw.reference_forward(x.to(compute), None if bias is None else bias.to(compute))
    return y.to(x.dtype)


def _into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The reference paths compute y whole; copy it into ``out`` when one was given."""
    if out is None:
        return y
    out.copy_(y.reshape(out.shape))
    return y


def prepare_fused(qws: list[QuantizedWeight]):
    """Load-time: the shards' words stacked for one decode launch (None where that does not apply)."""
    from qtip_triton import kernels

    if len(qws) < 2 or not kernels.kernels_available(qws[0].device)[0]:
        return None
    return kernels.fuse_shards([kernels.prepare(qw) for qw in qws])


def prepare(qw: QuantizedWeight):
    """Load-time repack for the kernels (no-op where they cannot run); returns the prepared weight or None."""
    from qtip_triton import kernels

    if not kernels.kernels_available(qw.device)[0]:
        return None
    return kernels.prepare(qw)


def _select(qw: QuantizedWeight, M: int) -> tuple[str, Mapping[str, Any]]:
    return _select_shape(qw.spec, qw.out_features, qw.in_features, M)


def _select_shape(spec, out_features: int, in_features: int, M: int) -> tuple[str, Mapping[str, Any]]:
    from qtip_triton import kernels

    if os.environ.get(NO_REGISTRY_ENV) != "1":
        try:
            from qtip_triton.registry import lookup_config
        except ImportError:
            lookup_config = None
        if lookup_config is not None:
            return lookup_config(spec, out_features, in_features, M)
    kind = kernels.default_kind(spec, out_features, in_features, M)
    return kind, kernels.default_config(kind, spec, out_features, in_features, M)


def linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    kind: str | None = None,
    config: Mapping[str, Any] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x · W_effᵀ (+ bias) over the last dim of x (any leading shape), in x's dtype.

    ``kind`` ("gemv", "gemm", "decompress", "wgmma" (Hopper) or "reference") and ``config`` force a path; by default
    it is chosen per batch size (see the module docstring). ``out``: a (rows of x, out_features) view
    with unit column stride, in x's dtype, to write y into (a fused layer writes each shard into its
    columns of one output instead of concatenating); the result is returned as well.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    if x.dim() < 1 or x.shape[-1] != qw.in_features:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, the layer expects {qw.in_features}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (qw.out_features,):
        raise ValueError(f"bias must have shape ({qw.out_features},), got {tuple(bias.shape)}")
    if out is not None:
        rows = x.numel() // qw.in_features
        if (not isinstance(out, torch.Tensor) or out.shape != (rows, qw.out_features) or out.dtype != x.dtype
                or out.device != x.device or out.stride(-1) != 1):
            got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a ({rows}, {qw.out_features}) {x.dtype} view with unit column stride "
                             f"on {x.device}, got {got}")
    if kind == REFERENCE:
        return _into(reference_linear(x, qw, bias), out)
    from qtip_triton import kernels

    if kind is not None and kind not in kernels.KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; kinds: {', '.join(kernels.KINDS + (REFERENCE,))}")
    if x.dtype not in _KERNEL_DTYPES:
        if kind is not None:
            raise ValueError(f"kernel {kind!r} takes float16 or bfloat16 activations, got {x.dtype}")
        return _into(reference_linear(x, qw, bias), out)
    ok, why = kernels.kernels_available(x.device)
    if not ok:
        if kind is not None:
            raise RuntimeError(f"kernel {kind!r} was requested but cannot run on {x.device}: {why}")
        return _into(reference_linear(x, qw, bias), out)
    M = max(1, x.numel() // qw.in_features)
    if kind is None:
        kind, chosen = _select(qw, M)
        if kind == REFERENCE:
            return _into(reference_linear(x, qw, bias), out)
        config = chosen if config is None else config
    elif config is None:
        config = kernels.default_config(kind, qw.spec, qw.out_features, qw.in_features, M)
    return kernels.launch(kind, x, qw, config, bias, out=out)


def linear_shards(x: torch.Tensor, qws: list[QuantizedWeight], pre: torch.Tensor | None, out: torch.Tensor,
                  post: torch.Tensor | None = None, fused=None) -> torch.Tensor:
    """A fused layer's shards (same x) into their columns of ``out`` ((rows of x, sum out), x's dtype).

    When every shard takes the same decode kind for this batch (the registry's choice per shard) and
    ``pre`` holds their SU stacked, the input transform runs once for all of them (and, with ``post``
    = their SV stacked and equal shapes, the output transform too: :func:`qtip_triton.kernels.launch_shards`);
    otherwise each shard runs :func:`linear` on its columns. ``fused`` (the shards' words stacked,
    :func:`qtip_triton.kernels.fuse_shards`): the whole layer is three launches, with the registry's
    config for the fused shape (:func:`qtip_triton.kernels.launch_fused`); ``QTIP_TRITON_NO_FUSED_DECODE=1``
    turns that off.
    """
    rows = x.numel() // qws[0].in_features
    if pre is not None and x.dtype in _KERNEL_DTYPES and len(qws) > 1 and os.environ.get(NO_SHARED_INPUT_ENV) != "1":
        from qtip_triton import kernels

        if kernels.kernels_available(x.device)[0] and pre.device == x.device:
            M = max(1, rows)
            pws = [kernels.prepare(q) for q in qws]
            if (fused is not None and os.environ.get(NO_FUSED_DECODE_ENV) != "1"
                    and kernels.fused_is_current(fused, pws)):
                kind, config = _select_shape(fused.spec, fused.out_features, fused.in_features, M)
                if kernels.fused_decode_ok(kind, fused, config, M):
                    return kernels.launch_fused(kind, x, fused, pws, config, pre, post, out)
            chosen = [_select(qw, M) for qw in qws]
            kind = chosen[0][0]
            if all(k == kind for k, _ in chosen) and kernels.can_share_input(kind, pws, [c for _, c in chosen]):
                return kernels.launch_shards(kind, x, pws, [c for _, c in chosen], pre, out, post)
    col = 0
    for qw in qws:
        linear(x, qw, out=out[:, col:col + qw.out_features])
        col += qw.out_features
    return out
