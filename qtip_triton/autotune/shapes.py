"""Layer shapes (out_features x in_features) the shipped autotune files cover.

Each model lists its linear layers as served: separate q/k/v and gate/up (QTIP checkpoints store them
apart) and the fused qkv / gate-up shapes a serving engine concatenates them into. Shapes repeat across
models (Llama-3-70B = Llama-2-70B; o_proj = q_proj), so the tuner dedupes before measuring.
"""

from __future__ import annotations

import re


def _llama(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "qkv_proj": (hidden + 2 * kv, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "gate_up_proj": (2 * intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }


MODELS: dict[str, dict[str, tuple[int, int]]] = {
    "llama2-7b": _llama(4096, 11008, 32, 32),
    "llama2-13b": _llama(5120, 13824, 40, 40),
    "llama2-70b": _llama(8192, 28672, 64, 8),
    "llama3-8b": _llama(4096, 14336, 32, 8),
    "llama3-70b": _llama(8192, 28672, 64, 8),
}

# Named sets accepted by `--shapes`
SETS: dict[str, tuple[str, ...]] = {
    "llama": ("llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b"),
    "llama2": ("llama2-7b", "llama2-13b", "llama2-70b"),
    "llama3": ("llama3-8b", "llama3-70b"),
}

_SHAPE_RE = re.compile(r"^(\d+)x(\d+)$")


def resolve(names: list[str] | tuple[str, ...]) -> list[tuple[int, int]]:
    """Unique (out, in) shapes for a mix of set names, model names and explicit ``OUTxIN`` shapes.

    Ordered small to large, so a run cut short by its time limit has covered the most shapes.
    """
    shapes: set[tuple[int, int]] = set()
    for name in names:
        key = name.strip().lower()
        m = _SHAPE_RE.match(key)
        if m:
            out_f, in_f = int(m.group(1)), int(m.group(2))
            if out_f % 32 or in_f % 32 or not out_f or not in_f:
                raise ValueError(f"shape {name!r}: out and in features must be positive multiples of 32")
            shapes.add((out_f, in_f))
        elif key in SETS:
            shapes.update(s for model in SETS[key] for s in MODELS[model].values())
        elif key in MODELS:
            shapes.update(MODELS[key].values())
        else:
            known = sorted(SETS) + sorted(MODELS)
            raise ValueError(f"unknown shape set {name!r}: use one of {known} or an explicit OUTxIN like 4096x4096")
    return sorted(shapes, key=lambda s: (s[0] * s[1], s))
