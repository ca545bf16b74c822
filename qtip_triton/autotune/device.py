"""Who is running: the GPU (name, compute capability, SM count) and the software versions.

Tuned configs are only meaningful for the GPU and the kernel/Triton versions that measured them, so
every autotune file records this identity and every reader compares it before trusting a config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Words that name a board variant with different clocks/SM counts: they become part of the short name.
_VARIANTS = ("pcie", "nvl", "sxm")
_JOINED_PREFIXES = ("rtx", "gtx", "titan", "quadro")


def gpu_short_name(full_name: str) -> str:
    """File-name-safe model name: ``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA H100 PCIe`` -> ``h100-pcie``.

    SXM boards are the default variant (no suffix); PCIe and NVL boards get a suffix because their SM
    counts and clocks differ, so their best configs can differ too.
    """
    if not isinstance(full_name, str) or not full_name.strip():
        raise ValueError(f"GPU name must be a non-empty string, got {full_name!r}")
    words = re.split(r"[\s\-_/]+", full_name.lower())
    words = [w for w in words if w and w not in ("nvidia", "geforce", "tesla", "amd", "radeon")]
    model = None
    for i, w in enumerate(words):
        if w in _JOINED_PREFIXES and i + 1 < len(words):
            model = w + re.sub(r"[^a-z0-9]", "", words[i + 1])
            break
        if re.fullmatch(r"[a-z]+\d+[a-z]*", w):
            model = w
            break
    if model is None:
        model = re.sub(r"[^a-z0-9]+", "-", "-".join(words)).strip("-") or "gpu"
    variant = next((v for v in _VARIANTS[:2] if any(w.startswith(v) for w in words)), None)
    return f"{model}-{variant}" if variant else model


@dataclass(frozen=True)
class DeviceInfo:
    """A GPU's identity as recorded in autotune files."""

    name: str
    capability: tuple[int, int]
    sm_count: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"device name must be a non-empty string, got {self.name!r}")
        cap = self.capability
        if (
            not isinstance(cap, tuple)
            or len(cap) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cap)
        ):
            raise ValueError(f"compute capability must be a (major, minor) pair of ints, got {cap!r}")
        if isinstance(self.sm_count, bool) or not isinstance(self.sm_count, int) or self.sm_count < 1:
            raise ValueError(f"SM count must be a positive int, got {self.sm_count!r}")

    @property
    def short(self) -> str:
        return gpu_short_name(self.name)

    @property
    def family(self) -> str:
        """Devices of one family share an instruction set (``sm90``): configs transfer, timings may not."""
        return f"sm{self.capability[0]}{self.capability[1]}"

    def __str__(self) -> str:
        return f"{self.name} ({self.family}, {self.sm_count} SMs)"


def current_device(index: int | None = None) -> DeviceInfo | None:
    """The CUDA device in use (or ``index``), or None on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(idx)
    return DeviceInfo(props.name, (int(props.major), int(props.minor)), int(props.multi_processor_count))


def check_gpu_name(requested: str, device: DeviceInfo | None) -> None:
    """Raise a clear error unless ``requested`` (``h100`` or a full name) names the GPU present."""
    if device is None:
        raise RuntimeError(
            f"--gpu {requested}: no CUDA GPU is visible here; autotuning must run on the GPU it tunes for "
            "(use --dry-run to see the plan on any machine)"
        )
    wanted = requested.strip().lower()
    if wanted not in (device.short, device.name.lower()):
        raise ValueError(
            f"--gpu {requested!r} does not match the GPU present: {device.name!r} (short name {device.short!r}). "
            f"Run with --gpu {device.short} to tune this GPU."
        )


@dataclass(frozen=True)
class SoftwareVersions:
    """Versions that change what a config means or how fast it runs.

    ``kernels`` is the kernel package's config-schema version: bumped whenever a config key changes
    meaning, it makes every older tuned file out of date.
    """

    triton: str
    torch: str
    package: str
    kernels: str

    def triton_minor(self) -> str:
        return ".".join(self.triton.split(".")[:2])


def current_versions() -> SoftwareVersions:
    import torch
    import triton

    from qtip_triton import __version__
    from qtip_triton.autotune.kernel_api import kernels_version

    return SoftwareVersions(triton.__version__, torch.__version__.split("+")[0], __version__, kernels_version())
