"""Programmatic dependent launch (kernels/pdl.py) on this GPU-less machine: when it is on, and that every
kernel waits for the previous kernels before it touches an activation, a partial or an output (the GPU
side, bit-identical outputs with and without PDL, is tests/gpu/test_pdl_gpu.py)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from qtip_triton.autotune.buckets import bucket_for
from qtip_triton.codegen.emit import emit
from qtip_triton.kernels import hadamard_jit as had_kernels
from qtip_triton.kernels import pdl
from qtip_triton.spec import TrellisSpec

SYNC = "grid_dependency_sync(PDL)"


def test_modes_and_off_without_a_hopper_gpu(monkeypatch):
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    assert pdl.mode() == pdl.AUTO  # "auto" unless told otherwise
    for raw, want in (("exit", 1), ("1", 1), ("early", 2), ("Early", 2), ("off", 0), ("0", 0), ("auto", pdl.AUTO)):
        monkeypatch.setenv(pdl.PDL_ENV, raw)
        assert pdl.mode() == want
    monkeypatch.setenv(pdl.PDL_ENV, "early")
    assert pdl.launch_args(torch.device("cpu")) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))  # the interpreter: decided before asking any GPU


def test_auto_is_early_for_one_token_and_exit_for_more(monkeypatch):
    """What a Hopper GPU would launch with (its capability and Triton's option faked here)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "triton_supports_pdl", lambda: True)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    dev = torch.device("cuda", 0)
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    want = [2 if t is not None and t <= pdl.EARLY_MAX_TOKENS else 1 for t in (1, 2, 4, 16, None)]
    assert [pdl.enabled(dev, t) for t in (1, 2, 4, 16, None)] == want  # unknown tokens: exit
    assert want[0] == 2 and want[3:] == [1, 1]
    assert pdl.launch_args(dev, 1) == {"PDL": 2, "launch_pdl": True}
    for raw, want in (("exit", 1), ("early", 2)):  # a fixed mode ignores the token count
        monkeypatch.setenv(pdl.PDL_ENV, raw)
        assert {pdl.enabled(dev, t) for t in (1, 2, None)} == {want}
    monkeypatch.setenv(pdl.PDL_ENV, "off")
    assert pdl.launch_args(dev, 1) == {}
    monkeypatch.setattr(pdl, "_device_supports", lambda index: False)  # pre-Hopper: off whatever is asked
    monkeypatch.setenv(pdl.PDL_ENV, "auto")
    assert pdl.enabled(dev, 1) == 0


def test_auto_threshold_is_a_bucket_edge():
    """The vLLM warm-up launches one batch size per (bucket, launch keys): every size of a bucket must get
    the same PDL mode, so the threshold must be the top of a bucket."""
    assert bucket_for(pdl.EARLY_MAX_TOKENS) == pdl.EARLY_MAX_TOKENS
    assert bucket_for(pdl.EARLY_MAX_TOKENS + 1) > pdl.EARLY_MAX_TOKENS


def test_unknown_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(pdl.PDL_ENV, "sometimes")
    with pytest.raises(ValueError, match="QTIP_TRITON_PDL"):
        pdl.launch_args(torch.device("cuda", 0))


def test_this_triton_has_the_launch_option():
    assert pdl.triton_supports_pdl()


def _first(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    assert m is not None, pattern
    return m.start()


# what another kernel may write or read: the activations (X, XN), partials and outputs (Y, OUT)
TOUCH = r"tl\.(load|store)\((X|XN|Y|OUT|x\d)\b|tl\.store\("


@pytest.mark.parametrize("spec,kind,config", [
    ("L16K2V2-hyb9", "gemv", {"BLOCK_M": 1, "table": "shared"}),
    ("L16K2V2-hyb9", "gemv", {"BLOCK_M": 2, "table": "gather"}),
    ("L16K3V1-3inst", "gemv", {"BLOCK_M": 4}),
    ("L16K2V2-hyb9", "gemm", {}),
    ("L16K4V2-hyb9", "decompress", {}),
    ("L16K2V2-hyb9", "gemv", {"BLOCK_M": 1, "table": "shared", "fuse_in": True}),
    ("L16K2V2-hyb9", "gemv", {"BLOCK_M": 1, "table": "shared16", "early_words": True}),
])
def test_generated_kernels_wait_before_touching_shared_data(spec, kind, config):
    src = emit(TrellisSpec.parse(spec), kind, config)
    assert src.count(SYNC) == 1
    body = src[src.index("def kernel("):]
    sync = body.index(SYNC)
    assert sync < _first(TOUCH, body), "a load or store of another kernel's data precedes the wait"
    assert "PDL: tl.constexpr = 0" in body  # off unless the launcher asks for it
    if config.get("table") == "shared":  # the table fill (constants only) overlaps the previous kernel
        assert body.index("_fill_table(") < sync or config.get("fuse_in")


@pytest.mark.parametrize("name", ["_had2_kernel", "_had2_tall_kernel", "_had2_stack_kernel", "_had1_kernel"])
def test_hadamard_kernels_wait_first(name):
    src = inspect.getsource(getattr(had_kernels, name).fn)
    body = src[src.index('"""', src.index('"""') + 3) + 3:]  # after the docstring
    assert body.count(SYNC) == 1
    # the layer's constants (A, B, PRE, POST, BIAS, DST) may load before the wait; activations and
    # partials (X) and the output (Y, any store) may not
    assert body.index(SYNC) < _first(r"tl\.load\(X\b|tl\.store\(", body)
    early = re.findall(r"tl\.load\((\w+)", body[:body.index(SYNC)])
    assert set(early) <= {"A", "B", "PRE", "POST", "BIAS", "DST"}, early
    # ... also through the stage-2 helper: it is handed only constant pointers, and loads only from them
    for args in re.findall(r"_stage2_constants\(([^)]*)", body[:body.index(SYNC)]):
        assert [v.strip() for v in args.split(",")[:3]] == ["POST", "BIAS", "DST"], args
        helper = inspect.getsource(had_kernels._stage2_constants.fn)
        assert set(re.findall(r"tl\.load\((\w+)", helper)) == {"POST", "BIAS", "DST"}
        assert "tl.store(" not in helper
