"""How QTIP checkpoint tensors land in vLLM parameters (shapes, sharding, checks).

Parameters (one layer, S logical matrices, this rank's sizes p_i rows and n_loc columns):

* ``trellis``: int16 ``(sum p_i / 32, n_loc / 32, 64 * Kmax)``. QTIP's kernel layout stores each
  32x32 block of weights as 128*K contiguous bytes, row-major over blocks; viewing a checkpoint's
  ``((m/16)(n/16), 16K)`` tensor as ``(m/32, n/32, 64K)`` makes both matrix dims sliceable, so
  vLLM's own v2 loaders (``PackedvLLMParameter``, packed factor 32 on the output dim) shard it for
  fused layers and any TP degree, and each slice is again a valid QTIP layout. Shards with a
  smaller K (``K_v_proj``) are zero-padded to Kmax in the last dim.
* ``SV``: float32 ``(sum p_i,)`` (per output row: concatenates like a channel scale).
* ``SU``: float32 ``(S, n_loc)``, ``tlut``: ``(S, 2^Q, V)`` fp16, ``qtip_rcp`` / ``qtip_tp_rank``:
  int64 ``(S,)``: one slot per logical matrix (:class:`ShardSlotParameter`), because q, k and v
  each keep their own input scale and table; a replicated parameter would keep only the last one.

Every parameter's loader is a :class:`CheckpointLoader`: it checks the checkpoint tensor (dtype,
shape, K) with an error that names it, reshapes it, then defers to the layer's own loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from vllm.model_executor.parameter import BasevLLMParameter

from qtip_triton.spec import TrellisSpec

GROUP = 32  # rows/columns of one contiguous block in QTIP's kernel layout
QKV_IDS = {"q": 0, "k": 1, "v": 2}
REQUIRED = ("trellis", "SU", "SV")
CHECKPOINT_NAME = {"qtip_rcp": "rcp", "qtip_tp_rank": "tp_rank"}


@dataclass(frozen=True)
class LayerGeometry:
    """What one vLLM linear layer holds on this rank, per logical matrix."""

    prefix: str
    names: tuple[str, ...]  # checkpoint module names (q_proj, k_proj, v_proj)
    specs: tuple[TrellisSpec, ...]
    local_out: tuple[int, ...]  # p_i: rows on this rank
    full_out: tuple[int, ...]  # m_i: rows in the checkpoint
    local_in: int  # n_loc
    full_in: int  # n
    replicated: bool  # the layer's loader is not a v2 loader (ReplicatedLinear): copy whole tensors

    @property
    def shards(self) -> int:
        return len(self.names)

    @property
    def kmax(self) -> int:
        return max(s.K for s in self.specs)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for p in self.local_out:
            out.append(acc)
            acc += p
        return tuple(out)

    def shard_prefix(self, i: int) -> str:
        parent = self.prefix.rsplit(".", 1)[0] if "." in self.prefix else ""
        return f"{parent}.{self.names[i]}" if parent else self.names[i]

    def needs_table(self) -> bool:
        from qtip_triton.codes import get_code

        return get_code(self.specs[0].code).needs_table

    def shard_index(self, shard_id: object) -> int:
        if shard_id is None:
            if self.shards == 1:
                return 0
            raise ValueError(
                f"{self.prefix}: the checkpoint stores this fused layer as one tensor; QTIP checkpoints keep "
                f"{', '.join(self.names)} separate (each has its own SU, SV, table and transforms)"
            )
        if isinstance(shard_id, str) and shard_id in QKV_IDS:
            i = QKV_IDS[shard_id]
        elif isinstance(shard_id, int) and not isinstance(shard_id, bool):
            i = shard_id
        else:
            raise ValueError(f"{self.prefix}: unsupported shard id {shard_id!r} for a QTIP layer")
        if not 0 <= i < self.shards:
            raise ValueError(f"{self.prefix}: shard id {shard_id!r} out of range for {self.shards} shards")
        return i

    def check_blocks(self, block: int, why: str, out_unit: str, in_unit: str, out_hint: str = "") -> None:
        """Every matrix and every rank's slice must be a multiple of ``block``; ``why`` says what needs it."""
        for i, (p, m) in enumerate(zip(self.local_out, self.full_out, strict=True)):
            if m % block or p % block:
                raise ValueError(
                    f"{self.shard_prefix(i)}: {why}, but this rank holds {p} of {m} {out_unit} "
                    f"(both must be multiples of {block}{out_hint})"
                )
        if self.full_in % block or self.local_in % block:
            raise ValueError(
                f"{self.prefix}: {why}, but this rank holds {self.local_in} of {self.full_in} {in_unit} "
                f"(both must be multiples of {block})"
            )

    def check(self) -> None:
        """Sizes QTIP's layout can hold: every matrix and every rank's slice a multiple of 32."""
        self.check_blocks(GROUP, "QTIP's kernel layout stores 32x32 blocks", "output rows", "input columns")


class ShardSlotParameter(BasevLLMParameter):
    """data[(S, ...)]: slot i belongs to logical matrix i (q/k/v, gate/up) and is loaded whole.

    ``input_dim`` (a dim of the per-slot tensor) is narrowed to this rank's part in row-parallel
    layers, where the input is sharded (SU).
    """

    def __init__(self, data: torch.Tensor, weight_loader, input_dim: int | None = None) -> None:
        self._slot_input_dim = input_dim
        super().__init__(data=data, weight_loader=weight_loader)

    def _load(self, slot: int, w: torch.Tensor, narrow_input: bool = False) -> None:
        target = self.data[slot]
        if narrow_input and self._slot_input_dim is not None and w.dim() == target.dim():
            size = target.shape[self._slot_input_dim]
            w = w.narrow(self._slot_input_dim, self.tp_rank * size, size)
        if w.shape != target.shape and w.numel() == target.numel() == 1:
            w = w.reshape(target.shape)
        if w.shape != target.shape:
            raise ValueError(f"cannot load a tensor of shape {tuple(w.shape)} into a slot of shape {tuple(target.shape)}")
        target.copy_(w)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(0, loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(0, loaded_weight, narrow_input=True)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(self._shard_id_as_int(kwargs["shard_id"]), loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(self._shard_id_as_int(kwargs["shard_id"]), loaded_weight)


# ------------------------------------------------------------------------------ checkpoint checks


def _trellis(geom: LayerGeometry, i: int, w: torch.Tensor) -> torch.Tensor:
    name = f"{geom.shard_prefix(i)}.trellis"
    spec, m, n = geom.specs[i], geom.full_out[i], geom.full_in
    if w.dtype != torch.int16 or w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D int16 tensor (QTIP kernel layout), got {w.dtype} {tuple(w.shape)}")
    if w.shape[1] % 16:
        raise ValueError(f"{name} has {w.shape[1]} int16 per tile row, not 16*K for any K")
    k = w.shape[1] // 16
    if k != spec.K:
        raise ValueError(
            f"{name} holds K={k} bits per weight ({w.shape[1]} int16 per tile), but the model config says "
            f"K={spec.K} for {geom.names[i]}"
        )
    rows = (m // 16) * (n // 16)
    if w.shape[0] != rows:
        raise ValueError(
            f"{name} has {w.shape[0]} tile rows, but a {m}x{n} matrix needs {rows} (out/16 * in/16): "
            "the checkpoint is truncated or does not match the model config"
        )
    g = w.reshape(m // GROUP, n // GROUP, 64 * k)  # a 32x32 block is 128*K bytes = 64*K int16
    if k < geom.kmax:
        g = F.pad(g, (0, 64 * (geom.kmax - k)))
    return g


def _vector(size_of):
    def check(geom: LayerGeometry, i: int, w: torch.Tensor, name: str) -> torch.Tensor:
        size = size_of(geom, i)
        if w.dim() != 1 or w.shape[0] != size:
            raise ValueError(f"{geom.shard_prefix(i)}.{name} must have shape ({size},), got {tuple(w.shape)}")
        if not w.is_floating_point():
            raise ValueError(f"{geom.shard_prefix(i)}.{name} must be floating point, got {w.dtype}")
        return w.to(torch.float32)

    return check


def _table(geom: LayerGeometry, i: int, w: torch.Tensor, name: str) -> torch.Tensor:
    from qtip_triton.codes import get_code

    spec = geom.specs[i]
    want = get_code(spec.code).table_shape(spec)
    if tuple(w.shape) != tuple(want) or not w.is_floating_point():
        raise ValueError(
            f"{geom.shard_prefix(i)}.{name} must be a floating-point table of shape {tuple(want)} for {spec.name}, "
            f"got {w.dtype} {tuple(w.shape)}"
        )
    return w


def _scalar(geom: LayerGeometry, i: int, w: torch.Tensor, name: str) -> torch.Tensor:
    if w.numel() != 1 or w.is_floating_point() or w.is_complex():
        raise ValueError(f"{geom.shard_prefix(i)}.{name} must be an integer scalar, got {w.dtype} {tuple(w.shape)}")
    return w.reshape(()).to(torch.int64)


CHECKS = {
    "trellis": lambda geom, i, w, name: _trellis(geom, i, w),
    "SU": _vector(lambda geom, i: geom.full_in),
    "SV": _vector(lambda geom, i: geom.full_out[i]),
    "tlut": _table,
    "qtip_rcp": _scalar,
    "qtip_tp_rank": _scalar,
}


class CheckpointLoader:
    """A parameter's weight_loader: check + reshape the checkpoint tensor, then load it."""

    def __init__(self, layer: torch.nn.Module, geom: LayerGeometry, name: str, inner) -> None:
        self.layer, self.geom, self.name, self.inner = layer, geom, name, inner

    def __call__(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        geom = self.geom
        i = geom.shard_index(loaded_shard_id)
        w = CHECKS[self.name](geom, i, loaded_weight, CHECKPOINT_NAME.get(self.name, self.name))
        if geom.replicated:  # nothing to shard: copy the (single) matrix's tensor whole
            target = param.data[i] if isinstance(param, ShardSlotParameter) else param.data
            if target.shape != w.shape:
                raise ValueError(f"{geom.shard_prefix(i)}: cannot load {tuple(w.shape)} into {tuple(target.shape)}")
            target.copy_(w)
        elif loaded_shard_id is None:
            self.inner(param, w)
        else:
            self.inner(param, w, loaded_shard_id)
        self.layer.qtip_loaded.add((self.name, i))
