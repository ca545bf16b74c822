#!/bin/bash
# Nsight Compute profiles of three decode kernels, one device call (~60 s), from the checkout root:
#   OUT=/tmp/out bash bench/ncu_profiles.sh
#   OUT=/tmp/out PROFILES=linear bash bench/ncu_profiles.sh   # every kernel of whole M = 1 forwards instead
#   OUT=/tmp/out PROFILES=linear LINEAR_POINTS="28672x8192:2 4096x4096:16" bash bench/ncu_profiles.sh
# Why these three: the M = 1 gemv (issue 7's headline cell), the tensor-core gemv at M = 16 and the
# 256-row gemm at M = 256 -- the kernels whose distance from their instruction floor bench/NOTES.md
# tracks. Each writes $OUT/ncu-<name>.txt with speed of light, occupancy, launch, scheduler and
# warp-state sections (ncu locks the SM clock, so its durations read ~10 % above bench/kernels.py's).
set -u
OUT=${OUT:?set OUT}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 2; }
echo "ncu: $NCU"
S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats"
prof() {
  name=$1; shift
  # shellcheck disable=SC2086
  timeout -k 5 120 "$NCU" --kernel-name regex:^kernel$ --launch-skip 2 --launch-count 1 $S \
    python3 bench/ncu_target.py "$@" > "$OUT/ncu-$name.txt" 2>&1
  echo "$name rc=$?"
}
# the kernels of one whole forward (input transform, decode kernel, output transform), shipped config:
# where the M = 1 forward's time outside the decode kernel goes
prof_linear() {
  name=$1; shift
  # shellcheck disable=SC2086
  timeout -k 5 120 "$NCU" --kernel-name regex:"^(_had|kernel)" --launch-skip 6 --launch-count 3 $S --section MemoryWorkloadAnalysis \
    python3 bench/ncu_target.py --linear "$@" > "$OUT/ncu-linear-$name.txt" 2>&1
  echo "linear $name rc=$?"
}
if [ "${PROFILES:-decode}" = linear ]; then
  # LINEAR_POINTS: OUTxIN:M points (K = 2), e.g. "28672x8192:2 4096x4096:16"
  for point in ${LINEAR_POINTS:-8192x8192:1 4096x4096:1 4096x11008:1}; do
    prof_linear "${point%%:*}-m${point##*:}" --shape "${point%%:*}" --K 2 --M "${point##*:}"
  done
  exit 0
fi
prof gemm-bm256-8192-m256 --shape 8192x8192 --K 2 --M 256 --kind gemm \
  --config '{"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 8}'
prof mma-22016x4096-m16 --shape 22016x4096 --K 2 --M 16 \
  --config '{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1, "num_warps": 4, "table": "shared", "mma": true}'
prof gemv-8192-m1 --shape 8192x8192 --K 2 --M 1 \
  --config '{"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 512, "SPLIT_K": 4, "num_warps": 4, "table": "shared"}'
