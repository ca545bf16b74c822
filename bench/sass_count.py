"""Instructions per decoded state of a generated kernel, compiled for a GPU on any machine (no GPU needed).

Why: at 2-4 bits the decode, not memory, bounds the small-batch kernels, and its cost is the SASS the
code function compiles to. This compiles the generated ``gemv``/``gemm``/``decompress`` kernel with
Triton for ``sm_90`` (ptxas and cuobjdump come with the Triton wheel), every pointer and stride marked
divisible by 16 as real launches specialize them, and reports registers, spills, shared memory and the
instructions of the main loop divided by the states one thread decodes per iteration. A change to a
code's Triton snippet can be judged here before it is timed on the device.

    python bench/sass_count.py --spec L16K2V1-mul1 --kind gemv --config '{"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 512}'
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qtip_triton.codegen.cache import load
from qtip_triton.codegen.emit import default_layout
from qtip_triton.codegen.mma import layout_ok
from qtip_triton.codegen.nvtools import cuobjdump
from qtip_triton.codegen.plan import make_plan
from qtip_triton.codes import get_code
from qtip_triton.kernels import mma_layout
from qtip_triton.kernels.configs import default_config
from qtip_triton.kernels.runners import _launch_opts, fused_input_consts, k_split
from qtip_triton.spec import TrellisSpec

_TABLE_TYPES = {"packed16": "*i32", "float32": "*fp32", "none": "*i32"}


def _pointer_types(kind: str, spec: TrellisSpec) -> dict[str, str]:
    """Pointer argument types of the generated kernel (every other argument is an int32 or a constexpr)."""
    table = _TABLE_TYPES[get_code(spec.code).triton_decoder().table]
    if kind == "decompress":
        return {"W": "*i32", "TBL": table, "OUT": "*fp16"}
    return {"W": "*i32", "TBL": table, "X": "*fp16", "Y": "*fp32", "CNT": "*i32"}


def _refuse_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("sass_count compiles for the GPU: run it without TRITON_INTERPRET=1")


def compile_kernel(spec: TrellisSpec, kind: str, config: dict[str, Any], m: int, n: int, arch: int = 90,
                   pdl: int = 0):
    """(compiled kernel, states one thread decodes per loop iteration) for this layer shape and config;
    ``pdl``: as launched with programmatic dependent launch in that mode (kernels/pdl.py: 1 exit, 2 early)."""
    _refuse_interpreter()
    layout = default_layout(spec)
    mod = load(spec, kind, config, layout=layout)
    plan = make_plan(spec, layout)
    fn = mod.kernel
    names = fn.arg_names
    ptrs = _pointer_types(kind, spec)
    TR, TC = config["BLOCK_N"] // 16, config["BLOCK_K"] // 16
    cols = n // 16 * plan.GCN  # word columns (a compile-time constant of the gemv kernel)
    const: dict[str, Any] = {"TR": TR, "TC": TC, "EVEN": True, "INTERPRET": False}
    if kind != "decompress":
        const["BLOCK_M"] = config["BLOCK_M"]
    if "PDL" in names:
        const["PDL"] = pdl
    if "SPLIT_SUM" in names:  # split-K summed in the kernel, as runners.decode_matmul launches it by default
        const["SPLIT_SUM"] = config.get("SPLIT_K", 1) > 1
        if not const["SPLIT_SUM"]:
            const["CNT"] = None
    if "Ctot" in names and fn.params[names.index("Ctot")].is_constexpr:
        const["Ctot"] = cols
    if "stride_xq" in names:  # the mma gemv's h (kernels/mma_layout.py): 4 x rows per quad, as at M = BLOCK_M
        const["stride_xq"] = mma_layout.QUAD * mma_layout.rows_padded(config["BLOCK_M"])
    if config.get("fuse_in"):  # the input transform's operands (see kernels.runners._fused_input_args)
        ptrs.update(XN="*fp16", PRE="*fp32", HA="*bf16", HB="*bf16", DSTI="*i32", hscale="fp32")
        cb = TC * plan.GCN
        iters, _ = k_split(-(-cols // cb), config.get("SPLIT_K", 1))  # as runners.decode_matmul splits the k range
        const.update(fused_input_consts(n, iters * cb * 16 // plan.GCN))
    sig = {a: "constexpr" if a in const else ptrs.get(a, "i32") for a in names}
    divisible = [a for a in names if a not in const and a not in ("M", "ITERS", "shard_b1", "shard_b2", "z_rows",
                                                                    "z_cols", "hscale")]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts: dict[str, Any] = _launch_opts(config)  # num_warps, num_stages, maxnreg: as the launcher passes them
    if pdl:
        opts["launch_pdl"] = True
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    groups = TR * plan.GRN * TC * plan.GCN  # groups of states per program per k step
    threads = 32 * opts["num_warps"]
    return kernel, groups * plan.S / threads


def compile_wgmma(spec: TrellisSpec, config: dict[str, Any], n: int):
    """(compiled Gluon wgmma kernel, states one thread decodes per loop iteration). Each k step a thread decodes
    16 E states (2 RB rows x 64 E columns of weights, V = 2, over 4 RB threads); with PIPE = 1 the loop body holds
    two steps."""
    _refuse_interpreter()
    from qtip_triton.kernels import wgmma

    kernel = wgmma.compile_offline(spec, config, n=n)
    return kernel, 16 * int(config.get("E", 1)) * (2 if wgmma.pipelined(config) else 1)


def _sass(cubin: bytes) -> str:
    return cuobjdump(cubin, "-sass")


def _resources(cubin: bytes) -> dict[str, int]:
    out = cuobjdump(cubin, "-res-usage")
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def _instructions(sass: str) -> tuple[list[tuple[int, str, str]], dict[str, int], dict[int, int]]:
    """(ops as (index, opcode, operands), label -> op index, address -> op index) of a SASS listing."""
    ops: list[tuple[int, str, str]] = []
    labels: dict[str, int] = {}
    at: dict[int, int] = {}
    for line in sass.splitlines():
        lab = re.match(r"\s*\.(L_x_\d+):", line)
        if lab:
            labels[lab.group(1)] = len(ops)
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\b(.*?);", line)
        if ins:
            at[int(ins.group(1), 16)] = len(ops)
            ops.append((len(ops), ins.group(2), ins.group(3)))
    return ops, labels, at


def _loops(sass: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, int]]]:
    """The listing's ops and the (start, end) op spans of its backward branches that hold no EXIT (see
    :func:`loop_body`)."""
    ops, labels, at = _instructions(sass)
    spans = []
    for i, op, rest in ops:
        if not op.startswith("BRA"):
            continue
        tgt = re.search(r"`\(\.(L_x_\d+)\)", rest)
        addr = re.match(r"\s*(?:!?U?P\w+\s*,\s*)?0x([0-9a-f]+)\s*$", rest)
        start = labels.get(tgt.group(1)) if tgt else at.get(int(addr.group(1), 16)) if addr else None
        if start is not None and start <= i and not any(o.startswith("EXIT") for _, o, _ in ops[start:i + 1]):
            spans.append((start, i))
    return ops, spans


def decode_partition_loop(sass: str) -> list[str]:
    """Opcodes of the warp-specialized wgmma form's decode loop: the smallest loop that stores A tiles (STSM) and
    issues no MMA. Why not :func:`loop_body`: a worker partition's whole body sits inside the loop that dispatches
    it, the largest loop of the kernel."""
    ops, spans = _loops(sass)
    mine = [(a, b) for a, b in spans
            if any(o.startswith("STSM") for _, o, _ in ops[a:b + 1])
            and not any(o.startswith("HGMMA") for _, o, _ in ops[a:b + 1])]
    if not mine:
        raise ValueError("no decode loop (a loop with STSM and no HGMMA) in this kernel")
    a, b = min(mine, key=lambda ab: ab[1] - ab[0])
    return [op.split(".")[0] for _, op, _ in ops[a:b + 1] if op != "NOP"]


def loop_body(sass: str) -> list[str]:
    """Opcodes of the largest backward-branch loop in a SASS listing (the k loop; a kernel without a
    loop, like decompress, gives the whole function; a span with an EXIT inside is no loop). Branch targets may be labels (nvdisasm:
    ``BRA `(.L_x_3)``) or addresses (cuobjdump: ``BRA 0x5f0``)."""
    # a span holding an EXIT is not a loop body: a wait's retry stub placed after the kernel's end jumps back into
    # its loop (the wgmma kernel's mbarrier waits), and that span would take in the epilogue (:func:`_loops`)
    ops, spans = _loops(sass)
    best = max(spans, key=lambda ab: ab[1] - ab[0], default=None)
    body = ops[best[0]:best[1] + 1] if best else ops
    return [op.split(".")[0] for _, op, _ in body if op not in ("NOP",)]


def count(spec_name: str, kind: str, config: dict[str, Any] | None, m: int, n: int, M: int,
          pdl: int = 0) -> dict[str, Any]:
    spec = TrellisSpec.parse(spec_name)
    if kind == "wgmma":  # its can_implement needs a Hopper GPU: its heuristic default, taken directly
        from qtip_triton.kernels import wgmma_configs

        cfg = dict(config or wgmma_configs.default_config(spec, m, n, M))
        kernel, per_iter = compile_wgmma(spec, cfg, n)
    else:
        cfg = dict(config or default_config(kind, spec, m, n, M))
        kernel, per_iter = compile_kernel(spec, kind, cfg, m, n, pdl=pdl)
    sass = _sass(kernel.asm["cubin"])
    body = decode_partition_loop(sass) if kind == "wgmma" and cfg.get("WS") else loop_body(sass)
    mix = collections.Counter(body)
    # griddepcontrol.wait / .launch_dependents (programmatic dependent launch) compile to these
    pdl_ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("ACQBULK", "PREEXIT")}
    # prefetch.global.L2 (config l2_prefetch) compiles to CCTL.E.PF2: how many, and how many before the PDL wait
    wait = sass.find("ACQBULK")
    l2 = {"total": sass.count("CCTL.E.PF2"), "before_wait": sass[:wait].count("CCTL.E.PF2") if wait >= 0 else 0}
    return {"spec": spec.name, "kind": kind, "config": cfg, "shape": f"{m}x{n}", "states_per_thread_iter": per_iter,
            "loop_instructions": len(body), "per_state": len(body) / per_iter if kind != "decompress" else None,
            "shared_bytes": kernel.metadata.shared, **_resources(kernel.asm["cubin"]),
            "opcodes": dict(mix.most_common()), "pdl_ops": pdl_ops, "l2_prefetches": l2,
            **({"mma_layout": list(layout_ok(kernel.asm["ttgir"]))} if cfg.get("mma") else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", action="append", required=True, help="trellis spec (repeatable)")
    ap.add_argument("--kind", default="gemv", choices=("gemv", "gemm", "decompress", "wgmma"))
    ap.add_argument("--config", default=None, help="JSON config (default: the heuristic's for the shape)")
    ap.add_argument("--shape", default="8192x8192", help="OUTxIN")
    ap.add_argument("--M", type=int, default=1, help="batch size the default config is chosen for")
    ap.add_argument("--pdl", choices=("off", "exit", "early"), default="off",
                    help="compile as launched with programmatic dependent launch in this mode")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    m, n = (int(v) for v in a.shape.lower().split("x"))
    rows = [count(s, a.kind, json.loads(a.config) if a.config else None, m, n, a.M, {"off": 0, "exit": 1, "early": 2}[a.pdl])
            for s in a.spec]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        per = f"{r['per_state']:.1f} per state, " if r["per_state"] is not None else ""
        print(f"{r['spec']} {r['kind']} {r['shape']} {r['config']}: {r['loop_instructions']} loop instructions "
              f"({per}{r['states_per_thread_iter']:g} states/thread/iter), {r.get('reg')} registers, "
              f"stack {r.get('stack')}, shared {r['shared_bytes']} B")
        print("   " + ", ".join(f"{k} {v}" for k, v in list(r["opcodes"].items())[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
