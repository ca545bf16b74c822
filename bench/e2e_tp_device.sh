#!/bin/bash
# Run bench/e2e_tp.py on a 2-GPU machine: the real-weight QTIP TP checkpoint in vLLM 0.26 at TP=2 (NCCL)
# and at TP=1, each vs the dense (dequantized) model in torch, greedy tokens TP=2 vs TP=1, decode tok/s.
#
# First, here (CPU, ~17 min on 2 cores): `python bench/real_llama_ckpt.py --tp 2`
#   -> .e2e_ckpt_tp/qtip-k2-tp2 + manifest.json (~10 MB, git-ignored; the dense twin stays in .e2e_ckpt_local/
#   and is rebuilt on the device from the QTIP files, checked against the manifest's SHA-256).
# Then ONE device call from the checkout root:
#
#   command:   bash bench/e2e_tp_device.sh
#   kind:      nvidia-h200-x2            (2 GPUs of one host)
#   carry:     [".vllm_bundle", ".vllm_device", ".e2e_ckpt_tp"]     (~25 + 0.1 + 10 MB; NOT .e2e_ckpt)
#   timeout_s: 600
#
# Expected: 4-6 minutes after the machine starts: bundle unpack + plugin check ~15 s, CPU reference ~15 s,
# TP=2 engine ~120-180 s (vLLM import, torch.compile, QTIP kernel warm-up, CUDA graphs, 2 workers),
# TP=1 engine ~90-150 s. BUDGET (default 500 s, counted after the setup) bounds the python run: it starts
# no engine with less than 90 s left and kills a running one at the budget, and a failed TP=2 engine is
# retried once with every all-reduce through NCCL if time allows. Everything stays under 540 s.
# Results: $OUT/e2e-tp-<card>-<date>.{json,md} and ...-engines.log (each engine's vLLM output).
# Any bench/e2e_tp.py option passes through (e.g. `--nccl-only`, `--eager`, `--prompts 2`).
#
# NVLink multicast stays off (the machine's rule), for this shell and everything it starts; device_setup.sh
# and bench/e2e_tp.py set the same variables.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -f "$(dirname "$0")/../.e2e_ckpt_tp/qtip-k2-tp2/config.json" ] || {
  echo "missing .e2e_ckpt_tp/qtip-k2-tp2: run bench/real_llama_ckpt.py --tp 2 here and carry .e2e_ckpt_tp"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
SCRIPT=bench/e2e_tp.py BUDGET=${BUDGET:-500} exec bash "$(dirname "$0")/e2e_vllm_device.sh" "$@"
