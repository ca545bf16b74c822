import pytest
import torch

from qtip_triton import QTIPLinear, QuantizedWeight, TrellisSpec, hadamard
from qtip_triton.bitstream import get_layout
from qtip_triton.formats.qtip import load_linear


def random_qweight(gen, spec, m, n, layout="qtip", rcp=0, tp_rank=1):
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=gen, dtype=torch.int64)
    trellis = get_layout(layout).pack(words, spec)
    table = None
    if spec.code == "hyb":
        table = torch.randn(1 << spec.Q, spec.V, generator=gen).half()
    elif spec.code == "lut":
        table = torch.randn(1 << spec.L, spec.V, generator=gen)
    SU = torch.randn(n, generator=gen)
    SV = torch.randn(m, generator=gen)
    return QuantizedWeight(spec, m, n, trellis, SU, SV, table, layout=layout, rcp=rcp, tp_rank=tp_rank)


def dense_m(n):
    return hadamard.hadamard_matrix(n, torch.float64)


@pytest.mark.parametrize("m,n", [(64, 96), (96, 64)])
def test_dequantize_vs_explicit_product(gen, m, n):
    qw = random_qweight(gen, TrellisSpec(16, 2, 2, "hyb", 9), m, n)
    w_hat = qw.decode().double()
    expect = torch.diag(qw.SV.double()) @ dense_m(m) @ w_hat @ dense_m(n).t() @ torch.diag(qw.SU.double())
    got = qw.dequantize(torch.float64)
    assert torch.allclose(got, expect, atol=1e-9)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen)
    assert torch.allclose(qw.reference_forward(x), x @ expect.t(), atol=1e-9)


def test_tp_blocks(gen):
    m, n = 64, 128
    for rcp, side in ((1, "in"), (2, "out")):
        qw = random_qweight(gen, TrellisSpec(16, 2, 2, "hyb", 9), m, n, rcp=rcp, tp_rank=2)
        w_hat = qw.decode().double()
        mm = dense_m(m) if side == "in" else torch.block_diag(dense_m(m // 2), dense_m(m // 2))
        mn = dense_m(n) if side == "out" else torch.block_diag(dense_m(n // 2), dense_m(n // 2))
        expect = torch.diag(qw.SV.double()) @ mm @ w_hat @ mn.t() @ torch.diag(qw.SU.double())
        assert torch.allclose(qw.dequantize(torch.float64), expect, atol=1e-9)


def test_save_load_round_trip(gen, tmp_path):
    qw = random_qweight(gen, TrellisSpec(12, 3, 1, "1mad"), 32, 48, layout="tile")
    qw.save(tmp_path / "w.safetensors")
    back = QuantizedWeight.load(tmp_path / "w.safetensors")
    assert back.spec == qw.spec and back.layout == "tile"
    assert torch.equal(back.decode(), qw.decode())
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"trellis": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a qtip_triton QuantizedWeight"):
        QuantizedWeight.load(tmp_path / "x.safetensors")


def test_constructor_errors(gen):
    spec = TrellisSpec(16, 2, 2, "hyb", 9)
    qw = random_qweight(gen, spec, 64, 64)
    base = dict(spec=spec, out_features=64, in_features=64, trellis=qw.trellis, SU=qw.SU, SV=qw.SV, table=qw.table)
    with pytest.raises(ValueError, match="SU must have shape \\(64,\\)"):
        QuantizedWeight(**{**base, "SU": torch.ones(32)})
    with pytest.raises(ValueError, match="SV holds NaN"):
        QuantizedWeight(**{**base, "SV": torch.full((64,), float("nan"))})
    with pytest.raises(ValueError, match="must have shape"):
        QuantizedWeight(**{**base, "trellis": qw.trellis[:-1]})
    with pytest.raises(ValueError, match="no Hadamard transform of size 352"):
        random_qweight(gen, TrellisSpec(16, 2, 2, "hyb", 9), 64, 352)
    with pytest.raises(ValueError, match="rcp must be"):
        QuantizedWeight(**base, rcp=3)


def test_qtip_loader(gen, qtip_golden):
    K = 3
    params = {"codebook": "bitshift", "L": 16, "K": K, "V": 2, "tlut_bits": 9, "decode_mode": "quantlut_sym",
              "td_x": 16, "td_y": 16}
    tensors = {
        "trellis": torch.from_numpy(qtip_golden[f"trellis_k{K}"]),
        "tlut": torch.from_numpy(qtip_golden["hyb_tlut"]),
        "SU": torch.randn(96, generator=gen).half(),
        "SV": torch.randn(64, generator=gen).half(),
        "rcp": torch.tensor(0),
        "tp_rank": torch.tensor(8),
    }
    qw, bias = load_linear(tensors, params)
    assert bias is None and qw.spec.name == "L16K3V2-hyb9"
    assert torch.equal(qw.decode(), torch.from_numpy(qtip_golden[f"decoded_k{K}"]))
    with pytest.raises(ValueError, match="missing QTIP tensors \\['SU'\\]"):
        load_linear({k: v for k, v in tensors.items() if k != "SU"}, params)
    with pytest.raises(ValueError, match="truncated or mismatched"):
        load_linear({**tensors, "trellis": tensors["trellis"][:-2]}, params)
    with pytest.raises(ValueError, match="holds K=3 bits per weight but quip_params say K in \\[2\\]"):
        load_linear(tensors, {**params, "K": 2})
    with pytest.raises(ValueError, match="unknown QTIP tensors"):
        load_linear({**tensors, "foo": torch.zeros(1)}, params)
    with pytest.raises(ValueError, match="decode_mode 'lut' is unsupported"):
        load_linear(tensors, {**params, "decode_mode": "lut"})
    with pytest.raises(ValueError, match="must be a 2-D int16"):
        load_linear({**tensors, "trellis": tensors["trellis"].int()}, params)


def test_qtip_linear_module(gen):
    qw = random_qweight(gen, TrellisSpec(16, 2, 2, "hyb", 9), 64, 96)
    bias = torch.randn(64, generator=gen)
    layer = QTIPLinear(qw, bias)
    x = torch.randn(2, 5, 96, generator=gen)
    ref = x.double() @ qw.dequantize(torch.float64).t() + bias.double()
    y = layer(x)
    assert y.shape == (2, 5, 64)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
