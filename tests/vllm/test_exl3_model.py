"""A whole EXL3 model in vLLM: plugin registration, auto-detected config, logits vs its dequantized twin."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm.model_executor")

from qtip_triton.bitstream import get_layout  # noqa: E402
from qtip_triton.formats import exl3 as fmt  # noqa: E402
from qtip_triton.spec import TrellisSpec  # noqa: E402
from qtip_triton.weight import QuantizedWeight  # noqa: E402
from tests.vllm.harness import build_model, engine_config, hf_logits, logits, rel  # noqa: E402
from tests.vllm.tiny_llama import make_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_dist")]

# every matrix dim a multiple of 128 (EXL3's Hadamard blocks)
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
             vocab_size=128, num_hidden_layers=2)
CODES = ("mcg", "mul1", "3inst")
IDS = torch.tensor([1, 17, 33, 5, 99, 64, 2, 120, 8, 41, 77, 3])


def random_exl3(W, K, code, seed):
    """Stand-in for the Viterbi search (tested elsewhere): random EXL3 weights, K and code varying per module."""
    m, n = W.shape
    g = torch.Generator().manual_seed(seed)
    K, code = 2 + seed % 5, CODES[seed % 3]
    spec = TrellisSpec(16, K, 1, code)
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, 8 * K), generator=g, dtype=torch.int64)
    SU = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    SV = ((torch.rand(m, generator=g) + 0.5) / (1.25 * n**0.5)).half().float()
    return QuantizedWeight(spec, m, n, get_layout("exl3").pack(words, spec), SU, SV, layout="exl3", had_block=128)


def dense_twin(exl3_dir, out_dir, hf_dir=None):
    """The same model with every EXL3 module replaced by its dequantized nn.Linear weight (and fp16 bias).

    With ``hf_dir`` (the unpadded source model) each module is cut back to its true (config.json) size.
    """
    from safetensors.torch import load_file, save_file

    true_shapes = {}
    for f in sorted(hf_dir.glob("*.safetensors")) if hf_dir is not None else ():
        true_shapes.update({k: v.shape for k, v in load_file(str(f)).items()})
    _, tensors = fmt.read_checkpoint(exl3_dir)
    modules = fmt.group_modules(tensors)
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in modules}
    for key, module in modules.items():
        qw, bias = fmt.load_linear(module, name=key)
        m, n = true_shapes.get(f"{key}.weight", (qw.out_features, qw.in_features))
        state[f"{key}.weight"] = qw.dequantize(torch.float64).float()[:m, :n]
        if bias is not None:
            state[f"{key}.bias"] = bias.float()[:m]
    out_dir.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    cfg = json.loads((exl3_dir / "config.json").read_text())
    del cfg["quantization_config"]
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("exl3_models")
    hf = make_tiny_llama(root / "hf", bias=True, **SHAPE)
    fmt.quantize_model(hf, root / "exl3", 3, head_bits=4, progress=False, quantize_fn=random_exl3)
    return {"hf": hf, "exl3": root / "exl3", "dense": dense_twin(root / "exl3", root / "dense")}


def test_entry_point_registers_exl3():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    import qtip_triton.vllm
    from qtip_triton.vllm.exl3 import Exl3Config

    load_general_plugins()
    assert "exl3" in QUANTIZATION_METHODS and get_quantization_config("exl3") is Exl3Config
    qtip_triton.vllm.exl3.register()  # idempotent
    assert QUANTIZATION_METHODS.count("exl3") == 1


def test_config_detected_with_tensor_storage(models):
    vc = engine_config(models["exl3"])  # no quantization=...: quant_method "exl3" in config.json
    assert vc.model_config.quantization == "exl3"
    specs = vc.quant_config.specs()
    assert len(specs) == 15 and "lm_head" in specs and {s.code for s in specs.values()} == set(CODES)


def test_logits_match_dequantized_model(models):
    model, vc = build_model(models["exl3"])
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv.quant_method).__name__ == "Exl3LinearMethod"
    assert len({qw.spec for qw in qkv.exl3_shards}) > 1  # per-module K / codebook inside one fused layer
    assert type(model.lm_head.quant_method).__name__ == "Exl3LMHeadMethod"
    from qtip_triton import ops

    # the op finds the registered shards from the layer's parameters; no layer name among its constants
    assert ops._lookup(qkv.trellis, qkv.suh, qkv.svh, None) is qkv.exl3_packed
    assert not any(isinstance(v, str) and "layers" in v for v in qkv.exl3_op_meta)
    got = logits(model, vc, IDS)
    err = rel(got, hf_logits(models["dense"], IDS))
    print(f"\nexl3: float32 quantized-vs-dequantized logits relative error {err:.2e}")
    assert err < 1e-5
    assert rel(got, hf_logits(models["hf"], IDS)) > 1e-2  # and it is not the original model


@pytest.mark.slow
def test_tensor_parallel_2(tmp_path, tp2_ranks):
    """TP=2: column slices of q/k/v/gate/up and row slices of o/down keep whole 128-blocks, no extra comms."""
    shape = dict(SHAPE, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8)
    hf = make_tiny_llama(tmp_path / "hf", bias=True, **shape)
    fmt.quantize_model(hf, tmp_path / "exl3", 3, progress=False, quantize_fn=random_exl3)
    dense = dense_twin(tmp_path / "exl3", tmp_path / "dense")
    res = tp2_ranks.run([{"name": "exl3", "model": str(tmp_path / "exl3"), "ids": IDS}])["exl3"]
    assert "error" not in res, res.get("traceback")
    assert rel(res["logits"], hf_logits(dense, IDS)) < 1e-5
