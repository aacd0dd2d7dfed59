"""The encode job: images + captions -> first-stage latents as WebDataset shards + manifest.json.

    python -m data_prep.encode input=URL output=URL first_stage=NAME first_stage.checkpoint=PATH

Input shard j (see ``data_prep.readers.list_input_shards``) becomes ``<output>/<first_stage.name>/shard-{j:06d}.tar``;
task i of n takes the shards with j % n == i (SLURM array, torchrun ranks or one process), so tasks never
collide. DataLoader workers decode, filter, resize and batch whole input shards; this process only runs the
first stage and writes. A shard is written under a temporary name and published when complete; its stats
part (``_stats/part-{j:06d}.json``) is written after it, and a re-run skips exactly the shards with a part.
When every input shard is done the manifest is merged (here by the last task, or ``data_prep.finalize``).

Per sample: ``__key__`` = the source key, ``latent.npy`` float16 ``[2z, h, w]`` (KL: mean then logvar) or
``[z, h, w]`` (VQ: pre-quantization latent), ``txt`` caption, ``json`` {source_key, source_shard,
original_width, original_height, label (when there is one)}.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data_prep import manifest as mf
from data_prep.readers import (
    Filters,
    InputShard,
    InputShardError,
    Sample,
    Skip,
    iter_shard,
    list_input_shards,
)
from ldm_train.config import FirstStageConfig, to_dataclass
from ldm_train.data import fsspec_io


@dataclass
class EncodeResult:
    output: str  # the shard folder <output>/<first_stage.name>
    task_index: int
    num_tasks: int
    done: list[int] = field(default_factory=list)  # shards encoded by this run
    already_done: list[int] = field(default_factory=list)  # skipped: complete from an earlier run
    failed: dict[int, str] = field(default_factory=dict)  # shards with no output (retried on re-run)
    input_errors: dict[int, str] = field(default_factory=dict)  # damaged inputs, salvaged and written
    num_samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    wait_s: float = 0.0  # time the encoder waited for the next batch from the workers
    encode_s: float = 0.0
    manifest: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.input_errors


# ---------------------------------------------------------------- the work split


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


# ---------------------------------------------------------------- workers: decode + batch whole shards


class ShardBatches(torch.utils.data.IterableDataset):
    """Yields ``{"kind": "batch", ...}`` dicts of up to ``batch_size`` decoded images, all from one input shard,
    then one ``{"kind": "end", ...}`` per shard with its skip counts and any input error."""

    def __init__(self, shards: list[InputShard], resolution: int, filters: Filters, caption_template: str,
                 batch_size: int) -> None:
        super().__init__()
        self.shards, self.resolution, self.filters = shards, resolution, filters
        self.caption_template, self.batch_size = caption_template, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            yield from self._one(shard)

    def _one(self, shard: InputShard) -> Iterator[dict[str, Any]]:
        skipped: Counter[str] = Counter()
        examples: list[str] = []
        buf: list[Sample] = []
        error, salvaged = None, True
        try:
            for rec in iter_shard(shard, self.resolution, self.filters, self.caption_template):
                if isinstance(rec, Skip):
                    skipped[rec.reason] += 1
                    if len(examples) < 5:
                        examples.append(f"{rec.key}: {rec.reason} {rec.detail}".strip())
                    continue
                buf.append(rec)
                if len(buf) == self.batch_size:
                    yield _batch(shard.index, buf)
                    buf = []
        except InputShardError as e:
            error, salvaged = str(e), e.salvaged
        if buf:
            yield _batch(shard.index, buf)
        yield {"kind": "end", "shard": shard.index, "skipped": dict(skipped), "skip_examples": examples,
               "error": error, "salvaged": salvaged}


def _batch(index: int, samples: list[Sample]) -> dict[str, Any]:
    return {"kind": "batch", "shard": index, "keys": [s.key for s in samples],
            "images": torch.stack([s.image for s in samples]), "captions": [s.caption for s in samples],
            "metas": [s.meta for s in samples]}


# ---------------------------------------------------------------- first stage


def _sha256(url: str) -> str:
    h = hashlib.sha256()
    with fsspec_io.open_url(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_encoder(fs_cfg: FirstStageConfig, allow_random: bool) -> torch.nn.Module:
    from ldm_train.models.autoencoder import build_first_stage, load_first_stage

    if fs_cfg.checkpoint:
        return load_first_stage(fs_cfg)
    if not allow_random:
        raise SystemExit(
            f"first_stage {fs_cfg.name} has no checkpoint: pass first_stage.checkpoint=PATH (a file from "
            f"`python -m ldm_train.train_autoencoder first_stage={fs_cfg.name}` or a released CompVis model.ckpt), "
            f"or allow_random_first_stage=true to test the plumbing with random weights"
        )
    banner = "!" * 78
    print(f"{banner}\n!! ENCODING WITH A RANDOMLY INITIALISED FIRST STAGE ({fs_cfg.name}): latents are "
          f"meaningless.\n!! allow_random_first_stage=true is for plumbing tests only.\n{banner}", flush=True)
    torch.manual_seed(0)  # the same random weights in every task
    return build_first_stage(fs_cfg).eval().requires_grad_(False)


def _device_and_autocast(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision={precision!r}: use auto, fp32, bf16 or fp16")
    return dev, dtypes[precision]


@torch.no_grad()
def encode_batch(model: torch.nn.Module, x: torch.Tensor, kind: str, autocast: torch.dtype | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored float16 latents, z for the statistics) of images ``x`` in [-1, 1]."""
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        m = model.encode_moments(x)
    m = m.float()
    if kind != "kl":
        return m.half(), m
    mean, logvar = m.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)  # as CompVis DiagonalGaussianDistribution
    # CPU generator: the same noise on any device and in any task split
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return torch.cat([mean, logvar], 1).half(), mean + torch.exp(0.5 * logvar) * noise


# ---------------------------------------------------------------- one output shard being written


class _OpenShard:
    def __init__(self, output: str, index: int, input_url: str, channels: int, seed: int) -> None:
        import webdataset as wds

        self.index, self.input_url, self.count, self.nonfinite = index, input_url, 0, 0
        self.url = fsspec_io.join(output, mf.shard_name(index))
        self._cm = fsspec_io.atomic_write(self.url)
        self._f = self._cm.__enter__()
        self._tar = wds.TarWriter(self._f, encoder=False)
        self.stats = mf.LatentStats(channels)
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + index)

    def write(self, keys: list[str], latents: np.ndarray, captions: list[str], metas: list[dict]) -> None:
        for key, lat, cap, meta in zip(keys, latents, captions, metas, strict=True):
            buf = io.BytesIO()
            np.save(buf, lat, allow_pickle=False)
            info = {k: meta[k] for k in ("source_key", "source_shard", "original_width", "original_height")}
            if meta.get("label", -1) >= 0:
                info["label"] = meta["label"]
            self._tar.write({"__key__": key, "latent.npy": buf.getvalue(), "txt": cap.encode("utf-8"),
                             "json": json.dumps(info).encode()})
            self.count += 1

    def commit(self) -> None:
        self._tar.close()  # closes only the tar stream: TarWriter does not own the file
        self._cm.__exit__(None, None, None)

    def discard(self, exc: BaseException) -> None:
        with contextlib.suppress(BaseException):
            self._cm.__exit__(type(exc), exc, exc.__traceback__)


# ---------------------------------------------------------------- the job


def _job_description(cfg: DictConfig, fs_cfg: FirstStageConfig, shards: list[InputShard], sha: str | None) -> dict:
    h = cfg.resolution // fs_cfg.downsample_factor
    z = fs_cfg.embed_dim
    kl = fs_cfg.kind == "kl"
    return {
        "first_stage": {"name": fs_cfg.name, "kind": fs_cfg.kind, "downsample_factor": fs_cfg.downsample_factor,
                        "z_channels": z, "checkpoint": fs_cfg.checkpoint, "sha256": sha,
                        "random_weights": not fs_cfg.checkpoint},
        "resolution": int(cfg.resolution),
        "latent_shape": [2 * z if kl else z, h, h],
        "stored": "moments" if kl else "prequant",
        "stats_of": "sampled_z" if kl else "prequant",
        "stats_channels": z,
        "input": {"spec": cfg.input if isinstance(cfg.input, str) else list(cfg.input),
                  "format": shards[0].kind, "num_shards": len(shards)},
        "encode": {"filter": OmegaConf.to_container(cfg.filter), "seed": int(cfg.seed),
                   "files_per_shard": int(cfg.files_per_shard), "caption_template": cfg.caption_template},
    }


def _check_same_job(output: str, job: dict, overwrite: bool) -> None:
    url = mf.job_url(output)
    if overwrite or not fsspec_io.exists(url):
        return
    old = mf.read_json(url)
    for key in ("first_stage", "resolution", "latent_shape", "input"):
        if old.get(key) != job.get(key):
            raise SystemExit(
                f"{output} already holds shards of another encode job ({key}: {old.get(key)} != {job.get(key)}): "
                f"pick another output, or overwrite=true to redo every shard"
            )


def run_encode(cfg: DictConfig) -> EncodeResult:
    """Encode this task's input shards; returns what happened (see ``EncodeResult``)."""
    t_start = time.perf_counter()
    fs_cfg: FirstStageConfig = to_dataclass(cfg.first_stage, FirstStageConfig)
    if cfg.resolution % fs_cfg.downsample_factor:
        raise SystemExit(f"resolution={cfg.resolution} is not divisible by first_stage {fs_cfg.name}'s f={fs_cfg.downsample_factor}")
    task, ntasks = resolve_tasks(cfg.task_index, cfg.num_tasks)
    output = fsspec_io.join(str(cfg.output), fs_cfg.name)
    res = EncodeResult(output, task, ntasks)
    input_spec = cfg.input if isinstance(cfg.input, str) else list(cfg.input)
    shards = list_input_shards(input_spec, cfg.input_format, int(cfg.files_per_shard))
    sha = _sha256(fs_cfg.checkpoint) if fs_cfg.checkpoint else None
    job = _job_description(cfg, fs_cfg, shards, sha)
    _check_same_job(output, job, bool(cfg.overwrite))
    mf.write_json(mf.job_url(output), job)

    done_parts = set(fsspec_io.ls(fsspec_io.join(output, mf.STATS_DIR)))
    mine = [s for s in shards if s.index % ntasks == task]
    todo = [s for s in mine if cfg.overwrite or f"part-{s.index:06d}.json" not in done_parts]
    todo_ids = {s.index for s in todo}
    res.already_done = [s.index for s in mine if s.index not in todo_ids]
    print(f"[encode] task {task}/{ntasks}: {len(mine)} of {len(shards)} input shards, {len(res.already_done)} "
          f"already done, {len(todo)} to encode -> {output}", flush=True)
    if todo:
        _encode_shards(cfg, fs_cfg, output, todo, res)
    res.wall_s = time.perf_counter() - t_start
    if cfg.finalize is not False:  # auto: whichever task finishes last finds every part and merges
        from data_prep.finalize import FinalizeError, finalize

        try:
            res.manifest = finalize(output)["_url"]
            print(f"[encode] every input shard is done: wrote {res.manifest}", flush=True)
        except FinalizeError as e:
            if cfg.finalize is True:
                raise
            print(f"[encode] not finalizing yet: {str(e).splitlines()[0]}", flush=True)
    return res


def _clean_stale_tmp(output: str, shards: list[InputShard]) -> None:
    """Remove temporaries a killed run left for the shards this task owns (local outputs only)."""
    if not fsspec_io.is_local(output):
        return  # an unfinished S3 upload never becomes an object
    mine = {mf.shard_name(s.index) for s in shards}
    for name in fsspec_io.ls(output):
        if ".tmp-" in name and name.split(".tmp-")[0] in mine:
            fsspec_io.rm(fsspec_io.join(output, name))


def _encode_shards(cfg: DictConfig, fs_cfg: FirstStageConfig, output: str, todo: list[InputShard],
                   res: EncodeResult) -> None:
    from tqdm import tqdm

    device, autocast = _device_and_autocast(str(cfg.device), str(cfg.precision))
    model = load_encoder(fs_cfg, bool(cfg.allow_random_first_stage)).to(device)
    fsspec_io.makedirs(output)
    _clean_stale_tmp(output, todo)
    filters = Filters(cfg.filter.min_size, cfg.filter.max_aspect, bool(cfg.filter.require_caption))
    dataset = ShardBatches(todo, int(cfg.resolution), filters, str(cfg.caption_template), int(cfg.batch_size))
    nw = min(int(cfg.num_workers), len(todo))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=nw, prefetch_factor=int(cfg.prefetch_factor) if nw else None,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    by_index = {s.index: s for s in todo}
    skipped: Counter[str] = Counter()
    open_shards: dict[int, _OpenShard] = {}
    # in a batch log (no tty) a redraw every 30 s keeps the file readable
    bar = tqdm(desc=f"encode task {res.task_index}", unit="img", disable=not cfg.progress,
               mininterval=2.0 if sys.stdout.isatty() else 30.0,
               smoothing=0.05, file=sys.stdout)
    it = iter(loader)
    try:
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            t1 = time.perf_counter()
            if item is None:
                break
            j = item["shard"]
            cur = open_shards.get(j)
            if cur is None:
                cur = open_shards[j] = _OpenShard(output, j, by_index[j].url, fs_cfg.embed_dim, int(cfg.seed))
            if item["kind"] == "batch":
                res.wait_s += t1 - t0
                stored, z = encode_batch(model, item["images"].to(device, non_blocking=True), fs_cfg.kind,
                                         autocast, cur.generator)
                finite = torch.isfinite(stored).flatten(1).all(1)
                keep = finite.nonzero().flatten().tolist()
                cur.nonfinite += len(finite) - len(keep)  # fp16 overflow: such a latent would poison training
                cur.stats.update(z[finite])
                lat = stored[finite].cpu().numpy()
                cur.write([item["keys"][i] for i in keep], lat, [item["captions"][i] for i in keep],
                          [item["metas"][i] for i in keep])
                res.encode_s += time.perf_counter() - t1
                bar.update(len(item["keys"]))
                bar.set_postfix(skipped=sum(skipped.values()), shards=f"{len(res.done)}/{len(todo)}", refresh=False)
                continue
            # end of an input shard
            open_shards.pop(j)
            shard_skipped = Counter(item["skipped"]) + Counter({"nonfinite_latent": cur.nonfinite})
            skipped.update(shard_skipped)
            if item["error"] and not item["salvaged"]:
                cur.discard(RuntimeError(item["error"]))
                res.failed[j] = item["error"]
                print(f"[encode] FAILED input shard {j} ({by_index[j].url}): {item['error']}", flush=True)
                continue
            cur.commit()
            part = {"index": j, "name": mf.shard_name(j), "input": by_index[j].url, "num_samples": cur.count,
                    "skipped": dict(shard_skipped), "skip_examples": item["skip_examples"],
                    "stats": cur.stats.to_dict(), "input_errors": [item["error"]] if item["error"] else []}
            if item["error"]:
                res.input_errors[j] = item["error"]
                print(f"[encode] input shard {j} is damaged; kept its {cur.count} readable samples: {item['error']}",
                      flush=True)
            mf.write_json(mf.part_url(output, j), part)  # after the shard: "part exists" == "shard complete"
            res.done.append(j)
            res.num_samples += cur.count
    except BaseException as e:
        for cur in open_shards.values():
            cur.discard(e)
        raise
    finally:
        bar.close()
    res.skipped = dict(skipped)


def _report(res: EncodeResult) -> None:
    imgs = res.num_samples
    print(json.dumps({
        "output": res.output, "task": f"{res.task_index}/{res.num_tasks}", "encoded_shards": len(res.done),
        "already_done": len(res.already_done), "failed": res.failed, "input_errors": res.input_errors,
        "samples": imgs, "skipped": res.skipped, "images_per_s": round(imgs / res.wall_s, 2) if res.wall_s else None,
        "encoder_wait_share": round(res.wait_s / max(res.wait_s + res.encode_s, 1e-9), 4),
        "manifest": res.manifest,
    }), flush=True)


def main() -> None:
    import hydra

    from ldm_train.config import register_configs

    register_configs()
    exit_code = 0

    @hydra.main(config_path="../conf", config_name="encode", version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        nonlocal exit_code
        res = run_encode(cfg)
        _report(res)
        exit_code = 0 if res.ok else 1

    _app()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
