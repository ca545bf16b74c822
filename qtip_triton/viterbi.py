"""Viterbi search over a bitshift trellis, vectorized in torch over many sequences (CPU or CUDA).

A sequence of T steps is quantized to a path of L-bit states s_0 .. s_{T-1} in which each state's
low L-KV bits are the next state's high bits; state s decodes to the V values ``values[s]``. The
predecessors of s are ``(s >> KV) | (d << (L-KV))`` for d in [0, 2^KV): they depend only on the
group ``g = s >> KV``, so one minimum per group serves all 2^KV states of that group. That is why
back-pointers are stored per group, as the winning d (shape (T, B, 2^(L-KV)), uint8 when KV <= 8):
the search keeps 2^L costs but only 2^(L-KV) small integers per step.

A step is one small matrix product (||c||^2 - 2 c.x_t for every state), one minimum per group and
one broadcast add of (group minimum + ||x_t||^2): costs are true squared errors, never negative
(up to rounding), which the CPU argmin relies on.

Tail-biting (what a QTIP tile stores: a circular stream) uses the two-pass method of the format
spec: run a free Viterbi on the sequence rolled by T/2, read the state it chose at the original
position 0, then re-run on the original sequence with the start constrained to states whose top
L-KV bits equal that state's top bits ("the overlap") and the end to states whose low L-KV bits
equal it. The result is always exactly tail-biting. :func:`viterbi_tail_biting_exact` tries every
overlap instead (2^(L-KV) constrained runs): the true optimum, for tests and tiny research specs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

_INF = float("inf")
# On CPU, torch.min(dim) (int64 indices) is slow; the argmin is read from packed keys instead
# (see _group_min) for up to 2^8 predecessors. On CUDA one reduction kernel is best.
_KEYED_MAX_KV = 8
_CPU_CACHE_COSTS = 1 << 19  # float32 costs per chunk on CPU (2 MiB per cost array)


@contextmanager
def cpu_threads(n: int = 1) -> Iterator[None]:
    """Run torch CPU ops with ``n`` intra-op threads, restoring the setting afterwards.

    Why: the search is a long chain of small dependent ops. OpenMP's fork/join per op gains little
    on them, and when the cores are shared with other processes a parallel op waits for a
    descheduled worker: measured 45 s vs 1.1 s for one small quantize() on a busy 2-core machine.
    The setting is process-wide (torch has no per-thread one).
    """
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    """Minimum over each group's P predecessors of ``prev`` (B, P*G); an argmin is written to ``bp_out``.

    CPU path: costs are true squared errors (>= 0), so their int32 bit patterns order like the
    floats; replacing the low KV bits by the predecessor index d and taking one integer minimum
    yields a d whose cost is within 2^KV ulps of the exact minimum (a float32 near-tie either way)
    in two passes instead of P. The minimum itself is exact (a float reduction).
    """
    p = prev.view(prev.shape[0], P, G)
    if bp_out is None:
        return p.amin(1)
    if prev.device.type == "cuda" or P > (1 << _KEYED_MAX_KV):
        m, idx = p.min(1)
        bp_out.copy_(idx)
        return m
    d = torch.arange(P, dtype=torch.int32, device=prev.device).view(1, P, 1)
    key = p.view(torch.int32).bitwise_and(~(P - 1)).bitwise_or_(d)
    bp_out.copy_(key.amin(1).bitwise_and_(P - 1))
    return p.amin(1)


def viterbi(
    x: torch.Tensor,
    values: torch.Tensor,
    kv: int,
    *,
    overlap: torch.Tensor | None = None,
    keep_from: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best state path for each sequence of ``x`` (B, T, V) through the trellis of ``values`` (2^L, V).

    Best up to float32 rounding: costs are float32 sums, and near-ties within a few ulps may go
    either way.

    ``overlap`` (B,) int64 constrains the path to be tail-biting through that overlap: the first
    state's top L-KV bits and the last state's low L-KV bits both equal it. Without it both ends
    are free. Only states from position ``keep_from`` on are returned (and back-pointers before it
    are not stored): the first tail-biting pass needs just one state.

    Returns (states (B, T - keep_from) int64, squared error of the path (B,) float32).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError("viterbi takes torch tensors x (B, T, V) and values (2^L, V)")
    with cpu_threads(1) if x.device.type == "cpu" else nullcontext():
        return _viterbi(x, values, kv, overlap=overlap, keep_from=keep_from)


def _viterbi(
    x: torch.Tensor,
    values: torch.Tensor,
    kv: int,
    *,
    overlap: torch.Tensor | None = None,
    keep_from: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    xx = (x * x).sum(-1)  # (B, T): added per group, so costs stay true squared errors

    def dist(t: int, out: torch.Tensor) -> torch.Tensor:
        # ||c||^2 - 2 c.x_t for every state (||x_t||^2 comes with the group minimum): one matmul
        return torch.addmm(c2, x[:, t, :], vt, out=out)

    n_states = 1 << L
    cost = torch.empty(B, n_states, dtype=torch.float32, device=dev)
    nxt = torch.empty_like(cost)
    dist(0, cost).add_(xx[:, :1])
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
        nxt.view(B, G, P).add_(m.add_(xx[:, t : t + 1]).unsqueeze(-1))
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
    return states, best


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
    if x.device.type == "cpu":
        # keep the 2^L-wide cost rows of a chunk in cache (~2 MiB): measured 4x faster at L=16 than
        # chunks sized by memory alone (8 tiles: 71 tiles/s, 192 tiles: 16 tiles/s)
        step = min(step, max(1, _CPU_CACHE_COSTS >> L))
    states = torch.empty(N, T, dtype=torch.int64, device=x.device)
    err = torch.empty(N, dtype=torch.float32, device=x.device)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        states[lo:hi], err[lo:hi] = viterbi_tail_biting(x[lo:hi], values, kv)
        if progress is not None:
            progress(hi - lo)
    return states, err
