"""Fixtures for the vLLM plugin tests (CPU: VLLM_TARGET_DEVICE=cpu, gloo, no engine).

Every module here starts with ``pytest.importorskip("vllm.model_executor")`` so the directory is
skipped cleanly where vLLM is absent.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


@pytest.fixture(scope="session")
def vllm_dist():
    """vLLM's distributed state for one process (TP=1), set up once per session."""
    pytest.importorskip("vllm.model_executor")
    from tests.vllm.harness import init_dist

    stack = init_dist(1)
    yield
    stack.close()


@pytest.fixture(scope="session")
def table() -> torch.Tensor:
    """A HYB table standing in for the k-means one (which takes seconds to build)."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(512, 2, generator=g) * 0.97).half()
