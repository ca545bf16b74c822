"""Batch-size (M) buckets: the tuner measures one M per bucket and serving looks the bucket up.

Buckets are powers of two from 1 to 4096. A batch of M rows uses the bucket that *covers* it (the
smallest bucket >= M), so a config tuned for bucket B has been shown to handle B rows and every
smaller M in (B/2, B] is served by a kernel sized for at least M rows. Larger M clamp to 4096.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

M_BUCKETS: tuple[int, ...] = tuple(1 << i for i in range(13))  # 1 .. 4096
MAX_BUCKET = M_BUCKETS[-1]


def _check_m(M: object) -> int:
    if isinstance(M, bool) or not isinstance(M, int):
        raise TypeError(f"M (rows of x) must be an int, got {type(M).__name__}")
    if M < 1:
        raise ValueError(f"M (rows of x) must be >= 1, got {M}")
    return M


def bucket_for(M: int) -> int:
    """The bucket covering M rows: the smallest power of two >= M, at most 4096.

    Cheap (one ``bit_length``) because it runs on every forward call.
    """
    _check_m(M)
    return min(1 << (M - 1).bit_length(), MAX_BUCKET)


def buckets_upto(max_m: int) -> tuple[int, ...]:
    """Every bucket a batch of at most ``max_m`` rows can land in: 1, 2, 4, ... up to ``bucket_for(max_m)``
    (what ``Registry.prepare(max_m=...)`` selects and warms; ``max_m`` above 4096 means every bucket)."""
    top = bucket_for(max_m)
    return tuple(b for b in M_BUCKETS if b <= top)


def nearest_buckets(M: int, available: Iterable[int]) -> list[int]:
    """``available`` buckets ordered from nearest to farthest from ``bucket_for(M)`` (log2 distance).

    Ties go to the larger bucket: a config tuned for more rows is the safer stand-in.
    """
    target = math.log2(bucket_for(M))
    return sorted(set(available), key=lambda b: (abs(math.log2(b) - target), -b))


def parse_buckets(text: str) -> tuple[int, ...]:
    """Parse ``"1-4096"`` (every bucket in the range), ``"1,16,256"`` or a mix; each must be a bucket."""
    chosen: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
        except ValueError:
            raise ValueError(f"bad M bucket list {text!r}: expected e.g. '1-4096' or '1,16,256'") from None
        if not sep and lo not in M_BUCKETS:
            raise ValueError(f"M bucket {lo} is not one of {M_BUCKETS}")
        if lo > hi:
            raise ValueError(f"bad M bucket range {part!r}: {lo} > {hi}")
        chosen.update(b for b in M_BUCKETS if lo <= b <= hi)
    if not chosen:
        raise ValueError(f"M bucket list {text!r} selects no bucket of {M_BUCKETS}")
    return tuple(sorted(chosen))


def row_class(rows: int) -> str:
    """The class of an integer argument Triton compiles a separate variant for: ``== 1``, a multiple of 16, other."""
    return "one" if rows == 1 else ("div16" if rows % 16 == 0 else "other")


def bucket_rows(bucket: int) -> range:
    """The row counts a bucket serves: (bucket/2, bucket] (bucket 1 and 2: themselves). The last bucket also
    serves every M above it (:func:`bucket_for` caps at 4096); warm-ups stop at the bucket itself."""
    return range(bucket, bucket + 1) if bucket <= 2 else range(bucket // 2 + 1, bucket + 1)


def warm_rows(bucket: int) -> tuple[int, ...]:
    """Row counts that reach every compiled variant a bucket can hit: one M of each :func:`row_class`
    present in (bucket/2, bucket], the smallest (cheapest to launch)."""
    if bucket <= 2:
        return (bucket,)
    lo = bucket_rows(bucket).start
    first16 = -(-lo // 16) * 16
    return (lo, first16) if first16 <= bucket else (lo,)


INTERIOR_FROM = 64  # buckets from here on are also timed inside their range with ``autotune --interior-rows``


def interior_rows(bucket: int) -> tuple[int, ...]:
    """The row counts ``autotune --interior-rows`` times a bucket's candidates at: its top and 5/8 of it from
    ``INTERIOR_FROM`` rows on (256 -> 160), else the top alone.

    Why: a bucket serves every M in (bucket/2, bucket], but the tuner timed its top alone, where every tile of
    a tensor-core kernel is full. In session 40 the 256-token wgmma entries of 4 warps ran 1.6x slower at 160
    tokens than at 256 (TMA boxes past h's end, since fixed), which a top-only tune could not see; ranking by
    the mean over both counts favours configs that hold up between the buckets' tops."""
    return (bucket,) if bucket < INTERIOR_FROM else (bucket, bucket * 5 // 8)
