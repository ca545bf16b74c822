"""The check the decode-variant tests share (CPU interpreter and GPU alike): a config key that changes when the
words are loaded (early words, an L2 prefetch) but not what is computed must give the plain config's partials
bit for bit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from qtip_triton import kernels


def assert_same_partials(kind: str, pw, h: torch.Tensor, cfg: Mapping[str, Any], variants: Iterable[Mapping[str, Any]],
                         *, h_order: str, where: tuple = ()) -> None:
    """``cfg`` with each of ``variants``' keys on gives ``cfg``'s partials on ``h`` bit for bit (``where``: what the
    assertion message names besides the variant)."""
    want = kernels.decode_matmul(kind, pw, h, dict(cfg), h_order=h_order).clone()  # the launcher may reuse its buffer
    for variant in variants:
        got = kernels.decode_matmul(kind, pw, h, {**cfg, **variant}, h_order=h_order)
        assert torch.equal(got, want), (*where, dict(variant))
