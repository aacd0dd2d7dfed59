#!/usr/bin/env bash
# Train a first-stage autoencoder (KL or VQ) as a SLURM job: one task per GPU on every node, one DDP rank each.
#
#   mkdir -p logs    # SLURM does not create the --output directory
#   sbatch slurm/train_autoencoder.sh first_stage=kl_f8 data.input='s3://bucket/laion/{000000..009999}.tar' \
#       data.heldout=s3://bucket/laion-val/ loss.lpips_backbone=/shared/weights/vgg16-397923af.pth
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/train_autoencoder.sh first_stage=kl_f8 ...
#
# Every argument is a Hydra override of conf/train_autoencoder.yaml. DDP (nccl on GPU, gloo on CPU); rank,
# world size and master address come from SLURM through ldm_train.runtime.distributed. --signal=USR1@120 reaches every
# task: the trainer finishes the step, checkpoints, and rank 0 requeues the job, which resumes from the last
# checkpoint of the same run dir (the run dir remembers the SLURM job id).
#
# Without SLURM (`bash slurm/train_autoencoder.sh first_stage=tiny_kl_f4 data.input=...`) it trains here:
# NPROC processes through torchrun (default 1: plain python).
#
#SBATCH --job-name=ldm-autoencoder
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out
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
PYTHON=${PYTHON:-python}

# Threads per rank: the CPUs SLURM gave the task (the image loader workers are separate processes).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1

if [ -n "${SLURM_JOB_ID:-}" ]; then
  export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
  echo "[train_autoencoder.sh] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-1} task(s) on" \
    "${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-}; overrides: $*"
  srun --kill-on-bad-exit=1 "$PYTHON" -u -m ldm_train.train_autoencoder "$@"
else
  NPROC=${NPROC:-1}
  echo "[train_autoencoder.sh] no SLURM: $NPROC process(es) on this machine; overrides: $*"
  if [ "$NPROC" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m ldm_train.train_autoencoder "$@"
  else
    exec "$PYTHON" -u -m ldm_train.train_autoencoder "$@"
  fi
fi
