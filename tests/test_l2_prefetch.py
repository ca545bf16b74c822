"""The ``l2_prefetch`` config of the gemv and gemm kinds: the words of the next D k steps are requested into L2
(``prefetch.global.L2``) before the table fill and the PDL wait, and kept D steps ahead in the k loop. A hint
only, so every variant's output must equal its plain twin bit for bit (the interpreter skips the prefetch
itself but runs the offsets and the step conditions around it); the sm_90 compile must carry the prefetches
where the source puts them."""

from __future__ import annotations

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import TrellisSpec, kernels
from qtip_triton.codegen.emit import emit
from qtip_triton.kernels.prepare import prepare
from tests.partials import assert_same_partials
from tests.test_sass_count import BIN, compiled

interpreted = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)
SYNC = "grid_dependency_sync(PDL)"


def _gemv(bm: int, bk: int, split: int, **extra) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 2, "table": "shared16",
            **extra}


@interpreted
@pytest.mark.parametrize("name,out_f,in_f,variant", [
    ("L16K2V2-hyb9", 64, 1024, {}), ("L16K3V2-hyb9", 96, 768, {}), ("L12K2V1-1mad", 64, 96, {}),
    ("L16K2V2-hyb9", 64, 1024, {"early_words": True}), ("L16K4V2-hyb9", 64, 512, {"hfma": True}),
], ids=["K2", "K3", "1mad", "K2-early", "K4-hfma"])
def test_l2_prefetch_gives_the_plain_gemv_partials(gen, name, out_f, in_f, variant):
    spec = TrellisSpec.parse(name)
    qw = random_qweight(gen, spec, out_f, in_f, layout="qtip" if spec.V == 2 and spec.L == 16 else "tile")
    pw = prepare(qw)
    # 1 to 8 k steps per split: the head's steps past the end, and steps kept ahead in the loop
    for M, bm, bk, split, depth in ((1, 1, 128, 1, 1), (1, 1, 256, 2, 2), (3, 2, 64, 1, 3), (2, 2, 64, 2, 8)):
        h = torch.randn(M, in_f, generator=gen)
        cfg = _gemv(bm, bk, split, **variant)
        assert_same_partials("gemv", pw, h, cfg, [{"l2_prefetch": depth}], h_order="natural",
                             where=(M, bm, bk, split))


@interpreted
@pytest.mark.parametrize("kind,cfg", [
    ("gemv", {"BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 2, "table": "shared", "mma": True}),
    ("gemm", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4}),
], ids=["mma", "gemm"])
def test_l2_prefetch_gives_the_plain_tensor_core_partials(gen, kind, cfg):
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    pw = prepare(random_qweight(gen, spec, 64, 1024, layout="qtip"))  # 4 k steps of 256 (mma) or 8 of 64 a split
    h = torch.randn(5, 1024, generator=gen).to(torch.float16)
    assert_same_partials(kind, pw, h, cfg, [{"l2_prefetch": 1}], h_order="natural")


def test_prefetches_go_before_the_fill_and_the_wait_and_ahead_in_the_loop():
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    for variant in ({}, {"early_words": True}):
        src = emit(spec, "gemv", {"table": "shared16", "l2_prefetch": 2, **variant})
        body = src[src.index("def kernel("):]
        head = body.index("for pf in tl.static_range(1, 3):")
        assert head < body.index("_fill_table(") < body.index(SYNC)
        if variant:  # the first step's own loads are issued first
            assert body.index("w0_nx = tl.load(W") < head
        loop = body[body.index("for it in range(ITERS):"):]
        assert loop.index("if it + 3 < ITERS:") < loop.index("_prefetch_l2(W + 1 * stride_wq + pf_off + (it + 3) * CB")
        assert loop.index("_prefetch_l2(") < loop.index("s0 = ")  # at the top of the step


def test_plain_configs_keep_their_source():
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    for kind in ("gemv", "gemm"):
        assert emit(spec, kind, {}) == emit(spec, kind, {"l2_prefetch": 0})
        assert "_prefetch_l2" not in emit(spec, kind, {})


@pytest.mark.parametrize("kind,config,match", [
    ("gemv", {"l2_prefetch": True}, "must be an int"),
    ("gemv", {"l2_prefetch": 9}, r"in \[0, 8\]"),
    ("gemm", {"l2_prefetch": -1}, r"in \[0, 8\]"),
    ("decompress", {"l2_prefetch": 1}, "only for kinds"),
])
def test_bad_l2_prefetch_configs_are_clear_errors(kind, config, match):
    with pytest.raises(ValueError, match=match):
        emit(TrellisSpec.parse("L16K2V2-hyb9"), kind, config)


@pytest.mark.skipif(not (BIN / "cuobjdump").exists(), reason="the Triton wheel has no NVIDIA tools")
def test_sm90_compile_prefetches_before_the_wait_and_in_the_loop():
    cfg = {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 4, "table": "shared16"}
    plain, = compiled("L16K2V2-hyb9", config=cfg, extra=("--pdl", "early"))
    pref, = compiled("L16K2V2-hyb9", config={**cfg, "l2_prefetch": 1}, extra=("--pdl", "early"))
    assert plain["l2_prefetches"] == {"total": 0, "before_wait": 0}, plain
    assert pref["l2_prefetches"]["before_wait"] >= 2, pref  # one per word slot at least
    assert pref["opcodes"].get("CCTL", 0) >= 2, pref["opcodes"]  # the loop keeps a step requested ahead
    assert pref["reg"] <= plain["reg"] + 8 and pref["stack"] == 0, (plain, pref)
