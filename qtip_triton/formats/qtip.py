"""QTIP checkpoints (relaxml/*-QTIP-*): one linear's tensors + the model's ``quip_params``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qtip_triton.spec import TrellisSpec
from qtip_triton.weight import QuantizedWeight

# QTIP decode_mode -> (our code name, whether the code takes Q = tlut_bits)
DECODE_MODES = {"quantlut_sym": ("hyb", True)}
REQUIRED = ("trellis", "SU", "SV")
OPTIONAL = ("tlut", "rcp", "tp_rank", "bias")


def spec_from_quip_params(quip_params: Mapping[str, Any], K: int | None = None) -> TrellisSpec:
    """The TrellisSpec of a QTIP checkpoint (``K`` overrides, e.g. for ``K_v_proj``)."""
    qp = dict(quip_params)
    if qp.get("codebook", "bitshift") != "bitshift":
        raise ValueError(f"quip_params codebook {qp.get('codebook')!r} is not the bitshift trellis")
    for key in ("td_x", "td_y"):
        if int(qp.get(key, 16)) != 16:
            raise ValueError(f"quip_params {key}={qp[key]} is unsupported: only 16x16 tiles exist")
    mode = qp.get("decode_mode", "quantlut_sym")
    if mode not in DECODE_MODES:
        raise ValueError(
            f"quip_params decode_mode {mode!r} is unsupported; supported: {', '.join(DECODE_MODES)}"
        )
    code, uses_q = DECODE_MODES[mode]
    try:
        L, V = int(qp.get("L", 16)), int(qp.get("V", 2))
        k = int(K if K is not None else qp["K"])
    except KeyError:
        raise ValueError("quip_params lacks 'K'") from None
    return TrellisSpec(L, k, V, code, int(qp.get("tlut_bits", 9)) if uses_q else None)


def load_linear(
    tensors: Mapping[str, torch.Tensor], quip_params: Mapping[str, Any], *, name: str = "linear"
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Build the QuantizedWeight (and the optional bias) of one QTIP linear layer.

    ``tensors`` maps the suffixes (``trellis``, ``tlut``, ``SU``, ``SV``, ``rcp``, ``tp_rank``,
    ``bias``) to tensors. K comes from the trellis width and must be ``quip_params['K']`` or
    ``quip_params['K_v_proj']``.
    """
    unknown = sorted(set(tensors) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{name}: unknown QTIP tensors {unknown}")
    missing = [k for k in REQUIRED if k not in tensors]
    if missing:
        raise ValueError(f"{name}: missing QTIP tensors {missing}")
    trellis, SU, SV = tensors["trellis"], tensors["SU"], tensors["SV"]
    if trellis.dtype != torch.int16 or trellis.dim() != 2:
        raise ValueError(f"{name}.trellis must be a 2-D int16 tensor, got {trellis.dtype} {tuple(trellis.shape)}")
    if SU.dim() != 1 or SV.dim() != 1:
        raise ValueError(f"{name}: SU and SV must be vectors, got {tuple(SU.shape)} and {tuple(SV.shape)}")
    if trellis.shape[1] % 16:
        raise ValueError(f"{name}.trellis width {trellis.shape[1]} is not 16*K")
    K = trellis.shape[1] // 16
    allowed = {int(quip_params["K"])} if "K" in quip_params else set()
    if quip_params.get("K_v_proj") is not None:
        allowed.add(int(quip_params["K_v_proj"]))
    if allowed and K not in allowed:
        raise ValueError(f"{name}.trellis holds K={K} bits per weight but quip_params say K in {sorted(allowed)}")
    spec = spec_from_quip_params(quip_params, K)
    m, n = SV.shape[0], SU.shape[0]
    want_rows = (m // 16) * (n // 16)
    if trellis.shape[0] != want_rows or m % 16 or n % 16:
        raise ValueError(
            f"{name}.trellis has {trellis.shape[0]} rows but SV ({m},) and SU ({n},) imply "
            f"{want_rows} (= out/16 * in/16); the checkpoint is truncated or mismatched"
        )
    table = tensors.get("tlut")
    if table is None and spec.code == "hyb":
        raise ValueError(f"{name}: missing QTIP tensor 'tlut' needed by decode_mode quantlut_sym")
    rcp = int(tensors["rcp"].item()) if "rcp" in tensors else 0
    tp_rank = int(tensors["tp_rank"].item()) if "tp_rank" in tensors else 1
    bias = tensors.get("bias")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"{name}.bias must have shape ({m},), got {tuple(bias.shape)}")
    try:
        qw = QuantizedWeight(
            spec, m, n, trellis, SU.float(), SV.float(), table, layout="qtip", rcp=rcp, tp_rank=tp_rank
        )
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return qw, bias
