"""Split-K summed inside the decode kernels (runners.split_sum_in_kernel, codegen split_sum): the last
program of each row block adds every split's partial, in split order, and zeroes its counter again.

Checked in the interpreter against the same kernels with the sum left to the output transform: the
kernel's sum must equal the partials added in split order bit for bit, whole forwards must be identical,
and the counters must be zero after every launch (a graph replay relies on it)."""

from __future__ import annotations

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import TrellisSpec, kernels, linear
from qtip_triton.kernels import runners
from qtip_triton.kernels.prepare import prepare

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

CONFIGS = {
    "gemv": {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 2, "table": "shared"},
    "mma": {"BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 2, "table": "shared", "mma": True},
    "gemm": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4},
}


def _in_order(parts: torch.Tensor) -> torch.Tensor:
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


@pytest.mark.parametrize("variant,split,M",
                         [("gemv", 2, 3), ("gemv", 3, 1), ("gemv", 8, 2), ("mma", 2, 5), ("gemm", 4, 17)])
def test_kernel_sum_equals_the_partials_in_split_order(gen, monkeypatch, variant, split, M):
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 96, 1024, layout="qtip")  # 96: a ragged row block
    pw = prepare(qw)
    kind = "gemm" if variant == "gemm" else "gemv"
    cfg = {**CONFIGS[variant], "SPLIT_K": split}
    h = torch.randn(M, 1024, generator=gen)
    if kind == "gemm":
        h = h.half()
    monkeypatch.setenv(runners.SPLIT_SUM_ENV, "transform")
    parts = kernels.decode_matmul(kind, pw, h, cfg, h_order="natural")
    assert parts.shape == (split, M, 96)
    monkeypatch.setenv(runners.SPLIT_SUM_ENV, "kernel")
    for _ in range(2):  # the second launch finds the counters zeroed by the first
        summed = kernels.decode_matmul(kind, pw, h, cfg, h_order="natural")
        assert summed.shape == (1, M, 96)
        assert torch.equal(summed[0], _in_order(parts))
        counters = pw.cache[runners._COUNTERS_KEY]
        assert counters.dtype == torch.int32 and not counters.any()


def test_forward_is_identical_either_way(gen, monkeypatch):
    qw = random_qweight(gen, TrellisSpec.parse("L16K3V2-hyb9"), 64, 2048, layout="qtip")
    x = torch.randn(2, 2048, generator=gen).half()
    cfg = {**CONFIGS["gemv"], "SPLIT_K": 4}
    monkeypatch.setenv(runners.SPLIT_SUM_ENV, "transform")
    a = linear(x, qw, kind="gemv", config=cfg)
    monkeypatch.setenv(runners.SPLIT_SUM_ENV, "kernel")
    b = linear(x, qw, kind="gemv", config=cfg)
    assert torch.equal(a, b)
    ref = qw.reference_forward(x.double())
    assert float((b.double() - ref).norm() / ref.norm()) <= 2e-3


def test_grouped_shards_sum_in_kernel(gen, monkeypatch):
    """launch_shards with one grouped output transform reads only the summed slot of each shard."""
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    qws = [random_qweight(gen, spec, 32, 512, layout="qtip") for _ in range(3)]
    x = torch.randn(1, 512, generator=gen).half()
    pre = torch.stack([prepare(q).SU for q in qws]).float().contiguous()
    post = torch.stack([prepare(q).SV for q in qws]).float().contiguous()
    cfg = {**CONFIGS["gemv"], "BLOCK_M": 1, "SPLIT_K": 2}
    outs = {}
    for mode in ("transform", "kernel"):
        monkeypatch.setenv(runners.SPLIT_SUM_ENV, mode)
        out = torch.empty(1, 96, dtype=torch.float16)
        outs[mode] = kernels.launch_shards("gemv", x, qws, [cfg] * 3, pre, out, post)
    assert torch.equal(outs["transform"], outs["kernel"])
    alone = torch.cat([linear(x, q, kind="gemv", config=cfg) for q in qws], -1)
    assert torch.equal(outs["kernel"], alone)


def test_no_split_makes_no_counters(gen):
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 32, 512, layout="qtip")
    pw = prepare(qw)
    out = kernels.decode_matmul("gemv", pw, torch.randn(1, 512, generator=gen), {**CONFIGS["gemv"], "SPLIT_K": 1},
                                h_order="natural")
    assert out.shape == (1, 1, 32) and runners._COUNTERS_KEY not in pw.cache


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv(runners.SPLIT_SUM_ENV, "atomics")
    with pytest.raises(ValueError, match="QTIP_TRITON_SPLIT_SUM"):
        runners.split_sum_in_kernel()


def test_the_config_chooses_when_the_environment_does_not(gen, monkeypatch):
    monkeypatch.delenv(runners.SPLIT_SUM_ENV, raising=False)
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 32, 1024, layout="qtip")
    pw = prepare(qw)
    h = torch.randn(1, 1024, generator=gen)
    cfg = {**CONFIGS["gemv"], "BLOCK_M": 1, "SPLIT_K": 4}
    parts = kernels.decode_matmul("gemv", pw, h, cfg, h_order="natural")
    assert parts.shape == (4, 1, 32)  # no key: the output transform sums
    summed = kernels.decode_matmul("gemv", pw, h, {**cfg, "split_sum": True}, h_order="natural")
    assert summed.shape == (1, 1, 32) and torch.equal(summed[0], _in_order(parts))
    monkeypatch.setenv(runners.SPLIT_SUM_ENV, "transform")  # the environment overrides the config
    assert kernels.decode_matmul("gemv", pw, h, {**cfg, "split_sum": True}, h_order="natural").shape[0] == 4
    monkeypatch.delenv(runners.SPLIT_SUM_ENV)
    with pytest.raises(ValueError, match="split_sum"):
        kernels.decode_matmul("gemv", pw, h, {**cfg, "split_sum": "yes"}, h_order="natural")


def test_space_and_default_offer_the_in_kernel_sum():
    from qtip_triton.kernels.configs import config_space, default_config

    spec = TrellisSpec.parse("L16K2V2-hyb9")
    for kind, M in (("gemv", 1), ("gemv", 8), ("gemm", 16)):
        space = config_space(kind, spec, 8192, 8192, M)
        summed = [c for c in space if c.get("split_sum")]
        assert summed and all(c["SPLIT_K"] > 1 for c in summed)
        assert all({k: v for k, v in c.items() if k != "split_sum"} in space for c in summed)
    assert default_config("gemv", spec, 8192, 8192, 1).get("split_sum") is True
    assert "split_sum" not in default_config("gemv", spec, 4096, 4096, 1)
    assert "split_sum" not in default_config("gemv", spec, 8192, 8192, 8)
