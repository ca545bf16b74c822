#!/usr/bin/env python3
"""Cold start of a QTIP model's linear layers: JIT from nothing vs an imported precompiled Triton cache (GPU).

For the distinct linear layers of a Llama-2-7B-shaped model (fused qkv 12288x4096, o 4096x4096, fused gate_up
22016x4096, down 4096x11008) and the specs L16K{2,3,4}V2-hyb9, each phase runs in a FRESH process and times,
layer after layer, what a server pays before its first token:

* ``registry.prepare(qw, max_m=256)``: select the kernel and config of every M bucket 1..256 (from the shipped
  ``autotune_configs/h200.yaml``: the qtip user cache is empty), compile or load each one and launch it once;
* the first forward at every bucket size (1, 2, 4, ..., 256): should find everything warm.

Phases (in this order):

(b) ``precompiled``: ``qtip-triton precompile --file <the tuned file, cut to these layers>`` into a build cache,
    ``qtip-triton export`` it, ``qtip-triton import`` it into an empty ``TRITON_CACHE_DIR``; then the fresh
    process with that cache. The one-time setup (precompile / export / import) is reported apart.
(a) ``cold``: empty ``TRITON_CACHE_DIR`` and qtip user cache: every kernel is JIT-compiled. One spec only
    (``--cold-specs``, default K=2) and time-boxed (``--cold-budget-s``): a run cut short keeps the layers it did.

JIT is detected by files, never by timing: the number of new files in the process's Triton cache dir after
``prepare`` and after the forwards (0 = everything was loaded from the cache). The whole run keeps within
``--budget-s`` (default 230 s, for a 4-minute device call on an H100).

Output: a table on stdout, ``<out>/cold-start-<card>-<date>.json`` and ``.md`` (rewritten after each phase).

    PYTHONPATH=. python bench/cold_start.py --out "$OUT"          # on the GPU machine
    python bench/cold_start.py --dry-run                          # the plan and commands, on any machine
    TRITON_INTERPRET=1 python bench/cold_start.py --tiny          # plumbing check on the CPU (tiny shapes, no (b))
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

_T_START = time.perf_counter()  # stdlib only above: a child's import time (torch, triton, qtip_triton) counts from here
ROOT = Path(__file__).resolve().parent.parent
SHIPPED_FILE = ROOT / "autotune_configs" / "h200.yaml"
SPECS = ("L16K2V2-hyb9", "L16K3V2-hyb9", "L16K4V2-hyb9")
# name -> (out_features, in_features): the distinct linear layers of a Llama-2-7B-shaped model as served (fused)
MODELS: dict[str, dict[str, tuple[int, int]]] = {
    "llama2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    # --tiny: the same four roles at sizes the Triton interpreter runs in seconds
    "tiny": {"qkv": (192, 64), "o": (64, 64), "gate_up": (256, 64), "down": (64, 128)},
}
PHASES = ("precompiled", "cold")
RESULT_TAG = "COLD_START "


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", default=",".join(SPECS), help="specs for the precompiled phase (comma list)")
    ap.add_argument("--cold-specs", default=SPECS[0], help="specs for the cold (JIT) phase; default K=2 only")
    ap.add_argument("--layers", default="qkv,o,gate_up,down", help="layers of --model (comma list)")
    ap.add_argument("--model", default=None, choices=sorted(MODELS), help="layer shapes (default llama2-7b; tiny with --tiny)")
    ap.add_argument("--max-m", type=int, default=256, help="prepare(max_m=...) and the largest forward (default 256)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"which phases, in order (default {','.join(PHASES)})")
    ap.add_argument("--file", type=Path, default=SHIPPED_FILE,
                    help="tuned file to precompile (default the shipped autotune_configs/h200.yaml, the one the "
                         "registry reads on an H100)")
    ap.add_argument("--jobs", type=int, default=None, help="precompile processes (default: precompile's own)")
    ap.add_argument("--budget-s", type=float, default=230.0, help="the whole run stays within this (default 230)")
    ap.add_argument("--cold-budget-s", type=float, default=120.0, help="time box of the cold phase (default 120)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder (default bench/results)")
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch folder for caches (default a temp dir, removed)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU plumbing check: tiny shapes in the Triton interpreter, cold phase only, max M 4")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    ap.add_argument("--child", choices=PHASES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--results", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.model is None:
        a.model = "tiny" if a.tiny else "llama2-7b"
    if a.tiny and "--max-m" not in (argv if argv is not None else sys.argv[1:]):
        a.max_m = 4
    a.specs = _split(a.specs)
    a.cold_specs = _split(a.cold_specs)
    a.layers = _split(a.layers)
    a.phases = _split(a.phases)
    from qtip_triton.spec import TrellisSpec

    for name in a.specs + a.cold_specs:
        try:
            TrellisSpec.parse(name)
        except ValueError as e:
            ap.error(f"spec {name!r}: {e}")
    shapes = MODELS[a.model]
    bad = [x for x in a.layers if x not in shapes]
    if bad:
        ap.error(f"unknown layers {bad} for --model {a.model}; layers: {', '.join(shapes)}")
    bad = [p for p in a.phases if p not in PHASES]
    if bad or not a.phases:
        ap.error(f"--phases {','.join(a.phases)}: choose from {', '.join(PHASES)}")
    if a.max_m < 1:
        ap.error(f"--max-m must be >= 1, got {a.max_m}")
    if a.tiny:
        a.phases = [p for p in a.phases if p == "cold"]
    return a


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def layer_list(a: argparse.Namespace, specs: list[str]) -> list[dict[str, Any]]:
    """The layers a phase prepares: every spec x every layer, in that order."""
    shapes = MODELS[a.model]
    return [{"spec": s, "layer": name, "out": shapes[name][0], "in": shapes[name][1]} for s in specs for name in a.layers]


def buckets(max_m: int) -> list[int]:
    from qtip_triton.autotune.buckets import M_BUCKETS, bucket_for

    return [b for b in M_BUCKETS if b <= bucket_for(max_m)]


# ------------------------------------------------------------------------------------------ the fresh process
def child_main(a: argparse.Namespace) -> int:
    """One phase in this (fresh) process: prepare + first forwards per layer, one JSON line each to --results."""
    t_start = _T_START
    out = open(a.results, "a", encoding="utf-8")  # noqa: SIM115 - one line per layer, flushed as we go

    def emit(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    try:
        import torch

        from qtip_triton import registry
        from qtip_triton.autotune.triton_cache import triton_cache_dir
        from qtip_triton.autotune.workload import random_layer
        from qtip_triton.spec import TrellisSpec

        cuda = torch.cuda.is_available() and not a.tiny
        device = "cuda" if cuda else "cpu"

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        cache = triton_cache_dir()
        import_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        reg = registry.get_registry()
        files = [label for label, _ in reg.store.sources] if reg.store is not None else []
        emit({"type": "start", "device": device, "import_s": import_s, "registry_s": time.perf_counter() - t0,
              "triton_cache": str(cache), "cache_files": count_files(cache), "autotune_files": files})
        for lay in layer_list(a, a.cold_specs if a.child == "cold" else a.specs):
            rec: dict[str, Any] = dict(lay)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    qw = random_layer(TrellisSpec.parse(lay["spec"]), lay["out"], lay["in"], device=device)
                    sync()
                    rec["build_s"] = time.perf_counter() - t0
                    f0 = count_files(cache)
                    t0 = time.perf_counter()
                    prepared = registry.prepare(qw, max_m=a.max_m)
                    sync()
                    rec["prepare_s"] = time.perf_counter() - t0
                    f1 = count_files(cache)
                    per = []
                    compiled_at: dict[str, list[str]] = {}  # bucket -> kernels its first forward compiled
                    for b in buckets(a.max_m):
                        x = torch.randn(b, lay["in"], device=device).half()
                        before = kernel_names(cache)
                        t0 = time.perf_counter()
                        prepared(x)
                        sync()
                        per.append(time.perf_counter() - t0)
                        new = sorted(kernel_names(cache) - before)
                        if new:
                            compiled_at[str(b)] = [n.split("/", 1)[1] for n in new]
                    rec["compiled_at"] = compiled_at
                    rec["forward_s"], rec["forward_max_s"] = sum(per), max(per)
                    f2 = count_files(cache)
                rec["new_files_prepare"], rec["new_files_forward"] = f1 - f0, f2 - f1
                rec["plan"] = {str(b): [s.kind, short_source(s.source)] for b, s in prepared.plan.items()}
                rec["sources"] = dict(Counter(source_class(s.source, s.kind) for s in prepared.plan.values()))
                rec["warnings"] = [str(w.message)[:300] for w in caught][:3]
                del qw, prepared
            except Exception as e:  # report and go on with the next layer
                rec["error"] = f"{type(e).__name__}: {e}"[:500]
                rec["traceback"] = traceback.format_exc(limit=3)[-1500:]
            emit({"type": "layer", **rec})
        emit({"type": "done", "wall_s": time.perf_counter() - t_start, "cache_files": count_files(cache)})
        return 0
    finally:
        out.close()


def count_files(root: Path) -> int:
    """Files in a Triton cache dir (a new one = something was compiled)."""
    root = Path(root)
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def kernel_names(root: Path) -> set[str]:
    """Compiled kernels in a Triton cache dir, as ``<cache entry>/<kernel name>`` (from the binaries' names)."""
    root = Path(root)
    if not root.is_dir():
        return set()
    return {f"{p.parent.name[:8]}/{p.stem}" for p in root.rglob("*") if p.suffix in (".cubin", ".hsaco")}


def source_class(source: str, kind: str) -> str:
    if kind == "reference":
        return "reference"
    if source.startswith("user cache"):
        return "user cache"
    if source.startswith("shipped"):
        return "shipped"
    return "heuristic"


def short_source(source: str) -> str:
    """``shipped h100.yaml (M<=4)`` -> ``shipped M<=4``; ``heuristic default`` -> ``heuristic``."""
    m = re.search(r"\(M<=(\d+)\)$", source)
    cls = "user cache" if source.startswith("user cache") else "shipped" if source.startswith("shipped") else "heuristic"
    return f"{cls} M<={m.group(1)}" if m else cls


# ------------------------------------------------------------------------------------------ orchestration
def child_env(work: Path, name: str, tiny: bool) -> dict[str, str]:
    """Environment of a fresh process: its own (empty unless filled) Triton cache and qtip user cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["TRITON_CACHE_DIR"] = str(work / f"{name}-triton")
    env["QTIP_TRITON_CACHE_DIR"] = str(work / f"{name}-qtip")
    if tiny:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_cmd(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> dict[str, Any]:
    """Run ``cmd`` in its own process group (killed whole past ``timeout``); output to ``log``."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    text = log.read_text(encoding="utf-8", errors="replace")
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), "timed_out": timed_out, "tail": text[-1200:]}


def cut_tune_file(src: Path, dst: Path, layers: list[dict[str, Any]]) -> int:
    """Write the entries of ``src`` for these layers to ``dst``; returns how many."""
    from qtip_triton.autotune import store

    tf = store.load(src)
    want = {(x["spec"], x["out"], x["in"]) for x in layers}
    entries = {k: e for k, e in tf.entries.items() if (k.spec, k.out_features, k.in_features) in want}
    dst.write_text(store.dumps(store.TuneFile(tf.header, entries)), encoding="utf-8")
    return len(entries)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qtip_triton.cli", *args]


def setup_commands(a: argparse.Namespace, work: Path) -> list[tuple[str, list[str]]]:
    """(step, command) of the precompiled cache's one-time setup."""
    jobs = ["--jobs", str(a.jobs)] if a.jobs else []
    archive = work / "cache.tar.gz"
    return [
        ("precompile", cli("precompile", "--file", str(work / "tuned.yaml"), "--no-progress", *jobs)),
        ("export", cli("export", str(archive), "--cache-dir", str(work / "build-triton"))),
        ("import", cli("import", str(archive), "--cache-dir", str(work / "precompiled-triton"))),
    ]


def child_command(a: argparse.Namespace, phase: str, results: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--results", str(results),
           "--model", a.model, "--layers", ",".join(a.layers), "--max-m", str(a.max_m),
           "--specs", ",".join(a.specs), "--cold-specs", ",".join(a.cold_specs)]
    return cmd + (["--tiny"] if a.tiny else [])


def run_phase(a: argparse.Namespace, phase: str, work: Path, timeout: float) -> dict[str, Any]:
    """Run one phase's fresh process; parse its JSON lines (whatever it wrote before a time-out too)."""
    results = work / f"{phase}.jsonl"
    results.unlink(missing_ok=True)
    env = child_env(work, phase, a.tiny)
    Path(env["TRITON_CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
    before = count_files(Path(env["TRITON_CACHE_DIR"]))
    res = run_cmd(child_command(a, phase, results), env, timeout, work / f"{phase}.log")
    records = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()
               if line.strip()] if results.exists() else []
    start = next((r for r in records if r["type"] == "start"), None)
    done = next((r for r in records if r["type"] == "done"), None)
    planned = len(layer_list(a, a.cold_specs if phase == "cold" else a.specs))
    layers = [{k: v for k, v in r.items() if k != "type"} for r in records if r["type"] == "layer"]
    out = {"phase": phase, "rc": res["rc"], "timed_out": res["timed_out"], "timeout_s": round(timeout, 1),
           "process_s": res["seconds"], "cache_files_before": before, "start": start, "done": done,
           "layers": layers, "layers_planned": planned}
    if res["rc"] != 0 or done is None:
        out["log_tail"] = res["tail"]
    return out


def summarize(phase: dict[str, Any]) -> dict[str, Any]:
    """Totals of one phase: compile/load seconds, JIT evidence, status."""
    ok = [x for x in phase["layers"] if "error" not in x]
    total = sum(x["prepare_s"] + x["forward_s"] for x in ok)
    jit_prep = sum(x["new_files_prepare"] for x in ok)
    jit_fwd = sum(x["new_files_forward"] for x in ok)
    if phase.get("skipped"):
        status = f"skipped: {phase['skipped']}"
    elif phase["timed_out"]:
        status = f"time box {phase['timeout_s']:.0f} s reached after {len(phase['layers'])}/{phase['layers_planned']} layers"
    elif phase["done"] is None or phase["rc"] != 0:
        status = f"failed (exit {phase['rc']})"
    elif len(ok) < len(phase["layers"]):
        status = f"{len(phase['layers']) - len(ok)} layers failed"
    else:
        status = "ok"
    start = phase.get("start") or {}
    return {"layers": len(ok), "prepare_and_forward_s": round(total, 2),
            "prepare_s": round(sum(x["prepare_s"] for x in ok), 2),
            "forward_s": round(sum(x["forward_s"] for x in ok), 2),
            "import_s": round(start.get("import_s", float("nan")), 2),
            "process_s": phase.get("process_s"), "new_cache_files_prepare": jit_prep,
            "new_cache_files_forward": jit_fwd, "jit": (jit_prep + jit_fwd) > 0, "status": status}


# ------------------------------------------------------------------------------------------ report
def _fmt(v: Any, nd: int = 2) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.{nd}f}"
    return "-" if v is None else str(v)


def layer_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in PHASES:
        ph = report["phases"].get(name)
        if not ph:
            continue
        for x in ph["layers"]:
            shape = f"{x['out']}x{x['in']}"
            if "error" in x:
                rows.append([name, x["spec"], x["layer"], shape, "-", "-", "-", f"error: {x['error'][:60]}"])
                continue
            src = ", ".join(f"{k} {v}" for k, v in sorted(x["sources"].items()))
            rows.append([name, x["spec"], x["layer"], shape, _fmt(x["prepare_s"]), _fmt(x["forward_s"], 3),
                         f"{x['new_files_prepare']} / {x['new_files_forward']}", src])
    return rows


LAYER_HEAD = ["phase", "spec", "layer", "out x in", "prepare s", "first fwds s", "new cache files prep/fwd", "buckets from"]
TOTAL_HEAD = ["phase", "layers", "prepare + first fwds s", "process s", "new cache files", "JIT", "status"]


def total_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in PHASES:
        ph = report["phases"].get(name)
        if not ph:
            continue
        s = ph["summary"]
        rows.append([name, str(s["layers"]), _fmt(s["prepare_and_forward_s"]), _fmt(s["process_s"], 1),
                     f"{s['new_cache_files_prepare']} + {s['new_cache_files_forward']}", "yes" if s["jit"] else "no",
                     s["status"]])
    return rows


def format_table(head: list[str], rows: list[list[str]]) -> str:
    """A plain fixed-width table for the terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def comparison(report: dict[str, Any]) -> str | None:
    """Cold vs precompiled on the layers both phases prepared."""
    cold, pre = report["phases"].get("cold"), report["phases"].get("precompiled")
    if not cold or not pre:
        return None

    def by_key(ph):
        return {(x["spec"], x["layer"]): x["prepare_s"] + x["forward_s"] for x in ph["layers"] if "error" not in x}

    c, p = by_key(cold), by_key(pre)
    both = sorted(set(c) & set(p))
    if not both:
        return None
    tc, tp = sum(c[k] for k in both), sum(p[k] for k in both)
    ratio = f"{tc / tp:.1f}x" if tp > 0 else "-"
    return (f"Same {len(both)} layers ({', '.join(f'{s} {n}' for s, n in both)}): cold JIT {tc:.1f} s vs precompiled "
            f"cache {tp:.2f} s ({ratio}).")


def markdown(report: dict[str, Any]) -> str:
    env, st = report["environment"], report["settings"]
    lines = [f"# Cold start — {env.get('card', '?')} — {env.get('date', '?')}", "",
             f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, qtip_triton {env.get('qtip_triton_rev', '?')}. "
             f"Model {st['model']} layers {', '.join(st['layers'])}; each layer: `registry.prepare(max_m={st['max_m']})` "
             f"then one forward at each bucket size {st['buckets'][0]}..{st['buckets'][-1]}, in a fresh process with an "
             f"empty qtip user cache (configs from the shipped autotune file). New cache files = files added to the "
             f"process's Triton cache dir (0 = no JIT).", ""]
    setup = report.get("setup")
    if setup:
        parts = [f"{k} {v['seconds']:.1f} s" + (f" ({v['what']})" if v.get("what") else "") + ("" if v["rc"] == 0 else f" FAILED rc={v['rc']}")
                 for k, v in setup["steps"].items()]
        lines += [f"Precompiled cache, one-time setup ({setup['entries']} entries of {setup['file']}): " + "; ".join(parts)
                  + ".", ""]
    lines += ["## Totals", ""] + md_table(TOTAL_HEAD, total_rows(report))
    cmp_line = comparison(report)
    if cmp_line:
        lines += ["", cmp_line]
    lines += ["", "## Per layer", ""] + md_table(LAYER_HEAD, layer_rows(report))
    files = sorted({f for ph in report["phases"].values() for f in ((ph.get("start") or {}).get("autotune_files") or [])})
    lines += ["", f"Autotune files the registry read: {', '.join(files) if files else 'none (heuristic defaults)'}."]
    for x in (report["phases"].get("precompiled") or {}).get("layers", []):
        if "error" not in x and x["new_files_prepare"] + x["new_files_forward"]:
            borrowed = [f"{b}: {k} {src}" for b, (k, src) in x["plan"].items() if not src.endswith(f"M<={b}")]
            lines += [f"JIT despite the cache in {x['spec']} {x['layer']}: buckets served by another bucket's "
                      f"entry or the heuristic: {'; '.join(borrowed) or 'none'}."]
            at = x.get("compiled_at") or {}
            if at:
                lines += ["  First forwards that compiled (M: kernels): "
                          + "; ".join(f"{b}: {', '.join(names)}" for b, names in at.items()) + "."]
    for name, ph in report["phases"].items():
        if ph.get("log_tail"):
            lines += ["", f"`{name}` process output (tail):", "", "```", ph["log_tail"].strip()[-800:], "```"]
    return "\n".join(lines) + "\n"


def out_stem(out_dir: Path, card: str, date: str) -> Path:
    return Path(out_dir) / f"cold-start-{card}-{date}"


def card_slug(tiny: bool) -> str:
    if tiny:
        return "cpu-interpreter"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import card_slug as slug

    return slug()


def environment(tiny: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    try:
        import torch
        import triton

        env.update(torch=torch.__version__, triton=triton.__version__)
        if torch.cuda.is_available() and not tiny:
            env["card"] = torch.cuda.get_device_name()
        else:
            env["card"] = "CPU (Triton interpreter)" if tiny else "CPU"
    except Exception as e:  # report what is known
        env["env_error"] = repr(e)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import source_rev

        env["qtip_triton_rev"] = source_rev()
    except (OSError, ImportError):
        env["qtip_triton_rev"] = "?"
    return env


def write_report(report: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(report), encoding="utf-8")


# ------------------------------------------------------------------------------------------ main
def dry_run(a: argparse.Namespace) -> int:
    work = Path("<work>")
    print(f"cold start plan: model {a.model}, layers {', '.join(a.layers)}, max M {a.max_m} "
          f"(buckets {buckets(a.max_m)}), budget {a.budget_s:.0f} s")
    for phase in a.phases:
        layers = layer_list(a, a.cold_specs if phase == "cold" else a.specs)
        print(f"\n[{phase}] {len(layers)} layers: " + ", ".join(f"{x['spec']} {x['layer']} {x['out']}x{x['in']}" for x in layers))
        if phase == "precompiled":
            n: Any = "?"
            if a.file.is_file():
                with tempfile.TemporaryDirectory() as tmp:
                    n = cut_tune_file(a.file, Path(tmp) / "tuned.yaml", layers)
            print(f"  setup: {n} entries of {a.file} -> {work / 'tuned.yaml'}")
            for step, cmd in setup_commands(a, work):
                print(f"  {step}: TRITON_CACHE_DIR={work}/build-triton QTIP_TRITON_CACHE_DIR={work}/build-qtip "
                      f"{' '.join(cmd)}")
            print(f"  fresh process: TRITON_CACHE_DIR={work}/precompiled-triton (imported) "
                  f"QTIP_TRITON_CACHE_DIR={work}/precompiled-qtip (empty)")
        else:
            print(f"  fresh process: TRITON_CACHE_DIR={work}/cold-triton (empty) QTIP_TRITON_CACHE_DIR={work}/cold-qtip "
                  f"(empty), time box {a.cold_budget_s:.0f} s")
        print("  " + " ".join(child_command(a, phase, work / f"{phase}.jsonl")))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        return child_main(a)
    if a.dry_run:
        return dry_run(a)
    t_start = time.perf_counter()

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t_start)

    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="cold_start_"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(a.tiny)
    stem = out_stem(a.out, card_slug(a.tiny), env["date"].split()[0])
    report: dict[str, Any] = {
        "environment": env,
        "settings": {"model": a.model, "layers": a.layers, "specs": a.specs, "cold_specs": a.cold_specs,
                     "max_m": a.max_m, "buckets": buckets(a.max_m), "file": str(a.file), "phases": a.phases,
                     "budget_s": a.budget_s, "cold_budget_s": a.cold_budget_s, "tiny": a.tiny},
        "phases": {},
    }
    try:
        for phase in a.phases:
            print(f"== {phase} ({left():.0f} s left)", flush=True)
            if phase == "precompiled":
                ph = precompiled_phase(a, work, report, left)
            else:
                timeout = min(a.cold_budget_s, left() - 5)
                ph = run_phase(a, "cold", work, timeout) if timeout >= 20 else \
                    {"phase": "cold", "layers": [], "skipped": f"only {left():.0f} s left", "timed_out": False,
                     "rc": None, "done": None}
            ph["summary"] = summarize(ph)
            report["phases"][phase] = ph
            write_report(report, stem)
            print(format_table(LAYER_HEAD, [r for r in layer_rows(report) if r[0] == phase]), flush=True)
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + format_table(TOTAL_HEAD, total_rows(report)))
    cmp_line = comparison(report)
    if cmp_line:
        print(cmp_line)
    print(f"wrote {stem}.json and .md in {time.perf_counter() - t_start:.0f} s", flush=True)
    ok = all(ph["summary"]["status"] == "ok" or ph.get("timed_out") for ph in report["phases"].values())
    return 0 if ok else 1


def precompiled_phase(a: argparse.Namespace, work: Path, report: dict[str, Any], left) -> dict[str, Any]:
    """precompile -> export -> import (timed, reported as setup), then the fresh process on the imported cache."""
    layers = layer_list(a, a.specs)
    entries = cut_tune_file(a.file, work / "tuned.yaml", layers)
    setup: dict[str, Any] = {"file": str(a.file), "entries": entries, "steps": {}}
    report["setup"] = setup
    build_env = child_env(work, "build", a.tiny)
    Path(build_env["TRITON_CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
    for step, cmd in setup_commands(a, work):
        res = run_cmd(cmd, build_env, max(left() - 45, 10), work / f"{step}.log")
        m = re.search(r"(precompiled \d+ kernel variants|exported \d+ files|imported \d+ new files)", res["tail"])
        setup["steps"][step] = {"rc": res["rc"], "seconds": res["seconds"], "timed_out": res["timed_out"],
                                "what": m.group(1) if m else None}
        print(f"  {step}: {res['seconds']:.1f} s, rc {res['rc']}" + (f", {m.group(1)}" if m else ""), flush=True)
        if res["rc"] != 0:
            setup["steps"][step]["log_tail"] = res["tail"]
            return {"phase": "precompiled", "layers": [], "skipped": f"{step} failed (rc {res['rc']})",
                    "timed_out": False, "rc": res["rc"], "done": None, "log_tail": res["tail"]}
    return run_phase(a, "precompiled", work, max(min(90.0, left() - 5), 10))


if __name__ == "__main__":
    sys.exit(main())
