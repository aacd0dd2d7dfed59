#!/usr/bin/env bash
# Encode images into latent shards as a SLURM array: task i of n encodes input shards j with j % n == i, input
# shard j -> <output>/<first_stage>/shard-{j:06d}.tar, so tasks never collide. Arguments are Hydra overrides
# of conf/encode.yaml (quote brace patterns for Hydra: "input='s3://b/laion/{000000..004999}.tar'").
#
#   sbatch --array=0-31 --gpus-per-task=1 --cpus-per-task=8 slurm/prep_latents.sh \
#       "input='s3://bucket/laion/{000000..004999}.tar'" output=s3://bucket/latents \
#       first_stage=kl_f8 first_stage.checkpoint=/weights/kl-f8.ckpt resolution=256
#
# Each task writes a stats part per finished shard; whichever task finishes last finds every part and writes
# manifest.json (finalize=auto), or run `python -m data_prep.finalize output=... first_stage=...` afterwards
# (e.g. as an afterok job, with finalize=false here). Re-submitting the same command (or a requeue) redoes only
# the shards without a part. A task exits non-zero when one of its input shards failed or was damaged.
#
# Give each task about num_workers + 2 CPUs (--cpus-per-task; the default 2 fits the smallest nodes).
#
# Outside SLURM: `bash slurm/prep_latents.sh input=... output=...` runs one process, or NPROC processes on this
# machine (RANK/WORLD_SIZE split, the same assignment as an array of NPROC tasks).
#SBATCH --job-name=ldm-prep-latents
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
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

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  # data_prep.encode reads SLURM_ARRAY_TASK_ID / _MIN / _COUNT itself
  echo "[prep_latents.sh] array job ${SLURM_ARRAY_JOB_ID:-?} task $SLURM_ARRAY_TASK_ID on $(hostname)"
  exec python -m data_prep.encode "$@"
elif [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "[prep_latents.sh] job $SLURM_JOB_ID is not an array: one task encodes every shard"
  exec python -m data_prep.encode task_index=0 num_tasks=1 "$@"
fi

NPROC=${NPROC:-1}
echo "[prep_latents.sh] no SLURM: $NPROC process(es)"
if [ "$NPROC" -le 1 ]; then
  exec python -m data_prep.encode task_index=0 num_tasks=1 "$@"
fi
pids=()
for ((r = 0; r < NPROC; r++)); do
  RANK=$r WORLD_SIZE=$NPROC python -m data_prep.encode "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit "$status"
