"""QTIPLinearMethod in each vLLM linear layer type (TP=1): build, load, process, forward vs W_eff."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.model_executor")

from vllm.model_executor.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from qtip_triton import TrellisSpec  # noqa: E402
from qtip_triton.vllm.config import QTIPConfig  # noqa: E402
from qtip_triton.vllm.linear_method import QTIPLinearMethod  # noqa: E402
from tests.test_weight import random_qweight  # noqa: E402
from tests.vllm.harness import rel  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_dist")]

SPECS = {k: TrellisSpec(16, k, 2, "hyb", 9) for k in (2, 3, 4)}
QP = {"codebook": "bitshift", "L": 16, "K": 2, "V": 2, "tlut_bits": 9, "decode_mode": "quantlut_sym",
      "td_x": 16, "td_y": 16, "K_v_proj": 3}
RENAME = {"rcp": "qtip_rcp", "tp_rank": "qtip_tp_rank"}

# kind -> (constructor, shard ids, per-shard (rows, K, rcp, tp_rank)); in_features is 64 except row (96)
LAYERS = {
    "replicated": (lambda qc, bias, dt: ReplicatedLinear(64, 96, bias=bias, params_dtype=dt, quant_config=qc,
                                                         prefix="model.layers.0.mlp.fc"),
                   [None], [(96, 2, 0, 1)]),
    "column": (lambda qc, bias, dt: ColumnParallelLinear(64, 96, bias=bias, params_dtype=dt, quant_config=qc,
                                                         prefix="model.layers.0.self_attn.q_proj"),
               [None], [(96, 2, 2, 3)]),
    "row": (lambda qc, bias, dt: RowParallelLinear(96, 64, bias=bias, params_dtype=dt, quant_config=qc,
                                                   prefix="model.layers.0.mlp.down_proj"),
            [None], [(64, 2, 1, 3)]),
    "qkv": (lambda qc, bias, dt: QKVParallelLinear(64, 32, 2, 1, bias=bias, params_dtype=dt, quant_config=qc,
                                                   prefix="model.layers.0.self_attn.qkv_proj"),
            ["q", "k", "v"], [(64, 2, 0, 8), (32, 2, 2, 1), (32, 3, 0, 1)]),
    "merged": (lambda qc, bias, dt: MergedColumnParallelLinear(64, [96, 96], bias=bias, params_dtype=dt,
                                                               quant_config=qc, prefix="model.layers.0.mlp.gate_up_proj"),
               [0, 1], [(96, 2, 2, 2), (96, 2, 0, 8)]),
}


def checkpoint_shards(gen, kind):
    """Per shard: (QuantizedWeight as the reference sees it, checkpoint tensors)."""
    n = 96 if kind == "row" else 64
    out = []
    for m, k, rcp, tp in LAYERS[kind][2]:
        qw = random_qweight(gen, SPECS[k], m, n, rcp=rcp, tp_rank=tp)
        qw.SU = qw.SU.half().float()  # relaxml stores SU in fp16: the reference uses the same values
        tensors = {"trellis": qw.trellis, "SU": qw.SU.half(), "SV": qw.SV, "tlut": qw.table,
                   "rcp": torch.tensor(rcp), "tp_rank": torch.tensor(tp)}
        out.append((qw, tensors))
    return out


def load(layer, shard_ids, shards, biases=None, drop=()):
    """What vLLM's model loader does per checkpoint tensor (names mapped like the config's mapper)."""
    params = dict(layer.named_parameters())
    for i, (sid, (_, tensors)) in enumerate(zip(shard_ids, shards, strict=True)):
        for name, t in tensors.items():
            if (i, name) in drop:
                continue
            p = params[RENAME.get(name, name)]
            p.weight_loader(p, t) if sid is None else p.weight_loader(p, t, sid)
        if biases is not None:
            b = layer.bias
            b.weight_loader(b, biases[i]) if sid is None else b.weight_loader(b, biases[i], sid)


def build(kind, gen, dtype=torch.float32, bias=True, qp=QP):
    ctor, sids, _ = LAYERS[kind]
    layer = ctor(QTIPConfig(qp), bias, dtype)
    shards = checkpoint_shards(gen, kind)
    biases = [torch.randn(qw.out_features, generator=gen) for qw, _ in shards] if bias else None
    return layer, sids, shards, biases


def reference(shards, biases, x):
    ys = [qw.reference_forward(x.double()) for qw, _ in shards]
    if biases is not None:
        ys = [y + b.double() for y, b in zip(ys, biases, strict=True)]
    return torch.cat(ys, -1)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_layer_matches_dense_reference(kind, dtype, tol, gen):
    layer, sids, shards, biases = build(kind, gen, dtype)
    assert isinstance(layer.quant_method, QTIPLinearMethod)
    load(layer, sids, shards, biases)
    layer.quant_method.process_weights_after_loading(layer)
    assert not hasattr(layer, "qtip_rcp") and not hasattr(layer, "qtip_tp_rank")  # read, then dropped
    x = torch.randn(5, layer.input_size, generator=gen)
    y, _ = layer(x.to(dtype))
    assert y.dtype == dtype
    assert rel(y, reference(shards, biases, x)) < tol
    # the layer's packed shards carry the checkpoint's rcp / tp_rank (TP=1: all blocks local)
    assert layer.qtip_packed.rcp == tuple(rcp for _, _, rcp, _ in LAYERS[kind][2])


def test_each_shard_keeps_its_own_su_and_table(gen):
    """Swapping q's and k's SU and tables in the checkpoint must change exactly those outputs."""
    layer, sids, shards, _ = build("qkv", gen, bias=False)
    (_, tq), (_, tk), _ = shards
    tq["SU"], tk["SU"] = tk["SU"], tq["SU"]
    tq["tlut"], tk["tlut"] = tk["tlut"], tq["tlut"]
    load(layer, sids, shards)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 64, generator=gen)
    y, _ = layer(x)
    ref = reference(shards, None, x)  # reference QuantizedWeights keep the un-swapped tensors
    assert rel(y[:, 96:], ref[:, 96:]) < 1e-5  # v untouched
    assert rel(y[:, :64], ref[:, :64]) > 1e-2 and rel(y[:, 64:96], ref[:, 64:96]) > 1e-2


def test_compile_fullgraph_through_layer(gen):
    torch._dynamo.reset()
    layer, sids, shards, biases = build("merged", gen)
    load(layer, sids, shards, biases)
    layer.quant_method.process_weights_after_loading(layer)

    def f(x):
        y, _ = layer(x)
        return torch.nn.functional.silu(y[:, :96]) * y[:, 96:]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for tokens in (1, 7):
        x = torch.randn(tokens, 64, generator=gen)
        assert rel(compiled(x), f(x)) < 1e-6


def test_dummy_fill_gives_sane_outputs(gen):
    """load_format='dummy': nothing loaded, process fills valid random weights that keep activations O(1)."""
    layer, *_ = build("qkv", gen, bias=False)
    layer.qtip_load_format = "dummy"  # what create_weights records under LLM(load_format="dummy")
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(16, 64, generator=gen)
    y, _ = layer(x)
    assert torch.isfinite(y).all()
    ratio = float(y.pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
    assert 0.2 < ratio < 5.0


def test_unloaded_layer_outside_dummy_is_an_error(gen):
    layer, *_ = build("column", gen)
    layer.qtip_load_format = "safetensors"
    with pytest.raises(ValueError, match="no QTIP tensors were loaded"):
        layer.quant_method.process_weights_after_loading(layer)


# ------------------------------------------------------------------------------------ malformed


def test_missing_tensor(gen):
    layer, sids, shards, biases = build("qkv", gen)
    load(layer, sids, shards, biases, drop={(1, "SU"), (2, "tlut")})
    with pytest.raises(ValueError, match=r"lacks tensors: .*k_proj\.SU.*v_proj\.tlut"):
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    "shard,name,bad,match",
    [
        (0, "trellis", lambda t: t[:-1], r"q_proj\.trellis has 15 tile rows, but a 64x64 matrix needs 16"),
        (1, "trellis", lambda t: torch.zeros(8, 48, dtype=torch.int16), r"k_proj\.trellis holds K=3 .* says K=2"),
        (2, "trellis", lambda t: torch.zeros(8, 32, dtype=torch.int16), r"v_proj\.trellis holds K=2 .* says K=3"),
        (0, "trellis", lambda t: t.to(torch.int32), "must be a 2-D int16 tensor"),
        (1, "SV", lambda t: t[:16], r"k_proj\.SV must have shape \(32,\)"),
        (0, "SU", lambda t: t.to(torch.int64), r"q_proj\.SU must be floating point"),
        (2, "tlut", lambda t: t[:256], r"v_proj\.tlut must be a floating-point table of shape \(512, 2\)"),
        (0, "rcp", lambda t: torch.zeros(2, dtype=torch.int64), r"q_proj\.rcp must be an integer scalar"),
    ],
)
def test_malformed_tensor(gen, shard, name, bad, match):
    layer, sids, shards, _ = build("qkv", gen, bias=False)
    shards[shard][1][name] = bad(shards[shard][1][name])
    with pytest.raises(ValueError, match=match):
        load(layer, sids, shards)


def test_bad_values_caught_at_processing(gen):
    layer, sids, shards, _ = build("column", gen, bias=False)
    shards[0][1]["SV"] = torch.full_like(shards[0][1]["SV"], float("inf"))
    load(layer, sids, shards)
    with pytest.raises(ValueError, match=r"q_proj: SV holds NaN or Inf"):
        layer.quant_method.process_weights_after_loading(layer)
    layer, sids, shards, _ = build("column", gen, bias=False)
    shards[0][1]["rcp"] = torch.tensor(5)
    load(layer, sids, shards)
    with pytest.raises(ValueError, match=r"q_proj\.rcp must be 0 \(none\), 1 \(row\) or 2 \(column\), got 5"):
        layer.quant_method.process_weights_after_loading(layer)


def test_fused_on_disk_is_refused(gen):
    layer, _, shards, _ = build("qkv", gen, bias=False)
    p = layer.SV
    with pytest.raises(ValueError, match="stores this fused layer as one tensor"):
        p.weight_loader(p, torch.cat([t["SV"] for _, t in shards]))


def test_layout_needs_multiples_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        ColumnParallelLinear(64, 48, quant_config=QTIPConfig(QP), prefix="model.layers.0.self_attn.q_proj")


# ------------------------------------------------------------------------------------ config


def test_skip_list():
    qc = QTIPConfig({**QP, "skip_list": ["0_q", "0_k", "0_v", "model.layers.1.mlp.down_proj"]})
    qkv = QKVParallelLinear(64, 32, 2, 1, bias=False, quant_config=qc, prefix="model.layers.0.self_attn.qkv_proj")
    assert isinstance(qkv.quant_method, UnquantizedLinearMethod)
    down = RowParallelLinear(96, 64, bias=False, quant_config=qc, prefix="model.layers.1.mlp.down_proj")
    assert isinstance(down.quant_method, UnquantizedLinearMethod)
    other = RowParallelLinear(96, 64, bias=False, quant_config=qc, prefix="model.layers.0.mlp.down_proj")
    assert isinstance(other.quant_method, QTIPLinearMethod)
    partial = QTIPConfig({**QP, "skip_list": ["0_q"]})
    with pytest.raises(ValueError, match="one fused layer cannot mix both"):
        QKVParallelLinear(64, 32, 2, 1, bias=False, quant_config=partial, prefix="model.layers.0.self_attn.qkv_proj")


@pytest.mark.parametrize(
    "update,match",
    [
        ({"decode_mode": "lut"}, "decode_mode 'lut' is unsupported"),
        ({"codebook": "e8p"}, "is not the bitshift trellis"),
        ({"td_x": 32}, "only 16x16 tiles"),
        ({"skip_list": "0_q"}, "skip_list must be a list"),
        ({"K": None}, ""),
    ],
)
def test_config_errors(update, match):
    qp = {**QP, **update}
    if update.get("K", 0) is None:
        qp.pop("K")
        match = "lacks 'K'"
    with pytest.raises(ValueError, match=match):
        QTIPConfig(qp)


def test_config_without_params_explains():
    qc = QTIPConfig()
    with pytest.raises(ValueError, match="neither 'quip_params' nor a 'quantization_config'"):
        ColumnParallelLinear(64, 64, quant_config=qc, prefix="model.layers.0.self_attn.q_proj")


def test_from_config_both_shapes():
    flat = QTIPConfig.from_config({"quant_method": "qtip", **QP})
    nested = QTIPConfig.from_config({"quant_method": "qtip", "quip_params": QP})
    assert flat.quip_params["K"] == nested.quip_params["K"] == 2
    assert flat.spec_for("v_proj") == SPECS[3] and flat.spec_for("q_proj") == SPECS[2]
    assert flat.get_name() == "qtip" and torch.float16 in flat.get_supported_act_dtypes()


def test_checkpoint_names_are_mapped():
    """rcp/tp_rank get renamed by both mappers (0.33 applies the checkpoint one, 0.26 only the cache-scale one)."""
    qc = QTIPConfig(QP)
    for mapper in (qc.get_checkpoint_weight_mapper(), qc.get_cache_scale_mapper()):
        assert mapper.map_name("model.layers.0.self_attn.q_proj.tp_rank") == "model.layers.0.self_attn.q_proj.qtip_tp_rank"
        assert mapper.map_name("model.layers.0.mlp.down_proj.rcp") == "model.layers.0.mlp.down_proj.qtip_rcp"
        assert mapper.map_name("model.layers.0.mlp.down_proj.trellis") == "model.layers.0.mlp.down_proj.trellis"
