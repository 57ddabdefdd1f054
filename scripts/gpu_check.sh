#!/usr/bin/env bash
# GPU check of the real-scale learner, one prepared script (under 10 minutes on one H100 / H200):
# a random-weight Qwen2 model of Qwen2.5-0.5B's shape with one MTP layer, FSDP2 on one GPU
# (torchrun, world size 1), bf16 compute, activation checkpointing, token-budgeted micro-batches,
# a few RL steps of each regime with rollout=hf; step time, peak memory and the learner's MFU go
# to results/gpu_check.md with the card's name. vLLM is not installed on the GPU machine: the
# report says so and rollout=vllm is not measured.
#
#   bash scripts/gpu_check.sh                   # on a GPU machine
#   GPU_CHECK_TOY=1 bash scripts/gpu_check.sh   # toy sizes on the CPU (automatic without CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=1

TOY=${GPU_CHECK_TOY:-}
if [ -z "$TOY" ]; then
  if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then TOY=0; else
    TOY=1; echo "gpu_check: no CUDA device visible, running the CPU toy mode"; fi
fi
WORK=${GPU_CHECK_DIR:-$(mktemp -d -t occ_gpu_check.XXXXXX)}
OUT=${GPU_CHECK_OUT:-results/gpu_check.md}

if [ "$TOY" = 1 ]; then
  export OMP_NUM_THREADS=1
  TOY_FLAG=--toy; PER_RUN_S=300
  SIZE=(trainer.device=cpu data.prompts_per_step=4 algorithm.group_size=4 algorithm.num_mini_batches=2
        rollout.max_new_tokens=16 algorithm.max_tokens_per_micro_batch=64 trainer.total_steps=2
        trainer.final_eval_problems=4)
else
  export OMP_NUM_THREADS=8
  TOY_FLAG=; PER_RUN_S=170
  SIZE=(trainer.device=cuda data.prompts_per_step=32 algorithm.group_size=8 algorithm.num_mini_batches=4
        rollout.max_new_tokens=512 algorithm.max_tokens_per_micro_batch=8192 trainer.total_steps=3
        trainer.final_eval_problems=16)
fi
COMMON=(model.path="$WORK/model" model.name=qwen2_random model.num_mtp_layers=1 model.gradient_checkpointing=true
        data=tiny optimizer.lr=1e-6 trainer.eval_before_train=false trainer.eval_every=0 trainer.save_every=0
        trainer.resume=never trainer.progress=false logger=jsonl "${SIZE[@]}")

echo "gpu_check: work dir $WORK"
$PY scripts/gpu_check.py make-model "$WORK/model" $TOY_FLAG
for regime in detach ce policy occ; do
  echo "gpu_check: regime=$regime"
  timeout "$PER_RUN_S" $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m occ_exp.train \
    regime=$regime "${COMMON[@]}" hydra.run.dir="$WORK/$regime"
  rm -rf "$WORK/$regime/checkpoints"  # the final checkpoint is not part of the check
done
$PY scripts/gpu_check.py report "$OUT" "$WORK"/{detach,ce,policy,occ} $TOY_FLAG
echo "gpu_check: wrote $OUT"
