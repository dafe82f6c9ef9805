#!/usr/bin/env bash
# keras_sie on a GPU: the GPU-relevant tests and the overhead benchmark, in one go.
#
#   bash benchmarks/gpu_check.sh          # on a GPU machine (< 8 minutes)
#   bash benchmarks/gpu_check.sh --cpu    # dry run on CPU, tiny sizes (a couple of minutes)
#
# Results: $OUT if set, else benchmarks/results/gpu/ (GPU run) or
# benchmarks/results/gpu_dryrun/ (--cpu). They hold gpu_check.json (everything),
# summary.txt (one screen), and the raw material: pytest_*.xml (junit),
# bench_*.json (benchmarks/overhead.py), devices/mirrored/placement.json, logs/.
#
# Steps (each under its own timeout; the whole script stops starting new
# steps when its 8-minute budget is nearly spent):
#   devices         what TensorFlow sees (fails the GPU run when no GPU is visible)
#   tests_device    out-of-range ids on the device, with and without XLA (GPU
#                   scatters drop bad indices silently), skip mode, XLA and
#                   steps_per_execution scores, hash keys + XLA, streaming
#                   (index, int64 and string keys, with and without XLA)
#   tests_oracles   the exact linear oracles (shuffle/partial batch, sum and
#                   weighted-mean reductions), XLA = default, mixed precision
#                   = float32, with TensorFloat-32 off (the oracles compare at rel 1e-5)
#   tests_oracles_tf32   the same with TF32 at TensorFlow's default (on, on
#                   Ampere and later): informational, TF32 matmuls round to a
#                   10-bit mantissa; a failure here is reported, not fatal
#   tests_determinism    enable_op_determinism(): the callback does not change
#                   training (some GPU scatter kernels refuse determinism)
#   mirrored        MirroredStrategy over all GPUs vs one device, and string
#                   hash keys + XLA on all GPUs (skipped with one GPU; --cpu:
#                   2 logical CPUs, hash keys without XLA)
#   placement       where the buffer's variables live; scores finite, visits exact
#   bench_m1_m2     benchmarks/overhead.py, M1 and M2, plain vs with callback + A/A
#   bench_m2_xla_4096    M2 at batch 4096 with jit_compile=True
#   bench_step      benchmarks/step_overhead.py (a, a2, b), M1 and M2: per-step
#                   ratios from interleaved blocks of steps, the figure that resolves 1 %
#   summarize       gpu_check.json + summary.txt
set -u
cd "$(dirname "$0")/.."

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu for a dry run)" >&2; exit 2 ;;
  esac
done

if [[ -n "${OUT:-}" ]]; then RES="$OUT"
elif [[ $MODE == gpu ]]; then RES=benchmarks/results/gpu
else RES=benchmarks/results/gpu_dryrun
fi
mkdir -p "$RES/logs"
rm -f "$RES"/steps.jsonl "$RES"/pytest_*.xml "$RES"/bench_*.json "$RES"/devices.json \
  "$RES"/mirrored.json "$RES"/placement.json "$RES"/step_overhead.json "$RES"/gpu_check.json "$RES"/summary.txt

export TF_CPP_MIN_LOG_LEVEL=2 KERAS_BACKEND=tensorflow
export PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}"   # the pytest plugin
if [[ $MODE == cpu ]]; then
  export CUDA_VISIBLE_DEVICES=-1
  # tiny sizes: every step end to end, not a measurement
  BENCH=(--num-samples 2048 --rounds 1 --epochs 1 --threads 0)
  BENCH_XLA=(--num-samples 8192 --rounds 1 --epochs 1 --threads 0)
  BENCH_STEP=(--num-samples 8192 --blocks 4 --steps 4 --threads 0)
  STEP_LIMIT=240
else
  BENCH=(--num-samples 100000 --rounds 3 --epochs 2 --threads 0)
  BENCH_XLA=(--num-samples 409600 --rounds 3 --epochs 2 --threads 0)
  BENCH_STEP=(--num-samples 100000 --blocks 60 --steps 20 --threads 0)
  STEP_LIMIT=150
fi
BUDGET_S=470   # stop starting steps after this; the last one is bounded by what is left
FAILED=0

step() {  # step NAME INFORMATIONAL(0/1) CMD...
  local name=$1 info=$2; shift 2
  local left=$((BUDGET_S - SECONDS)) limit=$STEP_LIMIT rc t0
  if (( left < 15 )); then
    echo "[gpu_check] $name: not started, out of time"
    printf '{"step": "%s", "rc": 124, "seconds": 0, "note": "not started: out of time", "informational": %s}\n' \
      "$name" "$([[ $info == 1 ]] && echo true || echo false)" >> "$RES/steps.jsonl"
    [[ $info == 1 ]] || FAILED=1
    return
  fi
  (( left < limit )) && limit=$left
  echo "[gpu_check] $name (limit ${limit}s) ..."
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$RES/logs/$name.log" 2>&1
  rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d, "informational": %s, "mode": "%s"}\n' \
    "$name" "$rc" "$((SECONDS - t0))" "$([[ $info == 1 ]] && echo true || echo false)" "$MODE" \
    >> "$RES/steps.jsonl"
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - t0))s (log: $RES/logs/$name.log)"
  if (( rc != 0 )); then
    tail -n 15 "$RES/logs/$name.log" | sed 's/^/    /'
    [[ $info == 1 ]] || FAILED=1
  fi
}

PYTEST=(python -m pytest -q -p _gpu_check_plugin -p no:cacheprovider)

DEVICE_TESTS=(
  "tests/test_reliability.py::test_out_of_range_ids_raise_naming_the_id_and_size"
  "tests/test_reliability.py::test_skip_mode_counts_skipped_rows_and_keeps_the_rest_exact"
  "tests/test_categorical.py::test_xla_embedding_model_matches_default"
  "tests/test_categorical.py::test_hash_keys_under_xla_equal_the_index_run"
  "tests/test_categorical.py::test_a_fixed_batch_size_pipeline_is_scored_at_the_embeddings"
  "tests/test_stream.py::test_a_ring_smaller_than_the_epoch_gives_the_index_scores"
  "tests/test_core.py::test_steps_per_execution_and_xla_give_the_same_scores"
)
ORACLE_TESTS=(
  "tests/test_core.py::test_linear_oracle_matches_with_shuffle_and_partial_batch"
  "tests/test_trust.py::test_sum_and_weighted_mean_reductions_give_the_exact_own_loss_scores"
  "tests/test_categorical.py::test_mixed_precision_matches_float32"
)
DETERMINISM_TESTS=(
  "tests/test_core.py::test_callback_does_not_change_training"
  "tests/test_trust.py::test_the_coupling_check_does_not_change_training"
)

REQ=(); [[ $MODE == gpu ]] && REQ=(--require-gpu)
step devices 0 python benchmarks/gpu_check.py devices "$RES/devices.json" "${REQ[@]}"
if [[ $MODE == gpu ]] && ! grep -q '"/physical_device:GPU' "$RES/devices.json" 2>/dev/null; then
  cat "$RES/logs/devices.log"
  echo "[gpu_check] no GPU visible to TensorFlow; stopping (use --cpu for a dry run)." >&2
  python benchmarks/gpu_check.py summarize "$RES" > /dev/null 2>&1
  exit 3
fi
step tests_device 0 "${PYTEST[@]}" --junitxml="$RES/pytest_device.xml" "${DEVICE_TESTS[@]}"
step tests_oracles 0 env SIE_TF32=off "${PYTEST[@]}" --junitxml="$RES/pytest_oracles.xml" \
  "${ORACLE_TESTS[@]}"
step tests_oracles_tf32 1 "${PYTEST[@]}" --junitxml="$RES/pytest_oracles_tf32.xml" \
  "${ORACLE_TESTS[@]}"
step tests_determinism 0 "${PYTEST[@]}" --junitxml="$RES/pytest_determinism.xml" \
  "${DETERMINISM_TESTS[@]}"
MIRRORED_ARGS=(); [[ $MODE == cpu ]] && MIRRORED_ARGS=(--cpu)
step mirrored 0 python benchmarks/gpu_check.py mirrored "$RES/mirrored.json" "${MIRRORED_ARGS[@]}"
step placement 0 python benchmarks/gpu_check.py placement "$RES/placement.json"
step bench_m1_m2 0 python benchmarks/overhead.py --models m1,m2 --configs a,a2,b \
  --no-memory --no-scaling "${BENCH[@]}" --json "$RES/bench_m1_m2.json"
step bench_m2_xla_4096 0 python benchmarks/overhead.py --models m2 --configs a,a2,b \
  --batch-size 4096 --jit-compile true --no-memory --no-scaling "${BENCH_XLA[@]}" \
  --json "$RES/bench_m2_xla_4096.json"
step bench_step 0 python benchmarks/step_overhead.py --configs a,a2,b "${BENCH_STEP[@]}" \
  --json "$RES/step_overhead.json"

python benchmarks/gpu_check.py summarize "$RES" || FAILED=1
echo "[gpu_check] total ${SECONDS}s; results in $RES (gpu_check.json, summary.txt)"
exit $FAILED
