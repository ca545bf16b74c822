"""EXL3's three codes against golden values from exllamav3's own codebook code, every state."""

import numpy as np
import pytest
import torch

from qtip_triton.codes import MUL1_MULT, all_state_values, byte_sum, decode_states, fp16_from_bits
from qtip_triton.spec import TrellisSpec


@pytest.mark.parametrize("code", ["3inst", "mcg", "mul1"])
def test_all_states_bit_exact(exl3_golden, code):
    assert (exl3_golden["states"] == np.arange(65536)).all()
    v = all_state_values(TrellisSpec(16, 4, 1, code))[:, 0]
    want = exl3_golden[f"value_{code}"]
    # the values are fp16 numbers: exact in float32, and compared by their fp16 bit patterns
    assert v.dtype == torch.float32
    assert torch.equal(v.to(torch.float16).to(torch.float32), v)
    np.testing.assert_array_equal(v.to(torch.float16).view(torch.int16).numpy(), want.view(np.int16))


def test_exl3_3inst_is_qtip_3inst(exl3_golden, qtip_golden):
    np.testing.assert_array_equal(exl3_golden["value_3inst"].astype(np.float32), qtip_golden["threeinst"])


def test_mul1_needs_a_single_rounding(exl3_golden):
    """A multiply then an add, each rounded to fp16, gives other values: the golden is an FMA."""
    s = torch.arange(65536, dtype=torch.int64)
    h = (1024 + byte_sum((s * MUL1_MULT) & 0xFFFFFFFF)).to(torch.float16)
    kinv, kbias = fp16_from_bits(torch.tensor(0x1EEE)), fp16_from_bits(torch.tensor(0xC931))
    assert float(kinv) == 0.00676727294921875 and float(kbias) == -10.3828125
    two_roundings = (h * kinv + kbias).numpy()  # fp16 ops round after each step
    assert (two_roundings != exl3_golden["value_mul1"]).any()
    fma = (h.double() * float(kinv) + float(kbias)).to(torch.float16).numpy()  # exact in f64, one rounding
    np.testing.assert_array_equal(fma, exl3_golden["value_mul1"])


@pytest.mark.parametrize("code,rms", [("mcg", 1.2441), ("mul1", 1.0003)])
def test_rms(code, rms):
    v = all_state_values(TrellisSpec(16, 2, 1, code))
    assert abs(float(v.pow(2).mean().sqrt()) - rms) < 1e-3


@pytest.mark.parametrize("name", ["L16K2V1-mcg", "L16K8V1-mul1"])
def test_spec_names_round_trip(name):
    assert TrellisSpec.parse(name).name == name


def test_exl3_codes_are_scalar():
    for code in ("mcg", "mul1"):
        with pytest.raises(ValueError, match="V in \\(1,\\)"):
            TrellisSpec(16, 2, 2, code)
        with pytest.raises(ValueError, match="takes no table"):
            decode_states(torch.zeros(2, dtype=torch.int64), TrellisSpec(16, 2, 1, code), torch.zeros(4, 1))
