"""QTIPLinear: a drop-in ``nn.Linear`` replacement for plain torch and Hugging Face models."""

from __future__ import annotations

import torch
from torch import nn

from qtip_triton.dispatch import linear
from qtip_triton.weight import QuantizedWeight


class QTIPLinear(nn.Module):
    """Holds a QuantizedWeight's tensors as buffers (so ``.to(device)`` and state_dict work)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = qw.spec
        self.in_features = qw.in_features
        self.out_features = qw.out_features
        self.layout = qw.layout
        self.rcp, self.tp_rank = qw.rcp, qw.tp_rank
        self.had_block = qw.had_block
        self.register_buffer("trellis", qw.trellis)
        self.register_buffer("SU", qw.SU)
        self.register_buffer("SV", qw.SV)
        self.register_buffer("table", qw.table)
        self.register_buffer("bias", bias)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.spec, self.out_features, self.in_features, self.trellis, self.SU, self.SV, self.table,
            layout=self.layout, rcp=self.rcp, tp_rank=self.tp_rank, had_block=self.had_block,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}"
