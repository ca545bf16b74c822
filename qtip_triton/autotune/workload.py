"""Random layers and inputs to time kernels on: the tuner needs realistic shapes, not real weights.

Kernel time does not depend on the weight values (every state is decoded the same way), so a layer
of uniformly random packed bits in the requested layout is as good as a checkpoint and costs one
``randint`` on the GPU, even for 57344 x 8192.
"""

from __future__ import annotations

import torch

from qtip_triton.bitstream import get_layout
from qtip_triton.spec import TrellisSpec
from qtip_triton.weight import QuantizedWeight


def random_layer(spec: TrellisSpec, out_features: int, in_features: int, *, layout: str = "qtip",
                 device: str | torch.device = "cuda", generator: torch.Generator | None = None) -> QuantizedWeight:
    """A valid QuantizedWeight of random bits, built directly on ``device``."""
    lay = get_layout(layout)
    lay.validate(spec, out_features, in_features)
    shape = lay.packed_shape(spec, out_features, in_features)
    info = torch.iinfo(lay.packed_dtype)
    trellis = torch.randint(info.min, info.max, shape, dtype=lay.packed_dtype, device=device, generator=generator)
    table = None
    if spec.code == "hyb":
        table = torch.randn(1 << spec.Q, spec.V, device=device, generator=generator).half()
    elif spec.code == "lut":
        table = torch.randn(1 << spec.L, spec.V, device=device, generator=generator)
    SU = torch.randn(in_features, device=device, generator=generator).sign().add_(0.5).sign()
    SV = torch.rand(out_features, device=device, generator=generator).add_(0.5)
    return QuantizedWeight(spec, out_features, in_features, trellis, SU, SV, table, layout=layout)


def random_input(qw: QuantizedWeight, M: int, dtype: torch.dtype = torch.float16,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """M rows of unit-variance activations on the layer's device (never zeros: timing must see real data)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"random_input takes the QuantizedWeight, got {type(qw).__name__}")
    return torch.randn(M, qw.in_features, device=qw.trellis.device, generator=generator).to(dtype)
