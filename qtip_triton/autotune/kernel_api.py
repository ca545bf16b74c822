"""The narrow contract between the autotuner/registry and the kernel package ``qtip_triton.kernels``.

The tuner, the registry and ``precompile`` only ever talk to a :class:`KernelAPI`. Production code
gets :class:`ModuleKernelAPI` (an adapter over ``qtip_triton.kernels``); tests pass a fake with the
same methods, so the tuner loop and the registry's fallbacks are tested on CPU without Triton.

Contract asked of ``qtip_triton.kernels`` (names it must export):

- ``KINDS``: kernel kinds in priority order, e.g. ``("gemv", "gemm", "decompress")``.
- ``default_config(kind, spec, m, n, M) -> dict``: the untuned heuristic config.
- ``config_space(kind, spec, m, n, M) -> list[dict]``: every config valid for this shape; ``[]``
  when the kind cannot run it.
- a launcher with an explicit config: ``launch(kind, x, qw, config, bias=None) -> Tensor``.
- ``prepare(qw)`` (optional): load-time work on a layer (repacking etc.); may return the object to
  pass to ``launch`` instead of ``qw``.
- optional: ``can_implement(kind, spec, m, n, M) -> (ok, reason)``, ``default_kind(spec, m, n, M)``,
  ``CONFIG_VERSION`` (str; bump when a config key changes meaning: older tuned files go stale),
  ``transform_rows(kind, in_features, out_features, blocks_in, blocks_out, lo, hi) -> tuple[int, ...]``
  (row counts in ``lo..hi`` at which a launch's other kernels, e.g. its transforms, switch variants:
  warmed and precompiled beside each bucket's own rows), and
  ``launch_variant(kind, in_features, out_features, blocks_in, blocks_out, rows) -> tuple`` (what else
  than the config and the row class tells the compiled variants of a launch of ``rows`` apart: the key
  warm-ups deduplicate by), and ``REDUCED_PRECISION_KEYS`` (config keys that trade accuracy for speed: the
  tuner leaves configs with one of them on out of its candidates unless asked), and ``TUNE_RANGES``
  (kind -> (lowest, highest) M bucket in which the tuner times it whatever the heuristic picks nearby), and
  ``extra_candidates(kind, spec, m, n, M) -> list[dict]`` (configs of the space the tuner's first round times beside
  the default's neighbours: ones several knobs away that a model of the kernel expects to do well).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import Any, Protocol

Config = dict[str, Any]


class KernelsUnavailable(RuntimeError):
    """The kernel package is missing or does not (yet) export the contract above."""


class KernelAPI(Protocol):
    def kinds(self) -> tuple[str, ...]: ...

    def default_config(self, kind: str, spec, m: int, n: int, M: int) -> Config: ...

    def config_space(self, kind: str, spec, m: int, n: int, M: int) -> list[Config]: ...

    def can_implement(self, kind: str, spec, m: int, n: int, M: int) -> tuple[bool, str | None]: ...

    def default_kind(self, spec, m: int, n: int, M: int) -> str | None: ...

    def launch(self, kind: str, x, qw, config: Mapping[str, Any], bias=None): ...

    def prepare(self, qw): ...


def config_key(config: Mapping[str, Any]) -> tuple:
    """Hashable, order-independent identity of a config dict."""
    return tuple(sorted(config.items()))


class ModuleKernelAPI:
    """Adapts a kernel module that follows the contract in this module's docstring."""

    _REQUIRED = ("KINDS", "default_config", "config_space", "launch")

    def __init__(self, module) -> None:
        missing = [name for name in self._REQUIRED if not hasattr(module, name)]
        if missing:
            raise KernelsUnavailable(
                f"{module.__name__} does not export {', '.join(missing)} (the autotune contract in "
                "qtip_triton/autotune/kernel_api.py)"
            )
        self.module = module

    def kinds(self) -> tuple[str, ...]:
        return tuple(self.module.KINDS)

    def default_config(self, kind, spec, m, n, M):
        return dict(self.module.default_config(kind, spec, m, n, M))

    def config_space(self, kind, spec, m, n, M):
        return [dict(c) for c in self.module.config_space(kind, spec, m, n, M)]

    def can_implement(self, kind, spec, m, n, M):
        fn = getattr(self.module, "can_implement", None)
        if fn is not None:
            ok, reason = fn(kind, spec, m, n, M)
            return bool(ok), reason
        try:
            space = self.module.config_space(kind, spec, m, n, M)
        except (ValueError, TypeError, NotImplementedError) as e:
            return False, str(e)
        return (True, None) if space else (False, f"{kind} has no valid config for {spec} {m}x{n} at M={M}")

    def reduced_precision_keys(self) -> tuple[str, ...]:
        return tuple(getattr(self.module, "REDUCED_PRECISION_KEYS", ()))

    def tune_range(self, kind: str) -> tuple[int, int] | None:
        return dict(getattr(self.module, "TUNE_RANGES", {})).get(kind)

    def extra_candidates(self, kind, spec, m, n, M) -> list[Config]:
        fn = getattr(self.module, "extra_candidates", None)
        return [] if fn is None else [dict(c) for c in fn(kind, spec, m, n, M)]

    def default_kind(self, spec, m, n, M):
        fn = getattr(self.module, "default_kind", None)
        return None if fn is None else fn(spec, m, n, M)

    def launch(self, kind, x, qw, config, bias=None):
        return self.module.launch(kind, x, qw, dict(config), bias)

    def transform_rows(self, kind, in_features, out_features, blocks_in, blocks_out, lo, hi) -> tuple[int, ...]:
        fn = getattr(self.module, "transform_rows", None)
        return () if fn is None else tuple(fn(kind, in_features, out_features, blocks_in, blocks_out, lo, hi))

    def launch_variant(self, kind, in_features, out_features, blocks_in, blocks_out, rows) -> tuple:
        fn = getattr(self.module, "launch_variant", None)
        return () if fn is None else tuple(fn(kind, in_features, out_features, blocks_in, blocks_out, rows))

    def prepare(self, qw):
        """The kernel package's load-time work; returns what to launch with (``qw`` itself if nothing changed)."""
        fn = getattr(self.module, "prepare", None)
        result = None if fn is None else fn(qw)
        return qw if result is None else result


def load_kernel_api() -> ModuleKernelAPI:
    """The production kernel API, or :class:`KernelsUnavailable` saying why not."""
    try:
        module = import_module("qtip_triton.kernels")
    except ImportError as e:
        raise KernelsUnavailable(f"qtip_triton.kernels cannot be imported: {e}") from e
    return ModuleKernelAPI(module)


def kernels_version() -> str:
    """Config-schema version of the kernel package (its ``CONFIG_VERSION``), else the package version."""
    try:
        module = import_module("qtip_triton.kernels")
        version = getattr(module, "CONFIG_VERSION", None)
    except ImportError:
        version = None
    if version is None:
        from qtip_triton import __version__

        version = __version__
    return str(version)
