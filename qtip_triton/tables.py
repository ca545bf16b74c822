"""Default tables for the table codes: HYB's k-means LUT and the research ``lut`` code's random codebook.

After the random Hadamard transform a weight matrix looks like i.i.d. Gaussian data, so the
natural starting table is fit to N(0, I): HYB's 2^Q x V table is the k-means quantizer of V-D
standard normal samples (the QTIP paper's initial LUT), rescaled so its RMS is sqrt(15/16) — the
RMS a 2-bit reconstruction of unit-variance data should have (1 - 2^-4). Both tables are
deterministic functions of the spec and a seed, computed on CPU in float64, so every machine
builds the same bits.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from qtip_triton.codes import get_code
from qtip_triton.spec import TrellisSpec

HYB_TABLE_RMS = math.sqrt(15.0 / 16.0)


def _kmeans(samples: torch.Tensor, k: int, iters: int, gen: torch.Generator, rows_per_chunk: int = 8192) -> torch.Tensor:
    """Lloyd's k-means (float64): centroids (k, D). Empty clusters are re-seeded from the worst-served samples."""
    n = samples.shape[0]
    centroids = samples[torch.randperm(n, generator=gen)[:k]].clone()
    assign = torch.empty(n, dtype=torch.int64)
    err = torch.empty(n, dtype=samples.dtype)
    for _ in range(iters):
        c2 = (centroids * centroids).sum(1)
        for lo in range(0, n, rows_per_chunk):
            chunk = samples[lo : lo + rows_per_chunk]
            d = c2 - 2.0 * chunk @ centroids.t()  # ||x||^2 omitted: same for every centroid
            best, idx = d.min(1)
            assign[lo : lo + rows_per_chunk] = idx
            err[lo : lo + rows_per_chunk] = best + (chunk * chunk).sum(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
        counts = torch.bincount(assign, minlength=k).to(samples.dtype)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1).unsqueeze(1)
        if bool(empty.any()):
            worst = err.argsort(descending=True)[: int(empty.sum())]
            centroids[empty] = samples[worst]
    return centroids


@lru_cache(maxsize=16)
def _kmeans_table_cached(Q: int, V: int, seed: int, samples_per_centroid: int, iters: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = 1 << Q
    samples = torch.randn(k * samples_per_centroid, V, generator=gen, dtype=torch.float64)
    centroids = _kmeans(samples, k, iters, gen)
    centroids *= HYB_TABLE_RMS / centroids.pow(2).mean().sqrt()
    return centroids


def kmeans_table(
    spec: TrellisSpec, *, seed: int = 0, samples_per_centroid: int = 64, iters: int = 25
) -> torch.Tensor:
    """HYB's table: k-means of V-D N(0, I) samples into 2^Q centroids, RMS sqrt(15/16), float16 (2^Q, V).

    float16 because that is how checkpoints store ``tlut`` and what kernels read: the encoder must
    search exactly the values the decoder will produce. Deterministic for a given seed (a few
    seconds on CPU for Q=9).
    """
    if spec.code != "hyb" or spec.Q is None:
        raise ValueError(f"kmeans_table builds tables for the 'hyb' code, got {spec.name}")
    if samples_per_centroid < 2 or iters < 1:
        raise ValueError("kmeans_table needs samples_per_centroid >= 2 and iters >= 1")
    return _kmeans_table_cached(spec.Q, spec.V, seed, samples_per_centroid, iters).to(torch.float16)


def gaussian_lut_table(spec: TrellisSpec, *, seed: int = 0) -> torch.Tensor:
    """The ``lut`` code's default: a random Gaussian codebook (2^L, V) float32, one entry per state.

    A trellis over i.i.d. Gaussian reproduction values is the classical random-coding TCQ, the
    baseline the computed codes imitate; the RMS is fixed at sqrt(15/16) like HYB's table.
    """
    if spec.code != "lut":
        raise ValueError(f"gaussian_lut_table builds tables for the 'lut' code, got {spec.name}")
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(1 << spec.L, spec.V, generator=gen, dtype=torch.float64)
    table *= HYB_TABLE_RMS / table.pow(2).mean().sqrt()
    return table.to(torch.float32)


def default_table(spec: TrellisSpec, *, seed: int = 0) -> torch.Tensor | None:
    """The table ``quantize`` uses when none is given: None for computed codes."""
    code = get_code(spec.code)
    if not code.needs_table:
        return None
    if spec.code == "hyb":
        return kmeans_table(spec, seed=seed)
    if spec.code == "lut":
        return gaussian_lut_table(spec, seed=seed)
    raise ValueError(f"no default table for code {spec.code!r}: pass table=...")
