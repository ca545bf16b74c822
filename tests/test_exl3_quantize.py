"""Quantizing into EXL3: block rotations against dense products, bad input, and (slow) end to end."""

import pytest
import torch

from qtip_triton import hadamard
from qtip_triton.formats import exl3
from qtip_triton.ldlq import proxy_loss


def block_h(size):
    h = hadamard.hadamard_matrix(128, torch.float64)
    return torch.block_diag(*([h] * (size // 128)))


def test_had_is_exl3_block_transform(gen):
    x = torch.randn(3, 384, generator=gen, dtype=torch.float64)
    assert torch.allclose(exl3.had(x), x @ block_h(384), atol=1e-12)
    assert torch.allclose(exl3.had(exl3.had(x)), x, atol=1e-12)  # self-inverse
    with pytest.raises(ValueError, match="not a multiple of the Hadamard block 128"):
        exl3.had(torch.zeros(2, 96))


def test_rotations_match_dense(gen):
    m, n = 256, 128
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    su = torch.randn(n, generator=gen, dtype=torch.float64).sign()
    sv = torch.randn(m, generator=gen, dtype=torch.float64).sign()
    expect = block_h(m) @ torch.diag(sv) @ W @ torch.diag(su) @ block_h(n)
    assert torch.allclose(exl3.rotate_weight(W, su, sv), expect, atol=1e-10)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    H = A @ A.t()
    Ht = block_h(n) @ torch.diag(su) @ H @ torch.diag(su) @ block_h(n)
    assert torch.allclose(exl3.rotate_hessian(H, su), Ht, atol=1e-9)
    # the dense meaning of an EXL3 weight inverts the rotation: diag(SV)·B_m·W̃·B_n·diag(SU) = W
    back = torch.diag(sv) @ block_h(m) @ expect @ block_h(n) @ torch.diag(su)
    assert torch.allclose(back, W, atol=1e-10)


def test_quantize_bad_input(gen):
    W = torch.randn(128, 128, generator=gen)
    with pytest.raises(ValueError, match="multiples of 128"):
        exl3.quantize_linear(torch.randn(128, 96, generator=gen), 4)
    with pytest.raises(ValueError, match="K \\(bits per weight\\) must be an int in 1..8"):
        exl3.quantize_linear(W, 9)
    with pytest.raises(ValueError, match="code must be one of"):
        exl3.quantize_linear(W, 4, "hyb")
    with pytest.raises(ValueError, match="NaN or Inf"):
        exl3.quantize_linear(W * float("nan"), 4)
    with pytest.raises(ValueError, match="all zeros"):
        exl3.quantize_linear(torch.zeros(128, 128), 4, data_scale=1.0)
    with pytest.raises(ValueError, match="hessian must be \\(128, 128\\)"):
        exl3.quantize_linear(W, 4, hessian=torch.eye(64))


@pytest.mark.slow
def test_quantize_end_to_end(gen):
    """K=4 mcg on a 128x128 matrix: spec-level distortion, EXL3 tensors round trip, served forward."""
    W = torch.randn(128, 128, generator=gen) * 0.02
    qw = exl3.quantize_linear(W, 4, "mcg", seed=5, data_scale=1.25, progress=False)
    assert qw.layout == "exl3" and qw.had_block == 128 and qw.spec.name == "L16K4V1-mcg"
    rel = float(((qw.dequantize() - W) ** 2).sum() / (W**2).sum())
    assert 0.003 < rel < 0.0065  # spec: ~0.0046 for 3INST-like codes at K=4 (bound 0.0039)
    tensors = exl3.to_tensors(qw)
    back, _ = exl3.load_linear(tensors)
    assert torch.equal(back.dequantize(), qw.dequantize())  # SV was already fp16
    x = torch.randn(4, 128, generator=gen)
    y = x @ W.t()
    assert float((back.reference_forward(x) - y).norm() / y.norm()) < 0.1


@pytest.mark.slow
def test_quantize_with_hessian_reduces_proxy_loss(gen):
    n = 128
    W = torch.randn(128, n, generator=gen)
    idx = torch.arange(n, dtype=torch.float64)
    u = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    H = 0.9 ** (idx[:, None] - idx[None, :]).abs() + u @ u.t() * 2.0
    plain = exl3.quantize_linear(W, 3, "mul1", data_scale=1.1, progress=False)
    aware = exl3.quantize_linear(W, 3, "mul1", hessian=H, data_scale=1.1, progress=False)
    assert proxy_loss(W, aware.dequantize(), H) < 0.8 * proxy_loss(W, plain.dequantize(), H)


def fake_hf_llama(tmp_path, gen, hidden=128, inter=200, vocab=96, bias=True):
    """A one-layer Llama-style directory (intermediate size 200 exercises the 128-padding)."""
    import json

    from safetensors.torch import save_file

    shapes = {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }
    state = {f"model.layers.0.{k}.weight": torch.randn(*s, generator=gen).half() for k, s in shapes.items()}
    if bias:
        state["model.layers.0.self_attn.q_proj.bias"] = torch.randn(hidden, generator=gen).half()
    state["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=gen).half()
    state["model.norm.weight"] = torch.ones(hidden).half()
    state["lm_head.weight"] = torch.randn(vocab, hidden, generator=gen).half()
    src = tmp_path / "src"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    (src / "tokenizer.json").write_text("{}")
    return src, state


def random_exl3_fn(gen, made):
    """Stands in for the (slow, separately tested) Viterbi search: a random EXL3 weight of W's shape."""
    from qtip_triton.bitstream import get_layout
    from qtip_triton.spec import TrellisSpec
    from qtip_triton.weight import QuantizedWeight

    def fn(W, K, code, seed):
        m, n = W.shape
        assert m % 128 == 0 and n % 128 == 0, "quantize_model must pad to 128"
        spec = TrellisSpec(16, K, 1, code)
        words = torch.randint(0, 1 << 32, (m // 16, n // 16, 8 * K), generator=gen, dtype=torch.int64)
        qw = QuantizedWeight(spec, m, n, get_layout("exl3").pack(words, spec), torch.ones(n),
                             torch.rand(m, generator=gen).half().float() + 0.5, layout="exl3", had_block=128)
        made.append((W, qw))
        return qw

    return fn


def test_quantize_model_directory(tmp_path, gen):
    src, state = fake_hf_llama(tmp_path, gen)
    made = []
    qc = exl3.quantize_model(src, tmp_path / "dst", 4, "mul1", head_bits=6, progress=False,
                             quantize_fn=random_exl3_fn(gen, made))
    assert len(made) == 8 and qc["bits"] == 4 and qc["head_bits"] == 6 and qc["codebook"] == "mul1"
    assert (tmp_path / "dst" / "tokenizer.json").is_file()
    qc2, tensors = exl3.read_checkpoint(tmp_path / "dst")
    assert qc2 == qc
    # plain tensors copied bit for bit; no HF weight of a quantized linear left behind
    for k in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(tensors[k], state[k])
    assert not any(k.endswith("_proj.weight") or k == "lm_head.weight" for k in tensors)
    modules = exl3.group_modules(tensors)
    assert len(modules) == 8
    by_w = {id(W): qw for W, qw in made}
    assert len(by_w) == 8
    up, _ = exl3.load_linear(modules["model.layers.0.mlp.up_proj"])
    assert (up.out_features, up.in_features) == (256, 128)  # 200 padded to 256
    assert bool((up.SV[200:] == 0).all())  # padded outputs are exactly zero
    down, _ = exl3.load_linear(modules["model.layers.0.mlp.down_proj"])
    assert (down.out_features, down.in_features) == (128, 256)
    q, qb = exl3.load_linear(modules["model.layers.0.self_attn.q_proj"])
    assert torch.equal(qb, state["model.layers.0.self_attn.q_proj.bias"])
    head, _ = exl3.load_linear(modules["lm_head"])
    assert head.spec.K == 6 and head.out_features == 128  # vocab 96 padded
    # the weights handed to the search were the (padded) HF weights
    Ws = [W for W, _ in made]
    assert any(W.shape == (256, 128) and torch.equal(W[:200], state["model.layers.0.mlp.up_proj.weight"].float())
               and bool((W[200:] == 0).all()) for W in Ws)


def test_quantize_model_errors(tmp_path, gen):
    with pytest.raises(ValueError, match="no config.json"):
        exl3.quantize_model(tmp_path, tmp_path / "out", 4)
    src, _ = fake_hf_llama(tmp_path, gen)
    import json

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "exl3"}}))
    with pytest.raises(ValueError, match="already quantized \\('exl3'\\)"):
        exl3.quantize_model(src, tmp_path / "out", 4)
