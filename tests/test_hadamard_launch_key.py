"""``launch_key`` (what the load-time warm-up uses to compile every transform variant ahead of serving)
predicts the kernel and the token-dependent choices that :func:`hadamard.transform` really launches."""

from __future__ import annotations

import pytest
import torch

from qtip_triton.autotune.buckets import row_class
from qtip_triton.kernels import hadamard as had


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kw)`` records the launch instead of running."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, args, kw))


@pytest.fixture
def launches(monkeypatch):
    calls: list = []
    for name in ("_had1_kernel", "_had2_kernel", "_had2_tall_kernel", "_had2_stack_kernel"):
        monkeypatch.setattr(had, name, _Recorder(name, calls))
    monkeypatch.delenv(had.NO_TALL_ENV, raising=False)
    monkeypatch.delenv(had.STACK_ENV, raising=False)
    monkeypatch.delenv(had.ZB_ENV, raising=False)
    return calls


def observed(call, T: int, blocks: int) -> tuple:
    name, _, kw = call
    if name == "_had1_kernel":
        return ("had1", row_class(T * blocks))
    if name == "_had2_tall_kernel":
        return ("tall", row_class(T * blocks))
    if name == "_had2_stack_kernel":
        return ("stacked", kw["TT"] * kw["RP"], row_class(T * blocks))  # the tile's rows: a compiled variant
    return ("had2", kw["COL_SPLIT"], kw["NSPLIT"] > 0, row_class(T), kw["ZB_FIRST"])


@pytest.mark.parametrize("n,blocks", [(4096, 1), (11008, 1), (14336, 1), (1024, 1), (8192, 2), (128, 1)])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("transpose", [True, False])
def test_launch_key_matches_the_launch(launches, n, blocks, groups, transpose):
    """Input transforms (transpose, grouped SU) and output ones (partials, grouped when the shards are equal)."""
    _check_keys(launches, n, blocks, groups, transpose)


@pytest.mark.parametrize("n,blocks", [(4096, 1), (11008, 1), (14336, 1), (8192, 2), (128, 1)])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("transpose", [True, False])
def test_launch_key_matches_the_launch_with_the_stacked_kernel_on(launches, monkeypatch, n, blocks, groups, transpose):
    """QTIP_TRITON_HADAMARD_STACKED=N: the stacked kernel from N rows where A is small enough, the usual choice
    elsewhere, and the key says which."""
    monkeypatch.setenv(had.STACK_ENV, "64")
    _check_keys(launches, n, blocks, groups, transpose)


@pytest.mark.parametrize("n,blocks", [(4096, 1), (11008, 1), (8192, 2)])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("transpose", [True, False])
def test_launch_key_matches_the_launch_with_zb_first_on(launches, monkeypatch, n, blocks, groups, transpose):
    """QTIP_TRITON_HADAMARD_ZB_FIRST=1: column-split launches with A of at most 32 padded rows take the
    A · (Z · B_c) order (a compiled variant of its own), the others do not, and the key says which."""
    monkeypatch.setenv(had.ZB_ENV, "1")
    _check_keys(launches, n, blocks, groups, transpose)
    assert had.launch_key(4096, 1, 1, 3, transpose)[-1] is True and had.launch_key(11008, 1, 1, 3, transpose)[-1] is False


def _check_keys(launches, n: int, blocks: int, groups: int, transpose: bool) -> None:
    for T in (1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, 127, 128, 129, 200, 256, 300, 1023, 1024, 1025):
        launches.clear()
        if transpose:
            pre = torch.ones(groups, n) if groups > 1 else torch.ones(n)
            x = torch.zeros(2, T, n)  # two split-K partials: the unrolled-partials choice shows in NSPLIT
            had.transform(x, blocks, transpose=True, pre=pre, dst=torch.arange(n, dtype=torch.int32))
            want = had.launch_key(n, blocks, T, groups, transpose, dst=True)  # a decode kernel's order
            assert {observed(c, T, blocks) for c in launches} == {want}, (n, T, "dst")
            launches.clear()
            had.transform(x, blocks, transpose=True, pre=pre)  # natural order (the decompress kind's)
        elif groups > 1:
            had.transform(torch.zeros(groups, 2, T, n), blocks, transpose=False, post=torch.ones(groups, n))
        else:
            had.transform(torch.zeros(2, T, n), blocks, transpose=False, post=torch.ones(n))
        want = had.launch_key(n, blocks, T, groups, transpose)
        assert {observed(c, T, blocks) for c in launches} == {want}, (n, T)


def test_launch_key_follows_the_measured_thresholds_and_the_no_tall_switch(monkeypatch):
    monkeypatch.delenv(had.NO_TALL_ENV, raising=False)
    monkeypatch.setenv(had.STACK_ENV, "0")  # the tall kernel's own thresholds (the stacked one takes over unset)
    assert had.launch_key(11008, 1, 256)[0] == "tall"  # output transform from TALL_MIN_ROWS
    assert had.launch_key(11008, 1, 256, transpose=True)[0] == "had2"  # input: from TALL_MIN_ROWS_INPUT
    assert had.launch_key(11008, 1, 2048, transpose=True)[0] == "tall"
    assert had.launch_key(4096, 1, 2048)[0] == "had2"  # A of 32 rows: the per-token kernel always won
    monkeypatch.setenv(had.NO_TALL_ENV, "1")
    assert had.launch_key(11008, 1, 256)[0] == "had2"
    monkeypatch.setenv(had.STACK_ENV, "128")
    assert had.launch_key(4096, 1, 128)[0] == "stacked" and had.launch_key(4096, 1, 127)[0] == "had2"
    assert had.launch_key(11008, 1, 2048)[0] == "stacked"  # A of 256 padded rows: one token per tile
    assert had.launch_key(44032, 1, 2048)[0] == "had2"  # A of 512 padded rows: never stacked
