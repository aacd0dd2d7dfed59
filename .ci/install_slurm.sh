#!/usr/bin/env bash
# Installs what tests/slurm_cluster.py needs for a local SLURM cluster (Debian/Ubuntu, as root):
# slurmctld + slurmd + client commands + munge. Idempotent: does nothing when everything is already there.
# The packages' post-install scripts try to start services; without systemd that is refused, harmlessly.
set -euo pipefail
need=()
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$bin")
done
if [ "${#need[@]}" -eq 0 ]; then
  echo "install_slurm: slurmctld, slurmd, sbatch and munged already installed"
  exit 0
fi
echo "install_slurm: missing ${need[*]}: installing slurmctld slurmd slurm-client munge"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  slurmctld slurmd slurm-client munge
