"""Load-time repack of a QuantizedWeight into the kernel-owned layout (lossless, once per layer).

``PreparedWeight.words`` is int32 of shape ``(G, (m/16) * GRN, (n/16) * GCN)``: word slot ``q`` of the
group at ``(gr, gc)`` of tile ``(tr, tc)`` sits at ``[q, tr * GRN + gr, tc * GCN + gc]`` (see
:class:`~qtip_triton.codegen.plan.TilePlan`). It holds exactly the stream words (``m * n * K / 32``
of them, like the checkpoint), only reordered, so it round-trips (:func:`unrepack`).

The code table is converted to what the generated kernels read:

* ``hyb``: int32 words of packed fp16 pairs, ``(2^Q, ceil(V/2))`` flattened; a sign flip of the first
  weight is then one xor of bit 15 of the first word (512 words for Q=9: the kernels keep it in
  registers/shared memory via ``tl.gather``, never a 2^L table);
* ``lut``: float32 ``(2^L * V,)``, read by pointer (research code, large table);
* computed codes: a 1-element dummy (kernels never read it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from qtip_triton.bitstream import get_layout
from qtip_triton.codegen.plan import TilePlan, input_order, make_plan
from qtip_triton.codes import get_code
from qtip_triton.kernels import mma_layout
from qtip_triton.spec import TILE, TrellisSpec
from qtip_triton.weight import QuantizedWeight


@dataclass
class PreparedWeight:
    """What the kernels launch with: repacked words, kernel table and the transforms' metadata."""

    spec: TrellisSpec
    out_features: int
    in_features: int
    layout: str
    plan: TilePlan
    words: torch.Tensor  # int32 (G, Rtot, Ctot)
    table: torch.Tensor  # int32 (hyb) / float32 (lut) / dummy; (shards, words) for fused shards of their own tables
    SU: torch.Tensor  # float32 (n,)
    SV: torch.Tensor  # float32 (m,)
    blocks_in: int
    blocks_out: int
    cache: dict = field(default_factory=dict)  # scratch kept with the layer (Hadamard matrices)
    shard_out: tuple[int, ...] = ()  # a fused weight (fuse_shards): the stacked shards' out_features

    # No reference to the QuantizedWeight's trellis is kept: the module cache below is keyed weakly on it.

    def cached(self, key: tuple, build) -> torch.Tensor:
        """``self.cache[key]``, made by ``build()`` (a host tensor, moved to the weight's device) at first use."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = build().to(device=self.device)
        return value

    def input_index(self, kind: str) -> torch.Tensor:
        """int32 (in_features,): where each input column goes in the ``kind`` kernel's x layout."""
        return self.cached(("input_index", kind),
                           lambda: input_order(self.plan, self.in_features, kind).to(torch.int32))

    def input_cols(self, kind: str) -> tuple[int, ...] | None:
        """The ``kind`` kernel's x layout as the input transform's ``cols`` (B's columns permuted: no scattered
        stores), or None where it moves columns across the transform's segments (the gemv's)."""
        key = ("input_cols", kind)
        if key not in self.cache:
            from qtip_triton.kernels.hadamard import segment_cols

            self.cache[key] = (segment_cols(input_order(self.plan, self.in_features, kind),
                                            self.in_features // self.blocks_in) if kind in ("gemv", "gemm") else None)
        return self.cache[key]

    def input_index_mma(self, rows: int) -> torch.Tensor:
        """int32 (in_features,): where each input column of batch row 0 goes in the mma gemv's h buffer of
        ``rows`` rows per quad (kernels/mma_layout.py); row m adds 4 m. Built on the host and copied at first use
        (the load-time warm-up), as input_index."""
        return self.cached(("input_index_mma", rows),
                           lambda: mma_layout.quad_index(input_order(self.plan, self.in_features, "gemv"), rows))

    @property
    def device(self) -> torch.device:
        return self.words.device


def kernel_table(spec: TrellisSpec, table: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The code table in the form the generated kernels read (see the module docstring)."""
    code = get_code(spec.code)
    code.check_table(spec, table)
    if spec.code == "hyb":
        assert table is not None
        half = table.to(device=device, dtype=torch.float16).contiguous()
        if spec.V % 2:
            half = torch.cat([half, torch.zeros(half.shape[0], 1, dtype=torch.float16, device=device)], dim=1)
        return half.view(torch.int32).reshape(-1).contiguous()
    if spec.code == "lut":
        assert table is not None
        return table.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    return torch.zeros(1, dtype=torch.int32, device=device)


def repack(words: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Stream words (tm, tn, 8K) int64 -> kernel layout (G, tm*GRN, tn*GCN) int32."""
    tm, tn, nw = words.shape
    pos = plan.word_positions().to(words.device)  # (G, GRN, GCN)
    g = words[:, :, pos.reshape(-1)].reshape(tm, tn, plan.G, plan.GRN, plan.GCN)
    g = g.permute(2, 0, 3, 1, 4).reshape(plan.G, tm * plan.GRN, tn * plan.GCN)
    g = torch.where(g >= 1 << 31, g - (1 << 32), g)
    return g.to(torch.int32).contiguous()


def unrepack(packed: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Inverse of :func:`repack` (tests: the repack is lossless)."""
    G, R, C = packed.shape
    tm, tn = R // plan.GRN, C // plan.GCN
    g = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(G, tm, plan.GRN, tn, plan.GCN).permute(1, 3, 0, 2, 4)
    g = g.reshape(tm, tn, -1)
    words = torch.empty(tm, tn, plan.G * plan.GRN * plan.GCN, dtype=torch.int64, device=packed.device)
    words[:, :, plan.word_positions().to(packed.device).reshape(-1)] = g
    return words


def prepare_weight(qw: QuantizedWeight) -> PreparedWeight:
    """Repack ``qw`` for the kernels (uncached; see :func:`prepare`)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"prepare() takes a QuantizedWeight, got {type(qw).__name__}")
    plan = make_plan(qw.spec, qw.layout)
    m, n = qw.out_features, qw.in_features
    words = get_layout(qw.layout).unpack(qw.trellis, qw.spec, m, n)
    assert words.shape == (m // TILE, n // TILE, qw.spec.words_per_tile)
    dev = qw.device
    return PreparedWeight(
        spec=qw.spec,
        out_features=m,
        in_features=n,
        layout=qw.layout,
        plan=plan,
        words=repack(words, plan),
        table=kernel_table(qw.spec, qw.table, dev),
        SU=qw.SU.to(device=dev, dtype=torch.float32).contiguous(),
        SV=qw.SV.to(device=dev, dtype=torch.float32).contiguous(),
        blocks_in=qw.blocks("in"),
        blocks_out=qw.blocks("out"),
    )


# A QuantizedWeight is often rebuilt around the same tensors (QTIPLinear.qweight makes a new one per
# call), so prepared weights are cached by the identity of the trellis tensor (held weakly: the entry
# goes when the tensor does), and invalidated when any tensor they were made from changes (in-place
# edits bump ``_version``; moves change identity).
_CACHE: dict[int, tuple[weakref.ref, tuple, PreparedWeight]] = {}


def _fingerprint(qw: QuantizedWeight) -> tuple:
    tensors = (qw.trellis, qw.SU, qw.SV) + ((qw.table,) if qw.table is not None else ())
    return (
        qw.spec, qw.layout, qw.out_features, qw.in_features, qw.rcp, qw.tp_rank, getattr(qw, "had_block", 0),
        tuple((id(t), t._version, t.data_ptr()) for t in tensors),
    )


def prepare(qw: QuantizedWeight | PreparedWeight) -> PreparedWeight:
    """The prepared form of ``qw`` (made once per layer and cached; a PreparedWeight passes through)."""
    if isinstance(qw, PreparedWeight):
        return qw
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"expected a QuantizedWeight or PreparedWeight, got {type(qw).__name__}")
    fp = _fingerprint(qw)
    key = id(qw.trellis)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is qw.trellis and hit[1] == fp:
        return hit[2]
    pw = prepare_weight(qw)
    _CACHE[key] = (weakref.ref(qw.trellis, lambda _, k=key: _CACHE.pop(k, None)), fp, pw)
    return pw


def fuse_shards(pws: list[PreparedWeight]) -> PreparedWeight | None:
    """One PreparedWeight whose word rows are the shards' stacked (q/k/v, gate/up), so one decode launch
    serves them all (each shard's rows read its own h: ``decode_matmul`` with (shards, M, in) h). The
    shards' own words become views into it: no second copy of the weights.

    None unless there are 2 or 3 shards of one spec, layout, plan, in_features, transform blocks and
    device with code tables of one shape. Equal tables stay one (W,) table; different ones (QTIP gives every
    linear its own ``tlut``, and the dummy-weight fill draws one per shard) are stacked (shards, W), and each
    shard's row blocks read their own (the kernel offsets TBL by the shard's stride, as it does h). SU/SV stay
    per shard (the transforms are grouped or per shard).
    """
    if not 2 <= len(pws) <= 3:
        return None
    p0 = pws[0]
    same = all(
        pw.spec == p0.spec and pw.layout == p0.layout and pw.plan == p0.plan and pw.in_features == p0.in_features
        and pw.blocks_in == p0.blocks_in and pw.device == p0.device and pw.words.shape[::2] == p0.words.shape[::2]
        and pw.table.shape == p0.table.shape and pw.table.dtype == p0.table.dtype and pw.table.dim() == 1
        for pw in pws
    )
    if not same:
        return None
    shared = all(bool(torch.equal(pw.table, p0.table)) for pw in pws)
    table = p0.table if shared else torch.stack([pw.table for pw in pws]).contiguous()
    words = torch.cat([pw.words for pw in pws], dim=1).contiguous()
    r0 = 0
    for pw in pws:
        rows = pw.words.shape[1]
        pw.words = words[:, r0:r0 + rows, :]  # a view: the shard paths keep working, memory once
        r0 += rows
    return PreparedWeight(
        spec=p0.spec, out_features=sum(pw.out_features for pw in pws), in_features=p0.in_features, layout=p0.layout,
        plan=p0.plan, words=words, table=table, SU=p0.SU, SV=torch.cat([pw.SV for pw in pws]),
        blocks_in=p0.blocks_in, blocks_out=p0.blocks_out, shard_out=tuple(pw.out_features for pw in pws),
    )


def fused_is_current(fused: PreparedWeight, pws: list[PreparedWeight]) -> bool:
    """Whether ``fused`` still holds these shards' words: a shard re-prepared after an in-place weight
    update (the cache above notices) has fresh words of its own, and the stacked copy is stale."""
    ptr = fused.words.untyped_storage().data_ptr()
    return tuple(pw.out_features for pw in pws) == fused.shard_out and all(
        pw.words.untyped_storage().data_ptr() == ptr for pw in pws)
