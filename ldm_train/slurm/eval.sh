#!/usr/bin/env bash
# The eval stage as a SLURM job: multi-task sampling (one srun step, every task a rank), then the metrics on
# one task (a second step). Also runs without SLURM: `bash slurm/eval.sh ...` samples with NPROC processes
# (torchrun, default 1) and then computes the metrics.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/eval.sh \
#       checkpoint=runs/txt2img_1p45b/RUN prompts=coco/captions_val2014.json num_samples=30000 \
#       steps=250 guidance_scale=[1.0,1.5] reference.path=coco/val2014 \
#       metrics.inception_weights=/weights/weights-inception-2015-12-05-6726825d.pth \
#       metrics.vgg16_weights=/weights/vgg16-397923af.pth
#
# Arguments are Hydra overrides of conf/eval.yaml. Sample i is seeded seed + i and every task takes a
# contiguous run of global batches, so the set is the same at any task count, and a requeued or re-submitted
# job skips the PNGs that exist. The output dir defaults to <run dir>/eval/<step>/<sampler>-<steps>steps-n<N>-seed<S>
# (the same in both steps: no timestamps). One task per GPU: keep --ntasks-per-node equal to --gpus-per-node.
#SBATCH --job-name=ldm-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

# Find this script's folder and source common.sh from it: sbatch runs a copy of this file from slurmd's spool
# dir, so the folder comes from LDM_REPO, plain bash's path, SLURM's record of the submitted script (its
# Command= ends with the arguments), or the installed package. The same lines open every stage script.
ldm_slurm_dir() {
  local cmd
  if [ -n "${LDM_REPO:-}" ]; then echo "$LDM_REPO/slurm"; return; fi
  if [ -f "$(dirname "${BASH_SOURCE[0]}")/common.sh" ]; then dirname "${BASH_SOURCE[0]}"; return; fi
  cmd=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n '/^ *Command=/{s///p;q}') || true
  while [ -n "$cmd" ] && [ ! -f "$cmd" ] && [ "${cmd% *}" != "$cmd" ]; do cmd=${cmd% *}; done
  if [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/common.sh" ]; then dirname "$cmd"; return; fi
  ldm-slurm path || echo "$0: no common.sh found: set LDM_REPO=<checkout> or install ldm-train" >&2
}
# shellcheck source=ldm_train/slurm/common.sh
. "$(ldm_slurm_dir)/common.sh"
ldm_setup_python  # the checkout's code and .venv, or the installed package (see common.sh); no cd
export WANDB_MODE=${WANDB_MODE:-offline}

if [ -n "${SLURM_JOB_ID:-}" ]; then
  ntasks=${SLURM_NTASKS:-1}
  echo "[eval.sh] job $SLURM_JOB_ID: sampling on $ntasks task(s), then metrics on one"
  # later overrides win: the stage is fixed per step whatever the caller passed
  srun --kill-on-bad-exit=1 python -m eval.run "$@" stage=sample
  srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 python -m eval.run "$@" stage=metrics
else
  NPROC=${NPROC:-1}
  echo "[eval.sh] no SLURM: sampling with $NPROC process(es), then metrics"
  if [ "$NPROC" -gt 1 ]; then
    python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m eval.run "$@" stage=sample
  else
    python -m eval.run "$@" stage=sample
  fi
  python -m eval.run "$@" stage=metrics
fi
