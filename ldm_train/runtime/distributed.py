"""Launch environment: who am I (rank, world size, local rank) and where is the rendezvous.

Three ways a process gets started, all mapped to the env vars torch.distributed and DeepSpeed read
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

- ``torchrun`` (or ``deepspeed``) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT itself;
  those win, also inside a SLURM job (``srun torchrun ...``).
- ``srun`` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST: MASTER_ADDR is the first
  host of the node list (``scontrol show hostnames``); a name that does not resolve (simulated nodes) is
  looked up as ``scontrol show node <name>`` NodeAddr, else 127.0.0.1. MASTER_PORT is 20000 + job_id % 20000
  unless MASTER_PORT is set, so two jobs sharing a node do not collide.
- nothing: one process, rank 0 of 1 (no process group unless asked for one).

``get_rank()`` / ``get_world_size()`` / ``get_local_rank()`` work before and without ``init_distributed``
(they read the launcher's env), so every module runs in a plain ``python`` too.
"""
from __future__ import annotations

import datetime
import os
import random
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_PORT_BASE = 20000
DEFAULT_PORT_RANGE = 20000


@dataclass(frozen=True)
class DistEnv:
    """The resolved launch environment of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # "torchrun" | "slurm" | "none"
    job_id: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def as_env(self) -> dict[str, str]:
        """The variables torch.distributed (env://) and DeepSpeed read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        run: Callable[[list[str]], str] | None = None,
        resolves: Callable[[str], bool] | None = None,
    ) -> DistEnv:
        """Read the launcher's variables from ``env`` (default ``os.environ``).

        ``run`` (command -> stdout) and ``resolves`` (hostname -> bool) are injectable for tests; the defaults
        call ``scontrol`` and the system resolver.
        """
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            return _from_torchrun(env)
        if _under_srun(env):
            return _from_slurm(env, run or _run, resolves or _resolves)
        return cls()


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    world = _int(env, "WORLD_SIZE", 1)
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    return DistEnv(
        rank=_int(env, "RANK", 0),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", 0),
        local_world_size=local_world,
        node_rank=_int(env, "GROUP_RANK", _int(env, "RANK", 0) // max(local_world, 1)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT", 29500),
        launcher="torchrun",
        job_id=env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID"),
    )


def _under_srun(env: Mapping[str, str]) -> bool:
    # The sbatch batch shell also carries SLURM_PROCID=0 and SLURM_NTASKS=N, but it is one process: taking
    # N from it would wait forever for ranks that never start. srun's tasks carry a numeric SLURM_STEP_ID;
    # the batch shell has none (or the "batch" step).
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    step = env.get("SLURM_STEP_ID", "")
    return step.isdigit() and int(step) < 4294967290  # 0xFFFFFFFA.. are the batch/extern/interactive steps


def _from_slurm(
    env: Mapping[str, str], run: Callable[[list[str]], str], resolves: Callable[[str], bool]
) -> DistEnv:
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    job_id = env.get("SLURM_JOB_ID")
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT", 29500)
    elif job_id is not None:
        port = DEFAULT_PORT_BASE + int(job_id) % DEFAULT_PORT_RANGE
    else:
        port = 29500
    addr = env.get("MASTER_ADDR") or master_addr_from_nodelist(
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""), run, resolves
    )
    # The step's own layout first (a step may use fewer tasks than the job); it looks like "2(x3),1" when
    # tasks are spread unevenly: the local world size is the count on this node.
    node = _int(env, "SLURM_NODEID", 0)
    local_world = (
        _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), node)
        or _int(env, "SLURM_NTASKS_PER_NODE", 0)
        or _tasks_on_node(env.get("SLURM_TASKS_PER_NODE", ""), node)
    )
    return DistEnv(
        rank=_int(env, "SLURM_PROCID", 0),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID", 0),
        local_world_size=local_world or 1,
        node_rank=node,
        master_addr=addr,
        master_port=port,
        launcher="slurm",
        job_id=job_id,
    )


def _tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed list, e.g. ``"2(x3),1"`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        if "(x" in part:
            n, rep = part.rstrip(")").split("(x")
            counts += [int(n)] * int(rep)
        else:
            counts.append(int(part))
    return counts[node_id] if node_id < len(counts) else 0


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


def master_addr_from_nodelist(
    nodelist: str,
    run: Callable[[list[str]], str] = _run,
    resolves: Callable[[str], bool] = _resolves,
) -> str:
    """First host of a SLURM node list (``node[1-4]``) as an address the other ranks can reach."""
    if not nodelist:
        return "127.0.0.1"
    try:
        first = run(["scontrol", "show", "hostnames", nodelist]).split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # no scontrol on this host: a plain single name is still usable
        first = nodelist if "[" not in nodelist and "," not in nodelist else ""
    if first and resolves(first):
        return first
    if first:
        try:
            info = run(["scontrol", "show", "node", first])
            for field in info.split():
                if field.startswith("NodeAddr="):
                    addr = field.split("=", 1)[1]
                    if addr and addr != first and resolves(addr):
                        return addr
        except (OSError, subprocess.SubprocessError):
            pass
    return "127.0.0.1"


def free_ports(count: int = 1, low: int = 0, high: int = 0) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now: any (the kernel's pick) or, with ``high``, ones in
    [low, high). They are held open together while chosen, so they differ; a later bind can still lose a race."""
    candidates = iter(random.sample(range(low, high), high - low)) if high else None
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            port = 0 if candidates is None else next(candidates, None)
            if port is None:
                raise RuntimeError(f"fewer than {count} free ports on 127.0.0.1 in [{low}, {high})")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def get_rank() -> int:
    """Global rank: the process group's if initialised, else the launcher's env, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if "RANK" in os.environ:
        return _env_int("RANK", default=0)
    return _env_int("SLURM_PROCID", default=0) if _under_srun(os.environ) else 0


def get_world_size() -> int:
    """World size: the process group's if initialised, else the launcher's env, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" in os.environ:
        return _env_int("WORLD_SIZE", default=1)
    return _env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1) if _under_srun(os.environ) else 1


def get_local_rank() -> int:
    """Rank within this node (selects the GPU): LOCAL_RANK, SLURM_LOCALID, else 0."""
    if "LOCAL_RANK" in os.environ:
        return _env_int("LOCAL_RANK", default=0)
    return _env_int("SLURM_LOCALID", default=0) if _under_srun(os.environ) else 0


def is_main() -> bool:
    """True on global rank 0 (the process that writes shared files and logs)."""
    return get_rank() == 0


# The launch variables init_distributed exported, with the value each had before (None: unset). cleanup() puts
# them back: otherwise a process without a launcher keeps RANK=0/WORLD_SIZE=1/MASTER_PORT=29500 after its run,
# and every process it starts later (a sweep's next job, a test's subprocess) looks launched by torchrun and
# binds that port.
_EXPORTED_BEFORE: dict[str, str | None] = {}


def init_distributed(
    backend: str | None = None,
    force_group: bool = False,
    timeout_s: float = 1800.0,
) -> DistEnv:
    """Resolve the launch env, export it for DeepSpeed, pick the device, and join the process group.

    ``backend`` None: nccl when CUDA is available, else gloo. A process group is created when the world
    has more than one process, or when ``force_group`` asks for a 1-process group (code that calls
    collectives unconditionally). Safe to call twice.
    """
    env = DistEnv.from_env()
    exported = env.as_env()
    for key in exported:  # what to restore at cleanup(), so children started later see no launcher
        _EXPORTED_BEFORE.setdefault(key, os.environ.get(key))
    os.environ.update(exported)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if dist.is_initialized() or not (env.is_distributed or force_group):
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if backend == "nccl":
        # binds the communicator to this GPU up front instead of guessing at the first collective
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return env


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (torch warns, and gloo sometimes aborts, if a process exits without it).

    Through DeepSpeed when it has used the group: it caches sub-groups (a clone of the world group) that
    would otherwise outlive it, and the next run in this process (a Hydra multirun point with the basic
    launcher) would fail with "Group ... is not registered". The launch variables ``init_distributed``
    exported are put back as they were.
    """
    for key, value in _EXPORTED_BEFORE.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _EXPORTED_BEFORE.clear()
    if not (dist.is_available() and dist.is_initialized()):
        return
    import sys

    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def device_for_rank(name: str = "auto") -> torch.device:
    """``auto``: this rank's CUDA device when there is one, else the CPU; anything else as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    # Subnormal floats take microcode paths on x86 CPUs that are tens of times slower: a first stage whose
    # activations drift towards them slowed from 70 to under 5 images/s mid-run. Flushing them to zero costs
    # nothing measurable in accuracy (GPUs run with flush-to-zero in most kernels anyway).
    torch.set_flush_denormal(True)
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor, average: bool = False) -> torch.Tensor:
    """In-place sum (or mean) over ranks; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        if average:
            t /= dist.get_world_size()
    return t


def broadcast_str(value: str | None) -> str:
    """Rank 0's string on every rank (run dir names must agree)."""
    if not (dist.is_available() and dist.is_initialized()):
        assert value is not None
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def broadcast_object(value: Any) -> Any:
    """Rank 0's picklable ``value`` on every rank (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order (``[value]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def rng_state(gen: torch.Generator | None = None) -> dict[str, Any]:
    """This process's RNG streams (torch, python, CUDA, and ``gen`` when given), for a resumable checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if gen is not None:
        state["generator"] = gen.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if gen is not None:
        gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
