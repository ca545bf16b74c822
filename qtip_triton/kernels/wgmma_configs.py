"""Configs of the ``wgmma`` kind (codegen/wgmma.py): when it can run, its heuristic config and its tuned space.

Why a module of its own: the kind runs only on Hopper (sm_90, Gluon's warpgroup MMA), takes a different set of
keys from the Triton kinds (``E``, ``STAGES``, ``WPF``, ``PIPE``; see :mod:`qtip_triton.codegen.wgmma`), and its
limits are shared memory (the x ring plus a shared table) and registers (the accumulators of ``BLOCK_M`` tokens),
not the Triton kinds' block sizes.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Mapping
from typing import Any

from qtip_triton.codes import get_code
from qtip_triton.spec import TILE, TrellisSpec

SMEM_LIMIT = 227 * 1024  # dynamic shared memory one block may opt in to on sm_90
_ONE_WAVE = 96  # programs (output row blocks x k splits x token blocks) that keep the H100's 132 SMs busy
_ALIGN_SLACK = 1024  # the swizzled x tiles' 1 KB alignment


HEURISTIC_ENV = "QTIP_TRITON_WGMMA"  # "1": the heuristic (and so the tuner's reach) takes wgmma for 64 < M <= 512
HEURISTIC_DEFAULT = "1"  # on since its GPU tests passed on the H100 (session 23)


def heuristic_on() -> bool:
    """Whether the untuned heuristic picks this kind on Hopper for 64 < M <= 512 (``QTIP_TRITON_WGMMA``, default
    on; 0 returns those batch sizes to decompress + cuBLAS). Why a switch: a stored (tuned) entry serves the kind
    whatever this says, but the heuristic serves every layer shape no tuned file covers."""
    raw = os.environ.get(HEURISTIC_ENV, HEURISTIC_DEFAULT).strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{HEURISTIC_ENV}={raw!r}: expected 0 or 1")
    return raw == "1"


WS_ENV = "QTIP_TRITON_WGMMA_WS"  # "1": the tuned space has the warp-specialized form (WS) from 256 tokens
WS_DEFAULT = "0"  # off until its GPU tests pass and it is timed: session 25 wrote it with no GPU left to run it on
WS_MAX_M = 2048  # with WS on, the tuner times the kind up to here (one decode per 512 tokens against Ŵ's round trip)


def ws_on() -> bool:
    """Whether the kind's tuned space lists the warp-specialized form (``QTIP_TRITON_WGMMA_WS``, default off). Why a
    switch: a file tuned with it stores WS configs, and the registry serves a stored config only if the space lists
    it, so the space, not just the tuner, follows the switch; it goes on by default once the form is measured."""
    raw = os.environ.get(WS_ENV, WS_DEFAULT).strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{WS_ENV}={raw!r}: expected 0 or 1")
    return raw == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _token_tile(M: int) -> int:
    """Tokens a program of the bucket's whole-batch tile takes: the bucket's power of two, 16 to 256."""
    return min(256, max(16, _next_pow2(M)))


def _programs(m: int, M: int, block_m: int, num_warps: int, split: int) -> int:
    """Programs of a launch: output row blocks (16 rows a warp) x k splits x token blocks."""
    return m // (16 * num_warps) * split * -(-M // block_m)


def available_here() -> bool:
    """Whether this process can run the kind: a Hopper GPU and a Triton with Gluon, not Triton's interpreter (Gluon
    has none)."""
    from qtip_triton.kernels import wgmma
    from qtip_triton.kernels.runners import interpreting

    return not interpreting() and wgmma.available()


@functools.cache
def supported(spec: TrellisSpec) -> tuple[bool, str | None]:
    """Whether the kernel can be generated for ``spec`` in its default layout (QTIP's layout, a code without Triton
    helper functions)."""
    from qtip_triton.codegen.wgmma import emit_wgmma

    try:
        emit_wgmma(spec, {})
    except ValueError as e:
        return False, str(e)
    return True, None


def has_table(spec: TrellisSpec) -> bool:
    return get_code(spec.code).triton_decoder().table == "packed16"


@functools.cache
def table_words(spec: TrellisSpec) -> int:
    """Words of the code table the kernel keeps (0 for a code without one): what the space and the launcher size
    shared memory by. Cached: asked at every launch."""
    from qtip_triton.codegen.emit import table_words as words

    return words(spec) if has_table(spec) else 0


def smem_bytes(config: Mapping[str, Any], words: int) -> int:
    """Shared memory a launch takes: the x ring of STAGES tiles and the tiles a shared table occupies, or the
    scratch ``gl.gather`` stages the table in at each step; the ring's mbarriers; alignment."""
    from qtip_triton.codegen.wgmma import check_config, table_mode, table_slots, warp_specialized
    from qtip_triton.codegen.wgmma_ws import WS_ASTAGES, WS_ROWS

    E, bm, _, stages = check_config(config)
    slots = table_slots(config, words) if words else 0
    gathered = 4 * words if table_mode(config)[0] == "gather" else 0
    if warp_specialized(config):  # its ring of A tiles, and a ready and an empty barrier per slot of each ring
        a_ring = WS_ASTAGES * WS_ROWS * 64 * E * 2
        return (stages + slots) * bm * 64 * E * 2 + a_ring + gathered + 16 * (stages + WS_ASTAGES) + _ALIGN_SLACK
    return (stages + slots) * bm * 64 * E * 2 + gathered + 8 * stages + _ALIGN_SLACK


def can_implement(spec: TrellisSpec, m: int, n: int, M: int) -> tuple[bool, str | None]:
    """Whether the kind can run this layer here: Hopper, a supported spec, 64-row and 64-column multiples."""
    ok, why = supported(spec)
    if not ok:
        return False, why
    if m % 64 or n % 64:
        return False, f"wgmma needs a layer of 64-row and 64-column multiples, got {m}x{n}"
    if not available_here():
        return False, "wgmma needs a Hopper GPU (sm_90) and Triton's Gluon, outside Triton's interpreter"
    return True, None


def _cfg(E: int, bm: int, nw: int, stages: int, split: int, table: str, pipe: int, wpf: int = 1
         ) -> dict[str, Any]:
    return {"E": E, "BLOCK_M": bm, "num_warps": nw, "STAGES": stages, "SPLIT_K": split, "WPF": wpf, "table": table,
            "PIPE": pipe}


def words_ahead(spec: TrellisSpec) -> tuple[int, ...]:
    """The ``WPF`` values (k steps of words loaded ahead) worth a PIPE 1 config for ``spec``: 1, and 2 from K = 3.

    Why (H100, session 25, ``*-session25-wpf2-k{2,4}.md``, decode-matmul alone, E 1, 256 tokens, PIPE 1): at K = 4,
    whose steps load 5 words against K = 2's 3, two steps ahead took 7-9 % off every point (8192^2 M = 256 split 2
    87.9 -> 81.5 µs, M = 512 split 1 132.5 -> 122.5, 28672x8192 M = 256 split 1 263.3 -> 239.9); at K = 2 it was
    0.5-1 % slower, so the K = 2 space is not doubled for it."""
    return (1, 2) if spec.K >= 3 else (1,)


def _fits(cfg: dict[str, Any], n: int, words: int) -> bool:
    """Shared memory fits, and the split leaves whole k steps per program (an even number for PIPE = 1)."""
    steps = n // TILE // (4 * cfg["E"])
    per = steps // cfg["SPLIT_K"]
    if n // TILE % (4 * cfg["E"]) or steps % cfg["SPLIT_K"] or per < 2 or (cfg["PIPE"] and per % 2):
        return False
    return smem_bytes(cfg, words) <= SMEM_LIMIT


def default_config(spec: TrellisSpec, m: int, n: int, M: int) -> dict[str, Any]:
    """The untuned choice: all the batch in one tile up to 256 tokens, so each weight is decoded once per 256 tokens,
    and about one wave of programs.

    Why, from 128 tokens up (H100, session 23, ``*-session23-wgmma-probe-{a,b}.md``, decode-matmul alone against
    fp16): the two-register-set loop (PIPE 1) won at every shape; the best split and warps were those that give
    ~128-224 programs on the 132 SMs: 8192^2 M = 256 split 2 (72.5 µs, 0.90x; split 1 107), 28672x8192 M = 256
    split 1 (219.7, 0.93x; split 2 263), 8192^2 M = 512 split 1 (115.4, 0.85x), 4096x11008 M = 256 one warpgroup,
    split 2 (58.9, 1.02x; two warpgroups 77.4). Up to 64 tokens (session 24, ``*-session24-wgmma-small.md``, 16
    tokens): one warpgroup, E 2, 3 stages, a 16-copy shared table and 4 splits was the best of ten configs at 8192^2
    (32.5 µs, 1.79x) and 28672x8192 (84.4, 2.04x; the shipped gemv 99.3), and at one token; E 4 with two warpgroups,
    session 22's pick on its racy kernel, took 40-42 and 116-122 µs. From 128 tokens at K >= 3 the PIPE 1 configs load
    their words two steps ahead (:func:`words_ahead`)."""
    bm = _token_tile(M)
    words = table_words(spec)
    table = "shared32" if words else "gather"
    if bm <= 64:  # k splits before wide steps: a 4096-row layer has only 32 programs per split
        order = ((2, 4), (2, 2), (1, 4), (2, 1), (1, 2), (1, 1))
        small = "shared16" if words else "gather"
        candidates = [_cfg(E, bm, 4, 3, s, small, 0) for E, s in order]
        candidates += [_cfg(E, bm, 8, 2, s, table, 0) for E, s in ((4, 4), (4, 2), (4, 1))]
    else:
        shapes = [(nw, s) for nw, s in ((8, 1), (8, 2), (4, 2), (8, 4), (4, 4), (4, 8))
                  if _programs(m, M, bm, nw, s) >= _ONE_WAVE]
        shapes = shapes or [(4, 8), (4, 4), (4, 2)]  # small layers: as many programs as there are
        ahead = max(words_ahead(spec))
        candidates = [_cfg(1, bm, nw, st, s, table, pipe, ahead if pipe else 1) for nw, s in shapes for pipe in (1, 0)
                      for st in (4, 3, 2)]
        candidates += [_cfg(1, bm, nw, 2, s, "gather", 0) for s in (1, 2, 4) for nw in (8, 4)]
    for cfg in candidates:
        if _fits(cfg, n, words):
            return cfg
    raise ValueError(f"wgmma has no config for a {m}x{n} layer (too few k steps)")


def _tables(words: int) -> tuple[str, ...]:
    """Table modes a space lists: gathered, or in 16/32 shared copies where the code has a table to copy."""
    return ("gather", "shared16", "shared32") if words else ("gather",)


def config_space(spec: TrellisSpec, m: int, n: int, M: int) -> list[dict[str, Any]]:
    """Configs valid for every M' <= M: tokens per program the bucket's power of two and half of it (16 to 256),
    E 1-4 (E 4 only up to 64 tokens: its 16 A fragments and 128 accumulators per thread at 256 tokens spill),
    one or two warpgroups, 2-4 x tiles in flight, split-K 1-8, the table gathered or in 16/32 shared copies, and
    the one- or two-register-set loop (PIPE), and for PIPE 1 the words one or two steps ahead (:func:`words_ahead`)."""
    top = _token_tile(M)
    words = table_words(spec)
    grid = itertools.product(sorted({top, max(16, top // 2)}), (1, 2, 4), (4, 8), (2, 3, 4), (1, 2, 4, 8), _tables(words),
                             (0, 1), words_ahead(spec))
    configs = (_cfg(E, bm, nw, stages, split, table, pipe, wpf)
               for bm, E, nw, stages, split, table, pipe, wpf in grid if not (E == 4 and bm > 64) and (pipe or wpf == 1))
    return [cfg for cfg in configs if _fits(cfg, n, words)] + ws_space(spec, m, n, M)


def estimated_registers(config: Mapping[str, Any]) -> int:
    """Registers a thread of a one-warpgroup config takes, roughly: the accumulators (``BLOCK_M`` / 2 fp32), the
    decoded A fragments (~52 a step of E) and ~27 of addresses and loop state. Matches the sm_90 compiles of E 1 and
    E 2 at 128 tokens with PIPE 1 (143 and 195, ``bench/sass_count.py``, session 33) and overestimates PIPE 0 and
    fewer tokens (E 2, 64 tokens, PIPE 0: 124 compiled, 163 here), which only makes :func:`occupancy_candidates`
    count fewer programs an SM than it gets."""
    return config["BLOCK_M"] // 2 + 52 * config["E"] + 27


def occupancy_candidates(spec: TrellisSpec, m: int, n: int, M: int, sms: int = 132) -> list[dict[str, Any]]:
    """Configs of the space for the tuner's first round beside the default's neighbours: for each E, the
    one-warpgroup config that keeps the most warps busy in a single wave of resident programs (programs an SM from
    the shared memory a config takes and :func:`estimated_registers`; programs = rows / 64 x split x token
    blocks), the bucket's full token tile, the default's loop form (PIPE) and the 16-copy table.

    Why: the default and its one-knob neighbours differ from these in two or three knobs at once, so a first round
    never timed them, and a later round climbs only through a neighbour that wins on its own. H100, session 31-33: the
    shipped 128-token entries of q/k/v, gate/up and 11008x4096 (8 warps, 4 stages, 32 copies: 128-196 KB) fit one
    program an SM with 86-172 programs, where one warpgroup with 2 stages and 16 copies (64 KB) fits 3."""
    from qtip_triton.kernels.wgmma import programs_per_sm

    words = table_words(spec)
    bm = _token_tile(M)
    pipe = default_config(spec, m, n, M)["PIPE"]
    table = "shared16" if words else "gather"
    best: dict[int, tuple[tuple, dict[str, Any]]] = {}  # E -> (score, config)
    for cfg in config_space(spec, m, n, M):
        if (cfg["num_warps"] != 4 or cfg["BLOCK_M"] != bm or cfg["PIPE"] != pipe or cfg["table"] != table
                or cfg.get("WS") or cfg["WPF"] != (max(words_ahead(spec)) if pipe else 1)):
            continue
        per_sm = programs_per_sm(estimated_registers(cfg), smem_bytes(cfg, words), 4)
        programs = _programs(m, M, bm, 4, cfg["SPLIT_K"])
        if per_sm < 1 or programs > per_sm * sms:  # one wave only: a second one idles most SMs at its end
            continue
        score = (programs * 4 / sms, -cfg["SPLIT_K"], -cfg["STAGES"])  # busy warps an SM; fewer partials, stages
        if cfg["E"] not in best or score > best[cfg["E"]][0]:
            best[cfg["E"]] = (score, cfg)
    return [best[E][1] for E in sorted(best)]


def ws_space(spec: TrellisSpec, m: int, n: int, M: int) -> list[dict[str, Any]]:
    """The warp-specialized form's configs (with :func:`ws_on`, from 256 tokens): E 1, 256 tokens a program at the
    256 bucket and 512 from the 512 bucket up (the point of the form: one decode per 512 tokens; and the tuner starts
    the form's family from its member nearest the register-A default, which must then be a 512-token one), 2-4 x
    tiles, split-K 1-4, the table gathered or in 16/32 shared copies, the next step's words loaded ahead or not.
    ``WS`` is the boolean ``True``, so the tuner gives the form a budget of its own (a family, like the gemv's
    ``mma``), not the leftovers of the register-A kernel's neighbours."""
    if not ws_on() or M < 256:
        return []
    words = table_words(spec)
    out = []
    for bm, stages, split, table, wpf in itertools.product((512,) if M >= 512 else (256,), (2, 3, 4), (1, 2, 4),
                                                           _tables(words), (1, 0)):
        cfg = {"E": 1, "BLOCK_M": bm, "num_warps": 8, "STAGES": stages, "SPLIT_K": split, "WPF": wpf, "table": table,
               "PIPE": 0, "WS": True}
        if _fits(cfg, n, words):
            out.append(cfg)
    return out
