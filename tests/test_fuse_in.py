"""``fuse_in`` gemv (interpreter): each program computes its own slice of the input Hadamard transform, so a
layer at batch 1 needs no input-transform launch. Same numbers as the separate transform; clear errors where
the fused form cannot apply."""

import pytest
import torch

from qtip_triton import QuantizedWeight, TrellisSpec, kernels
from qtip_triton.codegen.emit import default_layout, emit, source_options
from qtip_triton.kernels import runners
from tests.test_weight import random_qweight

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)


def weight(gen, name: str, m: int, n: int, **kw) -> QuantizedWeight:
    spec = TrellisSpec.parse(name)
    return random_qweight(gen, spec, m, n, layout=default_layout(spec), **kw)


@pytest.mark.parametrize("name,m,n,cfg,dtype,tol", [
    ("L16K2V2-hyb9", 32, 2752, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4}, torch.float16, 2e-3),
    ("L16K2V2-hyb9", 32, 4096, {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "table": "shared"},
     torch.float16, 2e-3),
    ("L12K3V1-3inst", 32, 768, {"BLOCK_M": 4, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 4}, torch.bfloat16, 1e-2),
])
def test_fused_input_transform_matches(gen, name, m, n, cfg, dtype, tol):
    qw = weight(gen, name, m, n)
    bias = torch.randn(m, generator=gen).to(dtype)
    for M in (1, 3):
        x = torch.randn(M, n, generator=gen).to(dtype)
        ref = qw.reference_forward(x.double()) + bias.double()
        plain = kernels.launch("gemv", x, qw, cfg, bias)
        fused = kernels.launch("gemv", x, qw, {**cfg, "fuse_in": True}, bias)
        assert fused.dtype == dtype and fused.shape == (M, m)
        assert float((fused.double() - ref).norm() / ref.norm()) < tol
        # the same h up to fp32 summation order: at most a last-bit flip of a few outputs
        assert float((fused.double() - plain.double()).norm() / ref.norm()) < tol / 4


def test_source_option():
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    assert "fuse_in" not in source_options(spec, {"BLOCK_M": 1}, "gemv")  # unchanged source when off
    src = emit(spec, "gemv", {"BLOCK_M": 1, "fuse_in": True})
    assert "from qtip_triton.kernels.hadamard_jit import _split_dot, _split_dot_rhs" in src
    assert "tl.debug_barrier()  # the whole program's h is written before any of it is read" in src
    with pytest.raises(ValueError, match="fuse_in='yes' must be a bool"):
        source_options(spec, {"BLOCK_M": 1, "fuse_in": "yes"}, "gemv")


def test_clear_errors(gen):
    qw = weight(gen, "L16K2V2-hyb9", 32, 2752)
    pw = kernels.prepare(qw)
    x = torch.randn(2, 2752, generator=gen).half()
    h = torch.empty(2, 2752)
    cfg = {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 8, "fuse_in": True}
    with pytest.raises(ValueError, match="takes the natural activations as fuse_x"):
        runners.decode_matmul("gemv", pw, h, cfg, h_order="kernel")
    with pytest.raises(ValueError, match="BLOCK_M <= 4"):
        runners.decode_matmul("gemv", pw, h, {**cfg, "BLOCK_M": 8}, h_order="kernel", fuse_x=x)
    with pytest.raises(ValueError, match="at most 64"):  # one split over 2752 inputs: 172 rows of the 172x16 view
        runners.decode_matmul("gemv", pw, h, {**cfg, "SPLIT_K": 1}, h_order="kernel", fuse_x=x)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        runners.decode_matmul("gemv", pw, h, cfg, h_order="kernel", fuse_x=x.float())
    tp = kernels.prepare(weight(gen, "L16K2V2-hyb9", 32, 2048, rcp=1, tp_rank=2))
    with pytest.raises(ValueError, match="one Hadamard block"):
        runners.decode_matmul("gemv", tp, torch.empty(1, 2048), cfg, h_order="kernel",
                              fuse_x=torch.randn(1, 2048).half())
    small = kernels.prepare(weight(gen, "L16K2V2-hyb9", 32, 128))
    with pytest.raises(ValueError, match="above 128"):
        runners.decode_matmul("gemv", small, torch.empty(1, 128), {**cfg, "BLOCK_K": 32, "SPLIT_K": 1},
                              h_order="kernel", fuse_x=torch.randn(1, 128).half())


def test_shared_table_is_written_after_the_fused_transform():
    """The fused transform's dots use Triton's shared memory, where a ``table: shared`` kernel keeps its code
    table: the table must be written after them (written before, it read back as NaNs on the H200). Checked
    in the generated source, since the interpreter has no shared memory to clobber."""
    spec = TrellisSpec.parse("L16K2V2-hyb9")
    cfg = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "table": "shared"}
    fused = emit(spec, "gemv", {**cfg, "fuse_in": True}).splitlines()
    last_dot = max(i for i, line in enumerate(fused) if "_split_dot" in line and "def " not in line)
    fills = [i for i, line in enumerate(fused) if line.strip().startswith("_fill_table(")]
    assert len(fills) == 1 and fills[0] > last_dot
    plain = emit(spec, "gemv", cfg).splitlines()  # without fuse_in the table is written in the prologue
    assert sum(line.strip().startswith("_fill_table(") for line in plain) == 1
