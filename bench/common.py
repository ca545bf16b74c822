"""Timing helpers shared by the benchmarks (GPU only).

``time_us(fn)`` is the one way we time: warm up (compiles and allocator growth stay out), capture
``fn`` in a CUDA graph (launch gaps and Python overhead stay out, as in serving with graphs), then
``triton.testing.do_bench`` on the replay, which zeroes a 256 MB buffer before every call so each
call starts with a cold L2 (decode-size weights fit in the 50 MB L2; without the flush the number
would be fiction). The median is reported in microseconds.

``time_rotated_us(fns)`` (qtip_triton/autotune/rotation.py, which the tuner's ``--timer rotated`` shares) is
the second, serving-like way: one CUDA graph of back-to-back calls that
cycle over several weight copies, together at least three times the L2, so every call reads its
weights from DRAM, as a layer does after the previous layers' weights went through the L2. Why a
second method: the flush zeroes 256 MB before each call, which leaves the L2 full of dirty lines
that the timed kernel then writes back while it reads, and each call also pays a graph launch. Both
cost a small kernel (a 16.8 MB 2-bit matrix) a larger share of its time than they cost fp16, so the
flushed ratio is the conservative one; issue and PERF targets accept "L2 flushed or weights rotated".
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qtip_triton.autotune.rotation import capture_calls as _capture
from qtip_triton.autotune.rotation import rotation_copies, time_rotated_us  # noqa: F401  (re-exported)


def time_us(fn: Callable[[], Any], *, graph: bool = True, warmup_ms: int = 10, rep_ms: int = 40) -> float:
    """Median time of one call of ``fn`` in µs (CUDA graph replay, L2 flushed before each call)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    run = _capture([fn], 1).replay if graph else fn
    ms = triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return float(ms) * 1000.0


def int_list(text: str) -> list[int]:
    """A comma-separated list of ints from the command line ("1,16,64"; empty entries skipped)."""
    return [int(v) for v in text.split(",") if v]


def source_rev() -> str:
    """Which package source produced a result: ``git describe`` plus a digest of qtip_triton/*.py.

    The digest is what identifies the code: a copied checkout (the GPU machine's) can carry a stale
    or missing .git, and uncommitted edits change the digest but not the commit.
    """
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted((root / "qtip_triton").rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=root,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{rev or 'no-git'} src:{h.hexdigest()[:10]}"


def card_slug() -> str:
    """Short file-name-safe GPU name, e.g. 'h100-80gb-hbm3'."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    name = name.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def environment() -> dict[str, str]:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "qtip_triton_rev": source_rev()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(card=torch.cuda.get_device_name(), sms=str(p.multi_processor_count),
                   memory_gib=f"{p.total_memory / 2**30:.1f}")
    return env


def write_results(out_dir: str | Path, stem_prefix: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<card>-<date>[-prefix].{json,md}``; returns the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    stem = f"{card_slug()}-{date}" + (f"-{stem_prefix}" if stem_prefix else "")
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(payload, indent=1))
    mp.write_text(markdown)
    return jp, mp
