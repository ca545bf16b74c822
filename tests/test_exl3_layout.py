"""The exl3 layout: golden decode for K = 1..8, EXL3's own state formula, pack/unpack identities."""

import numpy as np
import pytest
import torch

from qtip_triton.bitstream import (
    decode_packed,
    exl3_order,
    get_layout,
    rotate_stream,
    states_from_words,
    tiles_to_matrix,
)
from qtip_triton.codes import decode_states
from qtip_triton.spec import TrellisSpec

KS = range(1, 9)


def golden_spec(g, K):
    return TrellisSpec(16, K, 1, str(g[f"k{K}_codebook"]))


@pytest.mark.parametrize("K", KS)
def test_golden_decode_bit_exact(exl3_golden, K):
    spec = golden_spec(exl3_golden, K)
    trellis = torch.from_numpy(exl3_golden[f"k{K}_trellis"])
    w = decode_packed(trellis, spec, 256, 128, None, "exl3")  # ours: (out x in)
    want = exl3_golden[f"k{K}_w_hat"]  # EXL3: [in, out]
    np.testing.assert_array_equal(w.t().to(torch.float16).view(torch.int16).numpy(), want.view(np.int16))


def exl3_states_by_spec(trellis: torch.Tensor, K: int) -> torch.Tensor:
    """EXL3's state formula written out literally: [tk, tn, 256] states, window ends at (p+1)K."""
    d = trellis.to(torch.int64) & 0xFFFF
    wd = d[..., 0::2] | (d[..., 1::2] << 16)
    nbits = 256 * K
    start = ((torch.arange(256) + 1) * K - 16) % nbits
    i0 = start >> 5
    i1 = (i0 + 1) % (8 * K)
    return (((wd[..., i0] << 32) | wd[..., i1]) >> (48 - (start & 31))) & 0xFFFF


@pytest.mark.parametrize("K", KS)
def test_states_and_positions_follow_exl3(gen, K):
    """Random trellis: our unpacked words give EXL3's states, and each lands on W_hatᵀ's element."""
    spec = TrellisSpec(16, K, 1, "mul1")
    tk, tn = 2, 3
    trellis = torch.randint(-(1 << 15), 1 << 15, (tk, tn, 16 * K), generator=gen, dtype=torch.int16)
    words = get_layout("exl3").unpack(trellis, spec, 16 * tn, 16 * tk)
    ours = states_from_words(words, spec)  # (tn, tk, 256)
    theirs = exl3_states_by_spec(trellis, K)  # (tk, tn, 256)
    assert torch.equal(ours, theirs.transpose(0, 1))
    # position p of tile [tk, tn] -> W_hat[16tk + r, 16tn + c] (B-fragment), written independently
    vals = decode_states(theirs, spec)[..., 0]
    w_hat = torch.zeros(16 * tk, 16 * tn)
    for p in range(256):
        lane, j = divmod(p, 8)
        r = 2 * (lane % 4) + j % 2 + 8 * ((j // 2) % 2)
        c = lane // 4 + 8 * (j // 4)
        w_hat[r::16, c::16] = vals[:, :, p]
    assert torch.equal(decode_packed(trellis, spec, 16 * tn, 16 * tk, None, "exl3"), w_hat.t())


def test_order_is_a_permutation():
    o = exl3_order()
    assert torch.equal(torch.sort(o).values, torch.arange(256))


@pytest.mark.parametrize("K", KS)
def test_pack_unpack_identity(gen, K):
    spec = TrellisSpec(16, K, 1, "3inst")
    lay = get_layout("exl3")
    m, n = 48, 32
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, 8 * K), generator=gen, dtype=torch.int64)
    packed = lay.pack(words, spec)
    assert packed.dtype == torch.int16 and tuple(packed.shape) == (n // 16, m // 16, 16 * K)
    assert torch.equal(lay.unpack(packed, spec, m, n), words)
    trellis = torch.randint(-(1 << 15), 1 << 15, (n // 16, m // 16, 16 * K), generator=gen, dtype=torch.int16)
    assert torch.equal(lay.pack(lay.unpack(trellis, spec, m, n), spec), trellis)


def test_repack_to_tile_layout_decodes_the_same(gen):
    """EXL3 serves through the generic machinery: words + order, any storage layout."""
    spec = TrellisSpec(16, 3, 1, "mcg")
    trellis = torch.randint(-(1 << 15), 1 << 15, (4, 2, 48), generator=gen, dtype=torch.int16)
    words = get_layout("exl3").unpack(trellis, spec, 32, 64)
    values = decode_states(states_from_words(words, spec), spec)[..., 0]
    w = tiles_to_matrix(values, exl3_order())
    assert torch.equal(w, decode_packed(trellis, spec, 32, 64, None, "exl3"))


@pytest.mark.parametrize("shift", [0, 1, 8, 15, 31, 32, 33, 100, -7, -40])
def test_rotate_stream_bitwise(gen, shift):
    words = torch.randint(0, 1 << 32, (3, 4), generator=gen, dtype=torch.int64)
    bits = ((words.unsqueeze(-1) >> torch.arange(31, -1, -1)) & 1).reshape(3, 128)
    want_bits = torch.roll(bits, shift, dims=-1)  # out[b] = in[b - shift]
    got = rotate_stream(words, shift)
    got_bits = ((got.unsqueeze(-1) >> torch.arange(31, -1, -1)) & 1).reshape(3, 128)
    assert torch.equal(got_bits, want_bits)


def test_layout_errors():
    lay = get_layout("exl3")
    with pytest.raises(ValueError, match="L=16, V=1"):
        lay.validate(TrellisSpec(16, 2, 2, "hyb", 9), 32, 32)
    with pytest.raises(ValueError, match="L=16, V=1"):
        lay.validate(TrellisSpec(12, 2, 1, "mul1"), 32, 32)
    spec = TrellisSpec(16, 2, 1, "mul1")
    with pytest.raises(ValueError, match="must have shape \\(2, 4, 32\\)"):
        lay.unpack(torch.zeros(4, 2, 32, dtype=torch.int16), spec, 64, 32)
    with pytest.raises(ValueError, match="must be torch.int16"):
        lay.unpack(torch.zeros(2, 4, 32, dtype=torch.int32), spec, 64, 32)
