"""vLLM plugin: serve QTIP checkpoints with ``LLM(model=dir)``.

vLLM discovers :func:`register` through the ``vllm.general_plugins`` entry point (pyproject) and
calls it in every process it starts (front end, engine core, workers). Nothing here imports vLLM
at module import time, so ``qtip_triton`` stays importable where vLLM is absent.

Two checkpoint styles load:

* unmodified QTIP checkpoints (``quip_params`` in config.json): pass ``quantization="qtip"``;
* checkpoints whose config.json carries ``"quantization_config": {"quant_method": "qtip", ...}``
  (what ``qtip-triton quantize --quantization-config`` writes): detected automatically.
"""

from __future__ import annotations

QUANT_METHOD = "qtip"
_registered = False


def register() -> None:
    """Register the ``qtip`` quantization method with vLLM (idempotent, cheap after the first call)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from qtip_triton.vllm.config import QTIPConfig

    register_quantization_config(QUANT_METHOD)(QTIPConfig)
    from qtip_triton.vllm.exl3 import register as register_exl3

    register_exl3()  # quant_method "exl3" (ExLlamaV3 checkpoints)
    _registered = True


__all__ = ["QUANT_METHOD", "register"]
