"""slurm/train_txt2img.sh: what it launches, under sbatch (srun, one rank per task, USR1 to every rank) and without."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "slurm" / "train_txt2img.sh"

# Stands in for `python` (the script's $PYTHON): records how it was launched, as which rank, and which
# signals reached it, instead of training.
PROBE = """#!{python}
import json, os, signal, sys, time
from ldm_train.runtime.distributed import DistEnv
out = os.environ["PROBE_OUT"]
env = DistEnv.from_env()
rec = {{"argv": sys.argv[1:], "rank": env.rank, "world": env.world_size, "local_rank": env.local_rank,
       "addr": env.master_addr, "port": env.master_port, "launcher": env.launcher,
       "omp": os.environ.get("OMP_NUM_THREADS"), "signals": [], "cwd": os.getcwd(),
       "code": sys.modules["ldm_train"].__file__, "pythonpath": os.environ.get("PYTHONPATH", "")}}
signal.signal(signal.SIGUSR1, lambda *_: rec["signals"].append("USR1"))
open(os.path.join(out, f"ready{{env.rank}}"), "w").close()
deadline = time.time() + 120
while os.environ.get("PROBE_WAIT") and not rec["signals"] and time.time() < deadline:
    time.sleep(0.1)
with open(os.path.join(out, f"rank{{env.rank}}.json"), "w") as f:
    json.dump(rec, f)
"""


def probe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE.format(python=sys.executable))
    path.chmod(0o755)
    (tmp_path / "out").mkdir()
    return path


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    return {**env, "LDM_REPO": str(REPO), **extra}


def test_runs_locally_without_slurm(tmp_path: Path) -> None:
    env = clean_env(PYTHON=str(probe(tmp_path)), PROBE_OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(SCRIPT), "experiment=tiny", "train.total_samples=64"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert rec["argv"] == ["-u", "-m", "ldm_train.train", "experiment=tiny", "train.total_samples=64"]
    assert (rec["launcher"], rec["world"], rec["omp"]) == ("none", 1, "1")


def test_nproc_goes_through_torchrun(tmp_path: Path) -> None:
    env = clean_env(PYTHON=str(probe(tmp_path)), PROBE_OUT=str(tmp_path / "out"), NPROC="2")
    res = subprocess.run(["bash", str(SCRIPT), "experiment=tiny"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert rec["argv"] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ldm_train.train", "experiment=tiny"]


@pytest.mark.slurm
def test_sbatch_runs_one_rank_per_task_and_usr1_reaches_them(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = clean_env(PYTHON=str(probe(tmp_path)), PROBE_OUT=str(out), PROBE_WAIT="1")
    log = tmp_path / "job.out"
    job = slurm_cluster.sbatch(SCRIPT, args=["experiment=tiny", "run_name=x"], env=env, cwd=REPO,
                               sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
                                            "--cpus-per-task=2", "--time=5", f"--output={log}", f"--error={log}"])
    deadline = time.monotonic() + 120
    while not all((out / f"ready{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no job log"
        time.sleep(0.2)
    slurm_cluster.scancel(job, signal="USR1")  # what --signal=USR1@120 does before the time limit
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", log.read_text()
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(recs):
        assert rec["argv"] == ["-u", "-m", "ldm_train.train", "experiment=tiny", "run_name=x"]
        assert (rec["rank"], rec["world"], rec["local_rank"], rec["launcher"]) == (r, 2, 0, "slurm")
        assert rec["addr"] == "127.0.0.1"  # node1 does not resolve: scontrol's NodeAddr
        assert rec["port"] == 20000 + int(job) % 20000
        assert rec["omp"] == "2"  # the task's CPUs
        assert rec["signals"] == ["USR1"]  # the Python rank itself got the signal
    assert f"[train_txt2img.sh] job {job} (restart 0): 2 task(s) on 2 node(s)" in log.read_text()


@pytest.mark.slurm
@pytest.mark.parametrize("origin", ["checkout", "copy"])
def test_sbatch_from_another_directory_runs_there(slurm_cluster, tmp_path: Path, origin: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Submitted from an empty directory without LDM_REPO, the job (a copy in slurmd's spool dir) finds common.sh
    through SLURM's record of the submitted script, and runs in the submit directory. From the checkout it runs
    the checkout's code; from `ldm-slurm copy` (a folder with a space) whatever the environment has installed."""
    monkeypatch.delenv("LDM_REPO", raising=False)
    script = SCRIPT
    if origin == "copy":
        from ldm_train.slurm_scripts import copy_scripts

        copy_scripts(tmp_path / "my scripts")
        script = tmp_path / "my scripts" / "train_txt2img.sh"
    submit_dir, out, log = tmp_path / "submit", tmp_path / "out", tmp_path / "job.out"
    submit_dir.mkdir()
    env = {k: v for k, v in clean_env(PYTHON=str(probe(tmp_path)), PROBE_OUT=str(out)).items() if k != "LDM_REPO"}
    job = slurm_cluster.sbatch(script, args=["experiment=tiny", "runs_root=runs"], env=env, cwd=submit_dir,
                               sbatch_args=["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1",
                                            "--cpus-per-task=1", "--time=5", f"--output={log}", f"--error={log}"])
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", log.read_text() if log.exists() else "no job log"
    rec = json.loads((out / "rank0.json").read_text())
    assert rec["argv"] == ["-u", "-m", "ldm_train.train", "experiment=tiny", "runs_root=runs"]
    assert rec["cwd"] == str(submit_dir)  # relative overrides (runs_root=runs) resolve here
    assert list(submit_dir.iterdir()) == []
    if origin == "checkout":
        assert rec["pythonpath"].split(":")[0] == str(REPO)
        assert Path(rec["code"]).resolve().parent == REPO / "ldm_train"
    else:
        assert str(REPO) not in rec["pythonpath"].split(":")
