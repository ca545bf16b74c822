"""A copy of a tuned file with some entries' config keys changed, to time a config inside a whole layer before any
tune picks it (the copy goes to a user cache, ``QTIP_TRITON_CACHE_DIR``, which the registry reads first).

Why: a layer's fused ops run the kernels the file names; timing a config alone (``bench/wgmma_probe.py``) does not
show what it does between the transforms and the other shards of the layer.

    python bench/override_entries.py --file autotune_configs/h100.yaml --out /tmp/qc/autotune/h100.yaml \
        --set 'L16K2V2-hyb9 12288x4096 64 STAGES=2' --set 'L16K2V2-hyb9 22016x4096 64 STAGES=2'
    QTIP_TRITON_CACHE_DIR=/tmp/qc python bench/fused_layers.py --M 48,64 --tag st2
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from qtip_triton.autotune import store


def parse_override(text: str) -> tuple[store.EntryKey, dict]:
    """``'SPEC OUTxIN BUCKET KEY=VALUE...'`` -> (entry key, {key: YAML-parsed value})."""
    parts = text.split()
    if len(parts) < 4 or "x" not in parts[1]:
        raise ValueError(f"--set {text!r}: expected 'SPEC OUTxIN BUCKET KEY=VALUE...'")
    out_f, in_f = (int(v) for v in parts[1].split("x"))
    changes = {}
    for kv in parts[3:]:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"--set {text!r}: {kv!r} is not KEY=VALUE")
        changes[k] = yaml.safe_load(v)
    return store.EntryKey(parts[0], out_f, in_f, int(parts[2])), changes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, required=True, help="the tuned file to copy")
    ap.add_argument("--out", type=Path, required=True, help="where the copy goes (e.g. DIR/autotune/h100.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="'SPEC OUTxIN BUCKET KEY=VALUE...'")
    a = ap.parse_args(argv)
    tf = store.load(a.file)
    for text in a.set:
        key, changes = parse_override(text)
        entry = tf.entries.get(key)
        if entry is None:
            raise SystemExit(f"override_entries: {a.file} has no entry {key}")
        tf.entries[key] = replace(entry, config={**entry.config, **changes})
        print(f"{key}: {entry.kind} {dict(tf.entries[key].config)}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(store.dumps(tf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
