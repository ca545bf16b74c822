"""`qtip-triton quantize` routing and argument checks (the writers themselves are tested elsewhere)."""

import pytest

from qtip_triton.cli import main


def test_exl3_format_routes_to_the_exl3_writer(monkeypatch, tmp_path):
    seen = {}

    def fake_quantize_model(src, dst, K, code, *, head_bits=None, seed=0):
        seen.update(src=src, dst=dst, K=K, code=code, head_bits=head_bits, seed=seed)
        return {}

    monkeypatch.setattr("qtip_triton.formats.exl3.quantize_model", fake_quantize_model)
    rc = main(["quantize", "src", str(tmp_path / "out"), "--format", "exl3", "--K", "6", "--code", "mul1",
               "--head-bits", "8", "--seed", "3"])
    assert rc == 0
    assert seen == dict(src="src", dst=str(tmp_path / "out"), K=6, code="mul1", head_bits=8, seed=3)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--format", "exl3", "--tp", "8"], "apply to --format qtip only"),
        (["--format", "qtip", "--K", "6"], "takes K in 2..4"),
    ],
)
def test_bad_combinations(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        main(["quantize", "src", str(tmp_path / "out"), *argv])


def test_exl3_refuses_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(SystemExit, match="is not empty"):
        main(["quantize", "src", str(tmp_path / "out"), "--format", "exl3"])
