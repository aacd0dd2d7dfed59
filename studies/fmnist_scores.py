"""The scoring stages of ``studies.fmnist_reference`` (sampler grid, score, report) as the ``Scoring`` mixin of its
``Reference``, the report's markdown, and what both modules share (paths, prompts, the sampler grid, small helpers).

``Scoring`` reads the orchestrator's attributes: ``args`` (the command line), ``n`` (FULL or SMOKE sizes), ``out``,
``logs``, ``raw``, ``ae_export``, ``decoder`` (the first stage samples and reconstructions are decoded with),
``judge``, ``ldm_dir``, ``base_dir``, ``scores`` (shared: the baseline's samples, the reference statistics),
``score_dir`` (per decoder: the LDM's samples, the reconstructions), ``report_dir``, ``t10k_stats``, and its
``ldm_cmd()`` / ``baseline_cmd()`` (named in the report).
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from data_prep.fashion_mnist import CLASS_NAMES
from studies.quickstart import PY, StageError, run_stage

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "bench" / "fmnist_pixel_ddpm.py"
PROMPTS = [f"a photo of a {name}" for name in CLASS_NAMES]
# the sampler grid: DDIM steps x guidance scales, SAMPLER_SAMPLES images each; the adherence a setting must keep
SAMPLER_STEPS, SAMPLER_GUIDANCE, SAMPLER_MIN_ADHERENCE = (20,), (1.0, 1.5, 2.0, 3.0), 0.85
DEFAULT_SAMPLER = {"steps": 20, "guidance_scale": 2.0}  # without a sampler stage's choice


def tars(folder: Path, n: int) -> str:
    last = n - 1
    return f"'{folder}/{{000000..{last:06d}}}.tar'" if n > 1 else f"'{folder}/000000.tar'"


def json_tail(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageError(f"no JSON result line in {log}")


def write_json(path: Path, obj: Any) -> None:
    from ldm_train.data.fsspec_io import write_text

    write_text(path, json.dumps(obj, indent=2) + "\n")


class Scoring:
    """The sampler, score and report stages (see the module docstring for what they read)."""

    def ldm_points(self) -> list[dict[str, Any]]:
        points = []
        for meta in sorted((self.ldm_dir / "checkpoints").glob("step_*/meta.json")):
            m = json.loads(meta.read_text())
            points.append({"name": meta.parent.name, "path": str(meta.parent), "samples": m["samples_seen"],
                           "train_wall_s": m.get("train_wall_s")})
        # a periodic checkpoint a few steps before the budget's end adds a point on top of the final one
        periodic = [p for p in points[:-1] if p["samples"] < 0.95 * points[-1]["samples"]]
        keep = self.n.get("curve_points")  # at most this many periodic points, evenly spaced (None: all)
        if keep and len(periodic) > keep:
            periodic = [periodic[round(i * (len(periodic) - 1) / max(keep - 1, 1))] for i in range(keep)]
        return periodic + points[-1:]

    def baseline_points(self) -> list[dict[str, Any]]:
        lines = (self.base_dir / "snapshots.jsonl").read_text().splitlines()
        rows = [{"name": r["name"], "samples": r["samples"], "train_wall_s": r["train_wall_s"]}
                for r in map(json.loads, lines)]
        # sampling the pixel model costs ~3.5x the LDM per image: every other snapshot, and the last
        stride = self.n["baseline_curve_stride"]
        return rows[:-1][::stride] + rows[-1:]

    def _features(self, images: Path) -> Any:
        """Pool3 features of every PNG in the folder (name order), computed once with eval.fid's feature pass and
        cached beside the images, so FIDs of several prefixes cost one pass."""
        import numpy as np

        cache = images.parent / f"{images.name}.pool3.npy"
        if cache.exists():
            return np.load(cache)
        from eval.fid import feature_set
        from ldm_train.data.fsspec_io import atomic_write
        from ldm_train.metrics.inception import FIDInception

        t0 = time.time()
        feats = feature_set(str(images), FIDInception(), batch_size=100).features.numpy()
        with atomic_write(cache) as f:
            np.save(f, feats)
        print(f"    pool3 features of {len(feats)} images in {images}: {time.time() - t0:.0f} s", flush=True)
        return feats

    def _fid(self, feats: Any, limit: int, stats: Path | None = None) -> float:
        """FID of the first ``limit`` images against ``stats`` (an .npz of mu and sigma; default the t10k
        statistics), with eval.fid's Frechet distance."""
        import numpy as np

        from ldm_train.metrics.fid import frechet_distance

        if len(feats) < limit:
            raise StageError(f"{limit} images asked for an FID, {len(feats)} drawn")
        f = feats[:limit].astype(np.float64)
        with np.load(stats or self.t10k_stats) as ref:
            # the full-rank reference first: its Cholesky is the cheap path (the samples' covariance may be singular)
            return round(float(frechet_distance(ref["mu"], ref["sigma"], f.mean(0), np.cov(f, rowvar=False))), 3)

    def sampler(self) -> dict[str, Any]:
        """The DDIM steps x guidance grid on the final LDM checkpoint: FID against train images and adherence per
        setting; the choice (lowest FID among the settings with adherence >= SAMPLER_MIN_ADHERENCE) goes to
        ``scores/sampler.json``, which ``score`` reads."""
        import numpy as np

        out = self.score_dir / "sampler.json"
        if out.exists():
            return json.loads(out.read_text())
        points = self.ldm_points()
        if not points:
            raise StageError("no LDM checkpoints for the sampler grid: run --stages train first")
        self.score_dir.mkdir(parents=True, exist_ok=True)
        ref_n, n = self.n["sampler_reference"], self.n["sampler_samples"]
        ref = self.scores / f"train_fid_stats_{ref_n}.npz"
        if not ref.exists():
            from eval.fid import feature_set
            from ldm_train.data.fsspec_io import atomic_write
            from ldm_train.metrics.inception import FIDInception

            fs = feature_set(tars(self.raw / "train", self.n["train_shards"]).strip("'"), FIDInception(),
                             batch_size=100, limit=ref_n)
            with atomic_write(ref) as f:
                np.savez(f, mu=fs.mu, sigma=fs.sigma, count=ref_n)
        rows = []
        steps_grid = SAMPLER_STEPS if not self.args.smoke else SAMPLER_STEPS[:1]
        for steps in steps_grid:
            for gs in SAMPLER_GUIDANCE if not self.args.smoke else SAMPLER_GUIDANCE[::2]:
                setting = {"steps": steps, "guidance_scale": gs}
                folder = self._draw("ldm", points[-1], n, self._sample_ldm, setting)
                fid = self._fid(self._features(folder), n, ref)
                judged = self._judge(folder)
                rows.append({**setting, "fid_vs_train": fid, "prompt_adherence": judged["prompt_adherence"]})
                print(f"    sampler {setting}: FID{n} vs train {fid:.2f}, adherence {judged['prompt_adherence']:.3f}",
                      flush=True)
        ok = [r for r in rows if r["prompt_adherence"] >= SAMPLER_MIN_ADHERENCE] or rows
        best = min(ok, key=lambda r: r["fid_vs_train"])
        result = {"checkpoint": points[-1]["name"], "num_samples": n, "reference": f"first {ref_n:,} train images",
                  "min_adherence": SAMPLER_MIN_ADHERENCE, "grid": rows,
                  "chosen": {"steps": best["steps"], "guidance_scale": best["guidance_scale"]}}
        write_json(out, result)
        return result

    def setting(self) -> dict[str, Any]:
        """The DDIM steps and guidance of the scores: the command line's, else the sampler grid's choice, else
        DEFAULT_SAMPLER."""
        chosen = dict(DEFAULT_SAMPLER)
        grid = self.score_dir / "sampler.json"
        if grid.exists():
            chosen.update(json.loads(grid.read_text())["chosen"])
        if self.args.steps is not None:
            chosen["steps"] = self.args.steps
        if self.args.guidance_scale is not None:
            chosen["guidance_scale"] = self.args.guidance_scale
        return chosen

    def _judge(self, folder: Path) -> dict[str, Any]:
        """The judge's prompt adherence of a folder of samples (scored once; the log is named after the folder)."""
        name = "_".join(folder.relative_to(self.scores).parts)
        log = self.logs / f"judge_{name}.log"
        if not log.exists() or not log.read_text().strip().startswith("{"):
            run_stage(f"judge_{name}", [PY, "-m", "eval.fmnist_judge", "score", "--weights", str(self.judge),
                                        "--images", str(folder)], self.logs)
        return json_tail(log)

    def _sample_ldm(self, point: dict[str, Any], n: int, folder: Path, setting: dict[str, Any]) -> None:
        prompts = self.out / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        run_stage(f"sample_ldm_{folder.name}", [
            PY, "-m", "eval.run", f"checkpoint={point['path']}", f"prompts={prompts}", f"num_samples={n}",
            f"steps={setting['steps']}", f"guidance_scale={setting['guidance_scale']}", "stage=sample",
            f"first_stage_checkpoint={self.decoder}", f"output_dir={folder}", "batch_size=250", "wandb.mode=disabled", "progress=false", "metrics.fid=false",
            "metrics.prc=false", "adherence=false"], self.logs)

    def _sample_baseline(self, point: dict[str, Any], n: int, folder: Path, setting: dict[str, Any]) -> None:
        run_stage(f"sample_baseline_{folder.name}", [
            PY, str(BASELINE), "sample", "--out", str(self.base_dir), "--snapshot", point["name"],
            "--num-samples", str(n), "--steps", str(setting["steps"]),
            "--guidance-scale", str(setting["guidance_scale"]),
            "--images", str(folder), "--batch-size", "250", "--threads", str(self.args.threads)], self.logs)

    def _images_of(self, folder: Path) -> Path:
        """eval.run writes <output_dir>/<set>/NNNNNN.png: the folder that holds the PNGs."""
        if any(folder.glob("*.png")):
            return folder
        found = sorted({p.parent for p in folder.rglob("*.png")})
        if len(found) != 1:
            raise StageError(f"expected one folder of PNGs under {folder}, found {len(found)}")
        return found[0]

    def reconstruction(self) -> dict[str, Any]:
        """PSNR / SSIM of the first stage over the first fid_samples t10k images, and their rFID: the
        reconstructions against the same t10k statistics the samples are scored with."""
        recon = self.score_dir / "reconstruction"
        if not (recon / "metrics.json").exists():
            run_stage("reconstruction", [
                PY, "-m", "eval.reconstruction", "first_stage=fmnist_kl_f4", f"first_stage.checkpoint={self.decoder}",
                f"images={tars(self.raw / 't10k', self.n['t10k_shards'])}", f"num_images={self.n['fid_samples']}",
                f"output_dir={recon}", "lpips.enabled=false", "metrics.fid=false", "batch_size=100"], self.logs)
        metrics = json.loads((recon / "metrics.json").read_text())
        n = self.n["fid_samples"]
        return {"psnr": metrics.get("psnr"), "ssim": metrics.get("ssim"), "num_images": n,
                "rfid": self._fid(self._features(recon / "reconstructions"), n)}

    def score(self) -> None:
        self.score_dir.mkdir(parents=True, exist_ok=True)
        t10k = tars(self.raw / "t10k", self.n["t10k_shards"]).strip("'")
        floor_log = self.logs / "fid_real_floor.log"
        if not (self.t10k_stats.exists() and floor_log.exists()):
            run_stage("fid_real_floor", [PY, "-m", "eval.fid", t10k,
                                         tars(self.raw / "train", self.n["train_shards"]).strip("'"),
                                         "--limit-a", str(self.n["reference_images"]), "--limit-b",
                                         str(self.n["fid_samples"]), "--save-stats", str(self.t10k_stats)],
                      self.logs)
        models = (("ldm", self.ldm_points(), self._sample_ldm, self.n["fid_samples"]),
                  ("baseline", self.baseline_points(), self._sample_baseline, self.n["baseline_final"]))
        for model, points, _, _ in models:
            if not points:
                raise StageError(f"no {model} checkpoints to score: run --stages train first")
        curve_n, setting = self.n["curve_samples"], self.setting()
        write_json(self.score_dir / "setting.json", setting)
        # the final points first (the headline numbers), then the curves, then the first stage
        for model, points, sample, final_n in models:
            folder = self._draw(model, points[-1], final_n, sample, setting)
            write_json(self.score_dir / f"{model}_adherence.json", self._judge(folder))
        for model, points, sample, final_n in models:
            rows = []
            for i, point in enumerate(points):
                final = i == len(points) - 1
                folder = self._draw(model, point, final_n if final else curve_n, sample, setting)
                feats = self._features(folder)
                # every curve point at the same size and seeds (the first curve_n images; biased upwards alike)
                row = {**point, "fid": self._fid(feats, curve_n), "fid_samples": curve_n, "images": str(folder)}
                if final:
                    row["final_fids"] = {str(k): self._fid(feats, k)
                                         for k in sorted({final_n, self.n["baseline_final"]}) if k <= final_n}
                rows.append(row)
                write_json(self.score_dir / f"{model}.json", rows)
        write_json(self.score_dir / "first_stage.json", self.reconstruction())
        floor_curve = self.scores / "real_floor_curve.json"
        if not floor_curve.exists():  # the real-data floor at the curve's sample count (FID is biased upwards alike)
            from eval.fid import feature_set
            from ldm_train.metrics.inception import FIDInception

            train = tars(self.raw / "train", self.n["train_shards"]).strip("'")
            feats = feature_set(train, FIDInception(), batch_size=100, limit=curve_n).features.numpy()
            write_json(floor_curve, {"fid": self._fid(feats, curve_n), "num_images": curve_n})

    def _draw(self, model: str, point: dict[str, Any], n: int, sample: Any, setting: dict[str, Any]) -> Path:
        """The folder of PNGs of ``n`` samples of this point with this sampler setting (drawn once)."""
        folder = (self.score_dir if model == "ldm" else self.scores) / model / f"{point['name']}-n{n}-ddim{setting['steps']}-g{setting['guidance_scale']:g}"
        if not (folder / "done").exists():
            sample(point, n, folder, setting)
            (folder / "done").write_text("")
        return self._images_of(folder)

    # ---------------------------------------------------------------------------------------------- report
    def report(self) -> dict[str, Any]:
        from studies.fmnist_plots import curves_png, sample_grid_png

        self.report_dir.mkdir(parents=True, exist_ok=True)
        ldm = json.loads((self.score_dir / "ldm.json").read_text())
        base = json.loads((self.score_dir / "baseline.json").read_text())
        floor = json_tail(self.logs / "fid_real_floor.log")
        floor_curve = json.loads((self.scores / "real_floor_curve.json").read_text())
        recon = json.loads((self.score_dir / "first_stage.json").read_text())
        judge = json.loads((self.score_dir / "ldm_adherence.json").read_text())
        judge_base = json.loads((self.score_dir / "baseline_adherence.json").read_text())
        ldm_sum = json.loads((self.ldm_dir / "train_summary.json").read_text())
        setting = json.loads((self.score_dir / "setting.json").read_text())
        grid = self.score_dir / "sampler.json"
        sampler_grid = json.loads(grid.read_text()) if grid.exists() else None
        curve_n = self.n["curve_samples"]
        base_final = base[-1]["fid"]  # at curve_n samples, as every curve point
        # the first LDM point at or below the baseline's final FID, both at curve_n samples (None: not reached)
        reached = next((r for r in ldm if r["fid"] <= base_final), None)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or None
        n_final, n_base = self.n["fid_samples"], self.n["baseline_final"]
        result = {
            "fid": ldm[-1]["final_fids"][str(n_final)], "num_samples": n_final,
            "fid_real_floor": round(floor["fid"], 3),
            "fid_real_floor_samples": floor["count_b"], "reference_images": floor["count_a"],
            "train_wall_s": ldm_sum["train_wall_s"], "samples_seen": ldm_sum["samples_seen"],
            "judge_accuracy_t10k": judge["judge_t10k_accuracy"], "prompt_adherence": judge["prompt_adherence"],
            "prompt_adherence_per_class": judge["per_class"],
            "baseline_fid": base[-1]["final_fids"][str(n_base)], "baseline_num_samples": n_base,
            "fid_at_baseline_num_samples": ldm[-1]["final_fids"][str(n_base)],
            "baseline_train_wall_s": base[-1]["train_wall_s"], "baseline_samples_seen": base[-1]["samples"],
            "baseline_prompt_adherence": judge_base["prompt_adherence"],
            "curve_fid_samples": curve_n, "fid_real_floor_at_curve_samples": floor_curve["fid"],
            "ldm_wall_s_to_baseline_final_fid": reached["train_wall_s"] if reached else None,
            "speedup_to_baseline_final_fid": (round(base[-1]["train_wall_s"] / reached["train_wall_s"], 2)
                                              if reached else None),
            "first_stage": {**recon, "checkpoint": str(self.decoder), "decoder_fine_tune_steps": self.decoder_steps},
            "sampler": {"kind": "ddim", **setting}, "sampler_grid": sampler_grid,
            "curve": {"ldm": ldm, "baseline": base},
            "commit": commit,
            "commands": {"all": "python -m studies.fmnist_reference" + (" --smoke" if self.args.smoke else "") + (
                             f" --decoder-steps {self.decoder_steps}" if self.decoder_steps != self.n["decoder_steps"] else ""),
                         "ldm": " ".join(self.ldm_cmd()[1:]), "baseline": " ".join(self.baseline_cmd()[1:])},
        }
        curves_png(ldm, base, floor_curve["fid"], self.report_dir / "fmnist_fid_vs_time.png")
        cols = min(8, n_base // 10)  # 10 prompts x 8 seeds (fewer in a smoke run)
        sample_grid_png(ldm[-1]["images"], self.report_dir / "fmnist_ldm_samples.png", rows=10, cols=cols)
        sample_grid_png(base[-1]["images"], self.report_dir / "fmnist_baseline_samples.png", rows=10, cols=cols)
        recon_dir = self.score_dir / "reconstruction"
        sample_grid_png(str(recon_dir / "originals"), self.report_dir / "fmnist_kl_f4_reconstructions.png", rows=2,
                        cols=16, second=str(recon_dir / "reconstructions"))
        write_json(self.report_dir / "fmnist_ldm.json", result)
        (self.report_dir / "fmnist_ldm.md").write_text(markdown(result))
        print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "commands")}), flush=True)
        return result


def markdown(r: dict[str, Any]) -> str:
    """The report's tables as markdown (docs/results.md includes them)."""
    fs = r["first_stage"]
    lines = [
        f"Commit `{r['commit']}`, `{r['commands']['all']}`; DDIM {r['sampler']['steps']} steps, guidance "
        f"{r['sampler']['guidance_scale']}, FID against the {r['reference_images']:,} t10k images.",
        "",
        "| model | training (s) | samples seen | FID (samples) | FID at equal N | prompt adherence |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| LDM-4, text (ours) | {r['train_wall_s']:,.0f} | {r['samples_seen']:,} | {r['fid']:.2f} ({r['num_samples']:,}) | "
        f"{r['fid_at_baseline_num_samples']:.2f} ({r['baseline_num_samples']:,}) | {r['prompt_adherence']:.3f} |",
        f"| pixel DDPM, class (diffusers) | {r['baseline_train_wall_s']:,.0f} | {r['baseline_samples_seen']:,} | "
        f"{r['baseline_fid']:.2f} ({r['baseline_num_samples']:,}) | {r['baseline_fid']:.2f} ({r['baseline_num_samples']:,}) | "
        f"{r['baseline_prompt_adherence']:.3f} |",
        f"| real data (train vs t10k) | | | {r['fid_real_floor']:.2f} ({r['fid_real_floor_samples']:,}) | | |",
        "",
        f"Judge: t10k accuracy {r['judge_accuracy_t10k']:.4f}. First stage fmnist_kl_f4 over {fs['num_images']:,} t10k "
        f"images: PSNR {fs['psnr']:.2f} dB, SSIM {fs['ssim']:.4f}, rFID {fs['rfid']:.2f}.",
        "",
        f"FID of {r['curve_fid_samples']} samples during training (the same seeds at every point; real train images "
        f"at this count: {r['fid_real_floor_at_curve_samples']:.2f}):",
        "",
        "| model | training (s) | samples seen | FID |",
        "| --- | ---: | ---: | ---: |",
    ]
    for model, rows in (("LDM", r["curve"]["ldm"]), ("pixel DDPM", r["curve"]["baseline"])):
        lines += [f"| {model} | {row['train_wall_s']:,.0f} | {row['samples']:,} | {row['fid']:.2f} |" for row in rows]
    reached = r["ldm_wall_s_to_baseline_final_fid"]
    lines += ["", (f"The LDM reached the baseline's final FID{r['curve_fid_samples']} after {reached:,.0f} s of its "
                   f"{r['baseline_train_wall_s']:,.0f} s: {r['speedup_to_baseline_final_fid']}x sooner.") if reached else
              "The LDM did not reach the baseline's final FID within the budget."]
    grid = r.get("sampler_grid")
    if grid:
        lines += ["", f"The sampler (chosen on {grid['num_samples']:,} samples of {grid['checkpoint']} against the "
                      f"{grid['reference']}, never t10k: the lowest FID with prompt adherence >= {grid['min_adherence']}):",
                  "", "| DDIM steps | guidance | FID vs train | prompt adherence |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {g['steps']} | {g['guidance_scale']:g} | {g['fid_vs_train']:.2f} | {g['prompt_adherence']:.3f} |"
                  for g in grid["grid"]]
    return "\n".join(lines) + "\n"
