import numpy as np
import pytest
import torch

from qtip_triton.codes import all_state_values, decode_states
from qtip_triton.spec import TrellisSpec


def test_1mad_golden(qtip_golden):
    v = all_state_values(TrellisSpec(16, 2, 1, "1mad"))[:, 0].numpy()
    np.testing.assert_array_equal(v, qtip_golden["onemad"])


def test_3inst_golden(qtip_golden):
    v = all_state_values(TrellisSpec(16, 2, 1, "3inst"))[:, 0].numpy()
    np.testing.assert_array_equal(v, qtip_golden["threeinst"])


def test_hyb_golden(qtip_golden):
    table = torch.from_numpy(qtip_golden["hyb_tlut"])
    v = all_state_values(TrellisSpec(16, 2, 2, "hyb", 9), table).numpy()
    np.testing.assert_array_equal(v, qtip_golden["hyb_table"])


def test_states_column_matches(qtip_golden):
    assert (qtip_golden["states"] == np.arange(65536)).all()


def test_computed_code_rms():
    v = all_state_values(TrellisSpec(16, 2, 1, "1mad"))
    assert abs(float(v.pow(2).mean().sqrt()) - 1.0) < 0.01
    v = all_state_values(TrellisSpec(16, 2, 1, "3inst"))
    assert abs(float(v.pow(2).mean().sqrt()) - 1.2437) < 0.01


def test_lut_code_is_table_lookup(gen):
    spec = TrellisSpec(10, 2, 2, "lut")
    table = torch.randn(1024, 2, generator=gen)
    s = torch.randint(0, 1024, (50,), generator=gen)
    assert torch.equal(decode_states(s, spec, table), table[s])


def test_table_errors():
    spec = TrellisSpec(16, 2, 2, "hyb", 9)
    with pytest.raises(ValueError, match="needs a table of shape \\(512, 2\\)"):
        decode_states(torch.zeros(3, dtype=torch.int64), spec, None)
    with pytest.raises(ValueError, match="must have shape \\(512, 2\\)"):
        decode_states(torch.zeros(3, dtype=torch.int64), spec, torch.zeros(256, 2))
    with pytest.raises(ValueError, match="NaN"):
        decode_states(torch.zeros(3, dtype=torch.int64), spec, torch.full((512, 2), float("nan")))
    with pytest.raises(ValueError, match="takes no table"):
        decode_states(torch.zeros(3, dtype=torch.int64), TrellisSpec(16, 2, 1, "1mad"), torch.zeros(512, 2))
    with pytest.raises(ValueError, match="states must lie"):
        decode_states(torch.tensor([1 << 16]), TrellisSpec(16, 2, 1, "1mad"))


def _round(v, mantissa_bits: int):
    """Exact round-to-nearest-even of a Fraction to a binary float with ``mantissa_bits`` (normal range)."""
    from fractions import Fraction

    if v == 0:
        return Fraction(0)
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    e += (Fraction(2) ** (e + 1) <= a) - (Fraction(2) ** e > a)
    scale = Fraction(2) ** (mantissa_bits - e)
    return (1 if v > 0 else -1) * Fraction(round(a * scale)) / scale


def test_1mad_gpu_division_is_correctly_rounded_for_every_numerator():
    """The generated 1MAD decode on the GPU replaces div.rn by q = y·rcp, q + fma(-q, c, y)·rcp (two FMAs):
    equal to the correctly rounded y / c for every numerator y = byte sum - 510 in [-510, 510] (exact
    arithmetic here, so the claim does not depend on this machine's float behaviour)."""
    from fractions import Fraction

    from qtip_triton.codes import ONEMAD_RCP, ONEMAD_SCALE

    c, rcp = Fraction(ONEMAD_SCALE), Fraction(ONEMAD_RCP)
    assert _round(c, 23) == c and rcp == _round(1 / c, 23)
    plain_wrong = 0
    for y in map(Fraction, range(-510, 511)):
        want = _round(y / c, 23)
        q = _round(y * rcp, 23)
        plain_wrong += q != want
        assert _round(_round(-q * c + y, 23) * rcp + q, 23) == want, y
    assert plain_wrong > 300  # the reciprocal alone is not enough: the correction step matters


def test_mul1_fp16_fma_constants_match_the_closed_form():
    """The GPU's mul1 is fma.rn.f16(h, kinv, kbias) with h the fp16 whose bits are 0x6400 + byte sum: for every
    byte sum it equals the closed form the reference (and the interpreter) uses."""
    from fractions import Fraction

    from qtip_triton.codes import MUL1_H_BITS, MUL1_KBIAS_BITS, MUL1_KINV_BITS, mul1_value

    def f16(bits: int) -> Fraction:
        return Fraction(float(np.array([bits], dtype=np.uint16).view(np.float16)[0]))

    kinv, kbias = f16(MUL1_KINV_BITS), f16(MUL1_KBIAS_BITS)
    b = torch.arange(1021, dtype=torch.int64)
    # x whose bytes sum to b: spread b over the 4 bytes
    parts = [torch.clamp(b - 255 * i, 0, 255) for i in range(4)]
    x = parts[0] | parts[1] << 8 | parts[2] << 16 | parts[3] << 24
    ref = mul1_value(x)
    for bi in range(1021):
        h = f16(MUL1_H_BITS + bi)
        assert h == 1024 + bi
        assert _round(h * kinv + kbias, 10) == Fraction(float(ref[bi])), bi
