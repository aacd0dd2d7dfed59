# Shared shell helpers for the stage scripts and pipeline.sh in this folder. Source it, do not run it.
#
# Finding this file: sbatch runs a copy of the batch script from slurmd's spool directory, so a stage script
# cannot look beside `$0`. Each one opens with the same `ldm_slurm_dir` preamble: $LDM_REPO/slurm when LDM_REPO
# is set (an explicit checkout), else the script's own folder when run with plain bash, else the folder of the
# script as submitted (SLURM's `scontrol show job`: Command=), else the installed package's (`ldm-slurm path`).
# Jobs run where they were submitted (SLURM's default working directory): relative paths in the overrides
# (runs_root=runs, data.latents_root=...) resolve against the submit directory, not the checkout.

LDM_SLURM_DIR=$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Print the checkout these scripts belong to: $LDM_REPO, else the folder two levels above this one's real path
# (<checkout>/ldm_train/slurm; slurm/ at the top of a checkout links there) when it holds pyproject.toml.
# Prints nothing for an installed package or a copy (`ldm-slurm copy DIR`).
ldm_repo_root() {
  local root
  if [ -n "${LDM_REPO:-}" ]; then
    (cd "$LDM_REPO" && pwd)
    return
  fi
  root=$(cd "$LDM_SLURM_DIR/../.." && pwd)
  if [ -f "$root/pyproject.toml" ] && [ -f "$root/ldm_train/__init__.py" ]; then
    echo "$root"
  fi
}

# Python for the jobs. From a checkout: activate its .venv unless an environment is already active (a job
# inherits the submitter's), and put the checkout first on PYTHONPATH, so `python -m ldm_train...` runs this
# checkout's code from any directory (an editable install may point at another one). From an installed package:
# the active environment as it is.
ldm_setup_python() {
  local root
  root=$(ldm_repo_root)
  [ -n "$root" ] || return 0
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$root/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$root/.venv/bin/activate"
  fi
  case ":${PYTHONPATH:-}:" in
    *":$root:"*) ;;
    *) export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
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
