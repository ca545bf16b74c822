"""Write QTIP-format checkpoints from Hugging Face Llama-family models (``qtip-triton quantize``).

The output is what relaxml's QTIP releases look like, so every QTIP reader (vLLM through
``qtip_triton.vllm``, relaxml's code) loads it:

* ``config.json``: the source config plus ``quip_params`` (L=16, K, V=2, HYB with 9-bit ``tlut``,
  ``skip_list``, ``split_for_tp``); with ``quantization_config=True`` also
  ``"quantization_config": {"quant_method": "qtip", ...}`` so vLLM detects it without
  ``quantization="qtip"``;
* per quantized linear (q/k/v/o and gate/up/down kept separate): ``trellis`` int16 (QTIP kernel
  layout), ``tlut`` fp16 (512, 2), ``SU`` (in,), ``SV`` (out,), ``rcp`` and ``tp_rank`` int64
  scalars, ``bias`` when the source has one; every other tensor is copied unchanged;
* ``tp=N`` writes the tensor-parallel variant (relaxml's ``-TP8``): column-parallel layers
  (q, k, v, gate, up) get ``rcp=2`` (output transform in N blocks), row-parallel ones (o, down)
  ``rcp=1`` (input transform in N blocks), ``tp_rank=N``: it shards over any TP degree dividing N
  with no extra communication.

Quantization is Hessian-free (:func:`qtip_triton.quantize`, tail-biting Viterbi). ``random_trellis``
skips the encoder: random trellis words (always valid), random-sign SU/SV scaled to the source
weight's RMS, the real table; for speed tests and fast end-to-end checks.

:func:`dequantize_checkpoint` writes the dense model a QTIP checkpoint stands for (each linear's
W_eff), the reference to compare a quantized runtime against.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from qtip_triton.bitstream import get_layout
from qtip_triton.codes import get_code
from qtip_triton.formats.qtip import load_linear
from qtip_triton.hadamard import is_supported
from qtip_triton.spec import TrellisSpec
from qtip_triton.weight import RCP_COL, RCP_NONE, RCP_ROW, QuantizedWeight

LINEAR_RE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<kind>q|k|v|o|gate|up|down)_proj)\.weight$")
COLUMN_KINDS = ("q", "k", "v", "gate", "up")  # output sharded under TP -> rcp=2
ROW_KINDS = ("o", "down")  # input sharded under TP -> rcp=1
QTIP_TENSORS = ("trellis", "tlut", "SU", "SV", "rcp", "tp_rank")
UPSTREAM_TP_RANK = 8  # what relaxml writes into tp_rank when rcp=0 (unused then)
MAX_SHARD_BYTES = 2 << 30
_SKIP_COPY = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.index\.json)$|^config\.json$")


def qtip_spec(K: int) -> TrellisSpec:
    """The released QTIP trellis: L=16, V=2, HYB code with a 9-bit table."""
    return TrellisSpec(16, K, 2, "hyb", 9)


def quip_params(K: int, *, tp: int | None = None, skip_list: list[str] = (), K_v_proj: int | None = None) -> dict:
    """The ``quip_params`` block of a QTIP config.json."""
    qp = {
        "codebook": "bitshift", "codebook_version": 0, "L": 16, "K": K, "V": 2, "tlut_bits": 9,
        "decode_mode": "quantlut_sym", "td_x": 16, "td_y": 16, "split_for_tp": bool(tp and tp > 1),
        "skip_list": list(skip_list),
    }
    if K_v_proj is not None:
        qp["K_v_proj"] = K_v_proj
    return qp


# ------------------------------------------------------------------------------------- reading


def _weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        if any(src.glob("*.bin")):
            raise ValueError(f"{src}: only PyTorch .bin weights found; save the model with safe_serialization=True first")
        raise ValueError(f"{src}: no *.safetensors weight files found")
    return files


def iter_tensors(src: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in a checkpoint directory, one file open at a time."""
    from safetensors import safe_open

    for path in _weight_files(Path(src)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, f.get_tensor(name)


def tensor_names(src: str | Path) -> list[str]:
    """Names of all tensors in a checkpoint directory (without reading them)."""
    from safetensors import safe_open

    names: list[str] = []
    for path in _weight_files(Path(src)):
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def read_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.exists():
        raise ValueError(f"{src}: no config.json (not a Hugging Face model directory)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Accumulate tensors and write ``model-0000i-of-0000n.safetensors`` shards plus an index."""

    def __init__(self, dst: Path, max_bytes: int = MAX_SHARD_BYTES) -> None:
        self.dst, self.max_bytes = dst, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.files):
            raise ValueError(f"duplicate tensor name {name!r}")
        t = tensor.detach().cpu().clone()  # own storage: shared tables/views cannot be saved twice
        if self.pending and self.pending_bytes + t.numel() * t.element_size() > self.max_bytes:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"shard-{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(self.dst / tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dst / tmp).rename(self.dst / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            total = sum((self.dst / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _prepare_dst(src: Path, dst: Path, overwrite: bool) -> None:
    if src.resolve() == dst.resolve():
        raise ValueError("the output directory must differ from the source")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ValueError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # tokenizer, generation config, ...
        if f.is_file() and not _SKIP_COPY.search(f.name):
            shutil.copy2(f, dst / f.name)


# ------------------------------------------------------------------------------------- quantizing


def _random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float32) * 2 - 1


def random_qweight(W: torch.Tensor, spec: TrellisSpec, table: torch.Tensor, *, seed: int) -> QuantizedWeight:
    """A valid QTIP weight of W's shape and scale with random trellis words (no encoding)."""
    m, n = W.shape
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=gen, dtype=torch.int64)
    table_rms = float(table.double().pow(2).mean().sqrt())
    scale = float(W.double().pow(2).mean().sqrt()) / max(table_rms, 1e-30)
    return QuantizedWeight(
        spec, m, n, get_layout("qtip").pack(words, spec), _random_signs(n, gen), _random_signs(m, gen) * scale, table,
    )


def _encode(
    W: torch.Tensor, spec: TrellisSpec, table: torch.Tensor, *, seed: int, progress: bool, data_scale: float | None
) -> QuantizedWeight:
    try:
        from qtip_triton.encode import quantize
    except ImportError as e:  # pragma: no cover - the encoder ships with the package
        raise RuntimeError("the trellis encoder (qtip_triton.encode) is not available; use random_trellis") from e
    return quantize(W, spec, seed=seed, table=table, layout="qtip", progress=progress, data_scale=data_scale)


def quantize_linear(
    W: torch.Tensor,
    spec: TrellisSpec,
    table: torch.Tensor,
    *,
    kind: str,
    tp: int | None = None,
    seed: int = 0,
    random_trellis: bool = False,
    progress: bool = False,
    data_scale: float | None = None,
) -> QuantizedWeight:
    """One linear layer as a QuantizedWeight; with ``tp`` the transforms are split for tensor parallelism.

    ``tp`` row blocks (``rcp=2``) are encoded separately with one seed, which gives every block the
    same SU (checked); column blocks (``rcp=1``) likewise share SV's signs, and each block's scale
    is moved from SV into that block's SU (a scalar commutes with the transforms).
    ``data_scale`` fixes the encoder's data scale (default: it searches the best one, slow once per table).
    """
    W = W.detach().to(torch.float32)
    m, n = W.shape
    encode: Callable[[torch.Tensor], QuantizedWeight]
    if random_trellis:
        def encode(w: torch.Tensor) -> QuantizedWeight:
            return random_qweight(w, spec, table, seed=seed)
    else:
        def encode(w: torch.Tensor) -> QuantizedWeight:
            return _encode(w, spec, table, seed=seed, progress=progress, data_scale=data_scale)

    if not tp or tp == 1:
        return encode(W)
    rcp = RCP_COL if kind in COLUMN_KINDS else RCP_ROW
    size = m if rcp == RCP_COL else n
    if size % tp or (size // tp) % 32:
        side = "out" if rcp == RCP_COL else "in"
        raise ValueError(f"{kind}_proj: {side}_features={size} does not split into {tp} blocks of a multiple of 32")
    if rcp == RCP_COL:
        parts = [encode(w) for w in W.split(m // tp, dim=0)]
        if not all(torch.equal(p.SU, parts[0].SU) for p in parts):
            raise RuntimeError("the encoder drew different SU for blocks of the same seed; cannot write rcp=2")
        trellis = torch.cat([p.trellis for p in parts], dim=0)  # row blocks: qtip layout is row-major over 32x32 blocks
        SU, SV = parts[0].SU, torch.cat([p.SV for p in parts])
    else:
        parts = [encode(w) for w in W.split(n // tp, dim=1)]
        ref = parts[0].SV
        SUs = []
        for p in parts:
            ratio = p.SV / ref
            if not torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5, atol=0):
                raise RuntimeError("the encoder's SV differ by more than a scale between blocks; cannot write rcp=1")
            SUs.append(p.SU * ratio[0])
        groups = [p.trellis.reshape(m // 32, (n // tp) // 32, -1) for p in parts]
        trellis = torch.cat(groups, dim=1).reshape(-1, 16 * spec.K)  # column blocks: interleave per block row
        SU, SV = torch.cat(SUs), ref
    return QuantizedWeight(spec, m, n, trellis, SU, SV, parts[0].table, layout="qtip", rcp=rcp, tp_rank=tp)


def linear_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (relaxml's names and dtypes; SU kept float32)."""
    return {
        f"{prefix}.trellis": qw.trellis,
        f"{prefix}.tlut": qw.table.to(torch.float16),
        f"{prefix}.SU": qw.SU.to(torch.float32),
        f"{prefix}.SV": qw.SV.to(torch.float32),
        f"{prefix}.rcp": torch.tensor(qw.rcp, dtype=torch.int64),
        f"{prefix}.tp_rank": torch.tensor(qw.tp_rank if qw.rcp != RCP_NONE else UPSTREAM_TP_RANK, dtype=torch.int64),
    }


def _skip_key(layer: str, kind: str) -> str:
    return f"{layer}_{kind}"


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    K: int = 2,
    tp: int | None = None,
    seed: int = 0,
    random_trellis: bool = False,
    skip: list[str] = (),
    K_v_proj: int | None = None,
    table: torch.Tensor | None = None,
    quantization_config: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    data_scale: float | None = None,
) -> Path:
    """Quantize a Hugging Face Llama-family directory ``src`` into a QTIP checkpoint at ``dst``.

    ``skip``: layers left in full precision, QTIP style (``"0_q"``, ``"3_down"``) or full module
    names. ``table``: the HYB table shared by all layers (default: the k-means table). Each layer's
    seed is derived from ``seed`` and its name, so results do not depend on the order of tensors.
    """
    src, dst = Path(src), Path(dst)
    config = read_config(src)
    spec = qtip_spec(K)
    v_spec = qtip_spec(K_v_proj) if K_v_proj is not None else spec
    if tp is not None and tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if table is None:
        from qtip_triton.tables import kmeans_table

        table = kmeans_table(spec)
    get_code(spec.code).check_table(spec, table)
    names = tensor_names(src)
    linears = {n: LINEAR_RE.match(n) for n in names}
    linears = {n: m for n, m in linears.items() if m}
    if not linears:
        raise ValueError(f"{src}: no Llama-style linear weights (*.layers.N.self_attn.q_proj.weight, ...) found")
    skip_set = set(skip)
    skipped = []
    for m in linears.values():
        if _skip_key(m["layer"], m["kind"]) in skip_set or m["prefix"] in skip_set:
            skipped.append(_skip_key(m["layer"], m["kind"]))
    unknown = skip_set - set(skipped) - {m["prefix"] for m in linears.values()}
    if unknown:
        raise ValueError(f"skip entries match no linear layer: {sorted(unknown)}")
    _prepare_dst(src, dst, overwrite)
    writer = ShardWriter(dst, max_shard_bytes)
    bar = tqdm(total=len(linears), desc=f"quantize K={K}" + (f" TP{tp}" if tp else ""), unit="linear", disable=not progress)
    for name, tensor in iter_tensors(src):
        m = linears.get(name)
        if m is None or _skip_key(m["layer"], m["kind"]) in skipped:
            writer.add(name, tensor)
            bar.update(m is not None)
            continue
        prefix, kind = m["prefix"], m["kind"]
        rows, cols = tensor.shape
        for what, size in (("out", rows), ("in", cols)):
            if size % 32 or not is_supported(size):
                raise ValueError(
                    f"{prefix}: {what}_features={size} cannot be stored in QTIP's format (needs a multiple of 32 "
                    "with a Hadamard transform: 2^p or Kh*2^p); leave the layer unquantized with --skip "
                    f"{_skip_key(m['layer'], kind)}"
                )
        layer_seed = (seed * 1_000_003 + _stable_hash(prefix)) % (1 << 31)
        qw = quantize_linear(
            tensor, v_spec if kind == "v" else spec, table, kind=kind, tp=tp, seed=layer_seed,
            random_trellis=random_trellis, progress=False, data_scale=data_scale,
        )
        for key, value in linear_tensors(prefix, qw).items():
            writer.add(key, value)
        bar.update(1)
    bar.close()
    writer.close()
    qp = quip_params(K, tp=tp, skip_list=sorted(skipped), K_v_proj=K_v_proj)
    out_config = dict(config)
    out_config["quip_params"] = qp
    if quantization_config:
        out_config["quantization_config"] = {"quant_method": "qtip", **qp}
    else:
        out_config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(out_config, indent=2))
    return dst


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


# ------------------------------------------------------------------------------------- reading back


def read_qtip_linears(src: str | Path) -> tuple[dict[str, tuple[QuantizedWeight, torch.Tensor | None]], dict[str, torch.Tensor], dict]:
    """A QTIP checkpoint as ({linear prefix: (QuantizedWeight, bias)}, {other tensors}, config)."""
    config = read_config(src)
    qp = config.get("quip_params") or (config.get("quantization_config") or {})
    if "K" not in qp:
        raise ValueError(f"{src}: config.json has no quip_params (not a QTIP checkpoint)")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(src):
        prefix, _, suffix = name.rpartition(".")
        if suffix in QTIP_TENSORS:
            groups.setdefault(prefix, {})[suffix] = tensor
        else:
            plain[name] = tensor
    linears = {}
    for prefix, tensors in groups.items():
        bias = plain.pop(f"{prefix}.bias", None)
        if bias is not None:
            tensors["bias"] = bias
        linears[prefix] = load_linear(tensors, qp, name=prefix)
    return linears, plain, config


def dequantize_checkpoint(
    src: str | Path, dst: str | Path, *, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> Path:
    """Write the dense model a QTIP checkpoint stands for: every linear becomes its W_eff."""
    src, dst = Path(src), Path(dst)
    linears, plain, config = read_qtip_linears(src)
    _prepare_dst(src, dst, overwrite)
    writer = ShardWriter(dst)
    for name, tensor in plain.items():
        writer.add(name, tensor)
    for prefix, (qw, bias) in linears.items():
        writer.add(f"{prefix}.weight", qw.dequantize(torch.float64).to(dtype))
        if bias is not None:
            writer.add(f"{prefix}.bias", bias)
    writer.close()
    config = {k: v for k, v in config.items() if k not in ("quip_params", "quantization_config")}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# ------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face Llama-family model directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="output directory for the QTIP checkpoint")
    parser.add_argument("--format", default="qtip", choices=("qtip", "exl3"),
                        help="checkpoint format to write (default qtip; exl3 = ExLlamaV3's format)")
    parser.add_argument("--K", type=int, default=2, choices=tuple(range(1, 9)),
                        help="bits per weight (default 2; qtip takes 2..4, exl3 1..8)")
    parser.add_argument("--code", default="mcg", choices=("3inst", "mcg", "mul1"),
                        help="exl3 only: trellis code (default mcg)")
    parser.add_argument("--head-bits", type=int, default=None, help="exl3 only: also quantize lm_head at this K")
    parser.add_argument("--K-v-proj", type=int, default=None, choices=(2, 3, 4), help="other K for v_proj")
    parser.add_argument("--tp", type=int, default=None,
                        help="write the tensor-parallel variant with this many transform blocks (e.g. 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated layers to keep dense, e.g. 0_q,0_k,31_down")
    parser.add_argument("--random-trellis", action="store_true",
                        help="random valid trellis words instead of encoding (speed tests; real SU/SV/tlut)")
    parser.add_argument("--quantization-config", action="store_true",
                        help="also write quantization_config (vLLM then needs no quantization='qtip')")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    if args.format == "exl3":
        from qtip_triton.formats.exl3 import quantize_model

        if args.tp or args.random_trellis or args.K_v_proj or args.skip or args.quantization_config:
            raise SystemExit("qtip-triton quantize: --tp, --random-trellis, --K-v-proj, --skip and "
                             "--quantization-config apply to --format qtip only")
        dst = Path(args.dst)
        if dst.exists() and any(dst.iterdir()) and not args.overwrite:
            raise SystemExit(f"qtip-triton quantize: {dst} is not empty (use --overwrite)")
        quantize_model(args.src, args.dst, args.K, args.code, head_bits=args.head_bits, seed=args.seed)
        print(f"wrote {args.dst}")
        return 0
    if args.K not in (2, 3, 4):
        raise SystemExit(f"qtip-triton quantize: --format qtip takes K in 2..4, got {args.K}")
    out = quantize_checkpoint(
        args.src, args.dst, K=args.K, tp=args.tp, seed=args.seed, random_trellis=args.random_trellis,
        skip=[s for s in args.skip.split(",") if s], K_v_proj=args.K_v_proj,
        quantization_config=args.quantization_config, overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0
