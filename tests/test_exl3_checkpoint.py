"""Whole EXL3 directories: grouping tensors into modules, config files, write -> read round trip."""

import json

import pytest
import torch

from qtip_triton.formats import exl3
from qtip_triton.spec import TrellisSpec
from qtip_triton.weight import QuantizedWeight


def rand_module(gen, K, code, out_f, in_f, bias=False):
    trellis = torch.randint(-(1 << 15), 1 << 15, (in_f // 16, out_f // 16, 16 * K), generator=gen, dtype=torch.int16)
    qw = QuantizedWeight(
        TrellisSpec(16, K, 1, code), out_f, in_f, trellis, torch.randn(in_f, generator=gen).half().float(),
        torch.randn(out_f, generator=gen).half().float(), layout="exl3", had_block=128,
    )
    b = torch.randn(out_f, generator=gen).half() if bias else None
    return qw, b


@pytest.fixture
def small_model(gen):
    mods = {
        "model.layers.0.self_attn.q_proj": rand_module(gen, 4, "mcg", 128, 128, bias=True),
        "model.layers.0.mlp.down_proj": rand_module(gen, 2, "mcg", 128, 256),
        "model.layers.0.mlp.up_proj": rand_module(gen, 3, "3inst", 256, 128),
        "lm_head": rand_module(gen, 6, "mul1", 256, 128),
    }
    tensors = {"model.embed_tokens.weight": torch.randn(256, 128, generator=gen).half(),
               "model.norm.weight": torch.ones(128).half()}
    for key, (qw, b) in mods.items():
        tensors.update(exl3.module_tensors(key, qw, b))
    return mods, tensors


def test_group_modules(small_model):
    mods, tensors = small_model
    groups = exl3.group_modules(tensors)
    assert set(groups) == set(mods)
    assert set(groups["model.layers.0.self_attn.q_proj"]) == {"trellis", "suh", "svh", "mcg", "bias"}
    assert set(groups["model.layers.0.mlp.up_proj"]) == {"trellis", "suh", "svh"}


def test_write_read_round_trip(small_model, tmp_path):
    mods, tensors = small_model
    hf_config = {"model_type": "llama", "hidden_size": 128, "tie_word_embeddings": False}
    qc = exl3.write_checkpoint(tmp_path, tensors, hf_config)
    # bits = weighted mean of K over non-head linears: (4*128*128 + 2*128*256 + 3*256*128) / (5 * 128*128)
    assert qc["bits"] == pytest.approx((4 + 2 * 2 + 3 * 2) / 5, abs=1e-4)
    assert qc["head_bits"] == 6 and qc["codebook"] == "mcg" and qc["quant_method"] == "exl3"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_size"] == 128 and cfg["quantization_config"] == qc
    storage = json.loads((tmp_path / "quantization_config.json").read_text())["tensor_storage"]
    assert storage["lm_head"]["bits_per_weight"] == 6
    assert storage["lm_head"]["mul1_multiplier"] == 0x83DCD12D
    assert storage["model.layers.0.self_attn.q_proj"]["mcg_multiplier"] == 0xCBAC1FED
    assert "mcg_multiplier" not in storage["model.layers.0.mlp.up_proj"]
    assert storage["model.layers.0.mlp.up_proj"]["stored_tensors"]["model.layers.0.mlp.up_proj.trellis"] == {
        "shape": [8, 16, 48], "n_bytes": 8 * 16 * 48 * 2, "dtype": "torch.int16"}

    qc2, back = exl3.read_checkpoint(tmp_path)
    assert qc2 == qc and set(back) == set(tensors)
    for key, module in exl3.group_modules(back).items():
        qw, b = exl3.load_linear(module, name=key)
        want, want_b = mods[key]
        assert qw.spec == want.spec
        assert torch.equal(qw.dequantize(), want.dequantize())
        assert (b is None) == (want_b is None) and (b is None or torch.equal(b, want_b))


def test_write_rejects_bad_module(small_model, tmp_path):
    _, tensors = small_model
    tensors["model.layers.0.mlp.up_proj.tile_order"] = torch.zeros(4)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: unknown EXL3 tensors \\['tile_order'\\]"):
        exl3.write_checkpoint(tmp_path, tensors, {})
    assert not (tmp_path / "model.safetensors").exists()


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="no quantization_config"):
        exl3.parse_quantization_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="quant_method is 'gptq'"):
        exl3.parse_quantization_config({"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="has no config.json"):
        exl3.read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl3"}}))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        exl3.read_checkpoint(tmp_path)


@pytest.mark.parametrize("side", ["in", "out"])
def test_tensor_parallel_shards_sum_to_the_layer(gen, side):
    qw, b = rand_module(gen, 3, "mul1", 384, 256, bias=True)
    module = exl3.to_tensors(qw, b)
    x = torch.randn(2, 256, generator=gen, dtype=torch.float64)
    full = qw.reference_forward(x, b.double())
    cuts = [0, 128, 384] if side == "out" else [0, 128, 256]
    parts = []
    for rank, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        shard, sb = exl3.load_linear(exl3.shard_tensors(module, side, lo, hi, keep_bias=rank == 0))
        if side == "out":
            parts.append(shard.reference_forward(x, sb.double()))
        else:
            parts.append(shard.reference_forward(x[:, lo:hi], None if sb is None else sb.double()))
    y = torch.cat(parts, -1) if side == "out" else sum(parts)
    assert torch.allclose(y, full, rtol=0, atol=1e-10 * float(full.abs().max()))


def test_shard_errors_and_legacy_signs(gen):
    qw, _ = rand_module(gen, 2, "3inst", 256, 256)
    module = exl3.to_tensors(qw)
    with pytest.raises(ValueError, match="multiples of 128"):
        exl3.shard_tensors(module, "out", 0, 64)
    with pytest.raises(ValueError, match="side must be"):
        exl3.shard_tensors(module, "rows", 0, 128)
    signs = torch.where(torch.rand(256, generator=gen) < 0.5, -1.0, 1.0)
    legacy = {k: v for k, v in module.items() if k != "suh"} | {"su": exl3.pack_signs(signs)}
    shard = exl3.shard_tensors(legacy, "in", 128, 256)
    assert "su" not in shard and torch.equal(shard["suh"].float(), signs[128:])
