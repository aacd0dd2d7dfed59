"""Compare the points of a Hydra multirun sweep over the first stage's downsampling factor f (the paper's Fig. 6).

    python -m studies.sweep_report SWEEP_DIR [--budgets 8000,16000] [--wandb offline|online|disabled] [--log-y]

Reads ``SWEEP_DIR/<n>-<first_stage>/point.json`` (written by the trainer) and each point's run dir
(``config.yaml``, ``stats.jsonl``, ``train_summary.json``) plus the first stage's ``X.reconstruction.json``.
Writes ``SWEEP_DIR/report/{sweep_report.md, report.json, fid_vs_samples.png}`` and, unless disabled, one W&B run
(job_type ``sweep_report``, offline by default). A point without usable data gets a row saying why.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ldm_train.data.fsspec_io import write_text

FID_KEY = re.compile(r"^fid(\d+)$")
MAX_DEFAULT_BUDGETS = 4


@dataclass
class Point:
    """One sweep point as read from disk; ``problem`` says why it has no usable data (None when it has)."""

    point_dir: Path
    job_num: int | None = None
    first_stage: str | None = None
    downsample_factor: int | None = None
    latent_shape: list[int] | None = None
    wandb_group: str | None = None
    kind: str | None = None
    run_dir: Path | None = None
    fid_curves: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # K -> [(samples_seen, fid)]
    # K -> [(samples_seen, train_wall_s or None, fid, fid_std or None)]: the equal-compute view of the same rows
    fid_rows: dict[int, list[tuple[int, float | None, float, float | None]]] = field(default_factory=dict)
    seed: int | None = None  # train.seed
    train_budget_s: float | None = None  # train.time_budget_s (None: a sample budget)
    train_rates: list[float] = field(default_factory=list)  # samples_per_s of the (deduplicated) training rows
    time_span: float | None = None  # last row's time minus first row's
    summary: dict[str, Any] | None = None  # train_summary.json
    reconstruction: dict[str, Any] | None = None  # X.reconstruction.json beside the first stage checkpoint
    problem: str | None = None


def _num(v: Any) -> float | None:
    """stats.jsonl writes non-finite floats as strings ("nan", "inf")."""
    try:
        return float(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else None
    except ValueError:
        return None


def _read_stats(path: Path, point: Point) -> None:
    fid: dict[int, dict[int, float]] = {}
    extra: dict[int, dict[int, tuple[float | None, float | None]]] = {}  # K -> samples -> (train_wall_s, std)
    train: dict[int, float] = {}
    times: list[float] = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if not isinstance(row, dict):
            continue
        if (t := _num(row.get("time"))) is not None:
            times.append(t)
        seen = row.get("samples_seen")
        if not isinstance(seen, int):
            continue
        for key, value in row.items():
            if (m := FID_KEY.match(key)) and (v := _num(value)) is not None:
                fid.setdefault(int(m.group(1)), {})[seen] = v  # a resumed run repeats steps: the last row wins
                extra.setdefault(int(m.group(1)), {})[seen] = (_num(row.get("train_wall_s")),
                                                               _num(row.get(f"{key}_std")))
        if "loss" in row and (rate := _num(row.get("samples_per_s"))) is not None:
            train[seen] = rate
    point.fid_curves = {k: sorted(rows.items()) for k, rows in fid.items()}
    point.fid_rows = {k: [(n, *extra[k][n][:1], v, extra[k][n][1]) for n, v in curve]
                      for k, curve in point.fid_curves.items()}
    point.train_rates = [r for r in train.values() if math.isfinite(r)]
    point.time_span = times[-1] - times[0] if len(times) > 1 else None


def _read_run(point: Point, run_dir: Path) -> None:
    point.run_dir = run_dir
    cfg_path = run_dir / "config.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.exists() else {}
    fs = cfg.get("first_stage") or {}
    train_cfg = cfg.get("train") or {}
    point.seed = train_cfg.get("seed")
    point.train_budget_s = _num(train_cfg.get("time_budget_s")) or None
    point.first_stage = point.first_stage or fs.get("name")
    point.downsample_factor = point.downsample_factor or fs.get("downsample_factor")
    point.kind = fs.get("kind") or ("pixel" if point.downsample_factor == 1 else None)
    if fs.get("checkpoint"):
        recon = Path(os.path.splitext(str(fs["checkpoint"]))[0] + ".reconstruction.json")
        point.reconstruction = json.loads(recon.read_text()) if recon.exists() else None
    if (run_dir / "train_summary.json").exists():
        point.summary = json.loads((run_dir / "train_summary.json").read_text())
    stats = run_dir / "stats.jsonl"
    if stats.exists():
        _read_stats(stats, point)
    else:
        point.problem = f"no {stats}"


def _load_point(point_json: Path) -> Point:
    point = Point(point_dir=point_json.parent)
    try:
        meta = json.loads(point_json.read_text())
        point.job_num, point.first_stage = meta.get("job_num"), meta.get("first_stage")
        point.downsample_factor, point.latent_shape = meta.get("downsample_factor"), meta.get("latent_shape")
        point.wandb_group = meta.get("wandb_group")
        # the recorded path first; the ``run`` symlink still works when the sweep was moved with its runs
        candidates = [Path(meta["run_dir"])] if meta.get("run_dir") else []
        candidates.append(point.point_dir / "run")
        run_dir = next((c for c in candidates if c.is_dir()), None)
        if run_dir is None:
            point.problem = f"run dir not found ({meta.get('run_dir')!r} nor {point.point_dir / 'run'})"
        else:
            _read_run(point, run_dir)
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as exc:
        point.problem = f"unreadable: {type(exc).__name__}: {exc}"
    point.first_stage = point.first_stage or point.point_dir.name.split("-", 1)[-1]
    return point


def load_points(sweep_dir: str | os.PathLike) -> list[Point]:
    """Every ``<sweep_dir>/*/point.json`` (and ``<sweep_dir>/*/*/point.json``: several multiruns of one sweep
    side by side), sorted by f (unknown last), then seed, then job number."""
    root = Path(sweep_dir)
    points = [_load_point(p) for p in [*root.glob("*/point.json"), *root.glob("*/*/point.json")]]
    return sorted(points, key=lambda p: (p.downsample_factor is None, p.downsample_factor or 0, p.seed or 0,
                                         p.job_num or 0))


def _json_float(v: float | None) -> float | str | None:
    """JSON has no NaN/inf: the same strings as stats.jsonl, so report.json stays strict and round-trips."""
    return v if v is None or math.isfinite(v) else str(v)


def _main_k(point: Point) -> int | None:
    """The K with the most FID rows (ties: the larger K)."""
    return max(point.fid_curves, key=lambda k: (len(point.fid_curves[k]), k)) if point.fid_curves else None


def default_budgets(curves: list[list[tuple[int, float]]]) -> list[int]:
    """samples_seen values at which every curve has an FID row, at most 4, spread from first to last."""
    curves = [c for c in curves if c]
    common = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    if len(common) <= MAX_DEFAULT_BUDGETS:
        return common
    picks = [round(i * (len(common) - 1) / (MAX_DEFAULT_BUDGETS - 1)) for i in range(MAX_DEFAULT_BUDGETS)]
    return [common[i] for i in sorted(set(picks))]


def fid_at(curve: list[tuple[int, float]], budget: int) -> dict[str, Any]:
    """The FID row at exactly ``budget`` samples, else the last one before it (exact=False, shown with "~")."""
    before = [(s, v) for s, v in curve if s <= budget]
    if not before:
        return {"budget": budget, "fid": None, "samples_seen": None, "exact": False}
    s, v = before[-1]
    return {"budget": budget, "fid": _json_float(v), "samples_seen": s, "exact": s == budget}


def _status(point: Point, k: int | None) -> str:
    if point.problem:
        return f"no data: {point.problem}"
    if k is None:
        return "no FID rows"
    return "finished" if point.summary is not None else "incomplete"


def _row(point: Point, budgets: list[int]) -> dict[str, Any]:
    k = _main_k(point)
    curve = point.fid_curves.get(k, []) if k is not None else []
    summary, recon = point.summary or {}, point.reconstruction or {}
    if point.kind == "pixel":  # identity first stage: nothing is lost by definition
        first_stage_metrics, psnr, rfid = "identity", math.inf, 0.0
    else:
        first_stage_metrics = "reconstruction.json" if point.reconstruction else None
        psnr, rfid = _num(recon.get("psnr")), _num(recon.get("rfid"))
    rate = _num(summary.get("samples_per_s"))
    if rate is None and point.train_rates:
        rate = sum(point.train_rates) / len(point.train_rates)
    wall = _num(summary.get("wall_s"))
    final_k, final = _final(point)
    rows = point.fid_rows.get(k, []) if k is not None else []
    return {
        "job_num": point.job_num, "downsample_factor": point.downsample_factor, "first_stage": point.first_stage,
        "kind": point.kind, "latent_shape": point.latent_shape,
        "run_dir": str(point.run_dir) if point.run_dir else None,
        "first_stage_metrics": first_stage_metrics, "psnr": _json_float(psnr), "rfid": _json_float(rfid),
        "fid_k": k, "fid_at": [fid_at(curve, b) for b in budgets],
        "final_fid": _json_float(curve[-1][1]) if curve else None,
        "final_samples_seen": curve[-1][0] if curve else None,
        "samples_per_s": _json_float(rate), "wall_s": _json_float(wall if wall is not None else point.time_span),
        "status": _status(point, k),
        "curve": [[s, _json_float(v)] for s, v in curve],
        "seed": point.seed, "train_budget_s": point.train_budget_s,
        "train_wall_s": _json_float(_num(summary.get("train_wall_s"))),
        "rows": [{"wall_s": w, "samples": n, "fid": _json_float(v), "fid_std": sd} for n, w, v, sd in rows],
        "fid_samples": final_k, "fid": _json_float(final[2]) if final else None,
        "fid_std": final[3] if final else None,
    }


def _final(point: Point) -> tuple[int | None, tuple | None]:
    """The largest K measured at the run's last FID step, and that row: the run's final FID."""
    last = max((rows[-1][0] for rows in point.fid_rows.values() if rows), default=None)
    if last is None:
        return None, None
    ks = [k for k, rows in point.fid_rows.items() if rows and rows[-1][0] == last]
    k = max(ks)
    return k, point.fid_rows[k][-1]


def by_f(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per f over its seeds: the final FIDs, their mean, the FID's own noise (the mean bootstrap std)
    and, with two or more seeds, the spread between training seeds (sample std)."""
    import statistics

    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if isinstance(r.get("fid"), (int, float)):
            groups.setdefault(r["downsample_factor"], []).append(r)
    out = []
    for f, runs in groups.items():
        fids = [r["fid"] for r in runs]
        stds = [r["fid_std"] for r in runs if isinstance(r.get("fid_std"), (int, float))]
        out.append({"f": f, "first_stage": runs[0]["first_stage"], "seeds": [r["seed"] for r in runs],
                    "fids": fids, "fid": statistics.fmean(fids), "fid_samples": runs[0]["fid_samples"],
                    "fid_std": statistics.fmean(stds) if stds else None,
                    "seed_std": statistics.stdev(fids) if len(fids) > 1 else None,
                    "train_wall_s": [r["train_wall_s"] for r in runs], "rfid": runs[0]["rfid"],
                    "psnr": runs[0]["psnr"]})
    return out


def build_report(points: list[Point], budgets: list[int] | None = None) -> dict[str, Any]:
    """Rows (one per point, in the given order) and curves as plain JSON data."""
    curves = [p.fid_curves[k] for p in points if (k := _main_k(p)) is not None]
    source = "cli" if budgets else "common samples_seen of all points"
    budgets = sorted(set(budgets)) if budgets else default_budgets(curves)
    groups = sorted({p.wandb_group for p in points if p.wandb_group})
    ks = sorted({k for p in points if (k := _main_k(p)) is not None})
    rows = [_row(p, budgets) for p in points]
    return {"budgets": budgets, "budgets_source": source, "fid_k": ks,
            "wandb_group": groups[0] if len(groups) == 1 else None, "rows": rows, "by_f": by_f(rows)}


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "—"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _wall(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return _fmt(seconds)
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the markdown table (also the W&B table)."""
    header = ["f", "first stage", "latent (c x h x w)", "PSNR / rFID",
              *[f"FID@{b}" for b in report["budgets"]], "final FID", "samples/s", "wall", "status"]
    cells = []
    for r in report["rows"]:
        if r["first_stage_metrics"] == "identity":
            recon = "identity"
        else:
            recon = "—" if r["psnr"] is None and r["rfid"] is None else f"{_fmt(r['psnr'])} / {_fmt(r['rfid'])}"
        at = [("" if a["exact"] or a["fid"] is None else "~") + _fmt(a["fid"]) for a in r["fid_at"]]
        final = "—" if r["final_fid"] is None else f"{_fmt(r['final_fid'])} @ {r['final_samples_seen']}"
        shape = " x ".join(map(str, r["latent_shape"])) if r["latent_shape"] else "?"
        cells.append([_fmt(r["downsample_factor"], "d"), r["first_stage"] or "?", shape, recon, *at, final,
                      _fmt(r["samples_per_s"], ".1f"), _wall(r["wall_s"]), r["status"]])
    return header, cells


def markdown_table(report: dict[str, Any]) -> str:
    header, cells = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    ks = "/".join(map(str, report["fid_k"])) or "?"
    note = f"FID over K={ks} generated samples; \"~\": the last FID row before the budget."
    text = "\n".join(lines) + "\n\n" + note + "\n"
    if any(r.get("train_budget_s") for r in report["rows"]):
        text += "\n" + equal_compute_table(report)
    return text


def equal_compute_table(report: dict[str, Any]) -> str:
    """Per f (over its training seeds): the final FID +- the FID's own noise, the seed spread, the budget."""
    lines = ["| f | first stage | rFID | seeds | final FID (each seed) | mean | +- FID noise | +- seed spread | "
             "train wall (s) |", "|---:|---|---:|---|---|---:|---:|---:|---|"]
    for g in report["by_f"]:
        each = ", ".join(_fmt(v) for v in g["fids"])
        walls = ", ".join(_fmt(w, ".0f") for w in g["train_wall_s"])
        lines.append(f"| {g['f']} | {g['first_stage']} | {_fmt(g['rfid'])} | {','.join(map(str, g['seeds']))} | "
                     f"{each} | {_fmt(g['fid'])} | {_fmt(g['fid_std'])} | {_fmt(g['seed_std'])} | {walls} |")
    k = report["by_f"][0]["fid_samples"] if report["by_f"] else "?"
    budgets = sorted({r["train_budget_s"] for r in report["rows"] if r.get("train_budget_s")})
    return ("\n".join(lines) + f"\n\nEqual compute: every point trained for train.time_budget_s = "
            f"{', '.join(_fmt(b, '.0f') for b in budgets)} s of training steps. Final FID over {k} samples; FID noise: "
            "the standard deviation of bootstrap resamples of those samples; seed spread: the sample standard "
            "deviation of the final FIDs of the training seeds.\n")


def plot_curves(report: dict[str, Any], path: Path, log_y: bool = False) -> None:
    """FID against samples seen, one line per point; with training-time rows (equal-compute sweeps) a second
    panel against training wall time, and +- the FID's bootstrap std as bands (Agg canvas: no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    timed = any(isinstance(row.get("wall_s"), (int, float)) for r in report["rows"] for row in r.get("rows", []))
    fig = Figure(figsize=(12 if timed else 7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if timed else 1, squeeze=False)[0]
    ks = "/".join(map(str, report["fid_k"])) or "?"
    colours: dict[Any, str] = {}
    for r in report["rows"]:
        rows = [row for row in r.get("rows", []) if isinstance(row["fid"], (int, float))]
        if not rows:  # non-finite FIDs are not drawn
            continue
        f = r["downsample_factor"]
        colour = colours.setdefault(f, f"C{len(colours)}")
        label = f"f={f} ({r['first_stage']})" + (f" seed {r['seed']}" if r.get("seed") else "")
        style = "--" if r.get("seed") else "-"
        for ax, x_key in zip(axes, ("samples", "wall_s"), strict=False):
            pts = [row for row in rows if isinstance(row[x_key], (int, float))]
            if not pts:
                continue
            x, y = [row[x_key] for row in pts], [row["fid"] for row in pts]
            ax.plot(x, y, style, marker="o", color=colour, label=label)
            sd = [row["fid_std"] if isinstance(row["fid_std"], (int, float)) else 0.0 for row in pts]
            if any(sd):
                ax.fill_between(x, [v - e for v, e in zip(y, sd, strict=True)],
                                [v + e for v, e in zip(y, sd, strict=True)], color=colour, alpha=0.2)
    titles = ("FID vs samples seen per f", "FID vs training time per f (equal compute)")
    for ax, xlabel, title in zip(axes, ("training samples seen", "training wall time (s)"), titles, strict=False):
        ax.set(xlabel=xlabel, ylabel=f"FID (K={ks} samples)", title=title)
        if log_y:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no FID rows", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _log_wandb(report_dir: Path, report: dict[str, Any], plot: Path, mode: str) -> str:
    import wandb

    os.environ.setdefault("WANDB_CACHE_DIR", str(report_dir / "wandb" / ".cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(report_dir / "wandb" / ".data"))
    run = wandb.init(project="ldm-train", job_type="sweep_report", group=report["wandb_group"], mode=mode,
                     dir=str(report_dir), name=f"sweep-report-{report_dir.parent.name}",
                     config={"budgets": report["budgets"], "fid_k": report["fid_k"]}, reinit="finish_previous")
    try:
        header, cells = table_rows(report)
        run.log({"sweep_table": wandb.Table(columns=header, data=cells), "fid_vs_samples": wandb.Image(str(plot))})
        for r in report["rows"]:
            if isinstance(r["final_fid"], (int, float)):
                run.summary[f"f{r['downsample_factor']}/final_fid"] = r["final_fid"]
        return run.dir
    finally:
        run.finish()
        wandb.teardown()  # waits until the offline .wandb file is flushed


def write_report(sweep_dir: str | os.PathLike, report: dict[str, Any], wandb_mode: str = "offline",
                 log_y: bool = False) -> dict[str, Path]:
    """report/sweep_report.md, report.json, fid_vs_samples.png and (unless disabled) the W&B run dir."""
    out = Path(sweep_dir) / "report"
    paths = {"markdown": out / "sweep_report.md", "json": out / "report.json", "plot": out / "fid_vs_samples.png"}
    write_text(paths["markdown"], markdown_table(report))  # creates report/
    write_text(paths["json"], json.dumps(report, indent=2, allow_nan=False))
    plot_curves(report, paths["plot"], log_y)
    if wandb_mode != "disabled":
        paths["wandb"] = Path(_log_wandb(out, report, paths["plot"], wandb_mode))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.sweep_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="the Hydra multirun folder (runs/_sweeps/<experiment>/<date>)")
    parser.add_argument("--budgets", type=lambda s: [int(float(b)) for b in s.split(",") if b.strip()],
                        help="samples_seen values for the FID@ columns, e.g. 8000,16000 (default: common ones)")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline",
                        help="W&B mode (this flag wins over WANDB_MODE)")
    parser.add_argument("--log-y", action="store_true", help="log-scale FID axis")
    args = parser.parse_args(argv)
    points = load_points(args.sweep_dir)
    if not points:
        print(f"no sweep points under {args.sweep_dir} (no */point.json): run `python -m ldm_train.train -m ...` "
              "first, or point at the folder printed by Hydra (runs/_sweeps/<experiment>/<date>)", file=sys.stderr)
        return 2
    report = build_report(points, args.budgets)
    paths = write_report(args.sweep_dir, report, args.wandb, args.log_y)
    print(markdown_table(report) + "".join(f"\n{name}: {path}" for name, path in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
