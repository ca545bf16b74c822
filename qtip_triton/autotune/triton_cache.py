"""Triton's binary cache: fill it ahead of time, and move it between identical machines.

A fresh serving process should load compiled kernels, not JIT them. ``precompile`` compiles every
kernel variant the registry launches for a tuned file's layers (up to ``--max-m`` rows) into Triton's
on-disk cache; ``export`` packs that cache with a manifest of
the machine (GPU, Triton, torch, CUDA, package versions); ``import`` unpacks it only where the
manifest matches this machine exactly: a binary for another GPU or compiler is refused with the
reason, never silently loaded.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from qtip_triton.autotune.device import DeviceInfo

MANIFEST = "manifest.json"
FORMAT = "qtip-triton-cache"
FORMAT_VERSION = 1


def triton_cache_dir() -> Path:
    """Where Triton keeps compiled kernels (``TRITON_CACHE_DIR`` or ``~/.triton/cache``)."""
    try:
        import triton.knobs

        return Path(triton.knobs.cache.dir)
    except (ImportError, AttributeError):
        home = os.environ.get("TRITON_HOME", str(Path.home()))
        return Path(os.environ.get("TRITON_CACHE_DIR", str(Path(home) / ".triton" / "cache")))


@dataclass(frozen=True)
class Machine:
    """Everything a Triton binary depends on; two machines must agree on all of it to share a cache."""

    device: str
    capability: str
    sm_count: int
    triton: str
    torch: str
    cuda: str
    package: str

    def differences(self, other: Machine) -> list[str]:
        return [f"{k}: archive has {v!r}, this machine has {getattr(other, k)!r}"
                for k, v in asdict(self).items() if getattr(other, k) != v]


def current_machine(device: DeviceInfo | None = None) -> Machine:
    import torch
    import triton

    from qtip_triton import __version__
    from qtip_triton.autotune.device import current_device

    device = device or current_device()
    if device is None:
        raise RuntimeError("no CUDA GPU is visible: Triton's binary cache is per GPU, so export/import need one")
    return Machine(device.name, f"{device.capability[0]}.{device.capability[1]}", device.sm_count, triton.__version__,
                   torch.__version__, str(torch.version.cuda), __version__)


def export_cache(archive: str | os.PathLike, machine: Machine, cache_dir: Path | None = None) -> int:
    """Pack every file of the cache into ``archive`` (.tar.gz) with a manifest; returns the file count."""
    cache_dir = Path(cache_dir or triton_cache_dir())
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"Triton cache {cache_dir} does not exist: run `qtip-triton precompile` first")
    files = sorted(p for p in cache_dir.rglob("*") if p.is_file() and not p.is_symlink() and not p.name.endswith(".tmp"))
    if not files:
        raise FileNotFoundError(f"Triton cache {cache_dir} is empty: run `qtip-triton precompile` first")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "machine": asdict(machine),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "python": platform.python_version(), "files": len(files)}
    archive = Path(archive)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        data = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for p in files:
            tar.add(p, arcname=f"cache/{p.relative_to(cache_dir).as_posix()}", recursive=False)
    os.replace(tmp, archive)
    return len(files)


def read_manifest(archive: str | os.PathLike) -> tuple[Machine, dict]:
    """The machine an archive was made on; ValueError if it is not an archive made by ``export``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.getmember(MANIFEST)
            raw = json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, KeyError, OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{archive}: not a qtip-triton cache archive ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{archive}: not a qtip-triton cache archive of format version {FORMAT_VERSION}")
    try:
        fields = raw["machine"]
        machine = Machine(**{k: fields[k] for k in Machine.__dataclass_fields__})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{archive}: manifest is incomplete ({e})") from None
    return machine, raw


def _safe_member(m: tarfile.TarInfo) -> PurePosixPath | None:
    """The path under ``cache/`` of a regular file or folder; None for anything else (links, devices, escapes)."""
    path = PurePosixPath(m.name)
    if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != "cache":
        return None
    if not (m.isfile() or m.isdir()):
        return None
    return PurePosixPath(*path.parts[1:]) if len(path.parts) > 1 else None


def import_cache(archive: str | os.PathLike, machine: Machine, cache_dir: Path | None = None) -> int:
    """Unpack ``archive`` into the cache if it was made on an identical machine; returns files added.

    Refuses (ValueError listing every difference) otherwise. Files already present are kept (same
    name = same content hash); new ones appear atomically, so a Triton process reading the cache at
    the same time never sees half a file.
    """
    theirs, _ = read_manifest(archive)
    diffs = theirs.differences(machine)
    if diffs:
        raise ValueError(f"{archive} was made on another machine or software stack; refusing to import it:\n  "
                         + "\n  ".join(diffs) + "\nRun `qtip-triton precompile` here instead.")
    cache_dir = Path(cache_dir or triton_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    added = 0
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            if m.name == MANIFEST:
                continue
            rel = _safe_member(m)
            if rel is None:
                if m.isdir() and m.name == "cache":
                    continue
                raise ValueError(f"{archive}: refusing unsafe member {m.name!r} (only files under cache/ are allowed)")
            dest = cache_dir.joinpath(*rel.parts)
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            if dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out, tar.extractfile(m) as src:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            added += 1
    return added
