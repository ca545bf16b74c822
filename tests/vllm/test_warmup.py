"""Load-time kernel warm-up in the vLLM linear methods (QTIP and EXL3): which layers, which max M, when skipped.

The warm-up itself only runs on CUDA; here ``compiles_ahead`` is patched to say yes and
``registry.prepare`` is replaced by a recorder, so the real vLLM layers show what they would warm.
One test lets the real ``registry.prepare`` run (Triton interpreter, max M = 2) to pin the call's form.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm.model_executor")

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402

from qtip_triton import kernels, registry  # noqa: E402
from qtip_triton.vllm import compat, warmup  # noqa: E402
from tests.vllm import test_exl3_linear as exl3_layers  # noqa: E402
from tests.vllm import test_exl3_padding as exl3_padded  # noqa: E402
from tests.vllm import test_linear_method as qtip_layers  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_dist")]


@contextlib.contextmanager
def engine(max_num_batched_tokens=None, max_num_seqs=None, capture=None):
    """A current vLLM config with these scheduler / CUDA-graph settings (None: the release's default)."""
    cfg = VllmConfig()
    if max_num_seqs is not None:
        cfg.scheduler_config.max_num_seqs = max_num_seqs
    if max_num_batched_tokens is not None:
        cfg.scheduler_config.max_num_batched_tokens = max_num_batched_tokens
    if capture is not None:
        cfg.compilation_config.cudagraph_capture_sizes = list(capture)
        cfg.compilation_config.max_cudagraph_capture_size = max(capture)
    with set_current_vllm_config(cfg):
        yield cfg


@pytest.fixture
def recorder(monkeypatch):
    """Pretend kernels compile here (CUDA) and record registry.prepare calls instead of running them."""
    calls = []
    monkeypatch.setattr(warmup, "compiles_ahead", lambda device: True)
    monkeypatch.setattr(registry, "prepare", lambda qw, **kw: calls.append((qw, kw)))
    monkeypatch.setattr(warmup, "warm_op", lambda packed, dtype, max_m, prefix="", bias=False, rows=None:
                        FUSED.append((packed, max_m, bias)))
    monkeypatch.delenv(warmup.NO_WARMUP_ENV, raising=False)
    monkeypatch.delenv("QTIP_TRITON_NO_REGISTRY", raising=False)
    FUSED.clear()
    return calls


FUSED: list = []  # warm_op calls recorded by the ``recorder`` fixture


def qtip_layer(kind, gen, dtype=torch.float16, bias=False):
    layer, sids, shards, biases = qtip_layers.build(kind, gen, dtype, bias=bias)
    qtip_layers.load(layer, sids, shards, biases)
    return layer


def exl3_layer(kind, gen, dtype=torch.float16, bias=False):
    layer, sids, shards, biases = exl3_layers.build(kind, gen, dtype, bias=bias)
    exl3_layers.load(layer, sids, shards, biases)
    return layer


# ------------------------------------------------------------------------------ the engine's max M
def test_engine_max_tokens_reads_each_release_spelling():
    sched = SimpleNamespace(max_num_batched_tokens=8192, max_num_seqs=256)
    assert compat.engine_max_tokens(SimpleNamespace(scheduler_config=sched)) == (
        8192, "scheduler_config.max_num_batched_tokens=8192")
    # 0.26 / 0.33 capture fields, the pre-0.11 name, a list of sizes; the largest wins
    new = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=None, max_num_seqs=64),
                          compilation_config=SimpleNamespace(max_cudagraph_capture_size=512,
                                                             cudagraph_capture_sizes=[1, 2, 4, 512]))
    assert compat.engine_max_tokens(new) == (512, "compilation_config.max_cudagraph_capture_size=512")
    old = SimpleNamespace(compilation_config=SimpleNamespace(max_capture_size=None, cudagraph_capture_sizes=[8, 1, 16]))
    assert compat.engine_max_tokens(old) == (16, "compilation_config.cudagraph_capture_sizes=16")
    junk = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=True, max_num_seqs=0),
                           compilation_config=SimpleNamespace(cudagraph_capture_sizes=[]))
    assert compat.engine_max_tokens(junk) is None
    assert compat.engine_max_tokens(None) is None


def test_engine_max_m_from_the_installed_vllm_config():
    cfg = VllmConfig()
    want = max(cfg.scheduler_config.max_num_batched_tokens, cfg.scheduler_config.max_num_seqs)
    assert compat.engine_max_tokens(cfg)[0] == want  # this release's attribute names are the ones read
    with engine(max_num_batched_tokens=640, max_num_seqs=32):
        assert warmup.engine_max_m() == (640, "scheduler_config.max_num_batched_tokens=640")
    with engine(max_num_batched_tokens=96, max_num_seqs=96, capture=[1, 2, 4, 8, 200]):
        assert warmup.engine_max_m()[0] == 200


def test_default_max_m_without_a_vllm_config(monkeypatch):
    monkeypatch.setattr(compat, "current_vllm_config", lambda: None)
    assert warmup.engine_max_m() == (warmup.DEFAULT_MAX_M, f"no vLLM config: default {warmup.DEFAULT_MAX_M}")


# ------------------------------------------------------------------------------ what the layers warm
@pytest.mark.parametrize("kind", ["qkv", "merged", "column", "row"])
def test_qtip_process_weights_warms_every_shard_to_the_engine_max(kind, recorder, gen):
    layer = qtip_layer(kind, gen, bias=True)
    with engine(max_num_batched_tokens=384, max_num_seqs=48):
        layer.quant_method.process_weights_after_loading(layer)
    shards = layer.qtip_packed.shards()
    assert [qw for qw, _ in recorder] == shards and all(a is b for (a, _), b in zip(recorder, shards, strict=True))
    # a single-shard layer gets its bias inside the op (its own kernel variant); fused layers add it outside
    bias = len(shards) == 1
    assert [kw for _, kw in recorder] == [dict(max_m=384, dtypes=(torch.float16,), bias=bias)] * len(shards)
    # every layer also runs the op itself (transform launch variants, fused layers' grouped launches)
    assert [(layer.qtip_packed, 384, bias)] == FUSED


def test_warm_op_runs_the_op_once_per_launch_variant(gen, monkeypatch):
    """The real warm_op (interpreter): the op at each M of op_warm_rows, once per layer geometry."""
    from qtip_triton import ops

    seen = []
    real = ops.qtip_linear
    monkeypatch.setattr(ops, "qtip_linear", lambda x, packed, bias=None: seen.append(x.shape[0]) or real(x, packed, bias))
    layer = qtip_layer("qkv", gen)
    monkeypatch.setenv(warmup.NO_WARMUP_ENV, "1")  # process (pack) the layer without the automatic warm-up
    layer.quant_method.process_weights_after_loading(layer)
    warmup._OP_WARM.clear()
    warmup.warm_op(layer.qtip_packed, torch.float16, 5)
    # buckets 1, 2, 4 (3 and 4: same bucket, same classes), 8 (from 5)
    assert seen == warmup.op_warm_rows(layer.qtip_packed.shards(), 5) == [1, 2, 3, 5]
    warmup.warm_op(layer.qtip_packed, torch.float16, 5)
    assert seen == [1, 2, 3, 5]  # the same geometry is warmed once per process


def test_op_warm_rows_read_the_environment_once(monkeypatch):
    """The walk over every token count reads the QTIP_TRITON_* switches once, not once per token count (a third of
    its time before), and finds the same rows as unpinned queries do."""
    from types import SimpleNamespace

    shards = [SimpleNamespace(in_features=4096, out_features=o, blocks=lambda side: 1) for o in (4096, 1024, 1024)]
    reads = []
    real = kernels._read_switches
    monkeypatch.setattr(kernels, "_read_switches", lambda: reads.append(1) or real())
    rows = warmup.op_warm_rows(shards, 700)
    assert len(reads) == 1
    monkeypatch.setattr(kernels, "pinned_switches", contextlib.nullcontext)
    kernels._gather_after.cache_clear()
    assert warmup.op_warm_rows(shards, 700) == rows and len(reads) > 700


def test_op_warm_rows_cover_every_launch_key():
    """Every M up to the engine's largest batch shares its bucket, integer class and each transform's
    launch key with one warmed M, including the token counts where the transforms switch kernels."""
    from types import SimpleNamespace

    from qtip_triton.autotune.buckets import bucket_for, row_class
    from qtip_triton.kernels import WGMMA_FUSED_DECODE_ENV, gather_after_transform, wgmma_fused_decode_on
    from qtip_triton.kernels import hadamard as had

    shards = [SimpleNamespace(in_features=4096, out_features=o, blocks=lambda side: 1) for o in (4096, 1024, 1024)]
    rows = warmup.op_warm_rows(shards, 3000)
    assert rows == sorted(set(rows)) and len(rows) < 40

    def key(M):
        return (bucket_for(M), row_class(M), had.launch_key(4096, 1, M, 3, True), gather_after_transform(4096, 1, M, 3),
                wgmma_fused_decode_on(M), had._use_f16(None, torch.float16, torch.float32, M),
                *(had.launch_key(n, 1, M, g) for n in (4096, 1024) for g in (1, 3)))

    warmed = {key(M) for M in rows}
    assert all(key(M) in warmed for M in range(1, 3001))
    # the three shards' grouped wgmma input gathers from 3 x 32 >= 96 rows (the stacked natural launch's threshold)
    assert not gather_after_transform(4096, 1, 31, 3) and gather_after_transform(4096, 1, 32, 3)
    assert 32 in rows
    # fp32 partials switch to fp16 dots at 8 tokens (the F16 constant), where no row class or launch key changes
    assert had.F16_ENV_FP32_MIN_TOKENS == 8 and 8 in rows and row_class(7) == row_class(9)
    # the one-launch shards' switch point, wherever it falls: moved off a bucket edge, the first M past it is warmed
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(WGMMA_FUSED_DECODE_ENV, raising=False)
        mp.setattr("qtip_triton.kernels.WGMMA_FUSED_DECODE_MAX_ROWS", 100)
        moved = warmup.op_warm_rows(shards, 3000)
        assert 101 in moved and all(key(M) in {key(m) for m in moved} for M in range(1, 3001))
    # e.g. the natural-order input of 4096 features at 96 tokens (stacked kernel) and 80 (per-token) share a bucket
    # and no row class's first M: both are warmed
    big = [SimpleNamespace(in_features=4096, out_features=11008, blocks=lambda side: 1)]
    assert {80, 96} <= set(warmup.op_warm_rows(big, 3000))
    assert had.launch_key(4096, 1, 80, transpose=True)[0] != had.launch_key(4096, 1, 96, transpose=True)[0]
    assert bucket_for(80) == bucket_for(96)


def test_qtip_bf16_without_bias_and_default_max(recorder, gen, monkeypatch):
    monkeypatch.setattr(compat, "current_vllm_config", lambda: None)
    layer = qtip_layer("column", gen, dtype=torch.bfloat16, bias=False)
    layer.quant_method.process_weights_after_loading(layer)
    assert [kw for _, kw in recorder] == [dict(max_m=warmup.DEFAULT_MAX_M, dtypes=(torch.bfloat16,), bias=False)]


@pytest.mark.parametrize("kind", ["qkv", "row"])
def test_exl3_process_weights_warms_every_shard_to_the_engine_max(kind, recorder, gen):
    layer = exl3_layer(kind, gen, bias=True)
    with engine(max_num_batched_tokens=4096, max_num_seqs=256, capture=[1, 2, 512]):
        layer.quant_method.process_weights_after_loading(layer)
    shards = layer.exl3_packed.shards()
    assert len(recorder) == len(shards) and all(a is b for (a, _), b in zip(recorder, shards, strict=True))
    assert [kw for _, kw in recorder] == [dict(max_m=4096, dtypes=(torch.float16,), bias=len(shards) == 1)] * len(shards)


def test_exl3_padded_layer_adds_its_bias_outside_the_op(recorder, gen, monkeypatch):
    monkeypatch.setattr(torch, "get_default_dtype", lambda: torch.float16)  # vLLM builds layers in the model dtype
    with engine(max_num_batched_tokens=256):
        layer, *_ = exl3_padded.build("row", gen)
    assert layer.exl3_padding is not None and layer.bias is not None
    assert [kw for _, kw in recorder] == [dict(max_m=256, dtypes=(torch.float16,), bias=False)]


# ------------------------------------------------------------------------------ when it is skipped
def test_skipped_on_cpu(gen, monkeypatch):
    calls = []
    monkeypatch.setattr(registry, "prepare", lambda qw, **kw: calls.append(qw))
    for build in (qtip_layer, exl3_layer):
        layer = build("qkv", gen)
        layer.quant_method.process_weights_after_loading(layer)
        y, _ = layer(torch.randn(3, layer.input_size, generator=gen).half())
        assert torch.isfinite(y).all()
    assert calls == []  # the CPU (interpreter or not) compiles nothing ahead: no warm-up
    assert warmup.compiles_ahead(torch.device("cpu")) is False
    assert warmup.compiles_ahead(torch.device("cuda", 0)) is True


@pytest.mark.parametrize("env", [warmup.NO_WARMUP_ENV, "QTIP_TRITON_NO_REGISTRY"])
def test_env_var_turns_it_off(env, recorder, gen, monkeypatch):
    monkeypatch.setenv(env, "1")
    layer = qtip_layer("qkv", gen)
    layer.quant_method.process_weights_after_loading(layer)
    assert recorder == []


def test_float32_models_use_the_reference_path_and_skip_it(recorder, gen):
    layer = qtip_layer("qkv", gen, dtype=torch.float32)
    layer.quant_method.process_weights_after_loading(layer)
    assert recorder == []


def test_a_failing_warm_up_does_not_fail_loading(recorder, gen, monkeypatch):
    def boom(qw, **kw):
        recorder.append(qw)
        raise RuntimeError("out of resources")

    monkeypatch.setattr(registry, "prepare", boom)
    layer = qtip_layer("qkv", gen)
    layer.quant_method.process_weights_after_loading(layer)
    assert len(recorder) == 3  # every shard was tried
    y, _ = layer(torch.randn(2, layer.input_size, generator=gen).half())
    assert torch.isfinite(y).all()


@pytest.mark.skipif(not kernels.kernels_available("cpu")[0], reason="needs TRITON_INTERPRET=1 (make test sets it)")
def test_real_registry_prepare_call(gen, monkeypatch):
    """The real registry.prepare, in the interpreter, for M <= 2: selections and warm variants are in place."""
    monkeypatch.setattr(warmup, "compiles_ahead", lambda device: True)
    monkeypatch.delenv(warmup.NO_WARMUP_ENV, raising=False)
    monkeypatch.setattr(registry, "_default", None)
    layer = qtip_layer("column", gen, bias=True)
    with engine(max_num_batched_tokens=2, max_num_seqs=2):
        layer.quant_method.process_weights_after_loading(layer)
    reg = registry.get_registry()
    (qw,) = layer.qtip_packed.shards()
    assert sorted(b for (spec, m, n, b) in reg._memo if (spec, m, n) == (qw.spec, qw.out_features, qw.in_features)) \
        == [1, 2]
    warm = [k for k in reg._warm if k[1:4] == (qw.spec, qw.out_features, qw.in_features)]
    assert warm and all(k[-2] == torch.float16 and k[-1] is True for k in warm)  # fp16 activations, with bias
    y, _ = layer(torch.randn(2, layer.input_size, generator=gen).half())
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------------------ the parallel compile first
class Log:
    """Stands for vLLM's logger: records (level, formatted message)."""

    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda msg, *args: self.lines.append((level, msg % args))


@pytest.fixture
def pool(recorder, monkeypatch):
    """Record warmup_pool.compile_ahead_many calls (and the order against registry.prepare); log into a list."""
    from qtip_triton.autotune import warmup_pool

    warmup_pool.reset()
    log, calls = Log(), []

    def compile_ahead_many(requests, **kw):
        calls.append((list(requests), kw, len(recorder)))
        return warmup_pool.Result(compiled=7, workers=kw["workers"], seconds=1.5)

    monkeypatch.setattr(compat, "logger", lambda: log)
    monkeypatch.setattr(warmup_pool, "compile_ahead_many", compile_ahead_many)
    yield SimpleNamespace(calls=calls, log=log, mod=warmup_pool)
    warmup_pool.reset()


def test_layer_is_compiled_in_parallel_before_the_serial_warm_up(pool, recorder, gen, monkeypatch):
    monkeypatch.setenv(pool.mod.JOBS_ENV, "5")
    layer = qtip_layer("column", gen, bias=True)
    with engine(max_num_batched_tokens=384, max_num_seqs=48):
        layer.quant_method.process_weights_after_loading(layer)
    ((req,), kw, prepared_before), = pool.calls
    assert list(req.shards) == layer.qtip_packed.shards() and req.dtype == torch.float16 and prepared_before == 0
    assert (req.bias, req.max_m, kw) == (True, 384, dict(workers=5))  # the bias flag and max M prepare() gets
    assert req.op_rows == ()  # one shard: its op launches nothing the shard's own jobs do not
    assert [k for _, k in recorder] == [dict(max_m=384, dtypes=(torch.float16,), bias=True)]
    info = [m for lvl, m in pool.log.lines if lvl == "info" and "in parallel" in m]
    assert len(info) == 1 and "compiled 7 kernel variants" in info[0] and "(5 worker processes) in 1.5 s" in info[0]


def test_fused_layer_compiles_without_bias(pool, recorder, gen):
    layer = qtip_layer("qkv", gen, bias=True)
    with engine(max_num_batched_tokens=64):
        layer.quant_method.process_weights_after_loading(layer)
    ((req,), kw, _), = pool.calls
    assert len(req.shards) == 3 and req.bias is False and kw["workers"] == pool.mod.warmup_workers()[0]
    assert list(req.op_rows) == warmup.op_warm_rows(list(req.shards), req.max_m)  # the rows warm_op runs the op at


def test_op_rows_are_walked_once_per_distinct_layer(pool, recorder, gen, monkeypatch):
    """``op_warm_rows`` walks up to 8192 token counts (~1 s of CPU a layer): the pool's plan and ``warm_op`` share one
    walk per distinct layer, and get the same rows."""
    walks, ran = [], []
    real = warmup.op_warm_rows
    monkeypatch.setattr(warmup, "op_warm_rows", lambda shards, max_m: walks.append(len(shards)) or real(shards, max_m))
    monkeypatch.setattr(warmup, "warm_op", lambda packed, dtype, max_m, prefix="", bias=False, rows=None:
                        ran.append((len(packed.shards()), rows)))
    monkeypatch.setenv(warmup.NO_WARMUP_ENV, "1")  # pack the layers without their automatic warm-up
    layers = [qtip_layer("qkv", gen), qtip_layer("row", gen), qtip_layer("qkv", gen)]
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
    monkeypatch.delenv(warmup.NO_WARMUP_ENV)
    warmup.warm_up_layers([warmup.PendingWarmup(layer.qtip_packed, torch.float16, False, 64) for layer in layers])
    assert sorted(walks) == [1, 3]  # two distinct layers, one walk each
    qkv_rows, row_rows = (real(layers[i].qtip_packed.shards(), 64) for i in (0, 1))
    (requests, _, _), = pool.calls
    assert [list(r.op_rows) for r in requests] == [qkv_rows, []]  # a single shard sends no op jobs
    assert ran == [(3, qkv_rows), (1, row_rows), (3, qkv_rows)] and len(qkv_rows) > 3
    # a later warm-up in this process: a single-shard layer whose op is warmed already needs no walk (the pool takes
    # no op rows from it); a fused one still gives its rows to the pool's plan
    monkeypatch.setattr(warmup, "_OP_WARM", {warmup.layer_key(layers[1].qtip_packed, torch.float16, False)})
    walks.clear()
    warmup.warm_up_layers([warmup.PendingWarmup(layer.qtip_packed, torch.float16, False, 64) for layer in layers[:2]])
    assert walks == [3]


def test_pool_failure_falls_back_to_serial_with_one_warning(pool, recorder, gen, monkeypatch):
    tried = []

    def no_pool(requests, **kw):
        if pool.mod._pool_off is not None:  # what the real one does once it failed
            return None
        tried.append(1)
        raise pool.mod.PoolUnavailable("daemonic processes are not allowed to have children")

    monkeypatch.setattr(pool.mod, "compile_ahead_many", no_pool)
    for kind in ("qkv", "row"):  # two layers: one attempt, one warning
        layer = qtip_layer(kind, gen)
        layer.quant_method.process_weights_after_loading(layer)
    assert tried == [1] and len(recorder) == 4  # every shard of both layers still warmed serially
    warnings = [m for lvl, m in pool.log.lines if lvl == "warning"]
    assert len(warnings) == 1 and "daemonic" in warnings[0] and "serially" in warnings[0]


def test_serial_env_and_cpu_do_not_start_a_pool(recorder, gen, monkeypatch):
    from qtip_triton.autotune import warmup_pool

    warmup_pool.reset()
    started = []
    monkeypatch.setattr(warmup_pool, "run_driver", lambda *a, **k: started.append(a))
    layer = qtip_layer("qkv", gen)  # CPU shards: compile_ahead itself declines (the warm-up is faked as CUDA here)
    layer.quant_method.process_weights_after_loading(layer)
    monkeypatch.setattr(warmup_pool, "_on_cuda", lambda device: True)
    monkeypatch.setenv(warmup_pool.JOBS_ENV, "1")
    layer = qtip_layer("row", gen)
    layer.quant_method.process_weights_after_loading(layer)
    assert started == [] and len(recorder) == 4


# ------------------------------------------------------------------------------ one warm-up for the whole model
def model_layers(kinds, gen, config=None):
    """Layers one quantization config creates, as vLLM builds a model: all created before any loads."""
    config = config or qtip_layers.QTIPConfig(qtip_layers.QP)
    built = []
    for kind in kinds:
        ctor, sids, _ = qtip_layers.LAYERS[kind]
        layer = ctor(config, False, torch.float16)
        shards = qtip_layers.checkpoint_shards(gen, kind)
        qtip_layers.load(layer, sids, shards)
        built.append(layer)
    return config, built


def test_a_models_layers_warm_together_once_the_last_has_loaded(pool, recorder, gen, monkeypatch):
    monkeypatch.setenv(pool.mod.JOBS_ENV, "6")
    _, layers = model_layers(["qkv", "row", "merged", "qkv"], gen)
    with engine(max_num_batched_tokens=128):
        for layer in layers[:-1]:
            layer.quant_method.process_weights_after_loading(layer)
            assert recorder == [] and pool.calls == []  # waits for the rest of the model
        layers[-1].quant_method.process_weights_after_loading(layers[-1])
    # one pool run for the distinct layers (the two q/k/v layers are one geometry), before any prepare
    (requests, kw, prepared_before), = pool.calls
    assert kw == dict(workers=6) and prepared_before == 0
    assert [len(r.shards) for r in requests] == [3, 1, 2] and {r.max_m for r in requests} == {128}
    assert [list(r.shards) for r in requests] == [x.qtip_packed.shards() for x in layers[:3]]
    # then every shard of every layer is prepared, and every layer's op is warmed
    assert [qw for qw, _ in recorder] == [qw for x in layers for qw in x.qtip_packed.shards()]
    assert [packed for packed, _, _ in FUSED] == [x.qtip_packed for x in layers]
    assert any("warmed 4 layers (3 distinct, M <= 128)" in m for lvl, m in pool.log.lines if lvl == "info")


def test_a_layer_dropped_before_loading_does_not_hold_the_warm_up(recorder, gen):
    import gc

    _, layers = model_layers(["column", "row"], gen)
    del layers[1]
    gc.collect()
    layers[0].quant_method.process_weights_after_loading(layers[0])
    assert [qw for qw, _ in recorder] == layers[0].qtip_packed.shards()


def test_a_layer_that_never_loads_leaves_the_warm_up_to_the_first_forward(recorder, gen):
    from qtip_triton import ops

    _, (first, never) = model_layers(["column", "row"], gen)
    with engine(max_num_batched_tokens=640):
        first.quant_method.process_weights_after_loading(first)
    assert recorder == [] and ops._BEFORE_FIRST_RUN  # still waiting for `never`
    y, _ = first(torch.randn(2, first.input_size, generator=gen).half())  # outside the engine's config
    assert torch.isfinite(y).all()
    assert [qw for qw, _ in recorder] == first.qtip_packed.shards() and not ops._BEFORE_FIRST_RUN
    assert recorder[0][1]["max_m"] == 640  # the engine's max M, read while the layer loaded
    y, _ = first(torch.randn(2, first.input_size, generator=gen).half())  # warmed once only
    assert len(recorder) == 1


def test_the_first_forward_does_not_warm_inside_a_graph_capture(recorder, gen, monkeypatch):
    from qtip_triton import ops

    _, (first, never) = model_layers(["column", "row"], gen)
    first.quant_method.process_weights_after_loading(first)
    x = torch.randn(2, first.input_size, generator=gen).half()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ops._run_first_hooks(x)
    assert recorder == [] and ops._BEFORE_FIRST_RUN  # left for the next eager launch
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    ops._run_first_hooks(x)
    assert len(recorder) == 1 and not ops._BEFORE_FIRST_RUN


def test_batch_env_off_warms_each_layer_as_it_loads(recorder, gen, monkeypatch):
    monkeypatch.setenv(warmup.BATCH_ENV, "0")
    _, (first, second) = model_layers(["column", "row"], gen)
    first.quant_method.process_weights_after_loading(first)
    assert [qw for qw, _ in recorder] == first.qtip_packed.shards()


def test_layers_skipped_by_the_warm_up_still_count_as_loaded(recorder, gen, monkeypatch):
    calls = []
    monkeypatch.setattr(warmup, "compiles_ahead", lambda device: device.type == "meta")  # no layer here warms
    monkeypatch.setattr(warmup, "warm_up_layers", lambda entries: calls.append(list(entries)))
    config, (first, second) = model_layers(["column", "row"], gen)
    for layer in (first, second):
        layer.quant_method.process_weights_after_loading(layer)
    assert calls == [] and warmup.batch_of(config).waiting == 0 and len(warmup.batch_of(config)._expected) == 0


def test_exl3_tied_head_does_not_hold_the_models_warm_up(recorder, gen):
    """A head tied to the embedding has nothing to warm, yet it was created: its loading must count."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    storage = {"lm_head": {"quant_format": "exl3", "bits_per_weight": 4, "mul1_multiplier": exl3_layers.fmt.MUL1_MULT}}
    qc = exl3_layers.Exl3Config(None, storage)
    head = ParallelLMHead(256, 128, params_dtype=torch.float16, quant_config=qc, prefix="lm_head")
    body = ParallelLMHead(256, 128, params_dtype=torch.float16, quant_config=qc, prefix="lm_head")  # one that warms
    _, tensors = exl3_layers.random_module(gen, 256, 128, 4, "mul1")
    params = dict(body.named_parameters())
    for name, t in tensors.items():
        params[name].weight_loader(params[name], t)
    body.quant_method.process_weights_after_loading(body)
    assert recorder == [] and warmup.batch_of(qc).waiting == 1  # waits for `head`
    embed = VocabParallelEmbedding(256, 128)
    head = head.tie_weights(embed)
    head.quant_method.process_weights_after_loading(head)
    assert [qw for qw, _ in recorder] == body.exl3_packed.shards()


def test_the_warm_up_reports_what_compiled_after_the_pool(recorder, gen, monkeypatch):
    """The serial part after the pool should only load binaries: what it compiles itself (here a fake
    ``triton.compile`` inside each shard's prepare) is counted per kernel and named in the log line."""
    knobs = pytest.importorskip("triton.knobs")
    if not hasattr(knobs.compilation, "listener"):
        pytest.skip("Triton without a compilation listener")
    log = Log()

    def prepare(qw, **kw):
        recorder.append((qw, kw))
        knobs.compilation.listener(src=None, metadata={"name": "_missed_kernel"}, metadata_group={},
                                   times=SimpleNamespace(total=1_500_000), cache_hit=False)
        knobs.compilation.listener(src=None, metadata={"name": "_pooled_kernel"}, metadata_group={},
                                   times=SimpleNamespace(total=2_000), cache_hit=True)

    monkeypatch.setattr(compat, "logger", lambda: log)
    pooled = [7]
    monkeypatch.setattr(warmup, "compile_layers_in_parallel", lambda layers, op_rows=None: pooled[0])
    monkeypatch.setattr(registry, "prepare", prepare)
    monkeypatch.setenv(warmup.NO_WARMUP_ENV, "1")  # pack the layers without their automatic warm-up
    layers = [qtip_layer("qkv", gen), qtip_layer("row", gen)]
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
    monkeypatch.delenv(warmup.NO_WARMUP_ENV)
    before = knobs.compilation.listener
    report = warmup.warm_up_layers([warmup.PendingWarmup(layer.qtip_packed, torch.float16, False, 32)
                                    for layer in layers])
    shards = sum(len(layer.qtip_packed.shards()) for layer in layers)
    assert (report.max_m, report.layers, report.distinct, report.pool_compiled) == (32, 2, 2, 7)
    assert [e.name for e in report.watch.compiled] == ["_missed_kernel"] * shards == ["_missed_kernel"] * 4
    assert len(report.watch.loaded) == shards and knobs.compilation.listener is before
    level, line = log.lines[-1]
    assert level == "info" and line.endswith(f"after the pool: {shards} compiled here ({1.5 * shards:.1f} s: "
                                             f"_missed_kernel x{shards}), {shards} loaded from the cache (0.0 s)")
    # one layer alone logs at debug level, unless a pool ran and still left it kernels to build
    warmup.warm_up_layers([warmup.PendingWarmup(layers[1].qtip_packed, torch.float16, False, 32)])
    assert log.lines[-1][0] == "info" and "after the pool: 1 compiled here" in log.lines[-1][1]
    pooled[0] = None  # no pool (one worker, or it failed): building here is the plan
    warmup.warm_up_layers([warmup.PendingWarmup(layers[1].qtip_packed, torch.float16, False, 32)])
    assert log.lines[-1][0] == "debug" and "without the pool: 1 compiled here" in log.lines[-1][1]


def test_plugin_logger_without_vllm_is_a_plain_one(monkeypatch):
    """The warm-up also runs without vLLM (its GPU test, other runtimes): the logger must not need it."""
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    assert compat.logger().name == "qtip_triton.vllm"


def test_plugin_logger_uses_vllms_handlers():
    """vLLM configures handlers for its ``vllm`` logger only: ours must sit under it or INFO lines vanish."""
    import logging

    vllm_root = logging.getLogger("vllm")
    log = compat.logger()
    assert log.name.startswith("vllm.")
    assert log.parent is vllm_root  # so records reach the handlers vLLM installs there


def test_the_warm_up_says_where_its_time_went(recorder, gen, monkeypatch):
    """The engine-start line splits the warm-up: the ops' row plans, the pool, the shards' prepare (and the part of it
    spent on layers repeating a geometry an earlier layer had) and the ops' walks, each timed where it ran."""
    import time as _time

    log = Log()
    monkeypatch.setattr(compat, "logger", lambda: log)
    monkeypatch.setattr(warmup, "compile_layers_in_parallel",
                        lambda layers, op_rows=None: _time.sleep(0.3) or len(layers))
    monkeypatch.setattr(registry, "prepare", lambda qw, **kw: _time.sleep(0.02))
    ops_run = []
    monkeypatch.setattr(warmup, "warm_op", lambda packed, dtype, max_m, prefix="", bias=False, rows=None:
                        ops_run.append(packed) or _time.sleep(0.1))
    monkeypatch.setenv(warmup.NO_WARMUP_ENV, "1")  # pack the layers without their automatic warm-up
    layers = [qtip_layer("qkv", gen), qtip_layer("qkv", gen), qtip_layer("row", gen)]
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
    monkeypatch.delenv(warmup.NO_WARMUP_ENV)
    report = warmup.warm_up_layers([warmup.PendingWarmup(layer.qtip_packed, torch.float16, False, 32)
                                    for layer in layers])
    assert (report.layers, report.distinct, report.pool_compiled) == (3, 2, 2)
    # 3 + 3 + 1 shards at 20 ms; the second q/k/v layer repeats the first's geometry: its 3 shards are the repeat
    # (upper bounds: slack for a loaded machine, below what any part counted twice or in the wrong place would add)
    assert 0.14 <= report.shard_seconds < 0.35 and 0.06 <= report.repeat_seconds < report.shard_seconds - 0.08
    assert len(ops_run) == 3 and 0.3 <= report.op_seconds < 0.55  # warm_op's own once-per-geometry check is inside it
    assert 0.3 <= report.pool_seconds < 0.55 and report.rows_seconds < report.pool_seconds
    parts = (report.rows_seconds, report.pool_seconds, report.shard_seconds, report.op_seconds)
    assert sum(parts) <= report.seconds < sum(parts) + 0.1
    level, line = log.lines[-1]
    assert level == "info" and (f"(row plans {report.rows_seconds:.1f} s, pool {report.pool_seconds:.1f} s, shards "
                                f"{report.shard_seconds:.1f} s ({report.repeat_seconds:.1f} s of it in 1 layer repeating "
                                f"a geometry), op walks {report.op_seconds:.1f} s); after the pool: ") in line
