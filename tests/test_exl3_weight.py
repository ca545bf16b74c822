"""QuantizedWeight.had_block: fixed-size block-diagonal Hadamards (EXL3 uses 128) on both sides."""

import pytest
import torch

from qtip_triton import QTIPLinear, QuantizedWeight, TrellisSpec, hadamard
from qtip_triton.bitstream import get_layout
from qtip_triton.dispatch import linear


def random_exl3_qweight(gen, K=2, code="mcg", m=256, n=128, had_block=128, **kw):
    spec = TrellisSpec(16, K, 1, code)
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=gen, dtype=torch.int64)
    trellis = get_layout("exl3").pack(words, spec)
    SU, SV = torch.randn(n, generator=gen), torch.randn(m, generator=gen)
    return QuantizedWeight(spec, m, n, trellis, SU, SV, None, layout="exl3", had_block=had_block, **kw)


def block_had(size, block):
    h = hadamard.hadamard_matrix(block, torch.float64)
    return torch.block_diag(*([h] * (size // block)))


@pytest.mark.parametrize("m,n,block", [(256, 128, 128), (128, 384, 128), (64, 96, 32)])
def test_block_transforms_match_dense_product(gen, m, n, block):
    qw = random_exl3_qweight(gen, m=m, n=n, had_block=block)
    assert qw.blocks("in") == n // block and qw.blocks("out") == m // block
    w_hat = qw.decode().double()
    hm, hn = block_had(m, block), block_had(n, block)
    expect = torch.diag(qw.SV.double()) @ hm @ w_hat @ hn.t() @ torch.diag(qw.SU.double())
    assert torch.allclose(qw.dequantize(torch.float64), expect, atol=1e-9)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen)
    assert torch.allclose(qw.reference_forward(x), x @ expect.t(), atol=1e-9)
    y = linear(x.float(), qw)
    assert float((y.double() - x @ expect.t()).norm() / (x @ expect.t()).norm()) < 1e-5


def test_sylvester_128_is_symmetric():
    h = hadamard.hadamard_matrix(128)
    assert torch.equal(h, h.t())
    assert torch.allclose(h @ h, torch.eye(128, dtype=torch.float64), atol=1e-12)


def test_save_load_and_layer_keep_had_block(gen, tmp_path):
    qw = random_exl3_qweight(gen, K=3, code="mul1")
    qw.save(tmp_path / "w.safetensors")
    back = QuantizedWeight.load(tmp_path / "w.safetensors")
    assert back.had_block == 128 and back.layout == "exl3"
    assert torch.equal(back.dequantize(), qw.dequantize())
    layer = QTIPLinear(qw)
    x = torch.randn(2, 128, generator=gen)
    assert torch.equal(layer(x), linear(x, qw))
    assert layer.qweight.had_block == 128


def test_metadata_without_had_block_defaults_to_full_width(gen):
    qw = random_exl3_qweight(gen, had_block=0)
    meta = qw.metadata()
    del meta["had_block"]
    back = QuantizedWeight.from_state(qw.state_dict(), meta)
    assert back.had_block == 0 and back.blocks("in") == 1 and back.blocks("out") == 1


def test_had_block_errors(gen):
    with pytest.raises(ValueError, match="in_features=128 is not a multiple of had_block=256"):
        random_exl3_qweight(gen, m=256, n=128, had_block=256)
    with pytest.raises(ValueError, match="had_block must be an int >= 0"):
        random_exl3_qweight(gen, had_block=-128)
    with pytest.raises(ValueError, match="had_block must be an int >= 0"):
        random_exl3_qweight(gen, had_block=True)
    with pytest.raises(ValueError, match="no Hadamard transform of size 176"):
        random_exl3_qweight(gen, m=176, n=176, had_block=176)
    with pytest.raises(ValueError, match="do not hold whole had_block=128"):
        random_exl3_qweight(gen, m=256, n=128, had_block=128, rcp=2, tp_rank=4)
    qw = random_exl3_qweight(gen, m=256, n=128, had_block=128, rcp=2, tp_rank=2)
    assert qw.blocks("out") == 2
