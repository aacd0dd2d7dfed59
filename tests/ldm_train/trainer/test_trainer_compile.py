"""``train.compile``: the UNet and the text encoder compiled in place train through the real
DeepSpeed engine under ZeRO 2 and 3 (CPU, gloo, one process; ZeRO 1 runs the same optimizer class as 2, and the
compiled forward does not see the stage) with the eager losses to fp32 tolerance, and write
checkpoints with the eager model's keys. Inductor compiles for a minute or more per run on these cores: slow."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.ldm_train.trainer.helpers import read_stats, run_trainer, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]


def _run(latents_root: Path, runs: Path, zero: int, compiled: bool) -> tuple[list[float], float, Path]:
    t0 = time.perf_counter()
    proc = run_trainer(tiny_overrides(latents_root, runs, **{
        "deepspeed": f"zero{zero}", "train.compile": str(compiled).lower(), "train.max_steps": 3,
        "run_name": "r"}), nproc=1, timeout=1800)
    run_dir = runs / "tiny" / "r"
    assert ("train.compile: UNet and text encoder compiled" in proc.stdout) == compiled
    return [r["loss"] for r in read_stats(run_dir)], time.perf_counter() - t0, run_dir


@pytest.mark.parametrize("zero", [2, 3])
def test_compiled_training_matches_eager(latents_root: Path, tmp_path: Path, zero: int) -> None:
    eager, eager_s, eager_dir = _run(latents_root, tmp_path / "eager", zero, False)
    compiled, compiled_s, compiled_dir = _run(latents_root, tmp_path / "compiled", zero, True)
    print(f"zero{zero}: eager {eager} ({eager_s:.0f} s), compiled {compiled} ({compiled_s:.0f} s with compilation)")
    assert len(eager) == len(compiled) == 3
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(eager, compiled, strict=True))
    step = "step_0000003"
    a = load_file(str(eager_dir / "checkpoints" / step / "model.safetensors"))
    b = load_file(str(compiled_dir / "checkpoints" / step / "model.safetensors"))
    assert a.keys() == b.keys()  # compiled in place: no _orig_mod. prefix in what it writes
