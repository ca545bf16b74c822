"""bench/jit_audit.py's comparison of compile specializations (the compile hook itself runs on the GPU)."""

from __future__ import annotations

from tests.bench_scripts import load_script

audit = load_script("jit_audit")


def test_variant_fields_flatten_types_constants_and_attributes():
    f = audit.variant_fields({"x": "*fp16", "M": "i32"}, {(3,): 8}, {(1,): [["tt.divisibility", 16]]})
    assert f == {"type x": "*fp16", "type M": "i32", "const (3,)": "8", "attr (1,)": "[['tt.divisibility', 16]]"}


def test_closest_names_only_the_fields_that_differ():
    a = {"type M": "i32", "const BLOCK_M": "8", "attr (4,)": "[]"}
    b = {"type M": "i32", "const BLOCK_M": "16", "attr (4,)": "[]"}
    new = {"type M": "i32", "const BLOCK_M": "8", "attr (4,)": "[['tt.divisibility', 16]]"}
    best, diff = audit.closest(new, [b, a])
    assert best is a
    assert diff == ["attr (4,): [] -> [['tt.divisibility', 16]]"]
    assert audit.closest(new, []) == (None, [])
