import pytest

from qtip_triton.codes import CODES
from qtip_triton.spec import TrellisSpec


@pytest.mark.parametrize(
    "name,spec",
    [
        ("L16K2V2-hyb9", TrellisSpec(16, 2, 2, "hyb", 9)),
        ("L16K3V1-1mad", TrellisSpec(16, 3, 1, "1mad")),
        ("L12K2V1-3inst", TrellisSpec(12, 2, 1, "3inst")),
        ("L10K2V2-lut", TrellisSpec(10, 2, 2, "lut")),
    ],
)
def test_name_round_trip(name, spec):
    assert spec.name == name
    assert TrellisSpec.parse(name) == spec


def test_properties():
    s = TrellisSpec(16, 3, 2, "hyb", 9)
    assert s.bits_per_weight == 3.0
    assert s.steps_per_tile == 128
    assert s.words_per_tile == 24
    assert s.bits_per_step == 6


@pytest.mark.parametrize(
    "args,match",
    [
        ((7, 2, 2, "hyb", 9), "L=7 is out of range"),
        ((21, 2, 2, "hyb", 9), "L=21 is out of range"),
        ((16, 0, 1, "1mad", None), "K=0 is out of range"),
        ((16, 9, 1, "1mad", None), "K=9 is out of range"),
        ((16, 2, 3, "hyb", 9), "V=3 is not supported"),
        ((8, 4, 2, "hyb", 6), "K\\*V=8 must be smaller than L=8"),
        ((16, 2, 2, "1mad", None), "code '1mad' decodes V in"),
        ((16, 2, 2, "3inst", None), "code '3inst' decodes V in"),
        ((16, 2, 2, "hyb", None), "needs Q"),
        ((16, 2, 2, "hyb", 16), "Q=16 is out of range"),
        ((16, 2, 1, "1mad", 9), "takes no Q"),
        ((16, 2, 1, "nope", None), "unknown trellis code 'nope'; known codes"),
        ((16.0, 2, 1, "1mad", None), "L must be an int"),
    ],
)
def test_invalid_specs(args, match):
    with pytest.raises(ValueError, match=match):
        TrellisSpec(*args)


def test_parse_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse"):
        TrellisSpec.parse("K2L16")


def test_every_code_has_a_valid_spec():
    for name, code in CODES.items():
        V = code.allowed_V[0]
        TrellisSpec(16, 2, V, name, 9 if code.uses_q else None)
