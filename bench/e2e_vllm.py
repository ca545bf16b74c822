#!/usr/bin/env python3
"""End-to-end vLLM decode speed of QTIP Llama models vs fp16 (GPU; one device call runs everything).

For each model shape (Llama-2-7B, Llama-3-8B) and weight format (fp16, QTIP K = 2, 3, 4, optionally with
switches that turn a default off for comparison: ``2+nozb``, ``2+nostacked``, or an opt-in on: ``2+fdec``) it writes a
config.json (QTIP ones carry ``quip_params`` and ``quantization_config``, so the ``qtip`` plugin is
picked up through its entry point in every vLLM process), starts ``vllm.LLM`` with
``load_format="dummy"`` (random weights: the plugin fills valid random trellises), torch.compile and
CUDA graphs, and measures decode:

    ms/step = (fastest t(prompt, short + N new tokens) - fastest t(prompt, short new tokens)) / N over ``--reps``

at each batch size (greedy, ``ignore_eos``, token-id prompts of ``--prompt-len``), so prefill and
start-up cancel. With ``--prefill-len P`` it also times prefill, the path of large batches (decompress +
cuBLAS and the many-token transforms):

    prefill ms = t(one prompt of P tokens, 1 new token) - t(one prompt of 16 tokens, 1 new token), best of ``--reps``

With ``--profile-batch B`` the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and one decode at
batch B is profiled (``torch.profiler``, the long run minus the short one): GPU µs per step by kernel and by
group (``bench/kernel_profile.py``), to say where a step's time goes in the real engine.
 Results are rewritten after every configuration (a time-out keeps what finished)
to ``$OUT/e2e_vllm-<card>-<date>.json`` and ``.md``; the table's ratios compare each QTIP row with
the fp16 row of the same shape and batch.

Runs every configuration in this process by default (one ``LLM`` after another, each torn down
before the next); ``--isolate`` runs each in a child process instead (cleaner, ~10 s more each).
Use ``bench/e2e_vllm_device.sh`` on the GPU machine: it unpacks the vLLM bundle and registers the
plugin's entry point. Quick plugin check first: ``--shapes tiny --formats 2 --batches 1 --eager``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = str(Path(__file__).resolve().parent)


def _sibling_scripts_importable() -> None:
    """bench/ on sys.path once (kernel_profile, common are scripts beside this one, not package modules)."""
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)


# hidden, intermediate, layers, heads, kv heads, vocab (+ rope settings of the real models)
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # intermediate 2752 = 172 * 16: QTIP needs a Hadamard size (vllm_smoke's 2816 = 11 * 256 has none)
    "tiny": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
}
FORMATS = ("fp16", "2", "3", "4")
# A QTIP format may carry switches, e.g. "2+nozb": the same engine with these environment variables set while it is
# built and run (kernels/hadamard.py reads them per call; the warm-up compiles for them), so one device call
# compares a default with what it replaced (both were opt-in "zb" / "stacked" until session 16 made them defaults).
SWITCHES = {"nozb": {"QTIP_TRITON_HADAMARD_ZB_FIRST": "0"}, "nostacked": {"QTIP_TRITON_HADAMARD_STACKED": "0"},
            # the other way round: an opt-in path timed against the default in the same call
            "fdec": {"QTIP_TRITON_WGMMA_FUSED_DECODE": "1"}}


def split_format(fmt: str) -> tuple[str, list[str]]:
    """("2", ["nozb"]) for "2+nozb"; a clear error for an unknown base format or switch."""
    base, *opts = fmt.split("+")
    if base not in FORMATS or any(o not in SWITCHES for o in opts) or (opts and base == "fp16"):
        raise ValueError(f"format {fmt!r}: expected one of {FORMATS}, QTIP ones optionally with "
                         f"+{'/+'.join(SWITCHES)}")
    return base, opts


def format_name(fmt: str) -> str:
    base, opts = split_format(fmt)
    return "fp16" if base == "fp16" else f"QTIP K={base}" + "".join(f" +{o}" for o in opts)


@contextlib.contextmanager
def switches(fmt: str):
    """The format's environment switches set for the duration (restored after)."""
    env = {k: v for o in split_format(fmt)[1] for k, v in SWITCHES[o].items()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quip_params(K: int) -> dict:
    return {"codebook": "bitshift", "codebook_version": 0, "L": 16, "K": K, "V": 2, "tlut_bits": 9,
            "decode_mode": "quantlut_sym", "td_x": 16, "td_y": 16, "split_for_tp": False, "skip_list": []}


def write_model(root: Path, shape: str, fmt: str, layers: int | None) -> Path:
    """A config.json-only model directory (weights come from load_format='dummy')."""
    cfg = dict(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float16", hidden_act="silu",
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    fmt = split_format(fmt)[0]  # switches change how it runs, not the model
    if fmt != "fp16":
        qp = quip_params(int(fmt))
        cfg["quip_params"] = qp
        cfg["quantization_config"] = {"quant_method": "qtip", **qp}
    path = root / f"{shape}-{fmt}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def run_config(shape: str, fmt: str, a: argparse.Namespace) -> dict:
    """Start one engine (with the format's switches set), time decode at each batch size, tear it down."""
    with switches(fmt):
        return _run_config(shape, fmt, a)


def _run_config(shape: str, fmt: str, a: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    model = write_model(Path(a.model_root), shape, fmt, a.layers)
    t0 = time.perf_counter()
    kw = dict(model=str(model), load_format="dummy", dtype="float16", skip_tokenizer_init=True,
              attention_backend=a.attn, enforce_eager=a.eager, gpu_memory_utilization=a.gpu_mem,
              max_model_len=a.max_model_len, max_num_seqs=max(a.batches), seed=0)
    if not a.eager:
        kw["compilation_config"] = {"cudagraph_capture_sizes": sorted(set(a.batches))}
    llm = LLM(**kw)
    res: dict = {"shape": shape, "format": fmt, "init_s": round(time.perf_counter() - t0, 1)}
    try:
        def generate(batch: int, n_new: int, prompt_len: int = a.prompt_len) -> tuple[float, list]:
            sp = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True, detokenize=False)
            prompts = [{"prompt_token_ids": [(7 * i + 13 * b) % 30000 + 100 for i in range(prompt_len)]}
                       for b in range(batch)]
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            return time.perf_counter() - t, outs

        dt0, outs = generate(1, a.short)
        sample = list(outs[0].outputs[0].token_ids)
        res["sample_tokens"] = sample[:8]
        # random weights give arbitrary tokens; a single repeated token hints at NaN/inf logits
        res["distinct_sample_tokens"] = len(set(sample))
        for batch in a.batches:
            generate(batch, a.short)  # warm this batch size
            runs = []
            for _ in range(a.reps):
                t_short, _ = generate(batch, a.short)
                t_long, outs = generate(batch, a.short + a.decode_tokens)
                assert all(len(o.outputs[0].token_ids) == a.short + a.decode_tokens for o in outs)
                runs.append({"short_s": round(t_short, 4), "long_s": round(t_long, 4)})
            res[f"b{batch}"] = step_cell(runs, batch, a.decode_tokens)
        if a.profile_batch:
            res[f"profile_b{a.profile_batch}"] = profile_decode(generate, a)
        if a.prefill_len:
            for n in (16, a.prefill_len):  # warm both prompt lengths
                generate(1, 1, n)
            short = min(generate(1, 1, 16)[0] for _ in range(a.reps))
            full = min(generate(1, 1, a.prefill_len)[0] for _ in range(a.reps))
            res["prefill"] = {"tokens": a.prefill_len, "ms": round((full - short) * 1e3, 2),
                              "tok_s": round(a.prefill_len / max(full - short, 1e-9), 1)}
    finally:
        shutdown(llm)
    return res


def decode_step_s(runs: list[dict], decode_tokens: int) -> float:
    """Seconds per decode step: the fastest long run minus the fastest short run, over the decoded tokens.

    Why not the best of each rep's own difference: a short run that stalls (a Triton JIT of an attention
    shape the warm-up missed, 0.5-1 s) makes its rep's difference small, and the best of the differences then
    picks exactly that rep. The H100 run of 2026-12-05 reported batch 16 at 4.74 ms/step for fp16 that way
    (short run 0.75 s against 0.17-0.20 s in the other reps); its fastest runs give 6.69. The minimum of each
    kind is what the uninterrupted engine does, since a stall can only add time.
    """
    if not runs:
        raise ValueError("no runs to score")
    step = (min(r["long_s"] for r in runs) - min(r["short_s"] for r in runs)) / decode_tokens
    if step <= 0:
        raise ValueError(f"the long runs were not slower than the short ones: {runs}")
    return step


def step_cell(runs: list[dict], batch: int, decode_tokens: int) -> dict:
    """One batch size's table cell from its timed runs (kept in the cell, so a report can be scored again)."""
    step = decode_step_s(runs, decode_tokens)
    return {"ms_per_step": round(step * 1e3, 3), "tok_s_per_seq": round(1 / step, 1),
            "tok_s_total": round(batch / step, 1), "runs": runs}


def rescore(path: Path) -> Path:
    """Rewrite a saved report's cells from the runs it kept, with ``decode_step_s`` (reports written before
    2026-12-05 scored the best rep's own difference). Writes ``<stem>-rescored.{json,md}`` beside it."""
    data = json.loads(path.read_text())
    a = argparse.Namespace(**data["settings"])
    a.skipped = [tuple(x) for x in data.get("skipped", [])]
    for r in data["results"]:
        for b in a.batches:
            cell = r.get(f"b{b}")
            if cell and cell.get("runs"):
                r[f"b{b}"] = step_cell(cell["runs"], b, a.decode_tokens)
    data.setdefault("environment", {})["rescored"] = "decode_step_s: fastest long run - fastest short run"
    stem = path.with_suffix("")
    out = stem.with_name(stem.name + "-rescored")
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(data["results"], data["environment"], a))
    return out


def profile_decode(generate, a: argparse.Namespace) -> dict:
    """GPU time per decode step by kernel at batch ``a.profile_batch``: the profiled long run minus the short one."""
    import torch

    _sibling_scripts_importable()
    from kernel_profile import kernel_times, per_step

    regions = {}
    for label, n_new in (("short", a.short), ("long", a.short + a.decode_tokens)):
        generate(a.profile_batch, n_new)  # warm outside the profile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            generate(a.profile_batch, n_new)
        regions[label] = kernel_times(prof.events())
    if not regions["long"]:
        return {"error": "no CUDA kernels recorded: the engine must run in this process "
                         "(VLLM_ENABLE_V1_MULTIPROCESSING=0)"}
    return per_step(regions["long"], regions["short"], a.decode_tokens)


def shutdown(llm) -> None:
    """Stop the engine (its EngineCore process holds the GPU memory) before the next configuration."""
    engine = getattr(llm, "llm_engine", None)
    for obj in (getattr(engine, "engine_core", None), engine):
        stop = getattr(obj, "shutdown", None)
        if callable(stop):
            with contextlib.suppress(Exception):  # best effort: collecting the LLM also stops it
                stop()


def release() -> None:
    """After an engine's last reference is gone: collect it and free what this process holds."""
    gc.collect()
    with contextlib.suppress(Exception):
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def environment() -> dict:
    env = {"python": platform.python_version(), "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    try:
        import torch
        import triton

        env.update(torch=torch.__version__, triton=triton.__version__)
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        env["card"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
        import vllm

        env["vllm"] = vllm.__version__
    except Exception as e:  # report what is known
        env["env_error"] = repr(e)
    with contextlib.suppress(Exception):
        _sibling_scripts_importable()
        from common import source_rev

        env["qtip_triton_rev"] = source_rev()
    from qtip_triton import dispatch

    env["qtip_kernels"] = "triton" if hasattr(dispatch, "prepare") else "reference (no dispatch.prepare)"
    return env


def markdown(results: list[dict], env: dict, a: argparse.Namespace) -> str:
    lines = [f"# vLLM end-to-end decode — {env.get('card', '?')} — {env['date']}", "",
             f"vLLM {env.get('vllm', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"qtip_triton {env.get('qtip_triton_rev', '?')} ({env.get('qtip_kernels')}). "
             f"Random weights (load_format=dummy), {'eager' if a.eager else 'torch.compile + CUDA graphs'}, "
             f"{a.attn}, prompt {a.prompt_len} tokens, decode ms/step = (t({a.short}+{a.decode_tokens}) - "
             f"t({a.short})) / {a.decode_tokens}, fastest of {a.reps} runs each. x fp16 = QTIP tok/s / fp16 tok/s.", ""]
    if env.get("rescored"):
        lines[2] += f" Rescored from the saved runs ({env['rescored']})."
    pre = any("prefill" in r for r in results)
    head = "| shape | weights | init s |" + "".join(f" b{b} ms/step | b{b} tok/s | b{b} x fp16 |" for b in a.batches)
    if pre:
        lines[2] += (f" Prefill: one prompt of {getattr(a, 'prefill_len', '?')} tokens, ms = t(prompt, 1 new token) - "
                     "t(16-token prompt, 1 new token).")
        head += " prefill ms | prefill tok/s | prefill x fp16 |"
    lines += [head, "|" + "---|" * (3 + 3 * len(a.batches) + 3 * pre)]
    fp16 = {r["shape"]: r for r in results if r["format"] == "fp16" and "error" not in r}
    for r in results:
        name = format_name(r["format"])
        if "error" in r:
            lines.append(f"| {r['shape']} | {name} | failed: {r['error'][:80]} |")
            continue
        row = f"| {r['shape']} | {name} | {r['init_s']} |"
        for b in a.batches:
            cell = r.get(f"b{b}")
            base = fp16.get(r["shape"], {}).get(f"b{b}")
            ratio = f"{cell['tok_s_total'] / base['tok_s_total']:.2f}" if cell and base else "-"
            row += f" {cell['ms_per_step'] if cell else '-'} | {cell['tok_s_total'] if cell else '-'} | {ratio} |"
        if pre:
            cell, base = r.get("prefill"), fp16.get(r["shape"], {}).get("prefill")
            ratio = f"{cell['tok_s'] / base['tok_s']:.2f}" if cell and base else "-"
            row += f" {cell['ms'] if cell else '-'} | {cell['tok_s'] if cell else '-'} | {ratio} |"
        lines.append(row)
    suspect = implausible_steps(results, a.batches)
    if suspect:
        lines += ["", "**Suspect:** " + "; ".join(suspect) + ". A decode step of more sequences does the same "
                  "weight reads and more of everything else, so it cannot be faster than one sequence's: rerun "
                  "(e.g. --reps 3) before quoting those cells (each batch's short and long runs are in the JSON)."]
    if a.reps < 2:
        lines += ["", "**One run per cell:** a stall of the engine in a long run (0.5-1 s, e.g. a JIT the warm-up "
                  f"missed) adds 4-8 ms to a {a.decode_tokens}-step cell and nothing here can flag it (the H100's "
                  "batch 16 of 2026-12-06: 11.7 ms/step in one run, 7.0 as the fastest of three). Quote cells from "
                  "--reps 2 or more."]
    unsteady = unsteady_cells(results, a.batches)
    if unsteady:
        lines += ["", "**Unsteady:** " + "; ".join(unsteady) + ". The cell takes the fastest long and short runs, "
                  "so a stall in some runs does not enter it, but one in every run would: more reps before quoting."]
    skipped = [f"{s}/{f}" for s, f in getattr(a, "skipped", [])]
    if skipped:
        lines += ["", f"Skipped for time: {', '.join(skipped)}"]
    profiled = [r for r in results if any(k.startswith("profile_b") for k in r)]
    if profiled:
        _sibling_scripts_importable()
        from kernel_profile import markdown as profile_markdown

        lines += ["", "## Where a decode step's GPU time goes (torch.profiler, engine in-process)", ""]
        for r in profiled:
            for key in (k for k in r if k.startswith("profile_b")):
                name = format_name(r["format"])
                title = f"{r['shape']}, {name}, batch {key[len('profile_b'):]}"
                if "error" in r[key]:
                    lines += [f"### {title}", "", r[key]["error"], ""]
                    continue
                lines += profile_markdown(title, r[key])
                step = r.get(f"b{key[len('profile_b'):]}", {}).get("ms_per_step")
                if step:  # kernels overlap under PDL, so this can pass 100 %; far below it, the GPU waits
                    busy = r[key]["total_us"] / (step * 10)  # µs over ms x 1000, in per cent
                    lines.insert(len(lines) - 1, f"Kernel time {r[key]['total_us']:.0f} µs of the measured "
                                                 f"{step * 1e3:.0f} µs per step ({busy:.0f} %).")
    return "\n".join(lines) + "\n"


def unsteady_cells(results: list[dict], batches: list[int], spread: float = 0.15) -> list[str]:
    """Cells of two or more runs whose long runs differ by more than ``spread`` (slowest / fastest - 1): a stall in
    some of them. Why: the fastest-run score hides a stall that hit only some reps, which this names so the cell's
    reps can be raised; a cell of one run cannot be checked at all (the markdown says so)."""
    out = []
    for r in results:
        if "error" in r:
            continue
        for b in batches:
            runs = (r.get(f"b{b}") or {}).get("runs") or []
            longs = [x["long_s"] for x in runs if x.get("long_s")]
            if len(longs) >= 2 and max(longs) / min(longs) - 1 > spread:
                out.append(f"{r['shape']} {format_name(r['format'])} batch {b}: long runs "
                           f"{min(longs):.2f}-{max(longs):.2f} s")
    return out


def implausible_steps(results: list[dict], batches: list[int], slack: float = 0.9) -> list[str]:
    """Cells whose ms/step at a batch above the smallest is below ``slack`` x that of the smallest batch (H200
    run 13, 2026-12-05: batch 16 at 2.35 ms/step against batch 1's 4.40 for fp16, in one call)."""
    out = []
    first = min(batches, default=None)
    for r in results:
        base = r.get(f"b{first}") if "error" not in r else None
        if not base:
            continue
        for b in batches:
            cell = r.get(f"b{b}")
            if b > first and cell and cell["ms_per_step"] < slack * base["ms_per_step"]:
                out.append(f"{r['shape']} {format_name(r['format'])} batch {b} at {cell['ms_per_step']} ms/step "
                           f"against batch {first}'s {base['ms_per_step']}")
    return out


def child_main(a: argparse.Namespace) -> None:
    shape, fmt = a.child.split(":")
    try:
        res = run_config(shape, fmt, a)
    except BaseException:
        res = {"shape": shape, "format": fmt, "error": traceback.format_exc(limit=4)[-1500:]}
    print("RESULT " + json.dumps(res), flush=True)


def run_isolated(shape: str, fmt: str, a: argparse.Namespace, argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", f"{shape}:{fmt}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"shape": shape, "format": fmt, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"shape": shape, "format": fmt, "error": f"exit {out.returncode}: {out.stderr[-1500:]}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help=f"comma list of fp16 and QTIP K (2,3,4), a QTIP one optionally with switches: "
                         f"{', '.join(f'+{k} ({v})' for k, v in SWITCHES.items())}, e.g. 2+nozb")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--short", type=int, default=16, help="new tokens of the short run subtracted out")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--profile-batch", type=int, default=0,
                    help="profile one decode at this batch (one of --batches): GPU time per step by kernel (0: off)")
    ap.add_argument("--prefill-len", type=int, default=0,
                    help="also time the prefill of one prompt of this many tokens (0: off; below --max-model-len)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    ap.add_argument("--attn", default="TRITON_ATTN")
    ap.add_argument("--gpu-mem", type=float, default=0.6)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--isolate", action="store_true", help="each configuration in its own child process")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("E2E_BUDGET_S", 560)),
                    help="stop starting configurations that would not finish in this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    ap.add_argument("--model-root", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rescore", type=Path, default=None, metavar="JSON",
                    help="score a saved report again from the runs it kept (no GPU), writing <stem>-rescored.*")
    a = ap.parse_args()
    if a.rescore:
        print(f"wrote {rescore(a.rescore)}.json and .md")
        return 0
    a.batches = [int(b) for b in a.batches.split(",")]
    if a.profile_batch and a.profile_batch not in a.batches:
        ap.error(f"--profile-batch must be one of --batches {a.batches}, got {a.profile_batch}")
    if a.profile_batch:  # torch.profiler sees the kernels of its own process only
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if a.prefill_len and not 16 < a.prefill_len < a.max_model_len:
        ap.error(f"--prefill-len must be between 16 and --max-model-len ({a.max_model_len}), got {a.prefill_len}")
    a.model_root = a.model_root or tempfile.mkdtemp(prefix="e2e_vllm_models_")
    if a.child:
        child_main(a)
        return 0
    shapes = [s for s in a.shapes.split(",") if s]
    formats = [f for f in a.formats.split(",") if f]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shapes {bad}; shapes: {sorted(SHAPES)}")
    for f in formats:
        try:
            split_format(f)
        except ValueError as e:
            ap.error(str(e))

    t_start = time.perf_counter()
    env = environment()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    card = "".join(c if c.isalnum() else "-" for c in env.get("card", "gpu").split(",")[0].lower().replace("nvidia", ""))
    stem = out / f"e2e_vllm-{card.strip('-')}-{dt.date.today().isoformat()}"
    results: list[dict] = []
    a.skipped = []
    durations: list[float] = []
    argv = list(sys.argv[1:])
    for shape in shapes:
        for fmt in formats:
            left = a.budget_s - (time.perf_counter() - t_start)
            need = 1.1 * max(durations) if durations else 0.0
            if left < max(need, 30.0):
                a.skipped.append((shape, fmt))
                print(f"== skip {shape}/{fmt}: {left:.0f} s left, a configuration took up to {need:.0f} s", flush=True)
                continue
            print(f"== {shape} / {fmt} ({left:.0f} s left)", flush=True)
            t0 = time.perf_counter()
            if a.isolate:
                res = run_isolated(shape, fmt, a, argv, timeout=left)
            else:
                try:
                    res = run_config(shape, fmt, a)
                except Exception:
                    res = {"shape": shape, "format": fmt, "error": traceback.format_exc(limit=4)[-1500:]}
                release()
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            durations.append(res["wall_s"])
            results.append(res)
            print("RESULT " + json.dumps(res), flush=True)
            stem.with_suffix(".json").write_text(json.dumps(
                {"environment": env, "settings": {k: v for k, v in vars(a).items() if k != "skipped"},
                 "results": results, "skipped": a.skipped}, indent=2, default=str))
            stem.with_suffix(".md").write_text(markdown(results, env, a))
    print(markdown(results, env, a), flush=True)
    print(f"wrote {stem}.json and .md in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0 if results and not any("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
