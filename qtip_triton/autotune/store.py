"""Per-GPU autotune files: ``autotune_configs/<gpu>.yaml`` (shipped) and the user cache.

A file is a header (which GPU and which software measured it) plus entries keyed by
(spec name, out_features, in_features, M bucket), each holding the chosen kernel kind, its config and
the measured time next to the untuned default's. Reading validates every field and raises
:class:`StoreError` on anything unexpected: a file is either fully trusted or not used at all.
Writing merges with what is on disk under a file lock (several tuners may run at once) and replaces
the file atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from qtip_triton.autotune.buckets import M_BUCKETS
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions
from qtip_triton.fileio import atomic_write_text
from qtip_triton.spec import TrellisSpec

FORMAT = "qtip-triton-autotune"
FORMAT_VERSION = 1
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# libyaml parses a full shipped file (~800 entries) about 3x faster than the pure-Python loader
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_MAX_FEATURES = 1 << 20


class StoreError(ValueError):
    """An autotune file that must not be used (corrupt, foreign, out of date), with the reason."""


class AutotuneWarning(UserWarning):
    """A tuned config could not be used; the reason names the file or the missing entry."""


# ---------------------------------------------------------------------------------------- records
@dataclass(frozen=True, order=True)
class EntryKey:
    spec: str
    out_features: int
    in_features: int
    m_bucket: int

    def __str__(self) -> str:
        return f"{self.spec} {self.out_features}x{self.in_features} M<={self.m_bucket}"


@dataclass(frozen=True)
class Entry:
    key: EntryKey
    kind: str
    config: Mapping[str, Any]
    time_us: float
    default_kind: str | None = None
    default_time_us: float | None = None

    @property
    def speedup(self) -> float | None:
        """Untuned default time / tuned time (> 1 means tuning helped)."""
        if self.default_time_us is None:
            return None
        return self.default_time_us / self.time_us


@dataclass(frozen=True)
class Header:
    device: DeviceInfo
    versions: SoftwareVersions
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


@dataclass
class TuneFile:
    header: Header
    entries: dict[EntryKey, Entry] = field(default_factory=dict)

    def merge(self, other: TuneFile) -> int:
        """Take ``other``'s entries where they are new or faster; returns how many were taken."""
        taken = 0
        for key, entry in other.entries.items():
            mine = self.entries.get(key)
            if mine is None or entry.time_us < mine.time_us:
                self.entries[key] = entry
                taken += 1
        return taken


# ---------------------------------------------------------------------------------------- validation
def _req(d: Mapping, key: str, where: str) -> Any:
    if key not in d:
        raise StoreError(f"{where}: missing field {key!r}")
    return d[key]


def _int(v: Any, where: str, lo: int = 1, hi: int = 1 << 31) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise StoreError(f"{where}: expected an int in [{lo}, {hi}], got {v!r}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise StoreError(f"{where}: expected a non-empty string, got {v!r}")
    return v


def _time(v: Any, where: str, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise StoreError(f"{where}: expected a positive finite time in microseconds, got {v!r}")
    return float(v)


def _config(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise StoreError(f"{where}: config must be a mapping, got {type(v).__name__}")
    for k, x in v.items():
        if not isinstance(k, str) or not _IDENT.match(k):
            raise StoreError(f"{where}: config key {k!r} is not an identifier")
        if not isinstance(x, (bool, int, str)):
            raise StoreError(f"{where}: config value {k}={x!r} must be an int, bool or string")
    return dict(v)


def _parse_entry(raw: Any, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise StoreError(f"{where}: an entry must be a mapping, got {type(raw).__name__}")
    known = {"spec", "out_features", "in_features", "m_bucket", "kind", "config", "time_us", "default_kind",
             "default_time_us"}
    extra = set(raw) - known
    if extra:
        raise StoreError(f"{where}: unknown fields {sorted(map(str, extra))}")
    spec = _str(_req(raw, "spec", where), f"{where}.spec")
    try:
        canonical = TrellisSpec.parse(spec).name
    except ValueError as e:
        raise StoreError(f"{where}.spec: {e}") from None
    if canonical != spec:
        raise StoreError(f"{where}.spec: {spec!r} is not canonical (expected {canonical!r})")
    out_f = _int(_req(raw, "out_features", where), f"{where}.out_features", 16, _MAX_FEATURES)
    in_f = _int(_req(raw, "in_features", where), f"{where}.in_features", 16, _MAX_FEATURES)
    if out_f % 16 or in_f % 16:
        raise StoreError(f"{where}: features {out_f}x{in_f} are not multiples of the 16x16 tile")
    bucket = _req(raw, "m_bucket", where)
    if isinstance(bucket, bool) or bucket not in M_BUCKETS:
        raise StoreError(f"{where}.m_bucket: {bucket!r} is not one of {M_BUCKETS}")
    kind = _str(_req(raw, "kind", where), f"{where}.kind")
    if not _IDENT.match(kind):
        raise StoreError(f"{where}.kind: {kind!r} is not an identifier")
    default_kind = raw.get("default_kind")
    if default_kind is not None and (not isinstance(default_kind, str) or not _IDENT.match(default_kind)):
        raise StoreError(f"{where}.default_kind: {default_kind!r} is not an identifier")
    return Entry(
        key=EntryKey(spec, out_f, in_f, bucket),
        kind=kind,
        config=_config(_req(raw, "config", where), f"{where}.config"),
        time_us=_time(_req(raw, "time_us", where), f"{where}.time_us"),
        default_kind=default_kind,
        default_time_us=_time(raw.get("default_time_us"), f"{where}.default_time_us", optional=True),
    )


def _parse_header(raw: Mapping, where: str) -> Header:
    dev = _req(raw, "device", where)
    ver = _req(raw, "versions", where)
    if not isinstance(dev, dict) or not isinstance(ver, dict):
        raise StoreError(f"{where}: 'device' and 'versions' must be mappings")
    cap = _req(dev, "compute_capability", f"{where}.device")
    if not isinstance(cap, list) or len(cap) != 2:
        raise StoreError(f"{where}.device.compute_capability: expected [major, minor], got {cap!r}")
    try:
        device = DeviceInfo(
            _str(_req(dev, "name", f"{where}.device"), f"{where}.device.name"),
            (_int(cap[0], f"{where}.device.compute_capability", 0, 99), _int(cap[1], f"{where}.device.compute_capability", 0, 99)),
            _int(_req(dev, "sm_count", f"{where}.device"), f"{where}.device.sm_count", 1, 100_000),
        )
    except ValueError as e:
        raise StoreError(f"{where}.device: {e}") from None
    versions = SoftwareVersions(*(_str(_req(ver, k, f"{where}.versions"), f"{where}.versions.{k}")
                                  for k in ("triton", "torch", "package", "kernels")))
    date = _req(raw, "date", where)
    if isinstance(date, (_dt.date, _dt.datetime)):  # YAML may parse an unquoted timestamp
        date = date.isoformat()
    return Header(device, versions, _str(date, f"{where}.date"))


def parse(data: Any, source: str = "<autotune file>") -> TuneFile:
    """Validate a loaded YAML document; :class:`StoreError` names the first bad field."""
    if not isinstance(data, dict):
        raise StoreError(f"{source}: not an autotune file (top level is {type(data).__name__}, not a mapping)")
    if data.get("format") != FORMAT:
        raise StoreError(f"{source}: not an autotune file (format is {data.get('format')!r}, expected {FORMAT!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{source}: format_version {version!r} is not {FORMAT_VERSION} (written by another release)")
    header = _parse_header(data, source)
    raw_entries = _req(data, "entries", source)
    if not isinstance(raw_entries, list):
        raise StoreError(f"{source}.entries: expected a list, got {type(raw_entries).__name__}")
    tf = TuneFile(header)
    for i, raw in enumerate(raw_entries):
        entry = _parse_entry(raw, f"{source}.entries[{i}]")
        if entry.key in tf.entries:
            raise StoreError(f"{source}.entries[{i}]: duplicate entry for {entry.key}")
        tf.entries[entry.key] = entry
    return tf


def to_document(tf: TuneFile) -> dict[str, Any]:
    h = tf.header
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "device": {"name": h.device.name, "short": h.device.short, "compute_capability": list(h.device.capability),
                   "sm_count": h.device.sm_count},
        "versions": {"triton": h.versions.triton, "torch": h.versions.torch, "package": h.versions.package,
                     "kernels": h.versions.kernels},
        "date": h.date,
        "entries": [
            {
                "spec": e.key.spec, "out_features": e.key.out_features, "in_features": e.key.in_features,
                "m_bucket": e.key.m_bucket, "kind": e.kind, "config": dict(e.config),
                "time_us": round(e.time_us, 3), "default_kind": e.default_kind,
                "default_time_us": None if e.default_time_us is None else round(e.default_time_us, 3),
            }
            for _, e in sorted(tf.entries.items())
        ],
    }


def dumps(tf: TuneFile) -> str:
    body = yaml.dump(to_document(tf), Dumper=_DUMPER, sort_keys=False, default_flow_style=None, width=200)
    return f"# qtip-triton autotune results for {tf.header.device.name}; written by `qtip-triton autotune`.\n{body}"


def loads(text: str, source: str = "<autotune file>") -> TuneFile:
    try:
        data = yaml.load(text, Loader=_LOADER)  # a safe loader: plain data only, never Python objects
    except yaml.YAMLError as e:
        raise StoreError(f"{source}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    return parse(data, source)


def load(path: str | os.PathLike) -> TuneFile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StoreError(f"{path}: not a text file") from None
    return loads(text, str(path))


# ---------------------------------------------------------------------------------------- compatibility
def compatibility(header: Header, device: DeviceInfo, versions: SoftwareVersions) -> tuple[str | None, str]:
    """``("exact" | "family", why)`` if this file's configs may be used here, else ``(None, why not)``.

    Out of date (configs may mean something else or were timed under another compiler): a different
    kernel config version or Triton minor version. Foreign: another compute capability.
    """
    h = header
    if h.versions.kernels != versions.kernels:
        return None, f"out of date: kernel config version {h.versions.kernels!r}, running {versions.kernels!r}"
    if h.versions.triton_minor() != versions.triton_minor():
        return None, f"out of date: tuned with Triton {h.versions.triton}, running {versions.triton}"
    if h.device.capability != device.capability:
        return None, f"foreign: tuned on {h.device} but this GPU is {device}"
    if h.device.name == device.name and h.device.sm_count == device.sm_count:
        return "exact", f"tuned on this GPU ({device.name})"
    return "family", f"tuned on {h.device}, same family as {device}"


# ---------------------------------------------------------------------------------------- writing
def lock_for(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=120)


def save_merged(path: str | os.PathLike, new: TuneFile, replace: bool = False) -> TuneFile:
    """Merge ``new`` into the file at ``path`` (faster entry wins) and write it atomically; returns the result.

    ``replace``: every entry of ``new`` replaces the one on disk whatever their times (entries ``new``
    lacks stay). Why: a time on disk may come from another run or an older kernel of the same config
    version, so "faster wins" can keep a config whose recorded time the current kernels no longer give.

    Under a lock, so tuners in several processes can write the same file. An existing file for another
    GPU is refused (tune into another file); a corrupt or out-of-date one is set aside as
    ``<name>.bad-<date>`` with a warning and replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock_for(path):
        merged = TuneFile(new.header, dict(new.entries))
        if path.exists():
            try:
                old = load(path)
                status, why = compatibility(old.header, new.header.device, new.header.versions)
                if status is None and why.startswith("foreign"):
                    raise ValueError(f"refusing to merge into {path}: it holds results for another GPU ({why})")
                if status is None:
                    raise StoreError(f"{path}: {why}")
                if status == "family":
                    raise ValueError(
                        f"refusing to merge into {path}: it was tuned on {old.header.device}, not {new.header.device}; "
                        "write to a file named for this GPU instead"
                    )
                # entries already on disk that are faster stay
                for key, entry in old.entries.items():
                    mine = merged.entries.get(key)
                    if mine is None or (not replace and entry.time_us < mine.time_us):
                        merged.entries[key] = entry
            except StoreError as e:
                stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                backup = path.with_name(f"{path.name}.bad-{stamp}")
                os.replace(path, backup)
                warnings.warn(f"{e}; set aside as {backup.name} and replaced", AutotuneWarning, stacklevel=2)
        atomic_write_text(path, dumps(merged))
        return merged
