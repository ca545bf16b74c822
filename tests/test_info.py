"""qtip-triton info: versions, device, kernel path, which autotune files apply and why, plugin, switches."""

import json
from pathlib import Path

import pytest

from qtip_triton import cli, info
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions, current_versions
from qtip_triton.autotune.lookup import shipped_dir
from qtip_triton.autotune.store import load

H200 = DeviceInfo("NVIDIA H200", (9, 0), 132)


def shipped_versions() -> SoftwareVersions:
    """The versions the shipped H200 file was tuned with (so it is "exact" for a fake H200)."""
    return load(shipped_dir() / "h200.yaml").header.versions


def test_cpu_machine(monkeypatch, capsys):
    monkeypatch.setattr(info, "current_device", lambda: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("QTIP_TRITON_NO_TALL_HADAMARD", "1")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"qtip-triton {info.__version__}" in out and "device: no CUDA GPU" in out
    assert "torch reference path" in out
    assert "h200.yaml: not used (no CUDA GPU here) [NVIDIA H200 (sm90, 132 SMs)" in out and "819 entries" in out
    assert "switches: QTIP_TRITON_NO_TALL_HADAMARD=1" in out
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter" in info.collect()["kernels"]


def test_plugin_entry_point_is_reported():
    p = info.collect()["vllm_plugin"]
    assert p["group"] == "vllm.general_plugins"
    # the package is installed (make install: pip install -e), so its entry point exists
    assert p["entry_points"] == ["qtip = qtip_triton.vllm:register"]


def test_which_files_apply_and_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(info, "current_device", lambda: H200)
    monkeypatch.setenv("QTIP_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(info, "current_versions", shipped_versions)
    facts = info.collect()
    files = {Path(f["path"]).name if f["source"] == "shipped" else f["source"]: f for f in facts["autotune"]["files"]}
    assert files["user cache"]["status"] == "absent"
    assert files["h200.yaml"]["status"] == "exact" and files["h200.yaml"]["entries"] == 819
    assert files["h100.yaml"]["status"] == "family"
    # the registry's lookup order: the exact file before the same-family one, whatever their names' order
    assert facts["autotune"]["verdict"] == "configs from shipped h200.yaml (exact), then shipped h100.yaml (family)"
    # a corrupt user cache is named and ignored; a Triton upgrade makes the shipped file out of date
    (tmp_path / "autotune").mkdir()
    (tmp_path / "autotune" / "h200.yaml").write_text("format: [not, a, tune, file")
    v = shipped_versions()
    monkeypatch.setattr(info, "current_versions", lambda: SoftwareVersions("9.9.0", v.torch, v.package, v.kernels))
    assert cli.main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    user, *shipped = facts["autotune"]["files"]
    assert user["source"] == "user cache" and user["status"] == "ignored" and "unreadable" in user["why"]
    assert shipped and all(f["status"] == "ignored" and "out of date: tuned with Triton" in f["why"] for f in shipped)
    assert "no autotune file applies" in facts["autotune"]["verdict"] and "--gpu h200" in facts["autotune"]["verdict"]
    assert facts["device"] == {"name": "NVIDIA H200", "short": "h200", "family": "sm90", "sm_count": 132}


@pytest.mark.parametrize("name,statuses", [
    ("NVIDIA H100 80GB HBM3", {"h100.yaml": "exact", "h200.yaml": "family"}),
    ("NVIDIA H200", {"h100.yaml": "family", "h200.yaml": "exact"}),
    ("NVIDIA A100-SXM4-80GB", {"h100.yaml": "ignored", "h200.yaml": "ignored"}),
])
def test_other_gpus(monkeypatch, tmp_path, name, statuses):
    cap = (8, 0) if "A100" in name else (9, 0)
    monkeypatch.setattr(info, "current_device", lambda: DeviceInfo(name, cap, 132 if cap == (9, 0) else 108))
    monkeypatch.setenv("QTIP_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(info, "current_versions", shipped_versions)
    shipped = [f for f in info.collect()["autotune"]["files"] if f["source"] == "shipped"]
    assert {Path(f["path"]).name: f["status"] for f in shipped} == statuses
    assert current_versions().package == info.__version__


def test_launch_switches_are_reported(monkeypatch):
    """What the PDL, GEMM-transform and stacked-transform switches ask, and whether this machine can do it; a bad value is shown,
    not raised."""
    monkeypatch.setattr(info, "current_device", lambda: None)
    monkeypatch.delenv("QTIP_TRITON_PDL", raising=False)
    monkeypatch.delenv("QTIP_TRITON_HADAMARD_GEMM", raising=False)
    monkeypatch.delenv("QTIP_TRITON_HADAMARD_STACKED", raising=False)
    monkeypatch.delenv("QTIP_TRITON_HADAMARD_ZB_FIRST", raising=False)
    monkeypatch.delenv("QTIP_TRITON_HADAMARD_STACK_GROUPS", raising=False)
    monkeypatch.delenv("QTIP_TRITON_HADAMARD_STACK_FILL", raising=False)
    monkeypatch.delenv("QTIP_TRITON_HADAMARD_F16", raising=False)
    la = info.collect()["launch"]
    assert la == {"pdl": "auto (early up to 4 tokens, exit for more)", "pdl_active": "not used (no CUDA GPU)",
                  "hadamard_gemm": "off (Triton kernels for every batch)",
                  "hadamard_stacked": "outputs from 32 (token, block) rows (256 where A has fewer than 32 rows), "
                                      "natural-order inputs from 96, kernel-order inputs from 1024 where A has 64+ "
                                      "rows; one token's A per tile below 256 rows where A has 32+, above that "
                                      "tiles of up to 128 rows halved while fewer than 128 programs (on); a fused "
                                      "layer's grouped inputs count every shard's rows",
                  "hadamard_zb_first": "on where A has at most 32 rows",
                  "hadamard_f16_dots": "on for fp16 outputs (fp32 partials from 8 tokens)",
                  "mma_gemv": "not used (no CUDA GPU)", "wgmma": "not used (no CUDA GPU)"}
    monkeypatch.setattr(info, "current_device", lambda: DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), 108))
    monkeypatch.setenv("QTIP_TRITON_PDL", "early")
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_GEMM", "1024")
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_STACKED", "256")
    la = info.collect()["launch"]
    assert la["hadamard_stacked"].startswith("from 256 (token, block) rows; ")
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_STACK_GROUPS", "0")
    assert info.collect()["launch"]["hadamard_stacked"] == "from 256 (token, block) rows"
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_ZB_FIRST", "0")
    assert info.collect()["launch"]["hadamard_zb_first"] == "off"
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_F16", "0")
    assert info.collect()["launch"]["hadamard_f16_dots"] == "off (QTIP_TRITON_HADAMARD_F16=0: bf16 hi + lo pairs)"
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_F16", "half")
    assert info.collect()["launch"]["hadamard_f16_dots"].startswith("invalid (")
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_STACK_FILL", "0")
    monkeypatch.delenv("QTIP_TRITON_HADAMARD_STACKED", raising=False)
    assert "fewer than 128 programs (off: QTIP_TRITON_HADAMARD_STACK_FILL=0)" in info.collect()["launch"]["hadamard_stacked"]
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_STACKED", "0")
    assert info.collect()["launch"]["hadamard_stacked"] == "off"
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_STACKED", "256")
    assert la["pdl"] == "early" and "needs sm90+" in la["pdl_active"] and la["hadamard_gemm"].startswith("from 1024")
    assert la["mma_gemv"] == "the untuned choice for 2-16 rows"
    assert la["wgmma"] == "not used (needs sm90, this is sm80)"
    monkeypatch.setattr(info, "current_device", lambda: DeviceInfo("Tesla T4", (7, 5), 40))
    assert "needs sm80+" in info.collect()["launch"]["mma_gemv"]
    monkeypatch.setattr(info, "current_device", lambda: H200)
    assert info.collect()["launch"]["pdl_active"] == "used"
    monkeypatch.delenv("QTIP_TRITON_WGMMA", raising=False)
    assert info.collect()["launch"]["wgmma"] == "the untuned choice for 65-512 rows (QTIP_TRITON_WGMMA)"
    monkeypatch.setenv("QTIP_TRITON_WGMMA", "0")
    assert info.collect()["launch"]["wgmma"].startswith("off (QTIP_TRITON_WGMMA=0)")
    monkeypatch.setenv("QTIP_TRITON_WGMMA", "maybe")
    assert info.collect()["launch"]["wgmma"].startswith("invalid (")
    monkeypatch.delenv("QTIP_TRITON_WGMMA")
    monkeypatch.setenv("QTIP_TRITON_PDL", "sometimes")
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_GEMM", "lots")
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_STACKED", "-1")
    la = info.collect()["launch"]
    assert la["pdl"].startswith("invalid") and la["hadamard_gemm"].startswith("invalid")
    assert la["hadamard_stacked"].startswith("invalid")
    assert "programmatic dependent launch: invalid" in info.render(info.collect())


def test_fp16_accumulation_entries_are_named(monkeypatch, tmp_path, capsys):
    """A user cache tuned with --fp16-accumulation says how many of its entries sum in fp16."""
    from qtip_triton.autotune.store import Entry, EntryKey, Header, TuneFile, save_merged

    monkeypatch.setattr(info, "current_device", lambda: H200)
    monkeypatch.setenv("QTIP_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(info, "current_versions", shipped_versions)
    plain = {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 1024, "SPLIT_K": 2, "num_warps": 4, "table": "shared16"}
    entries = [Entry(EntryKey("L16K2V2-hyb9", 4096, 4096, 1), "gemv", {**plain, "hfma": True}, 10.0),
               Entry(EntryKey("L16K2V2-hyb9", 8192, 8192, 1), "gemv", plain, 20.0)]
    save_merged(tmp_path / "autotune" / "h200.yaml", TuneFile(Header(H200, shipped_versions()), {e.key: e for e in entries}))
    facts = info.collect()
    user = next(f for f in facts["autotune"]["files"] if f["source"] == "user cache")
    assert user["entries"] == 2 and user["reduced_precision"] == 1
    assert cli.main(["info"]) == 0
    assert "2 entries, 1 with fp16 accumulation]" in capsys.readouterr().out
