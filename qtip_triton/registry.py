"""The one door to kernels: (spec, layer shape, M) -> kernel + config, decided once, then a dict hit.

Modelled on vLLM's mixed-precision kernel registry: every kernel answers
``can_implement(request) -> (ok, reason)``, the registry takes the first that can in priority order,
``QTIP_TRITON_DISABLED_KERNELS=gemv,decompress`` switches kernels off, and every fallback says why.

Where the config comes from (see :mod:`qtip_triton.autotune.lookup`): user cache -> shipped file
for this GPU -> shipped file of the same family -> the kernel's heuristic default, with one warning
naming the missing entry. A stored config is used only if its kernel is enabled, can run the layer,
and the config is in that kernel's config space for the shape (files are never trusted blindly).

Serving never tunes and never compiles on the hot path: :func:`prepare` (at load time) selects the
kernel for every M bucket, compiles and warms each one, and returns a :class:`PreparedLinear` whose
call is a bucket lookup plus a launch (no host sync, safe inside CUDA-graph capture).

Kernel side hook: ``dispatch.linear`` (or the kernel package) calls
``registry.lookup_config(spec, out_features, in_features, M) -> (kind, config)`` and launches it; a
layer that was prepared answers from memory.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from qtip_triton.autotune.buckets import M_BUCKETS, bucket_for, bucket_rows, buckets_upto, row_class, warm_rows
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions, current_device, current_versions
from qtip_triton.autotune.kernel_api import KernelAPI, KernelsUnavailable, config_key, load_kernel_api
from qtip_triton.autotune.lookup import ConfigStore
from qtip_triton.autotune.space import check_config
from qtip_triton.autotune.store import AutotuneWarning, Entry
from qtip_triton.spec import TrellisSpec
from qtip_triton.weight import QuantizedWeight

DISABLE_ENV = "QTIP_TRITON_DISABLED_KERNELS"
REFERENCE = "reference"
HEURISTIC = "heuristic default"  # Selection.source of a bucket with no usable stored entry


def disabled_from_env() -> frozenset[str]:
    return frozenset(k.strip() for k in os.environ.get(DISABLE_ENV, "").split(",") if k.strip())


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer's transforms compile by, beside the decode kernel's (spec, shape, config): the feature
    counts and how many blocks each transform is block-diagonal over (1 for a whole QTIP matrix)."""

    in_features: int
    out_features: int
    blocks_in: int = 1
    blocks_out: int = 1

    @classmethod
    def of(cls, qw: QuantizedWeight) -> LayerGeometry:
        return cls(qw.in_features, qw.out_features, qw.blocks("in"), qw.blocks("out"))


def warm_key(sel: Selection, qw: QuantizedWeight, rows: int, variant: tuple, dtype: torch.dtype, bias: bool) -> tuple:
    """What one warm-up launch of :meth:`Registry.prepare` at ``rows`` compiled (its ``_warm`` set), so that the vLLM
    compile pool (``autotune/warmup_pool.py``) skips exactly what this process has already warmed; ``variant``: the
    launch's :meth:`Registry.launch_variant`."""
    return (sel.kind, qw.spec, qw.out_features, qw.in_features, config_key(sel.config), row_class(rows), *variant,
            dtype, bias)


@dataclass(frozen=True)
class Request:
    """What a layer asks for: a spec, its shape and a batch size (M rows of x)."""

    spec: TrellisSpec
    out_features: int
    in_features: int
    M: int

    def __post_init__(self) -> None:
        if not isinstance(self.spec, TrellisSpec):
            raise TypeError(f"spec must be a TrellisSpec, got {type(self.spec).__name__}")
        for name in ("out_features", "in_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v % 16:
                raise ValueError(f"{name} must be a positive multiple of 16, got {v!r}")
        bucket_for(self.M)  # validates M

    @property
    def bucket(self) -> int:
        return bucket_for(self.M)

    def __str__(self) -> str:
        return f"{self.spec.name} {self.out_features}x{self.in_features} M={self.M}"


# ------------------------------------------------------------------------------------------ kernels
class LinearKernel:
    """One way to compute y = x W_effᵀ; subclasses say whether they can and how to launch."""

    name: str = "?"

    def can_implement(self, req: Request) -> tuple[bool, str | None]:
        raise NotImplementedError

    def default_config(self, req: Request) -> dict[str, Any]:
        return {}

    def check_config(self, req: Request, config: Mapping[str, Any]) -> tuple[bool, str | None]:
        return (True, None) if not config else (False, f"{self.name} takes no config, got {dict(config)}")

    def launch(self, x: torch.Tensor, qw, config: Mapping[str, Any], bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class TritonKernel(LinearKernel):
    """A kernel kind of ``qtip_triton.kernels``, reached through the :class:`KernelAPI` contract."""

    def __init__(self, api: KernelAPI, kind: str, device: DeviceInfo | None) -> None:
        self.api, self.name, self.device = api, kind, device

    def can_implement(self, req):
        if self.device is None and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "no CUDA device (and TRITON_INTERPRET=1 is not set)"
        try:
            return self.api.can_implement(self.name, req.spec, req.out_features, req.in_features, req.bucket)
        except (ValueError, TypeError, NotImplementedError) as e:
            return False, str(e)

    def default_config(self, req):
        return dict(self.api.default_config(self.name, req.spec, req.out_features, req.in_features, req.bucket))

    def check_config(self, req, config):
        return check_config(self.api, self.name, config, req.spec, req.out_features, req.in_features, req.bucket)

    def launch(self, x, qw, config, bias=None):
        return self.api.launch(self.name, x, qw, config, bias)


class ReferenceKernel(LinearKernel):
    """Decode-then-matmul in PyTorch (float32): slow, exact, runs anywhere. The last resort."""

    name = REFERENCE

    def can_implement(self, req):
        return True, None

    def launch(self, x, qw, config, bias=None):
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        y = qw.reference_forward(x.to(compute), None if bias is None else bias.to(compute))
        return y.to(x.dtype)


@dataclass(frozen=True)
class Selection:
    """The decision for one (spec, shape, M bucket): which kernel, which config, and where it came from."""

    kernel: LinearKernel
    config: Mapping[str, Any]
    source: str

    @property
    def kind(self) -> str:
        return self.kernel.name

    def __call__(self, x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.launch(x, qw, self.config, bias)


@dataclass
class PreparedLinear:
    """A layer whose kernels are selected, compiled and warm: calling it is a lookup and a launch."""

    layer: Any  # what the kernels launch with (the kernel package's prepared form of the weight)
    qweight: QuantizedWeight
    plan: dict[int, Selection] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        sel = self.plan[bucket_for(max(rows, 1))]
        out = sel(x.reshape(-1, x.shape[-1]), self.layer, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


# ------------------------------------------------------------------------------------------ registry
class Registry:
    """Kernels in priority order plus the autotune store for one device; answers are memoized."""

    def __init__(
        self,
        api: KernelAPI | None = None,
        *,
        device: DeviceInfo | None = None,
        versions: SoftwareVersions | None = None,
        store: ConfigStore | None = None,
        disabled: frozenset[str] | None = None,
        unavailable_reason: str | None = None,
    ) -> None:
        self.api = api
        self.device = device
        self.disabled = disabled_from_env() if disabled is None else frozenset(disabled)
        self.unavailable_reason = unavailable_reason
        kinds = api.kinds() if api is not None else ()
        self.kernels: list[LinearKernel] = [TritonKernel(api, k, device) for k in kinds] + [ReferenceKernel()]
        if store is None and device is not None:
            store = ConfigStore(device, versions or current_versions())
        self.store = store
        self._memo: dict[tuple, Selection] = {}
        self._warm: set[tuple] = set()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._pending: list[tuple[int, list[str]]] | None = None

    # -- kernels -------------------------------------------------------------------------------
    def kernel(self, name: str) -> LinearKernel | None:
        return next((k for k in self.kernels if k.name == name), None)

    def why_not(self, req: Request) -> list[tuple[str, str | None]]:
        """``(kernel, reason)`` for every kernel in priority order; reason None means it can run ``req``."""
        out = []
        if self.api is None and self.unavailable_reason:
            out.append(("triton kernels", self.unavailable_reason))
        for k in self.kernels:
            if k.name in self.disabled:
                out.append((k.name, f"disabled by {DISABLE_ENV}"))
                continue
            ok, reason = k.can_implement(req)
            out.append((k.name, None if ok else reason or "cannot implement"))
        return out

    def _usable(self, kernel: LinearKernel, req: Request) -> bool:
        return kernel.name not in self.disabled and kernel.can_implement(req)[0]

    def _warn_once(self, message: str) -> None:
        if self.store is not None:
            self.store.warn_once(message)
        elif message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, AutotuneWarning, stacklevel=3)

    # -- selection -----------------------------------------------------------------------------
    def select(self, spec: TrellisSpec, out_features: int, in_features: int, M: int) -> Selection:
        """The kernel and config for this layer and batch size (memoized per M bucket)."""
        key = (spec, out_features, in_features, bucket_for(M))
        sel = self._memo.get(key)
        if sel is None:
            with self._lock:
                sel = self._memo.get(key) or self._select(Request(spec, out_features, in_features, M))
                self._memo[key] = sel
        return sel

    def rejection(self, entry: Entry, req: Request) -> str | None:
        """Why a stored entry cannot serve ``req`` (its kernel is unknown, disabled or cannot run it, or the
        config is not in that kernel's space for this shape and M bucket); None if it can."""
        kernel = self.kernel(entry.kind)
        if kernel is None or not self._usable(kernel, req):
            if kernel is None:
                why = f"is not one of the kernels here ({', '.join(k.name for k in self.kernels)})"
            elif kernel.name in self.disabled:
                why = f"is disabled by {DISABLE_ENV}"
            else:
                why = f"cannot run it: {kernel.can_implement(req)[1]}"
            return f"kernel {entry.kind!r} {why}"
        ok, reason = kernel.check_config(req, entry.config)
        return None if ok else reason or "config rejected"

    def _select(self, req: Request) -> Selection:
        rejected: list[str] = []
        if self.store is not None:
            for entry, label in self.store.candidates(req.spec.name, req.out_features, req.in_features, req.M):
                why = self.rejection(entry, req)
                if why is not None:
                    rejected.append(f"{label} M<={entry.key.m_bucket}: {why}")
                    continue
                return Selection(self.kernel(entry.kind), MappingProxyType(dict(entry.config)),
                                 f"{label} (M<={entry.key.m_bucket})")
        return self._default(req, rejected)

    def _default(self, req: Request, rejected: list[str]) -> Selection:
        triton_ok = [k for k in self.kernels if isinstance(k, TritonKernel) and self._usable(k, req)]
        kernel: LinearKernel | None = None
        if triton_ok:
            preferred = self.api.default_kind(req.spec, req.out_features, req.in_features, req.bucket)
            kernel = next((k for k in triton_ok if k.name == preferred), triton_ok[0])
        elif REFERENCE not in self.disabled:
            kernel = self.kernel(REFERENCE)
            if self.device is not None:
                reasons = "; ".join(f"{n}: {r}" for n, r in self.why_not(req) if r)
                self._warn_once(f"no Triton kernel can run {req} ({reasons}); using the slow reference path")
        if kernel is None:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.why_not(req) if r)
            raise ValueError(f"no enabled kernel can run {req}: {reasons}")
        if self.store is not None and isinstance(kernel, TritonKernel):
            if self._pending is not None:  # inside prepare(): one warning per layer, listing its buckets
                self._pending.append((req.bucket, rejected))
            else:
                self._warn_once(self.store.missing_message(req.spec.name, req.out_features, req.in_features,
                                                           [req.bucket], "; ".join(rejected)))
        return Selection(kernel, MappingProxyType(kernel.default_config(req)), HEURISTIC)

    def lookup_config(self, spec: TrellisSpec, out_features: int, in_features: int, M: int) -> tuple[str, Mapping[str, Any]]:
        """The hook for ``dispatch.linear``: ``(kind, config)`` to launch; a dict hit once the layer is prepared."""
        sel = self.select(spec, out_features, in_features, M)
        return sel.kind, sel.config

    # -- load time -----------------------------------------------------------------------------
    def prepare(self, qw: QuantizedWeight, *, max_m: int = M_BUCKETS[-1], dtypes: tuple[torch.dtype, ...] = (torch.float16,),
                warm: bool = True, bias: bool = False) -> PreparedLinear:
        """Select, compile and warm every kernel this layer will use for M up to ``max_m``.

        After this, calls on the returned object (and ``lookup_config`` for this layer) do no file
        access, no tuning and no compilation. ``bias=True``: the layer's forward passes a bias (in
        the activation dtype), which the kernels add in a variant of their own: warm that one.
        """
        if not isinstance(qw, QuantizedWeight):
            raise TypeError(f"prepare() takes a QuantizedWeight, got {type(qw).__name__}")
        layer = qw
        if self.api is not None and any(isinstance(k, TritonKernel) for k in self.kernels):
            prepared = self.api.prepare(qw)
            layer = qw if prepared is None else prepared
        plan = self.plan(qw.spec, qw.out_features, qw.in_features, max_m)
        if warm:
            device = qw.trellis.device
            geometry = LayerGeometry.of(qw)
            for _bucket, sel, rows in self.launches(plan, geometry):
                variant = self.launch_variant(sel, rows, geometry)
                for dtype in dtypes:
                    wkey = warm_key(sel, qw, rows, variant, dtype, bias)
                    if wkey in self._warm:
                        continue
                    x = torch.randn(rows, qw.in_features, device=device).to(dtype)
                    b = torch.zeros(qw.out_features, device=device, dtype=dtype) if bias else None
                    sel(x, layer, b)
                    self._warm.add(wkey)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return PreparedLinear(layer, qw, plan)

    def plan(self, spec: TrellisSpec, out_features: int, in_features: int,
             max_m: int = M_BUCKETS[-1]) -> dict[int, Selection]:
        """``{bucket: selection}`` for every M bucket up to ``max_m`` of one layer: what :meth:`prepare`
        warms and ``qtip-triton precompile`` compiles. Buckets with no usable entry of their own take a
        neighbour's (nearest first) or the heuristic default; one warning per layer lists those that
        fell back to the default."""
        self._pending = []
        try:
            plan = {b: self.select(spec, out_features, in_features, b) for b in buckets_upto(max_m)}
            missing, self._pending = self._pending, None
        finally:
            self._pending = None
        if missing and self.store is not None:
            reasons = sorted({r for _, rs in missing for r in rs})
            self._warn_once(self.store.missing_message(spec.name, out_features, in_features,
                                                       [b for b, _ in missing], "; ".join(reasons)))
        return plan

    def launches(self, plan: Mapping[int, Selection],
                 geometry: LayerGeometry | None = None) -> list[tuple[int, Selection, int]]:
        """``(bucket, selection, rows)`` of every launch that reaches a compiled variant of ``plan``.

        Triton compiles a separate binary per class of an integer argument (``== 1``, a multiple of 16,
        other: :func:`~qtip_triton.autotune.buckets.row_class`), so each bucket's selection is launched
        at one row count of every class the bucket spans (:func:`~qtip_triton.autotune.buckets.warm_rows`);
        a selection borrowed from another bucket is launched at *this* bucket's rows. With the layer's
        ``geometry``, also at each row count where the forward's transforms switch variants inside the
        bucket (the kernel package's ``transform_rows``; :meth:`launch_variant` tells those apart). The
        reference kernel compiles nothing and is left out. The one list both :meth:`prepare` (warming)
        and ``precompile`` (filling Triton's cache) follow.
        """
        extra = getattr(self.api, "transform_rows", None) if geometry is not None else None
        out = []
        for b, sel in plan.items():
            if sel.kind == REFERENCE:
                continue
            rows = set(warm_rows(b))
            if extra is not None:
                rows.update(extra(sel.kind, geometry.in_features, geometry.out_features, geometry.blocks_in,
                                  geometry.blocks_out, bucket_rows(b).start, b))
            out += [(b, sel, r) for r in sorted(rows)]
        return out

    def launch_variant(self, sel: Selection, rows: int, geometry: LayerGeometry | None = None) -> tuple:
        """What tells the compiled variants of a launch of ``sel`` at ``rows`` apart beyond its selection and the
        row class: with the layer's ``geometry``, the kernel package's ``launch_variant`` (PDL mode, transform
        variants); () without. With the row class (``warm_key``, ``CompileJob``'s ``variant_key``) the key by
        which ``prepare``, the vLLM compile pool and ``precompile`` deduplicate launches; the row class alone
        folded launches of one config from different buckets that reach different compiled kernels
        (bench/jit_audit.py, H100, 2026-12-05)."""
        fn = getattr(self.api, "launch_variant", None) if geometry is not None else None
        if fn is None or sel.kind == REFERENCE:
            return ()
        return tuple(fn(sel.kind, geometry.in_features, geometry.out_features, geometry.blocks_in,
                        geometry.blocks_out, rows))


# ------------------------------------------------------------------------------------------ default instance
_default: Registry | None = None
_default_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry for the current device (built on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                try:
                    api, reason = load_kernel_api(), None
                except KernelsUnavailable as e:
                    api, reason = None, str(e)
                _default = Registry(api, device=current_device(), unavailable_reason=reason)
    return _default


def reset() -> None:
    """Forget the process-wide registry (after changing env vars, files or the device)."""
    global _default
    _default = None


def select(spec: TrellisSpec, out_features: int, in_features: int, M: int) -> Selection:
    return get_registry().select(spec, out_features, in_features, M)


def lookup_config(spec: TrellisSpec, out_features: int, in_features: int, M: int) -> tuple[str, Mapping[str, Any]]:
    """``(kind, config)`` for a layer and batch size; see :meth:`Registry.lookup_config`."""
    return get_registry().lookup_config(spec, out_features, in_features, M)


def prepare(qw: QuantizedWeight, **kwargs) -> PreparedLinear:
    """Load-time selection, compilation and warm-up for one layer; see :meth:`Registry.prepare`."""
    return get_registry().prepare(qw, **kwargs)
