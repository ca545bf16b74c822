"""The few vLLM interfaces that differ between the releases we support (0.26 on the GPU box, 0.33 here)."""

from __future__ import annotations

import logging
from typing import Any


def register_weight_loader_v2(cls: type) -> type:
    """Mark a LinearMethod as using the v2 (parameter-class) weight loaders."""
    from vllm.model_executor.layers import linear

    decorator = getattr(linear, "register_weight_loader_v2_supported_method", None)
    if decorator is not None:
        return decorator(cls)
    if cls.__name__ not in linear.WEIGHT_LOADER_V2_SUPPORTED:  # older releases: a plain list
        linear.WEIGHT_LOADER_V2_SUPPORTED.append(cls.__name__)
    return cls


def current_vllm_config() -> Any:
    """The vLLM config being built/loaded (``set_current_vllm_config``), None when unknown."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:  # older releases
        try:
            from vllm.config import get_current_vllm_config

            return get_current_vllm_config()
        except Exception:
            return None
    return get_current_vllm_config_or_none()


def current_load_format() -> str | None:
    """``load_config.load_format`` of the vLLM config being built/loaded, None when unknown."""
    fmt = getattr(getattr(current_vllm_config(), "load_config", None), "load_format", None)
    if fmt is None:
        return None
    return str(getattr(fmt, "value", fmt)).lower()


# Where a vLLM config says how many rows (tokens) one forward can hand a linear layer, per release:
# 0.26 and 0.33 both have scheduler_config.max_num_batched_tokens / max_num_seqs (0.33 adds
# max_num_scheduled_tokens, <= the former) and compilation_config.max_cudagraph_capture_size /
# cudagraph_capture_sizes; releases before 0.11 named the largest captured size max_capture_size.
MAX_TOKENS_FIELDS = (
    ("scheduler_config", "max_num_batched_tokens"),
    ("scheduler_config", "max_num_scheduled_tokens"),
    ("scheduler_config", "max_num_seqs"),
    ("compilation_config", "max_cudagraph_capture_size"),
    ("compilation_config", "max_capture_size"),
    ("compilation_config", "cudagraph_capture_sizes"),
)


def engine_max_tokens(cfg: Any) -> tuple[int, str] | None:
    """The most rows one forward of the engine configured by ``cfg`` can pass a linear layer, and the field
    that says so (``scheduler_config.max_num_batched_tokens=8192``); None when ``cfg`` tells nothing.

    Fields missing in a release, unset (None) or not positive ints are skipped; a list (capture sizes)
    counts by its largest element.
    """
    best: tuple[int, str] | None = None
    for section, name in MAX_TOKENS_FIELDS:
        value = getattr(getattr(cfg, section, None), name, None)
        if isinstance(value, (list, tuple)):
            value = max((v for v in value if isinstance(v, int) and not isinstance(v, bool)), default=None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            continue
        if best is None or value > best[0]:
            best = (value, f"{section}.{name}={value}")
    return best


def logger():
    """A logger under vLLM's ``vllm`` hierarchy: vLLM configures handlers (format, level) for that logger
    only, so a plain ``qtip_triton.vllm`` logger lost every INFO line in the engine's output (the
    warm-up's "compiled N kernel variants in parallel") and printed WARNINGs unformatted. Without vLLM (the
    warm-up run by a test or another runtime) a plain ``qtip_triton.vllm`` logger."""
    try:
        from vllm.logger import init_logger
    except ImportError:
        return logging.getLogger("qtip_triton.vllm")
    return init_logger("vllm.qtip_triton")
