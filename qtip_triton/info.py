"""``qtip-triton info``: what this installation will do on this machine, in one screen.

Why: the questions behind most "it is slow" or "it does not load" reports are answered here without
reading code -- which kernels run (compiled Triton, the interpreter or the torch reference path), which
autotune files apply to this GPU and why the others are ignored (a Triton upgrade makes a shipped file
out of date: every layer then runs the heuristic default), whether vLLM will find the plugin, and which
``QTIP_TRITON_*`` switches are set. ``--json`` gives the same facts to scripts and bug reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from qtip_triton import __version__
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions, current_device, current_versions
from qtip_triton.autotune.lookup import shipped_dir, user_cache_file
from qtip_triton.autotune.store import StoreError, compatibility, load

PLUGIN_GROUP = "vllm.general_plugins"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _kernels(device: DeviceInfo | None) -> str:
    if device is not None:
        return "compiled Triton kernels on CUDA"
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        return "Triton kernels in the interpreter (TRITON_INTERPRET=1: correct but slow, for tests)"
    return "torch reference path on the CPU (no CUDA GPU; TRITON_INTERPRET=1 runs the Triton kernels interpreted)"


def _reduced_precision_entries(tf) -> int:
    """Entries whose config trades accuracy for speed (``autotune --fp16-accumulation`` chose them): a user who
    reads "N entries" should also learn that some of them sum in fp16."""
    try:
        from qtip_triton.kernels.configs import REDUCED_PRECISION_KEYS
    except ImportError:  # the kernel package cannot be imported here (no Triton): nothing to name
        return 0
    return sum(1 for e in tf.entries.values() if any(e.config.get(k) for k in REDUCED_PRECISION_KEYS))


def _judge(path: Path, device: DeviceInfo | None, versions: SoftwareVersions) -> dict[str, Any]:
    """One autotune file: what it was tuned on, and whether (and how) it applies here."""
    row: dict[str, Any] = {"path": str(path)}
    try:
        tf = load(path)
    except (StoreError, OSError) as e:
        return {**row, "status": "ignored", "why": f"unreadable: {e}"}
    h = tf.header
    row.update(tuned_on=str(h.device), triton=h.versions.triton, date=h.date, entries=len(tf.entries),
               reduced_precision=_reduced_precision_entries(tf))
    if device is None:
        return {**row, "status": "not used", "why": "no CUDA GPU here"}
    status, why = compatibility(h, device, versions)
    return {**row, "status": status or "ignored", "why": why}


def _autotune(device: DeviceInfo | None, versions: SoftwareVersions) -> dict[str, Any]:
    files = []
    if device is not None:
        user = user_cache_file(device)
        files.append({"source": "user cache", **(_judge(user, device, versions) if user.is_file() else
                                                 {"path": str(user), "status": "absent", "why": "not tuned here yet"})})
    shipped = shipped_dir()
    for path in sorted(shipped.glob("*.yaml")) if shipped.is_dir() else []:
        files.append({"source": "shipped", **_judge(path, device, versions)})
    # in the registry's lookup order (autotune/lookup.py): the user cache, then exact files, then same-family ones
    used = sorted((f for f in files if f["status"] in ("exact", "family")),
                  key=lambda f: (f["source"] != "user cache", f["status"] != "exact"))
    if device is None:
        verdict = "no CUDA GPU: autotune files are not used"
    elif used:
        verdict = "configs from " + ", then ".join(f"{f['source']} {Path(f['path']).name} ({f['status']})" for f in used)
    else:
        verdict = (f"no autotune file applies: every layer runs the heuristic default; "
                   f"`qtip-triton autotune --gpu {device.short}` tunes this GPU")
    return {"files": files, "verdict": verdict}


def _plugin() -> dict[str, Any]:
    eps = [ep for ep in metadata.entry_points(group=PLUGIN_GROUP) if ep.value.startswith("qtip_triton.")]
    return {"group": PLUGIN_GROUP, "entry_points": [f"{ep.name} = {ep.value}" for ep in eps],
            "vllm": _version("vllm")}


def _launch(device: DeviceInfo | None) -> dict[str, Any]:
    """Programmatic dependent launch, the prefill transform path and the tensor-core gemv: what the
    switches ask and what runs here (a user comparing two machines' speeds starts from this)."""
    from qtip_triton.kernels import hadamard, hadamard_gemm, pdl

    names = {0: "off", 1: "exit", 2: "early", pdl.AUTO: f"auto (early up to {pdl.EARLY_MAX_TOKENS} tokens, exit for more)"}
    try:
        asked = names[pdl.mode()]
    except ValueError as e:  # a bad switch is reported, not raised, by info
        asked = f"invalid ({e})"
    if device is None:
        active = "not used (no CUDA GPU)"
    elif device.capability[0] < 9:
        active = f"not used (needs sm90+, this is sm{device.capability[0]}{device.capability[1]})"
    elif not pdl.triton_supports_pdl():
        active = "not used (this Triton has no launch_pdl option)"
    else:
        active = "used" if asked != "off" else "not used"
    try:
        rows = hadamard_gemm.min_rows()
        gemm = "off (Triton kernels for every batch)" if rows is None else f"from {rows} (token, block) rows"
    except ValueError as e:
        gemm = f"invalid ({e})"
    try:
        rows = hadamard.stack_override()
        if rows is None:
            stacked = (f"outputs from {hadamard.STACK_MIN_ROWS_OUTPUT} (token, block) rows "
                       f"({hadamard.STACK_MIN_ROWS_OUTPUT_SMALL_A} where A has fewer than "
                       f"{hadamard.STACK_SMALL_TILE_MIN_RP} rows), natural-order inputs from "
                       f"{hadamard.STACK_MIN_ROWS_NATURAL}, kernel-order inputs from {hadamard.STACK_MIN_ROWS_INPUT} "
                       f"where A has 64+ rows; one token's A per tile below {hadamard.STACK_SMALL_TILE_BELOW} rows where A has "
                       f"{hadamard.STACK_SMALL_TILE_MIN_RP}+, above that tiles of up to {hadamard.STACK_ROWS} rows "
                       f"halved while fewer than {hadamard.STACK_MIN_PROGRAMS} programs "
                       f"({'on' if hadamard.stack_fill_on() else 'off: ' + hadamard.STACK_FILL_ENV + '=0'})")
        else:
            stacked = "off" if rows == 0 else f"from {rows} (token, block) rows"
    except ValueError as e:
        stacked = f"invalid ({e})"
    if hadamard.stack_groups_on():
        stacked += "; a fused layer's grouped inputs count every shard's rows"
    zb = f"on where A has at most {hadamard.ZB_MAX_RP} rows" if hadamard.zb_first_on() else "off"
    try:
        f16 = (f"on for fp16 outputs (fp32 partials from {hadamard.F16_ENV_FP32_MIN_TOKENS} tokens)" if hadamard.f16_on()
               else f"off ({hadamard.F16_ENV}=0: bf16 hi + lo pairs)")
    except ValueError as e:
        f16 = f"invalid ({e})"
    from qtip_triton.kernels.configs import MMA_GEMV_MAX_M, MMA_MIN_CAPABILITY

    if device is None:
        mma = "not used (no CUDA GPU)"
    elif device.capability < MMA_MIN_CAPABILITY:
        mma = f"not used (mma.sync needs sm80+, this is sm{device.capability[0]}{device.capability[1]})"
    else:
        mma = f"the untuned choice for 2-{MMA_GEMV_MAX_M} rows"
    return {"pdl": asked, "pdl_active": active, "hadamard_gemm": gemm, "hadamard_stacked": stacked, "hadamard_zb_first": zb,
            "hadamard_f16_dots": f16, "mma_gemv": mma, "wgmma": _wgmma(device)}


def _wgmma(device: DeviceInfo | None) -> str:
    """Whether the Hopper-only wgmma kind serves 65-512 tokens here, and why not."""
    from qtip_triton.kernels import wgmma_configs
    from qtip_triton.kernels.configs import GEMM_MAX_M, WGMMA_MAX_M

    if device is None:
        return "not used (no CUDA GPU)"
    if device.capability[0] != 9:
        return f"not used (needs sm90, this is sm{device.capability[0]}{device.capability[1]})"
    try:
        on = wgmma_configs.heuristic_on()
    except ValueError as e:
        return f"invalid ({e})"
    if not on:
        return f"off ({wgmma_configs.HEURISTIC_ENV}=0): only where a tuned entry names it"
    return f"the untuned choice for {GEMM_MAX_M + 1}-{WGMMA_MAX_M} rows ({wgmma_configs.HEURISTIC_ENV})"


def collect() -> dict[str, Any]:
    """Every fact ``info`` prints, as plain data."""
    device = current_device()
    versions = current_versions()
    return {
        "package": __version__,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "triton", "numpy", "vllm")},
        "device": None if device is None else {"name": device.name, "short": device.short, "family": device.family,
                                               "sm_count": device.sm_count},
        "kernels": _kernels(device),
        "autotune": _autotune(device, versions),
        "vllm_plugin": _plugin(),
        "launch": _launch(device),
        "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("QTIP_TRITON_")},
    }


def render(facts: dict[str, Any]) -> str:
    v = facts["versions"]
    dev = facts["device"]
    lines = [
        f"qtip-triton {facts['package']} (python {facts['python']})",
        "versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v),
        "device: " + (f"{dev['name']} ({dev['family']}, {dev['sm_count']} SMs; files named {dev['short']}.yaml)"
                      if dev else "no CUDA GPU"),
        f"kernels: {facts['kernels']}",
        "autotune files (lookup order):",
    ]
    for f in facts["autotune"]["files"]:
        fp16 = f", {f['reduced_precision']} with fp16 accumulation" if f.get("reduced_precision") else ""
        tuned = f" [{f['tuned_on']}, Triton {f['triton']}, {f['entries']} entries{fp16}]" if "entries" in f else ""
        lines.append(f"  {f['source']} {f['path']}: {f['status']} ({f['why']}){tuned}")
    if not facts["autotune"]["files"]:
        lines.append("  none found")
    lines.append(f"  -> {facts['autotune']['verdict']}")
    p = facts["vllm_plugin"]
    if p["entry_points"]:
        plug = f"registered ({'; '.join(p['entry_points'])})"
    else:
        plug = "not registered (install the package with pip so its entry point exists)"
    lines.append(f"vLLM plugin ({p['group']}): {plug}; vllm {p['vllm'] or 'not installed'}")
    la = facts["launch"]
    lines.append(f"programmatic dependent launch: {la['pdl']} (QTIP_TRITON_PDL), {la['pdl_active']}; "
                 f"prefill Hadamard as GEMMs: {la['hadamard_gemm']}; stacked Hadamard kernel: {la['hadamard_stacked']}; "
                 f"A · (Z · B) order at few tokens: {la['hadamard_zb_first']}; "
                 f"fp16 products in transforms: {la['hadamard_f16_dots']}")
    lines.append(f"gemv on tensor cores (mma): {la['mma_gemv']}; warpgroup MMA decode-matmul (wgmma): {la['wgmma']}")
    sw = facts["switches"]
    lines.append("switches: " + (", ".join(f"{k}={val}" for k, val in sw.items()) if sw else "none set"))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def run(args: argparse.Namespace) -> int:
    facts = collect()
    print(json.dumps(facts, indent=2) if args.json else render(facts))
    return 0
