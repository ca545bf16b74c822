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
