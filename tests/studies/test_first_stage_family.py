"""The first-stage family command on Fashion-MNIST: one preset end to end (a few steps and images), its
reconstruction.json contract, family.json / family.md, the resumed re-run and refused input; the re-evaluation
rules with a stand-in for the eval stage."""
from __future__ import annotations

import json
import math
import os

import pytest

from data_prep.fashion_mnist import DEFAULT_ROOT
from studies.first_stage_family import CONTRACT_KEYS, main, reconstruction_json_path, train_family

pytestmark = pytest.mark.integration  # starts processes or servers

needs_fmnist = pytest.mark.skipif(not os.path.isfile(f"{DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz"),
                                  reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (.ci/run does)")

SMALL = {"train_images": 16, "eval_images": 6, "batch_size": 4, "logger": "disabled"}


@pytest.mark.slow  # the study's whole chain on Fashion-MNIST, twice: 25-55 s on the 2-core machine
@needs_fmnist
def test_one_preset_end_to_end_then_resumed(tmp_path) -> None:
    rows = train_family(tmp_path, ["fmnist_kl_f16"], steps=2, **SMALL)
    export = tmp_path / "runs" / "autoencoder" / "fmnist_kl_f16" / "export" / "first_stage.safetensors"
    assert export.is_file() and json.loads(export.with_suffix(".json").read_text())["step"] == 2
    contract = json.loads(reconstruction_json_path(export).read_text())
    assert reconstruction_json_path(export).name == "first_stage.reconstruction.json"
    assert sorted(contract) == sorted(CONTRACT_KEYS)
    assert contract["num_images"] == 6 and contract["resolution"] == 32
    assert all(math.isfinite(contract[k]) for k in ("psnr", "ssim", "rfid")) and contract["rfid"] > 0

    assert json.loads((tmp_path / "family.json").read_text()) == rows
    (row,) = rows
    assert row["name"] == "fmnist_kl_f16" and row["f"] == 16 and row["z_channels"] == 8
    assert row["latent_shape"] == [8, 2, 2] and row["checkpoint"] == str(export.resolve())
    assert row["psnr"] == contract["psnr"] and row["rfid"] == contract["rfid"]
    assert row["train_steps"] == 2 and row["train_wall_s"] > 0
    assert 0 < row["psnr_mean_image"] < 20  # the mean garment is a blur: far below any useful reconstruction
    table = (tmp_path / "family.md").read_text()
    assert "| fmnist_kl_f16 | 16 | 8x2x2 |" in table and f"{row['psnr']:.2f}" in table

    # a re-run trains and evaluates nothing: exports, contract files and stage logs stay untouched
    watched = [export, reconstruction_json_path(export), *sorted((tmp_path / "logs").iterdir())]
    before = {p: p.stat().st_mtime_ns for p in watched}
    again = train_family(tmp_path, ["fmnist_kl_f16"], steps=2, **SMALL)
    assert again == rows and {p: p.stat().st_mtime_ns for p in watched} == before

    # data or settings that differ from what the trained presets saw are refused with the flags that fix it
    with pytest.raises(RuntimeError, match="--train-images 16"):
        train_family(tmp_path, ["fmnist_kl_f16"], steps=2, **{**SMALL, "train_images": 32})
    with pytest.raises(RuntimeError, match="family_train.json: fmnist_kl_f16 was trained with --batch-size 4"):
        train_family(tmp_path, ["fmnist_kl_f16"], steps=2, **{**SMALL, "batch_size": 8})
    with pytest.raises(RuntimeError, match="trained for 2 steps, more than --steps 1: pass --steps 2"):
        train_family(tmp_path, ["fmnist_kl_f16"], steps=1, **SMALL)


@needs_fmnist
def test_bad_input_names_the_file_and_fix(tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"fmnist_kl_f3\.yaml does not exist.*fmnist_kl_f16, fmnist_kl_f2"):
        main(["--out", str(tmp_path), "--presets", "fmnist_kl_f3"])
    with pytest.raises(SystemExit, match="tiny_kl_f4.yaml: kind kl, ddconfig.resolution 64.*fmnist_kl_f"):
        main(["--out", str(tmp_path), "--presets", "tiny_kl_f4"])
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        main(["--out", str(tmp_path), "--root", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"--eval-images=20000: use 1\.\.10000"):
        main(["--out", str(tmp_path), "--eval-images", "20000"])
    assert not (tmp_path / "raw").exists()  # refused before any work


def _stand_in_eval(metrics: dict, seen: list):
    """A run_stage stand-in for eval.reconstruction: records what the eval folder held, writes metrics.json."""
    def run(name: str, cmd: list[str], logs, env) -> float:
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("output_dir="))
        seen.append(sorted(os.listdir(out)) if os.path.isdir(out) else [])
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        return 1.0

    return run


def test_re_evaluation_starts_from_an_empty_eval_folder(tmp_path, monkeypatch) -> None:
    import studies.first_stage_family as family

    export = tmp_path / "runs" / "autoencoder" / "p" / "export" / "first_stage.safetensors"
    export.parent.mkdir(parents=True)
    export.write_bytes(b"weights")
    stale = tmp_path / "eval" / "p" / "reconstructions" / "000999.png"  # left by an earlier 1000-image eval
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"png")
    reconstruction_json_path(export).write_text(json.dumps({"num_images": 1000}))
    seen: list = []
    new = {"psnr": 25.0, "ssim": 0.8, "rfid": 40.0, "num_images": 4, "resolution": 32, "lpips": None}
    monkeypatch.setattr(family, "run_stage", _stand_in_eval(new, seen))
    row = family.evaluate_preset("p", export, tmp_path, "'x.tar'", 4, tmp_path, {})
    assert seen == [[]]  # rFID would otherwise read the stale PNGs (and cached statistics) of the old run
    assert row == {k: new[k] for k in CONTRACT_KEYS} == json.loads(reconstruction_json_path(export).read_text())

    # same images and an export no newer than the contract: nothing runs
    assert family.evaluate_preset("p", export, tmp_path, "'x.tar'", 4, tmp_path, {}) == row and len(seen) == 1


def test_non_finite_metric_is_refused_naming_the_file(tmp_path, monkeypatch) -> None:
    import studies.first_stage_family as family

    export = tmp_path / "first_stage.safetensors"
    export.write_bytes(b"weights")
    bad = {"psnr": 25.0, "ssim": 0.8, "rfid": float("nan"), "num_images": 4, "resolution": 32}
    monkeypatch.setattr(family, "run_stage", _stand_in_eval(bad, []))
    with pytest.raises(RuntimeError, match=r"eval/p/metrics\.json: rfid=nan is not a finite number"):
        family.evaluate_preset("p", export, tmp_path, "'x.tar'", 4, tmp_path, {})
    assert not reconstruction_json_path(export).exists()
