"""GPU tests of the ``fuse_in`` gemv (each program computes its slice of the input transform, then a CTA
barrier; programs of one k split write the same values) at Llama shapes (run on the device: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import kernels
from tests.gpu.test_kernels_gpu import TOL, reference, rel, weight

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m,n", [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)])
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fuse_in_matches_reference(m, n, M, dtype):
    qw, w64 = weight(m, n, 2)
    cfg = dict(kernels.default_config("gemv", qw.spec, m, n, min(M, 2), mma=False))  # fuse_in: CUDA-core gemv
    cfg.update(BLOCK_M=min(M, 4), SPLIT_K=max(cfg["SPLIT_K"], 8), fuse_in=True, num_stages=1)
    x = torch.randn(M, n, device="cuda").to(dtype)
    for _ in range(3):  # repeated launches: a race on the scratch would show as a wrong run
        y = kernels.launch("gemv", x, qw, cfg)
        assert rel(y, reference(qw, w64, x)) <= TOL[dtype]
