"""EXL3 (ExLlamaV3) checkpoints: one linear's tensors <-> a QuantizedWeight, and back.

An EXL3 linear stores W_hat as [in, out] and computes y = had(had(x ⊙ suh) · W_hat) ⊙ svh + bias,
with had = 128-wide blocks of H128/√128 (Sylvester, symmetric). In our (out x in) convention that
is Ŵ = W_hatᵀ, SU = suh, SV = svh, M = block-diagonal H128/√128 on both sides (``had_block=128``),
trellis in the ``exl3`` layout (see :mod:`qtip_triton.bitstream`), spec ``L16K{K}V1-{code}`` with
code 3inst (no marker), mcg or mul1 (a 0-dim int32 marker tensor holding the code's multiplier).

Stored dims are padded to multiples of 128; the true (unpadded) sizes live in config.json and are
the model loader's business (zero-pad the input, slice the output).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qtip_triton.bitstream import exl3_order, get_layout
from qtip_triton.codes import MCG_MULT, MUL1_MULT
from qtip_triton.spec import TILE, TrellisSpec
from qtip_triton.weight import QuantizedWeight

HAD_BLOCK = 128
# marker tensor name -> multiplier it must hold (as an int32 bit pattern); no marker means 3inst
CODE_MARKERS: dict[str, int] = {"mcg": MCG_MULT, "mul1": MUL1_MULT}
CODES = ("3inst", *CODE_MARKERS)
KNOWN_TENSORS = ("trellis", "suh", "svh", "su", "sv", "bias", *CODE_MARKERS)


# ---------------------------------------------------------------------------------------------
# legacy packed signs


def unpack_signs(bits: torch.Tensor, *, name: str = "su") -> torch.Tensor:
    """Legacy ``su``/``sv``: int16 words, bit i of word w is element 16w+i, set = −1 -> ±1 float32."""
    if bits.dtype != torch.int16 or bits.dim() != 1:
        raise ValueError(f"{name} (legacy packed signs) must be a 1-D int16 tensor, got {bits.dtype} {tuple(bits.shape)}")
    words = bits.to(torch.int64) & 0xFFFF
    set_ = (words.unsqueeze(-1) >> torch.arange(16, device=bits.device)) & 1
    return (1.0 - 2.0 * set_.to(torch.float32)).reshape(-1)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_signs` for a ±1 vector whose length is a multiple of 16."""
    if signs.dim() != 1 or signs.shape[0] % 16:
        raise ValueError(f"packed signs need a vector of 16*w elements, got shape {tuple(signs.shape)}")
    if not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError("packed signs can only hold ±1 values")
    set_ = (signs < 0).to(torch.int64).reshape(-1, 16)
    words = (set_ << torch.arange(16, device=signs.device)).sum(-1)
    return torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)


# ---------------------------------------------------------------------------------------------
# reading


def code_from_markers(tensors: Mapping[str, torch.Tensor], name: str) -> str:
    """The code a module's marker tensors name (none: 3inst); ValueError for two markers or a foreign multiplier."""
    present = [k for k in CODE_MARKERS if k in tensors]
    if len(present) > 1:
        raise ValueError(f"{name}: both codebook markers {present} are present; an EXL3 module has at most one")
    if not present:
        return "3inst"
    key = present[0]
    marker = tensors[key]
    if not isinstance(marker, torch.Tensor) or marker.numel() != 1 or marker.is_floating_point():
        raise ValueError(f"{name}.{key} must be a 0-dim int32 tensor holding the multiplier, got {marker!r}")
    value = int(marker.reshape(()).item()) & 0xFFFFFFFF
    want = CODE_MARKERS[key]
    if value != want:
        raise ValueError(
            f"{name}.{key} holds multiplier {value:#010x}, but the {key} codebook we implement uses {want:#010x}; "
            "this checkpoint uses a codebook variant we cannot decode"
        )
    return key


def _scale_vector(tensors: Mapping[str, torch.Tensor], unpacked: str, packed: str, size: int, name: str) -> torch.Tensor:
    """suh/svh as float32 (the fp16 values are exact in float32), or the legacy packed ±1 signs."""
    if unpacked in tensors:
        vec = tensors[unpacked]
        if not vec.is_floating_point() or tuple(vec.shape) != (size,):
            raise ValueError(
                f"{name}.{unpacked} must be a floating-point vector of shape ({size},), "
                f"got {vec.dtype} {tuple(vec.shape)}"
            )
        return vec.to(torch.float32)
    if packed in tensors:
        signs = unpack_signs(tensors[packed], name=f"{name}.{packed}")
        if signs.shape[0] != size:
            raise ValueError(f"{name}.{packed} unpacks to {signs.shape[0]} signs, the trellis implies {size}")
        return signs
    raise ValueError(f"{name}: missing EXL3 tensor {unpacked!r} (or the legacy packed {packed!r})")


def load_linear(
    tensors: Mapping[str, torch.Tensor], *, name: str = "linear"
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Build the QuantizedWeight (and the optional bias) of one EXL3 linear from its tensors.

    ``tensors`` maps suffixes (``trellis``, ``suh``, ``svh``, optional ``mcg``/``mul1``, ``bias``,
    legacy ``su``/``sv``) to tensors; ``name`` (the module key) only labels errors. ``.decode()``
    of the result is W_hatᵀ and ``.dequantize()`` the ``nn.Linear`` weight, both (out x in).
    """
    unknown = sorted(set(tensors) - set(KNOWN_TENSORS))
    if unknown:
        raise ValueError(
            f"{name}: unknown EXL3 tensors {unknown} (known: {', '.join(KNOWN_TENSORS)}); "
            "fork-only variants (e.g. tile_order) are not supported"
        )
    if "trellis" not in tensors:
        raise ValueError(f"{name}: missing EXL3 tensor 'trellis'")
    trellis = tensors["trellis"]
    if trellis.dtype != torch.int16 or trellis.dim() != 3:
        raise ValueError(f"{name}.trellis must be a 3-D int16 tensor, got {trellis.dtype} {tuple(trellis.shape)}")
    width = trellis.shape[-1]
    if width % TILE or not 1 <= width // TILE <= 8:
        raise ValueError(
            f"{name}.trellis tile width {width} is not 16*K with K in 1..8 "
            "(half-integer bitrates, width 16K+8, are not supported)"
        )
    K = width // TILE
    n, m = trellis.shape[0] * TILE, trellis.shape[1] * TILE  # in, out
    if n % HAD_BLOCK or m % HAD_BLOCK:
        raise ValueError(
            f"{name}: EXL3 dims must be multiples of {HAD_BLOCK} (stored padded), got in={n}, out={m} "
            f"from trellis shape {tuple(trellis.shape)}"
        )
    code = code_from_markers(tensors, name)
    SU = _scale_vector(tensors, "suh", "su", n, name)
    SV = _scale_vector(tensors, "svh", "sv", m, name)
    bias = tensors.get("bias")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (m,)):
        raise ValueError(f"{name}.bias must be a floating-point vector of shape ({m},), got {tuple(bias.shape)}")
    try:
        qw = QuantizedWeight(
            TrellisSpec(16, K, 1, code), m, n, trellis.contiguous(), SU, SV, None, layout="exl3", had_block=HAD_BLOCK
        )
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return qw, bias


# ---------------------------------------------------------------------------------------------
# writing


def check_exl3_compatible(qw: QuantizedWeight) -> None:
    """Raise a ValueError saying why ``qw`` cannot be stored as an EXL3 module (else return)."""
    spec = qw.spec
    if spec.L != 16 or spec.V != 1 or spec.code not in CODES:
        raise ValueError(f"EXL3 stores L=16, V=1 trellises with code in {CODES}, got {spec.name}")
    if qw.had_block != HAD_BLOCK:
        raise ValueError(
            f"EXL3 uses {HAD_BLOCK}-wide Hadamard blocks on both sides; this weight has had_block={qw.had_block} "
            "(0 = full width), so its transforms differ"
        )
    if qw.out_features % HAD_BLOCK or qw.in_features % HAD_BLOCK:
        raise ValueError(f"EXL3 dims must be multiples of {HAD_BLOCK}, got {qw.out_features}x{qw.in_features}")
    if not torch.equal(get_layout(qw.layout).order().cpu(), exl3_order()):
        raise ValueError(
            f"the trellis is stored in the {qw.layout!r} layout, whose element order differs from EXL3's: "
            "a trellis path cannot be reordered losslessly; encode with layout='exl3'"
        )


def _fp16(vec: torch.Tensor, what: str) -> torch.Tensor:
    out = vec.detach().to(torch.float16)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{what} overflows fp16, which EXL3 stores")
    return out.contiguous()


def _marker(mult: int) -> torch.Tensor:
    return torch.tensor(mult - (1 << 32) if mult >= 1 << 31 else mult, dtype=torch.int32)


def to_tensors(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One EXL3 module's tensors (suffix -> tensor), the inverse of :func:`load_linear`.

    SU/SV are rounded to fp16 (``suh``/``svh``); a weight read by :func:`load_linear` comes back bit
    for bit. The trellis is re-packed through stream words when ``qw`` uses another layout with
    EXL3's element order.
    """
    check_exl3_compatible(qw)
    m, n, spec = qw.out_features, qw.in_features, qw.spec
    if qw.layout == "exl3":
        trellis = qw.trellis
    else:
        words = get_layout(qw.layout).unpack(qw.trellis, spec, m, n)
        trellis = get_layout("exl3").pack(words, spec)
    out = {
        "trellis": trellis.detach().contiguous(),
        "suh": _fp16(qw.SU, "SU (suh)"),
        "svh": _fp16(qw.SV, "SV (svh)"),
    }
    if spec.code in CODE_MARKERS:
        out[spec.code] = _marker(CODE_MARKERS[spec.code])
    if bias is not None:
        if tuple(bias.shape) != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        out["bias"] = _fp16(bias, "bias")
    return out


def module_tensors(key: str, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:func:`to_tensors` with checkpoint names, e.g. ``model.layers.0.self_attn.q_proj.trellis``."""
    return {f"{key}.{suffix}": t for suffix, t in to_tensors(qw, bias).items()}


# ---------------------------------------------------------------------------------------------
# whole checkpoints: grouping tensors into modules, config, writing a directory

QUANT_METHOD = "exl3"
FORMAT_VERSION = "0.0.1"  # the EXL3 'version' field we write; readers treat it as informational


def group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a checkpoint's flat tensor dict into EXL3 modules: {module key: {suffix: tensor}}.

    A module is every key prefix that has a ``.trellis``; all its direct children (``<key>.<suffix>``
    without a further dot) belong to it, so unknown siblings reach :func:`load_linear` and fail loudly.
    """
    keys = sorted(k[: -len(".trellis")] for k in tensors if k.endswith(".trellis"))
    modules: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
    for name, t in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if prefix in modules:
            modules[prefix][suffix] = t
    return modules


def parse_quantization_config(config: Mapping) -> dict:
    """The ``quantization_config`` of an EXL3 config.json (ValueError if absent or another method)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        raise ValueError("config.json has no quantization_config: not an EXL3 checkpoint")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}")
    return dict(qc)


def storage_entry(key: str, module: Mapping[str, torch.Tensor]) -> dict:
    """One ``tensor_storage`` record of quantization_config.json (shapes, bytes, K, multiplier)."""
    stored = {
        f"{key}.{suffix}": {
            "shape": list(t.shape),
            "n_bytes": t.numel() * t.element_size(),
            "dtype": str(t.dtype),
        }
        for suffix, t in sorted(module.items())
    }
    entry: dict = {"stored_tensors": stored, "quant_format": QUANT_METHOD,
                   "bits_per_weight": module["trellis"].shape[-1] // TILE}
    for marker, mult in CODE_MARKERS.items():
        if marker in module:
            entry[f"{marker}_multiplier"] = mult
    return entry


def write_checkpoint(
    out_dir,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping,
    *,
    head_key: str = "lm_head",
    extra_quant_config: Mapping | None = None,
) -> dict:
    """Write an EXL3 model directory: ``model.safetensors``, ``config.json``, ``quantization_config.json``.

    ``tensors`` is the full flat state (EXL3 modules from :func:`module_tensors` plus plain tensors
    such as embeddings and norms); ``config`` is the model's HF config.json dict. ``bits`` (the
    average K of the quantized linears other than ``head_key``) and ``head_bits`` are computed.
    Returns the ``quantization_config`` written. Every module is re-read with :func:`load_linear`
    first, so a malformed module fails before anything is written.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    modules = group_modules(tensors)
    for key, module in modules.items():
        load_linear(module, name=key)
    # (K, weights) per quantized linear: a trellis [in/16, out/16, 16K] holds in*out weights
    weighted = [(m["trellis"].shape[-1] // TILE, m["trellis"].shape[0] * m["trellis"].shape[1] * TILE * TILE)
                for k, m in modules.items() if k != head_key]
    numel = sum(n for _, n in weighted)
    qc: dict = {
        "quant_method": QUANT_METHOD,
        "version": FORMAT_VERSION,
        "bits": round(sum(k * n for k, n in weighted) / numel, 4) if numel else 0.0,
        "head_bits": modules[head_key]["trellis"].shape[-1] // TILE if head_key in modules else 16,
        "codebook": _dominant_codebook(modules),
        **dict(extra_quant_config or {}),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(config)
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    storage = {key: storage_entry(key, m) for key, m in modules.items()}
    (out / "quantization_config.json").write_text(json.dumps({**qc, "tensor_storage": storage}, indent=2) + "\n")
    return qc


def _dominant_codebook(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """The codebook most modules use (config.json's ``codebook`` is informational; markers decide)."""
    counts: dict[str, int] = {}
    for m in modules.values():
        code = next((c for c in CODE_MARKERS if c in m), "3inst")
        counts[code] = counts.get(code, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else "3inst"


def read_checkpoint(model_dir, *, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an EXL3 directory: (quantization_config, flat tensors from every ``*.safetensors``)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{d} has no config.json")
    qc = parse_quantization_config(json.loads(cfg_path.read_text()))
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f), device=str(device)))
    return qc, tensors


# ---------------------------------------------------------------------------------------------
# tensor parallelism: an EXL3 shard is again an EXL3 module (128-blocks never straddle a cut)


def shard_tensors(
    module: Mapping[str, torch.Tensor], side: str, first: int, last: int, *, keep_bias: bool = True
) -> dict[str, torch.Tensor]:
    """Slice one module's tensors for a tensor-parallel shard covering features [first, last).

    ``side="out"`` (column parallel): trellis dim 1, ``svh`` and ``bias`` are sliced, ``suh`` kept
    whole. ``side="in"`` (row parallel): trellis dim 0 and ``suh`` are sliced, ``svh`` kept whole,
    ``bias`` kept only where ``keep_bias`` (give it to rank 0 only, since partial outputs are summed).
    Cuts must be multiples of 128 so every Hadamard block stays inside one shard.
    """
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' (row parallel) or 'out' (column parallel), got {side!r}")
    module = dict(module)
    for packed, unpacked in (("su", "suh"), ("sv", "svh")):
        # legacy packed signs come in 16-element words: unpack them rather than slice words
        signs = module.pop(packed, None)
        if signs is not None and unpacked not in module:
            module[unpacked] = unpack_signs(signs, name=packed).half()
    trellis = module["trellis"]
    size = trellis.shape[0 if side == "in" else 1] * TILE
    if not (0 <= first < last <= size) or first % HAD_BLOCK or last % HAD_BLOCK:
        raise ValueError(
            f"shard [{first}, {last}) of the {side} side ({size} features) must be non-empty, in range and "
            f"cut at multiples of {HAD_BLOCK}"
        )
    out = dict(module)
    t0, t1 = first // TILE, last // TILE
    if side == "out":
        out["trellis"] = trellis[:, t0:t1].contiguous()
        out["svh"] = module["svh"][first:last].contiguous()
        if "bias" in module:
            out["bias"] = module["bias"][first:last].contiguous()
    else:
        out["trellis"] = trellis[t0:t1].contiguous()
        out["suh"] = module["suh"][first:last].contiguous()
        if not keep_bias:
            out.pop("bias", None)
    return out


# ---------------------------------------------------------------------------------------------
# quantizing into EXL3
#
# The encoder's quantize() rotates with full-width Hadamards; EXL3 needs 128-wide blocks on both
# sides, so this runs the same pipeline (random signs, rotate, scale to the code's best data scale,
# tail-biting Viterbi per tile in EXL3's element order or BlockLDLQ with a Hessian, least-squares
# scale folded into SV) from the encoder's public pieces with block Hadamards. Once
# qtip_triton.quantize grows a ``had_block`` argument this becomes a thin call to it.


def had(x: torch.Tensor, block: int = HAD_BLOCK) -> torch.Tensor:
    """EXL3's had(): each consecutive ``block`` of the last dim times H_block/√block (symmetric)."""
    from qtip_triton import hadamard

    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the Hadamard block {block}")
    y = hadamard.fwht(x.reshape(*x.shape[:-1], n // block, block)) * (block ** -0.5)
    return y.reshape(x.shape)


def rotate_weight(W: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """W̃ = B_m·diag(sv)·W·diag(su)·B_n with B = block-diagonal H128/√128: the space the trellis codes."""
    x = had(W * su)  # rows r -> (r ⊙ su) B_n
    return had((x * sv[:, None]).t().contiguous()).t().contiguous()  # columns c -> B_m (sv ⊙ c)


def rotate_hessian(H: torch.Tensor, su: torch.Tensor) -> torch.Tensor:
    """H̃ = B_n·diag(su)·H·diag(su)·B_n in float64 (the Hessian of W̃'s inputs)."""
    h = H.to(torch.float64)
    s = su.to(device=h.device, dtype=torch.float64)
    a = (h + h.t()) / 2 * s[:, None] * s[None, :]
    return had(had(a).t().contiguous()).t().contiguous()


def quantize_linear(
    W: torch.Tensor,
    K: int,
    code: str = "mcg",
    *,
    hessian: torch.Tensor | None = None,
    seed: int = 0,
    data_scale: float | None = None,
    hessian_damp: float | None = None,
    progress: bool = True,
) -> QuantizedWeight:
    """Quantize W (out x in, dims multiples of 128) into an EXL3 QuantizedWeight (``exl3`` layout).

    ``K`` is the bits per weight (1..8), ``code`` one of 3inst/mcg/mul1, ``hessian`` (in x in,
    E[xᵀx]) switches to BlockLDLQ, ``seed`` fixes the random signs, ``data_scale`` overrides the
    searched best scale of unit-RMS data. SV comes back already rounded to fp16 (what EXL3 stores),
    so ``to_tensors(quantize_linear(W, ...))`` loses nothing more.
    """
    from tqdm.auto import tqdm

    from qtip_triton.bitstream import matrix_to_tiles, tiles_to_matrix, words_from_states
    from qtip_triton.codes import all_state_values
    from qtip_triton.encode import best_data_scale, encode_tiles, random_signs
    from qtip_triton.ldlq import DEFAULT_DAMP, block_ldl, block_ldlq, check_hessian

    if code not in CODES:
        raise ValueError(f"EXL3 code must be one of {CODES}, got {code!r}")
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= 8:
        raise ValueError(f"EXL3 K (bits per weight) must be an int in 1..8, got {K!r}")
    spec = TrellisSpec(16, K, 1, code)
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a 2-D floating-point (out_features, in_features) tensor, got {W!r:.80}")
    m, n = W.shape
    if m == 0 or n == 0 or m % HAD_BLOCK or n % HAD_BLOCK:
        raise ValueError(f"W is {m}x{n}: EXL3 needs both dims to be multiples of {HAD_BLOCK} (pad them first)")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W holds NaN or Inf")
    if hessian is not None:
        check_hessian(hessian, n)

    dev = W.device
    gen = torch.Generator().manual_seed(seed)
    su, sv = random_signs(n, gen).to(dev), random_signs(m, gen).to(dev)
    wt = rotate_weight(W.detach().to(torch.float32), su, sv)
    sigma = float(wt.double().pow(2).mean().sqrt())
    if sigma == 0.0:
        raise ValueError("W is all zeros: nothing to quantize")
    if data_scale is None:
        data_scale, _ = best_data_scale(spec, device=dev)
    x = wt * (data_scale / sigma)
    values = all_state_values(spec).to(dev)
    order = exl3_order().to(dev)
    tm, tn = m // TILE, n // TILE

    def reconstruct(states: torch.Tensor) -> torch.Tensor:
        return tiles_to_matrix(values[states].reshape(*states.shape[:2], TILE * TILE), order)

    bar = tqdm(total=tm * tn, desc=f"exl3 {spec.name} {m}x{n}", unit="tile", disable=not progress)
    try:
        if hessian is None:
            states, _ = encode_tiles(matrix_to_tiles(x, order), spec, values=values, progress=bar)
            recon, h_tilde = reconstruct(states), None
        else:
            h_tilde = rotate_hessian(hessian.to(dev), su)
            damp = DEFAULT_DAMP if hessian_damp is None else hessian_damp
            lfac, _ = block_ldl(h_tilde, damp=damp)
            states = torch.empty(tm, tn, spec.steps_per_tile, dtype=torch.int64, device=dev)

            def quantize_block(k: int, target: torch.Tensor) -> torch.Tensor:
                st, _ = encode_tiles(matrix_to_tiles(target, order), spec, values=values, progress=bar)
                states[:, k : k + 1] = st
                return reconstruct(st)

            recon = block_ldlq(x, lfac, quantize_block)
    finally:
        bar.close()

    # least-squares scale of the reconstruction (in the Hessian's metric when given), folded into SV
    t, r = wt.double(), recon.double()
    rh = r if h_tilde is None else r @ h_tilde.to(r.device)
    scale = float((t * rh).sum() / (r * rh).sum())
    if not (scale > 0.0 and scale < float("inf")):
        scale = sigma / data_scale
    trellis = get_layout("exl3").pack(words_from_states(states, spec, check=True), spec)
    SV = (sv * scale).to(torch.float16).to(torch.float32)
    if not (abs(scale) > 0.0 and bool(torch.isfinite(SV).all()) and bool((SV != 0).all())):
        raise ValueError(f"W's scale ({scale:.3g} per unit code value) is outside the fp16 range EXL3 stores svh in")
    return QuantizedWeight(spec, m, n, trellis, su, SV, None, layout="exl3", had_block=HAD_BLOCK)


# ---------------------------------------------------------------------------------------------
# a whole Hugging Face Llama-style directory -> an EXL3 directory

LINEAR_SUFFIXES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "generation_config.json")


def _is_block_linear(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers" and ".".join(parts[-2:]) in LINEAR_SUFFIXES


def _pad_to(W: torch.Tensor, mult: int) -> torch.Tensor:
    m, n = W.shape
    pm, pn = -m % mult, -n % mult
    return torch.nn.functional.pad(W, (0, pn, 0, pm)) if pm or pn else W


def quantize_model(
    src_dir,
    dst_dir,
    K: int,
    code: str = "mcg",
    *,
    head_bits: int | None = None,
    seed: int = 0,
    progress: bool = True,
    quantize_fn=None,
) -> dict:
    """Quantize every decoder-layer linear (q/k/v/o, gate/up/down) of an HF Llama-style model to EXL3.

    ``head_bits`` also quantizes ``lm_head`` (else it stays a plain weight). Dims are zero-padded to
    multiples of 128 (svh is 0 on padded outputs, as EXL3 does); other tensors are copied unchanged
    and tokenizer files are copied. No calibration: plain (Hessian-free) trellis search.
    ``quantize_fn(W, K, code, seed=...)`` replaces :func:`quantize_linear` (tests). Returns the
    ``quantization_config`` written.
    """
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    src, dst = Path(src_dir), Path(dst_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{src} has no config.json: not a Hugging Face model directory")
    config = json.loads(cfg_path.read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')!r})")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    qfn = quantize_fn or (lambda W, k, c, seed: quantize_linear(W, k, c, seed=seed, progress=False))

    targets = [k[: -len(".weight")] for k in state if k.endswith(".weight") and _is_block_linear(k[: -len(".weight")])]
    if head_bits is not None and "lm_head.weight" in state:
        targets.append("lm_head")
    if not targets:
        raise ValueError(f"{src}: found no decoder-layer linears (model.layers.N.self_attn.q_proj.weight, ...)")
    out = {k: v for k, v in state.items() if not any(k in (f"{t}.weight", f"{t}.bias") for t in targets)}
    for i, key in enumerate(tqdm(sorted(targets), desc="exl3 quantize", unit="linear", disable=not progress)):
        W = state[f"{key}.weight"]
        m = W.shape[0]
        bits = head_bits if key == "lm_head" else K
        qw = qfn(_pad_to(W.float(), HAD_BLOCK), bits, code, seed=seed + i)
        if qw.out_features != m:  # padded outputs: svh = 0 makes them exactly zero
            qw.SV[m:] = 0.0
        bias = state.get(f"{key}.bias")
        if bias is not None and bias.shape[0] != qw.out_features:
            bias = torch.nn.functional.pad(bias, (0, qw.out_features - bias.shape[0]))
        out.update(module_tensors(key, qw, bias))
    qc = write_checkpoint(dst, out, config)
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return qc
