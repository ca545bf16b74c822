"""Shared fixtures: golden data shipped under tests/data, fresh random generators, device marks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def qtip_golden() -> dict[str, np.ndarray]:
    with np.load(DATA / "qtip_golden.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="session")
def exl3_golden() -> dict[str, np.ndarray]:
    with np.load(DATA / "exl3_golden.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.fixture
def gen() -> torch.Generator:
    """A generator seeded differently on every run: tests see fresh random data."""
    g = torch.Generator()
    g.seed()
    return g


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
