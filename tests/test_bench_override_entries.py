"""bench/override_entries.py: the copy differs from the tuned file in exactly the keys asked, and a key the file
lacks or a malformed override is a clear error."""

from __future__ import annotations

import pytest

from qtip_triton.autotune import store
from qtip_triton.autotune.lookup import shipped_dir
from tests.bench_scripts import load_script

override = load_script("override_entries")
SHIPPED = shipped_dir() / "h100.yaml"


def test_copy_changes_only_the_keys_asked(tmp_path):
    """Values that differ from the shipped entries (whatever the last retune chose), so each override shows."""
    out = tmp_path / "autotune" / "h100.yaml"
    before = store.load(SHIPPED)
    k1 = store.EntryKey("L16K2V2-hyb9", 12288, 4096, 64)
    k2 = store.EntryKey("L16K2V2-hyb9", 22016, 4096, 64)
    st1 = 3 if before.entries[k1].config["STAGES"] == 2 else 2
    st2 = 3 if before.entries[k2].config["STAGES"] == 2 else 2
    table = "shared16" if before.entries[k2].config["table"] == "gather" else "gather"
    assert override.main(["--file", str(SHIPPED), "--out", str(out), "--set", f"L16K2V2-hyb9 12288x4096 64 STAGES={st1}",
                          "--set", f"L16K2V2-hyb9 22016x4096 64 STAGES={st2} table={table}"]) == 0
    after = store.load(out)
    assert after.header == before.header and set(after.entries) == set(before.entries)
    changed = {k for k in before.entries if before.entries[k] != after.entries[k]}
    assert changed == {k1, k2}
    assert dict(after.entries[k1].config) == {**before.entries[k1].config, "STAGES": st1}
    assert dict(after.entries[k2].config) == {**before.entries[k2].config, "STAGES": st2, "table": table}


@pytest.mark.parametrize("text,why", [("L16K2V2-hyb9 1x4096 64 STAGES=2", "has no entry"),
                                      ("L16K2V2-hyb9 12288x4096 64", "expected 'SPEC OUTxIN BUCKET"),
                                      ("L16K2V2-hyb9 12288x4096 64 STAGES", "is not KEY=VALUE")])
def test_bad_overrides_are_clear_errors(tmp_path, text, why):
    with pytest.raises((SystemExit, ValueError), match=why):
        override.main(["--file", str(SHIPPED), "--out", str(tmp_path / "x.yaml"), "--set", text])
    assert not (tmp_path / "x.yaml").exists()
