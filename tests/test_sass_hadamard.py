"""bench/sass_hadamard.py compiles the Hadamard transform kernels for sm_90 on this (GPU-less) machine, exactly as
``transform`` launches them: the per-token kernel of decoding batches and the stacked many-token kernel
compile with no spills, the latter on wgmma (instruction counts and resources, not timings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "cuobjdump").exists(), reason="the Triton wheel has no NVIDIA tools")
SCRIPT = Path(__file__).parents[1] / "bench" / "sass_hadamard.py"


def compiled(*args: str) -> list[dict]:
    """The script's JSON, run in a process without TRITON_INTERPRET (the suite runs interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args, "--json"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_one_token_and_stacked_transforms_compile_for_sm90():
    rows = compiled("--n", "4096", "--T", "1,256", "--variants", "default,stacked", "--direction", "input",
                    "--pdl", "early")
    by = {(r["T"], r["variant"]): r for r in rows}
    one = by[(1, "default")]
    assert one["kernel"] == "_had2_kernel" and one["programs"] == 4  # column split: 1 row block x 4 column blocks
    assert one["stack"] == 0 and one["opcodes"].get("HMMA", 0) > 0 and one["opcodes"].get("ACQBULK") == 1, one
    st = by[(256, "stacked")]
    assert st["kernel"] == "_had2_stack_kernel" and st["programs"] == 64 and st["warps"] == 8  # 4 tokens per tile
    assert st["stack"] == 0 and st["opcodes"].get("HGMMA", 0) > 0, st


def test_a_size_the_stacked_kernel_does_not_take_is_reported():
    rows = compiled("--n", "44032", "--T", "16", "--variants", "stacked", "--direction", "output")
    assert len(rows) == 1 and "at most 256" in rows[0]["error"], rows
