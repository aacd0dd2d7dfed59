"""A wheel built from the repo carries the Hydra configs and the sbatch scripts, and its installed commands
compose them from any directory."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "ldm-train": ["experiment=tiny", "--cfg", "job"],
    "ldm-train-autoencoder": ["first_stage=tiny_kl_f4", "--cfg", "job"],
    "ldm-prep-latents": ["--cfg", "job"],
    "ldm-eval": ["--cfg", "job"],
    "ldm-summary": ["experiment=tiny"],
    "ldm-export-diffusers": ["--help"],
    "ldm-slurm": ["path"],
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
    assert "ldm_train/slurm/train_txt2img.sh" in names and "ldm_train/slurm/common.sh" in names
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
    slurm = subprocess.run([str(installed / "bin" / "ldm-slurm"), "path"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path, check=True)
    folder = Path(slurm.stdout.strip())
    assert folder.is_relative_to(installed) and (folder / "common.sh").is_file()
    assert (folder / "train_txt2img.sh").stat().st_mode & 0o111  # still executable


def test_wheel_commands_answer_help(installed: Path, tmp_path: Path) -> None:
    for command in COMMANDS:
        done = subprocess.run([str(installed / "bin" / command), "--help"], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.strip(), f"{command} --help: {done.stderr[-2000:]}"


@pytest.mark.slow
def test_wheel_runs_the_whole_chain_from_an_empty_directory(installed: Path, tmp_path: Path) -> None:
    """With the installed commands only, in an empty folder: data, a tiny first stage, its latents, an LDM, eval
    with the real FID network, and the diffusers export that DiffusionPipeline.from_pretrained reads."""
    bin_ = installed / "bin"

    def run(*args: str) -> None:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
                                   "WANDB_MODE": "disabled"})
        assert done.returncode == 0, f"{args[0]}: {done.stderr[-3000:]}"

    run(str(bin_ / "python"), "-m", "data_prep.synthetic", "output=raw", "num_samples=16", "resolution=64",
        "shard_size=16", "split=train", "seed=0")
    run(str(bin_ / "ldm-train-autoencoder"), "first_stage=tiny_kl_f4", "data.input=raw/000000.tar",
        "runs_root=runs", "run_name=ae", "train.max_steps=2", "first_stage.lossconfig.perceptual_weight=0",
        "first_stage.lossconfig.disc_start=1000000000", "train.micro_batch=4", "train.eval_every=2",
        "train.checkpoint.every_steps=2", "train.image_every=2", "data.num_workers=0", "logger=disabled")
    export = tmp_path / "runs" / "autoencoder" / "ae" / "export" / "first_stage.safetensors"
    assert export.is_file()
    run(str(bin_ / "ldm-prep-latents"), "input=raw/000000.tar", "output=latents", "first_stage=tiny_kl_f4",
        f"first_stage.checkpoint={export}", "resolution=64", "num_workers=0", "progress=false")
    manifest = json.loads((tmp_path / "latents" / "tiny_kl_f4" / "manifest.json").read_text())
    assert manifest["num_samples"] == 16
    run(str(bin_ / "ldm-train"), "experiment=tiny", "data.latents_root=latents", "runs_root=runs", "run_name=ldm",
        f"first_stage.checkpoint={export}", "train.max_steps=2", "data.num_workers=0", "logger.mode=disabled")
    assert (tmp_path / "runs" / "tiny" / "ldm" / "checkpoints" / "step_0000002").is_dir()
    run(str(bin_ / "ldm-eval"), "checkpoint=runs/tiny/ldm", "prompts=raw/000000.tar", "num_samples=4", "steps=2",
        "batch_size=4", "device=cpu", "output_dir=ev", "reference.path=raw/000000.tar", "reference.num_images=16",
        "metrics.isc=false", "metrics.prc=false", "wandb.mode=disabled", "progress=false")
    row = json.loads((tmp_path / "ev" / "metrics.json").read_text())["per_scale"][0]
    assert row["num_samples"] == 4 and math.isfinite(row["fid"]) and row["fid"] > 0
    run(str(bin_ / "ldm-export-diffusers"), "runs/tiny/ldm", "exp")
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["_class_name"] == "LDMTextToImagePipeline"
    assert all((tmp_path / "exp" / part).is_dir() for part in ("unet", "vqvae", "bert", "tokenizer", "scheduler"))
