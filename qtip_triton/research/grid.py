"""Sweep grids: parse ``--L 12,16 --K 2,3 --V 1,2 --codes hyb9,1mad,3inst`` into valid trellis specs.

A grid is the cartesian product of its axes. Combinations a code cannot take (1MAD with V=2,
K*V >= L, ...) are skipped with the reason, so one grid can mix codes; a grid with no valid point
at all, or a malformed axis, is a ValueError naming the axis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import product

from qtip_triton.codes import CODES
from qtip_triton.spec import TrellisSpec

_CODE_RE = re.compile(r"^([a-z][a-z0-9]*?)(\d+)?$")


def parse_int_list(text: str, axis: str) -> list[int]:
    """'12,16' -> [12, 16]; ranges 'a-b' are inclusive ('2-4' -> [2, 3, 4]). Duplicates dropped, order kept."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--{axis}: empty list; give comma-separated integers like '2,3'")
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise ValueError(f"--{axis}: {item!r} is not an integer or a range like '2-4'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--{axis}: range {item!r} is empty")
        out += [v for v in range(lo, hi + 1) if v not in out]
    return out


def parse_codes(text: str, qs: list[int]) -> list[tuple[str, int | None]]:
    """'hyb9,1mad' -> [('hyb', 9), ('1mad', None)]; a bare table-hash code ('hyb') takes every Q of ``qs``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("--codes: empty list; give e.g. 'hyb9,1mad,3inst'")
    out: list[tuple[str, int | None]] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in CODES:  # exact name first: '1mad' and '3inst' end in no digits, but be safe
            code, q = item, None
        else:
            m = _CODE_RE.match(item)
            if m is None or m.group(1) not in CODES:
                raise ValueError(f"--codes: unknown code {item!r}; known: {', '.join(sorted(CODES))} (hyb takes Q: hyb9)")
            code, q = m.group(1), None if m.group(2) is None else int(m.group(2))
        if CODES[code].uses_q:
            if q is None:
                out += [(code, qq) for qq in qs if (code, qq) not in out]
                continue
        elif q is not None:
            raise ValueError(f"--codes: code {code!r} takes no Q, got {item!r}")
        if (code, q) not in out:
            out.append((code, q))
    return out


@dataclass
class Grid:
    """The valid specs of a sweep, in a stable order, and the combinations left out with why."""

    specs: list[TrellisSpec]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def build_grid(L: str, K: str, V: str, codes: str, Q: str = "9") -> Grid:
    """Cartesian product of the axes, keeping the combinations that make a valid TrellisSpec."""
    Ls, Ks, Vs = parse_int_list(L, "L"), parse_int_list(K, "K"), parse_int_list(V, "V")
    qs = parse_int_list(Q, "Q")
    code_list = parse_codes(codes, qs)
    specs: list[TrellisSpec] = []
    skipped: list[tuple[str, str]] = []
    for (code, q), l_, k, v in product(code_list, Ls, Ks, Vs):
        label = f"L{l_}K{k}V{v}-{code}{'' if q is None else q}"
        try:
            spec = TrellisSpec(l_, k, v, code, q)
        except ValueError as e:
            skipped.append((label, str(e)))
            continue
        if spec not in specs:
            specs.append(spec)
    if not specs:
        reasons = "; ".join(f"{lab}: {why}" for lab, why in skipped[:4])
        raise ValueError(f"the grid has no valid trellis spec ({reasons})")
    return Grid(specs, skipped)
