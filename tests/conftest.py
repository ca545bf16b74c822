"""Shared fixtures: golden data shipped under tests/data, fresh random generators, device marks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# Triton chooses interpreter or compiled mode when a kernel is decorated, i.e. at its module's first import. Import
# the kernel modules now, under the session's TRITON_INTERPRET: a test that unsets it (test_pdl, test_info) and
# happens to run first in a worker would otherwise leave them compiled for a GPU this machine does not have.
import qtip_triton.kernels  # noqa: E402,F401

DATA = Path(__file__).parent / "data"
VLLM_ENGINE_FILES = {"test_e2e_tp.py"}  # outside tests/vllm, yet starting vLLM engines (bench/e2e_tp.py)


@pytest.fixture(scope="session")
def qtip_golden() -> dict[str, np.ndarray]:
    with np.load(DATA / "qtip_golden.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="session")
def tp2_ranks():
    """Two vLLM tensor-parallel ranks (gloo) started once for the session's TP=2 model tests.

    Every test that uses them is in the "vllm" xdist group, so one worker starts them once.
    """
    pytest.importorskip("vllm.model_executor")
    from tests.vllm.harness import TPRanks

    ranks = TPRanks(2)
    yield ranks
    ranks.close()


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
    # under `pytest -n N --dist loadgroup` (make test) one worker runs every test that starts vLLM engines,
    # one after another: two engines (tensor-parallel ones start several processes) never run side by side
    for item in items:
        path = Path(str(item.fspath))
        if "vllm" in path.parts or path.name in VLLM_ENGINE_FILES:
            item.add_marker(pytest.mark.xdist_group("vllm"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
