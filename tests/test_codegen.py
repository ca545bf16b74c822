"""Code generator: tile plans, the lossless repack, emitted source, the disk cache and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qtip_triton import TrellisSpec
from qtip_triton.bitstream import get_layout
from qtip_triton.codegen import emit, load_source
from qtip_triton.codegen.cache import cache_dir
from qtip_triton.codegen.plan import make_plan
from qtip_triton.codes import CODES, Code
from qtip_triton.kernels.prepare import repack, unrepack

SPECS = [
    ("L16K2V2-hyb9", "qtip"), ("L16K3V2-hyb9", "qtip"), ("L16K4V2-hyb9", "qtip"),
    ("L12K1V1-1mad", "tile"), ("L16K3V1-3inst", "tile"), ("L12K4V2-lut", "tile"), ("L16K2V2-hyb9", "tile"),
    ("L16K2V1-mcg", "exl3"), ("L16K3V1-mul1", "exl3"),
]


@pytest.mark.parametrize("name,layout", SPECS)
def test_plan_maps_every_sequence_position_once(name, layout):
    """Rebuild the layout's order from the plan's pieces: (group, s, f) -> (row, col) must match it."""
    spec = TrellisSpec.parse(name)
    plan = make_plan(spec, layout)
    order = get_layout(layout).order()
    seen = torch.full((256,), -1, dtype=torch.int64)
    for gr in range(plan.GRN):
        for gc in range(plan.GCN):
            g = plan.group(gr, gc)
            assert plan.split_group(g) == (gr, gc)
            for a, cls in enumerate(plan.classes):
                for vs in cls:
                    t = spec.V * (plan.S * g + vs.s) + vs.f
                    r = plan.rvar(gr) + plan.rconst(a)
                    c = plan.cvar(gc) + vs.cconst
                    assert seen[t] == -1
                    seen[t] = 16 * r + c
    assert torch.equal(seen, order.to(torch.int64))
    assert plan.NA * plan.GRN == 16 and plan.NC * plan.GCN == 16
    assert plan.S * spec.K * spec.V == 32 * plan.G


def test_plan_rejects_orders_that_are_not_bit_permutations(monkeypatch):
    from qtip_triton import bitstream
    from qtip_triton.codegen import plan as plan_mod

    class Shuffled(bitstream.TileLayout):
        def order(self):
            g = torch.Generator().manual_seed(0)
            return torch.randperm(256, generator=g)

    monkeypatch.setitem(bitstream.LAYOUTS, "shuffled", Shuffled("shuffled", "test"))
    plan_mod.make_plan.cache_clear()
    with pytest.raises(ValueError, match="not a permutation of index bits"):
        make_plan(TrellisSpec.parse("L16K2V1-1mad"), "shuffled")


@pytest.mark.parametrize("name,layout", SPECS)
def test_repack_is_lossless(gen, name, layout):
    spec = TrellisSpec.parse(name)
    plan = make_plan(spec, layout)
    words = torch.randint(0, 1 << 32, (3, 5, spec.words_per_tile), generator=gen, dtype=torch.int64)
    packed = repack(words, plan)
    assert packed.dtype == torch.int32 and packed.numel() == words.numel()
    assert torch.equal(unrepack(packed, plan), words)


def test_emitted_source_is_specialized():
    src = emit(TrellisSpec.parse("L16K2V2-hyb9"), "gemv")
    # constants folded: window shifts, hash index width, sign bit, the 512-word table; no run-time spec
    assert "s0 = (w0 >> 16)" in src
    assert "s5 = (w0 << 4) | (w1 >> 28)" in src  # funnel shift across the word boundary
    assert "s13 = (w1 << 4) | (wn >> 28)" in src  # ... and into the next group's first word
    assert ">> 6) & 511" in src and "0x8000" in src and "tl.arange(0, 512)" in src
    assert "L16K2V2-hyb9" in src
    for bad in ("spec.", "if L", "K ==", "V =="):
        assert bad not in src
    src3 = emit(TrellisSpec.parse("L16K3V2-hyb9"), "gemv")
    assert "w2 = tl.load" in src3 and "w3" not in src3  # 3 words per group of 16 states
    assert emit(TrellisSpec.parse("L16K2V2-hyb9"), "gemv") == src  # deterministic (content-hashed cache)


@pytest.mark.parametrize("kind", ["gemv", "gemm", "decompress"])
@pytest.mark.parametrize("name,layout", [("L16K2V2-hyb9", "qtip"), ("L12K3V1-1mad", "tile"), ("L16K1V2-lut", "tile")])
def test_emitted_source_imports(kind, name, layout, tmp_path, monkeypatch):
    monkeypatch.setenv("QTIP_TRITON_CACHE_DIR", str(tmp_path))
    # a unique trailing comment: a fresh cache entry even if this process imported the kernel before
    mod = load_source(emit(TrellisSpec.parse(name), kind, layout=layout) + f"# {tmp_path.name}\n")
    assert kind == mod.KIND and name == mod.SPEC and callable(mod.kernel)
    assert str(tmp_path) in mod.__file__


def test_cache_is_content_addressed_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("QTIP_TRITON_CACHE_DIR", str(tmp_path))
    text = emit(TrellisSpec.parse("L16K4V2-hyb9"), "decompress") + f"# {tmp_path.name}\n"
    a = load_source(text)
    b = load_source(text)
    assert a is b
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py")
    assert len(files) == 1 and files[0].startswith("qtip_kernel_")
    assert not list(tmp_path.glob("*.tmp"))  # no half-written files left behind
    assert cache_dir() == tmp_path


def test_cache_concurrent_processes(tmp_path):
    """Several processes publishing the same module at once all import a complete file."""
    code = (
        "import os, sys; os.environ['QTIP_TRITON_CACHE_DIR'] = sys.argv[1]\n"
        "from qtip_triton import TrellisSpec\n"
        "from qtip_triton.codegen import emit, load_source\n"
        "m = load_source(emit(TrellisSpec.parse('L16K2V2-hyb9'), 'gemm'))\n"
        "print(m.KIND)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs == ["gemm"] * 3
    assert len(list(tmp_path.glob("qtip_kernel_*.py"))) == 1


def test_emit_errors():
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    with pytest.raises(ValueError, match="unknown kernel kind"):
        emit(spec, "conv", {})
    with pytest.raises(ValueError, match="'table' must be one of"):
        emit(spec, "gemv", {"table": "smem"})
    with pytest.raises(ValueError, match="only for kinds"):
        emit(spec, "gemm", {"table": "shared"})
    with pytest.raises(TypeError, match="TrellisSpec"):
        emit("L16K2V2-hyb9", "gemv")
    with pytest.raises(ValueError, match="qtip kernel layout holds L=16, V=2"):
        emit(TrellisSpec.parse("L12K2V1-1mad"), "gemv", layout="qtip")


def test_code_without_snippet_says_so():
    code = Code("nosnip", "test", CODES["1mad"].reference, allowed_V=(1,))
    with pytest.raises(ValueError, match="no Triton snippet for code 'nosnip'"):
        code.triton_decoder()


def test_cli_prints_source():
    from qtip_triton.cli import main

    out = subprocess.run([sys.executable, "-m", "qtip_triton.cli", "codegen", "--spec", "L16K2V2-hyb9", "--kind", "gemv"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "@triton.jit" in out.stdout and "def kernel(" in out.stdout
    assert main(["codegen", "--spec", "L16K2V2-hyb", "--kind", "gemv"]) == 2  # clear error, no traceback
