"""EXL3 (ExLlamaV3) checkpoints in vLLM: ``quant_method: "exl3"``, served by our generated kernels.

What differs from QTIP (:mod:`qtip_triton.vllm.linear_method`), and why this is its own method:

* K (1..8) and the code (3inst / mcg / mul1) differ per module and are not in config.json: they come
  from ``quantization_config.json``'s ``tensor_storage`` (``bits_per_weight``, ``mcg_multiplier`` /
  ``mul1_multiplier``), which exllamav3 writes next to every converted model. The marker tensors
  (``<key>.mcg`` / ``<key>.mul1``) are checked against it at load time.
* The trellis is ``[in/16, out/16, 16K]`` (input dim first), so the parameter is
  ``(n_loc/16, sum p_i/16, 16*Kmax)`` int16 with ``output_dim=1``, packed 16:1; vLLM's own v2 loaders
  slice it for fused layers and any TP degree, and every slice is again a valid EXL3 trellis.
* ``suh`` / ``svh`` (fp16 input/output scales) replace SU / SV; both Hadamards are 128-wide blocks
  (``had_block=128``), so any TP split on 128-multiples keeps every transform local: no checkpoint
  needs a TP variant. Legacy packed-sign ``su`` / ``sv`` are unpacked on load.

Forward: the fused custom op (:mod:`qtip_triton.ops`, per-shard ``had_block=128``), which runs one
generated-kernel call per logical matrix; torch.compile and CUDA graphs see one opaque op. On CUDA,
loading warms every kernel for every batch size the engine can send (:mod:`qtip_triton.vllm.warmup`).

Padded dims (true sizes from config.json not multiples of 128; EXL3 stores every module zero-padded
to 128-multiples, each logical matrix of a fused layer on its own) are served at TP=1: parameters
are allocated at the stored padded sizes and loaded by our own offsets (vLLM's v2 loaders compute
offsets from the true sizes), and the forward zero-pads x to the padded input width and slices each
matrix's output back to its true size (plain torch ops around the custom op: torch.compile traces
them). A checkpoint bias, padded like svh, is cut back to the true size of vLLM's bias parameter.

A quantized ``lm_head`` is served at TP=1 (:class:`Exl3LMHeadMethod`). Not handled yet (clear errors):
a quantized head at TP > 1, and padded dims in a layer that TP > 1 splits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    ReplicatedLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import ChannelQuantScaleParameter, PackedvLLMParameter

from qtip_triton import ops
from qtip_triton.formats import exl3 as fmt
from qtip_triton.ops import PackedShards
from qtip_triton.spec import TILE, TrellisSpec
from qtip_triton.vllm.compat import current_load_format, logger, register_weight_loader_v2
from qtip_triton.vllm.config import DEFAULT_PACKED
from qtip_triton.vllm.linear_method import full_output_sizes
from qtip_triton.vllm.params import LayerGeometry, ShardSlotParameter
from qtip_triton.vllm.warmup import batch_of, forward_passes_bias, warm_up_layer
from qtip_triton.weight import QuantizedWeight

QUANT_METHOD = fmt.QUANT_METHOD  # "exl3"
STORAGE_FILE = "quantization_config.json"
STORAGE_WHAT = f"{STORAGE_FILE} (tensor_storage)"
BLOCK = fmt.HAD_BLOCK
MARKERS = tuple(fmt.CODE_MARKERS)  # ("mcg", "mul1")


# --------------------------------------------------------------------------------------------- config


def spec_from_storage(key: str, entry: Mapping[str, Any]) -> TrellisSpec:
    """The TrellisSpec of one module's ``tensor_storage`` record (ValueError if it is not EXL3)."""
    if entry.get("quant_format") != QUANT_METHOD:
        raise ValueError(f"{key}: tensor_storage says quant_format={entry.get('quant_format')!r}, not 'exl3'")
    K = entry.get("bits_per_weight")
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= 8:
        raise ValueError(f"{key}: tensor_storage bits_per_weight={K!r} is not an integer K in 1..8")
    codes = []
    for marker, mult in fmt.CODE_MARKERS.items():
        value = entry.get(f"{marker}_multiplier")
        if value:
            if int(value) & 0xFFFFFFFF != mult:
                raise ValueError(
                    f"{key}: {marker}_multiplier={int(value):#x} is not the {marker} codebook we implement ({mult:#x})"
                )
            codes.append(marker)
    if len(codes) > 1:
        raise ValueError(f"{key}: tensor_storage names both codebooks {codes}")
    return TrellisSpec(16, K, 1, codes[0] if codes else "3inst")


def read_storage(model_name: str, revision: str | None = None) -> dict[str, Any] | None:
    """``tensor_storage`` from ``quantization_config.json`` of a local dir (or the hub, where vLLM can fetch)."""
    data = None
    if model_name and os.path.isdir(model_name):
        path = os.path.join(model_name, STORAGE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
    elif model_name:
        import importlib

        for where in ("vllm.transformers_utils.repo_utils", "vllm.transformers_utils.config"):  # newer, older vLLM
            try:
                getter = importlib.import_module(where).get_hf_file_to_dict
            except (ImportError, AttributeError):
                continue
            data = getter(STORAGE_FILE, model_name, revision)
            break
    if data is None:
        return None
    storage = data.get("tensor_storage")
    if not isinstance(storage, Mapping):
        raise ValueError(f"{STORAGE_FILE} of {model_name} has no tensor_storage map")
    return dict(storage)


class Exl3Config(QuantizationConfig):
    """EXL3 weights for vLLM linear layers (see the module docstring)."""

    def __init__(self, quant_config: Mapping[str, Any] | None = None,
                 tensor_storage: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.quant_config = dict(quant_config or {"quant_method": QUANT_METHOD})
        if self.quant_config.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"Exl3Config got quant_method={self.quant_config.get('quant_method')!r}")
        self.tensor_storage: dict[str, Any] | None = None
        if tensor_storage is not None:
            self.set_storage(tensor_storage)

    def set_storage(self, tensor_storage: Mapping[str, Any]) -> None:
        specs = {}
        for key, entry in tensor_storage.items():
            if isinstance(entry, Mapping) and entry.get("quant_format") == QUANT_METHOD:
                specs[key] = spec_from_storage(key, entry)  # validate every record once, up front
        self.tensor_storage = dict(tensor_storage)
        self._specs = specs

    # ------------------------------------------------------------------ vLLM interface
    def __repr__(self) -> str:
        n = None if self.tensor_storage is None else len(self._specs)
        return f"Exl3Config(bits={self.quant_config.get('bits')}, quantized_modules={n})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json carries quantization_config; tensor_storage is read in maybe_update_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Exl3Config:
        return cls(config, config.get("tensor_storage"))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None, **_: Any) -> None:
        if self.tensor_storage is None:
            storage = read_storage(model_name, revision)
            if storage is not None:
                self.set_storage(storage)

    def specs(self) -> dict[str, TrellisSpec]:
        if self.tensor_storage is None:
            raise ValueError(
                f"exl3: no {STORAGE_FILE} with tensor_storage was found next to the model: it tells each module's "
                "K and codebook (exllamav3's converter writes it; so does qtip_triton.formats.exl3.write_checkpoint)"
            )
        return self._specs

    def logical_names(self, prefix: str, count: int | None = None) -> list[str]:
        last = prefix.rsplit(".", 1)[-1]
        names = self.packed_modules_mapping.get(last) or DEFAULT_PACKED.get(last) or [last]
        if count is not None and len(names) != count:
            raise ValueError(f"{prefix}: vLLM gives {count} output partitions but the parts are {names}")
        return list(names)

    def module_key(self, prefix: str, logical_name: str) -> str:
        parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        return f"{parent}.{logical_name}" if parent else logical_name

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        if isinstance(layer, ParallelLMHead):
            return Exl3LMHeadMethod(self, prefix) if prefix in self.specs() else None
        if not isinstance(layer, LinearBase):
            return None
        specs = self.specs()
        keys = [self.module_key(prefix, n) for n in self.logical_names(prefix)]
        quantized = [k in specs for k in keys]
        if not any(quantized):
            return UnquantizedLinearMethod()
        if not all(quantized):
            parts = ", ".join(f"{k}={'exl3' if q else 'plain'}" for k, q in zip(keys, quantized, strict=True))
            raise ValueError(f"{prefix}: vLLM fuses these into one layer but only some are EXL3-quantized ({parts})")
        return Exl3LinearMethod(self, prefix)


# --------------------------------------------------------------------------------------------- loading


def _trellis(geom: LayerGeometry, i: int, w: torch.Tensor) -> torch.Tensor:
    name = f"{geom.shard_prefix(i)}.trellis"
    spec, m, n = geom.specs[i], geom.full_out[i], geom.full_in
    if w.dtype != torch.int16 or w.dim() != 3:
        raise ValueError(f"{name} must be a 3-D int16 EXL3 trellis [in/16, out/16, 16K], got {w.dtype} {tuple(w.shape)}")
    want = (n // TILE, m // TILE, TILE * spec.K)
    if tuple(w.shape) != want:
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}, but {STORAGE_WHAT} says K={spec.K} for this "
            f"{m}x{n} (out x in) matrix, i.e. {want}"
        )
    if geom.kmax > spec.K:
        w = torch.nn.functional.pad(w, (0, TILE * (geom.kmax - spec.K)))
    return w


def _vector(size_of, what: str):
    def check(geom: LayerGeometry, i: int, w: torch.Tensor) -> torch.Tensor:
        size = size_of(geom, i)
        if w.dim() != 1 or w.shape[0] != size or not w.is_floating_point():
            raise ValueError(
                f"{geom.shard_prefix(i)}.{what} must be a floating-point vector of shape ({size},), "
                f"got {w.dtype} {tuple(w.shape)}"
            )
        return w.to(torch.float32)

    return check


def _marker(name: str):
    def check(geom: LayerGeometry, i: int, w: torch.Tensor) -> torch.Tensor:
        key = geom.shard_prefix(i)
        code = fmt.code_from_markers({name: w}, key)  # checks dtype/shape and the multiplier
        if geom.specs[i].code != code:
            raise ValueError(
                f"{key}.{name} marks the {code} codebook, but {STORAGE_WHAT} says {geom.specs[i].code}"
            )
        return torch.tensor(fmt.CODE_MARKERS[code], dtype=torch.int64)

    return check


CHECKS = {
    "trellis": _trellis,
    "suh": _vector(lambda geom, i: geom.full_in, "suh"),
    "svh": _vector(lambda geom, i: geom.full_out[i], "svh"),
    "mcg": _marker("mcg"),
    "mul1": _marker("mul1"),
}
LEGACY = {"su": "suh", "sv": "svh"}  # packed ±1 signs, unpacked into the fp scales


def own_target(param: torch.nn.Parameter, name: str, geom: LayerGeometry, i: int) -> torch.Tensor:
    """Where matrix i's tensor ``name`` goes, by this layer's own (stored, padded) offsets."""
    if isinstance(param, ShardSlotParameter):
        return param.data[i]
    o, p = geom.offsets[i], geom.local_out[i]
    if name == "trellis":
        return param.data[:, o // TILE : (o + p) // TILE]
    if name == "svh":
        return param.data[o : o + p]
    return param.data


class Exl3Loader:
    """A parameter's weight_loader: check and reshape the checkpoint tensor, then hand it to vLLM's loader.

    Layers loaded whole (replicated) or padded (stored sizes differ from vLLM's true sizes) are
    copied by our own offsets instead: vLLM's loaders would compute them from the true sizes.
    """

    def __init__(self, layer: torch.nn.Module, geom: LayerGeometry, name: str, inner, own: bool = False) -> None:
        self.layer, self.geom, self.name, self.inner, self.own = layer, geom, name, inner, own

    def __call__(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        geom = self.geom
        i = geom.shard_index(loaded_shard_id)
        w = CHECKS[self.name](geom, i, loaded_weight)
        if geom.replicated or self.own:
            target = own_target(param, self.name, geom, i)
            if target.shape != w.shape:
                raise ValueError(f"{geom.shard_prefix(i)}: cannot load {tuple(w.shape)} into {tuple(target.shape)}")
            target.copy_(w)
        elif loaded_shard_id is None:
            self.inner(param, w)
        else:
            self.inner(param, w, loaded_shard_id)
        self.layer.exl3_loaded.add((self.name, i))


class LegacySignsLoader:
    """Loader of the legacy ``su`` / ``sv`` names: unpack the int16 sign words, load them as suh / svh."""

    def __init__(self, layer: torch.nn.Module, geom: LayerGeometry, name: str) -> None:
        self.layer, self.geom, self.name = layer, geom, name

    def __call__(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        i = self.geom.shard_index(loaded_shard_id)
        signs = fmt.unpack_signs(loaded_weight, name=f"{self.geom.shard_prefix(i)}.{self.name}")
        target = getattr(self.layer, LEGACY[self.name])
        if loaded_shard_id is None:
            target.weight_loader(target, signs)
        else:
            target.weight_loader(target, signs, loaded_shard_id)


@register_weight_loader_v2
class Exl3LinearMethod(LinearMethodBase):
    """Linear method for EXL3-quantized layers (see the module docstring)."""

    def __init__(self, config: Exl3Config, prefix: str = "") -> None:
        self.config = config
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        prefix = getattr(layer, "prefix", "") or self.prefix
        names = self.config.logical_names(prefix, len(output_partition_sizes))
        specs = self.config.specs()
        geom = LayerGeometry(
            prefix=prefix,
            names=tuple(names),
            specs=tuple(specs[self.config.module_key(prefix, n)] for n in names),
            local_out=tuple(int(p) for p in output_partition_sizes),
            full_out=tuple(full_output_sizes(layer, list(output_partition_sizes), output_size)),
            local_in=int(input_size_per_partition),
            full_in=int(input_size),
            replicated=self.whole_tensors(layer),
        )
        pad = padding_of(geom)
        if pad is not None:
            geom = padded_geometry(geom)
            wrap_bias_loader(layer, pad)
        check_geometry(geom)
        inner = extra_weight_attrs.get("weight_loader")
        S, rows, n_loc = geom.shards, sum(geom.local_out), geom.local_in

        def loader(name: str) -> Exl3Loader:
            return Exl3Loader(layer, geom, name, inner, own=pad is not None)

        layer.register_parameter("trellis", PackedvLLMParameter(
            data=torch.empty(n_loc // TILE, rows // TILE, TILE * geom.kmax, dtype=torch.int16),
            input_dim=0, output_dim=1, packed_dim=1, packed_factor=TILE, weight_loader=loader("trellis"),
        ))
        layer.register_parameter("suh", ShardSlotParameter(
            data=torch.empty(S, n_loc, dtype=torch.float32), weight_loader=loader("suh"), input_dim=0))
        layer.register_parameter("svh", ChannelQuantScaleParameter(
            data=torch.empty(rows, dtype=torch.float32), output_dim=0, weight_loader=loader("svh")))
        for marker in MARKERS:
            layer.register_parameter(marker, ShardSlotParameter(
                data=torch.zeros(S, dtype=torch.int64), weight_loader=loader(marker)))
        for legacy in LEGACY:
            p = Parameter(torch.empty(0), requires_grad=False)
            p.weight_loader = LegacySignsLoader(layer, geom, legacy)
            layer.register_parameter(legacy, p)
        layer.exl3_geometry = geom
        layer.exl3_padding = pad
        layer.exl3_loaded = set()
        layer.exl3_load_format = current_load_format()
        layer.exl3_act_dtype = params_dtype
        batch_of(self.config).expect(layer)  # its warm-up joins the rest of the model's (warmup.LoadBatch)

    def whole_tensors(self, layer: torch.nn.Module) -> bool:
        """Whether checkpoint tensors are copied whole (no vLLM v2 loader to shard them)."""
        return isinstance(layer, ReplicatedLinear)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        geom: LayerGeometry = layer.exl3_geometry
        if not layer.exl3_loaded:
            if layer.exl3_load_format not in (None, "dummy"):
                raise ValueError(f"{geom.prefix}: no EXL3 tensors were loaded for this layer "
                                 f"(load_format={layer.exl3_load_format!r})")
            fill_dummy(layer, geom)
        else:
            check_complete(layer, geom)
        qws = []
        trellises = [layer.trellis.data[:, o // TILE : (o + p) // TILE, : TILE * spec.K].contiguous()
                     for spec, p, o in zip(geom.specs, geom.local_out, geom.offsets, strict=True)]
        flat = torch.cat([t.reshape(-1) for t in trellises])  # the runtime form: no Kmax padding
        suh, svh = layer.suh.data.contiguous(), layer.svh.data.contiguous()
        off = 0
        for i, (spec, p, o, t) in enumerate(zip(geom.specs, geom.local_out, geom.offsets, trellises, strict=True)):
            view = flat[off : off + t.numel()].view(t.shape)
            off += t.numel()
            try:
                qws.append(QuantizedWeight(spec, p, geom.local_in, view, suh[i], svh[o : o + p], None,
                                           layout="exl3", had_block=BLOCK))
            except ValueError as e:
                raise ValueError(f"{geom.shard_prefix(i)}: {e}") from None
        packed = PackedShards.from_qweights(qws, key=geom.prefix or f"exl3-layer-{id(layer)}")
        for name in ("trellis", "suh", "svh", *MARKERS, *LEGACY):
            delattr(layer, name)
        # the runtime form: the op's packed tensors (flat trellis, stacked suh, concatenated svh)
        layer.register_parameter("trellis", Parameter(packed.trellis, requires_grad=False))
        layer.register_parameter("suh", Parameter(packed.SU, requires_grad=False))
        layer.register_parameter("svh", Parameter(packed.SV, requires_grad=False))
        packed.register()  # validates the views once and lets the kernels prepare them now
        layer.exl3_packed = packed
        layer.exl3_shards = packed.shards()
        layer.exl3_op_meta = ops.op_args(packed)[1]
        # every kernel, every batch size the engine can send, compiled now (CUDA only); a padded layer adds
        # its bias outside the op
        warm_up_layer(packed, layer.exl3_act_dtype, prefix=geom.prefix,
                      bias=layer.exl3_padding is None and forward_passes_bias(layer), batch=batch_of(self.config),
                      layer=layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # one opaque custom op for the whole (fused) layer: traceable by torch.compile, capturable in graphs
        pad: Padding | None = getattr(layer, "exl3_padding", None)
        if pad is None:
            return torch.ops.qtip_triton.qtip_linear(x, layer.trellis, layer.suh, layer.svh, None, bias,
                                                     *layer.exl3_op_meta)
        # stored (padded) sizes: zero-pad the input, slice each matrix's output back to its true size
        if pad.stored_in != pad.true_in:
            x = torch.nn.functional.pad(x, (0, pad.stored_in - pad.true_in))
        y = torch.ops.qtip_triton.qtip_linear(x, layer.trellis, layer.suh, layer.svh, None, None,
                                              *layer.exl3_op_meta)
        parts = [y.narrow(-1, o, m) for o, m in zip(pad.stored_offsets, pad.true_out, strict=True)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return y if bias is None else y + bias


@dataclass(frozen=True)
class Padding:
    """True (config.json) vs stored (128-padded) sizes of a layer whose dims are not 128-multiples (TP=1)."""

    true_out: tuple[int, ...]
    stored_out: tuple[int, ...]
    true_in: int
    stored_in: int

    @property
    def stored_offsets(self) -> tuple[int, ...]:
        return tuple(sum(self.stored_out[:i]) for i in range(len(self.stored_out)))


def _up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def padding_of(geom: LayerGeometry) -> Padding | None:
    """The layer's padding (None if every dim is a 128-multiple); ValueError if TP splits a padded layer."""
    if not any(m % BLOCK for m in geom.full_out) and not geom.full_in % BLOCK:
        return None
    if geom.local_out != geom.full_out or geom.local_in != geom.full_in:
        raise ValueError(
            f"{geom.prefix}: true dims out={list(geom.full_out)}, in={geom.full_in} are not all multiples of "
            f"{BLOCK}, so the checkpoint stores them zero-padded to {BLOCK}; padded EXL3 layers are served "
            f"with tensor_parallel_size=1 only (this rank holds out={list(geom.local_out)}, in={geom.local_in}: "
            f"a TP slice of the true sizes does not line up with the padded {BLOCK}-wide Hadamard blocks)"
        )
    return Padding(tuple(geom.full_out), tuple(_up(m) for m in geom.full_out), geom.full_in, _up(geom.full_in))


def padded_geometry(geom: LayerGeometry) -> LayerGeometry:
    """The geometry at stored sizes: what the parameters, the checks and the kernels see."""
    out = tuple(_up(m) for m in geom.full_out)
    return dataclasses.replace(geom, local_out=out, full_out=out, local_in=_up(geom.local_in), full_in=_up(geom.full_in))


def wrap_bias_loader(layer: torch.nn.Module, pad: Padding) -> None:
    """vLLM creates the bias (true size) after create_weights with ``layer.weight_loader``: cut the checkpoint's
    padded bias back to the true size first (fused layers narrow each shard themselves)."""
    inner = getattr(layer, "weight_loader", None)
    if inner is None or len(pad.true_out) != 1:
        return
    true, stored = pad.true_out[0], pad.stored_out[0]

    def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
        if param.dim() == 1 and param.shape[0] == true and loaded_weight.dim() == 1 and loaded_weight.shape[0] == stored:
            loaded_weight = loaded_weight[:true]
        return inner(param, loaded_weight, *args, **kwargs)

    layer.weight_loader = weight_loader


def check_geometry(geom: LayerGeometry) -> None:
    """Every matrix and every rank's slice must hold whole 128-wide Hadamard blocks."""
    geom.check_blocks(BLOCK, f"EXL3 transforms work on {BLOCK}-wide blocks", "output features", "input features",
                      ": use a TP degree whose slices keep whole blocks")


def check_complete(layer: torch.nn.Module, geom: LayerGeometry) -> None:
    loaded = layer.exl3_loaded
    missing = []
    for i, spec in enumerate(geom.specs):
        key = geom.shard_prefix(i)
        missing += [f"{key}.{n}" for n in ("trellis", "suh", "svh") if (n, i) not in loaded]
        for marker in MARKERS:
            if spec.code == marker and (marker, i) not in loaded:
                missing.append(f"{key}.{marker} ({STORAGE_WHAT} says codebook {marker})")
    if missing:
        raise ValueError(f"EXL3 checkpoint lacks tensors: {', '.join(missing)}")


def fill_dummy(layer: torch.nn.Module, geom: LayerGeometry) -> None:
    """Valid random EXL3 tensors for ``load_format="dummy"``: random bits, ±1 suh, svh keeping RMS ~1."""
    dev = layer.trellis.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(zlib.crc32(geom.prefix.encode()))
    layer.trellis.data.view(torch.uint8).random_(0, 256, generator=gen)  # every bit pattern is valid

    def signs(*shape: int) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=gen, device=dev).to(torch.float32) * 2 - 1

    layer.suh.data.copy_(signs(*layer.suh.shape))
    layer.svh.data.copy_(signs(*layer.svh.shape) / (1.25 * math.sqrt(geom.full_in)))
    log = logger()
    getattr(log, "info_once", log.info)("exl3: no checkpoint tensors loaded (load_format='dummy'): random weights")


def register() -> None:
    """Register ``exl3`` with vLLM (called from :func:`qtip_triton.vllm.register`)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(Exl3Config)


class Exl3LMHeadMethod(Exl3LinearMethod):
    """A quantized ``lm_head`` (vLLM's ParallelLMHead): the same weights, loaded whole; TP=1 only for now.

    EXL3 pads the vocabulary to 128 and vLLM to 64: they must agree (true for common vocab sizes).
    With tied word embeddings vLLM skips ``lm_head.*`` and ties the head to the embedding: then the
    head is the plain embedding matrix, as in the unquantized model.
    """

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        if getattr(layer, "tp_size", 1) != 1:
            raise ValueError(
                f"{self.prefix}: a quantized EXL3 lm_head runs with tensor_parallel_size=1 only for now "
                "(re-quantize with head_bits=None to keep the head plain)"
            )
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        layer.exl3_tied = False

    def whole_tensors(self, layer: torch.nn.Module) -> bool:
        return True

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        for name in ("trellis", "suh", "svh", *MARKERS, *LEGACY):
            delattr(layer, name)
        layer.weight = embed_tokens.weight
        layer.exl3_tied = True
        return layer

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not layer.exl3_loaded and isinstance(getattr(layer, "weight", None), torch.Tensor):
            layer.exl3_tied = True  # older vLLM ties by assigning .weight without asking the method
        if not layer.exl3_tied:
            super().process_weights_after_loading(layer)
        else:  # the embedding's matrix: nothing of ours to warm, and the others' warm-ups need not wait for it
            batch_of(self.config).arrive(layer, None)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.exl3_tied:
            return torch.nn.functional.linear(x, layer.weight, bias)
        return super().apply(layer, x, bias)
