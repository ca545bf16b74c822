"""Run vLLM models and layers on CPU without the engine (whose CPU build is not installed).

* ``init_dist``: vLLM's distributed state (gloo) for world size W, inside a VllmConfig context;
* ``build_model``: ``LlamaForCausalLM`` from a model directory, optionally loading its checkpoint
  through vLLM's own ``load_weights`` (mappers, stacked q/k/v, v2 loaders) and post-processing;
* attention is swapped for a plain causal SDPA over one sequence (vLLM's attention needs KV
  caches and a forward context that only the engine provides): everything else is vLLM's code.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


class CausalSDPA(torch.nn.Module):
    """q, k, v of one sequence [T, heads*dim] -> causal attention output, GQA by repetition."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.h, self.kv, self.d, self.scale = num_heads, num_kv_heads, head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[0]
        q = q.view(T, self.h, self.d).transpose(0, 1)
        k = k.view(T, self.kv, self.d).transpose(0, 1).repeat_interleave(self.h // self.kv, 0)
        v = v.view(T, self.kv, self.d).transpose(0, 1).repeat_interleave(self.h // self.kv, 0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return o.transpose(0, 1).reshape(T, self.h * self.d)


def init_dist(world_size: int = 1, rank: int = 0, init_file: str | None = None) -> contextlib.ExitStack:
    """Initialize vLLM's distributed groups (gloo). Returns the ExitStack holding the config context."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    stack = contextlib.ExitStack()
    stack.enter_context(set_current_vllm_config(VllmConfig()))
    if init_file is None:
        import shutil
        import tempfile

        init_dir = tempfile.mkdtemp(prefix="qtip_dist_")
        stack.callback(shutil.rmtree, init_dir, ignore_errors=True)  # closed with the groups' context
        init_file = os.path.join(init_dir, "dist")
    init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank,
                                 distributed_init_method=f"file://{init_file}", backend="gloo")
    initialize_model_parallel(tensor_model_parallel_size=world_size)
    return stack


def engine_config(model_dir: str | Path, *, quantization: str | None = None, tp: int = 1,
                  dtype: str = "float32", load_format: str = "auto"):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, enforce_eager=True, quantization=quantization,
        tensor_parallel_size=tp, load_format=load_format, distributed_executor_backend="mp" if tp > 1 else None,
        compilation_config={"custom_ops": ["none"]},  # the CPU wheel lacks vLLM's compiled _C ops
    ).create_engine_config()


def build_model(model_dir: str | Path, *, quantization: str | None = None, tp: int = 1, dtype: str = "float32",
                load: bool = True, load_format: str = "auto"):
    """LlamaForCausalLM from ``model_dir`` (loaded and post-processed when ``load``); attention swapped."""
    from safetensors import safe_open
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.llama import LlamaForCausalLM

    vc = engine_config(model_dir, quantization=quantization, tp=tp, dtype=dtype, load_format=load_format)
    with set_current_vllm_config(vc):
        with torch.device("cpu"):
            model = LlamaForCausalLM(vllm_config=vc)
        if load:
            def weights():
                for path in sorted(Path(model_dir).glob("*.safetensors")):
                    with safe_open(str(path), framework="pt") as f:
                        for name in f.keys():  # noqa: SIM118
                            yield name, f.get_tensor(name)

            model.load_weights(weights())
        elif load_format == "dummy":  # what LLM(load_format="dummy") does: random values, no checkpoint
            from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

            DummyModelLoader(vc.load_config).load_weights(model, vc.model_config)
        process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    for layer in model.model.layers:
        a = layer.self_attn
        a.attn = CausalSDPA(a.num_heads, a.num_kv_heads, a.head_dim, a.scaling)
    return model, vc


@torch.no_grad()
def logits(model, vc, ids: torch.Tensor) -> torch.Tensor:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vc):
        hidden = model(ids, torch.arange(ids.shape[0]))
        return model.compute_logits(hidden)


@torch.no_grad()
def hf_logits(model_dir: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """The transformers implementation's logits (float64): the reference."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float64).eval()
    return model(ids[None]).logits[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run_jobs(rank: int, world_size: int, jobs: list[dict], out_dir: str) -> None:
    """Build and run each job's model on this rank; rank 0 saves logits (or the error) per job."""
    import traceback

    for job in jobs:
        result: dict = {}
        try:
            model, vc = build_model(job["model"], quantization=job.get("quantization"), tp=world_size,
                                    load_format=job.get("load_format", "auto"), load=job.get("load", True))
            out = logits(model, vc, job["ids"])
            if rank == 0:
                result["logits"] = out
        except Exception as e:  # reported to the parent test, which decides
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()
        if rank == 0 or "error" in result:
            torch.save(result, os.path.join(out_dir, f"{job['name']}.rank{rank}.pt"))


def tp_server(rank: int, world_size: int, init_file: str, inbox, done) -> None:
    """One TP rank that stays up: each (out_dir, jobs) from ``inbox`` is run, then reported on ``done``.

    Starting a rank (spawn, vLLM's import, gloo's rendezvous) costs ~20 s of two cores; the suite's
    tensor-parallel tests share one set of ranks instead of starting their own.
    """
    init_dist(world_size, rank, init_file)
    while (item := inbox.get()) is not None:
        out_dir, jobs = item
        _run_jobs(rank, world_size, jobs, out_dir)
        done.put(rank)


def _collect(out_dir: str, jobs: list[dict], world_size: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for job in jobs:
        for r in range(world_size):
            path = os.path.join(out_dir, f"{job['name']}.rank{r}.pt")
            if os.path.exists(path):
                res = torch.load(path, weights_only=False)
                if "error" in res or r == 0:
                    results.setdefault(job["name"], {}).update(res)
    return results


class TPRanks:
    """``world_size`` ranks started once and reused by every ``run`` (see ``tp_server``)."""

    def __init__(self, world_size: int = 2) -> None:
        import tempfile

        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.dir = tempfile.mkdtemp(prefix="qtip_tp_ranks_")
        self._runs = 0
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._done = ctx.Queue()
        self._procs = [ctx.Process(target=tp_server, daemon=True,
                                   args=(r, world_size, os.path.join(self.dir, "dist"), q, self._done))
                       for r, q in enumerate(self._inboxes)]
        for p in self._procs:
            p.start()

    def _exit_codes(self) -> list[int | None]:
        return [p.exitcode for p in self._procs if not p.is_alive()]

    def run(self, jobs: list[dict], timeout: float = 600) -> dict[str, dict]:
        """Each job's rank-0 result (logits) or any rank's error, by job name."""
        import queue
        import time

        dead = self._exit_codes()
        if dead:
            raise RuntimeError(f"a TP rank has exited (exit codes {dead}); later runs cannot use these ranks")
        self._runs += 1
        out_dir = os.path.join(self.dir, f"run{self._runs}")
        os.makedirs(out_dir)
        for q in self._inboxes:
            q.put((out_dir, jobs))
        deadline, finished = time.monotonic() + timeout, 0
        while finished < self.world_size:
            try:
                self._done.get(timeout=5)
                finished += 1
            except queue.Empty:
                dead = self._exit_codes()
                if dead:
                    raise RuntimeError(f"TP rank exited with {dead}") from None
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError("TP ranks hung") from None
        return _collect(out_dir, jobs, self.world_size)

    def close(self) -> None:
        import shutil

        for q in self._inboxes:
            q.put(None)
        for p in self._procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_tp(jobs: list[dict], world_size: int = 2, timeout: float = 600) -> dict[str, dict]:
    """Run ``jobs`` on ``world_size`` ranks started for them alone (``TPRanks``, closed afterwards)."""
    ranks = TPRanks(world_size)
    try:
        return ranks.run(jobs, timeout)
    finally:
        ranks.close()
