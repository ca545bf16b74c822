"""Exl3LinearMethod in each vLLM linear layer type (TP=1): build, load EXL3 tensors, process, forward."""

from __future__ import annotations

import json

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

from qtip_triton.bitstream import get_layout  # noqa: E402
from qtip_triton.formats import exl3 as fmt  # noqa: E402
from qtip_triton.spec import TrellisSpec  # noqa: E402
from qtip_triton.vllm.exl3 import Exl3Config, Exl3LinearMethod  # noqa: E402
from qtip_triton.weight import QuantizedWeight  # noqa: E402
from tests.vllm.harness import rel  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_dist")]

P = "model.layers.0."
# kind -> (constructor, shard ids, per shard (module key, out rows, K, code)); in_features 128 except row (256)
LAYERS = {
    "replicated": (lambda qc, bias, dt: ReplicatedLinear(128, 256, bias=bias, params_dtype=dt, quant_config=qc,
                                                         prefix=P + "mlp.fc"),
                   [None], [(P + "mlp.fc", 256, 2, "mcg")]),
    "column": (lambda qc, bias, dt: ColumnParallelLinear(128, 256, bias=bias, params_dtype=dt, quant_config=qc,
                                                         prefix=P + "self_attn.q_proj"),
               [None], [(P + "self_attn.q_proj", 256, 3, "mul1")]),
    "row": (lambda qc, bias, dt: RowParallelLinear(256, 128, bias=bias, params_dtype=dt, quant_config=qc,
                                                   prefix=P + "mlp.down_proj"),
            [None], [(P + "mlp.down_proj", 128, 4, "3inst")]),
    "qkv": (lambda qc, bias, dt: QKVParallelLinear(128, 64, 4, 2, bias=bias, params_dtype=dt, quant_config=qc,
                                                   prefix=P + "self_attn.qkv_proj"),
            ["q", "k", "v"], [(P + "self_attn.q_proj", 256, 2, "mcg"), (P + "self_attn.k_proj", 128, 5, "mul1"),
                              (P + "self_attn.v_proj", 128, 3, "3inst")]),
    "merged": (lambda qc, bias, dt: MergedColumnParallelLinear(128, [256, 256], bias=bias, params_dtype=dt,
                                                               quant_config=qc, prefix=P + "mlp.gate_up_proj"),
               [0, 1], [(P + "mlp.gate_proj", 256, 6, "mul1"), (P + "mlp.up_proj", 256, 2, "mcg")]),
}


def random_module(gen, m, n, K, code):
    spec = TrellisSpec(16, K, 1, code)
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, 8 * K), generator=gen, dtype=torch.int64)
    qw = QuantizedWeight(spec, m, n, get_layout("exl3").pack(words, spec),
                         torch.randn(n, generator=gen).half().float(),
                         (torch.randn(m, generator=gen) / (4 * n**0.5)).half().float(), layout="exl3", had_block=128)
    return qw, fmt.to_tensors(qw)


def storage_for(kinds):
    out = {}
    for kind in kinds:
        for key, _, K, code in LAYERS[kind][2]:
            entry = {"quant_format": "exl3", "bits_per_weight": K}
            if code in fmt.CODE_MARKERS:
                entry[f"{code}_multiplier"] = fmt.CODE_MARKERS[code]
            out[key] = entry
    return out


def build(kind, gen, dtype=torch.float32, bias=True, storage=None):
    ctor, sids, parts = LAYERS[kind]
    qc = Exl3Config({"quant_method": "exl3", "bits": 3.0}, storage or storage_for([kind]))
    layer = ctor(qc, bias, dtype)
    n = 256 if kind == "row" else 128
    shards = [random_module(gen, m, n, K, code) for _, m, K, code in parts]
    biases = [torch.randn(qw.out_features, generator=gen) for qw, _ in shards] if bias else None
    return layer, sids, shards, biases


def load(layer, shard_ids, shards, biases=None, drop=()):
    params = dict(layer.named_parameters())
    for i, (sid, (_, tensors)) in enumerate(zip(shard_ids, shards, strict=True)):
        for name, t in tensors.items():
            if (i, name) in drop:
                continue
            p = params[name]
            p.weight_loader(p, t) if sid is None else p.weight_loader(p, t, sid)
        if biases is not None:
            b = layer.bias
            b.weight_loader(b, biases[i]) if sid is None else b.weight_loader(b, biases[i], sid)


def reference(shards, biases, x):
    ys = [qw.reference_forward(x.double()) for qw, _ in shards]
    if biases is not None:
        ys = [y + b.double() for y, b in zip(ys, biases, strict=True)]
    return torch.cat(ys, -1)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_matches_dense_reference(kind, gen):
    layer, sids, shards, biases = build(kind, gen)
    assert isinstance(layer.quant_method, Exl3LinearMethod)
    load(layer, sids, shards, biases)
    layer.quant_method.process_weights_after_loading(layer)
    assert [qw.spec for qw in layer.exl3_shards] == [qw.spec for qw, _ in shards]
    assert layer.trellis.numel() == sum(qw.trellis.numel() for qw, _ in shards)  # no K padding kept
    x = torch.randn(5, layer.input_size, generator=gen)
    y, _ = layer(x)
    assert rel(y, reference(shards, biases, x)) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_through_the_kernels(dtype, tol, gen):
    """Mixed K and codes in one fused layer, 16-bit activations: the generated kernels' path."""
    layer, sids, shards, biases = build("qkv", gen, dtype)
    load(layer, sids, shards, biases)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 128, generator=gen)
    y, _ = layer(x.to(dtype))
    assert y.dtype == dtype and rel(y, reference(shards, biases, x)) < tol


def test_legacy_packed_signs(gen):
    layer, sids, shards, _ = build("merged", gen, bias=False)
    for qw, tensors in shards:
        signs_u = torch.where(torch.rand(128, generator=gen) < 0.5, -1.0, 1.0)
        signs_v = torch.where(torch.rand(qw.out_features, generator=gen) < 0.5, -1.0, 1.0)
        del tensors["suh"], tensors["svh"]
        tensors["su"], tensors["sv"] = fmt.pack_signs(signs_u), fmt.pack_signs(signs_v)
        qw.SU, qw.SV = signs_u, signs_v
    load(layer, sids, shards)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(2, 128, generator=gen)
    assert rel(layer(x)[0], reference(shards, None, x)) < 1e-5


def test_dummy_fill_gives_sane_outputs(gen):
    layer, *_ = build("qkv", gen, bias=False)
    layer.exl3_load_format = "dummy"
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(16, 128, generator=gen)
    y, _ = layer(x)
    ratio = float(y.pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
    assert torch.isfinite(y).all() and 0.2 < ratio < 5.0


def test_unloaded_layer_outside_dummy_is_an_error(gen):
    layer, *_ = build("column", gen)
    layer.exl3_load_format = "safetensors"
    with pytest.raises(ValueError, match="no EXL3 tensors were loaded"):
        layer.quant_method.process_weights_after_loading(layer)


def test_missing_tensors(gen):
    layer, sids, shards, biases = build("qkv", gen)
    load(layer, sids, shards, biases, drop={(1, "suh"), (0, "mcg")})
    with pytest.raises(ValueError, match=r"lacks tensors: .*q_proj\.mcg .*says codebook mcg.*k_proj\.suh"):
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    "shard,name,bad,match",
    [
        (1, "trellis", lambda t: t[..., :48], r"k_proj\.trellis has shape \(8, 8, 48\), but .* says K=5"),
        (0, "trellis", lambda t: t.to(torch.int32), r"q_proj\.trellis must be a 3-D int16 EXL3 trellis"),
        (2, "svh", lambda t: t[:64], r"v_proj\.svh must be a floating-point vector of shape \(128,\)"),
        (0, "suh", lambda t: t.to(torch.int64), r"q_proj\.suh must be a floating-point vector"),
        (1, "mul1", lambda t: torch.tensor(7, dtype=torch.int32), r"k_proj\.mul1 holds multiplier 0x00000007"),
    ],
)
def test_malformed_tensor(gen, shard, name, bad, match):
    layer, sids, shards, _ = build("qkv", gen, bias=False)
    shards[shard][1][name] = bad(shards[shard][1][name])
    with pytest.raises(ValueError, match=match):
        load(layer, sids, shards)


def test_marker_disagreeing_with_storage(gen):
    layer, sids, shards, _ = build("qkv", gen, bias=False)
    shards[2][1]["mcg"] = shards[0][1]["mcg"]  # v is 3inst per tensor_storage
    with pytest.raises(ValueError, match=r"v_proj\.mcg marks the mcg codebook, but .* says 3inst"):
        load(layer, sids, shards)


def test_layer_level_errors():
    # dims that are not 128-multiples are served padded at TP=1 (tests/vllm/test_exl3_padding.py)
    partial = {P + "self_attn.q_proj": {"quant_format": "exl3", "bits_per_weight": 2}}
    with pytest.raises(ValueError, match=r"only some are EXL3-quantized .*k_proj=plain"):
        QKVParallelLinear(128, 64, 4, 2, quant_config=Exl3Config(None, partial), prefix=P + "self_attn.qkv_proj")
    plain = ColumnParallelLinear(128, 256, quant_config=Exl3Config(None, partial), prefix=P + "mlp.up_proj")
    assert isinstance(plain.quant_method, UnquantizedLinearMethod)
    with pytest.raises(ValueError, match="no quantization_config.json with tensor_storage"):
        ColumnParallelLinear(128, 256, quant_config=Exl3Config(), prefix=P + "mlp.up_proj")


@pytest.mark.parametrize(
    "entry,match",
    [
        ({"quant_format": "exl3", "bits_per_weight": 9}, "bits_per_weight=9"),
        ({"quant_format": "exl3", "bits_per_weight": 2, "mcg_multiplier": 5}, "mcg_multiplier=0x5"),
        ({"quant_format": "exl3", "bits_per_weight": 2, "mcg_multiplier": fmt.MCG_MULT,
          "mul1_multiplier": fmt.MUL1_MULT}, "both codebooks"),
    ],
)
def test_storage_errors(entry, match):
    with pytest.raises(ValueError, match=match):
        Exl3Config(None, {"x": entry})


def test_config_reads_quantization_config_json(tmp_path):
    storage = storage_for(["qkv"])
    (tmp_path / "quantization_config.json").write_text(json.dumps({"quant_method": "exl3",
                                                                    "tensor_storage": storage}))
    qc = Exl3Config.from_config({"quant_method": "exl3", "bits": 3.3})
    assert qc.tensor_storage is None
    qc.maybe_update_config(str(tmp_path))
    assert qc.specs()[P + "self_attn.k_proj"] == TrellisSpec(16, 5, 1, "mul1")
    assert qc.get_name() == "exl3"


def test_lm_head(gen):
    """A quantized lm_head loads whole and runs; tied to the embedding it is the plain embedding matrix."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    from qtip_triton.vllm.exl3 import Exl3LMHeadMethod

    storage = {"lm_head": {"quant_format": "exl3", "bits_per_weight": 4, "mul1_multiplier": fmt.MUL1_MULT}}
    qc = Exl3Config(None, storage)
    head = ParallelLMHead(256, 128, quant_config=qc, prefix="lm_head")
    assert isinstance(head.quant_method, Exl3LMHeadMethod)
    qw, tensors = random_module(gen, 256, 128, 4, "mul1")
    params = dict(head.named_parameters())
    for name, t in tensors.items():
        params[name].weight_loader(params[name], t)
    head.quant_method.process_weights_after_loading(head)
    x = torch.randn(3, 128, generator=gen)
    assert rel(head.quant_method.apply(head, x), qw.reference_forward(x.double())) < 1e-5

    tied = ParallelLMHead(256, 128, quant_config=qc, prefix="lm_head")
    embed = VocabParallelEmbedding(256, 128)
    embed.weight.data.normal_(generator=gen)
    tied = tied.tie_weights(embed)
    tied.quant_method.process_weights_after_loading(tied)
    assert torch.allclose(tied.quant_method.apply(tied, x), x @ embed.weight.t())
    plain = ParallelLMHead(256, 128, quant_config=Exl3Config(None, {}), prefix="lm_head")
    assert not isinstance(plain.quant_method, Exl3LMHeadMethod)
