"""The NVIDIA tools that ship with Triton's wheel (cuobjdump), for reading compiled kernels on any machine.

Why one place: the wgmma launcher reads a kernel's SASS at run time (its A-register hazard check), and the bench
scripts and tests read SASS and register use of kernels compiled for sm_90 without a GPU.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def tools_dir() -> Path:
    """Triton's bundled NVIDIA binaries (ptxas, cuobjdump, nvdisasm)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def has_cuobjdump() -> bool:
    return (tools_dir() / "cuobjdump").is_file()


def cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump <flag>`` of a cubin (``-sass``: its SASS; ``-res-usage``: registers, stack, local memory)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tools_dir() / "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout
