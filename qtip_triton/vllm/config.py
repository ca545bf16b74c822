"""QTIPConfig: the vLLM QuantizationConfig for QTIP checkpoints.

Where the parameters come from:

* ``quantization_config`` in config.json (``{"quant_method": "qtip", ...}``) -> :meth:`from_config`;
  the QTIP parameters may sit at its top level or under a ``quip_params`` key;
* otherwise (unmodified relaxml checkpoints, ``quantization="qtip"``): vLLM builds ``QTIPConfig()``
  and :meth:`maybe_update_config` reads ``hf_config.quip_params``.

Which layers are quantized: every ``LinearBase`` except those named in ``skip_list``. QTIP names
skipped layers ``"{layer}_{q,k,v,o,gate,up,down}"``; full module names work too. A fused vLLM
layer (qkv_proj, gate_up_proj) is unquantized only when all its parts are skipped; a mix cannot
be served by one fused layer and is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from qtip_triton.formats.qtip import spec_from_quip_params
from qtip_triton.spec import TrellisSpec
from qtip_triton.vllm import QUANT_METHOD

# QTIP's skip_list suffix of each module name.
SHORT_NAMES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
}
# vLLM's fused layers and their parts, when the model does not tell (packed_modules_mapping).
DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# checkpoint tensor suffix -> parameter name on the vLLM layer ("tp_rank" is taken by LinearBase)
CHECKPOINT_RENAMES = {".rcp": ".qtip_rcp", ".tp_rank": ".qtip_tp_rank"}


def _as_dict(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    raise ValueError(f"quip_params must be a mapping, got {type(obj).__name__}")


def _renames():
    from vllm.model_executor.models.utils import WeightsMapper

    return WeightsMapper(orig_to_new_suffix=CHECKPOINT_RENAMES)


class QTIPConfig(QuantizationConfig):
    """QTIP (bitshift trellis, HYB code, Hadamard incoherence) weights for vLLM linear layers."""

    def __init__(self, quip_params: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.quip_params: dict[str, Any] | None = None
        if quip_params is not None:
            self.set_quip_params(quip_params)

    def set_quip_params(self, quip_params: Mapping[str, Any]) -> None:
        """Validate and keep QTIP's parameters (a clear ValueError for anything unsupported)."""
        qp = _as_dict(quip_params)
        assert qp is not None
        spec_from_quip_params(qp)  # raises on unsupported codebook / decode_mode / tiles / missing K
        if qp.get("K_v_proj") is not None:
            spec_from_quip_params(qp, int(qp["K_v_proj"]))
        skip = qp.get("skip_list") or []
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"quip_params skip_list must be a list of module names, got {skip!r}")
        qp["skip_list"] = list(skip)
        self.quip_params = qp

    # ------------------------------------------------------------------ vLLM interface
    def __repr__(self) -> str:
        return f"QTIPConfig(quip_params={self.quip_params})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Empty: with quantization="qtip" and no quantization_config vLLM builds QTIPConfig() and
        # calls maybe_update_config, which reads quip_params from the model config.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QTIPConfig:
        params = config.get("quip_params")
        if params is None:
            params = {k: v for k, v in config.items() if k != "quant_method"}
        return cls(params or None)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None, **_: Any) -> None:
        """Take ``quip_params`` from the model config when quantization_config did not give them."""
        if self.quip_params is not None:
            return
        qp = None
        for cfg in (hf_config, getattr(hf_config, "text_config", None)):
            if cfg is not None and getattr(cfg, "quip_params", None) is not None:
                qp = cfg.quip_params
                break
        if qp is None and model_name and os.path.isdir(model_name):  # older vLLM passes no hf_config
            path = os.path.join(model_name, "config.json")
            if os.path.exists(path):
                with open(path) as f:
                    qp = json.load(f).get("quip_params")
        if qp is not None:
            self.set_quip_params(qp)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        names = self.logical_names(prefix)
        skipped = [self.is_skipped(prefix, name) for name in names]
        if all(skipped):
            return UnquantizedLinearMethod()
        if any(skipped):
            parts = ", ".join(f"{n}={'skipped' if s else 'quantized'}" for n, s in zip(names, skipped, strict=True))
            raise ValueError(
                f"{prefix}: vLLM fuses {', '.join(names)} into one layer, but quip_params skip_list leaves only "
                f"some of them unquantized ({parts}); one fused layer cannot mix both"
            )
        from qtip_triton.vllm.linear_method import QTIPLinearMethod

        return QTIPLinearMethod(self)

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Rename QTIP's ``rcp``/``tp_rank`` scalars: ``tp_rank`` is an attribute of every vLLM linear layer."""
        base = getattr(QuantizationConfig, "get_checkpoint_weight_mapper", None)
        return _renames() if base is None else base() | _renames()

    @staticmethod
    def get_cache_scale_mapper():
        """The base KV-scale mapper plus our renames: the only quantization mapper vLLM 0.26's loader applies."""
        return QuantizationConfig.get_cache_scale_mapper() | _renames()

    # ------------------------------------------------------------------ QTIP specifics
    def params(self) -> dict[str, Any]:
        if self.quip_params is None:
            raise ValueError(
                "qtip: no QTIP parameters found: the model's config.json has neither 'quip_params' nor a "
                "'quantization_config' with quant_method 'qtip' (is this a QTIP checkpoint?)"
            )
        return self.quip_params

    def spec_for(self, logical_name: str) -> TrellisSpec:
        """The trellis spec of one logical matrix (``v_proj`` may use ``K_v_proj``)."""
        qp = self.params()
        k = qp.get("K_v_proj") if logical_name == "v_proj" else None
        return spec_from_quip_params(qp, None if k is None else int(k))

    def logical_names(self, prefix: str, count: int | None = None) -> list[str]:
        """The checkpoint module names inside the vLLM layer at ``prefix`` (q/k/v for qkv_proj)."""
        last = prefix.rsplit(".", 1)[-1]
        names = self.packed_modules_mapping.get(last) or DEFAULT_PACKED.get(last) or [last]
        if count is not None and len(names) != count:
            names = [f"{last}[{i}]" for i in range(count)] if count > 1 else [last]
        return list(names)

    def is_skipped(self, prefix: str, logical_name: str) -> bool:
        skip = self.params().get("skip_list") or []
        if not skip:
            return False
        parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        full = f"{parent}.{logical_name}" if parent else logical_name
        if full in skip or prefix in skip:
            return True
        idx = _LAYER_INDEX.search(prefix)
        short = SHORT_NAMES.get(logical_name)
        return idx is not None and short is not None and f"{idx.group(1)}_{short}" in skip
