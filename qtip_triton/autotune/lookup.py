"""Where tuned configs are looked up, in order: user cache -> shipped file for this exact GPU ->
shipped file of the same family (same compute capability). The caller (the registry) falls back to the
heuristic default when nothing usable is found, with one warning per missing entry.

Files are read once, lazily, and every file that cannot be trusted is skipped with a warning that
names it and says why. Nothing here runs on the hot path: the registry memoizes its answers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from qtip_triton.autotune.buckets import nearest_buckets
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions
from qtip_triton.autotune.store import AutotuneWarning, Entry, EntryKey, StoreError, TuneFile, compatibility, load

CACHE_ENV = "QTIP_TRITON_CACHE_DIR"


def shipped_dir() -> Path:
    """``autotune_configs/`` as installed with the package (the repo's top-level folder in a checkout)."""
    return Path(str(resources.files("qtip_triton") / "autotune_configs"))


def user_cache_dir() -> Path:
    """Per-user results: ``$QTIP_TRITON_CACHE_DIR/autotune`` or the platform cache dir (``~/.cache``
    without platformdirs: a checkout used through PYTHONPATH on a bare GPU machine has no dependencies)."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        try:
            import platformdirs

            base = platformdirs.user_cache_dir("qtip-triton")
        except ImportError:
            base = str(Path.home() / ".cache" / "qtip-triton")
    return Path(base) / "autotune"


def user_cache_file(device: DeviceInfo) -> Path:
    return user_cache_dir() / f"{device.short}.yaml"


class ConfigStore:
    """The ordered, validated view of every autotune file that applies to one GPU."""

    def __init__(
        self,
        device: DeviceInfo,
        versions: SoftwareVersions,
        user_dir: Path | None = None,
        shipped: Path | None = None,
    ) -> None:
        self.device = device
        self.versions = versions
        self.user_dir = user_cache_dir() if user_dir is None else Path(user_dir)
        self.shipped = shipped_dir() if shipped is None else Path(shipped)
        self._sources: list[tuple[str, TuneFile]] | None = None
        self._warned: set[str] = set()

    @classmethod
    def of_files(cls, device: DeviceInfo, versions: SoftwareVersions,
                 files: Iterable[tuple[str, TuneFile]]) -> ConfigStore:
        """A store answering from ``(label, file)`` pairs alone, in that order: no user cache, no shipped
        folder, no header checks (the caller chose the files). ``qtip-triton precompile`` asks the
        registry with one of these per file, so it compiles what that file makes the registry launch."""
        store = cls(device, versions, user_dir=Path(os.devnull), shipped=Path(os.devnull))
        store._sources = list(files)
        return store

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, AutotuneWarning, stacklevel=3)

    def _read(self, path: Path, expected: bool) -> tuple[str | None, TuneFile | None]:
        """Load and judge one file; warn if it should apply here but cannot be used."""
        try:
            tf = load(path)
        except (StoreError, OSError) as e:
            self.warn_once(f"ignoring autotune file {path}: {e}")
            return None, None
        status, why = compatibility(tf.header, self.device, self.versions)
        if status is None and (expected or not why.startswith("foreign")):
            self.warn_once(f"ignoring autotune file {path}: {why}")
        return status, tf

    @property
    def sources(self) -> list[tuple[str, TuneFile]]:
        """``(label, file)`` pairs in lookup order."""
        if self._sources is None:
            found: list[tuple[str, TuneFile]] = []
            user = self.user_dir / f"{self.device.short}.yaml"
            if user.is_file():
                status, tf = self._read(user, expected=True)
                if status is not None:
                    found.append((f"user cache {user}", tf))
            exact, family = [], []
            if self.shipped.is_dir():
                for path in sorted(self.shipped.glob("*.yaml")):
                    status, tf = self._read(path, expected=path.stem == self.device.short)
                    if status == "exact":
                        exact.append((f"shipped {path.name}", tf))
                    elif status == "family":
                        family.append((f"shipped {path.name} (same family)", tf))
            self._sources = found + exact + family
        return self._sources

    def candidates(self, spec: str, out_features: int, in_features: int, M: int) -> Iterator[tuple[Entry, str]]:
        """Entries for this layer, best first: the covering bucket in every source, then nearer buckets first."""
        present: set[int] = set()
        for _, tf in self.sources:
            present.update(k.m_bucket for k in tf.entries
                           if k.spec == spec and k.out_features == out_features and k.in_features == in_features)
        if not present:
            return
        for bucket in nearest_buckets(M, present):
            key = EntryKey(spec, out_features, in_features, bucket)
            for label, tf in self.sources:
                entry = tf.entries.get(key)
                if entry is not None:
                    yield entry, label

    def missing_message(self, spec: str, out_features: int, in_features: int, buckets: list[int], why: str = "") -> str:
        """The warning for entries that are missing (or unusable) for one layer at some M buckets."""
        where = ", ".join(label for label, _ in self.sources) or "no autotune file applies"
        at = f"M<={buckets[0]}" if len(buckets) == 1 else "M buckets " + ", ".join(map(str, buckets))
        tail = f" ({why})" if why else ""
        return (f"no usable autotune entry for {spec} {out_features}x{in_features} {at} on {self.device.name} "
                f"[{where}]{tail}; using the heuristic default. Run `qtip-triton autotune --gpu {self.device.short}` "
                "to tune it.")
