"""QuantizedWeight: one trellis-quantized linear layer, as stored, with its exact dense meaning.

W_eff = diag(SV) · M_m · Ŵ · M_nᵀ · diag(SU), y = x · W_effᵀ. Tensor-parallel checkpoints apply
one of the two transforms per shard: ``rcp = 1`` splits the input transform into ``tp_rank``
blocks (row-parallel layers), ``rcp = 2`` the output transform (column-parallel layers).
``had_block > 0`` (EXL3: 128) makes both transforms block-diagonal with blocks of that size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qtip_triton import hadamard
from qtip_triton.bitstream import decode_packed, get_layout
from qtip_triton.codes import get_code
from qtip_triton.spec import TrellisSpec

RCP_NONE, RCP_ROW, RCP_COL = 0, 1, 2
_FORMAT_VERSION = 1


def _blockwise(x: torch.Tensor, blocks: int, fn) -> torch.Tensor:
    """Apply a last-dim transform to each of ``blocks`` equal slices of the last dim."""
    if blocks == 1:
        return fn(x)
    parts = x.reshape(*x.shape[:-1], blocks, x.shape[-1] // blocks)
    return fn(parts).reshape(x.shape)


@dataclass
class QuantizedWeight:
    """A quantized (out_features x in_features) matrix and everything needed to use it."""

    spec: TrellisSpec
    out_features: int
    in_features: int
    trellis: torch.Tensor
    SU: torch.Tensor
    SV: torch.Tensor
    table: torch.Tensor | None = None
    layout: str = "qtip"
    rcp: int = RCP_NONE
    tp_rank: int = 1
    had_block: int = 0  # 0: full-width (or TP-block) transforms; else fixed block size on both sides

    def __post_init__(self) -> None:
        m, n = self.out_features, self.in_features
        lay = get_layout(self.layout)
        lay.check_packed(self.trellis, self.spec, m, n)
        get_code(self.spec.code).check_table(self.spec, self.table)
        for name, vec, size in (("SU", self.SU, n), ("SV", self.SV, m)):
            if not isinstance(vec, torch.Tensor) or tuple(vec.shape) != (size,):
                shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
                raise ValueError(f"{name} must have shape ({size},), got {shape}")
            if not vec.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {vec.dtype}")
            if not bool(torch.isfinite(vec).all()):
                raise ValueError(f"{name} holds NaN or Inf")
        if self.rcp not in (RCP_NONE, RCP_ROW, RCP_COL):
            raise ValueError(f"rcp must be 0 (none), 1 (row) or 2 (column), got {self.rcp}")
        if self.tp_rank < 1:
            raise ValueError(f"tp_rank must be >= 1, got {self.tp_rank}")
        if isinstance(self.had_block, bool) or not isinstance(self.had_block, int) or self.had_block < 0:
            raise ValueError(f"had_block must be an int >= 0 (0 = full width), got {self.had_block!r}")
        if self.had_block:
            hadamard.hadamard_factor(self.had_block)  # clear error for unsupported block sizes
            for side, size in (("in", n), ("out", m)):
                if size % self.had_block:
                    raise ValueError(f"{side}_features={size} is not a multiple of had_block={self.had_block}")
        if self.rcp == RCP_NONE and self.tp_rank != 1:
            # checkpoints written without TP carry tp_rank=8 with rcp=0 upstream; the transform is full width
            self.tp_rank = 1
        if self.had_block and self.rcp != RCP_NONE:
            size = n if self.rcp == RCP_ROW else m
            if size % (self.tp_rank * self.had_block):
                raise ValueError(
                    f"TP shards of {size // self.tp_rank} features do not hold whole had_block={self.had_block} blocks"
                )
        for side, size in (("in", self.in_size_per_block), ("out", self.out_size_per_block)):
            hadamard.hadamard_factor(size)  # raises a clear error on unsupported sizes
            if size * self.blocks(side) != (n if side == "in" else m):
                raise ValueError(f"{side}_features is not divisible into {self.tp_rank} TP blocks")
        devices = {t.device for t in (self.trellis, self.SU, self.SV) + ((self.table,) if self.table is not None else ())}
        if len(devices) != 1:
            raise ValueError(f"all tensors of a QuantizedWeight must be on one device, got {sorted(map(str, devices))}")

    # ----------------------------------------------------------------- geometry
    def blocks(self, side: str) -> int:
        """How many equal blocks the ``side`` ("in"/"out") transform is block-diagonal over."""
        if self.had_block:
            # fixed blocks (EXL3) refine any TP split whose shard size is a multiple of the block
            return (self.in_features if side == "in" else self.out_features) // self.had_block
        if side == "in":
            return self.tp_rank if self.rcp == RCP_ROW else 1
        return self.tp_rank if self.rcp == RCP_COL else 1

    @property
    def in_size_per_block(self) -> int:
        return self.in_features // self.blocks("in")

    @property
    def out_size_per_block(self) -> int:
        return self.out_features // self.blocks("out")

    @property
    def device(self) -> torch.device:
        return self.trellis.device

    # ----------------------------------------------------------------- math
    def decode(self) -> torch.Tensor:
        """Raw decoded Ŵ (out x in), float32: the code values before any transform or scale."""
        return decode_packed(self.trellis, self.spec, self.out_features, self.in_features, self.table, self.layout)

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        """x -> M_nᵀ (x ⊙ SU) over the last dim (per TP block for rcp=1)."""
        return _blockwise(x * self.SU.to(x.dtype), self.blocks("in"), hadamard.apply_mt)

    def output_transform(self, y: torch.Tensor) -> torch.Tensor:
        """y' -> (M_m y') ⊙ SV over the last dim (per TP block for rcp=2)."""
        return _blockwise(y, self.blocks("out"), hadamard.apply_m) * self.SV.to(y.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_eff = diag(SV)·M_m·Ŵ·M_nᵀ·diag(SU), the nn.Linear weight this layer stands for."""
        w = self.decode().to(dtype)
        # rows: r -> r·M_nᵀ·diag(SU) is the input transform applied to each row vector
        w = _blockwise(w, self.blocks("in"), hadamard.apply_m) * self.SU.to(dtype)
        # columns: M_m acting on each column, then SV
        w = _blockwise(w.t(), self.blocks("out"), hadamard.apply_m).t() * self.SV.to(dtype)[:, None]
        return w.contiguous()

    def reference_forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x·W_effᵀ (+ bias) computed transform-decode-transform, in x's dtype (use float64 for truth)."""
        dt = x.dtype
        h = self.input_transform(x)
        y = torch.matmul(h, self.decode().to(dt).t())
        y = self.output_transform(y)
        return y if bias is None else y + bias.to(dt)

    # ----------------------------------------------------------------- movement
    def to(self, device: torch.device | str) -> QuantizedWeight:
        return replace(
            self,
            trellis=self.trellis.to(device),
            SU=self.SU.to(device),
            SV=self.SV.to(device),
            table=None if self.table is None else self.table.to(device),
        )

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {"trellis": self.trellis, "SU": self.SU, "SV": self.SV}
        if self.table is not None:
            d["table"] = self.table
        return d

    def metadata(self) -> dict[str, str]:
        return {
            "format": "qtip_triton.QuantizedWeight",
            "version": str(_FORMAT_VERSION),
            "spec": self.spec.name,
            "out_features": str(self.out_features),
            "in_features": str(self.in_features),
            "layout": self.layout,
            "rcp": str(self.rcp),
            "tp_rank": str(self.tp_rank),
            "had_block": str(self.had_block),
        }

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=self.metadata())

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> QuantizedWeight:
        if meta.get("format") != "qtip_triton.QuantizedWeight":
            raise ValueError("not a qtip_triton QuantizedWeight file (metadata 'format' missing or foreign)")
        if meta.get("version") != str(_FORMAT_VERSION):
            raise ValueError(f"QuantizedWeight file version {meta.get('version')} is not {_FORMAT_VERSION}")
        missing = [k for k in ("trellis", "SU", "SV") if k not in tensors]
        if missing:
            raise ValueError(f"QuantizedWeight file is missing tensors: {', '.join(missing)}")
        try:
            return cls(
                spec=TrellisSpec.parse(meta["spec"]),
                out_features=int(meta["out_features"]),
                in_features=int(meta["in_features"]),
                trellis=tensors["trellis"],
                SU=tensors["SU"],
                SV=tensors["SV"],
                table=tensors.get("table"),
                layout=meta["layout"],
                rcp=int(meta["rcp"]),
                tp_rank=int(meta["tp_rank"]),
                had_block=int(meta.get("had_block", "0")),  # files written before had_block existed
            )
        except KeyError as e:
            raise ValueError(f"QuantizedWeight metadata lacks {e.args[0]!r}") from None

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> QuantizedWeight:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return cls.from_state(tensors, meta)
