"""Launch one decode-matmul config a few times, for Nsight Compute (GPU).

    ncu --kernel-name regex:kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \
        python bench/ncu_target.py --shape 8192x8192 --K 2 --M 1 --config '{"BLOCK_M": 1, ...}'
    ncu --launch-skip 6 --launch-count 3 ... python bench/ncu_target.py --shape 8192x8192 --M 1 --linear
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import random_weight  # noqa: E402

from qtip_triton import linear  # noqa: E402
from qtip_triton.kernels import _transform_in, decode_matmul, h_dtype, h_order, prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8192x8192")
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--kind", default="gemv")
    ap.add_argument("--config", help="decode kernel config (JSON); required unless --linear")
    ap.add_argument("--linear", action="store_true",
                    help="whole forwards (input transform, decode kernel, output transform) with the shipped config")
    a = ap.parse_args()
    if not a.linear and not a.config:
        ap.error("--config is required without --linear")
    m, n = (int(v) for v in a.shape.split("x"))
    qw = random_weight(m, n, a.K)
    x = torch.randn(a.M, n, device="cuda").half()
    if a.linear:
        for _ in range(4):
            linear(x, qw)
        torch.cuda.synchronize()
        return
    pw = prepare(qw)
    cfg = json.loads(a.config)
    order = h_order(a.kind, [cfg])
    h = _transform_in(pw, x, h_dtype(a.kind, [cfg], x.dtype), a.kind, order)
    for _ in range(4):
        decode_matmul(a.kind, pw, h, cfg, h_order=order)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
