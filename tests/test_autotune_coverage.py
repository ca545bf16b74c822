"""CPU twin of the GPU test ``test_precompiled_fresh_process_does_not_jit`` (fake kernels, no Triton).

The GPU test holds only if what ``qtip-triton precompile`` compiles covers every kernel variant a
fresh process's ``Registry.prepare`` launches. precompile asks the registry for its plan with the
precompiled file as the only source of entries, so the two agree exactly: here the real registry and
the real precompile plan run against the fake kernel package and their launch logs are compared,
for fully tuned files, sparse ones (buckets that borrow a neighbour's config at their own row counts,
the JIT the GPU test used to hit), rejected entries, disabled kernels and several files.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from autotune_coverage import buckets_upto, file_plan, job_variant, precompile_variants, prepare_variants
from test_autotune_fakes import FakeAPI
from test_registry import H100, SPEC, VERS, write
from test_weight import random_qweight

from qtip_triton import cli
from qtip_triton import registry as reg
from qtip_triton.autotune import cmd_precompile as pc
from qtip_triton.autotune import compile_pool
from qtip_triton.autotune import store as st
from qtip_triton.autotune.buckets import MAX_BUCKET, row_class, warm_rows
from qtip_triton.autotune.compile_pool import make_job
from qtip_triton.autotune.kernel_api import config_key
from qtip_triton.autotune.lookup import ConfigStore
from qtip_triton.autotune.store import AutotuneWarning, Entry, EntryKey
from qtip_triton.autotune.tuner import RandomWorkload
from qtip_triton.spec import TrellisSpec

SHAPE = (64, 96)
MAX_M = 256
SPEC_K4 = TrellisSpec(16, 4, 2, "hyb", 9)


def tuned_entries(buckets, spec=SPEC, shape=SHAPE):
    """One entry per bucket, each with its own config (gemv up to 16 rows, gemm above), as a tuner might pick."""
    api = FakeAPI()
    out = []
    for i, b in enumerate(buckets):
        kind = "gemv" if b <= 16 else "gemm"
        space = api.config_space(kind, spec, *shape, b)
        out.append(Entry(EntryKey(spec.name, *shape, b), kind, space[(3 * i + 1) % len(space)], 1.0, kind, 2.0))
    return out


def launched_by_prepare(tmp_path, gen, user, shipped=()):
    """Variants a fresh registry's prepare(max_m=MAX_M) launches (user cache / shipped file entries), and its plan."""
    write(tmp_path / "user" / "h100.yaml", list(user))
    if shipped:
        write(tmp_path / "shipped" / "h100.yaml", list(shipped))
    store = ConfigStore(H100, VERS, user_dir=tmp_path / "user", shipped=tmp_path / "shipped")
    api = FakeAPI()
    prepared = reg.Registry(api, device=H100, store=store).prepare(random_qweight(gen, SPEC, *SHAPE), max_m=MAX_M,
                                                                     dtypes=(torch.float32,))
    return {log_variant(x) for x in api.log}, prepared.plan


def log_variant(x) -> tuple:
    """FakeAPI.log record -> variant (kind, spec, config, row class, shape)."""
    kind, spec, out_f, in_f, config, M = x
    return kind, spec, config, row_class(M), (out_f, in_f)


def prepare_log(tmp_path, gen, user=(), shipped=(), max_m=MAX_M, disabled=frozenset()):
    """The fake API's launch log of one fresh registry preparing every layer of the files (a model load;
    its warnings about buckets served by the heuristic default are expected here)."""
    if user:
        write(tmp_path / "user" / "h100.yaml", list(user))
    if shipped:
        write(tmp_path / "shipped" / "h100.yaml", list(shipped))
    store = ConfigStore(H100, VERS, user_dir=tmp_path / "user", shipped=tmp_path / "shipped")
    api = FakeAPI()
    r = reg.Registry(api, device=H100, store=store, disabled=disabled)
    layers = sorted({(e.key.spec, e.key.out_features, e.key.in_features) for e in (*user, *shipped)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutotuneWarning)
        for spec, out_f, in_f in layers:
            r.prepare(random_qweight(gen, TrellisSpec.parse(spec), out_f, in_f), max_m=max_m, dtypes=(torch.float32,))
    return api.log


def precompile_log(jobs):
    """The fake API's launch log of the compile pool running precompile's jobs (deduplicated, here)."""
    api = FakeAPI()
    errors = compile_pool.compile_all(jobs, 1, RandomWorkload("cpu", torch.float32), api=api, progress=False,
                                      per_shape=True)
    assert errors == {}
    return api.log


def test_every_bucket_tuned_means_precompile_covers_prepare(tmp_path, gen):
    # a shipped file for the same layer must not answer any bucket: the user cache has them all
    seen, plan = launched_by_prepare(tmp_path, gen, tuned_entries(buckets_upto(MAX_M)),
                                     shipped=tuned_entries([1, 4, 16, 256])[::-1])
    tf = st.load(tmp_path / "user" / "h100.yaml")
    want = file_plan(tf, SPEC.name, SHAPE)
    assert sorted(plan) == sorted(want) == list(buckets_upto(MAX_M))
    for b, sel in plan.items():
        assert sel.source.startswith("user cache") and sel.source.endswith(f"(M<={b})")
        assert (sel.kind, dict(sel.config)) == want[b]
    assert seen == prepare_variants(SPEC.name, SHAPE, want)  # the helper models prepare() exactly
    assert seen == precompile_variants([tf], FakeAPI())


def test_sparse_file_precompiles_the_borrowed_launches(tmp_path, gen):
    """Buckets 1 and 16 only: buckets 2, 4 and 8 borrow them, each at its own row counts, and precompile
    compiles exactly those launches (bucket 2 at M=2 is a variant neither entry's own bucket reaches)."""
    entries = tuned_entries([1, 16])
    write(tmp_path / "t.yaml", entries)
    tf = st.load(tmp_path / "t.yaml")
    (kind1, cfg1), (kind16, cfg16) = file_plan(tf, SPEC.name, SHAPE)[1], file_plan(tf, SPEC.name, SHAPE)[16]
    plan = pc.plan_precompile([("t.yaml", tf)], FakeAPI(), max_m=MAX_M)
    by_bucket = {}
    for launch in plan.launches:
        by_bucket.setdefault(launch.bucket, []).append(launch)
    assert sorted(by_bucket) == list(buckets_upto(MAX_M))
    # nearest present bucket, ties to the larger: 2 -> 1, 4 -> 16 (tie 1/16), 8 -> 16
    borrowed = {2: (1, kind1, cfg1, [2]), 4: (16, kind16, cfg16, [3]), 8: (16, kind16, cfg16, [5])}
    for b, (src, kind, cfg, rows) in borrowed.items():
        assert [lc.origin for lc in by_bucket[b]] == ["borrowed"] * len(rows)
        assert all(lc.source == f"t.yaml (M<={src})" for lc in by_bucket[b])
        assert [lc.job for lc in by_bucket[b]] == [make_job(SPEC, *SHAPE, M, kind, cfg) for M in rows]
        assert all(make_job(SPEC, *SHAPE, M, kind, cfg) in plan.jobs for M in rows)  # the job list has them
    assert {lc.origin for b in (1, 16) for lc in by_bucket[b]} == {"own"}
    # above 16 rows the fake gemv cannot run: the entries are rejected there and the heuristic gemm runs
    assert {lc.origin for b in (32, 64, 128, 256) for lc in by_bucket[b]} == {"default"}
    assert plan.selections == Counter(own=2, borrowed=3, default=4)
    assert any("M buckets 32, 64, 128, 256" in n and "gemv handles M <= 16" in n for n in plan.notes)
    # the variant the entry-by-entry precompile (before) never built is compiled now
    m2 = (kind1, SPEC.name, config_key(cfg1), "other", SHAPE)
    assert m2 not in prepare_variants(SPEC.name, SHAPE, file_plan(tf, SPEC.name, SHAPE))
    assert m2 in {job_variant(j) for j in plan.variants}
    # and it is exactly what a fresh process prepares from that file
    log = prepare_log(tmp_path, gen, user=entries)
    assert Counter(precompile_log(plan.jobs)) == Counter(log)
    assert {log_variant(x) for x in log} == {job_variant(j) for j in plan.jobs}


def _bad(entry, config):
    return Entry(entry.key, entry.kind, config, entry.time_us, entry.default_kind, entry.default_time_us)


def _case(name):
    """(entries, max_m, disabled) of one comparison case."""
    if name == "sparse-1-16":
        return tuned_entries([1, 16]), MAX_M, frozenset()
    if name == "sparse-1-16-256":
        return tuned_entries([1, 16, 256]), MAX_M, frozenset()
    if name == "full-all":
        return tuned_entries(buckets_upto(MAX_BUCKET)), MAX_BUCKET, frozenset()
    if name == "only-4-max-1":  # bucket 1 borrows bucket 4's gemv at M=1
        return tuned_entries([4]), 1, frozenset()
    if name == "max-m-3":  # not a power of two: buckets 1, 2, 4
        return tuned_entries([1, 8, 64]), 3, frozenset()
    if name == "rejected-entry":  # bucket 16's config is not in gemv's space: 16 falls to bucket 4 / 64 / default
        e = tuned_entries([1, 4, 16, 64])
        return [*e[:2], _bad(e[2], {"BLOCK_N": 48, "SPLIT_K": 1, "num_warps": 4}), e[3]], MAX_M, frozenset()
    if name == "gemv-disabled":
        return tuned_entries([1, 2, 16, 128]), MAX_M, frozenset({"gemv"})
    if name == "two-layers-two-specs":
        return ([*tuned_entries([1, 16]), *tuned_entries([2, 32, 256], shape=SHAPE[::-1]),
                 *tuned_entries([1, 8], spec=SPEC_K4)], MAX_M, frozenset())
    raise KeyError(name)


CASES = ["sparse-1-16", "sparse-1-16-256", "full-all", "only-4-max-1", "max-m-3", "rejected-entry", "gemv-disabled",
         "two-layers-two-specs"]


@pytest.mark.parametrize("case", CASES)
def test_precompile_jobs_equal_prepare_launches(tmp_path, gen, case):
    """What precompile launches (its jobs through the compile pool) == what prepare(max_m) launches, per
    (kind, spec, shape, config, M), each exactly once; as sets of variants the jobs equal prepare's."""
    entries, max_m, disabled = _case(case)
    write(tmp_path / "t.yaml", entries)
    tf = st.load(tmp_path / "t.yaml")
    plan = pc.plan_precompile([tf], FakeAPI(), max_m=max_m, disabled=disabled)
    log = prepare_log(tmp_path, gen, shipped=entries, max_m=max_m, disabled=disabled)
    assert log and len(set(log)) == len(log)  # prepare launches each variant once
    assert {log_variant(x) for x in log} == {job_variant(j) for j in plan.jobs}
    assert [(j.kind, j.spec, j.out_features, j.in_features, j.config, j.M) for j in plan.variants] == log
    assert Counter(precompile_log(plan.jobs)) == Counter(log)
    jobs, skipped = pc.jobs_for([tf], FakeAPI(), max_m=max_m, disabled=disabled)  # the old entry point agrees
    assert jobs == plan.jobs and skipped == plan.skipped
    if case == "rejected-entry":
        assert skipped == [f"{entries[2].key}: config {{'BLOCK_N': 48, 'SPLIT_K': 1, 'num_warps': 4}} is not in "
                           "gemv's config space for this shape and M=16"]
    if case == "gemv-disabled":
        assert len(skipped) == 3 and all("disabled by" in s for s in skipped)
        assert {j.kind for j in plan.jobs} == {"gemm"}


def test_several_files_cover_the_registry_lookup_order(tmp_path, gen):
    """Default precompile (every file the registry reads) plans each file on its own; the union covers the
    registry's own order (user cache first, then shipped), where a bucket may come from either file."""
    user, shipped = tuned_entries([1, 16]), tuned_entries([1, 4, 16, 256])
    log = prepare_log(tmp_path, gen, user=user, shipped=shipped)
    write(tmp_path / "u.yaml", user)
    write(tmp_path / "s.yaml", shipped)
    tf_u, tf_s = st.load(tmp_path / "u.yaml"), st.load(tmp_path / "s.yaml")
    plan = pc.plan_precompile([("user", tf_u), ("shipped", tf_s)], FakeAPI(), max_m=MAX_M)
    assert {log_variant(x) for x in log} <= {job_variant(j) for j in plan.jobs}
    cfg4 = file_plan(tf_s, SPEC.name, SHAPE)[4][1]
    assert any(x[4] == config_key(cfg4) for x in log)  # prepare did take bucket 4 from the shipped file
    # (a shipped entry at bucket 4 answers buckets 2 and 4 ahead of the user cache's neighbours)
    _, prepared = launched_by_prepare(tmp_path / "again", gen, user, shipped=shipped)
    assert prepared[2].source.startswith("shipped") and prepared[4].source.startswith("shipped")
    assert prepared[1].source.startswith("user cache") and prepared[8].source.startswith("user cache")
    assert {lc.file for lc in plan.launches} == {"user", "shipped"}


def test_entries_above_max_m_are_noted_not_compiled(tmp_path):
    write(tmp_path / "t.yaml", tuned_entries([1, 16, 512, 4096]))
    tf = st.load(tmp_path / "t.yaml")
    plan = pc.plan_precompile([tf], FakeAPI())  # default max_m: 256
    assert plan.max_m == pc.DEFAULT_MAX_M == 256
    assert max(lc.bucket for lc in plan.launches) == 256
    assert any("2 entries for M buckets 512, 4096 are above --max-m 256" in n for n in plan.notes)
    everything = pc.plan_precompile([tf], FakeAPI(), max_m=MAX_BUCKET)
    assert max(lc.bucket for lc in everything.launches) == MAX_BUCKET
    assert not any("above --max-m" in n for n in everything.notes)


def test_default_max_m_is_the_vllm_warmup_default():
    warmup = pytest.importorskip("qtip_triton.vllm.warmup")
    assert pc.DEFAULT_MAX_M == warmup.DEFAULT_MAX_M


@pytest.mark.parametrize("text, value", [("256", 256), ("3", 3), ("4096", 4096), ("9000", 9000), ("all", 4096),
                                         ("MAX", 4096)])
def test_parse_max_m(text, value):
    assert pc.parse_max_m(text) == value


def test_cli_plans_with_max_m(tmp_path, monkeypatch, capsys):
    """``qtip-triton precompile --file F [--max-m M]`` end to end with the fake kernels (no GPU): the pool gets
    prepare()'s launches for M <= max_m, and the summary counts compiled variants."""
    entries = tuned_entries([1, 16, 1024])
    write(tmp_path / "t.yaml", entries)
    got = {}

    def pool(jobs, workers, workload, *, progress=True, per_shape=False, **kw):
        got["jobs"], got["per_shape"] = list(jobs), per_shape
        return compile_pool.compile_all(jobs, 1, RandomWorkload("cpu", torch.float32), api=FakeAPI(),
                                        progress=False, per_shape=per_shape)

    monkeypatch.setattr(pc, "current_device", lambda: H100)
    monkeypatch.setattr(pc, "load_kernel_api", FakeAPI)
    monkeypatch.setattr(pc, "compile_all", pool)
    tf = st.load(tmp_path / "t.yaml")
    for argv, max_m in (([], 256), (["--max-m", "4"], 4), (["--max-m", "all"], 4096)):
        assert cli.main(["precompile", "--file", str(tmp_path / "t.yaml"), "--no-progress", *argv]) == 0
        out = capsys.readouterr().out
        plan = pc.plan_precompile([tf], FakeAPI(), max_m=max_m, device=H100)
        assert got["jobs"] == plan.jobs and got["per_shape"]
        assert f"precompiled {len(plan.variants)} kernel variants x 1 dtypes into " in out
        assert f"for M <= {max_m} (0 failed, 0 entries skipped)" in out
        assert f"(--max-m {max_m})" in out
    assert max(j.M for j in got["jobs"]) > 512  # 'all' reaches the bucket-1024 entry
    with pytest.raises(SystemExit) as exc:
        cli.main(["precompile", "--file", str(tmp_path / "t.yaml"), "--max-m", "0"])
    assert exc.value.code == 2


def test_shipped_files_with_the_real_kernel_configs():
    """On every shipped file with the real kernels' config spaces (no launch: CPU is enough): precompile still
    compiles every valid entry at its own bucket (what it did before), and only adds launches that borrow a
    neighbour or use the default. The shipped h100.yaml's L16K4V2-hyb9 4096x4096 bucket 2 is one: its bucket-4
    gemv (BLOCK_M=4) is not valid at M<=2, so bucket 1's gemv runs at M=2, a variant bucket 1 never compiles."""
    kernels = pytest.importorskip("qtip_triton.kernels")
    from qtip_triton.autotune.kernel_api import ModuleKernelAPI
    from qtip_triton.autotune.lookup import shipped_dir
    from qtip_triton.autotune.space import check_config

    api = ModuleKernelAPI(kernels)
    files = sorted(shipped_dir().glob("*.yaml"))
    assert files
    for path in files:
        tf = st.load(path)
        plan = pc.plan_precompile([(path.name, tf)], api, max_m=MAX_BUCKET)
        before = {(e.kind, k.spec, config_key(e.config), row_class(rows), (k.out_features, k.in_features))
                  for k, e in tf.entries.items()
                  if check_config(api, e.kind, e.config, TrellisSpec.parse(k.spec), k.out_features, k.in_features,
                                  k.m_bucket)[0]
                  for rows in warm_rows(k.m_bucket)}
        new = {job_variant(j) for j in plan.jobs}
        assert before <= new
        added = new - before
        assert all(any(job_variant(lc.job) == v and lc.origin != "own" for lc in plan.launches) for v in added)
        if path.name != "h100.yaml":
            continue
        key = lambda b: EntryKey("L16K4V2-hyb9", 4096, 4096, b)  # noqa: E731
        one, four = tf.entries.get(key(1)), tf.entries.get(key(4))
        if one is not None and four is not None and four.kind == "gemv" and four.config.get("BLOCK_M") == 4:
            m2 = ("gemv", "L16K4V2-hyb9", config_key(one.config), "other", (4096, 4096))
            assert m2 in added
