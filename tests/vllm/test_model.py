"""Whole models: plugin discovery, both config styles, quantized logits vs the dequantized model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("vllm.model_executor")

from qtip_triton.checkpoint import dequantize_checkpoint, quantize_checkpoint  # noqa: E402
from tests.vllm.harness import build_model, engine_config, hf_logits, logits, rel  # noqa: E402
from tests.vllm.tiny_llama import make_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_dist")]


@pytest.fixture(scope="module")
def models(tmp_path_factory, table):
    """A tiny random Llama (with biases), quantized by the writer in both config styles, and its dense twin."""
    root = tmp_path_factory.mktemp("models")
    hf = make_tiny_llama(root / "hf", bias=True)
    quip = quantize_checkpoint(hf, root / "quip", K=2, K_v_proj=3, random_trellis=True, table=table,
                               skip=["1_o"], progress=False)
    auto = quantize_checkpoint(hf, root / "auto", K=3, random_trellis=True, table=table,
                               quantization_config=True, progress=False)
    return {"hf": hf, "quip": quip, "auto": auto,
            "quip_dense": dequantize_checkpoint(quip, root / "quip_dense"),
            "auto_dense": dequantize_checkpoint(auto, root / "auto_dense")}


IDS = torch.tensor([1, 17, 33, 5, 99, 64, 2, 120, 8, 41, 77, 3])


def test_entry_point_registers_qtip():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    import qtip_triton.vllm

    load_general_plugins()
    assert qtip_triton.vllm._registered  # vLLM called our entry point
    assert "qtip" in QUANTIZATION_METHODS
    from qtip_triton.vllm.config import QTIPConfig

    assert get_quantization_config("qtip") is QTIPConfig
    qtip_triton.vllm.register()  # idempotent
    assert QUANTIZATION_METHODS.count("qtip") == 1


def test_config_styles(models):
    quip = engine_config(models["quip"], quantization="qtip")
    assert quip.quant_config.get_name() == "qtip"
    assert quip.quant_config.quip_params["K"] == 2 and quip.quant_config.quip_params["K_v_proj"] == 3
    assert quip.quant_config.quip_params["skip_list"] == ["1_o"]
    auto = engine_config(models["auto"])  # no quantization=...: detected from quantization_config
    assert auto.model_config.quantization == "qtip"
    assert auto.quant_config.quip_params["K"] == 3


@pytest.mark.parametrize("style", ["quip", "auto"])
def test_logits_match_dequantized_model(models, style):
    model, vc = build_model(models[style], quantization="qtip" if style == "quip" else None)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv.quant_method).__name__ == "QTIPLinearMethod"
    assert qkv.qtip_packed.specs == ("L16K2V2-hyb9,L16K2V2-hyb9,L16K3V2-hyb9" if style == "quip" else
                                     "L16K3V2-hyb9,L16K3V2-hyb9,L16K3V2-hyb9")
    got = logits(model, vc, IDS)
    ref = hf_logits(models[f"{style}_dense"], IDS)
    err = rel(got, ref)
    print(f"\n{style}: float32 quantized-vs-dequantized logits relative error {err:.2e}")
    assert err < 1e-5
    # and the quantized model is not the original one (the test could tell them apart)
    assert rel(got, hf_logits(models["hf"], IDS)) > 1e-2


def test_half_precision_model(models):
    model, vc = build_model(models["auto"], dtype="float16")
    got = logits(model, vc, IDS)
    err = rel(got, hf_logits(models["auto_dense"], IDS))
    print(f"\nfloat16 quantized-vs-dequantized logits relative error {err:.2e}")
    assert err < 1e-2


def test_the_models_warm_up_runs_once_after_its_last_layer_loaded(models, monkeypatch):
    """vLLM's own loader, layer by layer: no warm-up until the last quantized layer has loaded, then one for all."""
    from qtip_triton.vllm import warmup

    calls, loaded = [], []
    real_arrive = warmup.LoadBatch.arrive

    def arrive(self, layer, entry):
        loaded.append(layer)
        assert not calls  # nothing warmed while layers are still loading
        real_arrive(self, layer, entry)

    monkeypatch.setattr(warmup, "compiles_ahead", lambda device: True)  # as on CUDA, in a dtype the kernels take
    monkeypatch.setattr(warmup, "_KERNEL_DTYPES", (torch.float32,))
    monkeypatch.setattr(warmup.LoadBatch, "arrive", arrive)
    monkeypatch.setattr(warmup, "warm_up_layers", lambda entries: calls.append([e.packed for e in entries]))
    model, _ = build_model(models["quip"], quantization="qtip")
    quantized = [m for m in model.modules() if hasattr(m, "qtip_packed")]
    assert len(quantized) >= 7 and [id(m) for m in loaded] == [id(m) for m in quantized]  # "1_o" is skipped
    (warmed,) = calls
    assert [id(p) for p in warmed] == [id(m.qtip_packed) for m in quantized]


def test_missing_tensor_in_checkpoint(models, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(models["auto"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.SU"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks tensors: model\.layers\.1\.self_attn\.k_proj\.SU"):
        build_model(bad)


def test_wrong_k_in_config(models, tmp_path):
    bad = tmp_path / "badk"
    shutil.copytree(models["auto"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["K"] = 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"_proj\.trellis holds K=3 bits per weight .* says K=2"):
        build_model(bad)


def test_dummy_weights(models):
    model, vc = build_model(models["auto"], load=False, load_format="dummy", dtype="float16")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.qtip_packed.specs.startswith("L16K3V2-hyb9")
    x = torch.randn(8, 64, dtype=torch.float16)
    y, _ = qkv(x)
    assert torch.isfinite(y).all() and 0.2 < float(y.float().std() / x.float().std()) < 5
    out = logits(model, vc, IDS)
    assert torch.isfinite(out).all()


def test_same_shaped_layers_give_the_op_the_same_constants(models):
    """Decoder layers of one shape must hand the op equal non-tensor arguments (vLLM compiles each distinct piece
    of its piecewise graph, so a per-layer constant compiles every layer), and the op must find each layer's
    registered shards from the layer's own parameters (not the per-call rebuild)."""
    from qtip_triton import ops

    model, _ = build_model(models["auto"], load=False, load_format="dummy", dtype="float16")
    first, second = model.model.layers[0], model.model.layers[1]
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        a, b = first.get_submodule(name), second.get_submodule(name)
        assert a.qtip_op_meta == b.qtip_op_meta, name
        assert not any(isinstance(v, str) and "layers" in v for v in a.qtip_op_meta), name
        for layer in (a, b):
            assert ops._lookup(layer.trellis, layer.SU, layer.SV, layer.tlut) is layer.qtip_packed, name


@pytest.mark.slow
def test_encoded_model(models, tmp_path, table):
    """The real encoder (not random trellis): the runtime still equals the dequantized model exactly."""
    pytest.importorskip("qtip_triton.encode")
    enc = quantize_checkpoint(models["hf"], tmp_path / "enc", K=4, table=table, data_scale=1.0,
                              quantization_config=True, progress=False)
    dense = dequantize_checkpoint(enc, tmp_path / "enc_dense")
    model, vc = build_model(enc)
    got = logits(model, vc, IDS)
    err = rel(got, hf_logits(dense, IDS))
    quant_err = rel(got, hf_logits(models["hf"], IDS))
    print(f"\nencoded K=4: runtime error {err:.2e}, quantization error vs original {quant_err:.2e}")
    assert err < 1e-5
    assert quant_err < 0.5  # 4-bit trellis quantization of a random model stays close to it
