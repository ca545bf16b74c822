#!/usr/bin/env python3
"""Tensor parallelism end to end: a real-weight QTIP TP checkpoint in vLLM at TP=2 vs TP=1 vs its dense model.

Why: a QTIP ``-TP`` checkpoint (``rcp``/``tp_rank``) splits one Hadamard transform per layer into blocks,
so each rank decodes and transforms only its own slice and the layer needs no communication beyond
vLLM's usual all-reduce. Loaded at TP=2 it must therefore compute the same W_eff as at TP=1: the two
should differ only by fp16 rounding (split matmuls, all-reduce order), and both should sit as close to
the dense model as fp16 allows. The CPU tests check the sharding on vLLM's CPU classes (gloo); this
checks it with the real engine, NCCL, torch.compile and CUDA graphs on two GPUs.

The checkpoint is ``bench/real_llama_ckpt.py --tp 2``'s ``.e2e_ckpt_tp/qtip-k2-tp2``: a Llama-*shaped*
model (6 layers, hidden 384, 6 heads of 64, vocab 8192) whose matrices are real trained all-MiniLM-L6-v2
weights (NOT a trained Llama), QTIP L16 K=2 V2 HYB-9, output/input transforms split in 2 blocks.
Its dense model (every linear replaced by its W_eff) is rebuilt here by
:func:`qtip_triton.checkpoint.dequantize_checkpoint` and checked against the builder's SHA-256.

Stages (each result file rewritten after every stage, so a time-out keeps what finished):

1. CPU (torch, this process): truth = the QTIP model in float64 (exact W_eff), the dense model in
   fp16 (``bench/e2e_logits.py``'s :func:`cpu_reference`; gives the size of fp16 noise);
2. vLLM at TP=2, then TP=1 (fp16, torch.compile + CUDA graphs unless ``--eager``, TRITON_ATTN), each
   engine in its own child process group (killed as a whole afterwards, so the next engine finds
   both GPUs free): token-id prompts with ``prompt_logprobs=-1`` (raw logits of every position),
   ``--decode-tokens`` greedy steps with ``logprobs=-1``, then decode speed at batch 1
   ((t(short + N new tokens) - t(short)) / N, best of ``--reps``; informative only, a 6-layer model
   at this size is launch-bound). If TP=2 fails, it is retried once with every all-reduce through
   NCCL (vLLM's custom and symmetric-memory all-reduce off) when the budget allows;
3. compared: TP=2 vs TP=1 and each vs truth and vs the torch dense fp16 model, on the prompt
   positions and on the decode steps (while the two engines produced the same tokens; decode truth is
   computed on each engine's own continuation); greedy tokens TP=2 vs TP=1.

Verdict: PASS when TP=2 is finite, and TP=2 vs TP=1 (prompt and decode), TP=2 vs truth and TP=1 vs
truth (relative error of mean-centred log-probabilities) are within 4x the fp16 noise that torch shows on
the CPU (dense fp16 and QTIP fp16 vs truth). Greedy agreement is reported, not required (an fp16
near-tie may flip a token).

NCCL NVLink multicast stays off (the machine's rule): NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set (when unset) before anything starts.
Results: ``<out>/e2e-tp-<card>-<date>.{json,md}`` plus each engine's log ``...-tp<N>.log``. On the GPU
machine run ``bench/e2e_tp_device.sh`` (it unpacks the vLLM bundle and registers the plugin).
"""

from __future__ import annotations

import os

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)  # before torch/NCCL load, and inherited by every child and vLLM worker

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_logits as el  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = ROOT / ".e2e_ckpt_tp"
NCCL_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
MIN_ENGINE_S = 90  # do not start an engine with less time left (init alone is ~60-120 s with graphs)
EXIT_GRACE_S = 30  # an engine whose results are written gets this long to shut down before it is killed


# ------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="bench/real_llama_ckpt.py --tp 2's --out folder")
    ap.add_argument("--K", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--tp", type=int, default=2, help="TP degree to test against TP=1 (the checkpoint's tp_rank)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="prompt ids seed")
    ap.add_argument("--time-tokens", type=int, default=128, help="decode steps timed at batch 1 (0: no timing)")
    ap.add_argument("--time-short", type=int, default=8, help="new tokens of the short run subtracted out")
    ap.add_argument("--time-prompt-len", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    ap.add_argument("--attn", default="TRITON_ATTN")
    ap.add_argument("--gpu-mem", type=float, default=0.2, help="gpu_memory_utilization per engine")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--nccl-only", action="store_true",
                    help="all-reduce through NCCL only from the start (vLLM's custom and symm-mem all-reduce off)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU reference (no truth comparisons)")
    ap.add_argument("--cpu-only", action="store_true", help="only the CPU stage (checks the checkpoint anywhere)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("E2E_BUDGET_S", 500)),
                    help=f"start no engine with less than {MIN_ENGINE_S} s of this left; engines are killed at it")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON job file: run one engine
    a = ap.parse_args(argv)
    if a.cpu_only and a.no_cpu:
        ap.error("--cpu-only and --no-cpu leave nothing to do")
    if a.tp < 2:
        ap.error("--tp must be >= 2 (TP=1 always runs as the baseline)")
    if a.prompts < 1 or a.prompt_len < 2 or a.decode_tokens < 1:
        ap.error("--prompts >= 1, --prompt-len >= 2 and --decode-tokens >= 1 are needed for the comparisons")
    need = max(a.prompt_len + a.decode_tokens, a.time_prompt_len + a.time_short + a.time_tokens if a.time_tokens else 0)
    if need > a.max_model_len:
        ap.error(f"prompts + new tokens need {need} positions: raise --max-model-len ({a.max_model_len})")
    return a


# ------------------------------------------------------------------------------------ metrics


def raw_error(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """Raw logits (not normalized): max |test - ref| and ||test - ref|| / ||ref||."""
    t, r = test.double(), ref.double()
    return {"max_abs_logit": float((t - r).abs().max()), "rel_logits": float((t - r).norm() / r.norm())}


def metrics(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """:func:`e2e_logits.compare` (log-probabilities, top-1, KL) plus the raw-logit errors."""
    return {**el.compare(test, ref), **raw_error(test, ref)}


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def comparisons(tp1: dict | None, tpn: dict | None, truth: dict | None, n: int) -> dict:
    """Engines' logits against each other and against the torch references.

    ``tp1``/``tpn``: engine results ({"prompt": [P, len-1, V], "decode": [[D, V]] per prompt, "tokens"});
    ``truth``: {"prompt": truth logits [P, len, V], "dense16": torch dense fp16 [P, len, V],
    "decode_tp1"/"decode_tp<n>": truth on that engine's continuation [P, D, V]}, any part optional.
    """
    out: dict = {}
    engines = {k: e for k, e in (("tp1", tp1), (f"tp{n}", tpn)) if e}
    V = next(iter(engines.values()))["prompt"].shape[-1] if engines else None
    if tp1 and tpn:
        out[f"prefill_tp{n}_vs_tp1"] = metrics(tpn["prompt"].reshape(-1, V), tp1["prompt"].reshape(-1, V))
        firsts = [first_divergence(a, b) for a, b in zip(tpn["tokens"], tp1["tokens"], strict=True)]
        # decode step i is computed from tokens < i: steps 0..first divergence saw identical inputs
        rows_n = [d[: min(f + 1, len(d))] for d, f in zip(tpn["decode"], firsts, strict=True)]
        rows_1 = [d[: min(f + 1, len(d))] for d, f in zip(tp1["decode"], firsts, strict=True)]
        out[f"decode_tp{n}_vs_tp1"] = metrics(torch.cat(rows_n), torch.cat(rows_1))
        out["greedy"] = {"identical_sequences": sum(f == len(t) for f, t in zip(firsts, tp1["tokens"], strict=True)),
                         "sequences": len(firsts), "first_divergence": firsts}
    for name, e in engines.items():
        if truth and truth.get("prompt") is not None:
            # truth position j predicts token j+1 = the engine's prompt entry j+1 (entry 0 has none)
            out[f"prefill_{name}_vs_truth"] = metrics(e["prompt"].reshape(-1, V), truth["prompt"][:, :-1].reshape(-1, V))
        if truth and truth.get("dense16") is not None:
            out[f"prefill_{name}_vs_torch_dense16"] = metrics(e["prompt"].reshape(-1, V),
                                                              truth["dense16"][:, :-1].reshape(-1, V))
        if truth and truth.get(f"decode_{name}") is not None:
            out[f"decode_{name}_vs_truth"] = metrics(torch.cat(list(e["decode"])), truth[f"decode_{name}"].reshape(-1, V))
    return out


def verdict(results: dict) -> dict:
    """TP=N vs TP=1 and TP=N vs truth within 4x the largest fp16 noise reference (module docstring)."""
    n = results["settings"]["tp"]
    gpu, cpu = results.get("gpu") or {}, results.get("cpu") or {}
    vs_truth = gpu.get(f"prefill_tp{n}_vs_truth")
    vs_tp1 = gpu.get(f"prefill_tp{n}_vs_tp1")
    if not vs_truth and not vs_tp1:
        return {"ok": False if results.get("engines") else None, "why": f"no TP={n} logits to judge"}
    # fp16 noise from torch on the CPU; TP=1 vs truth only without it (TP=1 runs the same kernels as TP=N,
    # so a bug common to both would widen its own bound)
    noise = [m["rel_centered"] for m in (cpu.get("cpu_dense16_vs_truth"), cpu.get("cpu_qtip16_vs_truth"))
             if isinstance(m, dict)] or [m["rel_centered"] for m in (gpu.get("prefill_tp1_vs_truth"),) if m]
    if not noise:
        return {"ok": None, "why": "no fp16 noise reference (no CPU reference and no TP=1 vs truth)"}
    bound = 4 * max(noise)
    checks = {f"TP={n} vs TP=1": vs_tp1, f"TP={n} vs truth": vs_truth}
    for label, key in ((f"TP={n} vs TP=1 decode", f"decode_tp{n}_vs_tp1"), ("TP=1 vs truth", "prefill_tp1_vs_truth")):
        if gpu.get(key):
            checks[label] = gpu[key]
    ok, parts = True, []
    for label, m in checks.items():
        if m is None:
            parts.append(f"{label}: not measured")
            continue
        ok &= bool(m["finite"]) and m["rel_centered"] <= bound
        parts.append(f"{label} {m['rel_centered']:.2e}")
    ok &= vs_tp1 is not None  # without the baseline the TP claim is not checked
    return {"ok": ok, "why": "; ".join(parts) + f" vs 4 x the largest fp16 noise reference {bound:.2e}", "bound": bound}


# ------------------------------------------------------------------------------------ report


def environment() -> dict:
    """Versions, GPUs (nvidia-smi: this process never touches CUDA, so the engines get whole GPUs) and source."""
    from importlib.metadata import PackageNotFoundError, version

    env: dict = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
                 "torch": torch.__version__}
    for pkg in ("triton", "vllm", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            env[pkg] = version(pkg)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        lines = [x.strip() for x in out.stdout.splitlines() if x.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        lines = []
    env["card"], env["gpus"] = (lines[0], len(lines)) if lines else ("cpu", 0)
    with contextlib.suppress(Exception):
        from common import source_rev

        env["qtip_triton_rev"] = source_rev()
    env["nccl_env"] = {k: os.environ.get(k) for k in NCCL_ENV}
    return env


def result_stem(out: Path, env: dict, K: int) -> Path:
    """``<out>/e2e-tp-<card-slug>-<date>`` (``-k<K>`` appended for K != 2, as bench/e2e_logits.py does)."""
    return out / (f"e2e-tp-{el.card_slug(env)}-{dt.date.today().isoformat()}" + ("" if K == 2 else f"-k{K}"))


def rows(n: int) -> list[tuple[tuple[str, ...], str, str]]:
    return [
        (("gpu", f"prefill_tp{n}_vs_tp1"), f"vLLM TP={n} vs vLLM TP=1, prefill", "GPU fp16"),
        (("gpu", f"decode_tp{n}_vs_tp1"), f"vLLM TP={n} vs vLLM TP=1, decode (same tokens)", "GPU fp16"),
        (("gpu", f"prefill_tp{n}_vs_truth"), f"vLLM TP={n} vs truth, prefill", "GPU fp16"),
        (("gpu", "prefill_tp1_vs_truth"), "vLLM TP=1 vs truth, prefill", "GPU fp16"),
        (("gpu", f"decode_tp{n}_vs_truth"), f"vLLM TP={n} vs truth, decode", "GPU fp16"),
        (("gpu", "decode_tp1_vs_truth"), "vLLM TP=1 vs truth, decode", "GPU fp16"),
        (("gpu", f"prefill_tp{n}_vs_torch_dense16"), f"vLLM TP={n} vs torch dense fp16, prefill", "GPU / CPU fp16"),
        (("gpu", "prefill_tp1_vs_torch_dense16"), "vLLM TP=1 vs torch dense fp16, prefill", "GPU / CPU fp16"),
        (("cpu", "cpu_dense16_vs_truth"), "torch dense vs truth (fp16 noise scale)", "CPU fp16"),
        (("cpu", "cpu_qtip16_vs_truth"), "torch QTIP (reference forward) vs truth", "CPU fp16"),
        (("cpu", "cpu_dense64_vs_truth"), "torch dense vs truth (fp16 W_eff rounding only)", "CPU fp64"),
    ]


def table(results: dict) -> str:
    lines = ["| comparison | where | rows | rel. err. logits | max abs dlogit | rel. err. centered logprobs | "
             "max abs dlogprob | top-1 agree | KL mean | KL max |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path, label, where in rows(results["settings"]["tp"]):
        m = results
        for p in path:
            m = m.get(p) if isinstance(m, dict) else None
        if not isinstance(m, dict) or "rows" not in m:
            continue
        raw = (f"{m['rel_logits']:.2e} | {m['max_abs_logit']:.2e}" if "rel_logits" in m else "- | -")
        lines.append(f"| {label} | {where} | {m['rows']} | {raw} | {m['rel_centered']:.2e} | "
                     f"{m['max_abs_logprob']:.2e} | {m['top1']:.4f} | {m['kl_mean']:.2e} | {m['kl_max']:.2e} |")
    return "\n".join(lines)


def all_reduce(engine: dict) -> str:
    if engine.get("tp", 2) == 1:
        return "-"
    return "NCCL only" if engine.get("nccl_only") else "vLLM default"


def markdown(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    n = s["tp"]
    lines = [f"# QTIP tensor parallelism in vLLM (TP={n} vs TP=1), real-weight checkpoint — "
             f"{env.get('gpus', '?')} x {env.get('card', '?')} — {env.get('date')}", "",
             f"vLLM {env.get('vllm', '-')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"qtip_triton {env.get('qtip_triton_rev') or '?'}. Checkpoint `{results.get('checkpoint', {}).get('qtip_dir', '?')}` "
             f"from `bench/real_llama_ckpt.py --tp {n}`: a Llama-shaped model ({results.get('model', '?')}) built from "
             f"real all-MiniLM-L6-v2 matrices (not a trained Llama), QTIP L16 K={s['K']} V2 HYB-9, transforms split "
             f"in {n} blocks (rcp/tp_rank). {s['prompts']} prompts x {s['prompt_len']} token ids, "
             f"{s['decode_tokens']} greedy decode steps, {'eager' if s['eager'] else 'torch.compile + CUDA graphs'}, "
             f"{s['attn']}, fp16. Truth = the QTIP model in float64 on the CPU (exact W_eff); torch dense fp16 = "
             "W_eff in fp16 through Hugging Face Llama on the CPU. Rel. err. centered: each row's mean "
             f"log-probability removed first. KL(ref || test) in nats. NCCL env: {env.get('nccl_env')}.", "",
             table(results)]
    g = (results.get("gpu") or {}).get("greedy")
    if g:
        lines += ["", f"Greedy decode TP={n} vs TP=1: {g['identical_sequences']}/{g['sequences']} sequences "
                  f"identical; first divergence per prompt {g['first_divergence']} (of {s['decode_tokens']})."]
    eng = results.get("engines") or {}
    if eng:
        lines += ["", "| engine | init s | generate s | decode b1 ms/step | decode b1 tok/s | all-reduce | wall s | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, e in eng.items():
            t = e.get("timing") or {}
            status = "ok" if "error" not in e else "failed: " + e["error"].strip().splitlines()[-1][:100]
            lines.append(f"| {name} | {e.get('init_s', '-')} | {e.get('generate_s', '-')} | {t.get('ms_per_step', '-')} | "
                         f"{t.get('tok_s', '-')} | {all_reduce(e)} | "
                         f"{e.get('wall_s', '-')} | {status} |")
        lines += ["", "Decode speed is informative only (6 layers of 384: launch-bound, not a TP speed-up measure)."]
    v = results.get("verdict")
    if v:
        lines += ["", f"Verdict: {'PASS' if v['ok'] else 'FAIL' if v['ok'] is False else 'n/a'} ({v['why']})."]
    if results.get("errors"):
        lines += ["", "Errors:", *[f"- {e[:400]}" for e in results["errors"]]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ one engine (child)


def engine_kwargs(model: str, tp: int, n_prompts: int, n_tokens: int, a: argparse.Namespace, nccl_only: bool) -> dict:
    """vllm.LLM arguments: e2e_logits' settings (full-vocab raw logits) plus TP and a small memory share."""
    kw = dict(model=model, dtype="float16", skip_tokenizer_init=True, attention_backend=a.attn,
              enforce_eager=a.eager, gpu_memory_utilization=a.gpu_mem, max_model_len=a.max_model_len,
              max_num_seqs=max(n_prompts, 1), max_num_batched_tokens=max(n_tokens, a.max_model_len),
              max_logprobs=-1, logprobs_mode="raw_logits", seed=0, tensor_parallel_size=tp)
    if tp > 1:
        kw["distributed_executor_backend"] = "mp"
        if nccl_only:
            kw["disable_custom_all_reduce"] = True
    if not a.eager:
        sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, n_prompts, n_tokens) if s <= n_tokens})
        kw["compilation_config"] = {"cudagraph_capture_sizes": sizes}
    return kw


def run_engine(job: dict, a: argparse.Namespace) -> dict:
    """Child process: one engine's prompt/decode logits and batch-1 decode speed (tensors, for torch.save)."""
    if job.get("nccl_only"):
        os.environ["VLLM_ALLREDUCE_USE_SYMM_MEM"] = "0"  # read when the workers start (inherited)
    from e2e_vllm import shutdown
    from vllm import LLM, SamplingParams

    prompts, vocab, tp = job["prompts"], job["vocab"], job["tp"]
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(job["model"], tp, len(prompts), len(prompts) * len(prompts[0]), a, job.get("nccl_only", False)))
    res: dict = {"tp": tp, "init_s": round(time.perf_counter() - t0, 1), "nccl_only": bool(job.get("nccl_only"))}
    try:
        res.update(el.generate_logits(llm, SamplingParams, prompts, vocab, a.decode_tokens))
        with contextlib.suppress(Exception):
            res["quantization"] = llm.llm_engine.model_config.quantization
        if a.time_tokens:
            res["timing"] = time_decode(llm, SamplingParams, a, vocab)
        save_result(res, job["result"])  # before shutdown: a hang there cannot lose the results
    finally:
        shutdown(llm)
    return res


def save_result(res: dict, path: str) -> None:
    """torch.save, atomically (the parent may read the file while this process is being killed)."""
    torch.save(res, path + ".part")
    os.replace(path + ".part", path)


def time_decode(llm, SamplingParams, a: argparse.Namespace, vocab: int) -> dict:
    """Batch-1 decode: (t(short + N) - t(short)) / N, best of ``--reps`` (prefill and start-up cancel)."""
    prompt = [{"prompt_token_ids": [(7 * i + 3) % vocab for i in range(a.time_prompt_len)]}]

    def run(n: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        return time.perf_counter() - t

    run(a.time_short + a.time_tokens)  # warm
    step = min((run(a.time_short + a.time_tokens) - run(a.time_short)) / a.time_tokens for _ in range(a.reps))
    return {"ms_per_step": round(step * 1e3, 3), "tok_s": round(1 / step, 1), "tokens": a.time_tokens, "reps": a.reps}


def child_main(a: argparse.Namespace) -> int:
    job = json.loads(Path(a.child).read_text())
    try:
        res = run_engine(job, a)
    except BaseException:
        res = {"error": traceback.format_exc()[-4000:]}  # the innermost frames: where vLLM failed
        save_result(res, job["result"])
    print(f"[e2e_tp child tp={job['tp']}] " + (f"failed:\n{res['error']}" if "error" in res else "done"), flush=True)
    return 1 if "error" in res else 0


def spawn_engine(job: dict, argv: list[str], work: Path, log: Path, timeout: float) -> dict:
    """Run one engine in a child process group; kill the whole group afterwards (its EngineCore and TP
    workers hold GPU memory, and an engine left behind would starve the next one)."""
    spec = work / f"job-tp{job['tp']}{'-nccl' if job.get('nccl_only') else ''}.json"
    job = {**job, "result": str(spec.with_suffix(".pt"))}
    spec.write_text(json.dumps(job))
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n===== tp={job['tp']} nccl_only={job.get('nccl_only', False)} {dt.datetime.now():%H:%M:%S}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, __file__, *argv, "--child", str(spec)], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        written = None
        try:
            while (rc := proc.poll()) is None:
                now = time.perf_counter()
                if Path(job["result"]).exists():
                    written = written or now
                if now - t0 > timeout or (written and now - written > EXIT_GRACE_S):
                    break
                time.sleep(0.5)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started: child, EngineCore, workers
            proc.wait()
    res: dict = {}
    if Path(job["result"]).exists():
        res = torch.load(job["result"], weights_only=False)
        if rc is None:
            res["killed_after_results"] = f"did not exit within {EXIT_GRACE_S} s of writing its results"
    elif rc is None:
        res["error"] = f"timed out after {timeout:.0f} s (engine killed); see {log.name}"
    else:
        res = {"error": f"child exited {rc} without a result; see {log.name}:\n" + log.read_text()[-1500:]}
    res.update(tp=job["tp"], nccl_only=bool(job.get("nccl_only")), wall_s=round(time.perf_counter() - t0, 1))
    return res


# ------------------------------------------------------------------------------------ main


def engine_summary(e: dict) -> dict:
    keys = ("tp", "init_s", "generate_s", "missing_entries", "quantization", "timing", "nccl_only", "wall_s", "tokens",
            "killed_after_results", "error")
    return {k: e[k] for k in keys if k in e}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.child:  # exit at once: vLLM's exit handlers can hang, and the parent kills what is left anyway
        rc = child_main(a)
        sys.stdout.flush()
        os._exit(rc)
    t_start = time.perf_counter()
    n = a.tp
    env = environment()
    results: dict = {"environment": env, "settings": dict(vars(a)), "errors": []}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(out, env, a.K)
    log = stem.parent / f"{stem.name}-engines.log"

    def save() -> None:
        results["verdict"] = verdict(results)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
        stem.with_suffix(".md").write_text(markdown(results))

    work = Path(tempfile.mkdtemp(prefix="e2e_tp_"))
    qdir, ddir, info = el.resolve_dirs(Path(a.ckpt), a.K, work, name=f"qtip-k{a.K}-tp{n}")
    results["checkpoint"] = info
    cfg = json.loads((qdir / "config.json").read_text())
    if not cfg.get("quip_params", {}).get("split_for_tp"):
        raise SystemExit(f"e2e_tp: {qdir} is not a TP checkpoint (quip_params.split_for_tp is false)")
    vocab = cfg["vocab_size"]
    results["model"] = (f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, intermediate "
                        f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads, vocab {vocab}")
    prompts = el.make_prompts(vocab, a.prompts, a.prompt_len, a.seed)
    results["prompts_head"] = [p[:8] for p in prompts]
    print(f"[e2e_tp] {qdir} (dense: {info['dense_source']}); {env['gpus']} x {env['card']}", flush=True)
    if env["gpus"] and env["gpus"] < n:
        results["errors"].append(f"only {env['gpus']} GPU(s) visible; TP={n} needs {n}")

    truth: dict = {}
    if not a.no_cpu:
        try:
            metrics_cpu, logits = el.cpu_reference(qdir, ddir, prompts)
            results["cpu"] = metrics_cpu
            truth = {"prompt": logits["truth"], "dense16": logits["cpu_dense16"]}
            print(f"[e2e_tp] CPU reference in {metrics_cpu['seconds']} s", flush=True)
        except Exception:
            results["errors"].append("cpu: " + traceback.format_exc(limit=3)[-1500:])
        save()

    # vLLM's EngineCore and workers are spawned, not forked, in every child (a forked process can hang in
    # torch's OpenMP pool; see bench/e2e_logits.py).
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    engines: dict[str, dict] = {}
    results["engines"] = {}
    base = {"model": str(qdir), "prompts": prompts, "vocab": vocab}
    plan = [] if a.cpu_only else [(f"tp{n}", n, a.nccl_only), ("tp1", 1, False)]
    while plan:
        name, tp, nccl_only = plan.pop(0)
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < MIN_ENGINE_S:
            results["errors"].append(f"{name}: skipped, {left:.0f} s left of --budget-s {a.budget_s:.0f}")
            continue
        print(f"== engine {name}{' (NCCL only)' if nccl_only else ''} ({left:.0f} s left)", flush=True)
        e = spawn_engine({**base, "tp": tp, "nccl_only": nccl_only}, argv, work, log, timeout=left - 10)
        key = name + ("-nccl-only" if nccl_only and not a.nccl_only else "")
        results["engines"][key] = engine_summary(e)
        if "error" in e:
            last = e["error"].strip().splitlines()[-1]
            results["errors"].append(f"{key}: {last} (traceback in the JSON's engines.{key}.error and {log.name})")
            print(results["errors"][-1], flush=True)
            if tp > 1 and not nccl_only and "timed out" not in e["error"]:
                plan.insert(0, (name, tp, True))  # retry: every all-reduce through NCCL
        else:
            engines[name] = e
        save()

    if engines:
        if truth and a.decode_tokens:
            try:  # truth on each engine's own continuation (one float64 model, reused)
                model = el.hf_qtip_model(qdir, ddir, torch.float64)
                for name, e in engines.items():
                    seqs = [p + t for p, t in zip(prompts, e["tokens"], strict=True)]
                    full = el.hf_logits(model, seqs)
                    truth[f"decode_{name}"] = full[:, a.prompt_len - 1 : a.prompt_len - 1 + a.decode_tokens]
            except Exception:
                results["errors"].append("cpu decode truth: " + traceback.format_exc(limit=3)[-1500:])
        try:
            results["gpu"] = comparisons(engines.get("tp1"), engines.get(f"tp{n}"), truth, n)
        except Exception:
            results["errors"].append("compare: " + traceback.format_exc(limit=3)[-1500:])
    save()
    print(markdown(results), flush=True)
    print(f"wrote {stem}.json and .md in {time.perf_counter() - t_start:.0f} s", flush=True)
    if a.cpu_only:
        return 0 if "cpu" in results else 1
    return 0 if results["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
