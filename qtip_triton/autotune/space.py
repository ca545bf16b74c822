"""Candidate configs for one (spec, layer shape, M bucket): the kernel's config space, pruned.

The kernel package owns validity (``config_space`` lists only configs that compile-and-run for the
shape). This module owns *budget*: it drops candidates that cannot win (row blocks far larger than
the batch, split-K with less than one k-tile per split) and keeps at most ``max_candidates`` per kind,
always including the default and the configs one step away from it, then an even spread of the rest.
It is also the check the registry runs on a stored config before trusting it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qtip_triton.autotune.kernel_api import Config, KernelAPI, config_key

_ROW_BLOCK_KEYS = ("BLOCK_M", "BLOCK_SIZE_M")
_SPLIT_KEYS = ("SPLIT_K", "SPLITK")
_K_BLOCK_KEYS = ("BLOCK_K", "BLOCK_SIZE_K")


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def wasteful(config: Mapping[str, Any], in_features: int, M: int) -> str | None:
    """Why this config cannot be the best for the shape (None if it may be)."""
    for key in _ROW_BLOCK_KEYS:
        block = config.get(key)
        if isinstance(block, int) and block > max(16, _next_pow2(M)):
            return f"{key}={block} is larger than needed for M={M}"
    split = next((config[k] for k in _SPLIT_KEYS if isinstance(config.get(k), int)), 1)
    block_k = next((config[k] for k in _K_BLOCK_KEYS if isinstance(config.get(k), int)), 16)
    if split > 1 and in_features // max(block_k, 1) < split:
        return f"split-K {split} leaves less than one k-block of {block_k} per split (in={in_features})"
    return None


def _distance(a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
    return sum(a.get(k) != b.get(k) for k in set(a) | set(b))


def prune(space: list[Config], default: Config | None, in_features: int, M: int, max_candidates: int) -> list[Config]:
    """At most ``max_candidates`` configs of ``space``: default first, its neighbours, then a spread."""
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    seen: set[tuple] = set()
    useful: list[Config] = []
    for cfg in space:
        k = config_key(cfg)
        if k not in seen and wasteful(cfg, in_features, M) is None:
            seen.add(k)
            useful.append(cfg)
    chosen: list[Config] = []
    if default is not None and config_key(default) in seen:
        chosen.append(default)
    rest = [c for c in useful if not chosen or config_key(c) != config_key(chosen[0])]
    if default is not None:
        near = [c for c in rest if _distance(c, default) == 1]
        far = [c for c in rest if _distance(c, default) != 1]
    else:
        near, far = [], rest
    chosen += near[: max_candidates - len(chosen)]
    room = max_candidates - len(chosen)
    if room > 0 and far:
        step = len(far) / room
        picks = sorted({int(i * step) for i in range(room)}) if len(far) > room else range(len(far))
        chosen += [far[i] for i in picks]
    return chosen[:max_candidates]


def candidates(api: KernelAPI, spec, out_features: int, in_features: int, M: int,
               max_candidates: int) -> list[tuple[str, Config]]:
    """``(kind, config)`` candidates over every kind that can run this shape, ``max_candidates`` per kind."""
    out: list[tuple[str, Config]] = []
    for kind in api.kinds():
        ok, _ = api.can_implement(kind, spec, out_features, in_features, M)
        if not ok:
            continue
        space = api.config_space(kind, spec, out_features, in_features, M)
        try:
            default = api.default_config(kind, spec, out_features, in_features, M)
        except (ValueError, TypeError, NotImplementedError):
            default = None
        out += [(kind, c) for c in prune(space, default, in_features, M, max_candidates)]
    return out


def check_config(api: KernelAPI, kind: str, config: Mapping[str, Any], spec, out_features: int,
                 in_features: int, M: int) -> tuple[bool, str | None]:
    """Is a stored ``(kind, config)`` usable for this shape and M? ``(ok, reason)`` — never trust a file blindly."""
    if kind not in api.kinds():
        return False, f"kind {kind!r} is not one of the available kernels {api.kinds()}"
    ok, reason = api.can_implement(kind, spec, out_features, in_features, M)
    if not ok:
        return False, f"{kind} cannot run this layer: {reason}"
    space = api.config_space(kind, spec, out_features, in_features, M)
    if config_key(config) not in {config_key(c) for c in space}:
        return False, f"config {dict(config)} is not in {kind}'s config space for this shape and M={M}"
    return True, None
