"""qtip-triton: fast, servable trellis-quantized (QTIP / EXL3) linear layers in Triton."""

from qtip_triton.dispatch import linear
from qtip_triton.encode import quantize as quantize
from qtip_triton.layer import QTIPLinear
from qtip_triton.spec import TrellisSpec
from qtip_triton.weight import QuantizedWeight

__version__ = "0.1.0"

__all__ = ["QTIPLinear", "QuantizedWeight", "TrellisSpec", "linear", "__version__"]
