"""EXL3 module loader/writer against the golden layers (K = 1..8, all three codes) and bad input."""

import numpy as np
import pytest
import torch

from qtip_triton import hadamard
from qtip_triton.codes import MCG_MULT, MUL1_MULT
from qtip_triton.dispatch import linear
from qtip_triton.formats import exl3
from qtip_triton.spec import TrellisSpec
from qtip_triton.weight import QuantizedWeight

KS = range(1, 9)


def signed32(v):
    return v - (1 << 32) if v >= 1 << 31 else v


def golden_tensors(g, K):
    t = {k: torch.from_numpy(g[f"k{K}_{k}"].copy()) for k in ("trellis", "suh", "svh", "bias")}
    code = str(g[f"k{K}_codebook"])
    if code == "mcg":
        t["mcg"] = torch.tensor(signed32(MCG_MULT), dtype=torch.int32)
    elif code == "mul1":
        t["mul1"] = torch.tensor(signed32(MUL1_MULT), dtype=torch.int32)
    return t


def had128_blocks(size):
    h = hadamard.hadamard_matrix(128, torch.float64)
    return torch.block_diag(*([h] * (size // 128)))


@pytest.mark.parametrize("K", KS)
def test_golden_layer(exl3_golden, K):
    g = exl3_golden
    qw, bias = exl3.load_linear(golden_tensors(g, K), name=f"k{K}")
    assert qw.spec == TrellisSpec(16, K, 1, str(g[f"k{K}_codebook"]))
    assert (qw.out_features, qw.in_features) == (256, 128)
    # decode: raw W_hat, transposed into our (out x in), bit for bit
    w_hat = g[f"k{K}_w_hat"]
    np.testing.assert_array_equal(qw.decode().t().to(torch.float16).numpy().view(np.int16), w_hat.view(np.int16))
    # forward in float64: equal to the exact golden y up to summation order
    x = torch.from_numpy(g[f"k{K}_x"]).double()
    y = torch.from_numpy(g[f"k{K}_y"])
    y64 = qw.reference_forward(x, bias.double())
    assert float((y64 - y).norm() / y.norm()) < 1e-12
    # dense W_eff (out x in) = (diag(suh)·H·W_hat·H·diag(svh))ᵀ
    wh = torch.from_numpy(w_hat).double()
    suh, svh = torch.from_numpy(g[f"k{K}_suh"]).double(), torch.from_numpy(g[f"k{K}_svh"]).double()
    w_eff = (torch.diag(suh) @ had128_blocks(128) @ wh @ had128_blocks(256) @ torch.diag(svh)).t()
    assert torch.allclose(qw.dequantize(torch.float64), w_eff, rtol=0, atol=1e-12 * float(w_eff.abs().max()))
    # the served path, in fp16 in and out
    y16 = linear(x.half(), qw, bias)
    assert y16.dtype == torch.float16
    assert float((y16.double() - y).norm() / y.norm()) < 2e-3


@pytest.mark.parametrize("K", [1, 4, 8])
def test_to_tensors_inverts_load_linear(exl3_golden, K):
    tensors = golden_tensors(exl3_golden, K)
    qw, bias = exl3.load_linear(tensors)
    back = exl3.to_tensors(qw, bias)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k
    named = exl3.module_tensors("model.layers.0.mlp.up_proj", qw)
    assert "model.layers.0.mlp.up_proj.trellis" in named and not any(k.endswith(".bias") for k in named)


def test_round_trip_random_weight(gen, tmp_path):
    from safetensors.torch import load_file, save_file

    spec = TrellisSpec(16, 5, 1, "mul1")
    trellis = torch.randint(-(1 << 15), 1 << 15, (256 // 16, 384 // 16, 80), generator=gen, dtype=torch.int16)
    qw = QuantizedWeight(
        spec, 384, 256, trellis, torch.randn(256, generator=gen).half().float(),
        torch.randn(384, generator=gen).half().float(), layout="exl3", had_block=128,
    )
    save_file(exl3.module_tensors("lin", qw), str(tmp_path / "m.safetensors"))
    loaded = {k.removeprefix("lin."): v for k, v in load_file(str(tmp_path / "m.safetensors")).items()}
    back, bias = exl3.load_linear(loaded)
    assert bias is None and back.spec == spec
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_legacy_packed_signs(gen):
    signs = torch.where(torch.rand(128, generator=gen) < 0.5, -1.0, 1.0)
    packed = exl3.pack_signs(signs)
    assert packed.dtype == torch.int16 and packed.shape == (8,)
    # bit i of word w is element 16w + i, set means −1
    words = packed.to(torch.int64) & 0xFFFF
    for e in (0, 5, 17, 127):
        assert bool((words[e // 16] >> (e % 16)) & 1) == bool(signs[e] < 0)
    assert torch.equal(exl3.unpack_signs(packed), signs)
    assert torch.equal(exl3.unpack_signs(torch.tensor([1, -32768], dtype=torch.int16))[[0, 1, 16, 31]],
                       torch.tensor([-1.0, 1.0, 1.0, -1.0]))


def test_legacy_su_sv_load(exl3_golden, gen):
    t = golden_tensors(exl3_golden, 2)
    su = torch.where(torch.rand(128, generator=gen) < 0.5, -1.0, 1.0)
    sv = torch.where(torch.rand(256, generator=gen) < 0.5, -1.0, 1.0)
    del t["suh"], t["svh"]
    t["su"], t["sv"] = exl3.pack_signs(su), exl3.pack_signs(sv)
    qw, _ = exl3.load_linear(t)
    assert torch.equal(qw.SU, su) and torch.equal(qw.SV, sv)


def _golden(exl3_golden, K=2):
    return golden_tensors(exl3_golden, K)  # K=2 is mul1


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.update(tile_order=torch.zeros(1)), "unknown EXL3 tensors \\['tile_order'\\]"),
        (lambda t: t.update(mcg=torch.tensor(signed32(MCG_MULT), dtype=torch.int32)), "both codebook markers"),
        (lambda t: t.update(mul1=torch.tensor(12345, dtype=torch.int32)), "multiplier 0x00003039"),
        (lambda t: t.update(mul1=torch.tensor(1.0)), "0-dim int32"),
        (lambda t: t.pop("trellis"), "missing EXL3 tensor 'trellis'"),
        (lambda t: t.pop("suh"), "missing EXL3 tensor 'suh' \\(or the legacy packed 'su'\\)"),
        (lambda t: t.update(suh=torch.ones(64).half()), "suh must be a floating-point vector of shape \\(128,\\)"),
        (lambda t: t.update(svh=torch.ones(256, dtype=torch.int16)), "svh must be a floating-point"),
        (lambda t: t.update(bias=torch.ones(128).half()), "bias must be a floating-point vector of shape \\(256,\\)"),
        (lambda t: t.update(trellis=t["trellis"].int()), "3-D int16"),
        (lambda t: t.update(trellis=t["trellis"][..., :24]), "tile width 24 is not 16\\*K"),
        (lambda t: t.update(trellis=torch.zeros(8, 16, 16 * 9, dtype=torch.int16)), "tile width 144"),
        (lambda t: t.update(trellis=t["trellis"][:, :12]), "multiples of 128.*out=192"),
        (lambda t: t.update(su=torch.zeros(4, dtype=torch.int16)) or t.pop("suh"), "su unpacks to 64 signs"),
        (lambda t: t.update(svh=torch.full((256,), float("nan")).half()), "SV holds NaN"),
    ],
)
def test_loader_errors(exl3_golden, edit, match):
    t = _golden(exl3_golden)
    edit(t)
    with pytest.raises(ValueError, match=match):
        exl3.load_linear(t, name="model.layers.0.mlp.down_proj")


def test_writer_errors(gen, exl3_golden):
    qw, _ = exl3.load_linear(_golden(exl3_golden))
    from dataclasses import replace

    with pytest.raises(ValueError, match="had_block=0"):
        exl3.to_tensors(replace(qw, had_block=0))
    with pytest.raises(ValueError, match="overflows fp16"):
        exl3.to_tensors(replace(qw, SU=qw.SU * 1e9))
    with pytest.raises(ValueError, match="bias must have shape \\(256,\\)"):
        exl3.to_tensors(qw, torch.zeros(128))
    from tests.test_weight import random_qweight

    tile = random_qweight(gen, TrellisSpec(16, 2, 1, "mcg"), 256, 128, layout="tile")
    with pytest.raises(ValueError, match="element order differs"):
        exl3.to_tensors(replace(tile, had_block=128))
    hyb = random_qweight(gen, TrellisSpec(16, 2, 2, "hyb", 9), 256, 128)
    with pytest.raises(ValueError, match="L=16, V=1"):
        exl3.to_tensors(hyb)
