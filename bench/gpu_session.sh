#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one call on a lent GPU machine (one short lease).
#
# Run from the repository root on the GPU machine; results go to $OUT (default bench/results/gpu).
# The GPU machine's Python has JAX with CUDA, flax, orbax, torch and transformers, but not every
# Kestrel dependency: wheels for the rest are expected in .whl/, installed to /tmp/site. Not flax
# or orbax: flax 0.12.8 does not import under jax 0.11 (the machine's own flax 0.12.10 does).
# Prepared beside the checkout (both folders git-ignored, carried to the machine):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
#     -d .whl grain==0.2.18 array_record==0.8.6 qwix==0.1.8 llguidance==1.9.1 gguf==0.19.0 \
#     jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1 portpicker==1.6.0
#   kestrel convert SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol && mkdir -p .gpu/smollm2_shape && \
#     cp /tmp/smol/{config.json,kestrel.json,tokenizer.json,tokenizer_config.json} .gpu/smollm2_shape/
# (the config and tokenizer of SmolLM2-135M; the benchmarks use random weights of its shape).
# Each step has its own time limit, so one failure costs only its step.
#
#   bash bench/gpu_session.sh [steps...]    # steps: kernels train decode vision attention
#
# All of them need more than one call's 10 minutes: run `kernels train vision`, then
# `decode attention`. The first lease's findings are in bench/results/gpu_h200_session1.json.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
rm -rf /tmp/site  # a warm machine keeps what an earlier call installed
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || echo "wheel install failed"
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
STEPS=${*:-kernels train vision}
START=$(date +%s)

# Few files come back from a lease: one log for every step, one JSON per benchmark.
step() {  # step NAME LIMIT_S COMMAND...: runs it with a limit, appends its output to $OUT/log.txt
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "===== $name: $*" >>"$OUT/log.txt"
  timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s (at $(( $(date +%s) - START ))s)" | tee -a "$OUT/log.txt" >>"$OUT/summary"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import jax, flax, orbax.checkpoint as o, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__, 'optax', optax.__version__, jax.devices())"
  python3 -c "import model.transformer, serve.engine, train.loop; print('imports ok')"
} >"$OUT/log.txt" 2>&1
cat "$OUT/log.txt"
: >"$OUT/summary"

for s in $STEPS; do
  case $s in
    kernels)  # the compiled Pallas kernels against their references (~85 s on an H200)
      step kernels 110 env KESTREL_TEST_GPU=1 python3 -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels ;;
    train)  # MFU at SmolLM2-135M's shape, sequence 2048, bf16 (issue: training). No step had
            # finished after 130 s on the first lease: compilation of 30 unrolled layers.
      step train 240 python3 bench/train_throughput.py --config configs/smollm2_shape.py --steps 6 \
        --set data.batch_size=16 --out "$OUT/train_throughput_h200.json" ;;
    decode)  # batch-1 decode vs the HBM roofline, batch 64 throughput (issue: engine), one process
             # per part so a slow part costs only itself
      for part in model_loop engine_batch1 engine_batch64; do
        skip=$(echo model_loop engine_batch1 engine_batch64 | tr ' ' '\n' | grep -v "^$part$" | paste -sd,)
        step "decode_$part" 150 python3 bench/decode_roofline.py --shape .gpu/smollm2_shape --tokens 256 \
          --batch 64 --runs 3 --skip "$skip" --out "$OUT/decode_$part.json"
      done ;;
    vision)  # SigLIP-400M + Gemma 3 projector encode time per image (issue: vision)
      step vision 100 python3 bench/vision.py --runs 3 --gemma-layers 27 --gemma-batch 8 --torch-device cuda \
        --skip-preprocess --out "$OUT/vision_h200.json" ;;
    attention)  # kernel speed against cuDNN and the dense reference
      step attention 90 python3 bench/attention.py --out "$OUT/attention_h200.json" ;;
  esac
done
grep -E "rc=|passed|failed|Error|error:|mfu|tokens_per_s|fraction_of_roofline" "$OUT/log.txt" | cut -c1-400 | tail -n 60
cat "$OUT/summary"; rm -f "$OUT/summary"
