"""ldm-slurm (ldm_train/slurm_scripts.py) and the sbatch scripts it points at: shipped in the package, reachable
through the top-level slurm/ link, and each stage script finds common.sh with the same preamble."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_train import slurm_scripts

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[2]
STAGE_SCRIPTS = ("train_txt2img.sh", "train_autoencoder.sh", "prep_latents.sh", "eval.sh")


def test_path_prints_the_package_folder_that_slurm_links_to(capsys: pytest.CaptureFixture[str]) -> None:
    assert slurm_scripts.main(["path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == REPO / "ldm_train" / "slurm" == (REPO / "slurm").resolve()
    assert {p.name for p in slurm_scripts.scripts()} == {*STAGE_SCRIPTS, "pipeline.sh", "common.sh"}


def test_copy_keeps_modes_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "my scripts"
    assert slurm_scripts.main(["copy", str(dest)]) == 0
    printed = capsys.readouterr().out.split("\n")
    for src in slurm_scripts.scripts():
        copy = dest / src.name
        assert str(copy) in printed
        assert copy.read_bytes() == src.read_bytes() and copy.stat().st_mode == src.stat().st_mode

    (dest / "eval.sh").write_text("# edited\n")
    assert slurm_scripts.main(["copy", str(dest)]) == 1
    err = capsys.readouterr().err
    assert str(dest / "eval.sh") in err and "--force" in err
    assert (dest / "eval.sh").read_text() == "# edited\n"  # nothing copied over it
    assert slurm_scripts.main(["copy", str(dest), "--force"]) == 0
    assert (dest / "eval.sh").read_bytes() == (slurm_scripts.SLURM_DIR / "eval.sh").read_bytes()


def test_registered_as_a_command_with_the_scripts_as_package_data() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()  # no tomllib before Python 3.11
    assert '\nldm-slurm = "ldm_train.slurm_scripts:main"\n' in pyproject
    patterns = re.findall(r'"([^"]+)"', re.search(r"^ldm_train = \[(.*)\]$", pyproject, re.M).group(1))
    shipped = {p for pattern in patterns for p in (REPO / "ldm_train").glob(pattern)}
    assert set(slurm_scripts.scripts()) <= shipped


def test_import_is_light() -> None:
    code = "import sys, ldm_train.slurm_scripts; print(sorted(m for m in ('torch', 'hydra') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_stage_scripts_share_one_preamble_and_ask_for_gpus() -> None:
    preambles = {}
    for name in STAGE_SCRIPTS:
        text = (slurm_scripts.SLURM_DIR / name).read_text()
        found = re.search(r"^ldm_slurm_dir\(\) \{.*?^ldm_setup_python.*?$", text, re.S | re.M)
        assert found, f"{name}: no ldm_slurm_dir preamble"
        preambles[name] = found.group(0)
        assert "\ncd " not in text, f"{name} changes directory: jobs must run in the submit directory"
    assert len(set(preambles.values())) == 1, "the stage scripts' preambles differ: keep them identical"
    for name in ("train_txt2img.sh", "train_autoencoder.sh", "eval.sh"):
        text = (slurm_scripts.SLURM_DIR / name).read_text()
        assert re.search(r"^#SBATCH --gpus-per-node=\d+$", text, re.M), f"{name} requests no GPU"
