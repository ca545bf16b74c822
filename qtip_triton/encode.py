"""Quantize a matrix into a trellis-coded :class:`QuantizedWeight` (the research encoder).

Pipeline (format spec §6): random signs SU, SV from a seed; W̃ = M_mᵀ·diag(SV)·W·diag(SU)·M_n makes
the entries look i.i.d. Gaussian; W̃ is scaled to unit RMS times the code's best data scale;
each 16x16 tile, read in the layout's sequence order, is encoded by a tail-biting Viterbi search
(:mod:`qtip_triton.viterbi`); the least-squares reconstruction scale is folded into SV. With a
Hessian, tiles are searched block column by block column with BlockLDLQ feedback
(:mod:`qtip_triton.ldlq`) instead of independently.
"""

from __future__ import annotations

import hashlib
import math

import torch
from tqdm.auto import tqdm

from qtip_triton import hadamard
from qtip_triton.bitstream import get_layout, matrix_to_tiles, tiles_to_matrix, words_from_states
from qtip_triton.codes import all_state_values, get_code
from qtip_triton.ldlq import DEFAULT_DAMP, block_ldl, block_ldlq, check_hessian, transform_hessian
from qtip_triton.spec import TILE, TILE_WEIGHTS, TrellisSpec
from qtip_triton.tables import default_table
from qtip_triton.viterbi import encode_sequences
from qtip_triton.weight import QuantizedWeight

_PROGRESS_MIN_TILES = 256  # below this a bar is noise


# ---------------------------------------------------------------------------------------------
# tiles


def encode_tiles(
    tiles: torch.Tensor,
    spec: TrellisSpec,
    table: torch.Tensor | None = None,
    *,
    values: torch.Tensor | None = None,
    memory_budget: int | None = None,
    progress: bool | tqdm = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail-biting trellis states for tiles (..., 256) given in sequence order.

    Returns (states (..., 256/V) int64, squared error per tile (...)). ``values`` may pass the
    precomputed ``all_state_values(spec, table)``; ``progress`` is a flag or an open tqdm bar.
    """
    if tiles.shape[-1] != TILE_WEIGHTS:
        raise ValueError(f"tiles must hold {TILE_WEIGHTS} values each (last dim), got {tuple(tiles.shape)}")
    if values is None:
        values = all_state_values(spec, None if table is None else table.cpu())
    lead = tiles.shape[:-1]
    x = tiles.reshape(-1, spec.steps_per_tile, spec.V).to(torch.float32)
    n = x.shape[0]
    own_bar = progress is True and n >= _PROGRESS_MIN_TILES
    if own_bar:
        bar = tqdm(total=n, desc=f"viterbi {spec.name}", unit="tile")
    else:
        bar = progress if isinstance(progress, tqdm) else None
    try:
        states, err = encode_sequences(
            x, values.to(x.device), spec.bits_per_step, memory_budget=memory_budget,
            progress=None if bar is None else bar.update,
        )
    finally:
        if own_bar:
            bar.close()
    return states.reshape(*lead, spec.steps_per_tile), err.reshape(lead)


# ---------------------------------------------------------------------------------------------
# the code's best data scale on Gaussian data


def code_rms(spec: TrellisSpec, table: torch.Tensor | None = None) -> float:
    """RMS of the code's values over uniformly random states."""
    return float(all_state_values(spec, table).double().pow(2).mean().sqrt())


def gaussian_mse(
    spec: TrellisSpec,
    table: torch.Tensor | None,
    scale: float,
    *,
    tiles: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
    values: torch.Tensor | None = None,
) -> float:
    """MSE of quantizing i.i.d. N(0,1) data: the tiles hold scale·X, the reconstruction is Ŵ/scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tiles, TILE_WEIGHTS, generator=gen).to(device)
    _, err = encode_tiles(x * scale, spec, table, values=values)
    return float(err.double().sum()) / (scale * scale * x.numel())


_SCALE_CACHE: dict[tuple, tuple[float, float]] = {}


def _table_key(table: torch.Tensor | None) -> str:
    if table is None:
        return "-"
    return hashlib.sha1(table.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def best_data_scale(
    spec: TrellisSpec,
    table: torch.Tensor | None = None,
    *,
    tiles: int = 16,
    seed: int = 0,
    evals: int = 9,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Golden-section search of the data scale α minimizing the Gaussian MSE: (α, MSE at α).

    The starting guess α0 = rms(code)/sqrt(1 - 2^-2K) matches the reconstruction RMS rate-distortion
    theory asks of a K-bit code for unit-variance data; the search covers [0.55·α0, 1.45·α0] (wide:
    a small table at high K wants ~0.7·α0) on a fixed sample (``tiles`` tiles from ``seed``), so the
    result is deterministic. Cached per (spec, table, tiles, seed, evals).
    """
    if evals < 2:
        raise ValueError("best_data_scale needs evals >= 2")
    key = (spec.name, _table_key(table), tiles, seed, evals)
    if key in _SCALE_CACHE:
        return _SCALE_CACHE[key]
    values = all_state_values(spec, None if table is None else table.cpu())
    alpha0 = code_rms(spec, None if table is None else table.cpu()) / math.sqrt(1.0 - 2.0 ** (-2 * spec.K))

    def f(a: float) -> float:
        return gaussian_mse(spec, table, a, tiles=tiles, seed=seed, device=device, values=values)

    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    lo, hi = 0.55 * alpha0, 1.45 * alpha0
    c, d = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(evals - 2):
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - inv_phi * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + inv_phi * (hi - lo)
            fd = f(d)
    result = (c, fc) if fc <= fd else (d, fd)
    _SCALE_CACHE[key] = result
    return result


# ---------------------------------------------------------------------------------------------
# matrices


def random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.float32)


def rotate_weight(W: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """W̃ = M_mᵀ·diag(SV)·W·diag(SU)·M_n (the inverse of QuantizedWeight.dequantize's transforms)."""
    x = hadamard.apply_mt(W * su)  # each row r -> (r ⊙ SU) M_n
    return hadamard.apply_mt((x * sv[:, None]).t().contiguous()).t().contiguous()  # columns: M_mᵀ (SV ⊙ c)


def _resolve_spec(spec: TrellisSpec | str) -> TrellisSpec:
    if isinstance(spec, TrellisSpec):
        return spec
    if isinstance(spec, str):
        return TrellisSpec.parse(spec)
    raise TypeError(f"spec must be a TrellisSpec or a spec name like 'L16K2V2-hyb9', got {type(spec).__name__}")


def _check_weight(W: torch.Tensor) -> tuple[int, int]:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out_features, in_features) matrix, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W must be floating point, got {W.dtype}")
    m, n = W.shape
    if m == 0 or n == 0 or m % TILE or n % TILE:
        raise ValueError(f"W is {m}x{n}: both dims must be positive multiples of {TILE} (the tile size)")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W holds NaN or Inf")
    for side, size in (("out_features", m), ("in_features", n)):
        try:
            hadamard.hadamard_factor(size)
        except ValueError as e:
            raise ValueError(f"W's {side}={size} is unsupported: {e}") from None
    return m, n


def default_layout(spec: TrellisSpec, m: int, n: int) -> str:
    """``qtip`` (the released kernel format) for L=16, V=2 when both dims are multiples of 32, else ``tile``."""
    if spec.L == 16 and spec.V == 2 and m % 32 == 0 and n % 32 == 0:
        return "qtip"
    return "tile"


def quantize(
    W: torch.Tensor,
    spec: TrellisSpec | str,
    *,
    seed: int = 0,
    hessian: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    layout: str | None = None,
    progress: bool = True,
    data_scale: float | None = None,
    hessian_damp: float = DEFAULT_DAMP,
    memory_budget: int | None = None,
) -> QuantizedWeight:
    """Quantize W (out_features x in_features) to a trellis-coded QuantizedWeight on W's device.

    ``seed`` fixes the random signs SU, SV; ``hessian`` (in_features x in_features, the input
    second moment E[xᵀx]) switches to BlockLDLQ; ``table`` overrides the code's default table
    (HYB: :func:`qtip_triton.tables.kmeans_table`); ``layout`` overrides :func:`default_layout`;
    ``data_scale`` overrides the searched best scale of unit-RMS data (:func:`best_data_scale`).
    Deterministic for given inputs and seed. The dense meaning is ``qw.dequantize() ≈ W``.
    """
    spec = _resolve_spec(spec)
    m, n = _check_weight(W)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    code = get_code(spec.code)
    if table is None:
        table = default_table(spec)
    elif not isinstance(table, torch.Tensor):
        raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
    code.check_table(spec, table)
    layout = default_layout(spec, m, n) if layout is None else layout
    lay = get_layout(layout)
    lay.validate(spec, m, n)
    if hessian is not None:
        check_hessian(hessian, n)
    if data_scale is not None and not (isinstance(data_scale, (int, float)) and math.isfinite(data_scale) and data_scale > 0):
        raise ValueError(f"data_scale must be a positive finite number, got {data_scale!r}")

    dev = W.device
    gen = torch.Generator().manual_seed(seed)
    su = random_signs(n, gen).to(dev)
    sv = random_signs(m, gen).to(dev)
    wt = rotate_weight(W.detach().to(torch.float32), su, sv)
    sigma = float(wt.double().pow(2).mean().sqrt())
    if sigma == 0.0:
        raise ValueError("W is all zeros: nothing to quantize")
    table_cpu = None if table is None else table.detach().cpu()
    if data_scale is None:
        data_scale, _ = best_data_scale(spec, table_cpu, device=dev)
    x = wt * (data_scale / sigma)
    values = all_state_values(spec, table_cpu).to(dev)
    order = lay.order().to(dev)
    tm, tn = m // TILE, n // TILE

    bar = tqdm(total=tm * tn, desc=f"quantize {spec.name} {m}x{n}", unit="tile",
               disable=not progress or tm * tn < _PROGRESS_MIN_TILES)
    try:
        if hessian is None:
            states, _ = encode_tiles(matrix_to_tiles(x, order), spec, values=values,
                                     memory_budget=memory_budget, progress=bar)
            recon = _reconstruct(states, values, order)
            h_tilde = None
        else:
            h_tilde = transform_hessian(hessian.to(dev), su)
            lfac, _ = block_ldl(h_tilde, damp=hessian_damp)
            states = torch.empty(tm, tn, spec.steps_per_tile, dtype=torch.int64, device=dev)

            def quantize_block(k: int, target: torch.Tensor) -> torch.Tensor:
                st, _ = encode_tiles(matrix_to_tiles(target, order), spec, values=values,
                                     memory_budget=memory_budget, progress=bar)
                states[:, k : k + 1] = st
                return _reconstruct(st, values, order)

            recon = block_ldlq(x, lfac, quantize_block)
    finally:
        bar.close()

    # Least-squares reconstruction scale (in the Hessian's metric when there is one): never worse
    # than undoing data_scale/sigma, and free, since it folds into SV.
    scale = _ls_scale(wt, recon, h_tilde)
    if not math.isfinite(scale) or scale == 0.0:
        scale = sigma / data_scale
    words = words_from_states(states, spec, check=True)
    trellis = lay.pack(words, spec)
    return QuantizedWeight(
        spec=spec,
        out_features=m,
        in_features=n,
        trellis=trellis,
        SU=su,
        SV=sv * scale,
        table=None if table is None else table.detach().to(dev),
        layout=layout,
    )


def _reconstruct(states: torch.Tensor, values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Code values of states (tm, tn, T) as the (16 tm, 16 tn) matrix Ŵ."""
    v = values[states]  # (tm, tn, T, V)
    return tiles_to_matrix(v.reshape(*states.shape[:2], TILE_WEIGHTS), order)


def _ls_scale(target: torch.Tensor, recon: torch.Tensor, h: torch.Tensor | None) -> float:
    t, r = target.double(), recon.double()
    if h is None:
        return float((t * r).sum() / (r * r).sum())
    rh = r @ h.to(r.device)
    return float((t * rh).sum() / (r * rh).sum())
