"""The trellis specification: the one value that, with a tile shape, determines a kernel.

A spec is validated once, here, so every later stage (codes, bitstreams, encoder, code generator,
registry) can trust it and never re-check ranges deep inside Triton.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

L_RANGE = (8, 20)
K_RANGE = (1, 8)
V_CHOICES = (1, 2, 4)
TILE = 16
TILE_WEIGHTS = TILE * TILE

_NAME_RE = re.compile(r"^L(\d+)K(\d+)V(\d+)-([a-z0-9]+?)(\d+)?$")


@dataclass(frozen=True)
class TrellisSpec:
    """A bitshift trellis: L state bits, K bits per weight, V weights per state, and a code.

    ``Q`` is the index width of table-lookup codes that hash the state (``hyb``); other codes take
    ``Q=None``.
    """

    L: int
    K: int
    V: int
    code: str
    Q: int | None = None

    def __post_init__(self) -> None:
        from qtip_triton.codes import get_code  # codes import spec; resolve lazily

        for field in ("L", "K", "V"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TrellisSpec.{field} must be an int, got {value!r}")
        if not L_RANGE[0] <= self.L <= L_RANGE[1]:
            raise ValueError(f"TrellisSpec.L={self.L} is out of range: L must be in {L_RANGE[0]}..{L_RANGE[1]}")
        if not K_RANGE[0] <= self.K <= K_RANGE[1]:
            raise ValueError(f"TrellisSpec.K={self.K} is out of range: K must be in {K_RANGE[0]}..{K_RANGE[1]}")
        if self.V not in V_CHOICES:
            raise ValueError(f"TrellisSpec.V={self.V} is not supported: V must be one of {V_CHOICES}")
        if self.K * self.V >= self.L:
            raise ValueError(
                f"TrellisSpec: K*V={self.K * self.V} must be smaller than L={self.L} "
                "(each step shifts in K*V bits of an L-bit state)"
            )
        code = get_code(self.code)  # raises ValueError listing the known codes
        code.validate(self)

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``L16K2V2-hyb9``; :meth:`parse` inverts it."""
        q = "" if self.Q is None else str(self.Q)
        return f"L{self.L}K{self.K}V{self.V}-{self.code}{q}"

    def __str__(self) -> str:
        return self.name

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: a tile of 256 weights is exactly 256*K bits (tables excluded)."""
        return float(self.K)

    @property
    def steps_per_tile(self) -> int:
        """Trellis steps (states) per 16x16 tile."""
        return TILE_WEIGHTS // self.V

    @property
    def bits_per_step(self) -> int:
        return self.K * self.V

    @property
    def words_per_tile(self) -> int:
        """32-bit words holding one tile's 256*K-bit stream."""
        return TILE_WEIGHTS * self.K // 32

    @classmethod
    def parse(cls, name: str) -> TrellisSpec:
        """Build a spec from its canonical name (``L16K2V2-hyb9``, ``L16K3V1-1mad``)."""
        m = _NAME_RE.match(name.strip())
        if m is None:
            raise ValueError(
                f"cannot parse trellis spec name {name!r}: expected e.g. 'L16K2V2-hyb9' or 'L16K2V1-3inst'"
            )
        L, K, V, code, q = m.groups()
        from qtip_triton.codes import CODES

        # Codes whose own name ends in digits (1mad, 3inst do not) would be ambiguous; the regex is
        # non-greedy so 'hyb9' -> ('hyb', '9'). A code name that is itself a prefix match wins.
        if code not in CODES and q is not None and (code + q) in CODES:
            code, q = code + q, None
        return cls(int(L), int(K), int(V), code, None if q is None else int(q))


# Specs of released QTIP checkpoints, for convenience and defaults.
QTIP_RELEASED = tuple(TrellisSpec(16, k, 2, "hyb", 9) for k in (2, 3, 4))
