#!/usr/bin/env python3
"""Logits of a real-weight QTIP checkpoint in vLLM vs its dense equivalent (GPU), with the expected difference (CPU).

The checkpoint is ``bench/real_llama_ckpt.py``'s: a Llama-*shaped* model whose matrices are real trained
all-MiniLM-L6-v2 weights (not a trained Llama), quantized by the QTIP encoder (``.e2e_ckpt/qtip-k<K>``).
Its dense equivalent is the same model with every linear replaced by its W_eff in fp16
(:func:`qtip_triton.checkpoint.dequantize_checkpoint`); taken from ``<ckpt>/dense-k<K>`` when present,
otherwise rebuilt here from the QTIP directory and checked against the builder's SHA-256 (manifest.json).

Both represent the same W_eff, so QTIP-in-vLLM and dense-in-vLLM should differ only by fp16 rounding:
dense runs fp16 matmuls on W_eff rounded to fp16, QTIP decodes the trellis and runs its Hadamard
transforms and kernels with their own rounding. To know how large that is, the same comparison runs
first on the CPU in torch (Hugging Face ``LlamaForCausalLM``; the QTIP model is the same module tree with
``qtip_triton.QTIPLinear`` layers, i.e. the package's reference forward):

* truth: the QTIP model in float64 (exact W_eff, exact arithmetic);
* CPU dense fp64 (W_eff rounded to fp16, exact arithmetic), CPU dense fp16, CPU QTIP fp16;
* expected: CPU QTIP fp16 vs CPU dense fp16, and each vs truth.

Then on the GPU (vLLM, fp16, torch.compile + CUDA graphs unless ``--eager``, TRITON_ATTN), one engine
after the other from this process (each shut down before the next, as in bench/e2e_vllm.py; EngineCore
is spawned, not forked: this process has used torch's OpenMP pool, which a forked child can hang on): the same
token-id prompts with ``prompt_logprobs=-1`` (whole vocabulary; ``logprobs_mode="raw_logits"`` returns
the logits themselves) and ``--decode-tokens`` greedy steps with ``logprobs=-1``; so the prefill (M = all
prompt tokens, piecewise graphs) and the decode (M = number of prompts, full graphs) both run. Compared:
QTIP vs dense, and each vs truth, by relative error of log-probabilities, top-1 agreement and KL.
Decode steps are compared while both engines have generated the same tokens.

Results: ``<out>/e2e-logits-<card>-<date>.{json,md}`` (``-k<K>`` appended for K != 2), rewritten after
each stage; a short table is printed last. On the GPU machine run it through
``bench/e2e_logits_device.sh`` (unpacks the vLLM bundle and registers the plugin). ``--cpu-only`` runs the
CPU part anywhere.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_vllm import environment as vllm_environment  # noqa: E402
from e2e_vllm import release, shutdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = ROOT / ".e2e_ckpt"
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------ prompts, metrics


def make_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` token-id prompts of ``length`` ids in [0, vocab), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def compare(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """Logits ``test`` vs ``ref`` ([rows, vocab], any float dtype) as log-probabilities.

    rel_logprobs: ||lp_t - lp_r|| / ||lp_r|| over all rows; rel_centered: the same with each row's mean
    removed (the part of the logits that matters; lp itself is dominated by -log(vocab));
    max_abs_logprob; top1: argmax agreement; kl_mean / kl_max: KL(ref || test) per row, nats.
    """
    t = test.double().log_softmax(-1)
    r = ref.double().log_softmax(-1)
    if t.shape != r.shape or t.dim() != 2 or not t.shape[0]:
        raise ValueError(f"compare: shapes {tuple(test.shape)} vs {tuple(ref.shape)}")
    finite = bool(torch.isfinite(t).all())
    tc, rc = t - t.mean(-1, keepdim=True), r - r.mean(-1, keepdim=True)
    kl = (r.exp() * (r - t)).sum(-1)
    return {
        "rows": int(t.shape[0]),
        "finite": finite,
        "rel_logprobs": float((t - r).norm() / r.norm()),
        "rel_centered": float((tc - rc).norm() / rc.norm()),
        "max_abs_logprob": float((t - r).abs().max()),
        "top1": float((t.argmax(-1) == r.argmax(-1)).double().mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def rows_from_logprobs(entries, vocab: int, skip_first: bool) -> torch.Tensor:
    """vLLM prompt/sample logprobs (FlatLogprobs or a list of {token: Logprob}) -> [positions, vocab] float64.

    Entries missing from a position stay NaN (with ``-1`` requests every position holds the whole vocabulary).
    """
    if hasattr(entries, "start_indices"):  # FlatLogprobs: flat lists, no per-entry objects
        starts, ends = list(entries.start_indices), list(entries.end_indices)
        first = 1 if skip_first else 0
        rows = torch.full((len(starts) - first, vocab), float("nan"), dtype=torch.float64)
        tok = torch.tensor(entries.token_ids, dtype=torch.int64)
        val = torch.tensor(entries.logprobs, dtype=torch.float64)
        for i in range(first, len(starts)):
            s, e = starts[i], ends[i]
            rows[i - first, tok[s:e]] = val[s:e]
        return rows
    seq = list(entries)[1 if skip_first else 0 :]
    rows = torch.full((len(seq), vocab), float("nan"), dtype=torch.float64)
    for i, pos in enumerate(seq):
        for token, lp in (pos or {}).items():
            rows[i, token] = lp.logprob
    return rows


# ------------------------------------------------------------------------------------ checkpoints


def sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_dirs(ckpt: Path, K: int, work: Path, name: str | None = None) -> tuple[Path, Path, dict]:
    """(QTIP dir, dense dir, info); the dense twin is rebuilt into ``work`` when not shipped.

    ``name``: the checkpoint's folder when not ``qtip-k<K>`` (``qtip-k2-tp2``); its twin is ``dense-...``.
    """
    from qtip_triton.checkpoint import dequantize_checkpoint

    name = name or f"qtip-k{K}"
    dense_name = name.replace("qtip-", "dense-", 1)
    qdir = ckpt / name
    if not (qdir / "config.json").exists():
        tp = f" --tp {name.rsplit('-tp', 1)[1]}" if "-tp" in name else ""
        raise SystemExit(f"e2e_logits: {qdir} missing: run `python bench/real_llama_ckpt.py --K {K}{tp}` first")
    manifest = json.loads((ckpt / MANIFEST).read_text()) if (ckpt / MANIFEST).exists() else {}
    entry = manifest.get("checkpoints", {}).get(name, {})
    info: dict = {"qtip_dir": str(qdir), "manifest_entry": {k: v for k, v in entry.items() if k != "weight_rel_mse"}}
    shipped = ckpt / dense_name
    if (shipped / "config.json").exists():
        ddir, info["dense_source"] = shipped, "shipped"
    else:
        t0 = time.perf_counter()
        ddir = dequantize_checkpoint(qdir, work / dense_name, dtype=torch.float16, overwrite=True)
        info["dense_source"] = f"rebuilt here from {qdir.name} by dequantize_checkpoint(fp16) in {time.perf_counter() - t0:.1f} s"
    info["dense_dir"] = str(ddir)
    info["dense_sha256"] = sha256(ddir / "model.safetensors")
    if entry.get("dense_sha256"):
        info["dense_sha256_matches_builder"] = info["dense_sha256"] == entry["dense_sha256"]
    if entry.get("qtip_sha256"):
        info["qtip_sha256_matches_builder"] = sha256(qdir / "model.safetensors") == entry["qtip_sha256"]
    return qdir, ddir, info


# ------------------------------------------------------------------------------------ CPU (torch, transformers)


def hf_model(model_dir: str | Path, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    try:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except TypeError:  # transformers < 4.56
        model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=dtype)
    return model.eval()


def hf_qtip_model(qdir: str | Path, dense_dir: str | Path, dtype: torch.dtype):
    """The dense model's module tree with every quantized linear swapped for a QTIPLinear running the
    package's reference forward (:func:`qtip_triton.dispatch.reference_linear`: decode, transforms and
    matmul in float32 for fp16 activations, in float64 for float64 ones), never a kernel."""
    from qtip_triton.checkpoint import read_qtip_linears
    from qtip_triton.dispatch import reference_linear
    from qtip_triton.layer import QTIPLinear

    class ReferenceQTIPLinear(QTIPLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return reference_linear(x, self.qweight, self.bias)

    model = hf_model(dense_dir, dtype)
    linears, plain, _ = read_qtip_linears(qdir)
    for prefix, (qw, bias) in linears.items():
        parent, _, child = prefix.rpartition(".")
        old = model.get_submodule(parent).get_submodule(child)
        if (old.out_features, old.in_features) != (qw.out_features, qw.in_features):
            raise ValueError(f"{prefix}: {qw.out_features}x{qw.in_features} in the QTIP dir, "
                             f"{old.out_features}x{old.in_features} in the dense one")
        setattr(model.get_submodule(parent), child, ReferenceQTIPLinear(qw, bias))  # buffers keep their own dtypes
    return model


@torch.no_grad()
def hf_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """[prompts, positions, vocab] float64 logits (one batch, no padding: equal-length prompts)."""
    ids = torch.tensor(prompts, dtype=torch.int64)
    return model(ids).logits.double()


def cpu_reference(qdir: Path, ddir: Path, prompts: list[list[int]]) -> tuple[dict, dict]:
    """The expected size of the QTIP-vs-dense difference; returns (metrics, {name: logits}) with 'truth' kept."""
    t0 = time.perf_counter()
    logits = {
        "truth": hf_logits(hf_qtip_model(qdir, ddir, torch.float64), prompts),
        "cpu_dense64": hf_logits(hf_model(ddir, torch.float64), prompts),
        "cpu_dense16": hf_logits(hf_model(ddir, torch.float16), prompts),
        "cpu_qtip16": hf_logits(hf_qtip_model(qdir, ddir, torch.float16), prompts),
    }
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in logits.items()}
    metrics = {
        "cpu_qtip16_vs_cpu_dense16": compare(flat["cpu_qtip16"], flat["cpu_dense16"]),
        "cpu_dense16_vs_truth": compare(flat["cpu_dense16"], flat["truth"]),
        "cpu_qtip16_vs_truth": compare(flat["cpu_qtip16"], flat["truth"]),
        "cpu_dense64_vs_truth": compare(flat["cpu_dense64"], flat["truth"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return metrics, logits


def cpu_quantization_error(src: str | Path, dense: str | Path, *, prompts: int = 4, length: int = 64) -> dict:
    """Logits of the dense twin vs the unquantized source (float32, CPU): how much quantizing changed the model."""
    cfg = json.loads((Path(src) / "config.json").read_text())
    p = make_prompts(cfg["vocab_size"], prompts, length)
    a = hf_logits(hf_model(dense, torch.float32), p)
    b = hf_logits(hf_model(src, torch.float32), p)
    return compare(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))


# ------------------------------------------------------------------------------------ vLLM (GPU)


def generate_logits(llm, sampling_params_cls, prompts: list[list[int]], vocab: int, decode_tokens: int) -> dict:
    """Greedy generation with every logit returned: per-position prompt rows (prefill), decode rows,
    the tokens, the wall time and how many logit entries vLLM left out (NaN)."""
    sp = sampling_params_cls(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True, detokenize=False,
                             prompt_logprobs=-1, logprobs=-1, flat_logprobs=True)
    t1 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    res: dict = {"generate_s": round(time.perf_counter() - t1, 2)}
    res["prompt"] = torch.stack([rows_from_logprobs(o.prompt_logprobs, vocab, skip_first=True) for o in outs])
    res["decode"] = [rows_from_logprobs(o.outputs[0].logprobs, vocab, skip_first=False) for o in outs]
    res["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    res["missing_entries"] = int(torch.isnan(res["prompt"]).sum()) + sum(int(torch.isnan(d).sum()) for d in res["decode"])
    return res

def engine_logits(model_dir: Path, prompts: list[list[int]], vocab: int, a: argparse.Namespace) -> dict:
    """One vLLM engine: prompt logits [prompts, length - 1, vocab] and greedy decode logits/tokens."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    n_tokens = len(prompts) * len(prompts[0])
    kw = dict(model=str(model_dir), dtype="float16", skip_tokenizer_init=True, attention_backend=a.attn,
              enforce_eager=a.eager, gpu_memory_utilization=a.gpu_mem, max_model_len=a.max_model_len,
              max_num_seqs=max(len(prompts), 1), max_num_batched_tokens=max(n_tokens, a.max_model_len),
              max_logprobs=-1, logprobs_mode="raw_logits", seed=0)
    if not a.eager:
        sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, len(prompts), n_tokens) if s <= n_tokens})
        kw["compilation_config"] = {"cudagraph_capture_sizes": sizes}
    llm = LLM(**kw)
    res: dict = {"init_s": round(time.perf_counter() - t0, 1)}
    try:
        res.update(generate_logits(llm, SamplingParams, prompts, vocab, a.decode_tokens))
        try:  # which linear method vLLM picked (best effort: in-process engines only)
            res["quantization"] = llm.llm_engine.model_config.quantization
        except Exception:
            res["quantization"] = "?"
    finally:
        shutdown(llm)
        del llm
    return res


def gpu_comparisons(dense: dict, qtip: dict, truth: torch.Tensor | None, truth_decode=None) -> dict:
    """QTIP vs dense (prefill rows, decode rows while tokens agree) and each vs truth (prefill rows)."""
    V = dense["prompt"].shape[-1]
    out = {"prefill_qtip_vs_dense": compare(qtip["prompt"].reshape(-1, V), dense["prompt"].reshape(-1, V))}
    same_rows_q, same_rows_d, first_diff = [], [], []
    for tq, td, lq, ld in zip(qtip["tokens"], dense["tokens"], qtip["decode"], dense["decode"], strict=True):
        n = next((i for i, (x, y) in enumerate(zip(tq, td, strict=False)) if x != y), min(len(tq), len(td)))
        first_diff.append(n)
        # step i's logits depend on tokens < i: steps 0..n are computed on identical inputs
        k = min(n + 1, len(lq), len(ld))
        same_rows_q.append(lq[:k])
        same_rows_d.append(ld[:k])
    out["decode_qtip_vs_dense"] = compare(torch.cat(same_rows_q), torch.cat(same_rows_d))
    out["greedy"] = {"identical_sequences": sum(n == len(t) for n, t in zip(first_diff, dense["tokens"], strict=True)),
                     "sequences": len(first_diff), "first_divergence": first_diff}
    if truth is not None:
        T = truth[:, :-1].reshape(-1, V)  # truth position j predicts token j+1 = vLLM prompt entry j+1
        out["prefill_dense_vs_truth"] = compare(dense["prompt"].reshape(-1, V), T)
        out["prefill_qtip_vs_truth"] = compare(qtip["prompt"].reshape(-1, V), T)
    if truth_decode is not None:
        rows_d = torch.cat([d for d in dense["decode"]])
        out["decode_dense_vs_truth"] = compare(rows_d, truth_decode.reshape(-1, V))
    return out


# ------------------------------------------------------------------------------------ report


def card_slug(env: dict) -> str:
    card = env.get("card", "unknown").split(",")[0].lower().replace("nvidia", "")
    slug = "".join(c if c.isalnum() else "-" for c in card).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug or "unknown"


ROWS = [  # (key path, label, where)
    (("gpu", "prefill_qtip_vs_dense"), "vLLM QTIP vs vLLM dense, prefill", "GPU fp16"),
    (("gpu", "decode_qtip_vs_dense"), "vLLM QTIP vs vLLM dense, decode (same tokens)", "GPU fp16"),
    (("gpu", "prefill_dense_vs_truth"), "vLLM dense vs truth, prefill", "GPU fp16"),
    (("gpu", "prefill_qtip_vs_truth"), "vLLM QTIP vs truth, prefill", "GPU fp16"),
    (("gpu", "decode_dense_vs_truth"), "vLLM dense vs truth, decode", "GPU fp16"),
    (("cpu", "cpu_qtip16_vs_cpu_dense16"), "torch QTIP vs torch dense (expected size)", "CPU fp16"),
    (("cpu", "cpu_dense16_vs_truth"), "torch dense vs truth", "CPU fp16"),
    (("cpu", "cpu_qtip16_vs_truth"), "torch QTIP (reference forward) vs truth", "CPU fp16"),
    (("cpu", "cpu_dense64_vs_truth"), "torch dense vs truth (fp16 W_eff rounding only)", "CPU fp64"),
    (("quantization",), "dense twin vs unquantized source (quantization error, for scale)", "CPU fp32"),
]


def table(results: dict) -> str:
    lines = ["| comparison | where | rows | rel. err. logprobs | rel. err. centered | max abs dlogprob | top-1 agree | KL mean | KL max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path, label, where in ROWS:
        m = results
        for p in path:
            m = m.get(p) if isinstance(m, dict) else None
        if not isinstance(m, dict) or "rows" not in m:
            continue
        lines.append(f"| {label} | {where} | {m['rows']} | {m['rel_logprobs']:.2e} | {m['rel_centered']:.2e} | "
                     f"{m['max_abs_logprob']:.2e} | {m['top1']:.4f} | {m['kl_mean']:.2e} | {m['kl_max']:.2e} |")
    return "\n".join(lines)


def verdict(results: dict) -> dict:
    """QTIP-vs-dense in vLLM within a few times the fp16 noise, and far below the quantization error."""
    gpu, cpu = results.get("gpu") or {}, results.get("cpu") or {}
    got = (gpu.get("prefill_qtip_vs_dense") or {}).get("rel_centered")
    noise = [m["rel_centered"] for m in (gpu.get("prefill_dense_vs_truth"), cpu.get("cpu_qtip16_vs_cpu_dense16"),
                                          cpu.get("cpu_dense16_vs_truth")) if isinstance(m, dict)]
    quant = (results.get("quantization") or {}).get("rel_centered")
    if got is None or not noise:
        return {"ok": None, "why": "no GPU comparison or no fp16 noise reference"}
    bound = 4 * max(noise)
    ok = got <= bound and (quant is None or got < 0.1 * quant) and bool(gpu["prefill_qtip_vs_dense"]["finite"])
    why = (f"rel. centered error QTIP vs dense {got:.2e} vs 4 x the largest fp16 noise reference {bound:.2e}"
           + (f"; quantization error {quant:.2e}" if quant is not None else ""))
    return {"ok": ok, "why": why, "bound": bound}


def markdown(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    lines = [f"# QTIP vs dense logits in vLLM, real-weight checkpoint — {env.get('card', '?')} — {env.get('date')}", "",
             f"vLLM {env.get('vllm', '-')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"qtip_triton {env.get('qtip_triton_rev') or '?'}. Checkpoint `{s['ckpt']}/qtip-k{s['K']}` from "
             "`bench/real_llama_ckpt.py`: a Llama-shaped model ({shape}) built from real all-MiniLM-L6-v2 matrices "
             "(not a trained Llama), QTIP L16 K={K} V2 HYB-9; dense twin = its W_eff in fp16 ({src}). ".format(
                 K=s["K"], shape=results.get("model", "?"), src=(results.get("checkpoint") or {}).get("dense_source", "?"))
             + f"{s['prompts']} prompts x {s['prompt_len']} token ids, {s['decode_tokens']} greedy decode steps, "
             f"{'eager' if s['eager'] else 'torch.compile + CUDA graphs'}, {s['attn']}. "
             "Truth = the QTIP model in float64 on the CPU (exact W_eff). Rel. err. centered: each row's mean "
             "log-probability removed first. KL(ref || test) in nats.", ""]
    lines.append(table(results))
    g = (results.get("gpu") or {}).get("greedy")
    if g:
        lines += ["", f"Greedy decode: {g['identical_sequences']}/{g['sequences']} sequences identical; first "
                  f"divergence per prompt {g['first_divergence']} (of {s['decode_tokens']})."]
    for name in ("dense", "qtip"):
        e = (results.get("engines") or {}).get(name)
        if e:
            lines.append(f"- engine {name}: " + ", ".join(f"{k} {v}" for k, v in e.items()))
    v = results.get("verdict")
    if v:
        lines += ["", f"Verdict: {'PASS' if v['ok'] else 'FAIL' if v['ok'] is False else 'n/a'} ({v['why']})."]
    for k in ("errors",):
        if results.get(k):
            lines += ["", "Errors:", *[f"- {e[:400]}" for e in results[k]]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="bench/real_llama_ckpt.py's --out folder")
    ap.add_argument("--K", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="prompt ids seed")
    ap.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    ap.add_argument("--attn", default="TRITON_ATTN")
    ap.add_argument("--gpu-mem", type=float, default=0.3)
    ap.add_argument("--max-model-len", type=int, default=128)
    ap.add_argument("--cpu-only", action="store_true", help="only the CPU (torch) comparison")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("E2E_BUDGET_S", 300)),
                    help="skip the QTIP engine when less than 100 s are left after the dense one")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    if a.prompt_len + a.decode_tokens > a.max_model_len:
        ap.error(f"--prompt-len + --decode-tokens must fit --max-model-len ({a.max_model_len})")

    t_start = time.perf_counter()
    ckpt = Path(a.ckpt)
    work = Path(tempfile.mkdtemp(prefix="e2e_logits_"))
    env = vllm_environment() if not a.cpu_only else {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                                               "torch": torch.__version__, "card": "cpu"}
    results: dict = {"environment": env, "settings": {k: v for k, v in vars(a).items()}, "errors": []}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"e2e-logits-{card_slug(env)}-{dt.date.today().isoformat()}" + ("" if a.K == 2 else f"-k{a.K}"))

    def save() -> None:
        results["verdict"] = verdict(results)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
        stem.with_suffix(".md").write_text(markdown(results))

    qdir, ddir, info = resolve_dirs(ckpt, a.K, work)
    results["checkpoint"] = info
    manifest = json.loads((ckpt / MANIFEST).read_text()) if (ckpt / MANIFEST).exists() else {}
    quant = manifest.get("checkpoints", {}).get(f"qtip-k{a.K}", {}).get("logits_vs_src")
    if quant:
        results["quantization"] = quant
    cfg = json.loads((qdir / "config.json").read_text())
    vocab = cfg["vocab_size"]
    results["model"] = (f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, intermediate "
                        f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads, vocab {vocab}")
    prompts = make_prompts(vocab, a.prompts, a.prompt_len, a.seed)
    results["prompts_head"] = [p[:8] for p in prompts]
    print(f"[e2e_logits] {qdir} and {ddir} ({info['dense_source']}); {a.prompts} prompts x {a.prompt_len}", flush=True)

    truth = None
    if not a.no_cpu:
        try:
            metrics, logits = cpu_reference(qdir, ddir, prompts)
            results["cpu"] = metrics
            truth = logits["truth"]
            print(f"[e2e_logits] CPU reference in {metrics['seconds']} s", flush=True)
        except Exception:
            results["errors"].append("cpu: " + traceback.format_exc(limit=3)[-1500:])
            print(results["errors"][-1], flush=True)
        save()

    if not a.cpu_only:
        # This process has run torch's OpenMP thread pool (dequantize, CPU reference); a forked EngineCore
        # (vLLM's default start method) hangs in its first parallel region (GNU OpenMP is not fork-safe).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        results["settings"]["multiproc_method"] = os.environ["VLLM_WORKER_MULTIPROC_METHOD"]
        engines: dict = {}
        results["engines"] = {}
        for name, path in (("dense", ddir), ("qtip", qdir)):
            left = a.budget_s - (time.perf_counter() - t_start)
            if engines and left < 100:
                results["errors"].append(f"{name}: skipped, {left:.0f} s left of --budget-s {a.budget_s:.0f}")
                break
            print(f"== engine {name}: {path} ({left:.0f} s left)", flush=True)
            t0 = time.perf_counter()
            try:
                engines[name] = engine_logits(path, prompts, vocab, a)
                e = engines[name]
                results["engines"][name] = {k: e[k] for k in ("init_s", "generate_s", "missing_entries", "quantization")}
                results["engines"][name]["tokens"] = e["tokens"]
            except Exception:
                results["errors"].append(f"{name}: " + traceback.format_exc(limit=4)[-1500:])
                print(results["errors"][-1], flush=True)
            finally:
                release()
            results["engines"].setdefault(name, {})["wall_s"] = round(time.perf_counter() - t0, 1)
            save()
        if "dense" in engines and "qtip" in engines:
            truth_decode = None
            if truth is not None and a.decode_tokens > 0:
                try:  # truth on the dense engine's continuations
                    seqs = [p + t for p, t in zip(prompts, engines["dense"]["tokens"], strict=True)]
                    full = hf_logits(hf_qtip_model(qdir, ddir, torch.float64), seqs)
                    truth_decode = full[:, a.prompt_len - 1 : a.prompt_len - 1 + a.decode_tokens]
                except Exception:
                    results["errors"].append("cpu decode truth: " + traceback.format_exc(limit=3)[-1500:])
            try:
                results["gpu"] = gpu_comparisons(engines["dense"], engines["qtip"], truth, truth_decode)
            except Exception:
                results["errors"].append("compare: " + traceback.format_exc(limit=3)[-1500:])
    save()
    print(markdown(results), flush=True)
    print(f"wrote {stem}.json and .md in {time.perf_counter() - t_start:.0f} s", flush=True)
    ok = results["verdict"]["ok"]
    if a.cpu_only:
        return 0 if "cpu" in results else 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
