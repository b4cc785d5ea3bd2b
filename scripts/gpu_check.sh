#!/usr/bin/env bash
# One-shot GPU check for a bare CUDA image (python3, torch, transformers, triton; nothing else), run from the
# repository root: installs the wheels in .whl/ (see shared/device/pack-wheels.sh; nitro_torch also needs
# xgrammar==0.2.8 and apache-tvm-ffi there), runs the GPU tests, then the GPU benchmarks, each writing JSON under
# $OUT, and prints one summary table last. Carry .whl and .gpu_tokenizer: the default model's tokenizer, saved by
#   python -c "from nitro_torch.models.loader import load_tokenizer as t; t('default').save_pretrained('.gpu_tokenizer')"
# A failing step is reported and the next one runs. The whole script stays under TOTAL_BUDGET_S: each step gets its own timeout, cut to what is left of the budget. The settings below
# can be overridden from the environment.
set -uo pipefail

TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-540}        # the whole script: 9 minutes on an H100/H200, summary included
INSTALL_TIMEOUT_S=${INSTALL_TIMEOUT_S:-30}
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-75}   # 55 s on an H200
W256_1B_TIMEOUT_S=${W256_1B_TIMEOUT_S:-60}
W256_8B_TIMEOUT_S=${W256_8B_TIMEOUT_S:-100}
PROFILE_TIMEOUT_S=${PROFILE_TIMEOUT_S:-60}   # torch.profiler of single decode steps (llama-1b at 1 and 256, llama-8b at 1)
HTTP_W256_TIMEOUT_S=${HTTP_W256_TIMEOUT_S:-120} # save a random-init llama-1b, serve it, bench --url w256
DECODE_BF16_TIMEOUT_S=${DECODE_BF16_TIMEOUT_S:-30}
ASYNC_TIMEOUT_S=${ASYNC_TIMEOUT_S:-45}       # w256 llama-1b with --async-scheduling, nitro only
DECODE_NF4_TIMEOUT_S=${DECODE_NF4_TIMEOUT_S:-75} # includes saving the random-init 8B model once (16 GB) for quantized loading
DECODE_INT8_TIMEOUT_S=${DECODE_INT8_TIMEOUT_S:-110} # reuses that folder; two quantized loads (HF and nitro) per step
MIN_STEP_S=${MIN_STEP_S:-15}                 # a step with less budget left than this is skipped
W256_BASELINE_LIMIT=${W256_BASELINE_LIMIT:-64} # hf-static / hf-cb run this many of the 256 w256 requests

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
failed=()

# run_step NAME TIMEOUT_S CMD...: runs CMD under the smaller of TIMEOUT_S and the budget left; never aborts.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_BUDGET_S - SECONDS))
  if ((left < MIN_STEP_S)); then
    echo "=== $name: skipped, ${left}s of the ${TOTAL_BUDGET_S}s budget left"
    failed+=("$name (no time)")
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (timeout ${limit}s, ${SECONDS}s elapsed)"
  local start=$SECONDS rc=0
  timeout -k 10 "$limit" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "=== $name: TIMED OUT after ${limit}s"
    failed+=("$name (timeout)")
  elif ((rc != 0)); then
    echo "=== $name: FAILED (exit $rc) after $((SECONDS - start))s"
    failed+=("$name (exit $rc)")
  else
    echo "=== $name: ok in $((SECONDS - start))s"
  fi
}

# http_w256 SHAPE: the same w256 requests through `nitro-torch serve` on this GPU (the served default: the engine
# core in its own process), measured by `bench --url`; compare with the in-process w256 figure of the same shape.
http_w256() {
  local shape=$1 port=3999 folder
  folder=$(python3 -c "import torch; from nitro_torch.bench.models import save_random_model as s; print(s('$shape', torch.bfloat16, 'cuda', 0, '/tmp/nitro_weights'))" | tail -1) || return 1
  python3 -m nitro_torch.cli serve --model "$folder" --port $port --max-num-seqs 256 --max-num-batched-tokens 8192 \
      --max-model-len 2048 --log-level warning > "$OUT/serve-$shape.log" 2>&1 &
  local server=$!
  for _ in $(seq 1 90); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    sleep 1
  done
  python3 -m nitro_torch.cli bench --url "http://127.0.0.1:$port" --workload w256 --shape "$shape" --concurrency 256 \
      --json "$OUT/w256-$shape-http.json"
  local rc=$?
  kill "$server"; wait "$server" 2> /dev/null
  return $rc
}

main() {
  echo "=== GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
  if compgen -G ".whl/*.whl" > /dev/null; then
    run_step install "$INSTALL_TIMEOUT_S" \
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "=== install: no .whl/*.whl here (run shared/device/pack-wheels.sh xgrammar==0.2.8 apache-tvm-ffi first)"
  fi
  export PYTHONPATH=/tmp/site:$PWD
  # the tests need only the default model's tokenizer, not its 98 MB GGUF: carry a saved copy (see below)
  [[ -d .gpu_tokenizer ]] && export NITRO_TEST_TOKENIZER=$PWD/.gpu_tokenizer
  python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "triton", "bitsandbytes", "xgrammar", "nitro_torch.engine.engine"):
    try:
        module = importlib.import_module(name)
        print(f"import {name}: ok {getattr(module, '__version__', '')}")
    except Exception as exc:  # noqa: BLE001 - report every missing piece, not just the first
        print(f"import {name}: FAILED ({type(exc).__name__}: {exc})")
import torch
print(f"cuda available: {torch.cuda.is_available()}")
PY

  run_step gpu-tests "$TESTS_TIMEOUT_S" python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu

  # Where does a decode step's time go? GPU busy vs idle per step, and whether the decode graph replayed.
  run_step profile-1b "$PROFILE_TIMEOUT_S" \
      python3 -m nitro_torch.bench.profile_step --shape llama-1b --seqs 1 256 --json "$OUT/profile-llama-1b.json"
  run_step profile-8b "$PROFILE_TIMEOUT_S" \
      python3 -m nitro_torch.bench.profile_step --shape llama-8b --seqs 1 --json "$OUT/profile-llama-8b.json"

  run_step w256-llama-1b "$W256_1B_TIMEOUT_S" \
      python3 scripts/bench.py --workload w256 --shape llama-1b --baseline-limit "$W256_BASELINE_LIMIT" --json "$OUT/w256-llama-1b.json"
  # --async-scheduling (off by default until this run decides): the same w256 and batch-1 decode, nitro only
  run_step w256-llama-1b-async "$ASYNC_TIMEOUT_S" \
      python3 scripts/bench.py --workload w256 --shape llama-1b --systems nitro --nitro-opt async_scheduling=true \
      --json "$OUT/async-w256-llama-1b.json"
  run_step w256-llama-8b "$W256_8B_TIMEOUT_S" \
      python3 scripts/bench.py --workload w256 --shape llama-8b --baseline-limit "$W256_BASELINE_LIMIT" --json "$OUT/w256-llama-8b.json"
  run_step w256-llama-1b-http "$HTTP_W256_TIMEOUT_S" http_w256 llama-1b
  run_step decode-b1-bf16 "$DECODE_BF16_TIMEOUT_S" \
      python3 scripts/bench.py --workload decode-b1 --shape llama-8b --repeats 1 --json "$OUT/decode-b1-bf16.json"
  run_step decode-b1-bf16-async "$DECODE_BF16_TIMEOUT_S" \
      python3 scripts/bench.py --workload decode-b1 --shape llama-8b --repeats 1 --systems nitro \
      --nitro-opt async_scheduling=true --json "$OUT/async-decode-b1-bf16.json"
  run_step decode-b1-nf4 "$DECODE_NF4_TIMEOUT_S" \
      python3 scripts/bench.py --workload decode-b1 --shape llama-8b --repeats 1 --quantization bnb-4bit --json "$OUT/decode-b1-nf4.json"
  run_step decode-b1-int8 "$DECODE_INT8_TIMEOUT_S" \
      python3 scripts/bench.py --workload decode-b1 --shape llama-8b --repeats 1 --quantization bnb-8bit --json "$OUT/decode-b1-int8.json"

  echo
  echo "=== summary (${SECONDS}s in all)"
  python3 scripts/bench_summary.py "$OUT"/w256-llama-?b.json "$OUT"/decode-b1-*.json
  echo "--- with --async-scheduling (nitro only):"
  python3 scripts/bench_summary.py "$OUT"/async-*.json
  for profile in "$OUT"/profile-*.json "$OUT"/w256-*-http.json; do
    [[ -f $profile ]] && { echo "--- $(basename "$profile")"; python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])), indent=1)[:1500])" "$profile"; }
  done
  if ((${#failed[@]})); then
    echo "failed steps: ${failed[*]}"
    return 1
  fi
  echo "all steps passed"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
