#!/usr/bin/env bash
# The GPU check, one prepared script for a lent one-GPU machine as it is (torch and transformers of
# its own, no hydra-core / omegaconf / math-verify / wandb / vllm, no network). It installs the
# carried wheels into a throwaway folder (never touching that machine's torch), runs each part of
# scripts/gpu_check.py with a hard time limit (at most 8 minutes in all) and writes
# $GPU_CHECK_RESULTS/gpu_check.md (default results/) and $GPU_CHECK_RESULTS/gpu_check/ even when a
# part fails. Parts: setup, measured matmul peak, (a) FSDP2 learner steps of a 0.5B-shape Qwen2 + MTP
# layer with checkpointing, shared prompts and 8k-token micro-batches, (b) exact c / v2 diagnostics
# cost, (c) save + bit-exact resume, (d) the tiny task's RL loop (a tiny Table 1), (e) what it cannot
# prove there. scripts/gpu_check.py's docstring has the details and the environment variables.
#
# Here, once (the wheels, ~0.6 MiB, into the ignored folder .gpu_wheels/):
#   make gpu-wheels
# On the lent machine, with the device tool (one call; the results come back under $OUT):
#   run(command="GPU_CHECK_RESULTS=$OUT GPU_CHECK_COMMIT=<git rev-parse --short HEAD> bash scripts/gpu_check.sh",
#       carry=[".gpu_wheels"], timeout_s=600)
# then copy the returned gpu_check.md and gpu_check/ into results/ and commit them.
# On the CPU (toy sizes, about a minute; automatic without CUDA):
#   GPU_CHECK_TOY=1 GPU_CHECK_RESULTS=/tmp/gc bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false WANDB_MODE=offline \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WHEELS=${GPU_CHECK_WHEELS:-.gpu_wheels}
GPU_CHECK_SITE=""
if ! $PY -c "import hydra, omegaconf, math_verify" >/dev/null 2>&1; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    GPU_CHECK_SITE=$(mktemp -d -t occ_gpu_site.XXXXXX)
    # --no-deps: only the carried wheels, never the machine's torch / transformers / numpy
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$GPU_CHECK_SITE" "$WHEELS"/*.whl; then
      export PYTHONPATH="$PYTHONPATH:$GPU_CHECK_SITE"
      echo "gpu_check: installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $GPU_CHECK_SITE"
    else
      echo "gpu_check: installing the carried wheels from $WHEELS failed; the parts that need them will say so"
    fi
  else
    echo "gpu_check: hydra-core / omegaconf / math-verify are missing and $WHEELS has no wheels" \
      "(run 'make gpu-wheels' here and carry .gpu_wheels); the parts that need them will say so"
  fi
fi
export GPU_CHECK_SITE
exec $PY scripts/gpu_check.py run
