#!/usr/bin/env bash
# Train the text-to-image LDM as a SLURM job: one task per GPU on every node, each task one DeepSpeed rank.
#
#   mkdir -p logs    # SLURM does not create the --output directory; a missing one fails the job silently
#   sbatch slurm/train_txt2img.sh experiment=txt2img_1p45b data.latents_root=s3://bucket/latents
#   sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 --time=72:00:00 --partition=gpu \
#       slurm/train_txt2img.sh experiment=txt2img_1p45b run_name=ldm-kl8-v1
#
# Every argument is a Hydra override of conf/train.yaml; sbatch options given on the command line win over the
# #SBATCH defaults below. Keep --ntasks-per-node equal to --gpus-per-node (one rank per GPU). Submit from any
# directory (`sbatch /path/to/checkout/slurm/train_txt2img.sh`, or `sbatch "$(ldm-slurm path)/train_txt2img.sh"`
# for an installed package): the job runs there, so runs_root=runs and logs/ are under the submit directory.
#
# Preemption and the time limit: --signal=USR1@120 (no "B:") makes SLURM send SIGUSR1 to every task of the
# srun step, i.e. straight to each Python rank, 120 s before the limit; scancel --signal=USR1 JOB does the
# same. The trainer finishes the step, checkpoints, and rank 0 runs `scontrol requeue $SLURM_JOB_ID`; the
# requeued job (same job id, hence the same run dir and W&B run) resumes from `latest`. A plain
# SIGTERM (preemption, scancel) takes the same path. With "B:USR1" only this batch shell would be signalled
# and would have to forward it: that is why it is not used.
#
# Without SLURM (`bash slurm/train_txt2img.sh experiment=tiny`) it trains on this machine: NPROC processes
# through torchrun (default 1: plain python).
#
#SBATCH --job-name=ldm-txt2img
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

# Threads per rank: the CPUs SLURM gave the task (torch would otherwise start one thread per core of the node).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TOKENIZERS_PARALLELISM=false  # the loader workers tokenize; no extra thread pools inside them
export PYTHONUNBUFFERED=1            # progress lines reach the log as they happen
export PYTHONFAULTHANDLER=1          # a hung or crashed rank dumps its Python stack into the log
# Compiled DeepSpeed ops are cached across jobs instead of rebuilt by every job (~40 s each).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
# NCCL on InfiniBand clusters; uncomment and adapt to the fabric:
# export NCCL_DEBUG=WARN                  # INFO to see the chosen transports when debugging a hang
# export NCCL_SOCKET_IFNAME=ib0           # interface for NCCL's bootstrap traffic (not eth/docker bridges)
# export NCCL_IB_HCA=mlx5                 # which HCAs to use
# export NCCL_ASYNC_ERROR_HANDLING=1      # a failed collective aborts the job instead of hanging it
# export TORCH_NCCL_BLOCKING_WAIT=0

if [ -n "${SLURM_JOB_ID:-}" ]; then
  # srun no longer inherits --cpus-per-task from the allocation (Slurm >= 22.05) unless told
  export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
  echo "[train_txt2img.sh] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-1} task(s) on" \
    "${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-}; overrides: $*"
  # ldm_train.runtime.distributed maps SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST to RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR;
  # MASTER_PORT = 20000 + job id % 20000 unless exported here.
  srun --kill-on-bad-exit=1 "$PYTHON" -u -m ldm_train.train "$@"
else
  NPROC=${NPROC:-1}
  echo "[train_txt2img.sh] no SLURM: $NPROC process(es) on this machine; overrides: $*"
  if [ "$NPROC" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m ldm_train.train "$@"
  else
    exec "$PYTHON" -u -m ldm_train.train "$@"
  fi
fi
