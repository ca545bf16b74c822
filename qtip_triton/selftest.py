"""``qtip-triton selftest``: this machine's compiled kernels against the float64 reference, in one command.

Why: the kernels are compiled on the user's machine by the user's Triton, and a compiler can change what a kernel
computes without any error (in this project's history a change that only made two loop bounds compile-time
constants gave wrong Hadamard transforms on an H200 under Triton 3.6 while the interpreter agreed with float64).
The repository's GPU suite catches that for us; this catches it for a user after an install, a Triton upgrade or
on a new GPU, before serving. It checks what serving runs: the decompress kernel bit for bit against the
reference decoder, ``linear`` at decoding and prefill batch sizes with the configs the registry hands out (at
1-256 tokens: the gemv, its tensor-core variant, gemm and decompress kinds), and each Hadamard transform kernel (per-token, tall, stacked, and the default choice)
in both directions. Without a GPU it runs the same checks through Triton's interpreter on small shapes
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qtip_triton import hadamard as ref_hadamard
from qtip_triton.spec import TrellisSpec

GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
CPU_SHAPES = ((256, 512),)
CPU_EXTRA_SIZES = (1376,)  # 172 x 8: a Hadamard block with a hadK factor, as Llama's 11008 = 172 x 64 has
GPU_TOKENS = (1, 4, 16, 64, 256)  # gemv, mma gemv, gemm and decompress kinds with the shipped configs
CPU_TOKENS = (1, 16)
TOL_LINEAR = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative error, as the test suite bounds it
TOL_INPUT = 1e-3  # fp16 result of an input transform
TOL_OUTPUT = 1e-4  # fp32 result of an output transform (bf16 hi + lo products: ~16 bits)
TRANSFORM_VARIANTS = {"default": {}, "per_token": {"tall": False}, "tall": {"tall": True}, "stacked": {"stacked": True}}


@dataclass(frozen=True)
class Check:
    """One comparison: what was run, its error against the reference, and the bound it must stay under."""

    what: str
    case: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.bound


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return math.inf
    return float((y.double() - ref).norm() / ref.norm())


def _generator(device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.seed()  # fresh data on every run: a kernel right for one input only is still caught over runs
    return g


def linear_checks(specs: list[TrellisSpec], shapes, tokens, device: torch.device,
                  dtypes=(torch.float16,)) -> Iterator[Check]:
    """Decompress bit for bit, then ``linear`` at each batch size with the configs serving would use."""
    from qtip_triton import kernels, linear
    from qtip_triton.autotune.workload import random_layer
    from qtip_triton.kernels import runners

    for spec in specs:
        for m, n in shapes:
            g = _generator(device)
            qw = random_layer(spec, m, n, device=device, generator=g)
            w64 = qw.decode().double()
            cfg = kernels.default_config("decompress", spec, m, n, max(tokens))
            out = runners.decompress(kernels.prepare(qw), cfg, torch.float16)
            wrong = int((out != w64.half()).sum())
            yield Check(f"{spec.name} decompress", f"{m}x{n}", float(wrong), 0.0)
            for M in tokens:
                for dt in dtypes:
                    x = torch.randn(M, n, generator=g, device=device).to(dt)
                    ref = qw.output_transform(qw.input_transform(x.double()) @ w64.t())
                    yield Check(f"{spec.name} linear {str(dt)[6:]}", f"{m}x{n} M={M}", _rel(linear(x, qw), ref),
                                TOL_LINEAR[dt])


def transform_variants(n: int) -> list[str]:
    """The transform kernels (``TRANSFORM_VARIANTS``) that apply to blocks of ``n``: blocks without A (Sylvester
    only) run one kernel whatever is asked, and A of more than ``STACK_MAX_RP`` padded rows is never stacked."""
    from qtip_triton.kernels import hadamard as had

    kh, p1, _ = had.factor(n)
    if kh * p1 == 1:
        return ["default"]
    rp = had.padded_sizes(n)[0]
    return [name for name in TRANSFORM_VARIANTS if name != "stacked" or rp <= had.STACK_MAX_RP]


def transform_checks(sizes, tokens, device: torch.device, interpret: bool) -> Iterator[Check]:
    """Each transform kernel that applies to a size, input (SU, a destination order, fp16 out) and output (3 fp32
    split-K partials, SV, fp32 out) directions, against float64."""
    from qtip_triton.kernels import hadamard as had

    for n in sizes:
        for T in tokens:
            g = _generator(device)
            x = torch.randn(T, n, generator=g, device=device).half()
            su = torch.randn(n, generator=g, device=device)
            parts = torch.randn(3, T, n, generator=g, device=device)
            sv = torch.randn(n, generator=g, device=device)
            dst = torch.randperm(n, generator=g, device=device).to(torch.int32)
            ref_in = torch.empty(T, n, dtype=torch.float64, device=device)
            ref_in[:, dst.long()] = ref_hadamard.apply_mt(x.double() * su.double())
            ref_out = ref_hadamard.apply_m(parts.double().sum(0)) * sv.double()
            for name in transform_variants(n):
                kw = TRANSFORM_VARIANTS[name]
                y = had.transform(x, 1, transpose=True, pre=su, dst=dst, interpret=interpret, **kw)
                yield Check(f"hadamard input {name}", f"n={n} T={T}", _rel(y, ref_in), TOL_INPUT)
                y = had.transform(parts, 1, transpose=False, post=sv, out_dtype=torch.float32, interpret=interpret,
                                  **kw)
                yield Check(f"hadamard output {name}", f"n={n} T={T}", _rel(y, ref_out), TOL_OUTPUT)


def _device(interpret: bool) -> torch.device | None:
    if interpret:
        return torch.device("cpu")
    return torch.device("cuda") if torch.cuda.is_available() else None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in (s.lower().split("x") for s in text.split(",") if s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OUTxIN shapes, comma-separated, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--specs", default="L16K2V2-hyb9,L16K3V2-hyb9,L16K4V2-hyb9",
                   help="trellis specs (default: the QTIP 2/3/4-bit ones)")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="OUTxIN layer shapes (default: Llama-2-7B's on a GPU, 256x512 in the interpreter)")
    p.add_argument("--tokens", type=_ints, default=None, help="batch sizes (default: 1,4,16,64,256 on a GPU)")
    p.add_argument("--bf16", action="store_true", help="also bf16 activations")
    p.add_argument("--quick", action="store_true", help="2-bit only, the first shape")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from qtip_triton.kernels.runners import interpreting

    interpret = interpreting()
    device = _device(interpret)
    if device is None:
        print("qtip-triton selftest: no CUDA GPU here; run it with TRITON_INTERPRET=1 to check the kernels through "
              "Triton's interpreter on small shapes", file=sys.stderr)
        return 2
    try:
        specs = [TrellisSpec.parse(s) for s in args.specs.split(",") if s]
    except ValueError as e:
        print(f"qtip-triton selftest: {e}", file=sys.stderr)
        return 2
    shapes = args.shapes or (CPU_SHAPES if interpret else GPU_SHAPES)
    tokens = args.tokens or (CPU_TOKENS if interpret else GPU_TOKENS)
    if args.quick:
        specs, shapes = specs[:1], shapes[:1]
    extra = CPU_EXTRA_SIZES if interpret and not args.shapes else ()
    sizes = sorted({d for shape in shapes for d in shape} | set(extra))
    dtypes = (torch.float16, torch.bfloat16) if args.bf16 else (torch.float16,)
    where = "Triton interpreter (CPU)" if interpret else torch.cuda.get_device_name(device)
    print(f"qtip-triton selftest on {where}: {len(specs)} specs x {len(shapes)} shapes, tokens {list(tokens)}, "
          f"transforms at {sizes}", flush=True)
    start = time.monotonic()
    checks: list[Check] = []
    total = (len(specs) * len(shapes) * (1 + len(tokens) * len(dtypes))
             + sum(2 * len(tokens) * len(transform_variants(n)) for n in sizes))
    with tqdm(total=total, unit="check", disable=os.environ.get("QTIP_TRITON_NO_PROGRESS") == "1") as bar:
        for c in itertools.chain(linear_checks(specs, shapes, tokens, device, dtypes),
                                 transform_checks(sizes, tokens, device, interpret)):
            checks.append(c)
            bar.update(1)
    failed = [c for c in checks if not c.ok]
    width = max(len(c.what) for c in checks)
    for c in checks:
        err = f"{c.error:.0f} wrong values" if c.bound == 0 else f"rel. error {c.error:.2e} (bound {c.bound:.0e})"
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.what:<{width}} {c.case:<18} {err}")
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed in {time.monotonic() - start:.0f} s")
    if failed:
        print("Some kernels compute wrong results on this machine: do not serve with them. Report it with the "
              "output of 'qtip-triton info' and this list.", file=sys.stderr)
        return 1
    return 0
