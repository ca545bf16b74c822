#!/bin/bash
# Run bench/e2e_logits.py on the GPU machine: logits of the real-weight QTIP checkpoint in vLLM 0.26 vs
# its dense equivalent (and the CPU reference of the expected difference).
#
# First, here: `python bench/real_llama_ckpt.py` (writes .e2e_ckpt/qtip-k2 + manifest.json, ~10 MB).
# Then ONE device call from the checkout root, carrying [".vllm_bundle", ".vllm_device", ".e2e_ckpt"]:
#
#   bash bench/e2e_logits_device.sh              # K=2: CPU reference, dense engine, QTIP engine (~4 min)
#   bash bench/e2e_logits_device.sh --K 4        # any bench/e2e_logits.py option passes through
#
# Same setup as bench/e2e_vllm_device.sh (bundle unpacked to /tmp/site, the plugin's entry point
# registered, this checkout on PYTHONPATH); results in $OUT/e2e-logits-<card>-<date>.{json,md}.
SCRIPT=bench/e2e_logits.py BUDGET=${BUDGET:-330} exec bash "$(dirname "$0")/e2e_vllm_device.sh" "$@"
