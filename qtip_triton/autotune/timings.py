"""What a tuning run timed, beyond the winners it writes: every candidate's time and every failure, per task.

Why: a tune file keeps one config per task, so when a later measurement finds a faster config the file lacks, the
file cannot say whether the tuner timed it (and measured it slower), lost it to a failure, or never reached it.
H100, 2026-12-07: the 256-token 11008x4096 entry of a retune decoded in 70.2 µs where an earlier entry's config
(two warpgroups, 32 table copies) had taken 58.4, and nothing in the run's log told which of the three happened.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from qtip_triton.autotune.tuner import TaskResult, TuneReport

FORMAT = "qtip-triton-autotune-timings"


def task_record(res: TaskResult) -> dict[str, Any]:
    """One task: its key, its winner, each candidate's fastest time (µs, fastest first), its failures."""
    k = res.task.key
    return {
        "spec": k.spec, "out_features": k.out_features, "in_features": k.in_features, "m_bucket": k.m_bucket,
        "winner": None if res.kind is None else {"kind": res.kind, "config": dict(res.config or {}),
                                                 "time_us": res.time_us},
        "default": None if res.default_kind is None else {"kind": res.default_kind, "time_us": res.default_time_us},
        "timed": [{"kind": kind, "config": dict(cfg), "time_us": round(t, 3)} for t, kind, cfg in res.fastest_timings()],
        "failures": [{"kind": kind, "config": dict(cfg), "reason": why} for kind, cfg, why in res.failures],
        "screened": res.screened,
    }


def timings_document(report: TuneReport, device: str) -> dict[str, Any]:
    """The whole run as one JSON-able document (``autotune --timings``)."""
    return {"format": FORMAT, "device": device, "elapsed_s": round(report.elapsed_s, 1),
            "tasks": [task_record(r) for r in report.results],
            "skipped": [str(t.key) for t in report.skipped]}


def failure_lines(results: Iterable[TaskResult], shown: int = 3) -> list[str]:
    """Candidates the timing loop dropped for an error (a compile error there, a failed launch, a wrong result), by
    the error's first word, with an example of the most common ones.

    Why: a failure drops a config from its task with no trace in the file, and a whole family failing (a launch out
    of shared memory, a check failing at one shape) skews what the file ships as much as a compile failure does."""
    reasons: Counter = Counter()
    examples: dict[str, str] = {}
    for r in results:
        for kind, cfg, why in r.failures:
            head = why.split(":")[0]
            reasons[head] += 1
            k = r.task.key
            examples.setdefault(head, f"{kind} {k.spec} {k.out_features}x{k.in_features} M={k.m_bucket} "
                                      f"{dict(cfg)}: {why[:200]}")
    if not reasons:
        return []
    total = sum(reasons.values())
    lines = [f"{total} candidates failed when timed: "
             + ", ".join(f"{head} {n}" for head, n in reasons.most_common())]
    lines += [f"  e.g. {examples[head]}" for head, _ in reasons.most_common(shown)]
    return lines
