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

# sbatch runs a copy of this file from the spool dir: find the checkout via LDM_REPO / the submit dir.
repo=${LDM_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=slurm/common.sh
. "$repo/slurm/common.sh"
cd "$(ldm_repo_root)"
ldm_activate_venv

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
