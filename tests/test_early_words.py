"""The gemv's ``early_words`` variant: the first k step's words are loaded before the code-table fill and
the PDL wait, each later step's at the end of the step before. Same loads, same arithmetic, same order:
the partials must equal the plain gemv's bit for bit, on full and ragged blocks (masked loads), with and
without split-K, for every table mode that matters; and nothing another kernel writes is read early."""

from __future__ import annotations

import re

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import TrellisSpec, kernels
from qtip_triton.codegen.emit import emit
from qtip_triton.kernels.prepare import prepare
from tests.partials import assert_same_partials

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

SYNC = "grid_dependency_sync(PDL)"
EARLY = {"early_words": True}


@pytest.mark.parametrize("name,out_f,in_f", [("L16K2V2-hyb9", 64, 1024), ("L16K3V2-hyb9", 96, 768),
                                             ("L12K2V1-1mad", 64, 96)])
@pytest.mark.parametrize("table", ["shared16", "gather"])
def test_early_words_give_the_plain_gemv_partials(gen, name, out_f, in_f, table):
    spec = TrellisSpec.parse(name)
    qw = random_qweight(gen, spec, out_f, in_f, layout="qtip" if spec.V == 2 and spec.L == 16 else "tile")
    pw = prepare(qw)
    for M, bm, bk, split in ((1, 1, 256, 1), (1, 1, 256, 2), (3, 2, 512, 1), (2, 2, 64, 2)):
        h = torch.randn(M, in_f, generator=gen)
        cfg = {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 2, "table": table}
        assert_same_partials("gemv", pw, h, cfg, [EARLY], h_order="natural", where=(M, bm, bk, split))


@pytest.mark.parametrize("name", ["L16K2V2-hyb9", "L16K4V2-hyb9"])
def test_early_words_give_the_plain_hfma_partials(gen, name):
    """The fp16x2 gemv (hfma) takes the same early loads as the plain one."""
    spec = TrellisSpec.parse(name)
    pw = prepare(random_qweight(gen, spec, 64, 1024, layout="qtip"))
    for M, bm, bk, split in ((1, 1, 256, 1), (3, 2, 256, 2)):
        h = torch.randn(M, 1024, generator=gen)
        cfg = {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 2, "table": "shared16",
               "hfma": True}
        assert_same_partials("gemv", pw, h, cfg, [EARLY], h_order="natural", where=(M, bm, bk, split))


@pytest.mark.parametrize("name,in_f", [("L16K2V2-hyb9", 1024), ("L16K4V2-hyb9", 768)])
def test_early_words_give_the_plain_mma_partials(gen, name, in_f):
    """The tensor-core gemv (mma) takes the same early loads: 8 and 16 batch rows, 1 and 2 row groups per warp,
    ragged batches (M below the block), split-K and a ragged last split (768 inputs: 3 k steps over 2)."""
    spec = TrellisSpec.parse(name)
    pw = prepare(random_qweight(gen, spec, 96, in_f, layout="qtip"))  # 96 rows: a ragged row block
    for M, bm, bn, nw, split in ((3, 8, 32, 2, 1), (8, 8, 64, 2, 2), (13, 16, 32, 1, 2)):
        h = torch.randn(M, in_f, generator=gen)
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 256, "SPLIT_K": split, "num_warps": nw, "table": "shared16",
               "mma": True}
        assert_same_partials("gemv", pw, h, cfg, [EARLY], h_order="natural", where=(M, bm, bn, nw, split))


def test_early_words_load_only_weights_before_the_wait():
    for variant in ({}, {"hfma": True}, {"BLOCK_M": 8, "BLOCK_N": 64, "num_warps": 2, "mma": True}):
        _early_before_the_wait(emit(TrellisSpec.parse("L16K2V2-hyb9"), "gemv",
                                    {"table": "shared16", "early_words": True, **variant}))


def _early_before_the_wait(src: str) -> None:
    body = src[src.index("def kernel("):]
    sync = body.index(SYNC)
    early = re.findall(r"tl\.load\((\w+)", body[:sync])
    assert set(early) == {"W", "TBL"} and early.count("W") >= 4  # EVEN and masked copies of the word loads
    assert body.index("w0_nx = tl.load(W") < body.index("_fill_table(") < sync  # words first, then the fill
    loop = body[body.index("for it in range(ITERS):"):]
    assert loop.index("w0 = w0_nx") < loop.index("nxt = tl.minimum(it + 1") < loop.index("w_off += CB")


def test_plain_configs_keep_their_source():
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    assert emit(spec, "gemv", {"table": "shared16"}) == emit(spec, "gemv", {"table": "shared16", "early_words": False})
    assert "_nx" not in emit(spec, "gemv", {"table": "shared16"})


@pytest.mark.parametrize("config,match", [
    ({"early_words": "yes"}, "must be a bool"),
    ({"early_words": True, "prefetch": 1}, "prefetch"),
    ({"early_words": True, "fuse_in": True}, "fuse_in"),
])
def test_bad_early_words_configs_are_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        emit(TrellisSpec.parse("L16K2V2-hyb9"), "gemv", config)
