"""CPU tests of the wgmma kind's grouped shards (``QTIP_TRITON_WGMMA_SHARED_INPUT``, on unless 0): when shards may share one input
transform, and that the grouped transform writes each shard's h as that shard's own transform does. The
decode itself needs a Hopper GPU (tests/gpu/test_wgmma_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from blas_ties import assert_equal_but_blas_ties
from test_weight import random_qweight

from qtip_triton import TrellisSpec, kernels
from qtip_triton.kernels import _grouped_input, _wgmma_input, gather_after_transform, hadamard, interpreting, wgmma
from qtip_triton.kernels.prepare import prepare

SPEC = TrellisSpec.parse("L16K2V2-hyb9")
CFG = {"E": 2, "BLOCK_M": 64, "num_warps": 4, "STAGES": 3, "SPLIT_K": 2}


def _shards(gen, n: int = 512, outs=(32, 32, 32)):
    return [prepare(random_qweight(gen, SPEC, m, n, layout="qtip")) for m in outs]


def test_wgmma_shards_share_an_input_only_with_the_switch_and_one_E(gen, monkeypatch):
    pws = _shards(gen)
    monkeypatch.setenv(kernels.WGMMA_SHARED_INPUT_ENV, "0")
    assert not kernels.can_share_input("wgmma", pws, [CFG] * 3)  # the switch turns it off
    monkeypatch.delenv(kernels.WGMMA_SHARED_INPUT_ENV, raising=False)
    assert kernels.can_share_input("wgmma", pws, [CFG] * 3)  # on by default
    monkeypatch.setenv(kernels.WGMMA_SHARED_INPUT_ENV, "1")
    assert kernels.can_share_input("wgmma", pws, [CFG] * 3)
    assert not kernels.can_share_input("wgmma", pws)  # the order depends on each config's E: no configs, no sharing
    assert not kernels.can_share_input("wgmma", pws, [CFG, CFG, {**CFG, "E": 1}])
    assert not kernels.can_share_input("wgmma", pws, [CFG, CFG, {**CFG, "OUT16": 1}])  # fp16 partials
    other = _shards(gen, n=1024, outs=(32,))
    assert not kernels.can_share_input("wgmma", pws[:2] + other, [CFG] * 3)
    assert kernels.can_share_input("gemv", pws) and not kernels.can_share_input("decompress", pws)


def test_launch_shards_refuses_wgmma_with_the_switch_off(gen, monkeypatch):
    monkeypatch.setenv(kernels.WGMMA_SHARED_INPUT_ENV, "0")
    pws = _shards(gen)
    x = torch.randn(4, 512, generator=gen).half()
    pre = torch.stack([pw.SU.float() for pw in pws]).contiguous()
    with pytest.raises(ValueError, match=kernels.WGMMA_SHARED_INPUT_ENV):
        kernels.launch_shards("wgmma", x, pws, [CFG] * 3, pre, torch.empty(4, 96, dtype=torch.float16))


@pytest.mark.parametrize("M", [5, 50, 130])
def test_grouped_wgmma_input_is_each_shards_own_input(gen, M):
    """One transform for three shards (their SU stacked) writes, for each shard, the fp16 h in the kernel's order for
    its E: bit for bit as that shard's own input transform where both take the same path (the scattered store at 5
    tokens; at 130 the natural-order transform, the stacked kernel, and a gather). At 50 tokens the three shards'
    150 rows gather while one shard's own input does not: there h is the grouped natural transform gathered, bit for
    bit, and within fp16 rounding of the shard's own."""
    grouped, alone = gather_after_transform(512, 1, M, 3), gather_after_transform(512, 1, M)
    assert (grouped, alone) == {5: (False, False), 50: (True, False), 130: (True, True)}[M]
    pws = _shards(gen)
    x = torch.randn(M, 512, generator=gen).half()
    pre = torch.stack([pw.SU.float() for pw in pws]).contiguous()
    out = torch.empty(M, 96, dtype=torch.float16)
    h = _grouped_input("wgmma", x, pws, pre, 96, out, [CFG] * 3)
    assert h.shape == (3, M, 512) and h.dtype == torch.float16
    natural = hadamard.transform(x, 1, transpose=True, pre=pre, out_dtype=torch.float16, interpret=interpreting())
    for g, pw in enumerate(pws):
        own = _wgmma_input(pw, x, CFG["E"])
        if grouped == alone:
            assert torch.equal(h[g], own), g
        else:
            assert_equal_but_blas_ties(h[g], natural[g].index_select(-1, wgmma.input_gather(pw, CFG["E"])), g)
            assert ((h[g].float() - own.float()).norm() / own.float().norm()).item() < 1e-3, g


def test_stacked_shard_bounds_and_the_fused_decode_switch(gen, monkeypatch):
    """A fused weight's word-row bounds for one SHARDS launch: the second and third shards' first word rows (half
    their first output rows), past the end for two shards; row blocks that would straddle two shards, warp-specialized
    or fp16-partial configs are refused; the switch is off by default and never on off a Hopper GPU."""
    from qtip_triton.kernels import wgmma as wg
    from qtip_triton.kernels.prepare import fuse_shards

    fused = fuse_shards(_shards(gen, outs=(128, 64, 64)))
    assert fused is not None and fused.shard_out == (128, 64, 64) and fused.words.shape[1] == 128
    cfg = {"E": 2, "BLOCK_M": 16, "num_warps": 4, "STAGES": 3}  # 32 word rows, 64 output rows per program
    assert wg.shard_word_bounds(fused, cfg) == (64, 96) and wg.fused_ok(fused, cfg)
    two = fuse_shards(_shards(gen, outs=(64, 64)))
    assert wg.shard_word_bounds(two, cfg) == (32, two.words.shape[1] + 1)
    wide = {**cfg, "num_warps": 8}  # 128 output rows per program: the 64-row shards would share one
    assert not wg.fused_ok(fused, wide)
    with pytest.raises(ValueError, match="multiples"):
        wg.shard_word_bounds(fused, wide)
    assert not wg.fused_ok(fused, {**cfg, "OUT16": 1, "SPLIT_K": 1})
    assert not wg.fused_ok(fused, {**cfg, "SPLIT_K": 3})  # k steps that do not divide
    assert not wg.fused_ok(_shards(gen)[0], cfg)  # not a fused weight
    monkeypatch.delenv(kernels.WGMMA_FUSED_DECODE_ENV, raising=False)
    top = kernels.WGMMA_FUSED_DECODE_MAX_ROWS
    assert kernels.wgmma_fused_decode_on(1) and kernels.wgmma_fused_decode_on(top)
    assert not kernels.wgmma_fused_decode_on(top + 1)
    assert not kernels.wgmma_fused_ok(fused, cfg, 64)  # no Hopper GPU here
    monkeypatch.setenv(kernels.WGMMA_FUSED_DECODE_ENV, "1")
    assert kernels.wgmma_fused_decode_on(top + 1) and kernels.wgmma_fused_decode_on(4096)
    assert not kernels.wgmma_fused_ok(fused, cfg, 64)
    monkeypatch.setenv(kernels.WGMMA_FUSED_DECODE_ENV, "0")
    assert not kernels.wgmma_fused_decode_on(1)
    monkeypatch.setenv(kernels.WGMMA_FUSED_DECODE_ENV, "yes")
    with pytest.raises(ValueError, match=kernels.WGMMA_FUSED_DECODE_ENV):
        kernels.wgmma_fused_ok(fused, cfg, 64)


@pytest.mark.parametrize("lead, M", [((), 160), ((3,), 100), ((), 256), ((2,), 1)])
def test_h_buffers_reserve_whole_tiles_behind_their_last_row(lead, M):
    n = 64
    h = wgmma.h_buffer(lead, M, n, torch.device("cpu"))
    assert h.shape == (*lead, M, n) and h.dtype == torch.float16 and h.is_contiguous()
    G = lead[0] if lead else 1
    slack = -M % wgmma.TILE_ROWS
    assert h.untyped_storage().nbytes() == (G * M + slack) * n * 2  # the slack and not a row more
    for bm in (64, 128, 256):  # every tile the kernel's configs use fits the reserve
        need = (G - 1) * M + -(-M // bm) * bm
        assert wgmma.described_rows(h.view(-1, n), need) == need


def test_described_rows_stay_inside_the_storage():
    n = 64
    plain = torch.empty(160, n, dtype=torch.float16)
    assert wgmma.described_rows(plain, 256) == 160  # nothing behind it: exactly its rows (TMA zero-fills the rest)
    part = torch.empty(200 * n, dtype=torch.float16)[:160 * n].view(160, n)
    assert wgmma.described_rows(part, 256) == 200  # what the storage holds, not what the tile would like
    assert wgmma.described_rows(part, 180) == 180
    rows = torch.empty(300, 2 * n, dtype=torch.float16)[10:170, :n]  # strided rows inside a wider buffer
    assert wgmma.described_rows(rows, 256) == 256
    last = torch.empty(300, 2 * n, dtype=torch.float16)[140:300, n:]  # the storage ends with its last row
    assert wgmma.described_rows(last, 256) == 160


@pytest.mark.parametrize("M", [5, 100])
def test_the_layers_wgmma_input_has_whole_tiles_behind_it(gen, M):
    pws = _shards(gen)
    x = torch.randn(M, pws[0].in_features, generator=gen).half()
    single = _wgmma_input(pws[0], x, CFG["E"])
    grouped = _wgmma_input(pws[0], x, CFG["E"], torch.stack([pw.SU for pw in pws]))
    for h, G in ((single, 1), (grouped, len(pws))):
        need = (G - 1) * M + wgmma.TILE_ROWS
        assert wgmma.described_rows(h.reshape(-1, h.shape[-1]), need) == need


def test_describing_rows_past_h_is_on_by_default_and_a_switch_turns_it_off(monkeypatch):
    monkeypatch.delenv(wgmma.PAD_ROWS_ENV, raising=False)
    assert wgmma.tile_slack()
    monkeypatch.setenv(wgmma.PAD_ROWS_ENV, "1")
    assert wgmma.tile_slack()
    monkeypatch.setenv(wgmma.PAD_ROWS_ENV, "0")
    assert not wgmma.tile_slack()
