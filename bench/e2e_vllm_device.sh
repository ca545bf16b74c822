#!/bin/bash
# Run bench/e2e_vllm.py on the GPU machine (no vLLM installed there, no network).
#
# From the checkout root, in ONE device call, with the vLLM 0.26 bundle and the device scripts
# sent along (see /work/shared/tools/vllm-on-device/README.md: `.vllm_bundle/` built by
# build_bundle.sh, `.vllm_device/` = a copy of that tools folder; both git-excluded, so name them
# in the call's `carry`):
#
#   bash bench/e2e_vllm_device.sh                          # all shapes x fp16,K2,K3,K4, batches 1,8,16
#   bash bench/e2e_vllm_device.sh --shapes llama3-8b       # any bench/e2e_vllm.py option passes through
#   QUICK=1 bash bench/e2e_vllm_device.sh                  # first a ~1 min eager plugin check on a tiny model
#   bash bench/e2e_vllm_device.sh --shapes llama2-7b --formats fp16,2 --batches 1,16 --profile-batch 1 \
#        --prefill-len 1024                                # + GPU time per kernel of a decode step, + prefill
#   SCRIPT=bench/e2e_logits.py bash bench/e2e_vllm_device.sh   # another bench script, same setup
#                                                          # (bench/e2e_logits_device.sh does this)
#
# What it does: unpack the bundle into /tmp/site (device_setup.sh), register the qtip plugin's
# entry point there (a dist-info with entry_points.txt; the package itself is imported from this
# checkout through PYTHONPATH, in the API process and in EngineCore alike), then run the benchmark
# with results in $OUT (JSON + markdown).
set -u
cd "${REPO_ROOT:-$(dirname "$0")/..}" || exit 2
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
DEVICE_DIR=${VLLM_DEVICE_DIR:-.vllm_device}
[ -f "$DEVICE_DIR/device_setup.sh" ] || { echo "missing $DEVICE_DIR/device_setup.sh (copy the vllm-on-device tools)"; exit 2; }
# shellcheck disable=SC1091
source "$DEVICE_DIR/device_setup.sh" "${VLLM_BUNDLE:-.vllm_bundle/vllm-0.26.0-site.tar.xz}" || exit 2
SITE=${VLLM_SITE:-/tmp/site}
DIST="$SITE/qtip_triton-0.1.0.dist-info"
mkdir -p "$DIST"
printf 'Metadata-Version: 2.1\nName: qtip-triton\nVersion: 0.1.0\n' > "$DIST/METADATA"
printf '[vllm.general_plugins]\nqtip = qtip_triton.vllm:register\n' > "$DIST/entry_points.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "
from importlib.metadata import entry_points
eps = [e.value for e in entry_points(group='vllm.general_plugins')]
assert 'qtip_triton.vllm:register' in eps, eps
import qtip_triton, qtip_triton.ops
print('[e2e_vllm_device] plugin entry point visible:', eps)
" || exit 3
BUDGET=${BUDGET:-560}
T0=$(date +%s)
if [ -n "${QUICK:-}" ]; then
  timeout -k 10 240 python3 bench/e2e_vllm.py --shapes tiny --formats 2 --batches 1 --decode-tokens 32 \
    --reps 1 --eager --out "$OUT/quick" || { echo "[e2e_vllm_device] quick check failed"; exit 4; }
fi
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
# the whole output in $OUT/e2e_vllm.log, and the plugin's own lines (warm-up, compile pool) again at the end: a
# call's reply shows only its tail, where the warm-up's "after the pool" line was lost among vLLM's (2026-12-07)
timeout -k 10 "$LEFT" python3 "${SCRIPT:-bench/e2e_vllm.py}" --out "$OUT" --budget-s $(( LEFT - 15 )) "$@" 2>&1 \
  | tee "$OUT/e2e_vllm.log"
RC=${PIPESTATUS[0]}
echo "[e2e_vllm_device] the plugin's log lines:"
grep -a 'qtip' "$OUT/e2e_vllm.log" | grep -av 'RESULT\|qtip_triton_rev' | cut -c1-400 | tail -30
ls -l "$OUT"
exit $RC
