"""``qtip-triton autotune --timer rotated`` on the GPU: a small run through the CLI writes a file whose entries
the registry accepts, each timed over enough prepared copies of its layer to exceed the L2 three times."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_rotated_tune_writes_usable_entries(tmp_path, monkeypatch):
    from qtip_triton import cli
    from qtip_triton.autotune import rotation, store
    from qtip_triton.autotune.device import current_device

    seen = []
    real = rotation.rotation_copies

    def counting(nbytes, **kw):
        seen.append((nbytes, real(nbytes, **kw)))
        return seen[-1][1]

    monkeypatch.setattr(rotation, "rotation_copies", counting)
    dev = current_device()
    out = tmp_path / f"{dev.short}.yaml"
    assert cli.main(["autotune", "--gpu", dev.short, "--shapes", "4096x4096", "--bits", "2", "--buckets", "1,16",
                     "--max-candidates", "3", "--timer", "rotated", "--out", str(out), "--no-progress",
                     "--jobs", "1", "--rounds", "1"]) == 0  # one round: one rotation built
    tf = store.load(out)
    assert {e.key.m_bucket for e in tf.entries.values()} == {1, 16}
    assert all(0 < e.time_us < 1e4 for e in tf.entries.values())
    # one rotation for the layer (2-bit 4096x4096: 4 MiB of words), its copies together >= 3 L2s
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    assert len(seen) == 1 and seen[0][0] == 4096 * 4096 // 4 and seen[0][0] * seen[0][1] >= 3 * l2
