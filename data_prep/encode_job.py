"""The encode job: this task's input shards -> latent shards, stats parts and (when all are done) the manifest.

Input shard j (see ``ldm_train.data.input_shards.list_input_shards``) becomes
``<output>/<first_stage.name>/shard-{j:06d}.tar``; task i of n takes the shards with j % n == i (SLURM array,
torchrun ranks or one process), so tasks never collide. DataLoader workers decode, filter, resize and batch
whole input shards; this process only runs the first stage and writes (``data_prep.encoding``). A shard is
written under a temporary name and published when complete; its stats part (``_stats/part-{j:06d}.json``) is
written after it and records the shard's size, sha256 and sample count. A re-run skips the shards with a part
whose shard is present with the recorded size (``verify=true`` also re-hashes them) and re-encodes the others.
When every input shard is done the manifest is merged (here by the last task, or ``data_prep.finalize``).

Failing loudly: a run whose shards hold no sample at all (every image skipped) exits 1 with the counts by
reason and the fix, and no manifest of 0 samples is written. Two processes running the same task at once
both finish: temporaries are per process and only those of dead writers are cleaned, and the shards are
byte-reproducible.

Preemption (scancel, SLURM preemption: SIGTERM to every process of the step; SIGUSR1/SIGUSR2 too): the
DataLoader workers ignore the signal, this process stops after the batch in hand, drops the shards it had
open (finished shards stay), prints the report with ``preempted`` and, under SLURM, requeues the task; a
re-run continues with the shards not finished. Exit status 0 when requeued, else 1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from data_prep import manifest as mf
from data_prep.config import EncodeConfig
from data_prep.encoding import OpenShard, ShardBatches, device_and_autocast, encode_into, load_encoder
from data_prep.progress import EncodeProgress
from ldm_train.checkpoints.compvis import WeightsFile
from ldm_train.checkpoints.first_stage import read_first_stage_file
from ldm_train.data import fsspec_io
from ldm_train.data.input_shards import InputShard, list_input_shards
from ldm_train.data.readers import Filters
from ldm_train.runtime import preemption


@dataclass
class EncodeResult:
    output: str  # the shard folder <output>/<first_stage.name>
    task_index: int
    num_tasks: int
    done: list[int] = field(default_factory=list)  # shards encoded by this run
    already_done: list[int] = field(default_factory=list)  # skipped: complete from an earlier run
    already_done_samples: int = 0
    failed: dict[int, str] = field(default_factory=dict)  # shards with no output (retried on re-run)
    input_errors: dict[int, str] = field(default_factory=dict)  # damaged inputs, salvaged and written
    damaged: dict[int, str] = field(default_factory=dict)  # finished output shards found damaged: re-encoded
    num_samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)  # kept samples that needed a conversion, by kind
    error: str | None = None  # the run as a whole failed (no sample written, or nothing to merge)
    wall_s: float = 0.0
    wait_s: float = 0.0  # time the encoder waited for the next batch from the workers
    encode_s: float = 0.0
    manifest: str | None = None
    preempted: str | None = None  # the signal that stopped the run (SIGTERM, SIGUSR1, ...)
    requeued: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.input_errors and self.error is None and self.preempted is None


def resolve_tasks(task_index: int | None, num_tasks: int | None) -> tuple[int, int]:
    """(i, n) from the config, else SLURM_ARRAY_TASK_ID/COUNT, else RANK/WORLD_SIZE, else (0, 1)."""
    env = os.environ
    if task_index is None and num_tasks is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            n = int(env.get("SLURM_ARRAY_TASK_COUNT") or int(env["SLURM_ARRAY_TASK_MAX"]) - lo + 1)
            task_index, num_tasks = int(env["SLURM_ARRAY_TASK_ID"]) - lo, n
        elif "RANK" in env and "WORLD_SIZE" in env:
            task_index, num_tasks = int(env["RANK"]), int(env["WORLD_SIZE"])
        else:
            task_index, num_tasks = 0, 1
    if task_index is None or num_tasks is None or not 0 <= task_index < num_tasks:
        raise ValueError(f"task_index={task_index} num_tasks={num_tasks}: need 0 <= task_index < num_tasks (set both)")
    return task_index, num_tasks


# ---------------------------------------------------------------- the job description (job.json)


def _input_spec(cfg: EncodeConfig) -> str | list[str]:
    return cfg.input if isinstance(cfg.input, str) else list(cfg.input)


def _job_description(cfg: EncodeConfig, shards: list[InputShard], sha: str | None) -> dict:
    fs_cfg = cfg.first_stage
    h = cfg.resolution // fs_cfg.downsample_factor
    z = fs_cfg.embed_dim
    kl = fs_cfg.kind == "kl"
    return {
        "first_stage": {"name": fs_cfg.name, "kind": fs_cfg.kind, "downsample_factor": fs_cfg.downsample_factor,
                        "z_channels": z, "checkpoint": fs_cfg.checkpoint, "sha256": sha,
                        "random_weights": not (fs_cfg.checkpoint or fs_cfg.kind == "pixel")},
        "resolution": cfg.resolution,
        "latent_shape": [2 * z if kl else z, h, h],
        "lowres": ({"factor": cfg.lowres_factor, "size": cfg.resolution // cfg.lowres_factor, "member": "lowres.png"}
                   if cfg.lowres_factor else None),
        "inpaint": {"masks": "large", "seed": cfg.seed} if cfg.inpaint_masks else None,
        "stored": "moments" if kl else "prequant",
        "stats_of": "sampled_z" if kl else "prequant",
        "stats_channels": z,
        "input": {"spec": _input_spec(cfg), "format": shards[0].kind, "num_shards": len(shards)},
        "encode": {"filter": dataclasses.asdict(cfg.filter), "seed": cfg.seed,
                   "files_per_shard": cfg.files_per_shard, "caption_template": cfg.caption_template},
    }


def _has_finished_shards(output: str) -> bool:
    return any(n.startswith("part-") for n in fsspec_io.ls(fsspec_io.join(output, mf.STATS_DIR)))


def _check_same_job(output: str, job: dict, overwrite: bool) -> None:
    url = mf.job_url(output)
    if overwrite or not fsspec_io.exists(url):
        return
    old = mf.read_json(url)
    for key in ("first_stage", "resolution", "latent_shape", "input", "lowres", "inpaint"):
        if old.get(key) != job.get(key):
            if not _has_finished_shards(output):  # e.g. a run that failed to load its first stage
                print(f"[encode] {url} describes another encode job ({key}: {old.get(key)} != {job.get(key)}) "
                      f"that finished no shard: replacing it", flush=True)
                return
            raise SystemExit(
                f"{output} already holds shards of another encode job ({key}: {old.get(key)} != {job.get(key)}): "
                f"pick another output, or overwrite=true to redo every shard"
            )


# ---------------------------------------------------------------- the job


def run_encode(cfg: EncodeConfig) -> EncodeResult:
    """Encode this task's input shards; returns what happened (see ``EncodeResult``)."""
    t_start = time.perf_counter()
    fs_cfg = cfg.first_stage
    if cfg.resolution % fs_cfg.downsample_factor:
        raise SystemExit(f"resolution={cfg.resolution} is not divisible by first_stage {fs_cfg.name}'s f={fs_cfg.downsample_factor}")
    if cfg.lowres_factor < 0 or (cfg.lowres_factor and cfg.resolution % cfg.lowres_factor):
        raise SystemExit(f"lowres_factor={cfg.lowres_factor} must be 0 (off) or divide resolution={cfg.resolution}")
    task, ntasks = resolve_tasks(cfg.task_index, cfg.num_tasks)
    output = fsspec_io.join(str(cfg.output), fs_cfg.name)
    res = EncodeResult(output, task, ntasks)
    shards = list_input_shards(_input_spec(cfg), cfg.input_format, cfg.files_per_shard)
    # the one read of the first-stage file: its sha256 for the manifest and the weights for the encoder
    weights = read_first_stage_file(fs_cfg) if fs_cfg.checkpoint else None
    job = _job_description(cfg, shards, weights.sha256 if weights else None)
    _check_same_job(output, job, cfg.overwrite)
    mf.write_json(mf.job_url(output), job)

    mine = [s for s in shards if s.index % ntasks == task]
    todo = mine if cfg.overwrite else _unfinished(output, mine, cfg.verify, res)
    damaged = f" ({len(res.damaged)} of them damaged)" if res.damaged else ""
    print(f"[encode] task {task}/{ntasks}: {len(mine)} of {len(shards)} input shards, {len(res.already_done)} "
          f"already done, {len(todo)} to encode{damaged} -> {output}", flush=True)
    if todo:
        with preemption.installed() as signals:  # restored after: run_encode is also called in-process
            _encode_shards(cfg, output, todo, res, weights, signals)
        if res.done and res.num_samples == 0 and res.already_done_samples == 0:
            res.error = _no_samples_message(res, todo)
            print(f"[encode] ERROR: {res.error}", file=sys.stderr, flush=True)
    res.wall_s = time.perf_counter() - t_start
    if res.preempted is None:
        _maybe_finalize(cfg.finalize, output, res)
    return res


def check_finished_shard(output: str, part: dict[str, Any], sizes: dict[str, int], verify: bool) -> str | None:
    """What is wrong with the finished shard of stats part ``part``, or None: the shard must be present with
    the size its part recorded; ``verify`` also compares its sha256 (parts of older encodes, without one: the
    samples that can be read against the recorded count). ``sizes`` is ``fsspec_io.sizes(output)``."""
    from ldm_train.data.shard_reader import ShardFormatError, iter_samples

    name = mf.shard_name(int(part["index"]))
    url = fsspec_io.join(output, name)
    if name not in sizes:
        return f"{url} is missing"
    recorded = part.get("size")
    if recorded is not None and sizes[name] != int(recorded):
        return f"{url} has {sizes[name]} bytes, its stats part recorded {recorded} (truncated or overwritten)"
    if not verify:
        return None
    if part.get("sha256"):
        sha = fsspec_io.sha256(url)
        return None if sha == part["sha256"] else f"{url} has sha256 {sha[:16]}..., its stats part recorded {part['sha256'][:16]}..."
    try:
        n = sum(1 for _ in iter_samples(url))
    except ShardFormatError as e:
        return str(e)
    want = int(part["num_samples"])
    return None if n == want else f"{url} holds {n} readable samples, its stats part recorded {want}"


def _unfinished(output: str, mine: list[InputShard], verify: bool, res: EncodeResult) -> list[InputShard]:
    """The shards of ``mine`` to encode: those without a stats part, and finished ones found damaged (their part
    is removed first, so a run that dies before re-encoding them leaves them to the next run)."""
    parts = set(fsspec_io.ls(fsspec_io.join(output, mf.STATS_DIR)))
    finished = [s for s in mine if f"part-{s.index:06d}.json" in parts]
    sizes = fsspec_io.sizes(output) if finished else {}
    todo = [s for s in mine if f"part-{s.index:06d}.json" not in parts]
    for s in finished:
        try:
            part = mf.read_json(mf.part_url(output, s.index))
            problem = check_finished_shard(output, part, sizes, verify)
        except (OSError, ValueError, KeyError) as e:
            problem = f"its stats part {mf.part_url(output, s.index)} is unreadable ({e!r})"
        if problem is None:
            res.already_done.append(s.index)
            res.already_done_samples += int(part["num_samples"])
            continue
        print(f"[encode] finished shard {s.index} is damaged, re-encoding it: {problem}", flush=True)
        res.damaged[s.index] = problem
        fsspec_io.rm(mf.part_url(output, s.index))
        todo.append(s)
    return sorted(todo, key=lambda s: s.index)


_SKIP_FIXES = {
    "too_small": "filter.min_size=<smaller> (smaller images are upscaled)",
    "bad_aspect": "filter.max_aspect=<larger> or null",
    "no_caption": "filter.require_caption=false (or give the images captions)",
    "caption_not_utf8": "filter.caption_fallback=<codec, e.g. cp1252>",
    "too_large": "filter.max_pixels=<larger> (each DataLoader worker decodes one image at a time)",
    "decode_error": "check that the input files are images (PIL cannot decode them)",
    "no_image": "check the input: its records hold no image member (jpg, jpeg, png, webp, bmp)",
    "nonfinite_latent": "precision=fp32 (the first stage overflowed)",
    "low_similarity": "lower filter.min_similarity",
    "unsafe": "raise filter.max_punsafe",
    "watermark": "raise filter.max_pwatermark",
    "low_aesthetic": "lower filter.min_aesthetic",
    "small_original": "lower filter.min_original_size",
}


def _no_samples_message(res: EncodeResult, todo: list[InputShard]) -> str:
    counts = {r: n for r, n in sorted(res.skipped.items()) if n}
    inputs = sorted({s.url for s in todo if s.index in res.done})
    listed = ", ".join(inputs[:5]) + (f" and {len(inputs) - 5} more" if len(inputs) > 5 else "")
    if not counts:
        return (f"task {res.task_index}/{res.num_tasks} wrote no sample: its input shard(s) {listed} hold no "
                f"records: check the input")
    fixes = "; ".join(f"{r}: {_SKIP_FIXES.get(r, 'check the input')}" for r in counts)
    return (f"task {res.task_index}/{res.num_tasks} wrote no sample: all {sum(counts.values())} records of "
            f"its {len(res.done)} input shard(s) were skipped ("
            + ", ".join(f"{r}: {n}" for r, n in counts.items())
            + f"); input: {listed}. Fix the input or the filter ({fixes}), then re-run with overwrite=true "
            f"(these shards are recorded as finished, empty)")


def _maybe_finalize(when: bool | str, output: str, res: EncodeResult) -> None:
    if when is False:
        return
    from data_prep.finalize import FinalizeError, NoSamplesError, finalize

    try:  # auto: whichever task finishes last finds every part and merges
        res.manifest = finalize(output)["_url"]
        print(f"[encode] every input shard is done: wrote {res.manifest}", flush=True)
    except NoSamplesError as e:  # every shard is done but none holds a sample: never a manifest of 0
        if res.error is None:
            res.error = str(e)
            print(f"[encode] ERROR: {e}", file=sys.stderr, flush=True)
    except FinalizeError as e:
        if when is True:
            raise
        print(f"[encode] not finalizing yet: {str(e).splitlines()[0]}", flush=True)


def _clean_stale_tmp(output: str, shards: list[InputShard]) -> None:
    """Remove temporaries a killed run left for the shards this task owns (local outputs only). A temporary
    of a live process (the same task started twice) is left alone: deleting it would crash that process."""
    if not fsspec_io.is_local(output):
        return  # an unfinished S3 upload never becomes an object
    mine = {mf.shard_name(s.index) for s in shards}
    for name in fsspec_io.ls(output):
        if fsspec_io.TMP_MARK in name and name.split(fsspec_io.TMP_MARK)[0] in mine:
            path = fsspec_io.join(output, name)
            if fsspec_io.tmp_is_stale(fsspec_io.local_path(path)):
                fsspec_io.rm(path)


def _loader(cfg: EncodeConfig, todo: list[InputShard], device: torch.device) -> torch.utils.data.DataLoader:
    f = cfg.filter
    filters = Filters(f.min_size, f.max_aspect, f.require_caption, f.max_pixels, f.caption_fallback,
                      f.min_similarity, f.max_punsafe, f.max_pwatermark, f.min_aesthetic, f.min_original_size)
    dataset = ShardBatches(todo, cfg.resolution, filters, cfg.caption_template, cfg.batch_size)
    nw = min(cfg.num_workers, len(todo))
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=nw, prefetch_factor=cfg.prefetch_factor if nw else None,
        pin_memory=device.type == "cuda", persistent_workers=False,
        worker_init_fn=preemption.ignore_in_worker,  # a SIGTERM to the job is this process's to handle
    )


def _encode_shards(cfg: EncodeConfig, output: str, todo: list[InputShard], res: EncodeResult,
                   weights: WeightsFile | None, signals: preemption.Preemption) -> None:
    fs_cfg = cfg.first_stage
    device, autocast = device_and_autocast(cfg.device, cfg.precision)
    model = load_encoder(fs_cfg, cfg.allow_random_first_stage, weights).to(device)
    fsspec_io.makedirs(output)
    _clean_stale_tmp(output, todo)
    loader = _loader(cfg, todo, device)
    by_index = {s.index: s for s in todo}
    skipped: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    open_shards: dict[int, OpenShard] = {}
    progress = EncodeProgress(todo, res.task_index, enabled=cfg.progress)
    with preemption.held():
        it = iter(loader)  # the workers start here
    try:
        while True:
            if signals.received is not None:
                raise preemption.Preempted(signals.received)
            t0 = time.perf_counter()
            item = next(it, None)
            t1 = time.perf_counter()
            if item is None:
                break
            j = item["shard"]
            cur = open_shards.get(j)
            if cur is None:
                cur = open_shards[j] = OpenShard(output, j, by_index[j].url, fs_cfg.embed_dim, cfg.seed)
            if item["kind"] == "batch":
                res.wait_s += t1 - t0
                encode_into(model, item, cur, fs_cfg.kind, autocast, device, cfg.lowres_factor,
                            cfg.seed if cfg.inpaint_masks else None)
                res.encode_s += time.perf_counter() - t1
                progress.batch(len(item["keys"]))
                continue
            # end of an input shard
            del open_shards[j]
            shard_skipped = _finish_shard(output, item, cur, res)
            skipped.update(shard_skipped)
            converted.update(item.get("converted", {}))
            progress.shard_done(sum(shard_skipped.values()), sum(item["skipped"].values()))
    except BaseException as e:
        for cur in open_shards.values():
            cur.discard(e)
        if not isinstance(e, preemption.Preempted):
            raise
        res.preempted = e.name
        res.requeued = preemption.requeue_slurm_job()
        print(f"[encode] stopped by {e.name}: {progress.shards_done} of {len(todo)} input shards finished in this run, "
              f"{len(open_shards)} unfinished dropped; run the same command again to continue", flush=True)
    finally:
        progress.close()
    res.skipped = dict(skipped)
    res.converted = dict(converted)


def _finish_shard(output: str, end: dict[str, Any], cur: OpenShard, res: EncodeResult) -> Counter[str]:
    """Publish (or, when its input failed, drop) a shard at its ``end`` item; returns its skip counts."""
    j = cur.index
    shard_skipped = Counter(end["skipped"]) + Counter({"nonfinite_latent": cur.nonfinite})
    if end["error"] and not end["salvaged"]:
        cur.discard(RuntimeError(end["error"]))
        res.failed[j] = end["error"]
        print(f"[encode] FAILED input shard {j} ({cur.input_url}): {end['error']}", flush=True)
        return shard_skipped
    cur.commit()
    part = {"index": j, "name": mf.shard_name(j), "input": cur.input_url, "num_samples": cur.count,
            "size": cur.size, "sha256": cur.sha256,
            "skipped": dict(shard_skipped), "skip_examples": end["skip_examples"],
            "converted": end.get("converted", {}),
            "stats": cur.stats.to_dict(), "input_errors": [end["error"]] if end["error"] else []}
    if end["error"]:
        res.input_errors[j] = end["error"]
        print(f"[encode] input shard {j} is damaged; kept its {cur.count} readable samples: {end['error']}",
              flush=True)
    mf.write_json(mf.part_url(output, j), part)  # after the shard: "part exists" == "shard complete"
    res.done.append(j)
    res.num_samples += cur.count
    return shard_skipped


def report(res: EncodeResult) -> None:
    """One JSON line: what this task did."""
    imgs = res.num_samples
    print(json.dumps({
        "output": res.output, "task": f"{res.task_index}/{res.num_tasks}", "encoded_shards": len(res.done),
        "already_done": len(res.already_done), "failed": res.failed, "input_errors": res.input_errors,
        "damaged": res.damaged, "samples": imgs, "skipped": res.skipped, "converted": res.converted, "images_per_s": round(imgs / res.wall_s, 2) if res.wall_s else None,
        "encoder_wait_share": round(res.wait_s / max(res.wait_s + res.encode_s, 1e-9), 4),
        "manifest": res.manifest, "error": res.error, "preempted": res.preempted,
    }), flush=True)


def run(cfg: EncodeConfig) -> int:
    """The app: encode, print the report; exit status 1 when any shard failed or had a damaged input, when
    the run wrote no sample at all, or when a signal stopped it (0 when it stopped and SLURM requeued it)."""
    res = run_encode(cfg)
    report(res)
    return 0 if res.ok or res.requeued else 1
