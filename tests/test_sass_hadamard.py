"""bench/sass_hadamard.py compiles the Hadamard transform kernels for sm_90 on this (GPU-less) machine, exactly as
``transform`` launches them: the per-token kernel of decoding batches and the stacked many-token kernel
compile with no spills, the latter on wgmma (instruction counts and resources, not timings)."""

import importlib.util
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
    rows = compiled("--n", "4096", "--T", "1,512", "--variants", "default,stacked", "--direction", "input",
                    "--pdl", "early")
    by = {(r["T"], r["variant"]): r for r in rows}
    one = by[(1, "default")]
    assert one["kernel"] == "_had2_kernel" and one["programs"] == 4  # column split: 1 row block x 4 column blocks
    assert one["stack"] == 0 and one["opcodes"].get("HMMA", 0) > 0 and one["opcodes"].get("ACQBULK") == 1, one
    st = by[(512, "stacked")]
    assert st["kernel"] == "_had2_stack_kernel" and st["programs"] == 128 and st["warps"] == 8  # 4 tokens per tile
    assert st["stack"] == 0 and st["opcodes"].get("HGMMA", 0) > 0, st
    assert len(one["ptx"]) == 12 and one["ptx"] != st["ptx"]


def _script_module():
    spec = importlib.util.spec_from_file_location("sass_hadamard", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ptx_hash_ignores_debug_info_but_not_code():
    """Two checkouts compile the same code with other line numbers and debug sections: equal hashes; one changed
    instruction: another hash."""
    ptx_hash = _script_module().ptx_hash
    code = "\tld.global.b32 %r1, [%rd1];\n$L__tmp3:\n\tadd.s32 %r2, %r1, 4;\n\tbra $L__tmp3;\n"
    a = ".loc 1 10 5\n" + code + "\t.section\t.debug_info\n.b8 5\n"
    moved = code.replace("tmp3", "tmp7")
    b = "// moved\n.file 1 \"/other/path.py\"\n.loc 1 12 5\n" + moved + "\t.section\t.debug_abbrev\n"
    assert ptx_hash(a) == ptx_hash(b)
    assert ptx_hash(a) != ptx_hash(a.replace("4;", "8;"))


def test_a_size_the_stacked_kernel_does_not_take_is_reported():
    rows = compiled("--n", "44032", "--T", "16", "--variants", "stacked", "--direction", "output")
    assert len(rows) == 1 and "at most 256" in rows[0]["error"], rows
