"""Triton binary cache export/import (checked against the machine) and the parallel compile pool."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace

import pytest
import torch
from test_autotune_fakes import BROKEN_FOR_POOL, FakeAPI

from qtip_triton.autotune import compile_pool
from qtip_triton.autotune.compile_pool import compile_all, dedupe, make_job, run_jobs
from qtip_triton.autotune.triton_cache import Machine, export_cache, import_cache, read_manifest
from qtip_triton.autotune.tuner import RandomWorkload
from qtip_triton.spec import TrellisSpec

MACHINE = Machine("NVIDIA H100 80GB HBM3", "9.0", 132, "3.6.0", "2.11.0+cu130", "13.0", "0.1.0")


def fake_cache(root, gen):
    files = {}
    for d in range(3):
        for name in ("kernel.cubin", "kernel.json", "__grp__kernel.json"):
            data = bytes(torch.randint(0, 256, (int(torch.randint(1, 300, (1,), generator=gen)),), generator=gen,
                                       dtype=torch.uint8).tolist())
            p = root / f"HASH{d}" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            files[p.relative_to(root).as_posix()] = data
    return files


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_export_import_round_trip(tmp_path, gen):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = fake_cache(src, gen)
    archive = tmp_path / "cache.tar.gz"
    assert export_cache(archive, MACHINE, src) == len(files)
    machine, raw = read_manifest(archive)
    assert machine == MACHINE and raw["files"] == len(files)
    assert import_cache(archive, MACHINE, dst) == len(files)
    assert tree(dst) == files
    assert import_cache(archive, MACHINE, dst) == 0  # already there
    assert not list(dst.rglob("*.tmp"))


@pytest.mark.parametrize("field,value", [("device", "NVIDIA H200"), ("capability", "8.0"), ("triton", "3.8.0"),
                                         ("torch", "2.14.0"), ("cuda", "12.4"), ("package", "0.2.0"),
                                         ("sm_count", 114)])
def test_import_refuses_other_machine(tmp_path, gen, field, value):
    src, dst = tmp_path / "src", tmp_path / "dst"
    fake_cache(src, gen)
    archive = tmp_path / "cache.tar.gz"
    export_cache(archive, MACHINE, src)
    with pytest.raises(ValueError, match=f"refusing to import(.|\n)*{field}: archive has"):
        import_cache(archive, replace(MACHINE, **{field: value}), dst)
    assert not dst.exists() or not any(dst.iterdir())


def _archive(tmp_path, members):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        manifest = json.dumps({"format": "qtip-triton-cache", "format_version": 1,
                               "machine": MACHINE.__dict__}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "outside"])
def test_import_refuses_unsafe_members(tmp_path, kind):
    info = tarfile.TarInfo({"dotdot": "cache/../../escaped", "absolute": "/tmp/escaped",
                            "symlink": "cache/link", "outside": "notcache/file"}[kind])
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        info.size = 1
    archive = _archive(tmp_path, [info])
    with pytest.raises(ValueError, match="unsafe member"):
        import_cache(archive, MACHINE, tmp_path / "dst")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "dst" / "link").exists()


def test_not_an_archive(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="not a qtip-triton cache archive"):
        import_cache(bad, MACHINE, tmp_path / "dst")
    with pytest.raises(FileNotFoundError, match="precompile"):
        export_cache(tmp_path / "out.tar.gz", MACHINE, tmp_path / "empty")


def _jobs():
    spec = TrellisSpec(16, 2, 2, "hyb", 9)
    api = FakeAPI()
    jobs = []
    for M in (1, 2, 4, 16, 32):
        for kind in ("gemv", "gemm"):
            for cfg in api.config_space(kind, spec, 64, 96, M)[:3]:
                jobs.append(make_job(spec, 64, 96, M, kind, cfg))
    return jobs


def test_dedupe_by_variant():
    jobs = _jobs()
    unique = dedupe(jobs)
    # M=2 and M=4 are the same variant ("other"), so are 16 and 32 ("div16"); M=1 is its own
    assert {j.M for j in unique} == {1, 2, 16}
    assert len(unique) == len({(j.kind, j.config, j.M) for j in jobs if j.M in (1, 2, 16)})


def test_dedupe_per_shape_and_deadline():
    spec = TrellisSpec(16, 2, 2, "hyb", 9)
    cfg = FakeAPI().default_config("gemv", spec, 64, 96, 1)
    jobs = [make_job(spec, m, n, M, "gemv", cfg) for m, n in ((64, 96), (96, 64)) for M in (1, 16, 32)]
    assert len(dedupe(jobs)) == 2  # M=1 and M>=16 (div16)
    assert len(dedupe(jobs, per_shape=True)) == 4  # ... on each shape (shape-derived ints are specialized too)
    api = FakeAPI()
    assert compile_all(jobs, 1, RandomWorkload("cpu", torch.float32), api=api, progress=False, deadline_s=0) == {}
    assert sum(api.launches.values()) == 0  # past the deadline nothing is compiled
    compile_all(jobs, 1, RandomWorkload("cpu", torch.float32), api=api, progress=False, per_shape=True)
    assert sum(api.launches.values()) == 4


def test_compile_pool_in_processes():
    jobs = _jobs()
    workload = RandomWorkload("cpu", torch.float32)
    here = run_jobs(dedupe(jobs), FakeAPI(broken=[BROKEN_FOR_POOL]), workload)
    pooled = compile_all(jobs, 2, workload, api_factory="test_autotune_fakes:broken_api", progress=False,
                         start_method="spawn")
    assert here and set(here) == set(pooled)
    assert all(dict(j.config) == BROKEN_FOR_POOL and "CompilationError" in why for j, why in pooled.items())


class ShortOfMemory(RandomWorkload):
    """Builds each layer only after ``fails`` out-of-memory errors for it (the pool's workers on a full GPU)."""

    def __init__(self, fails: int) -> None:
        super().__init__("cpu", torch.float32)
        self.fails, self.builds = fails, []

    def layer(self, spec, out_features, in_features):
        self.builds.append((out_features, in_features))
        if self.builds.count((out_features, in_features)) <= self.fails:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 336.00 MiB")
        return super().layer(spec, out_features, in_features)


def test_pool_retries_a_layer_the_gpu_had_no_memory_for(monkeypatch):
    """Session 31's tuning lost configs of 57344 x 8192 this way: one job ran out of memory building the layer, and
    the layer's next jobs launched with no layer at all (``TypeError: random_input takes the QuantizedWeight``)."""
    monkeypatch.setattr(compile_pool, "OOM_WAIT_S", 0.0)
    jobs = dedupe(_jobs())
    api = FakeAPI()
    workload = ShortOfMemory(fails=2)
    assert run_jobs(jobs, api, workload) == {}
    assert sum(api.launches.values()) == len(jobs)
    assert workload.builds == [(64, 96)] * 3  # built once it fit, then kept for every job of the layer


def test_pool_reports_a_layer_that_never_fits_on_each_job(monkeypatch):
    monkeypatch.setattr(compile_pool, "OOM_WAIT_S", 0.0)
    jobs = dedupe(_jobs())
    api = FakeAPI()
    errors = run_jobs(jobs, api, ShortOfMemory(fails=10 ** 6))
    assert set(errors) == set(jobs) and sum(api.launches.values()) == 0
    assert all(why.startswith("OutOfMemoryError: CUDA out of memory") for why in errors.values())


def test_user_cache_dir_without_platformdirs(monkeypatch):
    """A checkout used through PYTHONPATH on a bare machine may lack platformdirs: fall back to ~/.cache."""
    import builtins
    from pathlib import Path

    from qtip_triton.autotune import lookup

    real_import = builtins.__import__

    def no_platformdirs(name, *args, **kwargs):
        if name == "platformdirs":
            raise ImportError("No module named 'platformdirs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delenv(lookup.CACHE_ENV, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_platformdirs)
    assert lookup.user_cache_dir() == Path.home() / ".cache" / "qtip-triton" / "autotune"
