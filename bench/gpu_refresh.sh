#!/bin/bash
# Regenerate what is specific to one GPU model in a single ~10-minute run on that GPU:
#   1. the autotune file for the whole shipped set (qtip-triton autotune --gpu $GPU), installed into
#      autotune_configs/$GPU.yaml of this checkout so the steps after it use it;
#   2. bench/hadamard.py (transform launch variants at decoding batch sizes);
#   3. bench/cold_start.py with that tuned file (precompile -> export -> import -> fresh process, and
#      the cold-JIT figure beside it).
#   4. (STEPS with "fused") bench/fused_layers.py; (with "tests") the GPU test suite; (with "tall")
#      the per-token vs many-token Hadamard kernels (and other tall tiles: TALL_VARIANTS) from 1 to 2048
#      tokens (bench/hadamard.py --tag tall);
#      (with "fusein") transform + gemv vs the fuse_in gemv (bench/probe.py --fuse-in); (with "mma") the
#      CUDA-core gemv vs its tensor-core variant at M = 1/8/16 (bench/probe.py --mma), and the gemm kind there; (with "sweep") the
#      trellis sweep with its speed columns (SWEEP_ARGS; SWEEP_WEIGHTS=FILE.safetensors:TENSOR for the
#      real-weight column, e.g. a tensor extracted here and sent with `carry`); (with "tables") lane copies
#      of the table at M = 1, kernel and whole forward (QTIP_TRITON_SPLIT_SUM=kernel|transform to pin the split sum); (with "pending20") session 20's experiments, written when no GPU was lent (kernel boundary cost, f16_dots transforms chained and in forwards and prefill, the mma gemv with early words); (with "pending20b") one-token tiles with two programs per SM inside traced forwards, and a rotated fp16x2-admitting retune of M <= 2; (with "pending21") the one-token f16_dots output transform by launch variant, and one-token fp32 tiles with 2048-column steps in traced forwards; (with "wgmma") the Gluon wgmma decode-matmul: its GPU tests, then bench/wgmma_probe.py (every config checked against float64 and timed with fp16 and the shipped kind; WGMMA_ARGS adds arguments); (with "timeline") bench/forward_timeline.py, each kernel of a rotated forward and the gaps between them; (with "hfma") the fp16x2 gemv at M = 1; (with "early") the gemv with its first words loaded early, flushed and rotated; (with "l2") words prefetched into L2 ahead (l2_prefetch) in the gemv at M = 1, the mma gemv at M = 16 and the gemm at M = 64; (with "rotune") the rotated timer's GPU test, a K = 2 retune with it (M <= 16, its own file; ROTUNE_ARGS="--fp16-accumulation" admits the fp16x2 gemv) and the K = 2 table with that file and with the shipped one; (with "splitsum") split-K summed in the kernel vs by the transform; (with "regcap") the M = 16 mma gemv with register caps; (with "groups") the mma gemv with 1/2 row groups per warp sharing x; (with "stages") the 256-row gemm's pipeline depth; (with "zb") the transforms' A · (Z · B_c) column split; (with "stacked") the stacked many-token Hadamard kernel, prefill cases included; (with "defaults") the shipped transform choices against each kernel; (with "selftest") qtip-triton selftest; (with "fusedzb") the fused layers with QTIP_TRITON_HADAMARD_ZB_FIRST=0 (compare with "fused"); (with "autotunetests") tests/test_autotune_gpu.py, which the "tests" step leaves out (a tuning run, precompile, a fresh process that must not JIT); (with "ncu") bench/ncu_profiles.sh; (with "ktable") bench/kernels.py --tuned --rotate at KT_M tokens and KT_K bits with the file the autotune step wrote; (with "pending25") the wgmma GPU tests, the shipped configs' halves alone (x streamed alone included: is the MMAs-alone time x's?), then the warp-specialized form (WS = 1, one decode per 512 tokens) against the shipped configs. (with "pending26") the wgmma kind's grouped shards (QTIP_TRITON_WGMMA_SHARED_INPUT=1): their GPU test, then one Llama-2-7B layer at 32-256 tokens without and with them; (with "pending27") the wgmma kind's gathered input against the ordered one at 16-256 tokens, then one Llama-2-7B layer with QTIP_TRITON_WGMMA_GATHER_FROM unset, 32 and 64; (with "pending28") one Llama-2-7B layer at 32-128 tokens with every kernel traced (bench/fused_layers.py --timeline), then the wgmma kind's stacked shards in one launch (QTIP_TRITON_WGMMA_FUSED_DECODE=1): its GPU tests and the layer with it; (with "pending29") the GPU tests of the cols input order and the wgmma/fused paths, then one layer at 16-256 tokens with a timeline at 64; (with "pending30") one layer at 32-128 tokens without and with QTIP_TRITON_HADAMARD_STACK_GROUPS=1; (with "pending30b") the wgmma GPU tests with lane-strided words (QTIP_TRITON_WGMMA_LANE_STRIDE=1), with P30B_HAD=1 the transforms at 32, 48 and 96 tokens per kernel, then the layer with grouped stacking as shipped, with stacked thresholds output=32, natural=64, and with lane-strided words; (with "final30") the hadamard/wgmma/fused GPU tests and the layer with session 30's defaults; (with "pending31") the wgmma kind at the 64-token bucket by occupancy (7 configs probed at 12288, 22016 and 11008 rows), then one layer with 2 stages there through a user-cache copy of the file (bench/override_entries.py); (with "pending33") the wgmma kind at the 128-token bucket by occupancy (the shipped config and 6 one-warpgroup configs at 12288, 22016 and 11008 rows), then one layer at 96/128 tokens with such configs there through a user-cache copy; (with "pending40") the GPU tests of rows described past h's end (QTIP_TRITON_WGMMA_PAD_ROWS=1), then the wgmma probe and one layer at 96-256 tokens without and with them; (with "pending42b") autotune --interior-rows at the 128/256 buckets for one Llama-2-7B layer's K = 2 shapes into a user-cache copy of the file, then the layer at 96-256 tokens with the shipped file and with the copy; (with "pending42") the GPU Hadamard tests, then the stacked kernel's warps (4, 8) and 32-row slices where A pads to 256 rows, and 4096's whole tiles with 4 warps, at 256 and 512 tokens; (with "pending40b") the stacked Hadamard kernel with fewer columns of Y a program or 4 warps where A pads to 256 rows (11008, 28672), 160-512 tokens; (with "pending39") gate/up's one-launch (22016x4096) and per-shard (11008x4096) wgmma entries alone at 160-256 tokens, flushed and rotated; (with "pending38") one layer at 160-256 tokens with one decode launch per fused op (the default since session 38) and with a launch per shard; (with "pending37") the wgmma kind at 256 tokens, the sessions 24-25 configs of 11008x4096 and 8192^2 against the shipped ones and their 16-copy twins, then one layer at 256 tokens shipped and with one decode launch per fused op; (with "pending36") the wgmma kind at 256 tokens for 22016, 12288 and 11008 rows, shipped against one-warpgroup 2-stage configs, then one layer at 256 tokens as shipped, with one decode launch per fused op, and with one launch and one-warpgroup entries through a user-cache copy.
# Each step is time-boxed (the budget is a 10-minute call), logs go to one file, and the small
# results come back as: $OUT/$GPU.yaml, $OUT/refresh.log, $OUT/results.tar (every JSON/markdown).
#
#   GPU=h200 OUT=/tmp/out bash bench/gpu_refresh.sh                         # autotune, hadamard, cold
#   GPU=h200 OUT=/tmp/out STEPS="fused tests" bash bench/gpu_refresh.sh     # kernels changed, no re-tune
#   GPU=h200 OUT=/tmp/out STEPS="tall fusein fused tests" bash bench/gpu_refresh.sh
#   GPU=h200 OUT=/tmp/out STEPS="tests" TESTS="tests/gpu/test_codes_gpu.py" bash bench/gpu_refresh.sh
#   GPU=h200 OUT=/tmp/out STEPS="tests" PYTEST_N=8 bash bench/gpu_refresh.sh   # carry .devsite: ~90 s, not ~500
#   GPU=h100 OUT=/tmp/out STEPS="autotune tests" TUNE_MIN=4 TUNE_ARGS="--seed autotune_configs/h200.yaml" \
#     PYTEST_N=8 bash bench/gpu_refresh.sh   # a first file for a new GPU from the H200's winners (a third of the timings)
#   GPU=h100 OUT=/tmp/out STEPS="autotune ktable tests" TUNE_MIN=6 TUNE_ARGS="--kinds wgmma --buckets 16,32,64" \
#     KT_M=1,16,32,64 PYTEST_N=8 bash bench/gpu_refresh.sh   # one kind added to the shipped file where it wins (by time)
set -u
cd "$(dirname "$0")/.." || exit 2
GPU=${GPU:?set GPU, e.g. h200}
OUT=${OUT:?set OUT}
TUNE_MIN=${TUNE_MIN:-7}  # session 7: the mma family made 5 minutes too short for the whole set
STEPS=${STEPS:-autotune hadamard cold}
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# pytest-xdist for the GPU suite (PYTEST_N workers share the GPU; compilation is the suite's bottleneck):
# `pip install --no-deps --target .devsite pytest-xdist execnet` here and send .devsite with `carry`
[ -d .devsite ] && export PYTHONPATH="$PYTHONPATH:$PWD/.devsite"
WORK="$OUT/work"
mkdir -p "$WORK"
LOG="$OUT/refresh.log"
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
# fused_layers SECONDS ARGS...: bench/fused_layers.py with ARGS (and any switches set before the call), its result
# files in $WORK, its output and exit code in the log
fused_layers() {
  local s=$1; shift
  timeout -k 10 "$s" python3 bench/fused_layers.py "$@" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
}
# gpu_subset SECONDS LOGNAME PYTEST_ARGS...: part of the GPU suite (PYTEST_N workers), stopped by SIGINT at SECONDS
# (so its log names what finished); its log in $WORK/LOGNAME, its exit code and summary in the log
gpu_subset() {
  local s=$1 name=$2; shift 2
  [ "$s" = 0 ] && return 0  # a limit of 0 skips the subset (the whole suite runs in the same call)
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "$s" python3 -m pytest -m gpu -q -p no:cacheprovider ${PYTEST_N:+-n $PYTEST_N} "$@" \
    >"$WORK/$name" 2>&1
  echo "rc=$?" >>"$LOG"; tail -3 "$WORK/$name" >>"$LOG"
}
finish() { tar cf "$OUT/results.tar" -C "$WORK" . && rm -rf "$WORK"; }
trap finish EXIT
# pinned_timelines TAG_PREFIX CONFIG...: each gemv config traced inside one-token forwards of 8192x8192 and 28672x8192
# (bench/forward_timeline.py), one result file per config, tagged TAG_PREFIX-<md5 of the config>
pinned_timelines() {
  local prefix=$1 cfg tag
  shift
  for cfg in "$@"; do
    tag="$prefix-$(echo "$cfg" | md5sum | cut -c1-6)"
    timeout -k 10 40 python3 bench/forward_timeline.py --shapes 8192x8192,28672x8192 --M 1 --config "8192x8192=$cfg" \
      --config "28672x8192=$cfg" --tag "$tag" --out "$WORK" >>"$LOG" 2>&1
    echo "rc=$? $tag $cfg" >>"$LOG"
  done
}
step "device"; nvidia-smi -L >>"$LOG" 2>&1; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >>"$LOG" 2>&1
if want autotune; then
  step "autotune $GPU (max $TUNE_MIN min)"
  # TUNE_ARGS: extra flags, e.g. "--buckets 1-16 --replace" (merge into a copy of the shipped file, new entries win)
  [ -n "${TUNE_ARGS:-}" ] && [ -s "autotune_configs/$GPU.yaml" ] && cp "autotune_configs/$GPU.yaml" "$OUT/$GPU.yaml"
  # shellcheck disable=SC2086
  timeout -k 10 $(( TUNE_MIN * 60 + 60 )) python3 -m qtip_triton autotune --gpu "$GPU" --max-minutes "$TUNE_MIN" \
    --out "$OUT/$GPU.yaml" --no-progress --timings "$WORK/autotune-timings.json" ${TUNE_ARGS:-} >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  if [ -s "$OUT/$GPU.yaml" ]; then
    rm -f "autotune_configs/$GPU.yaml"; cp "$OUT/$GPU.yaml" "autotune_configs/$GPU.yaml"
  fi
fi
if want hadamard; then
  step "hadamard variants"
  timeout -k 10 "${HAD_S:-100}" python3 bench/hadamard.py --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want tall; then
  step "hadamard: per-token vs tall kernel"
  timeout -k 10 "${TALL_S:-150}" python3 bench/hadamard.py --variants "${TALL_VARIANTS:-default,per_token,tall,gemm}" --T "${TALL_T:-1,16,64,128,256,2048}" \
    --n 4096,11008,8192,14336,28672 --tag "${TALL_TAG:-tall}" ${TALL_ARGS:-} --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want fusein; then
  step "probe: gemv with its input transform, separate vs fuse_in"
  timeout -k 10 "${FUSEIN_S:-120}" python3 bench/probe.py --points 4096x4096:1,4096x11008:1,11008x4096:1,8192x8192:1 \
    --tables shared --fuse-in --splits 1,2 --blocks 32/512/4,64/256/4 --tag probe-fusein --time-limit "${FUSEIN_S:-120}" \
    --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want sweep; then
  step "sweep with speeds"
  timeout -k 10 "${SWEEP_S:-240}" python3 -m qtip_triton sweep ${SWEEP_ARGS:-} --weights "${SWEEP_WEIGHTS:-none}" \
    --no-progress --out "$WORK/sweep-$GPU" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want mma; then
  step "probe: CUDA-core gemv vs its tensor-core variant (mma) at decoding batch sizes"
  timeout -k 10 "${MMA_S:-150}" python3 bench/probe.py --points 4096x4096:1,8192x8192:1,4096x4096:8,12288x4096:8,22016x4096:8,4096x11008:8,22016x4096:16 \
    --tables shared --mma --splits 1 --blocks 64/256/4 --tag probe-mma --time-limit "${MMA_S:-150}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  step "probe: the gemm kind at the same batch sizes (what the mma gemv replaces)"
  timeout -k 10 "${MMA_GEMM_S:-80}" python3 bench/probe.py --kind gemm --points 4096x4096:8,12288x4096:8,22016x4096:8,4096x11008:8,22016x4096:16 \
    --splits 1 --tag probe-gemm-m8 --time-limit "${MMA_GEMM_S:-80}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want tables; then
  step "probe: lane copies of the table at M = 1 (the shared-memory pipe, NOTES sessions 8-9), kernel and whole forward"
  timeout -k 10 "${TABLES_S:-150}" python3 bench/probe.py --linear --points 8192x8192:1,4096x4096:1,28672x8192:1 \
    --tables shared,shared8,shared16 --blocks 64/512/4,64/1024/4,32/512/8 --splits 0.5,1,2 --tag probe-tables \
    --time-limit "${TABLES_S:-150}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want early; then
  step "probe: the gemv with its first k step's words loaded before the table fill (early_words), flushed and rotated (session 18)"
  timeout -k 10 "${EARLY_S:-200}" python3 bench/probe.py --linear --early --rotate --points 8192x8192:1,28672x8192:1,4096x4096:1 \
    --tables shared16 --blocks "${EARLY_BLOCKS:-64/1024/4,64/512/4}" --splits "${EARLY_SPLITS:-0.5,1}" --tag probe-early --time-limit "${EARLY_S:-200}" \
    --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want l2; then
  step "probe: words prefetched into L2 ahead (l2_prefetch 1, 2) at M = 1 (plain and early words), flushed and rotated (session 19)"
  timeout -k 10 "${L2_S:-200}" python3 bench/probe.py --linear --early --l2 1,2 --rotate --points "${L2_POINTS:-8192x8192:1,28672x8192:1,4096x4096:1}" \
    --tables shared16 --blocks "${L2_BLOCKS:-64/1024/4,64/512/4}" --splits "${L2_SPLITS:-0.5,1}" --tag probe-l2 --time-limit "${L2_S:-200}" \
    --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  step "probe: the mma gemv at M = 16 and the gemm at M = 64 with l2_prefetch 1, rotated"
  timeout -k 10 "${L2MMA_S:-120}" python3 bench/probe.py --linear --mma-only --l2 1 --rotate --points 8192x8192:16,28672x8192:16,4096x4096:16 \
    --tables shared16 --mma-splits 1,2 --tag probe-l2-mma --time-limit "${L2MMA_S:-120}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  timeout -k 10 "${L2GEMM_S:-90}" python3 bench/probe.py --kind gemm --linear --l2 1,2 --rotate --points 8192x8192:64,28672x8192:64 \
    --splits 1 --tag probe-l2-gemm --time-limit "${L2GEMM_S:-90}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want rotune; then
  step "autotune K = 2, M <= 16 with the rotated timer into a file of its own, then the K = 2 table rotated with it and with the shipped file (session 19 item 9)"
  timeout -k 10 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_autotune_rotated_gpu.py >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  mkdir -p "$WORK/rotcache/autotune"
  # shellcheck disable=SC2086
  QTIP_TRITON_CACHE_DIR="$WORK/rotcache" timeout -k 10 "${ROTUNE_S:-330}" python3 -m qtip_triton autotune --gpu "$GPU" --bits 2 \
    --buckets 1,2,4,8,16 --timer rotated --out "$WORK/rotcache/autotune/$GPU.yaml" --max-minutes "${ROTUNE_MIN:-5}" \
    --no-progress ${ROTUNE_ARGS:-} >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  if [ "${ROTUNE_TABLES:-1}" = 1 ]; then  # ROTUNE_TABLES=0: the tune only (the tables in a later call)
  QTIP_TRITON_CACHE_DIR="$WORK/rotcache" BENCH_TAG=rotated-tune timeout -k 10 150 python3 bench/kernels.py --tuned --rotate \
    --K 2 --M 1,4,16 --time-limit 120 --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  BENCH_TAG=shipped-tune timeout -k 10 150 python3 bench/kernels.py --tuned --rotate --K 2 --M 1,4,16 --time-limit 120 \
    --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  fi
fi
if want timeline; then
  step "timeline: each kernel of a rotated forward and the gaps between them (torch.profiler), K = 2, M = 1, 4, 16"
  timeout -k 10 "${TIMELINE_S:-150}" python3 bench/forward_timeline.py --shapes "${TIMELINE_SHAPES:-8192x8192,28672x8192,4096x4096}" \
    --M "${TIMELINE_M:-1,4,16}" --tag "${TIMELINE_TAG:-timeline}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want pending20; then
  step "session 20's experiments (no GPU was lent after its first calls): kernel boundary cost, transform variants chained (f16_dots), forwards with QTIP_TRITON_HADAMARD_F16=1, the mma gemv with early words"
  timeout -k 10 40 python3 bench/pdl_chain.py --out "$WORK" --elements 8192,131072 --tag pdl-chain >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  timeout -k 10 "${P20_HAD_S:-100}" python3 bench/hadamard.py --timer chain --n 4096,8192,11008,28672 --T 1,16,256,2048 \
    --cases input16,output,input_natural,output_fp16 --variants default,f16 --tag chain-f16 --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  for f16 in 0 1; do
    QTIP_TRITON_HADAMARD_F16=$f16 timeout -k 10 "${P20_TL_S:-50}" python3 bench/forward_timeline.py \
      --shapes 8192x8192,28672x8192,4096x11008 --M 1,4,16 --tag "timeline-f16-$f16" --out "$WORK" >>"$LOG" 2>&1
    echo "rc=$?" >>"$LOG"
    QTIP_TRITON_HADAMARD_F16=$f16 BENCH_TAG="prefill-f16-$f16" timeout -k 10 "${P20_PF_S:-80}" python3 bench/kernels.py \
      --tuned --rotate --K 2 --M 256,2048 --shapes 8192x8192,4096x11008,28672x8192 --time-limit 65 --out "$WORK" >>"$LOG" 2>&1
    echo "rc=$?" >>"$LOG"
  done
  timeout -k 10 "${P20_MMA_S:-130}" python3 bench/probe.py --points 8192x8192:16,28672x8192:16,8192x8192:8 --K 2 --mma-only \
    --early --tables shared16 --mma-warps 4 --mma-splits 4,8 --rotate --time-limit 110 --out "$WORK" --tag probe-mma-early >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want pending20b; then
  step "session 20's one-token tile probes inside traced forwards (two programs per SM with 2048-column steps), then a rotated K = 2 retune of M <= 2 with the fp16x2 gemv admitted"
  pinned_timelines tl-pin \
    '{"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 2048, "SPLIT_K": 1, "num_warps": 8, "table": "shared16", "split_sum": true, "hfma": true, "early_words": true}' \
    '{"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 2048, "SPLIT_K": 2, "num_warps": 8, "table": "shared16", "split_sum": true, "hfma": true, "early_words": true, "maxnreg": 128}' \
    '{"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 1024, "SPLIT_K": 2, "num_warps": 8, "table": "shared16", "split_sum": true, "hfma": true, "early_words": true}'
  mkdir -p "$WORK/rotcache16/autotune"
  QTIP_TRITON_CACHE_DIR="$WORK/rotcache16" timeout -k 10 "${P20B_TUNE_S:-300}" python3 -m qtip_triton autotune --gpu "$GPU" \
    --bits 2 --buckets 1,2 --timer rotated --fp16-accumulation --out "$WORK/rotcache16/autotune/$GPU.yaml" \
    --max-minutes 4.5 --no-progress >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want pending21; then
  step "session 21's open points: which launch variant the one-token f16_dots output transform of fp32 partials is slow in, and one-token fp32 tiles with 2048-column steps inside traced forwards"
  timeout -k 10 60 python3 bench/hadamard.py --n 8192,28672,4096 --T 1,2 --cases output,output_fp16 \
    --variants default,f16,zb_first,zb_first_f16,col_split,per_token --splits 4 --tag t1-output-variants --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  timeout -k 10 40 python3 bench/hadamard.py --n 8192,28672 --T 1 --cases output --variants default,f16 --splits 1 \
    --tag t1-output-split1 --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  pinned_timelines tl-fp32 \
    '{"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 2048, "SPLIT_K": 1, "num_warps": 8, "table": "shared16"}' \
    '{"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 2048, "SPLIT_K": 1, "num_warps": 8, "table": "shared16", "early_words": true}' \
    '{"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 2048, "SPLIT_K": 1, "num_warps": 8, "table": "shared16", "early_words": true}'
fi
if want wgmma; then
  step "the wgmma decode-matmul (Gluon, register A, TMA x): GPU tests, then each config against float64, fp16 and the shipped kind"
  timeout -k 10 "${WGMMA_TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu ${PYTEST_N:+-n $PYTEST_N} \
    tests/gpu/test_wgmma_gpu.py >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  timeout -k 10 "${WGMMA_S:-300}" python3 bench/wgmma_probe.py ${WGMMA_ARGS:-} --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want hfma; then
  step "probe: the fp16x2 gemv (hfma) against the fp32 one at M = 1, kernel and whole forward (NOTES session 9)"
  timeout -k 10 "${HFMA_S:-150}" python3 bench/probe.py --linear --hfma --points 8192x8192:1,4096x4096:1,28672x8192:1,4096x11008:1 \
    --tables shared,shared16 --blocks 64/1024/4,64/512/4,32/1024/4 --splits 0.5,1,2 --tag probe-hfma \
    --time-limit "${HFMA_S:-150}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want regcap; then
  step "probe: the mma gemv at M = 16 with register caps (config maxnreg) against none"
  timeout -k 10 "${REGCAP_S:-120}" python3 bench/probe.py --mma-only --mma-splits 2,4 --maxnreg 96,104 \
    --points 8192x8192:16,22016x4096:16,4096x11008:16 --tables shared16 --tag probe-regcap \
    --time-limit "${REGCAP_S:-120}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want groups; then
  step "probe: the mma gemv with 1 and 2 row groups per warp sharing x (session 12)"
  timeout -k 10 "${GROUPS_S:-300}" python3 bench/probe.py --mma-only --mma-splits "${GROUPS_SPLITS:-2,4,8}" \
    --points "${GROUPS_POINTS:-8192x8192:16,22016x4096:16,4096x11008:16,4096x4096:16,8192x8192:8,22016x4096:8,4096x4096:8}" \
    --tables shared16 --tag probe-groups --time-limit "${GROUPS_S:-300}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want zb; then
  step "hadamard: the column split in the A · (Z · B_c) order against the default, decoding batch sizes (session 13)"
  timeout -k 10 "${ZB_S:-150}" python3 bench/hadamard.py --variants default,az_first,zb_first --T 1,2,4,16 \
    --n 4096,8192,11008,14336,28672 --tag zb --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want stacked; then
  step "hadamard: the stacked many-token kernel against the shipped choice, decoding and prefill cases (session 14)"
  timeout -k 10 "${STACKED_S:-300}" python3 bench/hadamard.py --variants default,tall,stacked,stacked64,stacked1 \
    --T 1,4,16,64,256,2048 --n 4096,8192,11008,14336,28672 --cases input,output,input_natural,output_fp16 --tag stacked \
    --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want defaults; then
  step "hadamard: the shipped choice (stacked from 128-1024 rows by direction, A · (Z · B_c) at 4096) against each kernel (session 16)"
  timeout -k 10 "${DEFAULTS_S:-150}" python3 bench/hadamard.py --variants default,per_token,tall,stacked \
    --T 1,128,256,2048 --n 4096,8192,11008,14336,28672 --cases input,output,input_natural,output_fp16 --tag defaults \
    --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want splitsum; then
  step "probe: split-K summed in the kernel vs by the output transform (M = 1 gemv, M = 16 mma gemv)"
  timeout -k 10 "${SPLITSUM_S:-100}" python3 bench/probe.py --linear --split-sum --points 8192x8192:1,28672x8192:1,4096x4096:1 \
    --tables shared16 --blocks 64/1024/4,64/512/4 --splits 1,2 --tag probe-splitsum-m1 \
    --time-limit "${SPLITSUM_S:-100}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  timeout -k 10 "${SPLITSUM_S:-100}" python3 bench/probe.py --linear --mma-only --mma-splits 4,8,16 \
    --points 4096x11008:16,22016x4096:16,4096x4096:16 --tables shared16 --tag probe-splitsum-m16 \
    --time-limit "${SPLITSUM_S:-100}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want stages; then
  step "probe: software pipeline depth of the 256-row gemm at M = 256"
  timeout -k 10 "${STAGES_S:-120}" python3 bench/probe.py --kind gemm --points 8192x8192:256,28672x8192:256 \
    --block-m 256 --blocks 128/128/8,128/64/8 --splits 1,2 --stages 1,2,3 --tag probe-gemm-stages \
    --time-limit "${STAGES_S:-120}" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want ncu; then
  step "ncu: the M = 1 gemv, the mma gemv at M = 16, the 256-row gemm"
  OUT="$WORK" timeout -k 10 "${NCU_S:-300}" bash bench/ncu_profiles.sh >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want fused; then
  step "fused layers"
  fused_layers "${FUSED_S:-150}"
fi
if want fusedzb; then
  step "fused layers with QTIP_TRITON_HADAMARD_ZB_FIRST=0 (without the A · (Z · B_c) order at A of 32 rows, the default since session 16)"
  QTIP_TRITON_HADAMARD_ZB_FIRST=0 fused_layers "${FUSED_S:-150}" --M 1,2,4,8,16 --tag nozb
fi
if want selftest; then
  step "qtip-triton selftest (what a user runs after an install)"
  QTIP_TRITON_NO_PROGRESS=1 timeout -k 10 "${SELFTEST_S:-200}" python3 -m qtip_triton selftest ${SELFTEST_ARGS:-} \
    >"$WORK/selftest.log" 2>&1
  echo "rc=$?" >>"$LOG"; tail -3 "$WORK/selftest.log" >>"$LOG"
fi
if want pending25; then
  step "session 25's warp-specialized form (WS = 1): the kind's GPU tests, then WS against the shipped configs at 256/512"
  timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider -m gpu ${PYTEST_N:+-n $PYTEST_N} tests/gpu/test_wgmma_gpu.py \
    >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  B='"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "PIPE": 1, "table": "shared32"'
  # the shipped register-A configs with their halves alone: MMAs alone, x streamed alone (ABLATE=2), decode alone
  timeout -k 10 100 python3 bench/wgmma_probe.py --K 2 --ablate --points 8192x8192:256,8192x8192:512,28672x8192:512 \
    --configs "[{$B, \"SPLIT_K\": 2}, {$B, \"SPLIT_K\": 1}]" --tag "session25-x-only" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  W='"E": 1, "num_warps": 8, "WS": 1'
  for K in 2 4; do  # decode-matmul alone, each against fp16 and the shipped kind at the same point
    timeout -k 10 120 python3 bench/wgmma_probe.py --K $K --rotate \
      --points 8192x8192:512,28672x8192:512,8192x8192:256,28672x8192:256,4096x11008:512,8192x8192:2048 \
      --configs "[{$W, \"BLOCK_M\": 512, \"STAGES\": 2, \"table\": \"shared16\"}, {$W, \"BLOCK_M\": 512, \"STAGES\": 2, \"table\": \"shared32\"}, {$W, \"BLOCK_M\": 512, \"STAGES\": 3, \"table\": \"gather\"}, {$W, \"BLOCK_M\": 512, \"STAGES\": 2, \"table\": \"shared16\", \"SPLIT_K\": 2}, {$W, \"BLOCK_M\": 256, \"STAGES\": 4, \"table\": \"shared32\"}, {$W, \"BLOCK_M\": 256, \"STAGES\": 4, \"table\": \"shared32\", \"SPLIT_K\": 2}]" \
      --tag "session25-ws-k$K" --out "$WORK" >>"$LOG" 2>&1
    echo "rc=$?" >>"$LOG"
  done
fi
if want pending26; then
  step "session 26's grouped wgmma shards (QTIP_TRITON_WGMMA_SHARED_INPUT=1): their GPU test, then one Llama-2-7B layer without and with them"
  timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider -m gpu ${PYTEST_N:+-n $PYTEST_N} \
    tests/gpu/test_wgmma_gpu.py -k "shards or kind_forward or rejects" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  for S in 0 1; do
    QTIP_TRITON_WGMMA_SHARED_INPUT=$S fused_layers 180 --M 32,64,128,256 --tag "session26-shared-input-$S"
  done
fi
if want pending27; then
  step "session 27's open question: the wgmma kind's gathered input (natural order + index_select) against the ordered one at 16-256 tokens, then one Llama-2-7B layer with QTIP_TRITON_WGMMA_GATHER_FROM unset, 32 and 64"
  timeout -k 10 90 python3 bench/hadamard.py --variants default --cases input16,input16_gathered --T 16,32,64,128,256 \
    --n 4096,8192,11008,14336,28672 --timer chain --tag session27-gather --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  for G in "" 32 64; do  # the first run compiles (cold: ~100 s), the others reuse it
    step "one Llama-2-7B layer, QTIP_TRITON_WGMMA_GATHER_FROM=${G:-unset (the rule)}"
    QTIP_TRITON_WGMMA_GATHER_FROM=$G fused_layers "${P27_FL_S:-150}" --M 16,32,64,128,256 --tag "session27-gather-${G:-rule}"
  done
fi
if want pending28; then
  step "session 28's open question: where one Llama-2-7B layer's time goes beyond its decode kernels at 32-128 tokens (each kernel traced, with the gaps between them)"
  fused_layers "${P28_FL_S:-200}" --M 32,64,128 --timeline 32,64,128 --tag session28-timeline
  step "the wgmma kind's stacked shards in one launch (QTIP_TRITON_WGMMA_FUSED_DECODE=1): GPU tests, then one layer with it"
  gpu_subset "${P28_TESTS_S:-240}" gpu-tests-fused-decode.log tests/gpu/test_wgmma_gpu.py -k "stacked_shards or fused_decode"
  QTIP_TRITON_WGMMA_FUSED_DECODE=1 fused_layers "${P28_FL_S:-200}" --M 16,32,64,128,256 --tag session28-fused-decode-1
fi
if want pending29; then
  step "session 29: GPU tests of the cols input order (B's columns permuted) and of the wgmma/fused paths now on it"
  gpu_subset "${P29_TESTS_S:-200}" gpu-tests-cols.log tests/gpu/test_hadamard_gpu.py tests/gpu/test_wgmma_gpu.py \
    tests/gpu/test_fused_gpu.py
  step "one Llama-2-7B layer with the cols input order and one-launch shards up to 128 tokens (both defaults now)"
  fused_layers "${P29_FL_S:-200}" --M 16,32,64,128,256 --timeline 64 --tag session29-cols
fi
if want pending30; then
  for sg in 0 1; do
    step "one Llama-2-7B layer with QTIP_TRITON_HADAMARD_STACK_GROUPS=$sg (grouped inputs ask the stacked kernel about every shard's rows)"
    QTIP_TRITON_HADAMARD_STACK_GROUPS=$sg fused_layers "${P30_FL_S:-150}" --M 32,48,64,96,128 --tag "session30-stack-groups-$sg"
  done
fi
if want pending30b; then
  step "GPU tests of the wgmma kind with lane-strided words (QTIP_TRITON_WGMMA_LANE_STRIDE=1)"
  QTIP_TRITON_WGMMA_LANE_STRIDE=1 gpu_subset "${P30B_TESTS_S:-150}" gpu-tests-lane-stride.log tests/gpu/test_wgmma_gpu.py
  if [ -n "${P30B_HAD:-}" ]; then
    step "hadamard: per-token against stacked (one token's A per tile) at 32, 48 and 96 tokens, between the measured thresholds"
    timeout -k 10 "${P30B_HAD_S:-180}" python3 bench/hadamard.py --variants default,per_token,stacked1 --T 32,48,96 \
      --n 4096,8192,11008,14336,28672 --cases output,output_fp16,input_natural --timer chain --tag session30-between \
      --out "$WORK" >>"$LOG" 2>&1
    echo "rc=$?" >>"$LOG"
  fi
  for run in "sg1::0" "sg1-out32-nat64:output=32,natural=64:0" "sg1-lane-stride::1"; do
    tag=${run%%:*}; rest=${run#*:}; sm=${rest%%:*}; ls=${rest#*:}
    step "one Llama-2-7B layer, QTIP_TRITON_HADAMARD_STACK_GROUPS=1, stacked thresholds ${sm:-as shipped}, lane stride $ls"
    QTIP_TRITON_HADAMARD_STACK_GROUPS=1 QTIP_TRITON_WGMMA_LANE_STRIDE=$ls fused_layers "${P30_FL_S:-110}" \
      --M "${P30B_M:-32,48,64,96,128}" --stack-min "$sm" --tag "session30-$tag"
  done
fi
if want final30; then
  # the layer first: with little device time left the tests are what a cut call loses
  step "one Llama-2-7B layer with session 30's defaults (stacked outputs from 32 rows, natural inputs from 96, grouped rows, lane stride where it folds)"
  fused_layers "${F30_FL_S:-100}" --M "${F30_M:-16,32,48,64,96,128}" --tag session30-final
  step "session 30's defaults: GPU tests of the hadamard, wgmma and fused paths"
  gpu_subset "${F30_TESTS_S:-120}" gpu-tests-final30.log tests/gpu/test_hadamard_gpu.py tests/gpu/test_wgmma_gpu.py \
    tests/gpu/test_fused_gpu.py
fi
if want pending31; then
  # session 31: at the 64-token bucket the kind's shipped configs (3 x tiles of 64 tokens, 82 KB of shared memory) fit
  # 2 programs an SM, where 2 stages (66 KB) fit 3; the fused q/k/v and gate/up decodes doubled from 32 to 48 tokens
  step "wgmma at the 64-token bucket: shipped config, 2 stages, split 4, gathered table, E 1, 32 tokens a program"
  p31_cfgs=$(python3 -c "
import json
b = {'E': 2, 'BLOCK_M': 64, 'num_warps': 4, 'STAGES': 3, 'SPLIT_K': 2, 'WPF': 1, 'table': 'shared16', 'PIPE': 0}
print(json.dumps([b, {**b, 'STAGES': 2}, {**b, 'STAGES': 2, 'SPLIT_K': 4}, {**b, 'table': 'gather'}, {**b, 'E': 1},
                  {**b, 'E': 1, 'STAGES': 4}, {**b, 'BLOCK_M': 32}]))")
  timeout -k 10 "${P31_PROBE_S:-170}" python3 bench/wgmma_probe.py --points 12288x4096:48,12288x4096:64,22016x4096:64,11008x4096:64 \
    --configs "$p31_cfgs" --tag session31-occupancy --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  step "one Llama-2-7B layer with 2 stages at the 64-token bucket for 12288, 22016 and 11008 rows (a user-cache copy)"
  python3 bench/override_entries.py --file "autotune_configs/$GPU.yaml" --out "$WORK/qc/autotune/$GPU.yaml" \
    --set "L16K2V2-hyb9 12288x4096 64 STAGES=2" --set "L16K2V2-hyb9 22016x4096 64 STAGES=2" \
    --set "L16K2V2-hyb9 11008x4096 64 STAGES=2" >>"$LOG" 2>&1
  QTIP_TRITON_CACHE_DIR="$WORK/qc" fused_layers "${P31_FL_S:-100}" --M "${P31_M:-48,64}" --tag session31-st2
  rm -rf "$WORK/qc"
fi
# gate/up's wgmma entries of sessions 39-40 (pending39, pending40): the 22016x4096 256-token entry (4 warps, 3 stages,
# gather table), the 11008x4096 one (8 warps, 4 stages, 16 table copies) and the 22016 128-token one
gateup_cfgs='[{"E":1,"BLOCK_M":256,"num_warps":4,"STAGES":3,"SPLIT_K":1,"WPF":1,"table":"gather","PIPE":1},'
gateup_cfgs+='{"E":1,"BLOCK_M":256,"num_warps":8,"STAGES":4,"SPLIT_K":1,"WPF":1,"table":"shared16","PIPE":1},'
gateup_cfgs+='{"E":1,"BLOCK_M":128,"num_warps":4,"STAGES":2,"SPLIT_K":1,"WPF":1,"table":"shared16","PIPE":1}]'
if want pending40; then
  # session 40: the 4-warp entries slow down as the last x tile runs past h's end (161 µs at 160 tokens against 102
  # at 256 for 22016x4096); h copied into whole tiles took that to 113 µs, but the copies cost small batches. Now h is
  # written into storage reserving whole tiles behind it and QTIP_TRITON_WGMMA_PAD_ROWS=1 describes those rows to
  # TMA: its GPU tests (bit for bit against the exact descriptor, NaN in the reserve) and the wgmma/fused suites with
  # it on, then the probe and one layer at 96-256 tokens without (0) and with it (1), each in its own process
  step "wgmma: rows described past h's end (QTIP_TRITON_WGMMA_PAD_ROWS=1): GPU tests, probe, one layer"
  QTIP_TRITON_WGMMA_PAD_ROWS=1 gpu_subset "${P40_TESTS_S:-150}" gpu-tests-pad-rows.log \
    tests/gpu/test_wgmma_gpu.py tests/gpu/test_fused_gpu.py
  for pad in 0 1; do
    QTIP_TRITON_WGMMA_PAD_ROWS=$pad timeout -k 10 "${P40_S:-100}" python3 bench/wgmma_probe.py --K 2 --rotate \
      --tag "session40-slack$pad" --out "$WORK" --configs "$gateup_cfgs" \
      --points 22016x4096:160,22016x4096:192,22016x4096:256,11008x4096:160,11008x4096:256,12288x4096:96 >>"$LOG" 2>&1
    echo "rc=$?" >>"$LOG"
  done
  for pad in 0 1; do
    QTIP_TRITON_WGMMA_PAD_ROWS=$pad fused_layers "${P40_FL_S:-90}" --M "${P40_M:-96,160,192,256}" --tag "${P40_TAG:-session40}-slack$pad"
  done
fi
if want pending42; then
  # session 42: 4-warp sliced tiles became the default for natural inputs and <= 64-column outputs (A of 256 padded
  # rows); here their GPU tests against float64, then every warp count and 32-row slices (sm_90 compile: mma.sync
  # instead of wgmma, 11008 output spills 152 -> 32 B at 4 warps) for 4096, 11008 and 28672 at 256 and 512 tokens,
  # chained as in a layer
  step "hadamard: the sliced tiles' GPU tests, then warps and 32-row slices at 256-512 tokens"
  gpu_subset "${P42_TESTS_S:-70}" gpu-tests-hadamard.log tests/gpu/test_hadamard_gpu.py
  timeout -k 10 "${P42_S:-120}" python3 bench/hadamard.py --n 4096,11008,28672 --T 256,512 --splits 1 --timer chain \
    --cases output,input_natural --variants default,stacked_w4,stacked_w8,stacked_k32,stacked_w4_k32 \
    --tag session42-warps-kc --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want pending42b; then
  # session 42: autotune --interior-rows (each candidate of a bucket from 64 rows timed at its top and at 5/8 of it,
  # ranked by the mean) for one Llama-2-7B layer's K = 2 shapes at the 128 and 256 buckets, replacing those entries in
  # a user-cache copy of the shipped file; then the layer between and at the buckets' tops with the shipped file and
  # with the copy, each in its own process
  step "autotune --interior-rows at 128/256 tokens (Llama-2-7B, K = 2) into a user cache, then one layer with each"
  mkdir -p "$WORK/qc/autotune" && cp "autotune_configs/$GPU.yaml" "$WORK/qc/autotune/$GPU.yaml"
  timeout -k 10 "${P42B_TUNE_S:-300}" python3 -m qtip_triton autotune --gpu "$GPU" --bits 2 --buckets 128,256 \
    --shapes 12288x4096 4096x4096 22016x4096 11008x4096 4096x11008 --interior-rows --replace \
    --max-minutes "${P42B_TUNE_MIN:-4}" --out "$WORK/qc/autotune/$GPU.yaml" --no-progress \
    --timings "$WORK/autotune-timings-session42-interior.json" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  p42b_m=${P42B_M:-96,160,192,256}
  fused_layers "${P42B_FL_S:-90}" --M "$p42b_m" --tag session42-shipped
  QTIP_TRITON_CACHE_DIR="$WORK/qc" fused_layers "${P42B_FL_S:-90}" --M "$p42b_m" --tag session42-interior
  cp "$WORK/qc/autotune/$GPU.yaml" "$WORK/$GPU-session42-interior.yaml"
  rm -rf "$WORK/qc"
fi
if want pending40b; then
  # session 40: at 256 tokens a Llama-2-7B layer spends 106 of 313 µs in transforms, 50 of them in the 11008-wide
  # ones (gate/up's output, down's input), whose A pads to 256 rows: one token a program, 168 registers, one program
  # an SM (bench/sass_hadamard.py). Here the stacked kernel with 32 or 16 columns of Y a program (121 / 76
  # registers: two or three programs an SM) and with 4 warps, at 160-512 tokens, chained as in a layer
  step "hadamard: the stacked kernel's tiles for A of 256 padded rows (11008, 28672) at 160-512 tokens"
  timeout -k 10 "${P40B_S:-200}" python3 bench/hadamard.py --n 11008,28672 --T 160,256,512 --splits 1 --timer chain \
    --cases output,input_natural,input16 --variants default,stacked,stacked_c32,stacked_c16,stacked_w4,stacked_c32_w4 \
    --tag session40-stack-tiles --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want pending39; then
  # session 39: at 160 and 192 tokens gate/up's one-launch decode (the 22016x4096 256-token entry: 4 warps, 3 stages,
  # gather table) took longer than at 256 (174.1 against 139.4 µs) while the per-shard 11008x4096 entry scaled down;
  # here both entries and the 22016 128-token one alone, at 160, 192 and 256 tokens, flushed and rotated
  step "wgmma: gate/up's one-launch and per-shard entries at 160-256 tokens"
  timeout -k 10 "${P39_S:-150}" python3 bench/wgmma_probe.py --K 2 --rotate --tag session39-gateup160 --out "$WORK" \
    --points 22016x4096:160,22016x4096:192,22016x4096:256,11008x4096:160,11008x4096:192,11008x4096:256 \
    --configs "$gateup_cfgs" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want pending38; then
  # session 38: fused wgmma shards now decode in one launch up to 256 rows (WGMMA_FUSED_DECODE_MAX_ROWS), chosen on
  # the layer at 256 tokens alone; here the rows between the 128 and 256 buckets, one launch (the default) against a
  # launch per shard, in one process each
  step "one Llama-2-7B layer at 160-256 tokens: one decode launch per fused op (default) and a launch per shard"
  p38_m=${P38_M:-160,192,256}
  fused_layers "${P38_FL_S:-90}" --M "$p38_m" --tag session38-onelaunch
  QTIP_TRITON_WGMMA_FUSED_DECODE=0 fused_layers "${P38_FL_S:-90}" --M "$p38_m" --tag session38-pershard
fi
if want pending37; then
  # session 37: three 256-token entries of session 36's retune (11008x4096 K = 2, 8192^2 K = 3 and 4) decode slower
  # than the sessions 24-25 configs they replaced (8 warps, 32 table copies); timed here side by side with the 8-warp
  # 16-copy twin and the shipped entry, then the layer at 256 tokens shipped and with one decode launch per fused op
  step "wgmma at 256 tokens: the sessions 24-25 configs against the shipped ones and their 16-copy twins"
  p37_cfgs() {  # STAGES SPLIT WPF: the 8-warp config with 32 and 16 copies, the shipped one-warpgroup one
    python3 -c "
import json, sys
st, sp, wpf = map(int, sys.argv[1:])
b = {'E': 1, 'BLOCK_M': 256, 'num_warps': 8, 'STAGES': st, 'SPLIT_K': sp, 'WPF': wpf, 'table': 'shared32', 'PIPE': 1}
print(json.dumps([b, {**b, 'table': 'shared16'}, {**b, 'num_warps': 4, 'STAGES': 2, 'table': 'shared16'}]))" "$@"
  }
  # K POINT STAGES SPLIT WPF: the sessions 24-25 entry's stages, split and words ahead
  for probe in "2 11008x4096 4 1 1" "3 11008x4096 4 1 2" "4 11008x4096 4 1 2" "3 8192x8192 3 2 2" "4 8192x8192 3 2 2"; do
    # shellcheck disable=SC2086
    set -- $probe
    timeout -k 10 "${P37_PROBE_S:-45}" python3 bench/wgmma_probe.py --points "$2:256" --K "$1" --rotate \
      --configs "$(p37_cfgs "$3" "$4" "$5")" --tag "session37-k$1-$2" --out "$WORK" >>"$LOG" 2>&1
    echo "rc=$? $probe" >>"$LOG"
  done
  step "one Llama-2-7B layer at 256 tokens: shipped, and one decode launch per fused op"
  fused_layers "${P37_FL_S:-60}" --M 256 --tag session37-256-shipped
  QTIP_TRITON_WGMMA_FUSED_DECODE=1 fused_layers "${P37_FL_S:-60}" --M 256 --tag session37-256-onelaunch
fi
if want pending36; then
  # session 36: at 256 tokens gate/up's two 11008-row shards launch 172 programs each (one warpgroup, 64 rows, two
  # resident on 40 of 132 SMs); one launch over both shards with that config runs 344 programs, 2-3 an SM, where the
  # 22016-row entry the one-launch path takes has 8 warps (172 programs). q/k/v's per-shard launches are balanced
  # already (3 x 128 programs), so its one-launch config here is split 2 (384 programs)
  step "wgmma at 256 tokens: 22016, 12288 and 11008 rows, shipped configs against one-warpgroup 2-stage ones"
  p36_cfgs=$(python3 -c "
import json
b = {'E': 1, 'BLOCK_M': 256, 'num_warps': 4, 'STAGES': 2, 'SPLIT_K': 1, 'WPF': 1, 'table': 'shared16', 'PIPE': 1}
print(json.dumps([{**b, 'num_warps': 8, 'STAGES': 4}, b, {**b, 'STAGES': 3}, {**b, 'SPLIT_K': 2}, {**b, 'table': 'gather'}]))")
  timeout -k 10 "${P36_PROBE_S:-150}" python3 bench/wgmma_probe.py --points 22016x4096:256,12288x4096:256,11008x4096:256 \
    --configs "$p36_cfgs" --tag session36-grid256 --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  step "one Llama-2-7B layer at 256 tokens: shipped; one launch per fused op (shipped entries); one launch with one-warpgroup entries"
  python3 bench/override_entries.py --file "autotune_configs/$GPU.yaml" --out "$WORK/qc/autotune/$GPU.yaml" \
    --set "L16K2V2-hyb9 22016x4096 256 num_warps=4 STAGES=2 SPLIT_K=1" \
    --set "L16K2V2-hyb9 12288x4096 256 num_warps=4 STAGES=2 SPLIT_K=2" >>"$LOG" 2>&1
  fused_layers "${P36_FL_S:-60}" --M 256 --tag session36-shipped256
  QTIP_TRITON_WGMMA_FUSED_DECODE=1 fused_layers "${P36_FL_S:-60}" --M 256 --tag session36-onelaunch-shipped
  QTIP_TRITON_WGMMA_FUSED_DECODE=1 QTIP_TRITON_CACHE_DIR="$WORK/qc" fused_layers "${P36_FL_S:-60}" --M 256 \
    --tag session36-onelaunch-1wg
  rm -rf "$WORK/qc"
fi
if want pending33; then
  # session 33: at the 128-token bucket the shipped q/k/v, gate/up and 11008x4096 configs (8 warps, 4 stages, a
  # 32-copy table: 128-196 KB, ~196 registers) run one program an SM and 86-172 programs; one warpgroup with 2 stages
  # and a 16-copy table (64 KB, 143 registers) fits 3, with E 2 (96 KB, 195 registers) 2 (compiled for sm_90 here)
  step "wgmma at the 128-token bucket: shipped config against one-warpgroup configs that fit 2-3 programs an SM"
  p33_cfgs=$(python3 -c "
import json
b = {'E': 1, 'BLOCK_M': 128, 'num_warps': 4, 'STAGES': 2, 'SPLIT_K': 1, 'WPF': 1, 'table': 'shared16', 'PIPE': 1}
print(json.dumps([{**b, 'E': 2, 'num_warps': 8, 'STAGES': 4, 'table': 'shared32'}, b, {**b, 'SPLIT_K': 2},
                  {**b, 'STAGES': 3, 'SPLIT_K': 2}, {**b, 'E': 2}, {**b, 'E': 2, 'SPLIT_K': 2}, {**b, 'PIPE': 0}]))")
  timeout -k 10 "${P33_PROBE_S:-150}" python3 bench/wgmma_probe.py --points 12288x4096:128,22016x4096:128,11008x4096:128 \
    --configs "$p33_cfgs" --tag session33-occupancy128 --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
  step "one Llama-2-7B layer with one-warpgroup, 2-stage, 16-copy configs at the 128-token bucket (a user-cache copy)"
  p33_set="E=1 num_warps=4 STAGES=2 table=shared16 PIPE=1 WPF=1"
  python3 bench/override_entries.py --file "autotune_configs/$GPU.yaml" --out "$WORK/qc/autotune/$GPU.yaml" \
    --set "L16K2V2-hyb9 12288x4096 128 $p33_set SPLIT_K=2" --set "L16K2V2-hyb9 22016x4096 128 $p33_set SPLIT_K=1" \
    --set "L16K2V2-hyb9 11008x4096 128 $p33_set SPLIT_K=2" >>"$LOG" 2>&1
  QTIP_TRITON_CACHE_DIR="$WORK/qc" fused_layers "${P33_FL_S:-80}" --M "${P33_M:-96,128}" --tag session33-occ128
  rm -rf "$WORK/qc"
fi
if want ktable; then
  step "kernel table with the tuned file (registry kinds and configs), rotated weights: KT_M tokens, KT_K bits"
  BENCH_TAG="${KT_TAG:-ktable}" timeout -k 10 "${KT_S:-200}" python3 bench/kernels.py --tuned --rotate --M "${KT_M:-128,256,512}" \
    --K "${KT_K:-2,3,4}" --time-limit "$(( ${KT_S:-200} - 30 ))" --out "$WORK" >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
if want tests; then
  step "GPU tests"
  # TESTS: test files or node ids to run instead of the whole GPU suite. TESTS_S: 540 s by default (a cold Triton
  # cache took over 300 s with 8 workers in session 26: the mma gemv tests compile ~45 s each)
  # shellcheck disable=SC2086
  # -v, --durations and SIGINT at the limit: the log names each finished test and the slowest ones, so a cut run
  # says which tests were left (session 27: a suite cut at 420 s cold and 135 s warm named none)
  timeout -s INT -k 20 "${TESTS_S:-540}" python3 -m pytest -m gpu -v -p no:cacheprovider ${PYTEST_N:+-n $PYTEST_N} \
    --durations=20 --ignore=tests/test_autotune_gpu.py ${TESTS:-} \
    >"$WORK/gpu-tests.log" 2>&1
  echo "rc=$?" >>"$LOG"; tail -3 "$WORK/gpu-tests.log" >>"$LOG"
  grep -A22 "slowest" "$WORK/gpu-tests.log" >>"$LOG"
fi
if want autotunetests; then
  step "GPU autotune tests (tune, precompile, export/import, a fresh process that must not JIT; left out of the suite)"
  timeout -k 10 "${AUTOTUNE_TESTS_S:-330}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_autotune_gpu.py \
    >"$WORK/gpu-autotune-tests.log" 2>&1
  echo "rc=$?" >>"$LOG"; tail -3 "$WORK/gpu-autotune-tests.log" >>"$LOG"
fi
if want cold && [ -s "autotune_configs/$GPU.yaml" ]; then
  step "cold start"
  timeout -k 10 "${COLD_S:-150}" python3 bench/cold_start.py --file "autotune_configs/$GPU.yaml" --out "$WORK" \
    --budget-s $(( ${COLD_S:-150} - 10 )) --cold-budget-s 40 >>"$LOG" 2>&1
  echo "rc=$?" >>"$LOG"
fi
step "done"
