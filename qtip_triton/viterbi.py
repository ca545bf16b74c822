"""Viterbi search over a bitshift trellis, vectorized in torch over many sequences (CPU or CUDA).

A sequence of T steps is quantized to a path of L-bit states s_0 .. s_{T-1} in which each state's
low L-KV bits are the next state's high bits; state s decodes to the V values ``values[s]``. The
predecessors of s are ``(s >> KV) | (d << (L-KV))`` for d in [0, 2^KV): they depend only on the
group ``g = s >> KV``, so one minimum per group serves all 2^KV states of that group. That is why
back-pointers are stored per group, as the winning d (shape (T, B, 2^(L-KV)), uint8 when KV <= 8):
the search keeps 2^L costs but only 2^(L-KV) small integers per step.

Costs drop the constant ||x_t||^2 (cost = ||c||^2 - 2 c.x per step) so a step is one matrix
product plus one broadcast add; the true squared error is restored when a path is returned.

Tail-biting (what a QTIP tile stores: a circular stream) uses the two-pass method of the format
spec: run a free Viterbi on the sequence rolled by T/2, read the state it chose at the original
position 0, then re-run on the original sequence with the start constrained to states whose top
L-KV bits equal that state's top bits ("the overlap") and the end to states whose low L-KV bits
equal it. The result is always exactly tail-biting. :func:`viterbi_tail_biting_exact` tries every
overlap instead (2^(L-KV) constrained runs): the true optimum, for tests and tiny research specs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_INF = float("inf")
# On CPU a loop of elementwise ops beats torch.min(dim) (which returns int64 indices slowly)
# for small predecessor counts; on CUDA one reduction kernel is best.
_CPU_LOOP_MAX_PRED = 16


def _trellis_shape(values: torch.Tensor, kv: int) -> tuple[int, int, int]:
    """(L, number of groups G = 2^(L-KV), predecessors per group P = 2^KV) of a codebook."""
    if values.dim() != 2:
        raise ValueError(f"state values must be a (2^L, V) table, got shape {tuple(values.shape)}")
    n_states = values.shape[0]
    L = n_states.bit_length() - 1
    if n_states < 2 or n_states != (1 << L):
        raise ValueError(f"the state table must have 2^L rows, got {n_states}")
    if isinstance(kv, bool) or not isinstance(kv, int) or not 1 <= kv < L:
        raise ValueError(f"bits per step K*V must be an int in 1..L-1={L - 1}, got {kv!r}")
    return L, n_states >> kv, 1 << kv


def _bp_dtype(kv: int) -> torch.dtype:
    if kv <= 8:
        return torch.uint8
    if kv <= 15:
        return torch.int16
    return torch.int32


def backpointer_bytes(L: int, kv: int, T: int) -> int:
    """Bytes of back-pointers one sequence needs (for chunk sizing)."""
    itemsize = torch.empty(0, dtype=_bp_dtype(kv)).element_size()
    return T * (1 << (L - kv)) * itemsize


def _group_min(prev: torch.Tensor, P: int, G: int, bp_out: torch.Tensor | None) -> torch.Tensor:
    """Minimum over each group's P predecessors of ``prev`` (B, P*G); argmin written to ``bp_out``."""
    p = prev.view(prev.shape[0], P, G)
    if bp_out is None:
        return p.amin(1)
    if prev.device.type == "cuda" or P > _CPU_LOOP_MAX_PRED:
        m, idx = p.min(1)
        bp_out.copy_(idx)
        return m
    m = p[:, 0].clone()
    lt = torch.empty_like(m, dtype=torch.bool)
    bp_out.zero_()
    tmp = torch.empty_like(bp_out)
    for d in range(1, P):
        torch.lt(p[:, d], m, out=lt)
        torch.minimum(m, p[:, d], out=m)
        # d grows, so "take d where strictly better" is a running maximum (ties keep the lowest d)
        lt_int = lt.view(torch.uint8) if bp_out.dtype == torch.uint8 else lt.to(bp_out.dtype)
        torch.mul(lt_int, d, out=tmp)
        torch.maximum(bp_out, tmp, out=bp_out)
    return m


def viterbi(
    x: torch.Tensor,
    values: torch.Tensor,
    kv: int,
    *,
    overlap: torch.Tensor | None = None,
    keep_from: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best state path for each sequence of ``x`` (B, T, V) through the trellis of ``values`` (2^L, V).

    ``overlap`` (B,) int64 constrains the path to be tail-biting through that overlap: the first
    state's top L-KV bits and the last state's low L-KV bits both equal it. Without it both ends
    are free. Only states from position ``keep_from`` on are returned (and back-pointers before it
    are not stored): the first tail-biting pass needs just one state.

    Returns (states (B, T - keep_from) int64, squared error of the path (B,) float32).
    """
    L, G, P = _trellis_shape(values, kv)
    if x.dim() != 3 or x.shape[2] != values.shape[1]:
        raise ValueError(f"x must be (B, T, V={values.shape[1]}), got shape {tuple(x.shape)}")
    B, T, _ = x.shape
    if T < 1 or not 0 <= keep_from < T:
        raise ValueError(f"need T >= 1 steps and 0 <= keep_from < T, got T={T}, keep_from={keep_from}")
    dev = x.device
    x = x.to(torch.float32)
    vals = values.to(device=dev, dtype=torch.float32)
    c2 = (vals * vals).sum(-1)  # (S,)
    vt = (-2.0 * vals).t().contiguous()  # (V, S)

    def dist(t: int, out: torch.Tensor) -> torch.Tensor:
        # ||c||^2 - 2 c.x_t for every state: one small matrix product
        return torch.addmm(c2, x[:, t, :], vt, out=out)

    n_states = 1 << L
    cost = torch.empty(B, n_states, dtype=torch.float32, device=dev)
    nxt = torch.empty_like(cost)
    dist(0, cost)
    if overlap is not None:
        overlap = overlap.to(device=dev, dtype=torch.int64).reshape(B)
        if bool(((overlap < 0) | (overlap >= G)).any()):
            raise ValueError(f"overlap values must lie in [0, 2^(L-KV)) = [0, {G})")
        # allowed start states: s >> KV == overlap, i.e. one group of P states
        groups = cost.view(B, G, P)
        keep = groups[torch.arange(B, device=dev), overlap].clone()
        groups.fill_(_INF)
        groups[torch.arange(B, device=dev), overlap] = keep

    n_bp = T - 1 - keep_from
    bp = torch.empty((max(n_bp, 0), B, G), dtype=_bp_dtype(kv), device=dev)
    for t in range(1, T):
        slot = t - 1 - keep_from  # back-pointer of step t, stored only when t > keep_from
        m = _group_min(cost, P, G, bp[slot] if slot >= 0 else None)
        dist(t, nxt)
        nxt.view(B, G, P).add_(m.unsqueeze(-1))
        cost, nxt = nxt, cost

    ar = torch.arange(B, device=dev)
    if overlap is None:
        best, last = cost.min(1)
    else:
        # allowed end states: low L-KV bits == overlap, i.e. s = d * G + overlap
        ends = cost.view(B, P, G)[ar, :, overlap]  # (B, P)
        best, d = ends.min(1)
        last = d * G + overlap
    states = torch.empty(B, T - keep_from, dtype=torch.int64, device=dev)
    states[:, -1] = last
    s = last
    for t in range(T - 1, keep_from, -1):
        g = s >> kv
        d = bp[t - 1 - keep_from][ar, g].to(torch.int64)
        s = d * G + g
        states[:, t - 1 - keep_from] = s
    err = best + (x * x).sum((1, 2))
    return states, err


def viterbi_tail_biting(x: torch.Tensor, values: torch.Tensor, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-pass tail-biting Viterbi (the format spec's method): (states (B, T), squared error (B,))."""
    T = x.shape[1] if x.dim() == 3 else 0
    if T < 2:
        raise ValueError(f"tail-biting needs sequences of at least 2 steps, got x of shape {tuple(x.shape)}")
    half = T // 2
    # rolled[half] = x[0]: the free pass has settled by then, far from both of its free ends
    rolled = torch.roll(x, half, dims=1)
    mid, _ = viterbi(rolled, values, kv, keep_from=half)
    overlap = mid[:, 0] >> kv
    return viterbi(x, values, kv, overlap=overlap)


def viterbi_tail_biting_exact(
    x: torch.Tensor, values: torch.Tensor, kv: int, *, max_runs: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal tail-biting path: one constrained run per overlap, best kept. Cost x 2^(L-KV)."""
    _, G, _ = _trellis_shape(values, kv)
    B = x.shape[0]
    if max_runs < B * G:
        raise ValueError(f"exact tail-biting needs {B}x{G} constrained runs, more than max_runs={max_runs}")
    xs = x.repeat_interleave(G, dim=0)
    overlap = torch.arange(G, device=x.device).repeat(B)
    states, err = viterbi(xs, values, kv, overlap=overlap)
    err = err.view(B, G)
    best = err.argmin(1)
    pick = torch.arange(B, device=x.device) * G + best
    return states[pick], err[torch.arange(B, device=x.device), best]


def default_memory_budget(device: torch.device) -> int:
    """Working memory the batched search may use: modest on a shared CPU, a slice of free GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(4 << 30, free // 3))
    return 256 << 20


def chunk_size(L: int, kv: int, T: int, budget: int) -> int:
    """How many sequences fit the memory budget: back-pointers plus a few 2^L cost rows each."""
    per_seq = backpointer_bytes(L, kv, T) + 4 * (1 << L) * 4
    return max(1, budget // per_seq)


def encode_sequences(
    x: torch.Tensor,
    values: torch.Tensor,
    kv: int,
    *,
    memory_budget: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail-biting paths for many sequences (N, T, V), in chunks that bound memory.

    ``progress`` is called with the number of sequences finished after each chunk.
    Returns (states (N, T) int64, squared error per sequence (N,)).
    """
    L, _, _ = _trellis_shape(values, kv)
    N, T = x.shape[0], x.shape[1]
    budget = default_memory_budget(x.device) if memory_budget is None else memory_budget
    step = chunk_size(L, kv, T, budget)
    states = torch.empty(N, T, dtype=torch.int64, device=x.device)
    err = torch.empty(N, dtype=torch.float32, device=x.device)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        states[lo:hi], err[lo:hi] = viterbi_tail_biting(x[lo:hi], values, kv)
        if progress is not None:
            progress(hi - lo)
    return states, err
