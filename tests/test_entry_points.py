"""Every installed command answers ``--help`` without loading torch or the other heavy libraries (they load after
the command line is parsed), and the Hydra apps' quick help is the text Hydra's own ``--help`` prints."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "transformers", "diffusers", "wandb", "torch_fidelity", "lpips")
# calls `module:function` as the console script does, with `--help`, then names the heavy modules it loaded
PROBE = """
import importlib, json, sys
target, name, heavy = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
module, function = target.split(":")
sys.argv = [name, "--help"]
try:
    getattr(importlib.import_module(module), function)()
except SystemExit as exit:
    if exit.code not in (None, 0):
        raise
print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)
"""


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml (read as text: no tomllib before Python 3.11)."""
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S).group(1)
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.M))


COMMANDS = {**console_scripts(), **{f"python -m {module}": f"{module}:main" for module in (
    "eval.reconstruction", "eval.kinds", "data_prep.synthetic", "data_prep.fashion_mnist", "data_prep.finalize")}}


def test_every_console_script_is_covered() -> None:
    assert {"ldm-train", "ldm-eval", "ldm-prep-latents", "ldm-train-autoencoder", "ldm-summary",
            "ldm-export-diffusers", "ldm-slurm"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_loads_no_heavy_library(name: str) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, COMMANDS[name], name, ",".join(HEAVY)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), f"{name} --help printed nothing"
    assert json.loads(done.stderr.strip().splitlines()[-1]) == [], f"{name} --help loaded them"


def test_quick_help_is_hydras_help() -> None:
    """``--config-dir`` sends ``--help`` down Hydra's own path (same folder, same config): the text is the same."""
    conf = REPO / "ldm_train" / "conf"
    args = [sys.executable, "-m", "data_prep.encode", "first_stage=kl_f8", "--help"]
    quick = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    hydra = subprocess.run([*args, "--config-dir", str(conf)], cwd=REPO, capture_output=True, text=True,
                           timeout=120, check=True)
    assert "== Config (override any key: key=value) ==" in quick.stdout and "name: kl_f8" in quick.stdout
    assert quick.stdout == hydra.stdout
