"""The few vLLM interfaces that differ between the releases we support (0.26 on the GPU box, 0.33 here)."""

from __future__ import annotations

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


def current_load_format() -> str | None:
    """``load_config.load_format`` of the vLLM config being built/loaded, None when unknown."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:  # older releases
        try:
            from vllm.config import get_current_vllm_config

            cfg: Any = get_current_vllm_config()
        except Exception:
            return None
    else:
        cfg = get_current_vllm_config_or_none()
    fmt = getattr(getattr(cfg, "load_config", None), "load_format", None)
    if fmt is None:
        return None
    return str(getattr(fmt, "value", fmt)).lower()


def logger():
    from vllm.logger import init_logger

    return init_logger("qtip_triton.vllm")
