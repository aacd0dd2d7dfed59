#!/usr/bin/env bash
# Submit the whole pipeline as SLURM jobs chained with --dependency=afterok, and print their ids.
#
#   [synthetic data] -> [first-stage training] -> prep_latents array -> finalize -> train_txt2img -> eval
#    (if no INPUT)      (if TRAIN_FIRST_STAGE=1)   (PREP_TASKS tasks)    (manifest)  (TRAIN_NODES nodes)
#
# Run it on the login node from any directory (the jobs run there; relative paths resolve there):
#   bash slurm/pipeline.sh   or   bash "$(ldm-slurm path)/pipeline.sh"
# Everything is set by environment variables (defaults in brackets):
#   WORK               output root on the shared filesystem [runs/pipeline-<date>]: raw/, latents/, runs/,
#                      eval/, logs/ (every job's output, <stage>-<job id>.out)
#   INPUT              raw image shards (img2dataset tars, brace pattern, local or s3://) [empty: write the
#                      built-in synthetic dataset: SYNTH_SAMPLES [512] images in shards of SYNTH_SHARD_SIZE [128]]
#   RESOLUTION         image side [64]
#   FIRST_STAGE        first-stage preset in conf/first_stage [tiny_kl_f4]
#   FIRST_STAGE_CKPT   its checkpoint [empty]; TRAIN_FIRST_STAGE=1 trains one first (slurm/train_autoencoder.sh,
#                      run dir $WORK/runs/autoencoder/$FIRST_STAGE, export/first_stage.safetensors in it);
#                      neither: random first-stage weights, allowed for plumbing only (ALLOW_RANDOM_FIRST_STAGE=1)
#   PREP_TASKS         array tasks encoding shards [2]
#   EXPERIMENT         trainer experiment [tiny];  TRAIN_NODES, TRAIN_TASKS_PER_NODE [the script's #SBATCH]
#   RUN_NAME           trainer run name [pipeline]: the run dir is $WORK/runs/$EXPERIMENT/$RUN_NAME
#   EVAL_PROMPTS       prompts for eval [the captions of the latent shards]; EVAL_SAMPLES [64]
#   AE_ARGS PREP_ARGS TRAIN_ARGS EVAL_ARGS   extra Hydra overrides per stage (split on spaces)
#   SBATCH_ARGS        extra sbatch options for every job, e.g. "--partition=gpu --account=proj"
#   <STAGE>_SBATCH_ARGS  extra sbatch options for one stage (SYNTHETIC, FIRST_STAGE, PREP_LATENTS, FINALIZE,
#                      TRAIN, EVAL), e.g. TRAIN_SBATCH_ARGS="--gpus-per-node=8 --time=2-00:00:00"
#   DRY_RUN=1          print the sbatch commands instead of submitting
# Output: one line per stage, "<stage> <job id>", then "pipeline <WORK>". If a stage fails, the jobs that
# depend on it are cancelled (--kill-on-invalid-dep=yes) instead of waiting forever.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=ldm_train/slurm/common.sh
. "$here/common.sh"
ldm_setup_python  # jobs inherit this environment: `python` in them runs this checkout's (or package's) code

WORK=${WORK:-runs/pipeline-$(date +%Y%m%d-%H%M%S)}
case "$WORK" in /*) ;; *) WORK="$PWD/$WORK" ;; esac
INPUT=${INPUT:-}
RESOLUTION=${RESOLUTION:-64}
SYNTH_SAMPLES=${SYNTH_SAMPLES:-512}
SYNTH_SHARD_SIZE=${SYNTH_SHARD_SIZE:-128}
FIRST_STAGE=${FIRST_STAGE:-tiny_kl_f4}
FIRST_STAGE_CKPT=${FIRST_STAGE_CKPT:-}
TRAIN_FIRST_STAGE=${TRAIN_FIRST_STAGE:-0}
ALLOW_RANDOM_FIRST_STAGE=${ALLOW_RANDOM_FIRST_STAGE:-0}
PREP_TASKS=${PREP_TASKS:-2}
EXPERIMENT=${EXPERIMENT:-tiny}
TRAIN_NODES=${TRAIN_NODES:-}
TRAIN_TASKS_PER_NODE=${TRAIN_TASKS_PER_NODE:-}
RUN_NAME=${RUN_NAME:-pipeline}
EVAL_PROMPTS=${EVAL_PROMPTS:-}
EVAL_SAMPLES=${EVAL_SAMPLES:-64}
read -r -a ae_args <<<"${AE_ARGS:-}"
read -r -a prep_args <<<"${PREP_ARGS:-}"
read -r -a train_args <<<"${TRAIN_ARGS:-}"
read -r -a eval_args <<<"${EVAL_ARGS:-}"
read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"

logs="$WORK/logs"
# SLURM does not create the directory of --output; a missing one fails the job silently
[ "${DRY_RUN:-0}" = 1 ] || mkdir -p "$logs"

submitted=()
# submit NAME [sbatch options...] -- script|--wrap=CMD [args...]: prints "NAME ID", records the id so a failed
# submission cancels the earlier ones. Later options win: the script's #SBATCH lines, the options given here,
# SBATCH_ARGS, then <NAME>_SBATCH_ARGS.
submit() {
  local name=$1
  shift
  local opts=()
  while [ "$1" != "--" ]; do opts+=("$1"); shift; done
  shift
  local upper stage_args=() log="$logs/%x-%j.out"
  upper=$(echo "$name" | tr '[:lower:]' '[:upper:]')
  local var="${upper}_SBATCH_ARGS"
  read -r -a stage_args <<<"${!var:-}"
  case " ${opts[*]} " in *" --array="*) log="$logs/%x-%A_%a.out" ;; esac
  # --error too: the scripts' own `#SBATCH --error=logs/...` would point into the submit directory
  local all=(--job-name="ldm-$name" --kill-on-invalid-dep=yes --output="$log" --error="$log"
    "${opts[@]}" "${sbatch_args[@]}" "${stage_args[@]}" "$@")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "sbatch ${all[*]}" >&2
    last_id="DRY$((${#submitted[@]} + 1))"
  else
    last_id=$(ldm_sbatch "${all[@]}") || {
      [ "${#submitted[@]}" -gt 0 ] && scancel "${submitted[@]}"
      echo "pipeline: submitting $name failed; cancelled ${submitted[*]:-nothing}" >&2
      exit 1
    }
  fi
  submitted+=("$last_id")
  echo "$name $last_id"
}

# 0. Raw images: the given INPUT, or the synthetic dataset written by a one-task job.
synth_id=""
if [ -z "$INPUT" ]; then
  INPUT="$WORK/raw"  # the encode job lists the tars of a folder itself
  submit synthetic --ntasks=1 -- --wrap="python -m data_prep.synthetic output=$WORK/raw \
num_samples=$SYNTH_SAMPLES resolution=$RESOLUTION shard_size=$SYNTH_SHARD_SIZE split=train"
  synth_id=$last_id
fi

# 1. First stage: given, trained here, or random (plumbing only).
ae_id=""
first_stage_args=()  # for prep_latents (and train, which decodes sample grids when it has a checkpoint)
if [ -n "$FIRST_STAGE_CKPT" ]; then
  first_stage_args=("first_stage.checkpoint=$FIRST_STAGE_CKPT")
elif [ "$TRAIN_FIRST_STAGE" = 1 ]; then
  submit first_stage $(ldm_afterok "$synth_id") -- "$here/train_autoencoder.sh" \
    "first_stage=$FIRST_STAGE" "data.input='$INPUT'" "runs_root=$WORK/runs" \
    "run_name=$FIRST_STAGE" "${ae_args[@]}"
  ae_id=$last_id
  first_stage_args=("first_stage.checkpoint=$WORK/runs/autoencoder/$FIRST_STAGE/export/first_stage.safetensors")
elif [ "$ALLOW_RANDOM_FIRST_STAGE" = 1 ]; then
  echo "pipeline: WARNING: random first-stage weights: latents are for plumbing only" >&2
else
  echo "pipeline: set FIRST_STAGE_CKPT=PATH, TRAIN_FIRST_STAGE=1, or ALLOW_RANDOM_FIRST_STAGE=1 (plumbing only)" >&2
  exit 2
fi

# 2. Latents: an array job, task i encodes input shards j with j % PREP_TASKS == i; then one finalize job
#    merges the per-shard stats into manifest.json and checks nothing is missing.
latents="$WORK/latents"
submit prep_latents --array="0-$((PREP_TASKS - 1))" $(ldm_afterok "$synth_id" "$ae_id") -- "$here/prep_latents.sh" \
  "input='$INPUT'" "output=$latents" "first_stage=$FIRST_STAGE" "resolution=$RESOLUTION" \
  "${first_stage_args[@]:-allow_random_first_stage=true}" "${prep_args[@]}"
prep_id=$last_id
submit finalize --ntasks=1 $(ldm_afterok "$prep_id") -- \
  --wrap="python -m data_prep.finalize output=$latents first_stage=$FIRST_STAGE"
finalize_id=$last_id

# 3. Train on the latents; the run dir name is fixed so a requeued job resumes it.
run_dir="$WORK/runs/$EXPERIMENT/$RUN_NAME"
train_opts=()
[ -n "$TRAIN_NODES" ] && train_opts+=(--nodes="$TRAIN_NODES")
[ -n "$TRAIN_TASKS_PER_NODE" ] && train_opts+=(--ntasks-per-node="$TRAIN_TASKS_PER_NODE")
submit train "${train_opts[@]}" $(ldm_afterok "$finalize_id") -- \
  "$here/train_txt2img.sh" "experiment=$EXPERIMENT" "first_stage=$FIRST_STAGE" "data.latents_root=$latents" \
  "runs_root=$WORK/runs" "run_name=$RUN_NAME" "${first_stage_args[@]}" "${train_args[@]}"
train_id=$last_id

# 4. Evaluate the run's latest export against the raw images; metrics.json lands in $WORK/eval.
prompts=${EVAL_PROMPTS:-$latents/$FIRST_STAGE}
submit eval $(ldm_afterok "$train_id") -- "$here/eval.sh" \
  "checkpoint=$run_dir" "prompts='$prompts'" "num_samples=$EVAL_SAMPLES" "reference.path='$INPUT'" \
  "output_dir=$WORK/eval" "${eval_args[@]}"

echo "pipeline $WORK"
