"""EXL3 layers whose true (config.json) dims are not multiples of 128: stored padded, served at TP=1.

The checkpoint holds every module zero-padded to 128-multiples (each logical matrix of a fused layer
on its own, svh = 0 on padded outputs); vLLM allocates the layer at the true sizes. The method loads
the padded tensors by its own offsets, zero-pads x and slices each matrix's output back.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.model_executor")

from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from qtip_triton.bitstream import get_layout  # noqa: E402
from qtip_triton.formats import exl3 as fmt  # noqa: E402
from qtip_triton.spec import TrellisSpec  # noqa: E402
from qtip_triton.vllm.exl3 import Exl3Config, Exl3LinearMethod, padding_of  # noqa: E402
from qtip_triton.vllm.params import LayerGeometry  # noqa: E402
from qtip_triton.weight import QuantizedWeight  # noqa: E402
from tests.vllm.harness import build_model, hf_logits, logits, rel  # noqa: E402
from tests.vllm.test_exl3_model import dense_twin, random_exl3  # noqa: E402
from tests.vllm.tiny_llama import make_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_dist")]

P = "model.layers.0."
IDS = torch.tensor([1, 17, 33, 5, 99, 64, 2, 120, 8, 41, 77, 3])
# hidden 96 (3 heads of 32, 1 kv head), intermediate 200: nothing is a multiple of 128
SHAPE = dict(hidden_size=96, intermediate_size=200, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
             vocab_size=128, num_hidden_layers=2)


def up(n):
    return -(-n // 128) * 128


# kind -> (constructor, shard ids, per shard (module key, TRUE out rows, K, code), TRUE in features)
LAYERS = {
    "qkv": (lambda qc: QKVParallelLinear(96, 32, 3, 1, bias=True, quant_config=qc, prefix=P + "self_attn.qkv_proj"),
            ["q", "k", "v"], [(P + "self_attn.q_proj", 96, 2, "mcg"), (P + "self_attn.k_proj", 32, 5, "mul1"),
                              (P + "self_attn.v_proj", 32, 3, "3inst")], 96),
    "merged": (lambda qc: MergedColumnParallelLinear(96, [200, 200], bias=True, quant_config=qc,
                                                     prefix=P + "mlp.gate_up_proj"),
               [0, 1], [(P + "mlp.gate_proj", 200, 4, "mul1"), (P + "mlp.up_proj", 200, 2, "mcg")], 96),
    "row": (lambda qc: RowParallelLinear(200, 96, bias=True, quant_config=qc, prefix=P + "mlp.down_proj"),
            [None], [(P + "mlp.down_proj", 96, 3, "3inst")], 200),
    "replicated": (lambda qc: ReplicatedLinear(128, 192, bias=True, quant_config=qc, prefix=P + "mlp.fc"),
                   [None], [(P + "mlp.fc", 192, 2, "mcg")], 128),
}


def padded_module(gen, m, n, K, code):
    """A random EXL3 module stored at padded sizes (svh = 0 on padded outputs), as the converter writes it."""
    M, N = up(m), up(n)
    spec = TrellisSpec(16, K, 1, code)
    words = torch.randint(0, 1 << 32, (M // 16, N // 16, 8 * K), generator=gen, dtype=torch.int64)
    SV = (torch.randn(M, generator=gen) / (4 * N**0.5)).half().float()
    SV[m:] = 0.0
    qw = QuantizedWeight(spec, M, N, get_layout("exl3").pack(words, spec), torch.randn(N, generator=gen).half().float(),
                         SV, layout="exl3", had_block=128)
    return qw


def build(kind, gen, dtype=torch.float32):
    ctor, sids, parts, n = LAYERS[kind]
    storage = {}
    for key, _, K, code in parts:
        storage[key] = {"quant_format": "exl3", "bits_per_weight": K}
        if code in fmt.CODE_MARKERS:
            storage[key][f"{code}_multiplier"] = fmt.CODE_MARKERS[code]
    layer = ctor(Exl3Config({"quant_method": "exl3", "bits": 3.0}, storage))
    layer = layer.to(dtype) if dtype != torch.float32 else layer
    qws = [padded_module(gen, m, n, K, code) for _, m, K, code in parts]
    biases = [torch.randn(m, generator=gen) for _, m, _, _ in parts]
    params = dict(layer.named_parameters())
    for sid, qw, b, (_, m, _, _) in zip(sids, qws, biases, parts, strict=True):
        tensors = dict(fmt.to_tensors(qw), bias=torch.nn.functional.pad(b, (0, up(m) - m)))  # stored padded
        for name, t in tensors.items():
            p = params[name]
            p.weight_loader(p, t) if sid is None else p.weight_loader(p, t, sid)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, qws, biases, [m for _, m, _, _ in parts], n


def reference(qws, biases, true_out, n, x):
    xp = torch.nn.functional.pad(x.double(), (0, up(n) - n))
    return torch.cat([qw.reference_forward(xp)[:, :m] + b.double()
                      for qw, b, m in zip(qws, biases, true_out, strict=True)], -1)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_padded_layer_matches_dense_reference(kind, gen):
    layer, qws, biases, true_out, n = build(kind, gen)
    assert isinstance(layer.quant_method, Exl3LinearMethod)
    assert [qw.out_features for qw in layer.exl3_shards] == [up(m) for m in true_out]
    x = torch.randn(5, n, generator=gen)
    y, _ = layer(x)
    assert y.shape == (5, sum(true_out))
    assert rel(y, reference(qws, biases, true_out, n, x)) < 1e-5


def test_padded_qkv_half_precision_and_fullgraph_trace(gen):
    layer, qws, biases, true_out, n = build("qkv", gen, torch.float16)
    x = torch.randn(3, n, generator=gen)
    y, _ = layer(x.half())
    ref = reference(qws, biases, true_out, n, x)
    assert y.dtype == torch.float16 and rel(y, ref) < 3e-3
    compiled = torch.compile(lambda t: layer.quant_method.apply(layer, t, layer.bias), fullgraph=True, backend="eager")
    assert rel(compiled(x.half()), ref) < 3e-3


def test_tensor_parallel_split_of_padded_layer_is_an_error():
    spec = TrellisSpec(16, 2, 1, "mcg")
    geom = LayerGeometry(prefix=P + "mlp.gate_up_proj", names=("gate_proj", "up_proj"), specs=(spec, spec),
                         local_out=(100, 100), full_out=(200, 200), local_in=96, full_in=96, replicated=False)
    with pytest.raises(ValueError, match="tensor_parallel_size=1 only"):
        padding_of(geom)
    whole = LayerGeometry(prefix=P + "mlp.down_proj", names=("down_proj",), specs=(spec,), local_out=(256,),
                          full_out=(256,), local_in=256, full_in=256, replicated=False)
    assert padding_of(whole) is None


# ------------------------------------------------------------------------------------------ model


def test_padded_model_logits_match_dequantized_model(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf", bias=True, **SHAPE)
    fmt.quantize_model(hf, tmp_path / "exl3", 3, head_bits=4, progress=False, quantize_fn=random_exl3)
    _, tensors = fmt.read_checkpoint(tmp_path / "exl3")
    assert tuple(tensors["model.layers.0.mlp.down_proj.trellis"].shape[:2]) == (256 // 16, 128 // 16)  # stored padded
    dense = dense_twin(tmp_path / "exl3", tmp_path / "dense", hf_dir=hf)

    model, vc = build_model(tmp_path / "exl3")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv.quant_method).__name__ == "Exl3LinearMethod" and qkv.exl3_padding is not None
    assert type(model.lm_head.quant_method).__name__ == "Exl3LMHeadMethod"
    got = logits(model, vc, IDS)
    err = rel(got, hf_logits(dense, IDS))
    print(f"\npadded exl3: float32 quantized-vs-dequantized logits relative error {err:.2e}")
    assert err < 1e-5
    assert rel(got, hf_logits(hf, IDS)) > 1e-2  # and it is not the original model


@pytest.mark.slow
def test_tensor_parallel_2_padded_model_is_a_clear_error(tmp_path, tp2_ranks):
    shape = dict(SHAPE, hidden_size=192, num_attention_heads=6, num_key_value_heads=2)
    hf = make_tiny_llama(tmp_path / "hf", **shape)
    fmt.quantize_model(hf, tmp_path / "exl3", 3, progress=False, quantize_fn=random_exl3)
    res = tp2_ranks.run([{"name": "exl3", "model": str(tmp_path / "exl3"), "ids": IDS}])["exl3"]
    assert "tensor_parallel_size=1 only" in res.get("error", ""), res
