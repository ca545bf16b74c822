"""The qtip_triton::qtip_linear custom op: math vs float64 references, fusion, registry, tracing."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import TrellisSpec, dispatch, ops
from qtip_triton.ops import PackedShards, qtip_linear
from tests.test_weight import random_qweight

HYB = {k: TrellisSpec(16, k, 2, "hyb", 9) for k in (2, 3, 4)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fused_reference(qws, x, bias=None):
    y = torch.cat([qw.reference_forward(x.double()) for qw in qws], dim=-1)
    return y if bias is None else y + bias.double()


def small_shards(gen):
    """q/k/v-like shards with different K, rcp and transform blocks (n = 64)."""
    return [
        random_qweight(gen, HYB[2], 64, 64),
        random_qweight(gen, HYB[3], 32, 64, rcp=2, tp_rank=1),
        random_qweight(gen, HYB[4], 64, 64, rcp=2, tp_rank=2),
    ]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_single_shard_matches_reference(gen, dtype, tol):
    qw = random_qweight(gen, HYB[2], 96, 64)
    packed = PackedShards.from_qweights([qw])
    x = torch.randn(5, 64, generator=gen)
    bias = torch.randn(96, generator=gen)
    y = qtip_linear(x.to(dtype), packed, bias.to(dtype))
    assert y.dtype == dtype and y.shape == (5, 96)
    assert rel(y, fused_reference([qw], x, bias)) < tol


def test_fused_shards_keep_their_own_tensors(gen):
    qws = small_shards(gen)
    packed = PackedShards.from_qweights(qws, key="t.fused")
    x = torch.randn(3, 2, 64, generator=gen)  # leading batch dims pass through
    bias = torch.randn(160, generator=gen)
    y = qtip_linear(x, packed, bias)
    assert y.shape == (3, 2, 160)
    assert rel(y, fused_reference(qws, x, bias)) < 1e-5
    # the dense meaning of the fused layer is the shards' W_eff stacked
    w = packed.dequantize(torch.float64)
    assert rel(x.double() @ w.t() + bias.double(), fused_reference(qws, x, bias)) < 1e-12
    # swapping two shards' SU must change the result (each shard really uses its own SU)
    swapped = PackedShards.from_qweights(qws)
    swapped.SU = swapped.SU[[1, 0, 2]].contiguous()
    assert rel(qtip_linear(x, swapped), fused_reference(qws, x)) > 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_fused_shards_write_their_columns_in_place(gen, dtype, tol):
    """16-bit activations take the kernels: each shard's output transform writes into its columns of
    one output (``out=``), with leading batch dims and bias, and no column is left unwritten."""
    qws = small_shards(gen)
    packed = PackedShards.from_qweights(qws, key="t.inplace")
    x = torch.randn(3, 2, 64, generator=gen)
    bias = torch.randn(160, generator=gen)
    y = qtip_linear(x.to(dtype), packed, bias.to(dtype))
    assert y.shape == (3, 2, 160) and y.dtype == dtype
    assert rel(y, fused_reference(qws, x, bias)) < tol


@pytest.mark.parametrize("M", [1, 3, 40])
def test_shards_of_one_spec_share_one_input_transform(gen, monkeypatch, M):
    """Same-spec shards (q/k/v of a 2-bit layer) take one grouped input transform when the registry gives
    them one kernel kind; each still uses its own SU (swapping two shards' SU changes the result)."""
    from qtip_triton import kernels

    qws = [random_qweight(gen, HYB[2], m, 64) for m in (64, 32, 32)]
    packed = PackedShards.from_qweights(qws, key="t.shared")
    calls = []
    real = kernels.launch_shards
    monkeypatch.setattr(kernels, "launch_shards", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    x = torch.randn(M, 64, generator=gen)
    bias = torch.randn(128, generator=gen)
    y = qtip_linear(x.half(), packed, bias.half())
    assert calls, "the grouped input transform was not used"
    assert rel(y, fused_reference(qws, x, bias)) < 3e-3
    swapped = PackedShards.from_qweights(qws, key="t.shared2")
    swapped.SU = swapped.SU[[1, 0, 2]].contiguous()
    assert rel(qtip_linear(x.half(), swapped), fused_reference(qws, x)) > 1e-2
    monkeypatch.setenv(dispatch.NO_SHARED_INPUT_ENV, "1")
    calls.clear()
    y2 = qtip_linear(x.half(), packed, bias.half())
    assert not calls and rel(y2, y) < 1e-3


@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_equal_shards_share_one_output_transform(gen, monkeypatch, M, dtype, tol):
    """Equal-shaped shards (Llama-2's q/k/v) also take ONE output-transform launch: every shard's partials in
    one buffer, each scaled by its own SV into its columns (swapping two shards' SV changes the result)."""
    from qtip_triton.kernels import hadamard as had

    qws = [random_qweight(gen, HYB[2], 64, 64) for _ in range(3)]
    packed = PackedShards.from_qweights(qws, key="t.out3")
    shapes = []
    real = had.transform
    monkeypatch.setattr(had, "transform", lambda x, *a, **k: shapes.append(x.dim()) or real(x, *a, **k))
    x = torch.randn(M, 64, generator=gen)
    bias = torch.randn(192, generator=gen)
    y = qtip_linear(x.to(dtype), packed, bias.to(dtype))
    # one grouped input call, one grouped (4-D) output call; n = 64 is a Sylvester-only block, which each
    # grouped call runs as one launch per group (the 3-D calls)
    assert shapes == [2, 3, 3, 3, 4, 3, 3, 3], shapes
    assert rel(y, fused_reference(qws, x, bias)) < tol
    swapped = PackedShards.from_qweights(qws, key="t.out3b")
    swapped.SV = swapped.SV.view(3, 64)[[1, 0, 2]].reshape(-1).contiguous()
    assert rel(qtip_linear(x.to(dtype), swapped), fused_reference(qws, x)) > 1e-2


@pytest.mark.parametrize("M", [1, 6, 40])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_equal_shards_decode_in_one_launch(gen, monkeypatch, M, dtype, tol):
    """Equal shards with one code table: their words are stacked once at registration (the shards keep
    views of it: no second copy) and the layer runs as grouped input transform + ONE decode launch +
    grouped output transform, each shard with its own SU and SV."""
    from qtip_triton import kernels

    qws = [random_qweight(gen, HYB[2], 128, 64) for _ in range(3)]
    for qw in qws[1:]:
        qw.table = qws[0].table
    packed = PackedShards.from_qweights(qws, key="t.fused3")
    packed.register()
    fused = packed._fused
    assert fused is not None and fused.out_features == 384
    assert all(kernels.prepare(q).words.untyped_storage().data_ptr() == fused.words.untyped_storage().data_ptr()
               for q in packed.shards())
    launched = []
    real = kernels.decode_matmul
    monkeypatch.setattr(kernels, "decode_matmul", lambda kind, pw, h, *a, **k: launched.append(
        (pw.out_features, h.dim())) or real(kind, pw, h, *a, **k))
    x = torch.randn(M, 64, generator=gen)
    bias = torch.randn(384, generator=gen)
    y = qtip_linear(x.to(dtype), packed, bias.to(dtype))
    if M < 40:  # gemv/gemm sizes: one decode of the stacked words with per-shard h
        assert launched == [(384, 3)], launched
    assert rel(y, fused_reference(qws, x, bias)) < tol
    # swapped SU rows (inputs) or SV rows (outputs) must change the result: each shard keeps its own
    for attr, shape in (("SU", (3, 64)), ("SV", (3, 128))):
        twin = PackedShards.from_qweights(qws, key=f"t.fused3{attr}")
        setattr(twin, attr, getattr(twin, attr).reshape(shape)[[1, 0, 2]].reshape(getattr(twin, attr).shape).contiguous())
        twin.register()
        assert rel(qtip_linear(x.to(dtype), twin), fused_reference(qws, x)) > 1e-2
    # an in-place weight update re-prepares that shard: the stacked words are stale and are not used
    launched.clear()
    packed.shards()[1].trellis.add_(0)  # same values, new version: the cache re-prepares shard 1, fresh words
    assert not kernels.fused_is_current(fused, [kernels.prepare(q) for q in packed.shards()])
    y3 = qtip_linear(x.to(dtype), packed, bias.to(dtype))
    assert (384, 3) not in launched and rel(y3, fused_reference(qws, x, bias)) < tol
    # each shard its own code table (QTIP's tlut per linear): still one decode launch, the tables stacked and
    # each shard's row blocks reading their own (swapping two tables must change the result)
    other = [random_qweight(gen, HYB[2], 128, 64) for _ in range(2)]
    assert not torch.equal(other[0].table, other[1].table)
    p2 = PackedShards.from_qweights(other, key="t.twotables")
    p2.register()
    assert p2._fused is not None and p2._fused.table.shape[0] == 2 and p2._fused.table.dim() == 2
    launched.clear()
    y2 = qtip_linear(x.to(dtype), p2)
    if M < 40:
        assert launched == [(256, 3)], launched
    assert rel(y2, fused_reference(other, x)) < tol
    other[0].table, other[1].table = other[1].table, other[0].table
    assert rel(y2, fused_reference(other, x)) > 1e-2


@pytest.mark.parametrize("M", [1, 6])
def test_unequal_shards_decode_in_one_launch(gen, monkeypatch, M):
    """Llama-3-like q/k/v (out 128, 64, 64): one decode launch over the stacked words (the row blocks of
    each shard read its own h), then one output transform per shard over its columns of the partials."""
    from qtip_triton import kernels

    qws = [random_qweight(gen, HYB[2], m, 64) for m in (128, 64, 64)]  # each with its own code table
    packed = PackedShards.from_qweights(qws, key="t.unequal")
    packed.register()
    assert packed._fused is not None and packed._fused.shard_out == (128, 64, 64)
    launched = []
    real = kernels.decode_matmul
    monkeypatch.setattr(kernels, "decode_matmul", lambda kind, pw, h, *a, **k: launched.append(
        (pw.out_features, h.dim())) or real(kind, pw, h, *a, **k))
    outputs = []
    real_t = kernels.hadamard.transform
    monkeypatch.setattr(kernels.hadamard, "transform", lambda x, *a, **k: (
        outputs.append(x.dim()) if not k.get("transpose", True) else None) or real_t(x, *a, **k))
    x = torch.randn(M, 64, generator=gen)
    y = qtip_linear(x.half(), packed)
    kind, cfg = dispatch._select_shape(qws[0].spec, 256, 64, M)
    fits = kernels.shard_blocks_ok(packed._fused, (128, 64, 64), cfg)  # M=6's gemm rows (64) straddle k|v
    assert (launched == [(256, 3)]) == fits, (launched, cfg)
    if fits:  # q's output transform alone, then k and v as one grouped call (their partials as (2, S, T, 64);
        # blocks of 64 have no A, so that call then runs one Sylvester launch per group: the two 3-D calls after)
        assert outputs == [3, 4, 3, 3], outputs
    assert rel(y, fused_reference(qws, x)) < 3e-3
    twin = PackedShards.from_qweights(qws, key="t.unequal2")
    twin.SU = twin.SU[[0, 2, 1]].contiguous()  # k and v swap their input signs: must change v's and k's output
    twin.register()
    assert rel(qtip_linear(x.half(), twin), fused_reference(qws, x)) > 1e-2


def test_fused_decode_refuses_straddling_blocks(gen):
    from qtip_triton import kernels

    qws = [random_qweight(gen, HYB[2], 32, 64) for _ in range(2)]
    for qw in qws[1:]:
        qw.table = qws[0].table
    fused = kernels.fuse_shards([kernels.prepare(q) for q in qws])
    assert fused is not None
    assert kernels.shard_blocks_ok(fused, (32, 32), {"BLOCK_N": 32, "BLOCK_K": 64})
    assert not kernels.shard_blocks_ok(fused, (32, 32), {"BLOCK_N": 64, "BLOCK_K": 64})
    assert not kernels.shard_blocks_ok(fused, (48, 16), {"BLOCK_N": 32, "BLOCK_K": 64})
    # the dispatch's one question, per kind: gemv/gemm by their row blocks, wgmma needs a Hopper GPU, others never
    assert kernels.fused_decode_ok("gemm", fused, {"BLOCK_N": 32, "BLOCK_K": 64}, 8)
    assert not kernels.fused_decode_ok("gemv", fused, {"BLOCK_N": 64, "BLOCK_K": 64}, 1)
    assert not kernels.fused_decode_ok("wgmma", fused, {"E": 2, "BLOCK_M": 16, "num_warps": 4, "STAGES": 3}, 64)
    assert not kernels.fused_decode_ok("decompress", fused, {"BLOCK_N": 32, "BLOCK_K": 64}, 600)
    h = torch.zeros(2, 1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not split into row blocks"):
        kernels.decode_matmul("gemv", fused, h, {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 64}, h_order="kernel")


def test_linear_out_argument(gen):
    qw = small_shards(gen)[0]
    x = torch.randn(4, 64, generator=gen).half()
    wide = torch.zeros(4, 100, dtype=torch.float16)
    y = dispatch.linear(x, qw, out=wide[:, 10:74])
    assert rel(wide[:, 10:74], y) == 0 and (wide[:, :10] == 0).all() and (wide[:, 74:] == 0).all()
    assert rel(y, qw.reference_forward(x.double())) < 3e-3
    ref_out = torch.zeros(4, 64, dtype=torch.float16)
    dispatch.linear(x, qw, kind="reference", out=ref_out)  # the reference path copies into out
    assert rel(ref_out, qw.reference_forward(x.double())) < 3e-3
    for bad in (torch.zeros(4, 63, dtype=torch.float16), torch.zeros(4, 64), torch.zeros(64, 4, dtype=torch.float16).t()):
        with pytest.raises(ValueError, match="out must be"):
            dispatch.linear(x, qw, out=bad)


def test_registered_shards_are_reused(gen, monkeypatch):
    qws = small_shards(gen)
    packed = PackedShards.from_qweights(qws, key="t.registered")
    packed.register()
    seen: list[int] = []
    real = dispatch.linear

    def spy(x, qw, bias=None, **kw):
        seen.append(id(qw))
        return real(x, qw, bias, **kw)

    monkeypatch.setattr(dispatch, "linear", spy)
    x = torch.randn(4, 64, generator=gen)
    y1 = qtip_linear(x, packed)
    y2 = qtip_linear(x, packed)
    assert seen[:3] == seen[3:] == [id(q) for q in packed.shards()]
    assert torch.equal(y1, y2)
    # an unregistered twin (same values, other storage) gives the same numbers through the fallback
    twin = PackedShards.from_qweights(qws, key="t.registered")
    seen.clear()
    assert torch.equal(qtip_linear(x, twin), y1)
    assert not set(seen) & {id(q) for q in packed.shards()}


def test_registered_shards_need_all_their_tensors(gen, monkeypatch):
    """The same trellis with another SU is another layer: the op must not serve it the registered shards."""
    qws = small_shards(gen)
    packed = PackedShards.from_qweights(qws, key="t.alltensors")
    packed.register()
    tensors, meta = ops.op_args(packed)
    x = torch.randn(3, 64, generator=gen)
    flipped = -packed.SU  # other storage, other values
    seen: list[int] = []
    real = dispatch.linear_shards

    def spy(x, shards, *args, **kw):
        seen.extend(id(q) for q in shards)
        return real(x, shards, *args, **kw)

    monkeypatch.setattr(dispatch, "linear_shards", spy)
    y = torch.ops.qtip_triton.qtip_linear(x, tensors[0], flipped, *tensors[2:], None, *meta)
    assert not set(seen) & {id(q) for q in packed.shards()}
    other = PackedShards.from_qweights(qws, key="t.alltensors.other")
    other.SU = flipped
    assert rel(y, torch.cat([q.reference_forward(x.double()) for q in other.shards()], dim=-1)) < 1e-5
    assert rel(y, qtip_linear(x, packed)) > 0.1  # the registered layer itself still gives its own numbers


def test_same_shaped_layers_trace_to_one_graph(gen):
    """Two layers of one shape (other weights, other names) must trace to the same graph: vLLM compiles each
    distinct piece of its piecewise graph, so a per-layer constant in the op's arguments compiles every layer."""
    torch._dynamo.reset()

    class Layer(torch.nn.Module):  # as the vLLM methods hold a layer: its packed tensors as parameters
        def __init__(self, packed: PackedShards):
            super().__init__()
            tensors, self.meta = ops.op_args(packed)
            for name, t in zip(("trellis", "SU", "SV", "table"), tensors, strict=True):
                self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
            self.packed = packed

        def forward(self, x):
            y = torch.ops.qtip_triton.qtip_linear(x, self.trellis, self.SU, self.SV, self.table, None, *self.meta)
            return torch.nn.functional.silu(y)

    codes: list[str] = []

    def record(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    layers = []
    for name in ("model.layers.0.qkv", "model.layers.1.qkv"):
        qws = [random_qweight(gen, HYB[2], 64, 64) for _ in range(2)]
        packed = PackedShards.from_qweights(qws, key=name)
        packed.register()
        layers.append((Layer(packed), qws))
    x = torch.randn(4, 64, generator=gen)
    for layer, qws in layers:
        torch._dynamo.reset()  # trace each layer afresh (else Dynamo reuses the first graph where it can)
        y = torch.compile(layer, backend=record, fullgraph=True)(x)
        assert rel(y, torch.nn.functional.silu(fused_reference(qws, x))) < 1e-5
    assert len(codes) == 2 and codes[0] == codes[1]


def test_register_validates_once(gen):
    qw = random_qweight(gen, HYB[2], 64, 64)
    packed = PackedShards.from_qweights([qw])
    packed.SV = torch.full_like(packed.SV, float("nan"))
    with pytest.raises(ValueError, match="SV holds NaN"):
        packed.register()


def test_bad_arguments(gen):
    a = random_qweight(gen, HYB[2], 64, 64)
    b = random_qweight(gen, HYB[2], 64, 32)
    with pytest.raises(ValueError, match="shards share x"):
        PackedShards.from_qweights([a, b])
    with pytest.raises(TypeError, match="QuantizedWeight"):
        PackedShards.from_qweights([a.trellis])
    packed = PackedShards.from_qweights([a])
    with pytest.raises(ValueError, match="x has 32 features, the layer expects 64"):
        qtip_linear(torch.randn(2, 32), packed)
    tensors, meta = ops.op_args(packed)
    bad_meta = (meta[0], [96], *meta[2:])
    with pytest.raises(ValueError, match="do not match the metadata"):
        torch.ops.qtip_triton.qtip_linear(torch.randn(2, 64), *tensors, None, *bad_meta)


def test_register_op_is_idempotent():
    ops.register_op()
    ops.register_op()
    assert hasattr(torch.ops.qtip_triton, "qtip_linear")


def test_opcheck(gen):
    qws = small_shards(gen)
    packed = PackedShards.from_qweights(qws)
    tensors, meta = ops.op_args(packed)
    for x, bias in ((torch.randn(3, 64, generator=gen), torch.randn(160, generator=gen)),
                    (torch.randn(1, 64, generator=gen).half(), None)):
        torch.library.opcheck(torch.ops.qtip_triton.qtip_linear.default, (x, *tensors, bias, *meta))


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    qws = small_shards(gen)
    packed = PackedShards.from_qweights(qws, key="t.compiled")
    packed.register()
    bias = torch.randn(160, generator=gen)

    def f(x):
        return torch.nn.functional.silu(qtip_linear(x * 2.0, packed, bias)) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for tokens in (1, 5):
        x = torch.randn(tokens, 64, generator=gen)
        assert rel(compiled(x), f(x)) < 1e-6


def test_package_works_without_vllm(tmp_path):
    """qtip_triton (ops, checkpoint writer, the plugin module) imports and runs where vLLM is absent."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['vllm'] = None\n"  # any 'import vllm' now raises ImportError
        "import torch, qtip_triton, qtip_triton.vllm, qtip_triton.checkpoint\n"
        "from qtip_triton.ops import PackedShards, qtip_linear\n"
        "from tests.test_weight import random_qweight\n"
        "g = torch.Generator().manual_seed(0)\n"
        "qw = random_qweight(g, qtip_triton.TrellisSpec(16, 2, 2, 'hyb', 9), 64, 64)\n"
        "y = qtip_linear(torch.randn(2, 64), PackedShards.from_qweights([qw]))\n"
        "assert y.shape == (2, 64) and 'vllm' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
        "try:\n    qtip_triton.vllm.register()\nexcept ImportError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_registry_forgets_dead_layers(gen):
    import gc

    qw = random_qweight(gen, HYB[2], 64, 64)
    packed = PackedShards.from_qweights([qw], key="t.dead")
    packed.register()
    key = ops._pointers(packed.trellis, packed.SU, packed.SV, packed.table)
    assert key in ops._REGISTRY
    del packed
    gc.collect()
    assert key not in ops._REGISTRY


def exl3_shards(gen):
    """EXL3-like fused shards: 128-wide block Hadamards, per-shard K and code, one input."""
    from qtip_triton.bitstream import get_layout
    from qtip_triton.weight import QuantizedWeight

    shards = []
    for K, code, m in ((2, "mcg", 256), (5, "mul1", 128)):
        spec = TrellisSpec(16, K, 1, code)
        words = torch.randint(0, 1 << 32, (m // 16, 256 // 16, spec.words_per_tile), generator=gen, dtype=torch.int64)
        trellis = get_layout("exl3").pack(words, spec)
        shards.append(QuantizedWeight(spec, m, 256, trellis, torch.randn(256, generator=gen).half(),
                                      torch.randn(m, generator=gen).half(), None, layout="exl3", had_block=128))
    return shards


def test_fused_had_block_shards(gen):
    qws = exl3_shards(gen)
    packed = PackedShards.from_qweights(qws, key="t.exl3")
    assert packed.had_block == (128, 128)
    x = torch.randn(2, 256, generator=gen)
    assert rel(qtip_linear(x, packed), fused_reference(qws, x)) < 1e-5
    # dropping had_block from the op's metadata must change the math (the field really travels)
    tensors, meta = ops.op_args(packed)
    full_width = torch.ops.qtip_triton.qtip_linear(x, *tensors, None, *meta[:-1], [0, 0])
    assert rel(full_width, fused_reference(qws, x)) > 1e-2
    torch.library.opcheck(torch.ops.qtip_triton.qtip_linear.default, (x, *tensors, None, *meta))


def test_unequal_shards_group_their_equal_outputs(gen, monkeypatch):
    """Llama-3-like q/k/v whose blocks have an A factor (out 512, 256, 256): after the one fused decode, q's output
    transform runs alone and k and v share ONE grouped launch (each its own SV), matching float64."""
    from qtip_triton import kernels

    qws = [random_qweight(gen, HYB[2], m, 64) for m in (512, 256, 256)]
    packed = PackedShards.from_qweights(qws, key="t.runs")
    packed.register()
    calls = []
    real_t = kernels.hadamard.transform
    monkeypatch.setattr(kernels.hadamard, "transform", lambda x, *a, **k: (
        calls.append(x.dim()) if not k.get("transpose", True) else None) or real_t(x, *a, **k))
    launches = []
    real_k = kernels.hadamard._had2_kernel
    monkeypatch.setattr(kernels.hadamard, "_had2_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or real_k[grid]})())
    x = torch.randn(1, 64, generator=gen)
    y = qtip_linear(x.half(), packed)
    assert calls == [3, 4], calls
    # two output launches (in = 64 has no A: its input transform is the Sylvester kernel): q's, then k and v's
    assert [g[0] for g in launches] == [1, 2], launches
    assert rel(y, fused_reference(qws, x)) < 3e-3
