"""A real SLURM cluster on one machine, for tests: munged + slurmctld + N slurmd daemons under one directory.

Debian's slurm build supports several slurmd daemons per host (MULTIPLE_SLURMD), so `nodes=2` gives two
simulated nodes `node1`, `node2` with NodeAddr=127.0.0.1 and distinct ports, each with `cpus_per_node` CPUs
and `gpus_per_node` pretend GPUs (so `--gpus-per-node` requests schedule; jobs run on CPU). Everything
(config, state, spool, logs, munge key) lives under `base_dir` (the munge socket in its own temp dir), every
daemon binds 127.0.0.1 only, and every port is picked free at start, so two test sessions on one machine do
not collide. The daemons run in the foreground under Popen: they are stopped by PID (TERM, wait, then KILL),
never by name, and get SIGTERM if the test process itself dies. A requeued job restarts after ~10 s
(cred_expire=10; SLURM's default hold is 120 s).

The names node1.. do not resolve; a job that uses the first node name as MASTER_ADDR maps it through
`scontrol show node <name>` (NodeAddr=127.0.0.1), as ldm_train.runtime.distributed does, or `node_addrs` here.

Usage:
    with LocalSlurmCluster(tmp_dir, nodes=2) as cluster:
        job = cluster.sbatch("job.sh", sbatch_args=["--nodes=2"])
        assert cluster.wait(job, timeout=60) == "COMPLETED"
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ldm_train.runtime.distributed import free_ports

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")

# Job states after which nothing more happens to the job (unless someone requeues it).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
})


# Character devices that exist everywhere, standing in for GPU device files (see LocalSlurmCluster).
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")


# Pending reasons that no amount of waiting clears on this cluster.
HOPELESS_REASONS = frozenset({
    "PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit", "DependencyNeverSatisfied",
    "InvalidAccount", "InvalidQOS",
})


def missing_binaries() -> list[str]:
    """The SLURM/munge executables that are not on PATH (or in /usr/sbin, where Debian puts the daemons)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in REQUIRED_BINARIES if shutil.which(b, path=search) is None]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (even by SIGKILL), so no daemon outlives
    it. Linux only (prctl PR_SET_PDEATHSIG); elsewhere the fixture's teardown is the only stop."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol -o show ...` prints `Key=Value Key=Value ...`; values may hold spaces (Command=, Reason=)."""
    fields: dict[str, str] = {}
    # A new field starts at whitespace followed by `Key=`; everything up to the next such boundary is the value.
    for part in re.split(r"\s+(?=[A-Za-z][A-Za-z0-9_:/]*=)", line.strip()):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


class SlurmError(RuntimeError):
    """A SLURM client command failed or the cluster did not come up; the message carries the daemon logs."""


class LocalSlurmCluster:
    """Start/stop a local SLURM cluster and submit/wait/cancel jobs on it (see the module docstring)."""

    def __init__(self, base_dir: str | os.PathLike, nodes: int = 2, cpus_per_node: int = 2,
                 gpus_per_node: int = 2, real_memory_mb: int = 4000, start_timeout: float = 60.0) -> None:
        self.base = Path(base_dir).resolve()
        self.n_nodes = nodes
        self.cpus_per_node = cpus_per_node
        # Pretend GPUs, so scripts with `#SBATCH --gpus-per-node=N` are schedulable here as on a GPU cluster.
        # Slurm's gpu GRES wants one device file per GPU (a count alone registers as 0); harmless character
        # devices stand in. Jobs get CUDA_VISIBLE_DEVICES=0,.. but still run on CPU (no driver).
        if gpus_per_node > len(FAKE_GPU_FILES):
            raise ValueError(f"gpus_per_node={gpus_per_node}: at most {len(FAKE_GPU_FILES)} pretend GPUs")
        self.gpus_per_node = gpus_per_node
        self.real_memory_mb = real_memory_mb
        self.start_timeout = start_timeout
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.hostname = socket.gethostname().split(".")[0]
        self.conf_path = self.base / "etc" / "slurm.conf"
        # munged wants every directory above its socket to be o+x, which pytest's 0700 tmp dirs are not:
        # the socket gets its own short-lived directory in the system temp dir (created at start).
        self._munge_run: Path | None = None
        self.munge_socket = Path()
        self._procs: dict[str, subprocess.Popen] = {}
        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def node_addrs(self) -> dict[str, str]:
        """Node name -> address a job can connect to (all nodes are this machine)."""
        return dict.fromkeys(self.nodes, "127.0.0.1")

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, submitit, ...): SLURM_CONF plus this Python's bin dir on PATH,
        so jobs (which inherit the submitter's environment) run the same interpreter and console scripts."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        bin_dirs = [str(Path(sys.executable).parent), "/usr/sbin"]
        env["PATH"] = os.pathsep.join(bin_dirs + [env.get("PATH", "/usr/bin:/bin")])
        # A job launched from inside another job (or from a test run under SLURM) must not inherit its ids.
        for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_ARRAY", "SLURM_PROCID", "SBATCH_"))]:
            del env[key]
        # Nor a launcher's rank variables: an in-process test that called init_distributed() exported
        # RANK/WORLD_SIZE=1 into this process, and torchrun's variables win over SLURM's in a job.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
            env.pop(key, None)
        # Nor the test runner's one OpenMP thread per xdist worker: a job sizes its threads from its allocation.
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(key, None)
        return env

    def start(self) -> LocalSlurmCluster:
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"missing SLURM binaries {missing}: install with `bash .ci/install_slurm.sh`")
        self._write_files()
        try:
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf_path)])
            # The controller must be answering before slurmd registers, else registration is retried slowly.
            self._wait_until(lambda: self._client_ok(["scontrol", "ping"], "UP"), "slurmctld to answer ping")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf_path), "-N", node])
            self._wait_until(self._all_idle, f"nodes {self.nodes} to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def cancel_all(self, timeout: float = 10.0) -> None:
        """Cancel every job of this user and wait (up to `timeout`) until none is left running or pending."""
        subprocess.run(["scancel", "--full", "--user", getpass.getuser()], env=self.env,
                       capture_output=True, timeout=15, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._active_job_count() > 0:
            time.sleep(0.3)

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel every job, then TERM each daemon by PID (slurmd, slurmctld, munged), wait, KILL what remains."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            # Let the steps end first so slurmstepd processes do not outlive their slurmd.
            self.cancel_all()
        order = [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "munged"]
        for name in order:
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._munge_run is not None:
            shutil.rmtree(self._munge_run, ignore_errors=True)
            self._munge_run = None

    # ------------------------------------------------------------------ jobs
    def run(self, args: Sequence[str], timeout: float = 60.0, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; on failure raise with stderr and daemon logs."""
        full_env = self.env
        full_env.update(env or {})
        res = subprocess.run(list(args), env=full_env, capture_output=True, text=True, timeout=timeout,
                             check=False)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}\n{self.logs()}")
        return res

    def sbatch(self, script: str | os.PathLike | None, args: Iterable[str] = (),
               env: Mapping[str, str] | None = None, sbatch_args: Iterable[str] = (),
               cwd: str | os.PathLike | None = None) -> str:
        """Submit `script args...` (script None: pass `--wrap=CMD` in sbatch_args); returns the job id
        (for arrays, the array's master id)."""
        full_env = self.env
        full_env.update(env or {})
        cmd = ["sbatch", "--parsable", *sbatch_args, *([str(script), *args] if script is not None else [])]
        res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=60, check=False,
                             cwd=str(cwd) if cwd else None)
        if res.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def show_job(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` records for a job; an array gives one record per element (pending ones grouped)."""
        res = self.run(["scontrol", "-o", "show", "job", str(job_id)], timeout=30)
        return [parse_scontrol_record(line) for line in res.stdout.splitlines() if line.strip()]

    def job_states(self, job_id: str, records: list[dict[str, str]] | None = None) -> dict[str, str]:
        """JobId (array elements as `<array>_<task>`) -> JobState (from `records` if given)."""
        states = {}
        for rec in self.show_job(job_id) if records is None else records:
            key = rec.get("JobId", "?")
            if rec.get("ArrayTaskId"):
                key = f"{rec.get('ArrayJobId')}_{rec['ArrayTaskId']}"
            states[key] = rec.get("JobState", "UNKNOWN")
        return states

    def wait(self, job_id: str, timeout: float = 120.0, poll: float = 0.3) -> str:
        """Block until every element of the job is in a terminal state; return COMPLETED only if all completed,
        else the first other state seen (e.g. FAILED). Raises TimeoutError with the job record on timeout, and
        SlurmError at once when the job pends for a reason that cannot clear (it asks for more than a node has)."""
        deadline = time.monotonic() + timeout
        stuck_since: float | None = None
        while True:
            records = self.show_job(job_id)
            states = self.job_states(job_id, records)
            if states and all(s in TERMINAL_STATES for s in states.values()):
                bad = [s for s in states.values() if s != "COMPLETED"]
                return bad[0] if bad else "COMPLETED"
            stuck = [r for r in records if r.get("JobState") == "PENDING" and r.get("Reason") in HOPELESS_REASONS]
            stuck_since = (stuck_since or time.monotonic()) if stuck else None
            # a few seconds of grace: slurmctld cancels a job with --kill-on-invalid-dep on its next pass
            if stuck_since is not None and time.monotonic() - stuck_since > 10:
                rec = stuck[0]
                raise SlurmError(
                    f"job {job_id} can never start here (Reason={rec['Reason']}): it asks for "
                    f"{rec.get('TRES')} with {rec.get('CPUs/Task')} CPUs/task, nodes have {self.cpus_per_node} "
                    f"CPUs and {self.gpus_per_node} GPUs: pass smaller sbatch options (e.g. --cpus-per-task=1)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {states}\n"
                                   f"{self.show_job(job_id)}")
            time.sleep(poll)

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float = 60.0, poll: float = 0.2) -> str:
        """Block until the (non-array) job is in one of `states`; returns it. Raises if it ends elsewhere."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = next(iter(self.job_states(job_id).values()), "UNKNOWN")
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                raise SlurmError(f"job {job_id} ended {state} while waiting for {sorted(wanted)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s, wanted {sorted(wanted)}")
            time.sleep(poll)

    def scancel(self, job_id: str, signal: str | None = None, batch: bool = False, full: bool = False) -> None:
        """Cancel a job, or only signal it (`signal="USR1"`); `batch` signals just the batch script's shell,
        `full` the batch shell and every step (as SLURM's --signal=B:... / default do)."""
        cmd = ["scancel"]
        if signal:
            cmd.append(f"--signal={signal}")
        if batch:
            cmd.append("--batch")
        if full:
            cmd.append("--full")
        self.run([*cmd, str(job_id)], timeout=30)

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        out = []
        for log in sorted((self.base / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"==> {log} <==\n" + "\n".join(lines))
        return "\n".join(out)

    # ------------------------------------------------------------------ internals
    def _write_files(self) -> None:
        for sub in ("etc", "state", "log", "run", "tmp", *(f"spool/slurmd-{n}" for n in self.nodes)):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self._munge_run = Path(tempfile.mkdtemp(prefix="ldm-munge-"))
        self.munge_socket = self._munge_run / "munge.socket"
        # munged refuses group/other-accessible key dirs, and a socket dir without o+x.
        key_dir = self.base / "munge-key"
        key_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(key_dir, 0o700)
        os.chmod(self._munge_run, 0o755)
        key = key_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

        ports = free_ports(1 + self.n_nodes)
        self.ctld_port = ports[0]
        self.node_ports = dict(zip(self.nodes, ports[1:], strict=True))
        user = getpass.getuser()
        b = self.base
        lines = [
            f"ClusterName=ldmtest{self.ctld_port}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: job credentials live 120 s by default, and a requeued job is held that long before
            # it may start again (slurmd refuses a credential issued before the old one's revocation ran out);
            # 10 s keeps requeue tests short and still leaves a loaded machine time to launch a step.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            # Bind to the node's address (127.0.0.1) instead of every interface.
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/slurmd-%n",
            f"SlurmctldPidFile={b}/run/slurmctld.pid",
            f"SlurmdPidFile={b}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd-%n.log",
            f"TmpFS={b}/tmp",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # Without batch_sched_delay=0 every submission waits for the next scheduling pass (~3 s).
            # sched_interval: the periodic pass that starts jobs whose begin time has come (requeued ones);
            # default 60 s.
            "SchedulerParameters=batch_sched_delay=0,sched_interval=2",
            # Lets the simulated nodes declare more CPUs than the machine has.
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            # Finished jobs stay visible to `scontrol show job` for 5 min (sacct needs accounting).
            "MinJobAge=300",
            # Seconds between SIGTERM and SIGKILL on cancel/timeout: short keeps teardown quick.
            "KillWait=3",
            "MailProg=/bin/true",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
            (self.conf_path.parent / "gres.conf").write_text(
                f"NodeName={','.join(self.nodes)} Name=gpu File={','.join(FAKE_GPU_FILES[:self.gpus_per_node])}\n")
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={self.node_ports[node]} "
                f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN"
                + (f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""))
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 - owned by the child
        env = self.env
        # Own session: a Ctrl-C of pytest reaches the fixture's orderly stop, not the daemons directly.
        self._procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent)
        log.close()
        time.sleep(0.1)
        if self._procs[name].poll() is not None:
            raise SlurmError(f"{name} exited at once ({self._procs[name].returncode}): "
                             f"{(self.base / 'log' / f'{name}.stdout').read_text(errors='replace')}\n{self.logs()}")

    def _start_munge(self) -> None:
        b = self.base
        self._spawn("munged", [
            "munged", "-F", f"--key-file={b}/munge-key/munge.key", f"--socket={self.munge_socket}",
            f"--pid-file={b}/run/munged.pid", f"--log-file={b}/log/munged.log", f"--seed-file={b}/run/munge.seed",
        ])
        self._wait_until(self.munge_socket.exists, f"munged socket {self.munge_socket}")

    def _wait_until(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not predicate():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} died ({proc.returncode}) while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {self.start_timeout:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    def _client_ok(self, args: list[str], needle: str) -> bool:
        try:
            res = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0 and needle in res.stdout

    def _node_states(self) -> dict[str, str]:
        """Node -> sinfo state (`idle`, `mixed`, `idle+completing`, `unknown`...); {} if sinfo fails."""
        try:
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True,
                                 text=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return {}
        if res.returncode != 0:
            return {}
        return dict(line.split() for line in res.stdout.splitlines() if line.strip())

    def _all_idle(self) -> bool:
        states = self._node_states()
        return all(states.get(n) == "idle" for n in self.nodes)

    def _active_job_count(self) -> int:
        res = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                             timeout=10, check=False)
        return len(res.stdout.split()) if res.returncode == 0 else 0
