"""``qtip-triton selftest`` in the interpreter: it passes on correct kernels, and a kernel that computes a wrong
result (one wrong decoded value, a transform variant off by a little) fails it with the check named."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import cli, selftest
from qtip_triton.kernels import hadamard as had
from qtip_triton.kernels import runners

pytestmark = pytest.mark.skipif(not runners.interpreting(), reason="runs the kernels through TRITON_INTERPRET=1")

QUICK = ["selftest", "--quick", "--tokens", "1", "--shapes", "256x512"]


def test_selftest_passes_on_this_machines_kernels(capsys, monkeypatch):
    monkeypatch.setenv("QTIP_TRITON_NO_PROGRESS", "1")
    assert cli.main(QUICK) == 0
    out = capsys.readouterr().out
    assert "L16K2V2-hyb9 decompress" in out and "hadamard output stacked" in out
    assert "checks passed" in out and "FAIL" not in out


def test_a_wrong_kernel_fails_the_selftest_with_its_name(capsys, monkeypatch):
    monkeypatch.setenv("QTIP_TRITON_NO_PROGRESS", "1")
    real_decompress, real_transform = runners.decompress, had.transform

    def one_wrong_value(*args, **kw):
        w = real_decompress(*args, **kw)
        w[0, 0] += 1
        return w

    def stacked_off(*args, **kw):
        y = real_transform(*args, **kw)
        return y * 1.01 if kw.get("stacked") else y  # 1 %: far above the bounds, far below garbage

    monkeypatch.setattr(runners, "decompress", one_wrong_value)
    monkeypatch.setattr(had, "transform", stacked_off)
    assert cli.main(QUICK) == 1
    captured = capsys.readouterr()
    fails = [line for line in captured.out.splitlines() if line.startswith("FAIL")]
    assert any("decompress" in line and "1 wrong values" in line for line in fails), fails
    assert {line.split()[2] for line in fails if "hadamard" in line} == {"input", "output"}
    assert all("stacked" in line for line in fails if "hadamard" in line)
    assert "do not serve" in captured.err


def test_selftest_refuses_bad_input_and_a_machine_without_a_gpu(capsys, monkeypatch):
    assert cli.main(["selftest", "--specs", "L16K9V2-hyb9"]) == 2
    assert "selftest" in capsys.readouterr().err
    monkeypatch.setattr(runners, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["selftest"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["selftest", "--shapes", "4096"])


def test_check_bounds():
    assert selftest.Check("x", "c", 0.0, 0.0).ok and not selftest.Check("x", "c", 1.0, 0.0).ok
    assert not selftest.Check("x", "c", float("nan"), 1.0).ok and not selftest.Check("x", "c", float("inf"), 1.0).ok
