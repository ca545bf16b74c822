import numpy as np
import pytest
import torch

from qtip_triton.bitstream import (
    decode_packed,
    get_layout,
    matrix_to_tiles,
    qtip_order,
    states_from_words,
    tiles_to_matrix,
    words_from_states,
)
from qtip_triton.spec import TrellisSpec


@pytest.mark.parametrize("K", [2, 3, 4])
def test_qtip_golden_decode(qtip_golden, K):
    spec = TrellisSpec(16, K, 2, "hyb", 9)
    table = torch.from_numpy(qtip_golden["hyb_tlut"])
    w = decode_packed(torch.from_numpy(qtip_golden[f"trellis_k{K}"]), spec, 64, 96, table, "qtip")
    np.testing.assert_array_equal(w.numpy(), qtip_golden[f"decoded_k{K}"])


def _random_words(gen, spec, tm, tn):
    return torch.randint(0, 1 << 32, (tm, tn, spec.words_per_tile), generator=gen, dtype=torch.int64)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_qtip_pack_unpack_identity(gen, K):
    spec = TrellisSpec(16, K, 2, "hyb", 9)
    words = _random_words(gen, spec, 4, 6)
    lay = get_layout("qtip")
    packed = lay.pack(words, spec)
    assert packed.dtype == torch.int16 and tuple(packed.shape) == (24, 16 * K)
    assert torch.equal(lay.unpack(packed, spec, 64, 96), words)
    assert torch.equal(lay.pack(lay.unpack(packed, spec, 64, 96), spec), packed)


@pytest.mark.parametrize("name", ["L16K2V2-hyb9", "L12K3V1-1mad", "L20K4V4-lut", "L8K1V4-lut", "L13K2V1-3inst"])
def test_tile_pack_unpack_identity(gen, name):
    spec = TrellisSpec.parse(name)
    words = _random_words(gen, spec, 3, 2)
    lay = get_layout("tile")
    packed = lay.pack(words, spec)
    assert packed.dtype == torch.int32
    assert torch.equal(lay.unpack(packed, spec, 48, 32), words)


@pytest.mark.parametrize("name", ["L16K2V2-hyb9", "L12K3V1-1mad", "L20K4V4-lut", "L9K2V4-lut", "L16K8V1-3inst"])
def test_states_words_round_trip(gen, name):
    spec = TrellisSpec.parse(name)
    words = _random_words(gen, spec, 2, 3)
    states = states_from_words(words, spec)
    assert states.shape == (2, 3, spec.steps_per_tile)
    assert int(states.max()) < (1 << spec.L)
    assert torch.equal(words_from_states(states, spec), words)


def test_state_windows_bit_by_bit(gen):
    """Each state is the L-bit circular window at bit K*V*j, checked against an explicit bit list."""
    spec = TrellisSpec(13, 3, 1, "1mad")
    words = _random_words(gen, spec, 1, 1)[0, 0]
    bits = [(int(w) >> (31 - i)) & 1 for w in words for i in range(32)]
    states = states_from_words(words, spec).tolist()
    nb = len(bits)
    for j, s in enumerate(states):
        want = 0
        for i in range(spec.L):
            want = (want << 1) | bits[(spec.bits_per_step * j + i) % nb]
        assert s == want


def test_words_from_states_rejects_broken_path():
    spec = TrellisSpec(12, 2, 1, "1mad")
    states = torch.zeros(256, dtype=torch.int64)
    states[5] = 1
    with pytest.raises(ValueError, match="not a tail-biting"):
        words_from_states(states, spec)


def test_qtip_order_matches_spec_formula():
    order = qtip_order()
    assert sorted(order.tolist()) == list(range(256))
    # the spec's weight placement: state 4l+u, element f -> row 8(u&1) + (l>>2), col 8(u>>1) + 2(l&3) + f
    for lane in range(32):
        for u in range(4):
            for f in range(2):
                t = 2 * (4 * lane + u) + f
                r, c = 8 * (u & 1) + (lane >> 2), 8 * (u >> 1) + 2 * (lane & 3) + f
                assert int(order[t]) == 16 * r + c


def test_tiles_matrix_round_trip(gen):
    m = torch.randn(32, 48, generator=gen)
    for order in (qtip_order(), torch.arange(256)):
        assert torch.equal(tiles_to_matrix(matrix_to_tiles(m, order), order), m)


def test_layout_errors():
    spec = TrellisSpec(16, 2, 2, "hyb", 9)
    lay = get_layout("qtip")
    with pytest.raises(ValueError, match="multiples of 32"):
        lay.unpack(torch.zeros(6, 32, dtype=torch.int16), spec, 48, 32)
    with pytest.raises(ValueError, match="must have shape"):
        lay.unpack(torch.zeros(5, 32, dtype=torch.int16), spec, 64, 32)
    with pytest.raises(ValueError, match="must be torch.int16"):
        lay.unpack(torch.zeros(8, 32, dtype=torch.int32), spec, 64, 32)
    with pytest.raises(ValueError, match="L=16, V=2 trellises only"):
        lay.unpack(torch.zeros(8, 32, dtype=torch.int16), TrellisSpec(16, 2, 1, "1mad"), 64, 32)
    with pytest.raises(ValueError, match="unknown trellis layout"):
        get_layout("nope")
