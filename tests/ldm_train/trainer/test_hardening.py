"""Hardening of the trainer: resume only ever loads weights (a pickle with code in a DeepSpeed
checkpoint is refused, naming the file), checks the checkpoint against the file manifest written at save time and
falls back to the previous intact one, works under torchrun at world size 1, keeps one stats.jsonl row per step
across a resume, and two runs of the same command train the same bytes.

Most tests start from one short run (``base_run``: 4 steps, checkpoints at steps 2 and 4), copied per test.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_train.runtime import checkpoint_dir as cd
from ldm_train.runtime.distributed import free_ports
from ldm_train.trainer import checkpoint as ck
from tests.ldm_train.trainer.helpers import REPO, read_stats, run_trainer, tiny_overrides, trainer_env
from tests.malicious_pickle import write_malicious

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STEP_ARGS = {"train.checkpoint.every_samples": 8 * 2, "train.checkpoint.keep_last": 5}


def _args(latents: Path, runs: Path, steps: int, **extra) -> list[str]:
    return tiny_overrides(latents, runs, run_name="r", **{"train.total_samples": 8 * steps, **STEP_ARGS, **extra})


@pytest.fixture(scope="module")
def base_run(latents_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs root of a 6-step run stopped after step 4 (max_steps): checkpoints step_0000002 and step_0000004."""
    runs = tmp_path_factory.mktemp("base") / "runs"
    run_trainer(_args(latents_root, runs, 6, **{"train.max_steps": 4}), nproc=1)
    ckpts = runs / "tiny" / "r" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    assert (ckpts / "step_0000002" / cd.MANIFEST).is_file()
    return runs


def _copy(base_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    runs = tmp_path / "runs"
    shutil.copytree(base_run, runs)
    return runs, runs / "tiny" / "r"


def _own_file(path: Path) -> dict:
    """The content of a DeepSpeed file this test's own run just wrote (trusted: a full unpickle is fine here)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_stats(run_dir) if "loss" in row]


# ---- 1. resume never unpickles code ----------------------------------------------------------------------
def test_pickled_code_in_a_resumed_deepspeed_checkpoint_is_refused(latents_root, base_run, tmp_path) -> None:
    """The attacker replaced mp_rank_00_model_states.pt and rewrote files.json to match: the manifest cannot tell,
    weights_only does."""
    runs, run_dir = _copy(base_run, tmp_path)
    tag_dir = run_dir / "checkpoints" / "step_0000004"
    target = tag_dir / "mp_rank_00_model_states.pt"
    marker = tmp_path / "marker"
    write_malicious(target, marker, _own_file(target))
    manifest_file = tag_dir / "files.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        manifest["files"][target.name] = {"size": target.stat().st_size,
                                          "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
        manifest_file.write_text(json.dumps(manifest))

    proc = run_trainer(_args(latents_root, runs, 6), nproc=1, check=False)
    out = proc.stdout + proc.stderr
    assert not marker.exists()  # the pickle's code never ran
    assert proc.returncode != 0, out[-3000:]
    assert f"refusing to load {target}" in out, out[-3000:]
    assert _steps(run_dir) == [1, 2, 3, 4]  # nothing trained


def test_universal_conversion_refuses_pickled_code(base_run, tmp_path) -> None:
    """Resuming at another world size converts with DeepSpeed's ds_to_universal: its loads are weights-only too."""
    runs, run_dir = _copy(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    target = ckpts / "step_0000004" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "marker"
    write_malicious(target, marker, _own_file(target))
    with pytest.raises(RuntimeError) as err:
        ck.ensure_universal(ckpts, "step_0000004")
    assert f"refusing to load {target}" in str(err.value)
    assert not marker.exists()


def test_rank_state_with_pickled_code_is_refused_naming_it(base_run, tmp_path) -> None:
    runs, run_dir = _copy(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    path = ckpts / "step_0000004" / ck.rank_state_name(0)
    marker = tmp_path / "marker"
    write_malicious(path, marker)
    with pytest.raises(ValueError, match=f"refusing to load {path}"):
        ck.load_rank_state(ckpts, "step_0000004", 0, True)
    assert not marker.exists()


def test_first_stage_trainer_resume_refuses_pickled_code_naming_the_file(tmp_path) -> None:
    """The autoencoder trainer's own checkpoints (state.pt, rng_rank*.pt) load weights-only, refusals named."""
    from ldm_train.first_stage.checkpoint import load_checkpoint

    step = tmp_path / "step_0000010"
    step.mkdir()
    marker = tmp_path / "marker"
    write_malicious(step / "state.pt", marker, {"step": 10, "world_size": 1})
    with pytest.raises(ValueError, match=f"refusing to load {step / 'state.pt'}"):
        load_checkpoint(step, 0, 1)
    assert not marker.exists()


# ---- 2. a damaged latest checkpoint: fall back to the previous intact one ---------------------------------
def test_truncated_file_in_the_latest_checkpoint_falls_back_to_the_previous(latents_root, base_run, tmp_path) -> None:
    runs, run_dir = _copy(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    damaged = ckpts / "step_0000004" / "mp_rank_00_model_states.pt"
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate(size // 2)
    proc = run_trainer(_args(latents_root, runs, 6), nproc=1)
    out = proc.stdout + proc.stderr
    assert f"{damaged} has {size // 2} bytes, {size} when it was saved" in out, out[-3000:]
    assert "resuming from" in out and "step_0000002, the newest intact checkpoint" in out
    assert "at step 2 (16 samples)" in proc.stdout
    assert (ckpts / "damaged-step_0000004" / damaged.name).stat().st_size == size // 2  # kept aside, untouched
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]  # steps 3, 4 trained again, each logged once
    assert (ckpts / "latest").read_text().strip() == "step_0000006"


def test_manifest_check_names_missing_and_changed_files_and_picks_the_newest_intact(tmp_path) -> None:
    """select_resume_tag on plain folders (no DeepSpeed): what each kind of damage reports."""
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        tag_dir = ckpts / cd.tag_for(step)
        (tag_dir / "sub").mkdir(parents=True)
        (tag_dir / cd.META).write_text("{}")
        (tag_dir / "a.pt").write_bytes(b"a" * 100)
        (tag_dir / "sub" / "b.txt").write_text("b")
        (tag_dir / cd.MANIFEST).write_text(json.dumps({"version": 1, "files": cd.build_manifest(tag_dir)}))
    (ckpts / "latest").write_text("step_0000006")
    assert cd.verify_checkpoint(ckpts, "step_0000006") == []
    assert cd.select_resume_tag(ckpts) == "step_0000006"

    (ckpts / "step_0000006" / "sub" / "b.txt").unlink()
    (ckpts / "step_0000004" / "a.pt").write_bytes(b"b" * 100)  # same size, other bytes
    assert cd.verify_checkpoint(ckpts, "step_0000006") == [f"{ckpts / 'step_0000006' / 'sub' / 'b.txt'} is missing"]
    assert cd.verify_checkpoint(ckpts, "step_0000004") == [
        f"{ckpts / 'step_0000004' / 'a.pt'} has changed since it was saved "
        f"(sha256 {cd._sha256(ckpts / 'step_0000002' / 'a.pt')[:12]}... expected)"]
    assert cd.select_resume_tag(ckpts) == "step_0000002"
    assert (ckpts / "latest").read_text() == "step_0000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["damaged-step_0000004", "damaged-step_0000006", "latest",
                                                      "step_0000002"]
    (ckpts / "step_0000002" / "a.pt").unlink()
    with pytest.raises(RuntimeError, match=r"no intact checkpoint .*step_0000002/a\.pt is missing"):
        cd.select_resume_tag(ckpts)
    assert cd.select_resume_tag(tmp_path / "nothing") is None


def _plain_checkpoints(ckpts: Path, steps: tuple[int, ...]) -> None:
    for step in steps:
        tag_dir = ckpts / cd.tag_for(step)
        tag_dir.mkdir(parents=True)
        (tag_dir / cd.META).write_text("{}")
        (tag_dir / "state.pt").write_bytes(b"s" * 100)
        (tag_dir / cd.MANIFEST).write_text(json.dumps({"version": 1, "files": cd.build_manifest(tag_dir)}))
    (ckpts / "latest").write_text(cd.tag_for(steps[-1]))


def test_a_checkpoint_without_its_manifest_is_unverified_and_the_previous_one_is_used(tmp_path, capsys) -> None:
    """Deleting files.json used to switch the check off: the damaged state file beside it was then loaded."""
    ckpts = tmp_path / "checkpoints"
    _plain_checkpoints(ckpts, (2, 4))
    (ckpts / "step_0000004" / cd.MANIFEST).unlink()
    (ckpts / "step_0000004" / "state.pt").write_bytes(b"s" * 10)  # damaged: nothing can tell without the manifest
    assert cd.verify_checkpoint(ckpts, "step_0000004") == [
        f"{ckpts / 'step_0000004' / cd.MANIFEST} is missing: the checkpoint cannot be verified"]
    assert cd.select_resume_tag(ckpts) == "step_0000002"
    err = capsys.readouterr().err
    assert "files.json is missing: the checkpoint cannot be verified" in err and "step_0000002, the newest intact" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["damaged-step_0000004", "latest", "step_0000002"]


class _Engine:
    """What save_checkpoint needs of a DeepSpeed engine: it writes one file, or fails as a full disk does."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        (out / "mp_rank_00_model_states.pt").write_bytes(b"m" * 50)
        if self.fail:  # a Python write on a full disk: errno ENOSPC without the file's name
            raise OSError(28, "No space left on device")


def test_a_save_cut_short_by_a_full_disk_says_so_names_the_file_and_leaves_no_checkpoint_folder(tmp_path) -> None:
    ckpts = tmp_path / "checkpoints"
    assert ck.save_checkpoint(_Engine(fail=False), ckpts, 2, {}, {"data": 1}, {"step": 2}) == "step_0000002"
    assert cd.verify_checkpoint(ckpts, "step_0000002") == []
    with pytest.raises(OSError, match=r"no space left on device writing \S+/\.partial-step_0000004/"
                                      r"mp_rank_00_model_states\.pt .*`latest` still names step_0000002"):
        ck.save_checkpoint(_Engine(fail=True), ckpts, 4, {}, {"data": 1}, {"step": 4})
    assert sorted(p.name for p in ckpts.iterdir()) == [".partial-step_0000004", "latest", "step_0000002"]
    assert cd.select_resume_tag(ckpts) == "step_0000002"
    assert ck.save_checkpoint(_Engine(fail=False), ckpts, 4, {}, {"data": 1}, {"step": 4}) == "step_0000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002", "step_0000004"]  # leftover gone
    assert cd.verify_checkpoint(ckpts, "step_0000004") == []


# ---- 3. launchers and stats.jsonl across a resume ----------------------------------------------------------
def test_resume_after_a_kill_logs_each_step_once(latents_root, base_run, tmp_path) -> None:
    """A kill after step 4 whose last checkpoint is step 2: steps 3 and 4 are retrained and logged once."""
    runs, run_dir = _copy(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_0000004")  # the state on disk after a kill at step 4, before its checkpoint
    (ckpts / "latest").write_text("step_0000002")
    before = {row["step"]: row["loss"] for row in read_stats(run_dir)}
    assert sorted(before) == [1, 2, 3, 4]
    run_trainer(_args(latents_root, runs, 6), nproc=1)
    rows = read_stats(run_dir)
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows[:2]] == [before[1], before[2]]  # the rows up to the checkpoint are kept
    discarded = [json.loads(line) for line in (run_dir / "stats_discarded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in discarded] == [3, 4]
    # the retrained steps 3, 4 resume exactly where step 2 left off: the same losses as the first time
    assert [r["loss"] for r in rows[2:4]] == [before[3], before[4]]


@pytest.mark.slow  # torchrun, two sessions with a kill between them: 25-55 s on the 2-core machine
def test_torchrun_with_one_process_trains_and_resumes(latents_root, tmp_path) -> None:
    """It used to hang forever without a word: the trainer made its own group on another port, and torch then
    waited for torchrun's agent store there. Fresh (--standalone) and resumed (--master_port) under a timeout."""
    runs = tmp_path / "runs"

    def torchrun(rdzv: list[str], steps: int, **extra) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", *rdzv, "-m", "ldm_train.train",
               *_args(latents_root, runs, steps, **extra)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"torchrun --nproc_per_node 1 did not finish in 240 s: {err.stdout!r} {err.stderr!r}") \
                from None
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    torchrun(["--standalone"], 4, **{"train.max_steps": 2})
    proc = torchrun(["--master_addr", "127.0.0.1", "--master_port", str(free_ports()[0])], 4)
    assert "at step 2 (16 samples)" in proc.stdout
    run_dir = runs / "tiny" / "r"
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "checkpoints" / "step_0000004" / "meta.json").read_text())["world_size"] == 1


def test_srun_with_one_task_trains(latents_root, tmp_path) -> None:
    """One srun task (the variables srun sets, without a cluster): the group comes from the SLURM rendezvous."""
    runs = tmp_path / "runs"
    env = {k: v for k, v in trainer_env().items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_STEP_ID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports()[0]))  # as an sbatch script may export them
    cmd = [sys.executable, "-m", "ldm_train.train", *_args(latents_root, runs, 2)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _steps(runs / "tiny" / "r") == [1, 2]


# ---- 4. determinism --------------------------------------------------------------------------------------
def test_two_runs_of_the_same_command_log_identical_losses(latents_root, base_run, tmp_path) -> None:
    """Each run trains its own tokenizer on the captions (the default): the vocabulary, and so every loss, must be
    the same in a process with another hash seed. ``base_run`` is the first run; this one repeats its 4 steps."""
    runs = tmp_path / "runs"
    env = {**trainer_env(), "PYTHONHASHSEED": "12345"}
    cmd = [sys.executable, "-m", "ldm_train.train", *_args(latents_root, runs, 6, **{"train.max_steps": 4})]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, second = base_run / "tiny" / "r", runs / "tiny" / "r"
    losses = [[(r["step"], r["loss"]) for r in read_stats(d)] for d in (first, second)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    for name in ("vocab.txt", "tokenizer.json"):
        assert (first / "tokenizer" / name).read_bytes() == (second / "tokenizer" / name).read_bytes(), name
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "checkpoints" / "step_0000004" / "model.safetensors")) for d in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_latest_naming_a_missing_step_says_so_and_which_step_is_used(tmp_path, capsys) -> None:
    """``latest`` left naming a step that is gone: the message says that step does not exist and which one the run
    resumes from (it used to read "damaged checkpoint(s) moved to -")."""
    ckpts = tmp_path / "checkpoints"
    _plain_checkpoints(ckpts, (2, 4))
    (ckpts / "latest").write_text("step_0000006")
    assert cd.verify_checkpoint(ckpts, "step_0000006") == [f"{ckpts / 'step_0000006'} does not exist"]
    assert cd.select_resume_tag(ckpts) == "step_0000004"
    err = capsys.readouterr().err
    assert f"latest names step_0000006, but {ckpts / 'step_0000006'} does not exist" in err
    assert (f"resuming from {ckpts / 'step_0000004'}, the newest intact checkpoint, instead of step_0000006: "
            "step_0000006 does not exist; latest now names step_0000004") in err
    assert "moved to -" not in err
    assert (ckpts / "latest").read_text() == "step_0000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002", "step_0000004"]
