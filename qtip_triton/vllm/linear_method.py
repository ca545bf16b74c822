"""QTIPLinearMethod: QTIP weights in vLLM's Replicated/Column/Row/QKV/MergedColumn linear layers.

Life of a layer:

1. :meth:`create_weights` allocates this rank's shard in a loader-friendly form (see
   :mod:`qtip_triton.vllm.params`).
2. vLLM's loaders fill it from the checkpoint (through the checking :class:`CheckpointLoader`).
   With ``load_format="dummy"`` nothing is loaded and :meth:`process_weights_after_loading` fills
   valid random QTIP data instead (random trellis bits are always a valid tail-biting trellis; SU/SV
   are random signs scaled to keep activations O(1), so no fp16 overflow).
3. :meth:`process_weights_after_loading` reads each shard's ``rcp``/``tp_rank``, checks that its
   Hadamard transforms can run on this rank's slice (tensor parallelism), builds and validates one
   QuantizedWeight per logical matrix, packs them for the custom op and lets the kernel back end
   prepare them (repack) now rather than during CUDA-graph capture, then warms every kernel the engine
   will launch, for every batch size up to its largest (:mod:`qtip_triton.vllm.warmup`, CUDA only).
4. :meth:`apply` is a single ``torch.ops.qtip_triton.qtip_linear`` call: opaque to torch.compile,
   no host syncs, same launches for the same shapes.

Tensor parallelism needs no extra communication when every transform stays inside this rank's
slice: ``rcp=2`` (output transform split into ``tp_rank`` blocks) for column-parallel layers and
``rcp=1`` (input transform split) for row-parallel layers, with ``tp_rank`` a multiple of the TP
degree. Full-width transforms on a sharded side (``rcp=0`` checkpoints at TP > 1) are refused
with an error that says what to use instead.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    ReplicatedLinear,
)
from vllm.model_executor.parameter import ChannelQuantScaleParameter, PackedvLLMParameter

from qtip_triton import ops
from qtip_triton.codes import get_code
from qtip_triton.ops import PackedShards
from qtip_triton.vllm.compat import current_load_format, logger, register_weight_loader_v2
from qtip_triton.vllm.params import (
    GROUP,
    REQUIRED,
    CheckpointLoader,
    LayerGeometry,
    ShardSlotParameter,
)
from qtip_triton.vllm.warmup import batch_of, forward_passes_bias, warm_up_layer
from qtip_triton.weight import RCP_COL, RCP_NONE, RCP_ROW, QuantizedWeight

HYB_TABLE_RMS = math.sqrt(15 / 16)


def full_output_sizes(layer: torch.nn.Module, parts: list[int], output_size: int) -> list[int]:
    """Rows of each logical matrix in the checkpoint (before TP sharding / kv-head replication)."""
    if hasattr(layer, "total_num_kv_heads"):  # QKVParallelLinear
        hd = layer.head_size
        vd = getattr(layer, "v_head_size", hd)
        return [layer.total_num_heads * hd, layer.total_num_kv_heads * hd, layer.total_num_kv_heads * vd]
    if isinstance(layer, ColumnParallelLinear):
        sizes = list(getattr(layer, "output_sizes", [output_size]))
        return sizes if len(sizes) == len(parts) else [output_size]
    return list(parts)


def local_transform_blocks(geom: LayerGeometry, i: int, rcp: int, tp_rank: int) -> int:
    """How many blocks the rcp-side transform has on this rank's slice; ValueError if it cannot run here.

    A transform split into ``B`` blocks over ``size`` features runs on a slice of ``local`` features
    iff the slice is a union of whole blocks (slices start at multiples of ``local``).
    """
    name = geom.shard_prefix(i)
    if rcp not in (RCP_NONE, RCP_ROW, RCP_COL):
        raise ValueError(f"{name}.rcp must be 0 (none), 1 (row) or 2 (column), got {rcp}")
    if tp_rank < 1:
        raise ValueError(f"{name}.tp_rank must be >= 1, got {tp_rank}")
    blocks = {"in": tp_rank if rcp == RCP_ROW else 1, "out": tp_rank if rcp == RCP_COL else 1}
    local = {"in": geom.local_in, "out": geom.local_out[i]}
    full = {"in": geom.full_in, "out": geom.full_out[i]}
    counts = {}
    for side in ("in", "out"):
        if full[side] % blocks[side]:
            raise ValueError(
                f"{name}: tp_rank={tp_rank} does not divide its {full[side]} {side}put features (rcp={rcp})"
            )
        block = full[side] // blocks[side]
        if local[side] % block:
            what = "input" if side == "in" else "output"
            layout = (
                f"a full-width {what} Hadamard transform over all {full[side]} {what} features"
                if blocks[side] == 1
                else f"an {what} transform in {blocks[side]} blocks of {block}"
            )
            raise ValueError(
                f"{name}: this checkpoint (rcp={rcp}, tp_rank={tp_rank}) applies {layout}, but tensor "
                f"parallelism gives this rank {local[side]} of them. Undoing the transform on a slice would need "
                "the whole vector (an extra all-gather, not implemented). Use tensor_parallel_size=1, or a "
                "tensor-parallel QTIP checkpoint (rcp=1 for row-parallel, rcp=2 for column-parallel layers, "
                "tp_rank a multiple of the TP size: `qtip-triton quantize --tp N`, like relaxml's *-TP8 models)."
            )
        counts[side] = local[side] // block
    return counts["in"] if rcp == RCP_ROW else counts["out"] if rcp == RCP_COL else 1


@register_weight_loader_v2
class QTIPLinearMethod(LinearMethodBase):
    """Linear method for QTIP-quantized layers (see the module docstring)."""

    def __init__(self, config) -> None:
        self.config = config

    # ------------------------------------------------------------------ create
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        prefix = getattr(layer, "prefix", "")
        names = self.config.logical_names(prefix, len(output_partition_sizes))
        geom = LayerGeometry(
            prefix=prefix,
            names=tuple(names),
            specs=tuple(self.config.spec_for(n) for n in names),
            local_out=tuple(int(p) for p in output_partition_sizes),
            full_out=tuple(full_output_sizes(layer, list(output_partition_sizes), output_size)),
            local_in=int(input_size_per_partition),
            full_in=int(input_size),
            replicated=isinstance(layer, ReplicatedLinear),
        )
        geom.check()
        inner = extra_weight_attrs.get("weight_loader")
        S, rows, n_loc = geom.shards, sum(geom.local_out), geom.local_in

        def loader(name: str) -> CheckpointLoader:
            return CheckpointLoader(layer, geom, name, inner)

        trellis = PackedvLLMParameter(
            data=torch.empty(rows // GROUP, n_loc // GROUP, 64 * geom.kmax, dtype=torch.int16),
            input_dim=1,
            output_dim=0,
            packed_dim=0,
            packed_factor=GROUP,
            weight_loader=loader("trellis"),
        )
        layer.register_parameter("trellis", trellis)
        layer.register_parameter("SU", ShardSlotParameter(data=torch.empty(S, n_loc, dtype=torch.float32), weight_loader=loader("SU"), input_dim=0))
        layer.register_parameter(
            "SV", ChannelQuantScaleParameter(data=torch.empty(rows, dtype=torch.float32), output_dim=0, weight_loader=loader("SV"))
        )
        table_shape = get_code(geom.specs[0].code).table_shape
        if table_shape is not None:
            shapes = {tuple(table_shape(s)) for s in geom.specs}
            if len(shapes) != 1:
                raise ValueError(f"{prefix}: the fused matrices need tables of different shapes {sorted(shapes)}")
            tlut = ShardSlotParameter(data=torch.empty(S, *shapes.pop(), dtype=torch.float16), weight_loader=loader("tlut"))
            layer.register_parameter("tlut", tlut)
        else:
            layer.register_parameter("tlut", None)
        layer.register_parameter("qtip_rcp", ShardSlotParameter(data=torch.zeros(S, dtype=torch.int64), weight_loader=loader("qtip_rcp")))
        layer.register_parameter("qtip_tp_rank", ShardSlotParameter(data=torch.ones(S, dtype=torch.int64), weight_loader=loader("qtip_tp_rank")))
        layer.qtip_geometry = geom
        layer.qtip_loaded = set()
        layer.qtip_load_format = current_load_format()
        layer.qtip_act_dtype = params_dtype
        batch_of(self.config).expect(layer)  # its warm-up joins the rest of the model's (warmup.LoadBatch)

    # ------------------------------------------------------------------ load
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        geom: LayerGeometry = layer.qtip_geometry
        if not layer.qtip_loaded:
            fmt = layer.qtip_load_format
            if fmt not in (None, "dummy"):
                raise ValueError(f"{geom.prefix}: no QTIP tensors were loaded for this layer (load_format={fmt!r})")
            fill_dummy(layer, geom)
        else:
            self._check_complete(layer, geom)
        rcps = [int(v) for v in layer.qtip_rcp.data.tolist()]
        tps = [int(v) for v in layer.qtip_tp_rank.data.tolist()]
        qws = []
        for i, (spec, p, o) in enumerate(zip(geom.specs, geom.local_out, geom.offsets, strict=True)):
            blocks = local_transform_blocks(geom, i, rcps[i], tps[i])
            trellis = layer.trellis.data[o // GROUP : (o + p) // GROUP, :, : 64 * spec.K]
            try:
                qws.append(
                    QuantizedWeight(
                        spec,
                        p,
                        geom.local_in,
                        trellis.contiguous().reshape(-1, 16 * spec.K),
                        layer.SU.data[i],
                        layer.SV.data[o : o + p],
                        None if layer.tlut is None else layer.tlut.data[i],
                        layout="qtip",
                        rcp=rcps[i],
                        tp_rank=blocks,
                    )
                )
            except ValueError as e:
                raise ValueError(f"{geom.shard_prefix(i)}: {e}") from None
        packed = PackedShards.from_qweights(qws, key=geom.prefix or f"qtip-layer-{id(layer)}")
        # Plain Parameters from here on: the runtime form, no loader attributes, no subclass dispatch.
        for name, tensor in (("trellis", packed.trellis), ("SU", packed.SU), ("SV", packed.SV), ("tlut", packed.table)):
            delattr(layer, name)
            layer.register_parameter(name, None if tensor is None else Parameter(tensor, requires_grad=False))
        for name in ("qtip_rcp", "qtip_tp_rank"):
            delattr(layer, name)
        packed.register()  # validates the views once and lets the kernels prepare them
        layer.qtip_packed = packed
        layer.qtip_op_meta = ops.op_args(packed)[1]
        # select + compile + launch every kernel for every batch size the engine can send (CUDA only)
        warm_up_layer(packed, layer.qtip_act_dtype, bias=forward_passes_bias(layer), prefix=geom.prefix,
                      batch=batch_of(self.config), layer=layer)

    @staticmethod
    def _check_complete(layer: torch.nn.Module, geom: LayerGeometry) -> None:
        required = REQUIRED + (("tlut",) if layer.tlut is not None else ())
        missing = [
            f"{geom.shard_prefix(i)}.{name}"
            for i in range(geom.shards)
            for name in required
            if (name, i) not in layer.qtip_loaded
        ]
        if missing:
            raise ValueError(f"QTIP checkpoint lacks tensors: {', '.join(missing)}")

    # ------------------------------------------------------------------ forward
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.qtip_triton.qtip_linear(
            x, layer.trellis, layer.SU, layer.SV, layer.tlut, bias, *layer.qtip_op_meta
        )


def fill_dummy(layer: torch.nn.Module, geom: LayerGeometry) -> None:
    """Valid random QTIP tensors for ``load_format="dummy"`` (speed runs without a checkpoint).

    Transforms are split the way a ``--tp`` checkpoint would be for this rank's TP degree, so the
    layer runs at any TP size. SV = ±1/sqrt(n) keeps y's RMS near x's: no overflow layer after layer.
    """
    dev = layer.trellis.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(zlib.crc32(geom.prefix.encode()))
    layer.trellis.data.view(torch.uint8).random_(0, 256, generator=gen)  # every bit pattern is a valid trellis

    def signs(*shape: int) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=gen, device=dev).to(torch.float32) * 2 - 1

    layer.SU.data.copy_(signs(*layer.SU.shape))
    layer.SV.data.copy_(signs(*layer.SV.shape) / math.sqrt(geom.full_in))
    if layer.tlut is not None:
        table = torch.randn(layer.tlut.shape, generator=gen, device=dev, dtype=torch.float32) * HYB_TABLE_RMS
        layer.tlut.data.copy_(table.to(layer.tlut.dtype))
    for i in range(geom.shards):
        if geom.local_in < geom.full_in:
            rcp, tp = RCP_ROW, geom.full_in // geom.local_in
        elif geom.local_out[i] < geom.full_out[i]:
            rcp, tp = RCP_COL, geom.full_out[i] // geom.local_out[i]
        else:
            rcp, tp = RCP_NONE, 1
        layer.qtip_rcp.data[i] = rcp
        layer.qtip_tp_rank.data[i] = tp
    log = logger()
    getattr(log, "info_once", log.info)(
        "qtip: no checkpoint tensors loaded (load_format='dummy'): filled random valid QTIP weights"
    )
