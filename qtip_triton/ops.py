"""``torch.ops.qtip_triton.qtip_linear``: one opaque custom op for a (possibly fused) QTIP linear layer.

Why an op: runtimes that trace the model (``torch.compile(fullgraph=True)``, vLLM's piecewise
compile, CUDA graphs) must not look inside the kernels. The op has a fake (meta) implementation,
so Dynamo only sees ``x[..., n] -> y[..., sum(m_i)]``.

Why fused: vLLM fuses q/k/v (and gate/up) into one layer, yet each logical matrix keeps its own
trellis, SU, SV, table and Hadamard transforms. The op takes every shard's tensors packed side by
side (:class:`PackedShards`) and computes the whole fused output in one call:

* ``trellis``: the shards' packed trellises, each flattened, concatenated (1-D, the layout's dtype);
* ``SU``: (S, n) float32, one row per shard (all shards share the input);
* ``SV``: (sum m_i,) float32, concatenated (it is per output row);
* ``table``: (S, *table_shape) stacked code tables, or None for computed codes;
* static metadata: ``specs`` (comma-separated spec names), ``out_features`` [m_i], ``in_features``,
  ``layout``, ``rcp`` [per shard], ``tp_rank`` [per shard: the number of transform blocks on the
  ``rcp`` side, see :class:`~qtip_triton.weight.QuantizedWeight`] and ``had_block`` [per shard: fixed
  Hadamard block width on both sides, 0 = full width; EXL3 uses 128].

The compute is ``qtip_triton.linear(x, qw_i)`` per shard. Kernel back ends cache prepared
(repacked) weights by the identity of the QuantizedWeight's tensors, so the op must hand them the
same objects every call: :meth:`PackedShards.register` builds the validated QuantizedWeights once
(views into the packed tensors) and files them under the data pointers of its tensors; the op looks
them up there. Unregistered calls (``torch.library.opcheck``, ad-hoc use) rebuild the shards from
the tensors on every call, which is correct but defeats such caches.

Why no layer name among the op's arguments: a string argument is a constant of the traced graph, so a
per-layer name made every decoder layer's graph a different one. vLLM compiles each piece of its
piecewise graph once per distinct graph (isomorphic pieces share one Inductor artifact), so names cost a
Llama-2-7B engine 35.5 s of graph compilation against fp16's 6.1 s (H100, 2026-12-06). Without them,
same-shaped layers trace to the same graph; their tensors (graph inputs) tell them apart.

Nothing here syncs with the host, so the op can run inside CUDA graph capture.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qtip_triton import dispatch
from qtip_triton.bitstream import get_layout
from qtip_triton.spec import TrellisSpec
from qtip_triton.weight import RCP_NONE, QuantizedWeight

NAMESPACE = "qtip_triton"
OP_NAME = "qtip_linear"
SCHEMA = (
    f"{OP_NAME}(Tensor x, Tensor trellis, Tensor SU, Tensor SV, Tensor? table, Tensor? bias, str specs, "
    "int[] out_features, int in_features, str layout, int[] rcp, int[] tp_rank, int[] had_block) -> Tensor"
)

# data pointers of (trellis, SU, SV, table) -> weakref to the registered shards; the owner (PackedShards) keeps
# them alive, so no other live tensors have these addresses
_REGISTRY: dict[tuple[int, int, int, int], weakref.ref] = {}
_LIB: torch.library.Library | None = None  # keep a reference: dropping the Library unregisters the op


# --------------------------------------------------------------------------------------------- shards


def _trusted_qweight(**values) -> QuantizedWeight:
    """A QuantizedWeight built without ``__post_init__`` validation.

    Only for tensors validated once already (at :meth:`PackedShards.from_qweights`): the checks read
    tensor values (NaN scans), i.e. host syncs, which are illegal inside CUDA graph capture.
    """
    qw = object.__new__(QuantizedWeight)
    for f in dataclasses.fields(QuantizedWeight):
        if f.name in values:
            value = values[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # pragma: no cover - no such field today
            value = f.default_factory()
        else:
            raise TypeError(f"QuantizedWeight field {f.name!r} has no value")
        object.__setattr__(qw, f.name, value)
    return qw


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def split_shards(
    trellis: torch.Tensor,
    SU: torch.Tensor,
    SV: torch.Tensor,
    table: torch.Tensor | None,
    specs: str,
    out_features: Sequence[int],
    in_features: int,
    layout: str,
    rcp: Sequence[int],
    tp_rank: Sequence[int],
    had_block: Sequence[int] | None = None,
) -> list[QuantizedWeight]:
    """The per-shard QuantizedWeights (views, unvalidated) of packed op arguments."""
    names = specs.split(",")
    S = len(out_features)
    if len(names) == 1 and S > 1:
        names = names * S
    had_block = [0] * S if had_block is None else list(had_block)
    if not (len(names) == S == len(rcp) == len(tp_rank) == len(had_block)):
        raise ValueError(
            f"qtip_linear: {len(names)} specs, {S} out_features, {len(rcp)} rcp, {len(tp_rank)} tp_rank and "
            f"{len(had_block)} had_block entries; there must be one per shard"
        )
    if SU.dim() != 2 or SU.shape[0] != S:
        raise ValueError(f"qtip_linear: SU must be (shards={S}, in_features), got {tuple(SU.shape)}")
    lay = get_layout(layout)
    parsed = [TrellisSpec.parse(name) for name in names]
    shapes = [lay.packed_shape(spec, m, in_features) for spec, m in zip(parsed, out_features, strict=True)]
    counts = [_numel(shape) for shape in shapes]
    if sum(counts) != trellis.numel() or sum(out_features) != SV.numel():
        raise ValueError(
            f"qtip_linear: packed tensors do not match the metadata (trellis has {trellis.numel()} elements, "
            f"the specs need {sum(counts)}; SV has {SV.numel()}, out_features sum to {sum(out_features)})"
        )
    shards = []
    t_off = v_off = 0
    for i, (spec, m) in enumerate(zip(parsed, out_features, strict=True)):
        shards.append(
            _trusted_qweight(
                spec=spec,
                out_features=m,
                in_features=in_features,
                trellis=trellis[t_off : t_off + counts[i]].view(shapes[i]),
                SU=SU[i],
                SV=SV[v_off : v_off + m],
                table=None if table is None else table[i],
                layout=layout,
                rcp=rcp[i],
                tp_rank=tp_rank[i] if rcp[i] != RCP_NONE else 1,
                had_block=had_block[i],
            )
        )
        t_off += counts[i]
        v_off += m
    return shards


@dataclass
class PackedShards:
    """The op's arguments for one (fused) layer: shards packed side by side, plus static metadata."""

    trellis: torch.Tensor
    SU: torch.Tensor
    SV: torch.Tensor
    table: torch.Tensor | None
    specs: str
    out_features: tuple[int, ...]
    in_features: int
    layout: str
    rcp: tuple[int, ...]
    tp_rank: tuple[int, ...]
    key: str = ""  # the layer's name, for people reading it: not an op argument (see the module docstring)
    had_block: tuple[int, ...] = ()
    _shards: list[QuantizedWeight] | None = field(default=None, repr=False)
    _fused: object = field(default=None, repr=False)  # the kernels' one-launch decode of all shards, if any

    @classmethod
    def from_qweights(cls, qws: Sequence[QuantizedWeight], key: str = "") -> PackedShards:
        """Pack validated QuantizedWeights that share the input (same in_features and layout)."""
        if not qws:
            raise ValueError("PackedShards needs at least one QuantizedWeight")
        for qw in qws:
            if not isinstance(qw, QuantizedWeight):
                raise TypeError(f"expected QuantizedWeight shards, got {type(qw).__name__}")
        n, layout, dev = qws[0].in_features, qws[0].layout, qws[0].device
        for i, qw in enumerate(qws):
            if qw.in_features != n:
                raise ValueError(f"shard {i} has in_features={qw.in_features}, shard 0 has {n}: fused shards share x")
            if qw.layout != layout:
                raise ValueError(f"shard {i} uses layout {qw.layout!r}, shard 0 uses {layout!r}")
            if qw.device != dev:
                raise ValueError(f"shard {i} is on {qw.device}, shard 0 on {dev}")
        tables = [qw.table for qw in qws]
        if any(t is None for t in tables) and not all(t is None for t in tables):
            raise ValueError("either every shard has a code table or none has")
        if tables[0] is not None and len({(tuple(t.shape), t.dtype) for t in tables}) != 1:
            raise ValueError("the shards' code tables differ in shape or dtype and cannot be stacked")
        return cls(
            trellis=torch.cat([qw.trellis.reshape(-1) for qw in qws]),
            SU=torch.stack([qw.SU.to(torch.float32) for qw in qws]),
            SV=torch.cat([qw.SV.to(torch.float32) for qw in qws]),
            table=None if tables[0] is None else torch.stack(tables),
            specs=",".join(qw.spec.name for qw in qws),
            out_features=tuple(qw.out_features for qw in qws),
            in_features=n,
            layout=layout,
            rcp=tuple(qw.rcp for qw in qws),
            tp_rank=tuple(qw.tp_rank for qw in qws),
            key=key,
            had_block=tuple(qw.had_block for qw in qws),
        )

    @property
    def out_total(self) -> int:
        return sum(self.out_features)

    def shards(self) -> list[QuantizedWeight]:
        """Per-shard QuantizedWeights viewing this object's tensors (validated, built once)."""
        if self._shards is None:
            trusted = split_shards(
                self.trellis, self.SU, self.SV, self.table, self.specs, self.out_features,
                self.in_features, self.layout, self.rcp, self.tp_rank, self.had_block or None,
            )
            # Validate once here (host syncs are fine at load time), keep the views.
            for qw in trusted:
                QuantizedWeight.__post_init__(qw)
            self._shards = trusted
        return self._shards

    def register(self, prepare: bool = True) -> None:
        """File the shards for the op (and let the kernel back end prepare them now, not mid-capture)."""
        shards = self.shards()
        if prepare:
            prepare_shards(shards)
            fuse = getattr(dispatch, "prepare_fused", None)
            self._fused = fuse(shards) if fuse is not None and len(shards) > 1 else None
        key = _pointers(self.trellis, self.SU, self.SV, self.table)

        def forget(ref: weakref.ref, key: tuple[int, int, int, int] = key) -> None:
            if _REGISTRY.get(key) is ref:  # a newer registration under the same key stays
                del _REGISTRY[key]

        _REGISTRY[key] = weakref.ref(self, forget)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fused dense weight (sum m_i, n): the shards' W_eff stacked."""
        return torch.cat([qw.dequantize(dtype) for qw in self.shards()], dim=0)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return qtip_linear(x, self, bias)


def prepare_shards(shards: Sequence[QuantizedWeight]) -> None:
    """Run the kernel back end's load-time step (``dispatch.prepare``) when it has one.

    Back ends cache what they prepare by the weight's tensors; calling this at load time moves
    repacking and JIT work out of the first forward (which may be a CUDA graph capture).
    """
    prep = getattr(dispatch, "prepare", None)
    if prep is None:
        return
    for qw in shards:
        prep(qw)


def _pointers(trellis: torch.Tensor, SU: torch.Tensor, SV: torch.Tensor, table: torch.Tensor | None
              ) -> tuple[int, int, int, int]:
    return trellis.data_ptr(), SU.data_ptr(), SV.data_ptr(), 0 if table is None else table.data_ptr()


def _lookup(trellis: torch.Tensor, SU: torch.Tensor, SV: torch.Tensor, table: torch.Tensor | None
            ) -> PackedShards | None:
    """The registered shards these very tensors belong to (all four: the same trellis with another SU is another
    layer, served by the unregistered path), or None."""
    key = _pointers(trellis, SU, SV, table)
    ref = _REGISTRY.get(key)
    packed = None if ref is None else ref()
    if packed is None or _pointers(packed.trellis, packed.SU, packed.SV, packed.table) != key:
        return None
    return packed


# --------------------------------------------------------------------------------------------- the op


_BEFORE_FIRST_RUN: list[Callable[[], None]] = []


def before_first_run(hook: Callable[[], None]) -> None:
    """Run ``hook`` once, at the op's next launch outside CUDA-graph capture.

    Why: a load-time warm-up that waits for layers which never load (:class:`qtip_triton.vllm.warmup.LoadBatch`)
    must still happen before the engine's profile run and graph capture launch the kernels it would compile.
    """
    if hook not in _BEFORE_FIRST_RUN:
        _BEFORE_FIRST_RUN.append(hook)


def _run_first_hooks(x: torch.Tensor) -> None:
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no compiling or synchronizing inside a capture; the hooks wait for an eager launch
    while _BEFORE_FIRST_RUN:
        _BEFORE_FIRST_RUN.pop(0)()


def _qtip_linear_impl(
    x: torch.Tensor,
    trellis: torch.Tensor,
    SU: torch.Tensor,
    SV: torch.Tensor,
    table: torch.Tensor | None,
    bias: torch.Tensor | None,
    specs: str,
    out_features: list[int],
    in_features: int,
    layout: str,
    rcp: list[int],
    tp_rank: list[int],
    had_block: list[int],
) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"qtip_linear: x has {x.shape[-1]} features, the layer expects {in_features}")
    if _BEFORE_FIRST_RUN:
        _run_first_hooks(x)
    packed = _lookup(trellis, SU, SV, table)
    if packed is not None:
        shards = packed.shards()
    else:
        shards = split_shards(
            trellis, SU, SV, table, specs, out_features, in_features, layout, rcp, tp_rank, had_block
        )
    if len(shards) == 1:
        return dispatch.linear(x, shards[0], bias)
    # each shard's output transform writes its own columns of one output: no concatenation launch
    # (and, where the shards take one kernel kind, their input transforms run as one launch)
    y = x.new_empty(*x.shape[:-1], sum(out_features))
    pre = SU if SU.dim() == 2 and SU.dtype == torch.float32 and SU.is_contiguous() else None
    equal = len(set(out_features)) == 1 and SV.dtype == torch.float32 and SV.is_contiguous()
    post = SV.view(len(out_features), out_features[0]) if equal and SV.numel() == sum(out_features) else None
    dispatch.linear_shards(x, shards, pre, y.view(-1, y.shape[-1]), post,
                           fused=packed._fused if packed is not None else None)
    return y if bias is None else y + bias.to(y.dtype)


def _qtip_linear_fake(
    x: torch.Tensor,
    trellis: torch.Tensor,
    SU: torch.Tensor,
    SV: torch.Tensor,
    table: torch.Tensor | None,
    bias: torch.Tensor | None,
    specs: str,
    out_features: list[int],
    in_features: int,
    layout: str,
    rcp: list[int],
    tp_rank: list[int],
    had_block: list[int],
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], sum(out_features)))


def register_op() -> None:
    """Define ``torch.ops.qtip_triton.qtip_linear`` once per process (safe to call again)."""
    global _LIB
    if _LIB is not None or hasattr(getattr(torch.ops, NAMESPACE), OP_NAME):
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    lib.define(SCHEMA)
    lib.impl(OP_NAME, _qtip_linear_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{OP_NAME}", _qtip_linear_fake, lib=lib)
    _LIB = lib


def op_args(packed: PackedShards) -> tuple:
    """The op's arguments after ``x`` up to ``bias`` and after ``bias``, as two tuples."""
    return (
        (packed.trellis, packed.SU, packed.SV, packed.table),
        (packed.specs, list(packed.out_features), packed.in_features, packed.layout,
         list(packed.rcp), list(packed.tp_rank), list(packed.had_block or [0] * len(packed.out_features))),
    )


def qtip_linear(x: torch.Tensor, packed: PackedShards, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · W_effᵀ (+ bias) for all shards of ``packed`` through the custom op."""
    tensors, meta = op_args(packed)
    return torch.ops.qtip_triton.qtip_linear(x, *tensors, bias, *meta)


register_op()
