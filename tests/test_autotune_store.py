"""The per-GPU autotune store: file format, validation, merge, lookup order, concurrent writers."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import random
import warnings
from pathlib import Path

import pytest
import yaml

from qtip_triton.autotune import store as st
from qtip_triton.autotune.buckets import M_BUCKETS, bucket_for, nearest_buckets, parse_buckets
from qtip_triton.autotune.device import DeviceInfo, SoftwareVersions, check_gpu_name, gpu_short_name
from qtip_triton.autotune.lookup import ConfigStore, shipped_dir
from qtip_triton.autotune.store import AutotuneWarning, Entry, EntryKey, Header, StoreError, TuneFile

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132)
H100_PCIE = DeviceInfo("NVIDIA H100 PCIe", (9, 0), 114)
A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), 108)
VERS = SoftwareVersions("3.6.0", "2.11.0", "0.1.0", "1")
SPECS = ("L16K2V2-hyb9", "L16K3V2-hyb9", "L16K4V2-hyb9", "L16K2V1-1mad")


def random_entry(rng: random.Random, key: EntryKey | None = None) -> Entry:
    key = key or EntryKey(rng.choice(SPECS), 32 * rng.randint(1, 300), 32 * rng.randint(1, 300), rng.choice(M_BUCKETS))
    cfg = {"BLOCK_N": rng.choice([16, 32, 64, 128]), "num_warps": rng.choice([2, 4, 8]), "EVEN": rng.random() < 0.5,
           "variant": rng.choice(["a", "b"])}
    t = rng.uniform(1, 1000)
    return Entry(key, rng.choice(["gemv", "gemm"]), cfg, round(t, 3), rng.choice(["gemv", None]),
                 rng.choice([None, round(t * rng.uniform(1, 2), 3)]))


def random_file(rng: random.Random, n: int, device: DeviceInfo = H100, versions: SoftwareVersions = VERS) -> TuneFile:
    tf = TuneFile(Header(device, versions))
    while len(tf.entries) < n:
        e = random_entry(rng)
        tf.entries[e.key] = e
    return tf


@pytest.fixture
def rng() -> random.Random:
    return random.Random()


# ------------------------------------------------------------------------------------------ buckets
def test_bucket_for_covers_m():
    for M in range(1, 5000):
        b = bucket_for(M)
        assert b in M_BUCKETS
        assert b >= M or b == 4096
        assert b == 1 or b // 2 < M  # the smallest bucket that covers M
    for bad in (0, -3):
        with pytest.raises(ValueError):
            bucket_for(bad)
    with pytest.raises(TypeError):
        bucket_for(2.0)


def test_nearest_buckets():
    assert nearest_buckets(16, [1, 8, 32, 4096]) == [32, 8, 1, 4096]  # tie 8 vs 32 -> larger first
    assert nearest_buckets(3, [1, 2, 64]) == [2, 1, 64]  # 3 is covered by bucket 4
    assert nearest_buckets(5000, [2048, 1]) == [2048, 1]
    assert parse_buckets("1-4096") == M_BUCKETS
    assert parse_buckets("1,16, 64-256") == (1, 16, 64, 128, 256)
    for bad in ("3", "abc", "64-16", "5000-6000"):
        with pytest.raises(ValueError):
            parse_buckets(bad)


def test_gpu_names():
    assert H100.short == "h100" and H100_PCIE.short == "h100-pcie" and A100.short == "a100"
    assert gpu_short_name("NVIDIA H200") == "h200"
    assert gpu_short_name("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert gpu_short_name("NVIDIA H100 NVL") == "h100-nvl"
    assert H100.family == "sm90" == H100_PCIE.family
    check_gpu_name("h100", H100)
    check_gpu_name("NVIDIA H100 80GB HBM3", H100)
    with pytest.raises(ValueError, match="does not match the GPU present"):
        check_gpu_name("h100", H100_PCIE)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        check_gpu_name("h100", None)


# ------------------------------------------------------------------------------------------ format
def test_round_trip(rng, tmp_path):
    tf = random_file(rng, 40)
    path = tmp_path / "h100.yaml"
    st.save_merged(path, tf)
    back = st.load(path)
    assert back.header == tf.header
    assert back.entries == tf.entries
    doc = yaml.safe_load(path.read_text())
    assert doc["device"] == {"name": H100.name, "short": "h100", "compute_capability": [9, 0], "sm_count": 132}
    assert doc["versions"]["triton"] == "3.6.0" and doc["date"]
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed into place


def test_merge_keeps_faster(rng, tmp_path):
    a, b = random_file(rng, 30), random_file(rng, 30)
    shared = list(a.entries)[:10]
    for key in shared:  # same key in both files, random which is faster
        e = random_entry(rng, key)
        b.entries[key] = e
    path = tmp_path / "h100.yaml"
    st.save_merged(path, a)
    merged = st.save_merged(path, b)
    on_disk = st.load(path)
    assert on_disk.entries == merged.entries
    assert set(on_disk.entries) == set(a.entries) | set(b.entries)
    for key, e in on_disk.entries.items():
        times = [f.entries[key].time_us for f in (a, b) if key in f.entries]
        assert e.time_us == min(times)


def test_replace_takes_every_new_entry_and_keeps_the_others(rng, tmp_path):
    a, b = random_file(rng, 30), random_file(rng, 30)
    for key in list(a.entries)[:10]:  # same keys, the new ones slower than those on disk
        b.entries[key] = dataclasses.replace(a.entries[key], time_us=a.entries[key].time_us * 2)
    path = tmp_path / "h100.yaml"
    st.save_merged(path, a)
    merged = st.save_merged(path, b, replace=True)
    assert st.load(path).entries == merged.entries
    assert set(merged.entries) == set(a.entries) | set(b.entries)
    for key, e in merged.entries.items():
        assert e == (b.entries[key] if key in b.entries else a.entries[key])


def _mutations():
    """Each takes a valid document and breaks one field."""
    def entry(doc):
        return doc["entries"][0]

    return {
        "format": lambda d: d.update(format="something-else"),
        "format_version": lambda d: d.update(format_version=99),
        "no_entries": lambda d: d.pop("entries"),
        "entries_not_list": lambda d: d.update(entries={"a": 1}),
        "device_name": lambda d: d["device"].update(name=""),
        "capability": lambda d: d["device"].update(compute_capability=[9]),
        "sm_count": lambda d: d["device"].update(sm_count=-1),
        "versions": lambda d: d["versions"].pop("triton"),
        "spec": lambda d: entry(d).update(spec="L16K2V2-nope"),
        "spec_noncanonical": lambda d: entry(d).update(spec=" L16K2V2-hyb9"),
        "out_features": lambda d: entry(d).update(out_features="4096"),
        "in_features_tile": lambda d: entry(d).update(in_features=4100),
        "m_bucket": lambda d: entry(d).update(m_bucket=3),
        "m_bucket_bool": lambda d: entry(d).update(m_bucket=True),
        "kind": lambda d: entry(d).update(kind="gemv; rm -rf"),
        "config_type": lambda d: entry(d).update(config=[1, 2]),
        "config_value": lambda d: entry(d).update(config={"BLOCK_N": 1.5}),
        "config_key": lambda d: entry(d).update(config={"1bad": 4}),
        "time_negative": lambda d: entry(d).update(time_us=-1.0),
        "time_nan": lambda d: entry(d).update(time_us=float("nan")),
        "default_time": lambda d: entry(d).update(default_time_us="fast"),
        "unknown_field": lambda d: entry(d).update(evil=1),
        "duplicate": lambda d: d["entries"].append(dict(entry(d))),
        "not_mapping": lambda d: d["entries"].__setitem__(0, "x"),
    }


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_corrupt_field_rejected(rng, name):
    doc = st.to_document(random_file(rng, 5))
    st.parse(yaml.safe_load(yaml.safe_dump(doc)))  # valid before the mutation
    _mutations()[name](doc)
    with pytest.raises(StoreError):
        st.parse(yaml.safe_load(yaml.safe_dump(doc)))


@pytest.mark.parametrize("text", ["", "[1, 2", "just a string", "- a\n- b\n", "format: qtip-triton-autotune\n",
                                  "!!python/object/apply:os.system ['true']"])
def test_garbage_rejected(text):
    with pytest.raises(StoreError):
        st.loads(text)


def test_compatibility():
    assert st.compatibility(Header(H100, VERS), H100, VERS)[0] == "exact"
    assert st.compatibility(Header(H100, VERS), H100_PCIE, VERS)[0] == "family"
    status, why = st.compatibility(Header(A100, VERS), H100, VERS)
    assert status is None and why.startswith("foreign")
    newer = SoftwareVersions("3.8.0", "2.14.0", "0.2.0", "1")
    status, why = st.compatibility(Header(H100, VERS), H100, newer)
    assert status is None and "Triton" in why
    status, why = st.compatibility(Header(H100, VERS), H100, SoftwareVersions("3.6.1", "2.11.0", "0.1.0", "2"))
    assert status is None and "kernel config version" in why
    assert st.compatibility(Header(H100, VERS), H100, SoftwareVersions("3.6.1", "2.12", "0.1.1", "1"))[0] == "exact"


# ------------------------------------------------------------------------------------------ lookup order
def _entry(key: EntryKey, kind: str, t: float) -> Entry:
    return Entry(key, kind, {"BLOCK_N": 64}, t, "gemv", t * 1.5)


def _write(path: Path, device: DeviceInfo, entries, versions=VERS) -> None:
    tf = TuneFile(Header(device, versions), {e.key: e for e in entries})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(st.dumps(tf))


def test_lookup_order_and_nearest_bucket(tmp_path):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    k16 = EntryKey("L16K2V2-hyb9", 4096, 4096, 16)
    k64 = EntryKey("L16K2V2-hyb9", 4096, 4096, 64)
    _write(user / "h100.yaml", H100, [_entry(k64, "from_user", 9.0)])
    _write(shipped / "h100.yaml", H100, [_entry(k16, "from_exact", 5.0), _entry(k64, "from_exact", 1.0)])
    _write(shipped / "h200.yaml", DeviceInfo("NVIDIA H200", (9, 0), 132), [_entry(k16, "from_family", 1.0)])
    _write(shipped / "a100.yaml", A100, [_entry(k16, "from_foreign", 1.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other GPUs' shipped files are skipped silently
        store = ConfigStore(H100, VERS, user_dir=user, shipped=shipped)
        got = [(e.kind, e.key.m_bucket) for e, _ in store.candidates("L16K2V2-hyb9", 4096, 4096, 64)]
    # the covering bucket first, in source order (user > exact > family), then the nearest bucket
    assert got == [("from_user", 64), ("from_exact", 64), ("from_exact", 16), ("from_family", 16)]
    got = [(e.kind, e.key.m_bucket) for e, _ in store.candidates("L16K2V2-hyb9", 4096, 4096, 20)]
    assert got[0] == ("from_user", 64)  # M=20 -> bucket 32: 16 and 64 are equally near, the larger wins
    assert [e.key.m_bucket for e, _ in store.candidates("L16K2V2-hyb9", 4096, 4096, 2)][0] == 16
    assert list(store.candidates("L16K2V2-hyb9", 4096, 8192, 2)) == []
    assert list(store.candidates("L16K3V2-hyb9", 4096, 4096, 2)) == []


@pytest.mark.parametrize("problem", ["corrupt", "foreign", "out_of_date"])
def test_bad_file_for_this_gpu_ignored_with_warning(tmp_path, problem):
    shipped = tmp_path / "shipped"
    key = EntryKey("L16K2V2-hyb9", 4096, 4096, 1)
    path = shipped / "h100.yaml"
    if problem == "corrupt":
        _write(path, H100, [_entry(key, "gemv", 2.0)])
        path.write_text(path.read_text().replace("time_us: 2.0", "time_us: -2.0"))
    elif problem == "foreign":
        _write(path, A100, [_entry(key, "gemv", 2.0)])
    else:
        _write(path, H100, [_entry(key, "gemv", 2.0)], SoftwareVersions("3.1.0", "2.4.0", "0.0.1", "1"))
    store = ConfigStore(H100, VERS, user_dir=tmp_path / "none", shipped=shipped)
    with pytest.warns(AutotuneWarning, match="ignoring autotune file .*h100.yaml") as rec:
        assert list(store.candidates("L16K2V2-hyb9", 4096, 4096, 1)) == []
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every lookup
        assert list(store.candidates("L16K2V2-hyb9", 4096, 4096, 1)) == []


def test_shipped_files_are_valid():
    """Every file we ship parses, validates and names the GPU it is for."""
    folder = shipped_dir()
    assert folder.is_dir(), folder
    for path in folder.glob("*.yaml"):
        tf = st.load(path)
        assert tf.header.device.short == path.stem


# ------------------------------------------------------------------------------------------ writing
def test_save_refuses_foreign_and_sets_aside_corrupt(rng, tmp_path):
    path = tmp_path / "h100.yaml"
    st.save_merged(path, random_file(rng, 3, device=A100))
    with pytest.raises(ValueError, match="another GPU"):
        st.save_merged(path, random_file(rng, 3))
    path.write_text("entries: [oops")
    new = random_file(rng, 3)
    with pytest.warns(AutotuneWarning, match="set aside"):
        st.save_merged(path, new)
    assert st.load(path).entries == new.entries
    assert len(list(tmp_path.glob("h100.yaml.bad-*"))) == 1
    # an out-of-date file is replaced, its entries dropped (timed under other software)
    old = random_file(rng, 3, versions=SoftwareVersions("3.1.0", "2.4.0", "0.0.1", "0"))
    path.unlink()
    st.save_merged(path, old)
    with pytest.warns(AutotuneWarning, match="out of date"):
        result = st.save_merged(path, new)
    assert result.entries == new.entries


def _writer(path: str, seed: int, keys: list, out) -> None:
    rng = random.Random(seed)
    mine = TuneFile(Header(H100, VERS))
    for key in keys:
        mine.entries[key] = random_entry(rng, key)
    for chunk in range(0, len(keys), 3):  # many small merges, interleaved with the other writers
        part = TuneFile(mine.header, {k: mine.entries[k] for k in keys[chunk:chunk + 3]})
        st.save_merged(path, part)
    out.put({k: e.time_us for k, e in mine.entries.items()})


def test_concurrent_writers(tmp_path):
    rng = random.Random()
    path = str(tmp_path / "h100.yaml")
    common = [EntryKey("L16K2V2-hyb9", 32 * i, 4096, 1) for i in range(1, 7)]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = []
    for w in range(4):
        own = [EntryKey("L16K3V2-hyb9", 32 * (w + 1), 32 * i, 16) for i in range(1, 10)]
        keys = own + common
        random.Random(w).shuffle(keys)
        procs.append(ctx.Process(target=_writer, args=(path, rng.randrange(1 << 30), keys, out)))
    for p in procs:
        p.start()
    written = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    final = st.load(path)
    expect: dict = {}
    for times in written:
        for k, t in times.items():
            expect[k] = min(t, expect.get(k, float("inf")))
    assert {k: e.time_us for k, e in final.entries.items()} == expect
