"""Writing QTIP checkpoints (qtip-triton quantize) and reading them back, without vLLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qtip_triton import TrellisSpec, cli, hadamard
from qtip_triton.checkpoint import (
    dequantize_checkpoint,
    iter_tensors,
    quantize_checkpoint,
    quantize_linear,
    read_qtip_linears,
)
from tests.vllm.tiny_llama import TINY_TP, make_tiny_llama

SPEC2 = TrellisSpec(16, 2, 2, "hyb", 9)


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(512, 2, generator=g) * 0.97).half()  # stands in for the k-means table (seconds to build)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf", bias=True)


@pytest.fixture(scope="module")
def tiny_tp(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_tp") / "hf", **TINY_TP)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_random_trellis_checkpoint_layout(tiny, tmp_path, table):
    out = quantize_checkpoint(tiny, tmp_path / "q", K=3, random_trellis=True, table=table, skip=["1_down"],
                              quantization_config=True, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    qp = cfg["quip_params"]
    assert qp["K"] == 3 and qp["L"] == 16 and qp["V"] == 2 and qp["tlut_bits"] == 9
    assert qp["decode_mode"] == "quantlut_sym" and qp["skip_list"] == ["1_down"] and qp["split_for_tp"] is False
    assert cfg["quantization_config"]["quant_method"] == "qtip" and cfg["quantization_config"]["K"] == 3
    linears, plain, _ = read_qtip_linears(out)
    src = dict(iter_tensors(tiny))
    assert len(linears) == 2 * 7 - 1
    for prefix, (qw, bias) in linears.items():
        W = src[f"{prefix}.weight"]
        assert (qw.out_features, qw.in_features) == tuple(W.shape)
        assert qw.spec.K == 3 and qw.rcp == 0 and qw.layout == "qtip"
        assert torch.equal(bias, src[f"{prefix}.bias"])
        # random trellis, but the dense weight has the source's scale
        ratio = qw.dequantize().pow(2).mean().sqrt() / W.pow(2).mean().sqrt()
        assert 0.5 < float(ratio) < 2.0
    raw = load_file(str(out / "model.safetensors"))
    k = "model.layers.0.self_attn.q_proj"
    assert raw[f"{k}.trellis"].dtype == torch.int16 and raw[f"{k}.trellis"].shape == (4 * 4, 48)
    assert raw[f"{k}.tlut"].dtype == torch.float16 and torch.equal(raw[f"{k}.tlut"], table)
    assert raw[f"{k}.rcp"].shape == () and int(raw[f"{k}.tp_rank"]) == 8  # upstream writes 8 when rcp=0
    # skipped and non-linear tensors are copied unchanged
    assert torch.equal(plain["model.layers.1.mlp.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(plain["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    assert "model.layers.1.mlp.down_proj.trellis" not in raw


def test_tp_variant_splits_transforms(tiny_tp, tmp_path, table):
    out = quantize_checkpoint(tiny_tp, tmp_path / "tp", K=2, tp=2, random_trellis=True, table=table, progress=False)
    linears, _, cfg = read_qtip_linears(out)
    assert cfg["quip_params"]["split_for_tp"] is True
    for prefix, (qw, _) in linears.items():
        kind = prefix.rsplit(".", 1)[1]
        assert qw.tp_rank == 2
        assert qw.rcp == (1 if kind in ("o_proj", "down_proj") else 2), prefix


@pytest.mark.slow
def test_quantize_linear_tp_blocks_with_encoder(gen, table):
    """rcp=2 / rcp=1 blocks encoded separately still form one valid weight close to W."""
    pytest.importorskip("qtip_triton.encode")
    W = torch.randn(64, 64, generator=gen)
    for kind, rcp in (("q", 2), ("o", 1)):
        qw = quantize_linear(W, SPEC2, table, kind=kind, tp=2, seed=7, data_scale=1.0)
        assert qw.rcp == rcp and qw.tp_rank == 2
        err = float((qw.dequantize() - W).pow(2).mean() / W.pow(2).mean())
        assert err < 0.12, (kind, err)  # 2-bit HYB on Gaussian data: about 0.07
        # the blocks' transforms are really block-diagonal: compare with explicit dense algebra
        side = hadamard.hadamard_matrix(32)
        full = hadamard.hadamard_matrix(64)
        mm = torch.block_diag(side, side) if rcp == 2 else full
        mn = torch.block_diag(side, side) if rcp == 1 else full
        expect = torch.diag(qw.SV.double()) @ mm @ qw.decode().double() @ mn.t() @ torch.diag(qw.SU.double())
        assert rel(qw.dequantize(torch.float64), expect) < 1e-12


def test_dequantize_checkpoint(tiny, tmp_path, table):
    q = quantize_checkpoint(tiny, tmp_path / "q", K=2, random_trellis=True, table=table, progress=False)
    d = dequantize_checkpoint(q, tmp_path / "dense")
    cfg = json.loads((d / "config.json").read_text())
    assert "quip_params" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    dense = dict(iter_tensors(d))
    linears, _, _ = read_qtip_linears(q)
    for prefix, (qw, bias) in linears.items():
        assert rel(dense[f"{prefix}.weight"], qw.dequantize(torch.float64)) < 1e-7
        assert torch.equal(dense[f"{prefix}.bias"], bias)
    assert set(dense) == set(dict(iter_tensors(tiny)))


def test_cli_quantize(tiny_tp, tmp_path, monkeypatch, table):
    import qtip_triton.tables

    monkeypatch.setattr(qtip_triton.tables, "kmeans_table", lambda spec, **kw: table)
    rc = cli.main(["quantize", str(tiny_tp), str(tmp_path / "c"), "--K", "4", "--random-trellis", "--tp", "2",
                   "--quantization-config"])
    assert rc == 0
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["quip_params"]["K"] == 4 and cfg["quantization_config"]["quant_method"] == "qtip"


def test_writer_errors(tiny, tmp_path, table):
    with pytest.raises(ValueError, match="skip entries match no linear layer"):
        quantize_checkpoint(tiny, tmp_path / "a", random_trellis=True, table=table, skip=["9_q"], progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(tiny, tmp_path / "full", random_trellis=True, table=table, progress=False)
    with pytest.raises(ValueError, match="does not split into 3 blocks"):
        quantize_checkpoint(tiny, tmp_path / "b", random_trellis=True, table=table, tp=3, progress=False)
    odd = make_tiny_llama(tmp_path / "odd", intermediate_size=80)
    with pytest.raises(ValueError, match="in_features=80 cannot be stored.*--skip 0_down"):
        quantize_checkpoint(odd, tmp_path / "c", random_trellis=True, table=table, progress=False)
    with pytest.raises(ValueError, match="no config.json"):
        quantize_checkpoint(tmp_path / "full", tmp_path / "d", random_trellis=True, table=table, progress=False)
    with pytest.raises(ValueError, match="not a QTIP checkpoint"):
        read_qtip_linears(tiny)
