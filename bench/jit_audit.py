"""Which first forwards JIT-compile after ``prepare()``, and what in their launch differs (GPU).

Why: ``bench/cold_start.py`` counts cache files that a precompiled process still writes, and says at which
bucket, but not which argument of the launch made Triton compile a new variant. This runs one fresh
process with an empty Triton cache: ``prepare(max_m)`` compiles what the warm-up reaches, then one
forward per ``--M`` records every compile it causes, beside the variant of the same kernel that
prepare compiled whose specialization is closest (constexprs, per-argument attributes such as
``tt.divisibility``, argument types), with the fields that differ.

    python bench/jit_audit.py --spec L16K2V2-hyb9 --shape 22016x4096 --M 1,2,4,8,16,32,64,128,200,256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def variant_fields(signature: Any, constexprs: Any, attrs: Any) -> dict[str, str]:
    """One compile's specialization as {field: value} strings, comparable between compiles."""
    out: dict[str, str] = {}
    for name, ty in dict(signature or {}).items():
        out[f"type {name}"] = str(ty)
    for k, v in dict(constexprs or {}).items():
        out[f"const {k}"] = repr(v)
    for k, v in dict(attrs or {}).items():
        out[f"attr {k}"] = repr(v)
    return out


def closest(new: dict[str, str], seen: list[dict[str, str]]) -> tuple[dict[str, str] | None, list[str]]:
    """The earlier variant with the fewest differing fields, and those fields as 'field: old -> new'."""
    best, best_diff = None, None
    for old in seen:
        diff = [f"{k}: {old.get(k, '-')} -> {new.get(k, '-')}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        if best_diff is None or len(diff) < len(best_diff):
            best, best_diff = old, diff
    return best, best_diff or []


class CompileLog:
    """Records every Triton compile of this process by wrapping ``JITFunction._do_compile``."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.phase = "start"

    def install(self) -> None:
        from triton.runtime.jit import JITFunction

        original = JITFunction._do_compile
        log = self

        def _do_compile(fn_self, key, signature, device, constexprs, options, attrs, *rest, **kw):
            log.records.append({"phase": log.phase, "kernel": getattr(fn_self.fn, "__qualname__", str(fn_self.fn)),
                                "module": getattr(fn_self.fn, "__module__", "?"),
                                "fields": variant_fields(signature, constexprs, attrs),
                                "num_warps": getattr(options, "num_warps", None)})
            return original(fn_self, key, signature, device, constexprs, options, attrs, *rest, **kw)

        JITFunction._do_compile = _do_compile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="L16K2V2-hyb9")
    ap.add_argument("--shape", default="22016x4096", help="OUTxIN")
    ap.add_argument("--M", default="1,2,4,8,16,32,64,128,200,256", help="forward batch sizes after prepare")
    ap.add_argument("--max-m", type=int, default=256, help="prepare(max_m=...)")
    ap.add_argument("--json", default=None, help="also write the records here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="jit_audit_"))
    import torch

    if not torch.cuda.is_available():
        print("bench/jit_audit.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from qtip_triton import registry
    from qtip_triton.autotune.workload import random_layer
    from qtip_triton.spec import TrellisSpec

    log = CompileLog()
    log.install()
    out, inp = (int(v) for v in args.shape.split("x"))
    qw = random_layer(TrellisSpec.parse(args.spec), out, inp, device="cuda")
    log.phase = "prepare"
    prepared = registry.prepare(qw, max_m=args.max_m)
    torch.cuda.synchronize()
    warmed = [r for r in log.records if r["phase"] == "prepare"]
    print(f"{args.spec} {args.shape}: prepare compiled {len(warmed)} variants; plan "
          + ", ".join(f"{b}: {s.kind}" for b, s in sorted(prepared.plan.items())))
    late = 0
    for M in (int(v) for v in args.M.split(",")):
        log.phase = f"M={M}"
        prepared(torch.randn(M, inp, device="cuda").half())
        torch.cuda.synchronize()
        for r in (r for r in log.records if r["phase"] == log.phase):
            late += 1
            same = [w["fields"] for w in warmed if w["kernel"] == r["kernel"] and w["module"] == r["module"]]
            _, diff = closest(r["fields"], same)
            print(f"  M={M}: compiled {r['kernel']} ({r['module']}); "
                  + (f"differs from prepare's closest variant in: {'; '.join(diff)}" if same
                     else "prepare compiled no variant of this kernel"))
    print(f"{late} compiles after prepare")
    if args.json:
        Path(args.json).write_text(json.dumps(log.records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
