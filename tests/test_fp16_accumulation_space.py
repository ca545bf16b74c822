"""Configs that trade accuracy for speed (the kernel package's ``REDUCED_PRECISION_KEYS``: the fp16x2 gemv) are
valid configs, so a stored one is served, but the tuner times them only when asked (``--fp16-accumulation``);
and the one-row gemv's space reaches the 8-warp, 2048-column tiles session 19 measured fastest."""

from __future__ import annotations

from qtip_triton import cli, kernels
from qtip_triton.autotune import cmd_autotune
from qtip_triton.autotune.kernel_api import load_kernel_api
from qtip_triton.autotune.space import candidates, check_config, reduced_precision, seeded_candidates
from qtip_triton.autotune.store import Entry, EntryKey
from qtip_triton.kernels.configs import config_space
from qtip_triton.spec import TrellisSpec

K2 = TrellisSpec.parse("L16K2V2-hyb9")
HFMA_EARLY = {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 2048, "SPLIT_K": 1, "num_warps": 8, "table": "shared16",
              "hfma": True, "early_words": True}


def test_space_lists_fp16x2_and_wide_tiles_for_one_row():
    space = config_space("gemv", K2, 8192, 8192, 1)
    assert HFMA_EARLY in space and {k: v for k, v in HFMA_EARLY.items() if k != "hfma"} not in space
    assert {**HFMA_EARLY, "hfma": False} not in space  # early words alone are not a family of the space
    wide = [c for c in space if c["BLOCK_K"] == 2048]
    assert wide and all(c["num_warps"] == 8 and c["BLOCK_M"] == 1 for c in wide)
    # 4096-wide layers: the 2048-column step at split 2 (one step per split)
    assert any(c["BLOCK_K"] == 2048 and c["SPLIT_K"] == 2 for c in config_space("gemv", K2, 4096, 4096, 1))
    # row blocks of more than one batch row: no fp16x2 gemv and no 2048-column steps
    multi = [c for c in config_space("gemv", K2, 8192, 8192, 4) if c["BLOCK_M"] > 1 and not c.get("mma")]
    assert multi and not any(c.get("hfma") or c["BLOCK_K"] > 1024 for c in multi)


def test_no_fp16x2_where_it_cannot_be_generated():
    """The fp16x2 gemv needs a state that decodes into one fp16x2 register (QTIP's V = 2 layout)."""
    space = config_space("gemv", TrellisSpec.parse("L16K2V1-1mad"), 4096, 4096, 1)
    assert space and not any(c.get("hfma") for c in space)


def test_tuner_times_reduced_precision_only_when_asked():
    api = load_kernel_api()
    assert reduced_precision(api, HFMA_EARLY) and not reduced_precision(api, {"BLOCK_N": 64, "hfma": False})
    plain = candidates(api, K2, 8192, 8192, 1, 6)
    assert plain and not any(reduced_precision(api, c) for _, c in plain)
    allowed = candidates(api, K2, 8192, 8192, 1, 6, allow_reduced_precision=True)
    fp16 = [c for _, c in allowed if reduced_precision(api, c)]
    assert any(c.get("early_words") for c in fp16) and any(not c.get("early_words") for c in fp16)
    assert {(k, tuple(sorted(c.items()))) for k, c in plain} <= {(k, tuple(sorted(c.items()))) for k, c in allowed}


def test_a_stored_fp16x2_entry_is_served_and_seeds_only_when_asked():
    api = load_kernel_api()
    assert check_config(api, "gemv", HFMA_EARLY, K2, 8192, 8192, 1) == (True, None)
    seed = {EntryKey(K2.name, 8192, 8192, 1): Entry(EntryKey(K2.name, 8192, 8192, 1), "gemv", HFMA_EARLY, 14.9)}
    assert seeded_candidates(api, K2, 8192, 8192, 1, seed) is None
    got = seeded_candidates(api, K2, 8192, 8192, 1, seed, allow_reduced_precision=True)
    assert got and got[0] == ("gemv", {k: v for k, v in HFMA_EARLY.items()})


def test_cli_plan_grows_with_the_flag(monkeypatch, capsys):
    monkeypatch.setattr(cmd_autotune, "load_kernel_api", load_kernel_api)
    args = ["autotune", "--gpu", "h100", "--dry-run", "--no-progress", "--bits", "2", "--shapes", "8192x8192",
            "--buckets", "1"]
    timings = []
    for flag in ([], ["--fp16-accumulation"]):
        assert cli.main(args + flag) == 0
        timings.append(int(capsys.readouterr().out.split(" timings")[0].rsplit(" ", 1)[1]))
    assert timings[1] > timings[0] > 0, timings


def test_reduced_precision_keys_are_exported():
    assert kernels.REDUCED_PRECISION_KEYS == ("hfma",)
