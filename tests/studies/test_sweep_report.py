"""studies.sweep_report on a 3-point f sweep written here: table, FID@budget (exact and "~"), report.json, plot, W&B."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from studies.sweep_report import build_report, load_points, main, markdown_table

GROUP = "fsweep-fmnist-20250101"


def write_run(root: Path, job: int, name: str, kind: str, f: int, latent: list[int], rows: list[dict | str],
              summary: dict | None = None, checkpoint: str | None = None) -> Path:
    """A run dir (config.yaml, stats.jsonl, train_summary.json) and its sweep point folder with point.json."""
    run = root / "runs" / f"{job:05d}-{name}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"experiment_name: fsweep\ndata:\n  resolution: 32\nfirst_stage:\n  name: {name}\n  kind: {kind}\n"
        f"  downsample_factor: {f}\n  checkpoint: {checkpoint or 'null'}\n")
    (run / "stats.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    if summary is not None:
        (run / "train_summary.json").write_text(json.dumps(summary))
    point = root / "sweep" / f"{job}-{name}"
    point.mkdir(parents=True)
    (point / "point.json").write_text(json.dumps({
        "job_num": job, "run_dir": str(run), "first_stage": name, "downsample_factor": f, "latent_shape": latent,
        "wandb_group": GROUP, "overrides": [f"first_stage={name}"]}))
    (point / "run").symlink_to(run)
    return point


def train_row(step: int, t: float, rate: float = 10.0) -> dict:
    return {"step": step, "time": t, "loss": 0.1, "samples_seen": step * 100, "samples_per_s": rate}


def fid_row(step: int, t: float, fid: float | str) -> dict:
    return {"step": step, "time": t, "samples_seen": step * 100, "fid256": fid, "fid_seconds": 3.0}


def build_sweep(root: Path) -> Path:
    """f=16 (job 0, died: no summary, a "nan" FID), f=1 pixel (job 1), f=4 with a resume repeating step 20."""
    write_run(root, 0, "fmnist_kl_f16", "kl", 16, [16, 2, 2], [
        train_row(10, 1000.0, 20.0), fid_row(10, 1010.0, 130.0), train_row(20, 1500.0, 30.0),
        fid_row(20, 1510.0, "nan"), fid_row(25, 1900.0, 110.0), '{"step": 26, "ti'],  # cut by the kill
        checkpoint=str(root / "fs" / "kl_f16.safetensors"))  # no reconstruction.json beside it
    write_run(root, 1, "fmnist_pixel", "pixel", 1, [1, 32, 32], [
        train_row(10, 0.0), fid_row(10, 1.0, 150.0), fid_row(20, 2.0, 100.0), fid_row(30, 3.0, 80.0),
        fid_row(40, 4.0, 70.0)], summary={"samples_seen": 4000, "wall_s": 3723.0, "fid_wall_s": 12.0,
                                          "samples_per_s": 12.5})
    (root / "fs").mkdir()
    (root / "fs" / "kl_f4.reconstruction.json").write_text(json.dumps(
        {"psnr": 27.5, "ssim": 0.9, "rfid": 3.25, "num_images": 100, "resolution": 32}))
    write_run(root, 2, "fmnist_kl_f4", "kl", 4, [3, 8, 8], [
        fid_row(10, 1.0, 120.0), fid_row(20, 2.0, 50.0),
        fid_row(20, 5.0, 45.0), fid_row(30, 6.0, 40.0), fid_row(40, 7.0, 35.0)],  # resumed from step 15
        summary={"samples_seen": 4000, "wall_s": 60.0, "fid_wall_s": 5.0, "samples_per_s": 66.7},
        checkpoint=str(root / "fs" / "kl_f4.safetensors"))
    return root / "sweep"


def table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return split[0], split[1:]


def test_sweep_report_default_budgets_with_wandb_offline(tmp_path, monkeypatch, capsys) -> None:
    sweep = build_sweep(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the --wandb flag wins over the environment
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_env" / var.lower()))
    assert main([str(sweep), "--wandb", "offline"]) == 0

    report_dir = sweep / "report"
    header, rows = table((report_dir / "sweep_report.md").read_text())
    assert header == ["f", "first stage", "latent (c x h x w)", "PSNR / rFID", "FID@1000", "FID@2000",
                      "final FID", "samples/s", "wall", "status"]
    assert [r[:4] for r in rows] == [["1", "fmnist_pixel", "1 x 32 x 32", "identity"],
                                     ["4", "fmnist_kl_f4", "3 x 8 x 8", "27.50 / 3.25"],
                                     ["16", "fmnist_kl_f16", "16 x 2 x 2", "—"]]
    assert [r[4:6] for r in rows] == [["150.00", "100.00"], ["120.00", "45.00"], ["130.00", "nan"]]
    assert [r[6:] for r in rows] == [["70.00 @ 4000", "12.5", "1:02:03", "finished"],
                                     ["35.00 @ 4000", "66.7", "0:01:00", "finished"],
                                     ["110.00 @ 2500", "25.0", "0:15:00", "incomplete"]]  # rows mean; 1900 - 1000 s

    on_disk = json.loads((report_dir / "report.json").read_text())
    assert on_disk == build_report(load_points(sweep))
    assert on_disk["wandb_group"] == GROUP and on_disk["fid_k"] == [256] and on_disk["budgets"] == [1000, 2000]
    assert on_disk["rows"][0]["psnr"] == "inf" and on_disk["rows"][0]["rfid"] == 0.0
    assert on_disk["rows"][1]["curve"] == [[1000, 120.0], [2000, 45.0], [3000, 40.0], [4000, 35.0]]
    assert on_disk["rows"][2]["curve"] == [[1000, 130.0], [2000, "nan"], [2500, 110.0]]

    with Image.open(report_dir / "fid_vs_samples.png") as img:
        assert img.format == "PNG" and img.width >= 400 and img.height >= 300
    runs = list((report_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list(runs[0].glob("files/media/images/fid_vs_samples_*.png"))
    assert list(runs[0].glob("files/media/table/sweep_table_*.table.json"))
    out = capsys.readouterr().out
    assert "| 4 | fmnist_kl_f4 |" in out and str(report_dir / "fid_vs_samples.png") in out


def test_sweep_report_cli_budgets_fall_back_to_last_row_before(tmp_path) -> None:
    sweep = build_sweep(tmp_path)
    assert main([str(sweep), "--budgets", "2500,4000,500", "--wandb", "disabled"]) == 0
    header, rows = table((sweep / "report" / "sweep_report.md").read_text())
    assert header[4:7] == ["FID@500", "FID@2500", "FID@4000"]
    assert [r[4:7] for r in rows] == [["—", "~100.00", "70.00"], ["—", "~45.00", "35.00"],
                                      ["—", "110.00", "~110.00"]]
    assert not (sweep / "report" / "wandb").exists()
    at = json.loads((sweep / "report" / "report.json").read_text())["rows"][2]["fid_at"][2]
    assert at == {"budget": 4000, "fid": 110.0, "samples_seen": 2500, "exact": False}


def test_sweep_report_points_without_data_get_a_row(tmp_path) -> None:
    sweep = build_sweep(tmp_path)
    (sweep / "7-broken").mkdir()
    (sweep / "7-broken" / "point.json").write_text("{not json")
    (sweep / "8-fmnist_kl_f8").mkdir()
    (sweep / "8-fmnist_kl_f8" / "point.json").write_text(json.dumps(
        {"job_num": 8, "run_dir": str(tmp_path / "gone"), "first_stage": "fmnist_kl_f8", "downsample_factor": 8}))
    write_run(tmp_path, 9, "fmnist_kl_f32", "kl", 32, [64, 1, 1], [train_row(10, 0.0)])
    report = build_report(load_points(sweep))
    assert report["budgets"] == [1000, 2000]  # points without FID rows do not empty the common budgets
    status = {r["first_stage"]: r["status"] for r in report["rows"]}
    assert status["fmnist_kl_f8"].startswith("no data: run dir not found")
    assert status["broken"].startswith("no data: unreadable")
    assert status["fmnist_kl_f32"] == "no FID rows"
    assert [r["downsample_factor"] for r in report["rows"]] == [1, 4, 8, 16, 32, None]
    assert markdown_table(report).count("\n| ") == 6


def test_sweep_report_empty_dir_exits_2(tmp_path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no sweep points under {tmp_path}" in err and "python -m ldm_train.train -m" in err
    assert not (tmp_path / "report").exists()
