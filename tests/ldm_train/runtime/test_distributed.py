"""Launch environment: SLURM / torchrun env mapping, rendezvous address and port, 2-process gloo groups."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest

from ldm_train.runtime import distributed
from ldm_train.runtime.distributed import DistEnv, free_ports, master_addr_from_nodelist

pytestmark = pytest.mark.integration  # starts processes or servers

SLURM_TASK = {  # what srun gives task 3 of a 2-node x 2-task step
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def fake_scontrol(nodes: dict[str, str]):
    """scontrol's answers for a cluster whose node names map to the given NodeAddr."""
    def run(cmd: list[str]) -> str:
        if cmd[:3] == ["scontrol", "show", "hostnames"]:
            return "\n".join(nodes) + "\n"
        if cmd[:3] == ["scontrol", "show", "node"]:
            return f"NodeName={cmd[3]} Arch=x86_64 CoresPerSocket=1\n   NodeAddr={nodes[cmd[3]]} NodeHostName=vm\n"
        raise AssertionError(cmd)
    return run


def test_slurm_task_maps_to_torch_env() -> None:
    env = DistEnv.from_env(SLURM_TASK, run=fake_scontrol({"gpu017": "10.0.0.17", "gpu018": "10.0.0.18"}),
                           resolves=lambda host: host == "gpu017")
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (3, 4, 1, 2, 1)
    assert env.launcher == "slurm"
    assert env.master_addr == "gpu017"  # the first host of the node list, as it resolves
    assert env.master_port == 20000 + 123456 % 20000
    assert env.as_env() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                            "GROUP_RANK": "1", "MASTER_ADDR": "gpu017", "MASTER_PORT": "23456"}


def test_unresolvable_node_name_falls_back_to_node_addr_then_loopback() -> None:
    run = fake_scontrol({"node1": "10.1.2.3", "node2": "10.1.2.4"})
    assert master_addr_from_nodelist("node[1-2]", run, resolves=lambda h: h == "10.1.2.3") == "10.1.2.3"
    assert master_addr_from_nodelist("node[1-2]", run, resolves=lambda h: False) == "127.0.0.1"
    assert master_addr_from_nodelist("", run) == "127.0.0.1"


def test_explicit_master_port_and_addr_win() -> None:
    env = DistEnv.from_env({**SLURM_TASK, "MASTER_PORT": "31000", "MASTER_ADDR": "head"},
                           run=fake_scontrol({}), resolves=lambda h: True)
    assert (env.master_addr, env.master_port) == ("head", 31000)


def test_uneven_tasks_per_node() -> None:
    env = DistEnv.from_env({**SLURM_TASK, "SLURM_NTASKS": "7", "SLURM_NODEID": "3", "SLURM_PROCID": "6",
                            "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"},
                           run=fake_scontrol({"gpu017": "x"}), resolves=lambda h: True)
    assert (env.world_size, env.local_world_size, env.node_rank) == (7, 1, 3)
    # a 2-task step inside a job of 8 tasks per node: the step's layout counts, not the job's
    step = DistEnv.from_env({**SLURM_TASK, "SLURM_NTASKS_PER_NODE": "8", "SLURM_STEP_NUM_TASKS": "2",
                             "SLURM_PROCID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"},
                            run=fake_scontrol({"gpu017": "x"}), resolves=lambda h: True)
    assert (step.world_size, step.local_world_size) == (2, 1)


def test_torchrun_env_wins_over_slurm() -> None:
    env = DistEnv.from_env({**SLURM_TASK, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "29501"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 1, 2, 1)
    assert (env.master_addr, env.master_port, env.job_id) == ("10.9.9.9", 29501, "123456")


def test_batch_shell_and_bare_process_are_one_process() -> None:
    batch_shell = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"}
    assert DistEnv.from_env(batch_shell) == DistEnv()  # sbatch's shell is not rank 0 of 4
    assert DistEnv.from_env({**SLURM_TASK, "SLURM_STEP_ID": "4294967294"}).launcher == "none"
    assert DistEnv.from_env({}) == DistEnv()


def test_rank_helpers_fall_back_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")]:
        monkeypatch.delenv(key)
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.get_local_rank()) == (0, 1, 0)
    assert distributed.is_main()
    with mock.patch.dict(os.environ):  # init_distributed exports RANK=0 etc.; keep them out of other tests
        env = distributed.init_distributed()  # one process: no group unless asked
        assert not distributed.dist.is_initialized() and env.world_size == 1
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"  # what DeepSpeed reads
        distributed.barrier()
        distributed.cleanup()  # puts the launch variables back: a process started after the run sees no launcher
        assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
        assert DistEnv.from_env().launcher == "none"
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.get_local_rank()) == (3, 4, 1)


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from ldm_train.runtime import distributed
    env = distributed.init_distributed()
    t = torch.tensor([float(env.rank + 1)])
    distributed.dist.all_reduce(t)
    distributed.barrier()
    out = {"rank": distributed.get_rank(), "world": distributed.get_world_size(), "sum": t.item(),
           "backend": distributed.dist.get_backend(), "env": {k: os.environ[k] for k in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}, "launcher": env.launcher}
    distributed.cleanup()
    with open(os.path.join(sys.argv[1], f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f)
""")


def _clean_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}


def _results(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def test_two_process_gloo_group_under_torchrun(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_ports()[0]), str(tmp_path / "worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r, res in enumerate(_results(tmp_path, 2)):
        assert (res["rank"], res["world"], res["sum"], res["backend"]) == (r, 2, 3.0, "gloo")
        assert res["launcher"] == "torchrun" and res["env"]["LOCAL_RANK"] == str(r)


def test_two_process_gloo_group_from_slurm_env(tmp_path: Path) -> None:
    # the variables srun sets; the port comes from the job id, the address from the node list
    (tmp_path / "worker.py").write_text(WORKER)
    port = free_ports(1, 20000, 40000)[0]  # then job id = port - 20000 gives it (20000 + id % 20000)
    procs = []
    for r in range(2):
        env = _clean_env() | {"SLURM_JOB_ID": str(port - 20000), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(r),
                              "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r), "SLURM_NODEID": "0",
                              "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path)], env=env,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    for r, res in enumerate(_results(tmp_path, 2)):
        assert (res["rank"], res["world"], res["sum"], res["launcher"]) == (r, 2, 3.0, "slurm")
        assert res["env"]["MASTER_PORT"] == str(port) and res["env"]["MASTER_ADDR"] == "localhost"


@pytest.mark.slurm
def test_srun_on_two_simulated_nodes(slurm_cluster, tmp_path: Path) -> None:
    """Real srun: node names node1/node2 don't resolve, so MASTER_ADDR comes from scontrol's NodeAddr."""
    (tmp_path / "worker.py").write_text(WORKER)
    res = slurm_cluster.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--time=2", sys.executable,
                             str(tmp_path / "worker.py"), str(tmp_path)], timeout=180)
    assert res.returncode == 0
    for r, out in enumerate(_results(tmp_path, 2)):
        assert (out["rank"], out["world"], out["sum"], out["launcher"]) == (r, 2, 3.0, "slurm")
        assert out["env"]["MASTER_ADDR"] == "127.0.0.1" and out["env"]["LOCAL_RANK"] == "0"


@pytest.mark.slurm
def test_sbatch_shell_is_not_a_rank(slurm_cluster, tmp_path: Path) -> None:
    """The batch shell carries SLURM_PROCID=0 and SLURM_NTASKS=4 but is one process: no 4-rank world there."""
    out = tmp_path / "out.txt"
    code = "from ldm_train.runtime.distributed import DistEnv; e = DistEnv.from_env(); print(e.launcher, e.world_size)"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nset -e\nenv | grep -c '^SLURM_PROCID=' || true\n{sys.executable} -c '{code}'\n"
                      f"srun --ntasks=4 {sys.executable} -c '{code}'\n")
    job = slurm_cluster.sbatch(script, sbatch_args=["--nodes=2", "--ntasks-per-node=2", f"--output={out}"])
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", out.read_text()
    lines = out.read_text().split("\n")
    assert lines[1] == "none 1"  # the shell itself
    assert sorted(lines[2:6]) == ["slurm 4"] * 4  # the srun tasks


def test_free_ports_are_distinct_bindable_and_in_the_range_asked() -> None:
    ports = free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:  # free now: each binds
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert all(20000 <= p < 20050 for p in free_ports(3, 20000, 20050))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        with pytest.raises(RuntimeError, match="free ports"):
            free_ports(1, taken, taken + 1)
