"""CPU twin of the GPU test ``test_precompiled_fresh_process_does_not_jit`` (fake kernels, no Triton).

The GPU test holds only if what ``qtip-triton precompile`` compiles covers every kernel variant a
fresh process's ``Registry.prepare`` launches, and every bucket is served from the user cache. Here
the real registry and the real precompile job list run against the fake kernel package: with every
bucket up to max_m tuned (what the GPU test now does) both hold; with the sparse 1/16/256 tuning it
used to do, they do not, whatever the timing (the flake's cause, pinned).
"""

from __future__ import annotations

import torch
from autotune_coverage import buckets_upto, file_plan, precompile_variants, prepare_variants
from test_autotune_fakes import FakeAPI
from test_registry import H100, SPEC, VERS, write
from test_weight import random_qweight

from qtip_triton import registry as reg
from qtip_triton.autotune import store as st
from qtip_triton.autotune.buckets import row_class
from qtip_triton.autotune.kernel_api import config_key
from qtip_triton.autotune.lookup import ConfigStore
from qtip_triton.autotune.store import Entry, EntryKey

SHAPE = (64, 96)
MAX_M = 256


def tuned_entries(buckets):
    """One entry per bucket, each with its own config (gemv up to 16 rows, gemm above), as a tuner might pick."""
    api = FakeAPI()
    out = []
    for i, b in enumerate(buckets):
        kind = "gemv" if b <= 16 else "gemm"
        space = api.config_space(kind, SPEC, *SHAPE, b)
        out.append(Entry(EntryKey(SPEC.name, *SHAPE, b), kind, space[(3 * i + 1) % len(space)], 1.0, kind, 2.0))
    return out


def launched_by_prepare(tmp_path, gen, user, shipped=()):
    """Variants a fresh registry's prepare(max_m=MAX_M) launches (user cache / shipped file entries), and its plan."""
    write(tmp_path / "user" / "h100.yaml", list(user))
    if shipped:
        write(tmp_path / "shipped" / "h100.yaml", list(shipped))
    store = ConfigStore(H100, VERS, user_dir=tmp_path / "user", shipped=tmp_path / "shipped")
    api = FakeAPI()
    seen = set()
    launch = api.launch

    def recording(kind, x, prepared, config, bias=None):
        seen.add((kind, SPEC.name, config_key(config), row_class(x.shape[0]), SHAPE))
        return launch(kind, x, prepared, config, bias)

    api.launch = recording
    prepared = reg.Registry(api, device=H100, store=store).prepare(random_qweight(gen, SPEC, *SHAPE), max_m=MAX_M,
                                                                     dtypes=(torch.float32,))
    return seen, prepared.plan


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
    assert seen <= precompile_variants([tf], FakeAPI())


def test_sparse_buckets_leave_variants_uncompiled(tmp_path, gen):
    seen, plan = launched_by_prepare(tmp_path, gen, tuned_entries([1, 16, 256]))
    tf = st.load(tmp_path / "user" / "h100.yaml")
    missing = seen - precompile_variants([tf], FakeAPI())
    one = file_plan(tf, SPEC.name, SHAPE)[1]
    # bucket 2 borrows bucket 1's config and runs it at M=2: a row class precompile never launched for it
    assert plan[2].source.endswith("(M<=1)")
    assert (one[0], SPEC.name, config_key(one[1]), "other", SHAPE) in missing
    # and a shipped file with bucket 4 answers buckets 2 and 4 ahead of the user cache's neighbours
    _, plan = launched_by_prepare(tmp_path / "with-shipped", gen, tuned_entries([1, 16, 256]),
                                  shipped=tuned_entries([1, 4, 16, 256]))
    assert plan[2].source.startswith("shipped") and plan[4].source.startswith("shipped")
