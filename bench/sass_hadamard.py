"""The Hadamard transform kernels as :func:`qtip_triton.kernels.hadamard.transform` launches them, compiled for a
GPU on any machine (no GPU needed): registers, spills, shared memory and instructions per warp.

Why: a transform of a few tokens is a chain of dependent instructions (one per ~5-6 cycles per warp under
Nsight Compute, bench/NOTES.md session 10), so its instruction count is its time; the many-token kernels
live or die by registers and shared memory (one program per SM or several). This runs ``transform`` on
CPU tensors with every kernel replaced by a recorder, so the kernel, grid and arguments are exactly the
ones the dispatch picks (launch variants included), then compiles each recorded launch for ``sm_90``
with the specializations a real launch gets (integer arguments divisible by 16 and pointers marked so,
ones as constants) and reads the cubin with the ``cuobjdump`` that comes with Triton.

The instruction count is static: a loop body counts once. The per-token and tall kernels loop over A's rows
in 32-row steps (RP / 32 times at run time: once at 4096, twice at 8192, 8 times at 11008 and 28672) and
over split-K partials; the stacked kernel's slices are unrolled. Compare variants of one size, not sizes.

    python bench/sass_hadamard.py --n 4096,11008 --T 1,16,2048
    python bench/sass_hadamard.py --n 4096 --T 2048 --variants default,stacked --direction input

The "PTX" column hashes the kernel's PTX without its debug sections and line markers, so two checkouts can be
compared without a GPU: equal hashes mean the same machine code from the same compiler (session 16 showed
this way that the tall kernel's fix restores the exact code that passed on the H200 before 0afb6d4).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))
from hadamard import VARIANTS as TIMED_VARIANTS  # noqa: E402  (bench/hadamard.py: the variants it times)
from sass_count import _resources, _sass  # noqa: E402  (a sibling script)

from qtip_triton.kernels import hadamard as had  # noqa: E402

KERNELS = ("_had2_kernel", "_had2_tall_kernel", "_had2_stack_kernel", "_had1_kernel")
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {}, "per_token": {"tall": False}, "col_split": {"col_split": True}, "zb_first": {"zb_first": True},
    "tall": {"tall": True}, "stacked": {"stacked": True},
    "stacked64": {"stacked": True, "stack_rows": 64}, "stacked1": {"stacked": True, "stack_rows": 16},
    # one fp16 dot per product instead of a bf16 hi + lo pair (fp16 outputs; session 20)
    "f16": {"f16_dots": True}, "zb_first_f16": {"zb_first": True, "f16_dots": True},
    "tall_f16": {"tall": True, "f16_dots": True}, "stacked_f16": {"stacked": True, "f16_dots": True},
    # A of 256 padded rows: fewer columns of Y a program, 4 warps (session 40), as bench/hadamard.py times them
    **{k: TIMED_VARIANTS[k] for k in ("stacked_c32", "stacked_c16", "stacked_w4", "stacked_w8", "stacked_c32_w4",
                                             "stacked_k32", "stacked_w4_k32")},
}
_PTR = {torch.float16: "*fp16", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int32: "*i32"}
_LAUNCH_KEYS = ("num_warps", "num_stages", "launch_pdl")


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the launch instead."""

    def __init__(self, name: str, fn, calls: list) -> None:
        self.name, self.fn, self.calls = name, fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, self.fn, grid, args, kw))


def record(n: int, T: int, direction: str, variant: dict[str, Any], splits: int = 4,
           pdl: int = 0) -> list[tuple]:
    """The kernel launches of one transform: ``direction`` "input" (fp16 x, SU, the kernel-order destination
    of a decode kernel) or "output" (``splits`` fp32 split-K partials, SV, fp16 out), as ``transform`` picks
    them for ``variant``; ``pdl``: the PDL mode a CUDA launch would take (0 off, 1 exit, 2 early)."""
    calls: list[tuple] = []
    g = torch.Generator().manual_seed(0)
    with contextlib.ExitStack() as stack:
        for name in KERNELS:
            stack.enter_context(mock.patch.object(had, name, _Recorder(name, getattr(had, name), calls)))
        stack.enter_context(mock.patch.object(
            had, "launch_args", lambda device, tokens=None: {"PDL": pdl, "launch_pdl": True} if pdl else {}))
        if direction == "input":
            x = torch.randn(T, n, generator=g).half()
            dst = torch.randperm(n, generator=g).to(torch.int32)
            had.transform(x, 1, transpose=True, pre=torch.randn(n, generator=g), dst=dst, out_dtype=torch.float16,
                          **variant)
        else:
            parts = torch.randn(splits, T, n, generator=g)
            had.transform(parts, 1, transpose=False, post=torch.randn(n, generator=g), out_dtype=torch.float16,
                          **variant)
    return calls


def compile_launch(fn, args: tuple, kw: dict[str, Any], arch: int = 90):
    """A recorded launch compiled for ``sm_<arch>`` with a real launch's specializations."""
    names = fn.arg_names
    params = dict(zip(names, fn.params, strict=True))
    values = dict(zip(names, args, strict=False))  # the rest come as keywords
    values.update({k: v for k, v in kw.items() if k not in _LAUNCH_KEYS})
    sig: dict[str, str] = {}
    const: dict[str, Any] = {}
    divisible: list[str] = []
    for name in names:
        p = params[name]
        v = values.get(name, p.default)
        if p.is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
            if v.data_ptr() % 16 == 0:
                divisible.append(name)
        elif isinstance(v, bool) or v is None:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, int):
            if v == 1:  # Triton compiles a variant with ones as constants
                sig[name], const[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    divisible.append(name)
        else:
            sig[name] = "fp32"
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = {k: kw[k] for k in _LAUNCH_KEYS if k in kw}
    opts.setdefault("num_warps", 4)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts), opts["num_warps"]


def ptx_hash(ptx: str) -> str:
    """A short hash of the PTX's code: debug sections, ``.loc``/``.file`` lines, comments and the debug labels
    (``$L__tmpN``, numbered by source position) left out, so a moved or commented line does not change it."""
    code = []
    for line in ptx.split(".section")[0].splitlines():
        s = line.strip()
        if not s or s.startswith((".loc", ".file", "//")) or re.fullmatch(r"\$L__tmp\d+:", s):
            continue
        code.append(re.sub(r"\$L__tmp\d+", "L", line))
    return hashlib.sha256("\n".join(code).encode()).hexdigest()[:12]


def count(n: int, T: int, direction: str, variant_name: str, splits: int = 4, pdl: int = 0) -> list[dict[str, Any]]:
    """One row per kernel launch of that transform."""
    rows = []
    for name, fn, grid, args, kw in record(n, T, direction, VARIANTS[variant_name], splits, pdl):
        kernel, warps = compile_launch(fn, args, kw)
        sass = _sass(kernel.asm["cubin"])
        ops = [m.group(1).split(".")[0] for m in
               re.finditer(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\b", sass, re.M)]
        mix = collections.Counter(op for op in ops if op != "NOP")
        programs = 1
        for d in grid:
            programs *= d
        rows.append({"n": n, "T": T, "direction": direction, "variant": variant_name, "kernel": name,
                     "grid": list(grid), "programs": programs, "warps": warps, "instructions": sum(mix.values()),
                     "shared_bytes": kernel.metadata.shared, **_resources(kernel.asm["cubin"]),
                     "ptx": ptx_hash(kernel.asm["ptx"]), "opcodes": dict(mix.most_common())})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="4096,11008", help="features per row (one Hadamard block), comma-separated")
    ap.add_argument("--T", default="1,16", help="tokens, comma-separated")
    ap.add_argument("--direction", choices=("input", "output", "both"), default="both")
    ap.add_argument("--variants", default="default", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--splits", type=int, default=4, help="split-K partials an output transform sums")
    ap.add_argument("--pdl", choices=("off", "exit", "early"), default="off")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("this compiles for the GPU: run it without TRITON_INTERPRET=1")
    variants = a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; variants: {', '.join(VARIANTS)}")
    dirs = ("input", "output") if a.direction == "both" else (a.direction,)
    pdl = {"off": 0, "exit": 1, "early": 2}[a.pdl]
    rows = []
    for n in (int(v) for v in a.n.split(",")):
        for T in (int(v) for v in a.T.split(",")):
            for d in dirs:
                for v in variants:
                    try:
                        rows.extend(count(n, T, d, v, a.splits, pdl))
                    except ValueError as e:  # a variant this size does not take: say so, go on
                        rows.append({"n": n, "T": T, "direction": d, "variant": v, "error": str(e)})
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("SASS: static instructions per warp (a loop body counts once; see the module docstring).\n")
    print("| n | T | transform | variant | kernel | programs | warps | SASS | HMMA | LDG | registers | stack "
          "| shared B | PTX |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['n']} | {r['T']} | {r['direction']} | {r['variant']} | — ({r['error']}) | | | | | | | | | |")
            continue
        ops = r["opcodes"]
        print(f"| {r['n']} | {r['T']} | {r['direction']} | {r['variant']} | {r['kernel']} | {r['programs']} | "
              f"{r['warps']} | {r['instructions']} | {ops.get('HMMA', 0)} | {ops.get('LDG', 0)} | {r.get('reg')} | "
              f"{r.get('stack')} | {r['shared_bytes']} | {r['ptx']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
