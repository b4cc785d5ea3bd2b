#!/usr/bin/env bash
# One-shot GPU check for a bare CUDA image (python3, torch, transformers, triton; nothing else), run from the
# repository root: installs the wheels in .whl/ (see shared/device/pack-wheels.sh; nitro_torch also needs
# xgrammar==0.2.8 and apache-tvm-ffi there), runs the GPU tests, then the GPU benchmarks, each writing JSON under
# $OUT, and prints one summary table last. Carry .whl and .gpu_tokenizer: the default model's tokenizer, saved by
#   python -c "from nitro_torch.models.loader import load_tokenizer as t; t('default').save_pretrained('.gpu_tokenizer')"
# A failing step is reported and the next one runs. The whole script stays under TOTAL_BUDGET_S: each step gets its own timeout, cut to what is left of the budget. The settings below
# can be overridden from the environment.
set -uo pipefail

TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-420}        # the whole script: 7 minutes on an H100/H200, summary included
INSTALL_TIMEOUT_S=${INSTALL_TIMEOUT_S:-30}
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-75}   # 55 s on an H200
W256_1B_TIMEOUT_S=${W256_1B_TIMEOUT_S:-60}
W256_8B_TIMEOUT_S=${W256_8B_TIMEOUT_S:-100}
DECODE_BF16_TIMEOUT_S=${DECODE_BF16_TIMEOUT_S:-30}
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

  run_step w256-llama-1b "$W256_1B_TIMEOUT_S" \
      python3 scripts/bench.py --workload w256 --shape llama-1b --baseline-limit "$W256_BASELINE_LIMIT" --json "$OUT/w256-llama-1b.json"
  run_step w256-llama-8b "$W256_8B_TIMEOUT_S" \
      python3 scripts/bench.py --workload w256 --shape llama-8b --baseline-limit "$W256_BASELINE_LIMIT" --json "$OUT/w256-llama-8b.json"
  run_step decode-b1-bf16 "$DECODE_BF16_TIMEOUT_S" \
      python3 scripts/bench.py --workload decode-b1 --shape llama-8b --repeats 1 --json "$OUT/decode-b1-bf16.json"
  run_step decode-b1-nf4 "$DECODE_NF4_TIMEOUT_S" \
      python3 scripts/bench.py --workload decode-b1 --shape llama-8b --repeats 1 --quantization bnb-4bit --json "$OUT/decode-b1-nf4.json"
  run_step decode-b1-int8 "$DECODE_INT8_TIMEOUT_S" \
      python3 scripts/bench.py --workload decode-b1 --shape llama-8b --repeats 1 --quantization bnb-8bit --json "$OUT/decode-b1-int8.json"

  echo
  echo "=== summary (${SECONDS}s in all)"
  python3 scripts/bench_summary.py "$OUT"/w256-*.json "$OUT"/decode-b1-*.json
  if ((${#failed[@]})); then
    echo "failed steps: ${failed[*]}"
    return 1
  fi
  echo "all steps passed"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
