"""DeepSpeed's JIT ops: the CPU communication op training never calls is not compiled; stale build locks go."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm_train.runtime.ds_ops import clear_stale_locks

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[3]


def test_deepspeed_comm_backend_compiles_nothing(tmp_path: Path) -> None:
    """DeepSpeed's torch backend on the CPU accelerator, as deepspeed.initialize creates it, with the project's
    switch: no extension is built (without it, deepspeed_shm_comm compiles here for minutes)."""
    ext = tmp_path / "ext"
    code = (
        "from ldm_train.runtime.ds_ops import skip_unused_ops\n"
        "skip_unused_ops()\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "assert build_shm_op() is None\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not ext.exists() or not any(ext.iterdir()), sorted(ext.rglob("*"))


def test_stale_build_locks_are_removed_fresh_ones_kept(tmp_path: Path, capsys) -> None:
    old = tmp_path / "py311_cpu" / "cpu_adam" / "lock"  # torch's default layout: <root>/<py tag>/<op>/lock
    old.parent.mkdir(parents=True)
    old.touch()
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    fresh = tmp_path / "deepspeed_shm_comm" / "lock"  # $TORCH_EXTENSIONS_DIR/<op>/lock: a build in progress
    fresh.parent.mkdir()
    fresh.touch()
    assert clear_stale_locks(tmp_path) == [old]
    assert not old.exists() and fresh.exists()
    assert str(old) in capsys.readouterr().err
