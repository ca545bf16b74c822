"""A fake kernel package with the autotune contract (no tests here): configs, a launcher that computes
the exact product (so output checks are real), deterministic per-config costs, and injectable failures.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from qtip_triton.autotune.kernel_api import config_key


class CompilationError(Exception):
    """Named like Triton's: the tuner treats it as shape-independent."""


class FakeAPI:
    def __init__(self, broken=(), wrong=(), fast=(), slow=(), seed: int = 0) -> None:
        self.broken = {config_key(c) for c in broken}
        self.slow = {config_key(c) for c in slow}
        self.wrong = {config_key(c) for c in wrong}
        self.fast = {config_key(c) for c in fast}
        self.seed = seed
        self.launches: Counter = Counter()
        self.log: list[tuple] = []  # every launch: (kind, spec name, out_features, in_features, config_key, M)
        self.calls: Counter = Counter()
        self.last = None

    def kinds(self):
        return ("gemv", "gemm")

    def can_implement(self, kind, spec, m, n, M):
        self.calls["can_implement"] += 1
        if kind == "gemv" and M > 16:
            return False, "gemv handles M <= 16"
        return True, None

    def config_space(self, kind, spec, m, n, M):
        self.calls["config_space"] += 1
        if kind == "gemv":
            if M > 16:
                return []
            return [{"BLOCK_N": bn, "SPLIT_K": sk, "num_warps": w}
                    for bn in (16, 32, 64) if m % bn == 0 for sk in (1, 2) for w in (2, 4)]
        return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "num_warps": w}
                for bm in (16, 32, 64, 128) for bn in (32, 64) if m % bn == 0 for w in (4, 8)]

    def default_config(self, kind, spec, m, n, M):
        if kind == "gemv":
            return {"BLOCK_N": 32, "SPLIT_K": 1, "num_warps": 4}
        return {"BLOCK_M": 64 if M >= 64 else 16, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}

    def default_kind(self, spec, m, n, M):
        return "gemv" if M <= 16 else "gemm"

    def cost(self, kind, config, spec_name, m, n, M) -> float:
        """Deterministic pseudo-random time (µs) per (kind, config, task); 'fast' configs win."""
        if config_key(config) in self.fast | self.wrong:
            return 0.5
        if config_key(config) in self.slow:
            return 1000.0
        r = random.Random(f"{self.seed}|{kind}|{config_key(config)}|{spec_name}|{m}|{n}|{M}")
        return round(r.uniform(2.0, 20.0), 3)

    def launch(self, kind, x, prepared, config, bias=None):
        if not isinstance(prepared, FakePrepared):  # like the real kernels: they launch with prepare()'s result
            raise TypeError(f"launch needs the prepared layer, got {type(prepared).__name__}")
        key = config_key(config)
        self.launches[(kind, key)] += 1
        qw = prepared.qw
        self.log.append((kind, qw.spec.name, qw.out_features, qw.in_features, key, x.shape[0]))
        self.last = (kind, dict(config), qw.spec.name, qw.out_features, qw.in_features, x.shape[0])
        if key in self.broken:
            raise CompilationError("out of resources: shared memory")
        y = x.float() @ prepared.dense.t()
        if bias is not None:
            y = y + bias
        if key in self.wrong:
            y = y * 1.5
        return y.to(x.dtype)

    def prepare(self, qw):
        self.calls["prepare"] += 1
        return FakePrepared(qw, qw.dequantize(torch.float32))


class FakePrepared:
    """Stands for the kernel package's repacked weight."""

    def __init__(self, qw, dense: torch.Tensor) -> None:
        self.qw, self.dense = qw, dense


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fake_bench(api: FakeAPI, clock: FakeClock | None = None, seconds_per_bench: float = 1.0):
    """A timer that runs fn once and reports the fake cost of what it launched."""

    def bench(fn):
        fn()
        if clock is not None:
            clock.t += seconds_per_bench
        kind, cfg, spec, m, n, M = api.last
        return api.cost(kind, cfg, spec, m, n, M)

    return bench


BROKEN_FOR_POOL = {"BLOCK_N": 16, "SPLIT_K": 1, "num_warps": 2}


def broken_api() -> FakeAPI:
    """Importable factory for compile-pool worker processes."""
    return FakeAPI(broken=[BROKEN_FOR_POOL])


class BiasRequiredAPI(FakeAPI):
    """Refuses launches without a bias: tells which of the compile pool's groups got a zero bias on every launch."""

    def launch(self, kind, x, prepared, config, bias=None):
        if bias is None:
            raise CompilationError("launched without a bias")
        return super().launch(kind, x, prepared, config, bias)


def bias_required_api() -> FakeAPI:
    """Importable factory for compile-pool worker processes."""
    return BiasRequiredAPI()
