"""A wheel built from the repo carries the Hydra configs, and its installed commands compose them from any
directory (issue 14: they stopped with "Primary config module 'conf' not found")."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "ldm-train": ["experiment=tiny", "--cfg", "job"],
    "ldm-train-autoencoder": ["first_stage=tiny_kl_f4", "--cfg", "job"],
    "ldm-prep-latents": ["--cfg", "job"],
    "ldm-eval": ["--cfg", "job"],
    "ldm-summary": ["experiment=tiny"],
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (not editable); its dependencies come from this interpreter's
    site-packages through a .pth, so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), "-q"], check=True, timeout=300, cwd=tmp)
    wheel = next((tmp / "dist").glob("ldm_train-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ldm_train/conf/train.yaml" in names and "ldm_train/conf/experiment/tiny.yaml" in names
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, timeout=300, cwd=tmp)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_commands_compose_their_configs_from_any_directory(installed: Path, tmp_path: Path) -> None:
    origin = subprocess.run([str(installed / "bin" / "python"), "-c", "import ldm_train; print(ldm_train.__file__)"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=True)
    assert origin.stdout.strip().startswith(str(installed))  # the installed copy, not the checkout
    for command, args in COMMANDS.items():
        done = subprocess.run([str(installed / "bin" / command), *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        assert "not found" not in done.stderr
    train = subprocess.run([str(installed / "bin" / "ldm-train"), "experiment=tiny", "--cfg", "job"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "experiment_name: tiny" in train.stdout
