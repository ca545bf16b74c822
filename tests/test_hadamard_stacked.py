"""The stacked many-token Hadamard kernel (several tokens' Z views along the rows of one tile, interpreter): its
errors and when the dispatch takes it (its results against float64: tests/test_hadamard_kernel.py)."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import kernels
from qtip_triton.kernels import hadamard as had
from qtip_triton.kernels.hadamard import transform
from tests.test_hadamard_kernel import _reference, _rel

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)


def test_stacked_kernel_errors():
    x = torch.zeros(2, 44032)  # 44032 = 172 x 256: A = hadK ⊗ H_2 pads to 512 rows
    with pytest.raises(ValueError, match="at most 256"):
        transform(x, 1, transpose=False, interpret=True, stacked=True)
    for kw in ({"tall": True}, {"gemm": True}, {"zb_first": True}):
        with pytest.raises(ValueError, match="stacked is a kernel of its own"):
            transform(torch.zeros(2, 4096), 1, transpose=False, interpret=True, stacked=True, **kw)
    for rows in (8, 48, 512):
        with pytest.raises(ValueError, match="stack_rows must be a power of two"):
            transform(torch.zeros(2, 4096), 1, transpose=False, interpret=True, stacked=True, stack_rows=rows)
    for cols in (8, 48, 256):
        with pytest.raises(ValueError, match="stack_cols must be a power of two"):
            transform(torch.zeros(2, 11008), 1, transpose=False, interpret=True, stacked=True, stack_cols=cols)
    with pytest.raises(ValueError, match="stack_warps must be 4 or 8"):
        transform(torch.zeros(2, 11008), 1, transpose=False, interpret=True, stacked=True, stack_warps=2)
    for kc in (8, 48, 128):
        with pytest.raises(ValueError, match="stack_kc must be 16, 32 or 64"):
            transform(torch.zeros(2, 11008), 1, transpose=False, interpret=True, stacked=True, stack_kc=kc)


def test_stacked_tiles_of_fewer_columns_serve_grouped_outputs(gen):
    """A of 256 padded rows (11008 = 172 x 64) with 16 or 32 columns of Y a program and 4 warps: the grouped
    output transform (each group's partials summed and scaled by its own post) still matches float64, and the grid
    has CP / columns programs per (token, block) row."""
    parts = torch.randn(2, 3, 2, 11008, generator=gen)  # (groups, splits, tokens, n)
    post = torch.randn(2, 11008, generator=gen)
    for cols, warps in ((32, None), (16, 4)):
        y = transform(parts, 1, transpose=False, post=post, out_dtype=torch.float32, interpret=True, stacked=True,
                      stack_cols=cols, stack_warps=warps)
        for g in range(2):
            ref = _reference(parts[g].double().sum(0), 1, False) * post[g].double()
            assert _rel(y[:, g * 11008:(g + 1) * 11008], ref) < 1e-6, (cols, g)
        grid, consts = had._stack_launch(2, 2, 256, 64, None, cols, warps)
        assert grid == (4, 64 // cols) and consts["CB"] == cols and consts["num_warps"] == (warps or 4)


def test_sliced_tiles_take_four_warps_where_they_were_measured_faster():
    """Tiles of A with 256 padded rows: 4 warps for natural-order inputs (11008, 28672) and 64-column outputs
    (11008); 8 for 128-column outputs (28672) and inputs into a destination order, and for every whole tile."""
    launch = had._stack_launch
    assert launch(512, 1, 256, 64)[1]["num_warps"] == 4  # 11008 output
    assert launch(512, 1, 256, 128, transpose=True)[1]["num_warps"] == 4  # 28672 natural input
    assert launch(512, 1, 256, 128)[1]["num_warps"] == had.STACK_WARPS == 8  # 28672 output
    assert launch(512, 1, 256, 64, transpose=True, dst=True)[1]["num_warps"] == 8  # into a destination order
    assert launch(512, 1, 32, 128, transpose=True)[1]["num_warps"] == 8  # a whole tile (4096)
    assert launch(512, 1, 256, 64, None, None, 8)[1]["num_warps"] == 8  # the bench's override
    assert launch(512, 1, 256, 64, None, None, None, 32)[1]["KC"] == 32 and launch(512, 1, 256, 64)[1]["KC"] == 64


class _Spy:
    """Stands for a kernel: records its ``name`` in ``launched`` (and, given ``grids``, each launch's grid there)."""

    def __init__(self, name, kernel, launched, grids=None):
        self.name, self.kernel, self.launched, self.grids = name, kernel, launched, grids

    def __getitem__(self, grid):
        self.launched.append(self.name)
        if self.grids is not None:
            self.grids.append(grid)
        return self.kernel[grid]


def test_stacked_kernel_is_chosen_from_its_switch(gen, monkeypatch):
    """QTIP_TRITON_HADAMARD_STACKED=N takes it from N (token, block) rows where A has at most 256 padded rows, 0
    never, unless another launch variant is asked for; blocks without A (<= 128) ignore it. Same results."""
    launched: list[str] = []
    for name, label in (("_had2_stack_kernel", "stacked"), ("_had2_kernel", "per-token"),
                        ("_had2_tall_kernel", "tall"), ("_had1_kernel", "had1")):
        monkeypatch.setattr(had, name, _Spy(label, getattr(had, name), launched))
    monkeypatch.setenv(had.STACK_ENV, "0")
    x = torch.randn(8, 4096, generator=gen)
    plain = transform(x, 1, transpose=False, out_dtype=torch.float32, interpret=True)
    monkeypatch.setenv(had.STACK_ENV, "8")
    stacked = transform(x, 1, transpose=False, out_dtype=torch.float32, interpret=True)
    transform(x[:7], 1, transpose=False, interpret=True)  # below the threshold
    transform(x, 1, transpose=False, interpret=True, col_split=True)  # an explicit variant wins
    transform(torch.randn(8, 2752, generator=gen), 1, transpose=False, interpret=True, tall=False)  # so does tall=False
    transform(torch.randn(8, 128, generator=gen), 1, transpose=False, interpret=True, stacked=True)  # no A
    assert launched == ["per-token", "stacked", "per-token", "per-token", "per-token", "had1"]
    assert _rel(stacked, plain.double()) < 1e-6
    monkeypatch.setenv(had.STACK_ENV, "many")
    with pytest.raises(ValueError, match="expected a row count"):
        transform(x, 1, transpose=False, interpret=True)


def test_stacked_kernel_default_thresholds_follow_direction_order_and_size(monkeypatch):
    """Unset, the measured thresholds: outputs from 32 rows (256 where A has fewer than 32), natural-order inputs from 96, inputs into a decode
    kernel's order from 1024 where A has 64+ rows and never at 32; A of more than 256 rows never; the tall kernel
    keeps what is left (input transforms of A with 512 rows). Tiles hold one token's A below 256 rows, 128 rows
    (or A's, where larger) from there: a variant of its own in the launch key."""
    monkeypatch.delenv(had.STACK_ENV, raising=False)
    key = had.launch_key
    assert key(8192, 1, 32)[0] == "stacked" and key(8192, 1, 31)[0] == "had2"  # A of 64 padded rows
    assert key(11008, 1, 32)[0] == "stacked"  # A of 256: one token per tile
    assert key(4096, 1, 32)[0] == "stacked" and key(4096, 1, 31)[0] == "had2"  # A of 32
    assert key(4096, 1, 255)[1] == 32 and key(4096, 1, 1024)[1] == 128  # tile rows: one token's A, then 128
    assert key(8192, 1, 200)[1] == 64 and key(11008, 1, 64)[1] == key(11008, 1, 2048)[1] == 256
    assert had.stack_tile_rows(255, 16) == 128 and had.stack_tile_rows(4096, 128) == 128  # A of 16 rows: 128 always
    assert key(2048, 1, 255)[0] == "had2" and key(2048, 1, 256) == ("stacked", 128, "div16")  # ... from 256 rows
    assert key(4096, 1, 96, transpose=True)[0] == "stacked" and key(4096, 1, 95, transpose=True)[0] == "had2"
    assert key(4096, 1, 8192, transpose=True, dst=True)[0] == "had2"
    assert key(8192, 1, 1024, transpose=True, dst=True)[0] == "stacked"
    assert key(8192, 1, 1023, transpose=True, dst=True)[0] == "had2"
    assert key(44032, 1, 2048)[0] == "tall" and key(44032, 1, 2048, transpose=True, dst=True)[0] == "tall"
    assert had.stack_min_rows(True, True, 32) is None and had.stack_min_rows(False, False, 512) is None
    monkeypatch.setenv(had.STACK_ENV, "0")
    assert key(11008, 1, 2048)[0] == "tall"


def test_stacked_kernel_takes_bf16_activations(gen):
    """A bf16 model's x (and a bf16 result): the kernel reads any 16-bit input into fp32 and writes y's dtype."""
    x = torch.randn(6, 4096, generator=gen).bfloat16()
    su = torch.randn(4096, generator=gen)
    ref = _reference(x.double() * su.double(), 1, True)
    y = transform(x, 1, transpose=True, pre=su, out_dtype=torch.float32, interpret=True, stacked=True)
    assert _rel(y, ref) < 1e-6
    y16 = transform(x, 1, transpose=True, pre=su, interpret=True, stacked=True)
    assert y16.dtype == torch.bfloat16 and _rel(y16, ref) < 1e-2


def test_grouped_inputs_count_every_shards_rows_with_their_switch(gen, monkeypatch):
    """By default (QTIP_TRITON_HADAMARD_STACK_GROUPS unset or 1) a grouped input transform (a fused layer's shards)
    asks the stacked kernel's threshold about all groups' rows, in the launch key and in the launch; outputs and single
    inputs keep one group's; 0 counts one group's. The stacked result is the per-token one within float rounding."""
    launched: list[str] = []
    for name, label in (("_had2_stack_kernel", "stacked"), ("_had2_kernel", "per-token")):
        monkeypatch.setattr(had, name, _Spy(label, getattr(had, name), launched))
    monkeypatch.delenv(had.STACK_ENV, raising=False)
    monkeypatch.setenv(had.STACK_GROUPS_ENV, "0")
    key = had.launch_key
    assert key(4096, 1, 64, 3, transpose=True)[0] == "had2"
    x = torch.randn(64, 4096, generator=gen).half()
    pre = torch.randn(3, 4096, generator=gen)
    plain = transform(x, 1, transpose=True, pre=pre, out_dtype=torch.float32, interpret=True)
    for on in ("1", ""):
        monkeypatch.setenv(had.STACK_GROUPS_ENV, on)
        assert key(4096, 1, 64, 3, transpose=True)[0] == "stacked" and key(4096, 1, 31, 3, transpose=True)[0] == "had2"
        assert key(4096, 1, 32, 3, transpose=True)[0] == "stacked"  # 96 rows
        assert key(4096, 1, 64, 3, transpose=False)[0] == key(4096, 1, 64, 1, transpose=False)[0]  # outputs: per group
        assert key(4096, 1, 64, 1, transpose=True)[0] == "had2"
    grouped = transform(x, 1, transpose=True, pre=pre, out_dtype=torch.float32, interpret=True)
    transform(x, 1, transpose=True, pre=pre[0], out_dtype=torch.float32, interpret=True)  # one input: 64 rows
    assert launched == ["per-token", "stacked", "per-token"]
    assert _rel(grouped, plain.double()) < 1e-6


def test_tiles_from_256_rows_shrink_to_keep_the_grid_full(monkeypatch):
    """From 256 rows a tile grows to 128 rows only while the grid keeps STACK_MIN_PROGRAMS programs (counting every
    group's tiles), halving down to one token's A; A of 16 rows keeps 128 and A of 256 its own; the launch key and
    the launched grid agree; QTIP_TRITON_HADAMARD_STACK_FILL=0 restores 128-row tiles."""
    monkeypatch.delenv(had.STACK_ENV, raising=False)
    monkeypatch.delenv(had.STACK_FILL_ENV, raising=False)
    tile, key = had.stack_tile_rows, had.launch_key
    assert had.STACK_MIN_PROGRAMS == 128
    assert tile(256, 32) == 64 and tile(508, 32) == 64 and tile(509, 32) == 128  # 4096: 128 programs and up
    assert tile(256, 32, groups=2) == 128 and tile(256, 32, groups=3) == 128  # 2 x 64 programs fill it
    assert tile(256, 64) == 128 and tile(128 * 8, 64) == 128  # 8192 at 256 tokens: 128 programs of 2 tokens
    assert tile(4096, 32) == 128 and tile(300, 128) == 128 and tile(256, 256) == 256 and tile(256, 16) == 128
    assert tile(256, 32, groups=0) == 64  # an ungrouped call counts as one group
    assert key(4096, 1, 256)[1] == 64 and key(4096, 1, 256, 2)[1] == 128
    assert key(4096, 1, 256) != key(4096, 1, 512)  # two tiles, two compiled kernels: the warm-up launches both
    grid, consts = had._stack_launch(256, 1, 32, 128)
    assert consts["TT"] == 2 and grid == (128, 1)
    monkeypatch.setenv(had.STACK_FILL_ENV, "0")
    assert tile(256, 32) == 128 and key(4096, 1, 256)[1] == 128 and had._stack_launch(256, 1, 32, 128)[0] == (64, 1)


def test_a_filled_grid_gives_the_results_of_the_full_tile(gen, monkeypatch):
    """256 tokens of 4096 features: the default's 64-row tiles (two tokens each, 128 programs) give the values of
    the 128-row tiles the fill turns off (64 programs), and of float64."""
    monkeypatch.delenv(had.STACK_ENV, raising=False)
    x = torch.randn(256, 4096, generator=gen)
    launched: list[tuple] = []
    monkeypatch.setattr(had, "_had2_stack_kernel", _Spy("stacked", had._had2_stack_kernel, [], grids=launched))
    monkeypatch.delenv(had.STACK_FILL_ENV, raising=False)
    filled = transform(x, 1, transpose=False, out_dtype=torch.float32, interpret=True)
    monkeypatch.setenv(had.STACK_FILL_ENV, "0")
    full = transform(x, 1, transpose=False, out_dtype=torch.float32, interpret=True)
    assert launched == [(128, 1), (64, 1)]
    assert _rel(filled, full.double()) < 1e-6 and _rel(filled, _reference(x.double(), 1, False)) < 1e-6
