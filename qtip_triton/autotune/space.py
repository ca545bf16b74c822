"""Candidate configs for one (spec, layer shape, M bucket): the kernel's config space, pruned.

The kernel package owns validity (``config_space`` lists only configs that compile-and-run for the
shape). This module owns *budget*: it drops candidates that cannot win (row blocks far larger than
the batch, split-K with less than one k-tile per split) and keeps at most ``max_candidates`` per kind,
always including the default and the configs one step away from it, then an even spread of the rest.
Kinds are pruned by batch size: a kind is timed only within two buckets of where the heuristic would
pick it, or in the buckets its kernel package lists for it (``TUNE_RANGES``). It is also the check the registry runs on a stored config before trusting it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from qtip_triton.autotune.buckets import M_BUCKETS
from qtip_triton.autotune.kernel_api import Config, KernelAPI, config_key
from qtip_triton.autotune.store import Entry, EntryKey

_ROW_BLOCK_KEYS = ("BLOCK_M", "BLOCK_SIZE_M")
_SPLIT_KEYS = ("SPLIT_K", "SPLITK")
_K_BLOCK_KEYS = ("BLOCK_K", "BLOCK_SIZE_K")


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def wasteful(config: Mapping[str, Any], in_features: int, M: int) -> str | None:
    """Why this config cannot be the best for the shape (None if it may be)."""
    for key in _ROW_BLOCK_KEYS:
        block = config.get(key)
        if isinstance(block, int) and block > max(16, _next_pow2(M)):
            return f"{key}={block} is larger than needed for M={M}"
    split = next((config[k] for k in _SPLIT_KEYS if isinstance(config.get(k), int)), 1)
    block_k = next((config[k] for k in _K_BLOCK_KEYS if isinstance(config.get(k), int)), 16)
    if split > 1 and in_features // max(block_k, 1) < split:
        return f"split-K {split} leaves less than one k-block of {block_k} per split (in={in_features})"
    return None


def _differing(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def knobs_apart(a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
    """How many knobs two configs of one kind differ in, launch flags (:data:`_LAUNCH_FLAGS`) aside: those are
    timed both ways with every config, so they do not move a config out of a neighbourhood."""
    return sum(1 for k in _differing(a, b) if k not in _LAUNCH_FLAGS)


def prune(space: list[Config], default: Config | None, in_features: int, M: int, max_candidates: int) -> list[Config]:
    """At most ``max_candidates`` configs of ``space``: the default first, then its neighbours (one key
    changed) taking each key in turn, so every knob is explored, then an even spread of the rest."""
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    seen: set[tuple] = set()
    useful: list[Config] = []
    for cfg in space:
        k = config_key(cfg)
        if k not in seen and wasteful(cfg, in_features, M) is None:
            seen.add(k)
            useful.append(cfg)
    chosen: list[Config] = []
    if default is not None and config_key(default) in seen:
        chosen.append(default)
        dkey = config_key(default)
        useful = [c for c in useful if config_key(c) != dkey]
    chosen += neighbours(useful, default, max_candidates - len(chosen)) if default is not None else []
    picked = {config_key(c) for c in chosen}
    far = [c for c in useful if config_key(c) not in picked]
    room = max_candidates - len(chosen)
    if room > 0 and far:
        step = len(far) / room
        picks = sorted({int(i * step) for i in range(room)}) if len(far) > room else range(len(far))
        chosen += [far[i] for i in picks]
    return chosen[:max_candidates]


def neighbours(configs: list[Config], center: Config, limit: int) -> list[Config]:
    """At most ``limit`` of ``configs`` one knob away from ``center``: each knob in turn (round-robin), its
    nearest values first, so that every knob is explored before any is explored far."""
    near: dict[str, list[Config]] = {}
    for c in configs:
        diff = _differing(c, center)
        if len(diff) == 1:
            near.setdefault(diff[0], []).append(c)
    queues = [sorted(v, key=lambda c, k=k: _step(c.get(k), center.get(k))) for k, v in sorted(near.items())]
    out: list[Config] = []
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def refine_candidates(api: KernelAPI, kind: str, center: Config, spec, out_features: int, in_features: int, M: int,
                      tried: Collection[tuple], limit: int, allow_reduced_precision: bool = False) -> list[Config]:
    """Configs of ``kind`` for a tuning round after the first: the untried neighbours of the task's winner
    ``center`` (one knob changed, within its family, nearest values first; :func:`neighbours`), each with its
    launch-flag twins, at most ``limit``. ``tried``: the config keys already timed for the task.

    Why: the first round times the default and a few configs one knob from it (6 of the wgmma kind's 864 at a
    Llama shape), so a config two knobs away is never timed. H100, session 31: at 64 tokens the kind's default
    shape (3 x tiles of 64 tokens, 82 KB of shared memory) fits 2 programs an SM, where 2 stages fit 3; the
    tuner took split 2 from the default's neighbours but never timed split 2 with 2 stages. Climbing from the
    winner, round by round, reaches such a config in a few timings where a wider first round would time
    hundreds."""
    ok, _ = api.can_implement(kind, spec, out_features, in_features, M)
    if not ok:
        return []
    space = api.config_space(kind, spec, out_features, in_features, M)
    if not allow_reduced_precision:
        space = [c for c in space if not reduced_precision(api, c)]
    listed = {config_key(c) for c in space}
    family = _families(space, center)[0][1]
    useful = [c for c in family if wasteful(c, in_features, M) is None]
    done = set(tried)
    fresh = [c for c in useful if any(config_key(t) not in done and config_key(t) in listed for t in _twins(c, None))]
    out: list[Config] = []
    for c in neighbours(fresh, _base(center), len(fresh)):
        out += [t for t in _twins(c, None) if config_key(t) in listed and config_key(t) not in done]
        if len(out) >= limit:
            break
    return out[:limit]


def _step(value: Any, default: Any) -> float:
    """How far a knob moved: log2 ratio for positive ints (block sizes, warps), else 1."""
    if isinstance(value, int) and isinstance(default, int) and value > 0 and default > 0:
        return abs(math.log2(value / default))
    return 1.0


def kinds_in_reach(api: KernelAPI, spec, out_features: int, in_features: int, M: int, reach: int) -> list[str]:
    """Kinds worth timing at bucket M: those the heuristic picks within ``reach`` buckets (x2 each) of M.

    A kind is only a contender near the batch sizes it was designed for (gemv for a handful of rows,
    decompress + cuBLAS for thousands); timing gemv at M=4096 would cost seconds and never win. A kernel package
    may widen that for a kind (``TUNE_RANGES``: the buckets where it is always timed).
    """
    kinds = []
    ranges = getattr(api, "tune_range", None)
    for kind in api.kinds():
        wide = ranges(kind) if ranges is not None else None
        if wide is not None and wide[0] <= M <= wide[1]:
            kinds.append(kind)
            continue
        for step in range(-reach, reach + 1):
            m2 = M * 2 ** step if step >= 0 else M // 2 ** -step
            if m2 < 1 or m2 > M_BUCKETS[-1] * 2:
                continue
            if api.default_kind(spec, out_features, in_features, m2) == kind:
                kinds.append(kind)
                break
    return kinds


def reduced_precision(api: KernelAPI, config: Mapping[str, Any]) -> bool:
    """Whether ``config`` turns on a key the kernel package lists as trading accuracy for speed."""
    keys = getattr(api, "reduced_precision_keys", None)
    return any(config.get(k) for k in (keys() if keys is not None else ()))


def candidates(api: KernelAPI, spec, out_features: int, in_features: int, M: int,
               max_candidates: int, reach: int = 2, allow_reduced_precision: bool = False,
               only: Collection[str] | None = None) -> list[tuple[str, Config]]:
    """``(kind, config)`` candidates for one task: ``max_candidates`` for the heuristic's kind at M,
    ``max(2, max_candidates // 3)`` for every other kind within ``reach`` buckets (see :func:`kinds_in_reach`),
    and as many again for each source variant of a kind (:func:`_families`), in reach or not. Each chosen
    config also brings its launch-flag twins (:data:`_LAUNCH_FLAGS`) where the space lists them.
    Configs of reduced precision (:func:`reduced_precision`) only with ``allow_reduced_precision``.
    ``only``: just these kinds, each in reach and with the main kind's budget (a tune that adds one kind to a
    file, e.g. a new kernel, without paying again for the kinds the file already ranks). A kind's home family also
    gets the kernel package's ``extra_candidates`` (:func:`_extra`), beyond its budget."""
    main = api.default_kind(spec, out_features, in_features, M)
    reachable = kinds_in_reach(api, spec, out_features, in_features, M, reach)
    if main is None or main not in api.kinds():
        reachable = list(api.kinds())  # no heuristic kind: every kind is a contender
    if only is not None:
        reachable = list(only)
    out: list[tuple[str, Config]] = []
    for kind in api.kinds():
        if only is not None and kind not in only:
            continue
        ok, _ = api.can_implement(kind, spec, out_features, in_features, M)
        if not ok:
            continue
        space = api.config_space(kind, spec, out_features, in_features, M)
        if not allow_reduced_precision:
            space = [c for c in space if not reduced_precision(api, c)]
        try:
            default = api.default_config(kind, spec, out_features, in_features, M)
        except (ValueError, TypeError, NotImplementedError):
            default = None
        budget = max_candidates if kind == main or main is None or only is not None else max(2, max_candidates // 3)
        listed = {config_key(c) for c in space}
        for i, (fam_default, fam_space) in enumerate(_families(space, default)):
            # a kind out of reach still has its variants timed where its space lists them (e.g. the
            # gemv's mma configs up to M = 16, where the plain gemv is no contender), not its home family
            if kind not in reachable and i == 0:
                continue
            fam_budget = budget if i == 0 else max(2, budget // 3)
            chosen = prune(fam_space, fam_default, in_features, M, fam_budget)
            if i == 0:
                chosen += _extra(api, kind, spec, out_features, in_features, M, chosen, listed,
                                 allow_reduced_precision)
            for c in chosen:
                out += [(kind, t) for t in _twins(c, default if i == 0 else None) if config_key(t) in listed]
    return out


def _extra(api: KernelAPI, kind: str, spec, out_features: int, in_features: int, M: int, chosen: list[Config],
           listed: set[tuple], allow_reduced_precision: bool) -> list[Config]:
    """The kernel package's extra first-round configs for the task (``extra_candidates``, e.g. the wgmma kind's by
    occupancy) not chosen already: only what its space lists and :func:`wasteful` lets through, flags off."""
    fn = getattr(api, "extra_candidates", None)
    if fn is None:
        return []
    seen = {config_key(_base(c)) for c in chosen}
    out = []
    for c in map(_base, fn(kind, spec, out_features, in_features, M)):
        k = config_key(c)
        if (k in seen or k not in listed or wasteful(c, in_features, M) is not None
                or (reduced_precision(api, c) and not allow_reduced_precision)):
            continue
        seen.add(k)
        out.append(c)
    return out


# boolean options that change how a kernel is launched or finished, not which kernel it is (the in-kernel
# split-K sum). They do not make a family of their own: a family shares its budget out by the knobs that
# shape the decode, and every config chosen is timed with each of these on and off. Why: which one wins
# depends on the config's split (session 13, H200: at 28672x8192 M = 2 the tuned mma gemv at split 8
# without the in-kernel sum left the output transform 31 us of re-reading 8 partials, against 11.5 us
# for one partial at M = 1), and a family of its own got two configs near the heuristic's, not the
# twin of the config that won.
_LAUNCH_FLAGS = frozenset({"split_sum"})


def _flags(config: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(k for k, v in config.items() if v is True)


def _base(config: Mapping[str, Any]) -> Config:
    """The config with its launch flags off (absent)."""
    return {k: v for k, v in config.items() if k not in _LAUNCH_FLAGS}


def _twins(config: Config, default: Config | None) -> list[Config]:
    """``config`` (flags off) and each launch flag on; the default's own flags first when it is this config."""
    base = _base(config)
    twins = [base] + [{**base, flag: True} for flag in sorted(_LAUNCH_FLAGS)]
    if default is not None and config_key(_base(default)) == config_key(base):
        dkey = config_key(default)
        twins.sort(key=lambda c: config_key(c) != dkey)
    return twins


def _families(space: list[Config], default: Config | None) -> list[tuple[Config | None, list[Config]]]:
    """The space, launch flags off, split by source variant (the set of boolean options that are on,
    e.g. ``mma``): the default's family first, then each other with its own centre, the member closest
    to the default.

    Why: a variant differs from the default in several keys at once, so one prune would treat all of
    it as "far" and might time none of it; each family gets its own share of the budget instead."""
    default = _base(default) if default is not None else None
    home = _flags(default) if default is not None else frozenset()
    groups: dict[frozenset[str], list[Config]] = {}
    seen: set[tuple] = set()
    for c in map(_base, space):
        if config_key(c) not in seen:
            seen.add(config_key(c))
            groups.setdefault(_flags(c), []).append(c)
    out: list[tuple[Config | None, list[Config]]] = [(default, groups.pop(home, []))]
    for _, members in sorted(groups.items(), key=lambda kv: sorted(kv[0])):
        centre = members[0] if default is None else min(members, key=lambda c: len(_differing(c, default)))
        out.append((centre, members))
    return out


def check_config(api: KernelAPI, kind: str, config: Mapping[str, Any], spec, out_features: int,
                 in_features: int, M: int) -> tuple[bool, str | None]:
    """Is a stored ``(kind, config)`` usable for this shape and M? ``(ok, reason)`` — never trust a file blindly."""
    if kind not in api.kinds():
        return False, f"kind {kind!r} is not one of the available kernels {api.kinds()}"
    ok, reason = api.can_implement(kind, spec, out_features, in_features, M)
    if not ok:
        return False, f"{kind} cannot run this layer: {reason}"
    space = api.config_space(kind, spec, out_features, in_features, M)
    if config_key(config) not in {config_key(c) for c in space}:
        return False, f"config {dict(config)} is not in {kind}'s config space for this shape and M={M}"
    return True, None


def seeded_candidates(api: KernelAPI, spec, out_features: int, in_features: int, M: int,
                      seed: Mapping[EntryKey, Entry], allow_reduced_precision: bool = False,
                      only: Collection[str] | None = None) -> list[tuple[str, Config]] | None:
    """``(kind, config)`` candidates taken from another tune file's winners (``seed``: its entries by key):
    this task's winner and those of the neighbouring M buckets of the same spec and shape, each with its
    launch-flag twins; only what this GPU's space lists (and, with ``only``, of those kinds).
    None when ``seed`` has no usable winner here (the task then gets the full space).

    Why: a full tune of the shipped set is ~10 000 timings (more than one 10-minute device call); another
    GPU of the same architecture mostly picks among the same few configs, so its winners make a first
    file for a new GPU in a fraction of that, and a full tune can replace it later (``--replace``).
    """
    i = M_BUCKETS.index(M)  # a task's M is a bucket (buckets.parse_buckets)
    near = [M_BUCKETS[j] for j in (i, i - 1, i + 1) if 0 <= j < len(M_BUCKETS)]
    out: list[tuple[str, Config]] = []
    seen: set[tuple] = set()
    for b in near:
        entry = seed.get(EntryKey(spec.name, out_features, in_features, b))
        if entry is None or (only is not None and entry.kind not in only) or not check_config(
                api, entry.kind, _base(entry.config), spec, out_features, in_features, M)[0]:
            continue
        if reduced_precision(api, entry.config) and not allow_reduced_precision:
            continue
        listed = {config_key(c) for c in api.config_space(entry.kind, spec, out_features, in_features, M)}
        for twin in _twins(dict(entry.config), dict(entry.config) if b == M else None):
            key = (entry.kind, config_key(twin))
            if key not in seen and config_key(twin) in listed:
                seen.add(key)
                out.append((entry.kind, twin))
    return out or None
