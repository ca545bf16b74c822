"""Kernel speed of a spec vs fp16 on one layer shape (CUDA only; the sweep's optional columns).

The trellis bits do not change the work a kernel does, so the timed weight is random (valid by
construction: any stream words are a tail-biting trellis) and costs no encoding. Each call (the
whole forward: transforms and decode kernel) is captured in a CUDA graph and its replays timed with
L2 flushed, medians, the autotuner's timer: uncaptured, a small layer's time is the host's Python
dispatch, not the GPU's. fp16 ``torch.matmul`` on the same shape, same process, same timer.
"""

from __future__ import annotations

import torch

from qtip_triton.bitstream import get_layout
from qtip_triton.spec import TrellisSpec
from qtip_triton.tables import default_table
from qtip_triton.weight import QuantizedWeight


def cuda_available() -> bool:
    return torch.cuda.is_available()


def random_weight(spec: TrellisSpec, m: int, n: int, layout: str, device: str = "cuda", seed: int = 0) -> QuantizedWeight:
    """A QuantizedWeight with random stream words and ±1 signs: real decode work, no encoding cost."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=gen, dtype=torch.int64)
    trellis = get_layout(layout).pack(words, spec)
    su = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).float()
    sv = (torch.randint(0, 2, (m,), generator=gen) * 2 - 1).float() * 0.02
    table = default_table(spec)
    qw = QuantizedWeight(spec, m, n, trellis, su, sv, table, layout=layout)
    return qw.to(device)


def time_linear(qw: QuantizedWeight, Ms: tuple[int, ...] = (1, 16)) -> dict[str, float]:
    """{'t{M}_us', 'fp16_{M}_us', 'speedup_{M}'} for each M: qtip_triton.linear vs fp16 torch.matmul."""
    from qtip_triton import linear
    from qtip_triton.autotune.tuner import graph_flush_timer

    bench = graph_flush_timer(warmup_ms=5.0, rep_ms=25.0)

    out: dict[str, float] = {}
    dev = qw.device
    w16 = torch.randn(qw.out_features, qw.in_features, device=dev, dtype=torch.float16) * 0.02
    for M in Ms:
        x = torch.randn(M, qw.in_features, device=dev, dtype=torch.float16)
        linear(x, qw)  # compile / warm before timing
        t = bench(lambda x=x: linear(x, qw))
        ref = bench(lambda x=x: torch.matmul(x, w16.t()))
        out[f"t{M}_us"], out[f"fp16_{M}_us"], out[f"speedup_{M}"] = t, ref, ref / t
    return out
