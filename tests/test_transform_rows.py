"""Warm-up and precompile reach the transforms' own variants: the row counts where a forward's Hadamard
transforms switch kernels inside an M bucket are launched beside the bucket's row classes.

Why: a fresh process on a precompiled cache still compiled 73 files of transform variants in its first
forwards (H100, 2026-12-05, bench/cold_start.py), because one M per row class reached the decode kernel's
variants but not the transforms' (stacked from 128 rows, tall, column split)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from test_registry import H100, VERS, write

from qtip_triton import kernels
from qtip_triton import registry as reg
from qtip_triton.autotune import cmd_precompile as pc
from qtip_triton.autotune import store as st
from qtip_triton.autotune.buckets import bucket_for, bucket_rows, buckets_upto, row_class, warm_rows
from qtip_triton.autotune.kernel_api import config_key, load_kernel_api
from qtip_triton.autotune.lookup import ConfigStore
from qtip_triton.kernels import hadamard, pdl
from qtip_triton.spec import TrellisSpec

SPEC = TrellisSpec(16, 2, 2, "hyb", 9)
LLAMA = [(12288, 4096), (4096, 11008), (28672, 8192)]  # out x in


def transform_key(kind: str, out_f: int, in_f: int, M: int) -> tuple:
    """What picks a transform's compiled variant: M's class, each launch key, and whether fp32 partials of M tokens
    take fp16 dots (the F16 constant: from 8 tokens, inside bucket 8 with 5-7 and in one row class with them)."""
    return (row_class(M), M >= hadamard.F16_ENV_FP32_MIN_TOKENS,
            hadamard.launch_key(in_f, 1, M, transpose=True, dst=kind != "decompress"), hadamard.launch_key(out_f, 1, M))


@pytest.mark.parametrize("kind", ["gemv", "decompress"])
@pytest.mark.parametrize("shape", LLAMA)
def test_every_row_count_meets_a_warmed_variant(kind, shape):
    out_f, in_f = shape
    for b in buckets_upto(512):
        rows = kernels.transform_rows(kind, in_f, out_f, 1, 1, bucket_rows(b)[0], b)
        assert set(rows) <= set(bucket_rows(b))
        keys = [transform_key(kind, out_f, in_f, r) for r in rows]
        assert len(set(keys)) == len(keys), (b, rows)  # one row count per variant, no more
        for M in bucket_rows(b):
            assert transform_key(kind, out_f, in_f, M) in keys, (b, M)


def test_the_transforms_switch_inside_buckets():
    """Not vacuous: at Llama shapes some buckets hold more transform variants than row classes (the stacked
    natural-order input transform starts at 96 rows, inside bucket 128, whose row classes 65 and 80 miss it)."""
    extra = {b: set(kernels.transform_rows("decompress", 4096, 12288, 1, 1, bucket_rows(b)[0], b)) - set(warm_rows(b))
             for b in buckets_upto(256)}
    assert 96 in extra[128]
    assert 8 in extra[8] and row_class(8) == row_class(5)  # the fp16-dot switch of fp32 partials
    assert hadamard.launch_key(4096, 1, 96, transpose=True)[0] == "stacked" != \
        hadamard.launch_key(4096, 1, 95, transpose=True)[0]


def test_switches_flipped_in_process_are_honoured(monkeypatch):
    """The rows follow the transforms' switches as they are now, not as they were at the first call (cached)."""
    default = kernels.transform_rows("decompress", 4096, 12288, 1, 1, 65, 128)
    assert 96 in default  # the stacked natural-order input transform starts there
    monkeypatch.setenv(hadamard.STACK_ENV, "0")  # neither the stacked nor the tall kernel: per-token at 65-128
    monkeypatch.setenv(hadamard.NO_TALL_ENV, "1")
    assert 96 not in kernels.transform_rows("decompress", 4096, 12288, 1, 1, 65, 128)
    monkeypatch.delenv(hadamard.STACK_ENV)
    monkeypatch.delenv(hadamard.NO_TALL_ENV)
    assert kernels.transform_rows("decompress", 4096, 12288, 1, 1, 65, 128) == default


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown kernel kind"):
        kernels.transform_rows("gemx", 4096, 4096, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="lo <= hi"):
        kernels.transform_rows("gemv", 4096, 4096, 1, 1, 5, 4)
    assert kernels.transform_rows("gemv", 4096, 97, 1, 1, 1, 8) == ()  # no Hadamard kernel for 97: reference


def test_registry_launches_cover_every_row_count(tmp_path):
    """prepare()'s launch list (with the layer's geometry) reaches, for every M up to max_m, M's decode
    variant (bucket selection, row class) and M's transform variants."""
    store = ConfigStore(H100, VERS, user_dir=tmp_path / "user", shipped=tmp_path / "shipped")
    r = reg.Registry(load_kernel_api(), device=H100, store=store)
    out_f, in_f = 12288, 4096
    with pytest.warns(st.AutotuneWarning):  # no tuned file: heuristic defaults
        plan = r.plan(SPEC, out_f, in_f, 256)
    launched = {(b, transform_key(sel.kind, out_f, in_f, rows))
                for b, sel, rows in r.launches(plan, reg.LayerGeometry(in_f, out_f))}
    for M in range(1, 257):
        b = bucket_for(M)
        assert (b, transform_key(plan[b].kind, out_f, in_f, M)) in launched, M
    # without the geometry only the row classes are launched (the kernel-agnostic list)
    assert len(r.launches(plan)) < len(r.launches(plan, reg.LayerGeometry(in_f, out_f)))


def test_precompile_keeps_the_transform_rows(tmp_path):
    """precompile's jobs carry the transform row counts, and its per-shape dedupe does not fold them into the
    bucket's row-class job."""
    write(tmp_path / "t.yaml", [st.Entry(st.EntryKey(SPEC.name, 12288, 4096, 128), "decompress", {"BLOCK_N": 64,
                                         "BLOCK_K": 256, "num_warps": 4}, 1.0, "decompress", 1.0)])
    plan = pc.plan_precompile([st.load(tmp_path / "t.yaml")], load_kernel_api(), max_m=128)
    assert {j.M for j in plan.jobs if bucket_for(j.M) == 128} == {65, 80, 96, 97}
    (job,) = [j for j in plan.variants if j.M == 96]  # same config and row class as 80, kept apart
    (job80,) = [j for j in plan.jobs if j.M == 80]
    assert job.variant != job80.variant and job.variant[0] == job80.variant[0] == pdl.launch_side(80)


SHIPPED = Path(kernels.__file__).parents[1] / "autotune_configs"
# layers whose first forwards compiled despite prepare() on the H100 (bench/jit_audit.py, 2026-12-05): buckets
# sharing one config folded by the row class alone (4 and 8: PDL early / exit; 64..256: the stacked transform)
JIT_AUDIT = [("L16K2V2-hyb9", 22016, 4096), ("L16K3V2-hyb9", 4096, 4096), ("L16K2V2-hyb9", 4096, 4096),
             ("L16K4V2-hyb9", 22016, 4096)]


def _shipped_registry(tmp_path):
    store = ConfigStore(H100, VERS, user_dir=tmp_path / "user", shipped=SHIPPED)
    return reg.Registry(load_kernel_api(), device=H100, store=store)


@pytest.mark.parametrize(("spec", "out_f", "in_f"), JIT_AUDIT)
def test_deduplicated_warm_up_reaches_every_batch_size(tmp_path, spec, out_f, in_f, monkeypatch):
    """prepare()'s bookkeeping (warm_key of each launch, skipping keys already warmed) leaves no M up to max_m
    whose launch has a key nobody warmed, with the shipped H100 plan, where buckets share configs."""
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)  # auto: early up to 4 tokens
    r = _shipped_registry(tmp_path)
    ts = TrellisSpec.parse(spec)
    plan = r.plan(ts, out_f, in_f, 256)
    assert all(s.source.startswith("shipped") for s in plan.values())
    geo = reg.LayerGeometry(in_f, out_f)
    layer = SimpleNamespace(spec=ts, out_features=out_f, in_features=in_f)

    def compiled(sel, M):  # what a launch compiles: selection, row class, PDL mode and transform variants
        return (sel.kind, config_key(sel.config), row_class(M),
                *kernels.launch_variant(sel.kind, in_f, out_f, 1, 1, M))

    keys, launched = set(), set()
    for _, sel, rows in r.launches(plan, geo):  # prepare()'s loop: skip a launch whose warm key is done
        key = reg.warm_key(sel, layer, rows, r.launch_variant(sel, rows, geo), "fp16", False)
        if key not in keys:
            keys.add(key)
            launched.add(compiled(sel, rows))
    for M in range(1, 257):
        assert compiled(plan[bucket_for(M)], M) in launched, M


def test_launch_variant_tells_apart_what_the_row_class_folded(tmp_path, monkeypatch):
    """Not vacuous: the two launches the H100 audit found compiling share a config and a row class with a
    launch of another bucket, and differ in their variant (PDL mode; the stacked transform's row class). A tuned
    file may store one config for the buckets of 2 and 8 tokens (the shipped H100 file did for 22016x4096 until its
    2026-12-07 retune), so one selection launched at 2 and at 5 rows stands for that."""
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    r = _shipped_registry(tmp_path)
    plan = r.plan(TrellisSpec.parse("L16K2V2-hyb9"), 22016, 4096, 256)
    geo = reg.LayerGeometry(4096, 22016)
    # one config: the old key folded M = 5 (PDL exit) into M = 2 (early)
    assert row_class(2) == row_class(5) and r.launch_variant(plan[2], 2, geo) != r.launch_variant(plan[2], 5, geo)
    # one decompress config at 40 and 200 rows (one row class; a tuned file may store it for both buckets): the
    # stacked input transform takes only the second
    assert row_class(40) == row_class(200) and hadamard.launch_key(4096, 1, 200, transpose=True) == ("stacked", 32, "other")
    assert hadamard.launch_key(4096, 1, 40, transpose=True)[0] != "stacked"
    assert kernels.launch_variant("decompress", 4096, 4096, 1, 1, 40) != kernels.launch_variant(
        "decompress", 4096, 4096, 1, 1, 200)


def test_launch_variant_follows_the_pdl_switch(monkeypatch):
    monkeypatch.setenv(pdl.PDL_ENV, "exit")
    assert kernels.launch_variant("gemv", 4096, 4096, 1, 1, 3)[0] == kernels.launch_variant("gemv", 4096, 4096, 1, 1,
                                                                                              5)[0] == 1
    monkeypatch.setenv(pdl.PDL_ENV, "auto")
    assert kernels.launch_variant("gemv", 4096, 4096, 1, 1, 4)[0] == 2
    assert kernels.launch_variant("gemv", 4096, 4096, 1, 1, 5)[0] == 1
    with pytest.raises(ValueError, match="unknown kernel kind"):
        kernels.launch_variant("gemx", 4096, 4096, 1, 1, 1)
    with pytest.raises(ValueError, match="rows >= 1"):
        kernels.launch_variant("gemv", 4096, 4096, 1, 1, 0)
    assert kernels.launch_variant("gemv", 4096, 97, 1, 1, 3) == (2,)  # reference transforms: only the PDL mode


def test_pinned_switches_read_the_environment_once_per_block(monkeypatch):
    """Inside the block every launch-choice query sees one snapshot (read once, nested blocks included); outside
    it each query reads the environment again, so a benchmark that flips a switch between engines still sees it."""
    reads = []
    real = kernels._read_switches
    monkeypatch.setattr(kernels, "_read_switches", lambda: reads.append(1) or real())
    monkeypatch.delenv("QTIP_TRITON_PROBE_SWITCH", raising=False)
    with kernels.pinned_switches():
        before = kernels._switches()
        monkeypatch.setenv("QTIP_TRITON_PROBE_SWITCH", "1")
        with kernels.pinned_switches():
            assert kernels._switches() == before
        assert kernels._switches() == before and len(reads) == 1
    assert ("QTIP_TRITON_PROBE_SWITCH", "1") in kernels._switches() and len(reads) == 2
