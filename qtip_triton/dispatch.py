"""``linear(x, qw, bias)``: the one entry point that computes y = x · W_effᵀ for a QuantizedWeight.

For now every call takes the reference path (transform, decode, matmul, transform); the kernel
generator replaces this with Triton kernels chosen by batch size.
"""

from __future__ import annotations

import torch

from qtip_triton.weight import QuantizedWeight


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {qw.in_features}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = qw.reference_forward(x.to(compute), None if bias is None else bias.to(compute))
    return y.to(x.dtype)
