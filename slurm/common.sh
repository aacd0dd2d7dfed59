# Shared shell helpers for the slurm/*.sh stage scripts and slurm/pipeline.sh. Source it, do not run it:
#   source "$(ldm_root_guess)/slurm/common.sh"   or, from a stage script:
#   . "${LDM_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}/slurm/common.sh"
#
# Why a helper for the repo root: sbatch copies the batch script into slurmd's spool directory, so inside a job
# `dirname "$0"` is that spool directory, not slurm/. The submit directory (SLURM_SUBMIT_DIR) or an explicit
# LDM_REPO is what points back at the checkout.

# Print the repository root: $LDM_REPO, else the submit dir if it holds slurm/common.sh, else this file's parent.
ldm_repo_root() {
  if [ -n "${LDM_REPO:-}" ]; then
    echo "$LDM_REPO"
  elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/slurm/common.sh" ]; then
    echo "$SLURM_SUBMIT_DIR"
  else
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  fi
}

# Activate the checkout's .venv unless a Python environment is already active (a job inherits the submitter's).
ldm_activate_venv() {
  local root
  root=$(ldm_repo_root)
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$root/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$root/.venv/bin/activate"
  fi
}

# ldm_sbatch [sbatch args...] script [script args...] -> prints the job id (the array's id for arrays).
# Fails loudly with sbatch's message; `--parsable` may print "id;cluster", keep the id.
ldm_sbatch() {
  local out
  if ! out=$(sbatch --parsable "$@"); then
    echo "ldm_sbatch: sbatch $* failed" >&2
    return 1
  fi
  echo "${out%%;*}"
}

# ldm_afterok ID... -> "--dependency=afterok:ID:ID" (nothing for no ids), for chaining stages.
ldm_afterok() {
  local ids=()
  local id
  for id in "$@"; do [ -n "$id" ] && ids+=("$id"); done
  [ "${#ids[@]}" -eq 0 ] && return 0
  local IFS=:
  echo "--dependency=afterok:${ids[*]}"
}
