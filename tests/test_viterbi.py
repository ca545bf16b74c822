"""The trellis search against brute force and an independent gather-based dynamic program."""

import pytest
import torch

from qtip_triton.viterbi import (
    encode_sequences,
    viterbi,
    viterbi_tail_biting,
    viterbi_tail_biting_exact,
)


def window_states(bits: torch.Tensor, L: int, kv: int, T: int) -> torch.Tensor:
    """States of bit streams (N, nb) of 0/1: state j is the L-bit window at bit kv*j (MSB first, mod nb)."""
    nb = bits.shape[-1]
    pos = (torch.arange(T).unsqueeze(1) * kv + torch.arange(L).unsqueeze(0)) % nb  # (T, L)
    weights = 1 << torch.arange(L - 1, -1, -1)
    return (bits[:, pos] * weights).sum(-1)


def all_bit_streams(nb: int) -> torch.Tensor:
    n = torch.arange(1 << nb).unsqueeze(1)
    return (n >> torch.arange(nb - 1, -1, -1)) & 1


def path_error(x: torch.Tensor, values: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Squared error of each path (float64): x (B, T, V), states (B, T)."""
    return ((values.double()[states] - x.double()) ** 2).sum((-1, -2))


def is_tail_biting(states: torch.Tensor, L: int, kv: int) -> bool:
    low = states & ((1 << (L - kv)) - 1)
    return bool((low == torch.roll(states, -1, dims=-1) >> kv).all())


def is_path(states: torch.Tensor, L: int, kv: int) -> bool:
    low = states[..., :-1] & ((1 << (L - kv)) - 1)
    return bool((low == states[..., 1:] >> kv).all())


def reference_dp(x: torch.Tensor, values: torch.Tensor, kv: int, overlap: torch.Tensor | None) -> torch.Tensor:
    """Optimal path error by a plain float64 DP that gathers each state's predecessor list."""
    S = values.shape[0]
    L = S.bit_length() - 1
    G = S >> kv
    s = torch.arange(S)
    preds = (s >> kv).unsqueeze(1) | (torch.arange(1 << kv) << (L - kv)).unsqueeze(0)  # (S, P)
    v = values.double()
    xd = x.double()
    dist = ((v.unsqueeze(0) - xd[:, 0].unsqueeze(1)) ** 2).sum(-1)  # (B, S)
    if overlap is not None:
        dist = torch.where((s >> kv).unsqueeze(0) == overlap.unsqueeze(1), dist, torch.inf)
    cost = dist
    for t in range(1, x.shape[1]):
        d = ((v.unsqueeze(0) - xd[:, t].unsqueeze(1)) ** 2).sum(-1)
        cost = d + cost[:, preds].amin(-1)
    if overlap is not None:
        cost = torch.where((s & (G - 1)).unsqueeze(0) == overlap.unsqueeze(1), cost, torch.inf)
    return cost.amin(1)


@pytest.mark.parametrize("L,kv,V,T", [(8, 1, 1, 11), (8, 2, 1, 6), (8, 2, 2, 6), (9, 3, 1, 4)])
def test_exact_and_two_pass_vs_brute_force(gen, L, kv, V, T):
    values = torch.randn(1 << L, V, generator=gen)
    B = 3
    x = torch.randn(B, T, V, generator=gen)
    # every circular stream of T*kv bits is one tail-biting path
    all_paths = window_states(all_bit_streams(T * kv), L, kv, T)  # (N, T)
    brute = torch.stack([path_error(x[b : b + 1].expand(len(all_paths), -1, -1), values, all_paths) for b in range(B)])
    best = brute.amin(1)

    states, err = viterbi_tail_biting_exact(x, values, kv)
    assert is_tail_biting(states, L, kv)
    assert torch.allclose(path_error(x, values, states), best, rtol=1e-5, atol=1e-5)
    assert torch.allclose(err.double(), best, rtol=1e-4, atol=1e-4)

    states2, err2 = viterbi_tail_biting(x, values, kv)
    assert is_tail_biting(states2, L, kv)
    e2 = path_error(x, values, states2)
    assert torch.allclose(err2.double(), e2, rtol=1e-4, atol=1e-4)
    assert bool((e2 >= best - 1e-5).all())

    # each fixed overlap: the constrained search is the best among the paths through that overlap
    G = 1 << (L - kv)
    overlap = torch.randint(0, G, (B,), generator=gen)
    states3, err3 = viterbi(x, values, kv, overlap=overlap)
    assert is_tail_biting(states3, L, kv)
    assert bool(((states3[:, 0] >> kv) == overlap).all())
    through = (all_paths[:, 0] >> kv).unsqueeze(0) == overlap.unsqueeze(1)  # (B, N)
    best_through = torch.where(through, brute, torch.inf).amin(1)
    assert torch.allclose(path_error(x, values, states3), best_through, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L,kv,V", [(8, 1, 1), (8, 2, 2)])
def test_free_viterbi_vs_brute_force(gen, L, kv, V):
    T = 5
    values = torch.randn(1 << L, V, generator=gen)
    x = torch.randn(2, T, V, generator=gen)
    all_paths = window_states(all_bit_streams(L + (T - 1) * kv), L, kv, T)  # windows never wrap
    best = torch.stack([path_error(x[b : b + 1].expand(len(all_paths), -1, -1), values, all_paths).amin() for b in range(2)])
    states, err = viterbi(x, values, kv)
    assert is_path(states, L, kv)
    assert torch.allclose(path_error(x, values, states), best, rtol=1e-5, atol=1e-5)
    assert torch.allclose(err.double(), best, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("L,kv,V", [(12, 10, 2), (10, 4, 1), (11, 9, 1)])
def test_wide_steps_vs_reference_dp(gen, L, kv, V):
    """KV > 8 stores int16 back-pointers; the search still matches a plain DP, free and constrained."""
    T = 7
    values = torch.randn(1 << L, V, generator=gen)
    x = torch.randn(4, T, V, generator=gen)
    states, err = viterbi(x, values, kv)
    assert is_path(states, L, kv)
    ref = reference_dp(x, values, kv, None)
    assert torch.allclose(path_error(x, values, states), ref, rtol=1e-5, atol=1e-5)
    overlap = torch.randint(0, 1 << (L - kv), (4,), generator=gen)
    states, err = viterbi(x, values, kv, overlap=overlap)
    assert is_tail_biting(states, L, kv)
    ref = reference_dp(x, values, kv, overlap)
    assert torch.allclose(path_error(x, values, states), ref, rtol=1e-5, atol=1e-5)


def test_two_pass_near_exact_on_tile_length(gen):
    """On 256-step sequences the two-pass heuristic is within 0.5% of the true tail-biting optimum."""
    L, kv = 10, 2
    values = torch.randn(1 << L, 1, generator=gen)
    x = torch.randn(2, 256, 1, generator=gen)
    _, exact = viterbi_tail_biting_exact(x, values, kv)
    states, two = viterbi_tail_biting(x, values, kv)
    _, free = viterbi(x, values, kv)
    assert is_tail_biting(states, L, kv)
    assert bool((free <= exact + 1e-3).all())
    assert bool((two >= exact - 1e-3).all())
    assert float(two.sum()) <= 1.005 * float(exact.sum())
    # and it is far better than a random tail-biting path or a greedy one
    rnd = window_states(torch.randint(0, 2, (2, 256 * kv), generator=gen), L, kv, 256)
    greedy = _greedy_tail_biting(x, values, kv)
    assert is_tail_biting(rnd, L, kv) and is_tail_biting(greedy, L, kv)
    e_greedy = path_error(x, values, greedy)
    assert bool((e_greedy < path_error(x, values, rnd)).all())
    assert bool((two.double() < 0.8 * e_greedy).all())


def _greedy_tail_biting(x: torch.Tensor, values: torch.Tensor, kv: int) -> torch.Tensor:
    """Choose the stream's bits left to right, each step's new bits the best for that step alone."""
    L = values.shape[0].bit_length() - 1
    B, T, _ = x.shape
    nb = T * kv
    bits = torch.zeros(B, nb, dtype=torch.int64)
    first = ((values.unsqueeze(0) - x[:, 0].unsqueeze(1)) ** 2).sum(-1).argmin(1)
    bits[:, :L] = (first.unsqueeze(1) >> torch.arange(L - 1, -1, -1)) & 1
    cand_bits = all_bit_streams(kv)  # (P, kv)
    t = 1
    while L + t * kv <= nb:  # new bits of step t are still free (not yet wrapped onto state 0)
        lo = L + (t - 1) * kv
        trial = bits.unsqueeze(1).repeat(1, len(cand_bits), 1)
        trial[:, :, lo : lo + kv] = cand_bits
        win = sum(trial[:, :, t * kv + b] << (L - 1 - b) for b in range(L))  # (B, P) state t
        err = ((values[win] - x[:, t].unsqueeze(1)) ** 2).sum(-1)
        bits[:, lo : lo + kv] = cand_bits[err.argmin(1)]
        t += 1
    return window_states(bits, L, kv, T)


def test_chunking_does_not_change_results(gen):
    values = torch.randn(1 << 9, 2, generator=gen)
    x = torch.randn(5, 32, 2, generator=gen)
    a, ea = encode_sequences(x, values, 4)
    calls = []
    b, eb = encode_sequences(x, values, 4, memory_budget=1, progress=calls.append)
    assert torch.equal(a, b)  # continuous random data: no float near-ties between batch sizes
    assert torch.allclose(ea, eb, rtol=1e-5)  # BLAS may round a batch of 1 differently
    assert calls == [1] * 5


def test_bad_inputs():
    values = torch.randn(256, 1)
    x = torch.randn(2, 8, 1)
    with pytest.raises(ValueError, match="2\\^L rows"):
        viterbi(x, torch.randn(100, 1), 1)
    with pytest.raises(ValueError, match="K\\*V must be an int in 1..L-1"):
        viterbi(x, values, 8)
    with pytest.raises(ValueError, match="x must be \\(B, T, V=1\\)"):
        viterbi(torch.randn(2, 8, 2), values, 2)
    with pytest.raises(ValueError, match="overlap values must lie"):
        viterbi(x, values, 2, overlap=torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="at least 2 steps"):
        viterbi_tail_biting(torch.randn(2, 1, 1), values, 2)


@pytest.mark.gpu
def test_cuda_matches_cpu(gen):
    values = torch.randn(1 << 12, 2, generator=gen)
    x = torch.randn(8, 128, 2, generator=gen)
    s_cpu, e_cpu = viterbi_tail_biting(x, values, 4)
    s_gpu, e_gpu = viterbi_tail_biting(x.cuda(), values.cuda(), 4)
    assert is_tail_biting(s_gpu.cpu(), 12, 4)
    assert torch.allclose(e_gpu.cpu(), e_cpu, rtol=1e-4)
