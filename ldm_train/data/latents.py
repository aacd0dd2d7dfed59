"""Latent-shard loader: WebDataset tars of precomputed first-stage latents -> training batches.

Batches (one per micro-step, per rank) are dicts::

    {"moments": float32 [B, 2z, h, w]}   (KL first stage: mean then logvar)  or  {"latents": [B, z, h, w]} (VQ),
    "tokens": LongTensor [B, L] (when a tokenizer is given), "caption": list[str] (after dropout: "" = uncond),
    "label": LongTensor [B] (with ``LabelSpec``: the json's label, the null class where dropped),
    "lowres": float32 [B, 3, h, w] in [-1, 1] (with ``lowres_key``: each sample's low-resolution image,
    ``cond.kind=concat``),
    "dropped": BoolTensor [B], "key": list[str], "meta": list[dict]

``sample_latents(moments, scale_factor, generator)`` turns moments into the diffusion model's z.

Stream order and resume guarantee
---------------------------------
The data never runs out (every rank always has a batch): shards are drawn epoch by epoch, each epoch a
permutation of all shards seeded by (seed, epoch), cut into *blocks* of ``shards_per_block`` shards. Block g
is a pure function of (seed, g): its shards are read interleaved (random pick weighted by what is left in
each), pass a shuffle buffer seeded by (seed, g), and get a caption-dropout mask seeded by (seed, g). Every
(rank, worker) pair is a stream s = rank * num_workers + worker of S = world_size * num_workers streams and
reads blocks base + s, base + s + S, base + s + 2S, ... The DataLoader hands out the workers' batches
round-robin, so after n batches on a rank worker w has produced exactly ceil((n - w) / num_workers).

``state_dict()`` is {"batches_yielded": n, "samples_yielded": n * batch_size (both counted since the stream
(re)started at "base_block"), "base_block", and the layout: "world_size", "num_workers", "batch_size", "seed",
"shards_per_block", "shuffle_buffer", "num_shards"}. It is the same on every rank (all ranks step together),
so rank 0's copy in the checkpoint is enough.

- Same layout: the batches after ``load_state_dict`` are exactly those an uninterrupted run would have
  produced next. Each worker jumps to its block with shard sizes from the manifest (no reading) and re-reads
  at most its current block to refill the shuffle buffer: O(1) in the position.
- Layout changed, same shards: the new streams start at the first block no old stream had begun, so no
  sample of the current pass is repeated; the unread rest of the blocks in flight (at most S blocks) is
  skipped.
- Other shards (a re-encoded data set): the stream starts afresh, and says so.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm_train.data.config import LatentDataConfig
from ldm_train.data.manifest import check_manifest, read_manifest, shard_list
from ldm_train.data.shard_reader import NpyDecoder, damaged_shard_message, iter_samples
from ldm_train.runtime import preemption

LATENT_EXT = "latent.npy"


@dataclass
class LabelSpec:
    """Class labels for ``cond.kind=class``: ``json[key]`` of each sample, in ``0..num_classes-1``; a dropped sample
    (the caption-dropout mask) gets ``null_label``."""

    key: str = "label"
    num_classes: int = 1000
    null_label: int | None = None


def label_fix_hint(key: str) -> str:
    return (f"cond.kind=class reads the class label from each sample's json ('{key}'): encode labelled images "
            "(data_prep.fashion_mnist shards, or ImageNet-style class folders <root>/<class>/<image>) with "
            f"data_prep.encode, set cond.label_key to the key your json uses, or train with cond.kind=text or none")


def sample_label(meta: dict[str, Any], spec: LabelSpec, url: str, key: str) -> int:
    """The class label of one sample, or a ValueError naming the shard, the sample and the fix."""
    value = meta.get(spec.key)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        got = "has no" if value is None else f"has {spec.key}={value!r}, not a class index, as"
        raise ValueError(f"shard {url}: sample {key} {got} '{spec.key}' in its json. {label_fix_hint(spec.key)}")
    if value >= spec.num_classes:
        raise ValueError(f"shard {url}: sample {key} has {spec.key}={value} but cond.num_classes={spec.num_classes}: "
                         f"set cond.num_classes to the number of classes of the data set (labels 0..N-1)")
    return value


def check_first_label(shards: list[tuple[str, int]], spec: LabelSpec) -> None:
    """Read the first sample of the first non-empty shard and check it carries a label (a fast start-up check; the
    loader checks every sample)."""
    for url, n in shards:
        if n:
            for sample in iter_samples(url):
                meta = json.loads(sample["json"]) if "json" in sample else {}
                sample_label(meta, spec, url, sample["__key__"].rsplit("/", 1)[-1])
                return


def downsample_u8(images: torch.Tensor, factor: int) -> np.ndarray:
    """[-1, 1] images [B, 3, H, W] -> uint8 [B, 3, H/factor, W/factor] (bicubic, antialiased): the low-resolution
    copy ``data_prep.encode lowres_factor`` stores and eval feeds a super-resolution model."""
    h, w = images.shape[-2] // factor, images.shape[-1] // factor
    small = torch.nn.functional.interpolate(images.float().cpu(), size=(h, w), mode="bicubic", align_corners=False,
                                            antialias=True)
    return ((small.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def lowres_fix_hint(key: str) -> str:
    return (f"cond.kind=concat reads each sample's low-resolution image ('{key}'): encode the images with "
            "data_prep.encode lowres_factor=N (N = the super-resolution factor, e.g. 4 as CompVis bsr_sr), "
            "or train with cond.kind=text, class or none")


def decode_lowres(data: bytes | None, url: str, key: str, member: str) -> np.ndarray:
    """One sample's low-resolution image as uint8 [3, h, w], or a ValueError naming the shard, sample and fix."""
    from PIL import Image

    if data is None:
        raise ValueError(f"shard {url}: sample {key} has no '{member}'. {lowres_fix_hint(member)}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy()
    except Exception as err:
        raise ValueError(f"shard {url}: sample {key} has an unreadable '{member}' ({err}): re-encode the shard "
                         "with data_prep.encode verify=true overwrite=true") from err


def first_lowres(shards: list[tuple[str, int]], member: str, n: int) -> tuple[list[torch.Tensor], list[str]]:
    """The low-resolution images ([3, h, w] in [-1, 1]) and keys of the first ``n`` samples, in shard order (the
    super-resolution inputs of the training sample grid)."""
    images: list[torch.Tensor] = []
    keys: list[str] = []
    for url, count in shards:
        if not count:
            continue
        for sample in iter_samples(url):
            key = sample["__key__"].rsplit("/", 1)[-1]
            images.append(torch.from_numpy(decode_lowres(sample.get(member), url, key, member)).float() / 127.5 - 1)
            keys.append(key)
            if len(images) == n:
                return images, keys
    return images, keys


def sample_latents(
    moments: torch.Tensor, scale_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = (mean + std * noise) * scale_factor from KL moments [B, 2z, h, w] (CompVis DiagonalGaussian)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scale_factor


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, *stream]))


class BlockPlan:
    """Which shards make block g, and how many samples it holds (no I/O)."""

    TAG_EPOCH, TAG_ORDER, TAG_DROP = 1, 2, 3

    def __init__(self, shards: list[tuple[str, int]], shards_per_block: int, seed: int) -> None:
        self.shards = shards
        self.k = max(1, min(shards_per_block, len(shards)))
        self.seed = seed
        self.blocks_per_epoch = math.ceil(len(shards) / self.k)
        self._perm: dict[int, np.ndarray] = {}

    def block_shards(self, g: int) -> list[int]:
        epoch, i = divmod(g, self.blocks_per_epoch)
        if epoch not in self._perm:
            self._perm = {epoch: _rng(self.seed, self.TAG_EPOCH, epoch).permutation(len(self.shards))}
        return [int(j) for j in self._perm[epoch][i * self.k : (i + 1) * self.k]]

    def block_size(self, g: int) -> int:
        return sum(self.shards[j][1] for j in self.block_shards(g))

    def locate(self, first_block: int, step: int, position: int) -> tuple[int, int]:
        """The block of the stream first_block, first_block + step, ... holding sample ``position``.

        Returns (block, offset in block); offset 0 means the block has not been started.
        """
        g = first_block
        while True:
            size = self.block_size(g)
            if position < size:
                return g, position
            position -= size
            g += step


class LatentShardDataset(IterableDataset):
    """The per-worker stream (see the module docstring); yields whole batches."""

    def __init__(
        self,
        shards: list[tuple[str, int]],
        batch_size: int,
        stored: str = "moments",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shards_per_block: int = 4,
        caption_dropout: float = 0.0,
        tokenize_fn: Callable[[list[str]], torch.Tensor] | None = None,
        base_block: int = 0,
        start_batches: int = 0,
        labels: LabelSpec | None = None,
        lowres_key: str | None = None,
        latent_shape: tuple[int, ...] | None = None,
        extra: Callable[[list[dict[str, Any]], list[bool]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.extra = extra  # cond.kind inpaint / semantic / layout: ldm_train.data.cond_inputs.CondInputs
        self.plan = BlockPlan(shards, shards_per_block, seed)
        self.latent_shape = tuple(latent_shape) if latent_shape else None  # the manifest's; None: unchecked
        self.lowres_key = lowres_key
        self.batch_size = batch_size
        self.latent_key = "moments" if stored == "moments" else "latents"
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.caption_dropout = caption_dropout
        self.tokenize_fn = tokenize_fn
        self.base_block = base_block
        self.start_batches = start_batches
        self.labels = labels
        if labels is not None and labels.null_label is None and caption_dropout > 0:
            raise ValueError(f"label dropout {caption_dropout} needs a null class: set cond.null_class=true, "
                             "or train.caption_dropout=0")
        self._decode = NpyDecoder()

    # ---- one block: interleave its shards, shuffle, drop captions --------------------------------------
    def _block_samples(self, g: int, skip: int) -> Iterator[dict[str, Any]]:
        shard_ids = self.plan.block_shards(g)
        sizes = [self.plan.shards[j][1] for j in shard_ids]
        readers = [iter_samples(self.plan.shards[j][0]) for j in shard_ids]
        order_rng = _rng(self.seed, BlockPlan.TAG_ORDER, g)
        # a uniformly random interleaving of the shards (which shard the next sample comes from)
        interleave = order_rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
        drop = _rng(self.seed, BlockPlan.TAG_DROP, g).random(len(interleave)) < self.caption_dropout
        buffer: list[dict[str, Any]] = []
        out = 0

        def emit(sample: dict[str, Any]) -> dict[str, Any] | None:
            nonlocal out
            i, out = out, out + 1
            if i < skip:
                return None  # already consumed before the resume: not even decoded
            sample["__dropped__"] = bool(drop[i])
            return sample

        for r in interleave:
            sample = next(readers[r], None)
            if sample is None:
                url, n = self.plan.shards[shard_ids[r]]
                raise RuntimeError(damaged_shard_message(url, f"fewer samples than its manifest entry ({n})"))
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                j = int(order_rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                if (s := emit(buffer.pop())) is not None:
                    yield s
        order_rng.shuffle(buffer)
        for sample in buffer:
            if (s := emit(sample)) is not None:
                yield s

    # ---- decode + collate ------------------------------------------------------------------------------
    def _latent(self, sample: dict[str, Any]) -> np.ndarray:
        """One sample's ``latent.npy``: float16 / float32 of the manifest's shape, or an error naming the shard and
        the sample key (``.float()`` would turn an integer or float64 array into plausible-looking numbers)."""
        url, key = sample.get("__url__", "?"), sample["__key__"]
        blob = sample.get(LATENT_EXT)
        if blob is None:
            raise ValueError(damaged_shard_message(url, f"sample {key} has no {LATENT_EXT}"))
        try:  # never unpickles: an object array is refused here
            array = self._decode(blob)
        except (ValueError, EOFError, OSError) as e:  # not .npy, cut short, an object array
            raise ValueError(damaged_shard_message(url, f"sample {key}: {LATENT_EXT} does not decode ({e})")) from None
        if array.dtype not in (np.float16, np.float32):
            raise ValueError(damaged_shard_message(url, f"sample {key}: {LATENT_EXT} is {array.dtype}, expected "
                                                        "float16 (what data_prep.encode writes) or float32"))
        if self.latent_shape is not None and array.shape != self.latent_shape:
            raise ValueError(damaged_shard_message(url, f"sample {key}: {LATENT_EXT} has shape {list(array.shape)} "
                                                        f"but the manifest's latent_shape is {list(self.latent_shape)}"))
        return array

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        arrays = [self._latent(s) for s in samples]
        captions = [
            "" if s["__dropped__"] else (s["txt"].decode("utf-8") if "txt" in s else "") for s in samples
        ]
        batch: dict[str, Any] = {
            self.latent_key: torch.from_numpy(np.stack(arrays)).float(),
            "caption": captions,
            "dropped": torch.tensor([s["__dropped__"] for s in samples]),
            "key": [s["__key__"].rsplit("/", 1)[-1] for s in samples],
            "meta": [json.loads(s["json"]) if "json" in s else {} for s in samples],
        }
        if self.tokenize_fn is not None:
            batch["tokens"] = self.tokenize_fn(captions)
        if self.labels is not None:
            spec = self.labels
            labels = [sample_label(meta, spec, s.get("__url__", "?"), key)
                      for s, meta, key in zip(samples, batch["meta"], batch["key"], strict=True)]
            batch["label"] = torch.tensor([spec.null_label if s["__dropped__"] else lab
                                           for s, lab in zip(samples, labels, strict=True)], dtype=torch.long)
        if self.lowres_key is not None:
            member = self.lowres_key
            images = [decode_lowres(s.get(member), s.get("__url__", "?"), key, member)
                      for s, key in zip(samples, batch["key"], strict=True)]
            sizes = {im.shape for im in images}
            if len(sizes) > 1:
                raise ValueError(f"the low-resolution images of one batch differ in size ({sorted(sizes)}): "
                                 "re-encode the data set with one resolution and lowres_factor")
            batch["lowres"] = torch.from_numpy(np.stack(images)).float() / 127.5 - 1
        if self.extra is not None:
            batch.update(self.extra(samples, [s["__dropped__"] for s in samples]))
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(1, self.num_workers)
        # A fresh DataLoader asks worker 0 first, but after n batches the uninterrupted run would ask worker
        # n % workers next: loader worker i plays the stream of worker (i + n) % workers.
        worker = ((info.id if info is not None else 0) + self.start_batches) % workers
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer thread per worker process
        stream = self.rank * workers + worker
        step = self.world_size * workers
        done_batches = max(0, -(-(self.start_batches - worker) // workers))  # ceil, batches this worker made
        g, skip = self.plan.locate(self.base_block + stream, step, done_batches * self.batch_size)
        pending: list[dict[str, Any]] = []
        while True:
            for sample in self._block_samples(g, skip):
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield self._collate(pending)
                    pending = []
            g, skip = g + step, 0


def next_unstarted_block(state: dict[str, Any], plan: BlockPlan) -> int:
    """First block index that no stream of the saved topology had started (resume at another topology)."""
    workers = max(1, int(state["num_workers"]))
    streams = int(state["world_size"]) * workers
    n, batch = int(state["batches_yielded"]), int(state["batch_size"])
    last = int(state.get("base_block", 0)) - 1
    for s in range(streams):
        worker = s % workers
        done = max(0, -(-(n - worker) // workers))
        g, offset = plan.locate(int(state.get("base_block", 0)) + s, streams, done * batch)
        last = max(last, g if offset > 0 else g - streams)
    return last + 1


class LatentLoader:
    """The training-side iterator: a DataLoader over ``LatentShardDataset`` that counts what it handed out.

    Iterating yields batches forever; every ``iter()`` continues from the current position (so a
    ``load_state_dict`` before the first ``iter()`` resumes).
    """

    def __init__(
        self,
        cfg: LatentDataConfig,
        shards: list[tuple[str, int]],
        stored: str = "moments",
        tokenize_fn: Callable[[list[str]], torch.Tensor] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        manifest: dict[str, Any] | None = None,
        labels: LabelSpec | None = None,
        lowres_key: str | None = None,
        extra: Callable[[list[dict[str, Any]], list[bool]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        from ldm_train.runtime.distributed import get_rank, get_world_size

        if sum(n for _, n in shards) == 0:
            raise ValueError(f"the shards under {cfg.shards} hold no samples: check the encode job's manifest")
        self.cfg = cfg
        self.shards = shards
        self.stored = stored
        self.tokenize_fn = tokenize_fn
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.manifest = manifest
        self.labels = labels
        self.lowres_key, self.extra = lowres_key, extra
        self.batches_yielded = 0
        self.base_block = 0

    @property
    def scale_factor(self) -> float:
        """The config's override, else the manifest's 1/std (1.0 with neither, and said so at start-up)."""
        if self.cfg.scale_factor is not None:
            return float(self.cfg.scale_factor)
        if self.manifest is not None and self.manifest.get("scale_factor") is not None:
            return float(self.manifest["scale_factor"])
        return 1.0

    def _dataset(self) -> LatentShardDataset:
        return LatentShardDataset(
            self.shards,
            batch_size=self.cfg.batch_size,
            stored=self.stored,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.cfg.num_workers,
            seed=self.cfg.seed,
            shuffle_buffer=self.cfg.shuffle_buffer,
            shards_per_block=self.cfg.shards_per_block,
            caption_dropout=self.cfg.caption_dropout,
            tokenize_fn=self.tokenize_fn,
            base_block=self.base_block,
            start_batches=self.batches_yielded,
            labels=self.labels,
            lowres_key=self.lowres_key,
            latent_shape=tuple((self.manifest or {}).get("latent_shape") or ()) or None,
            extra=self.extra,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.cfg.num_workers
        loader = DataLoader(
            self._dataset(),
            batch_size=None,  # the dataset yields whole batches (tokenized in the workers)
            num_workers=workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            persistent_workers=False,
            in_order=True,  # round-robin over workers: the resume arithmetic depends on it
            worker_init_fn=preemption.ignore_in_worker,  # a SIGTERM to the job is the main process's to handle
        )
        with preemption.held():
            batches = iter(loader)  # the workers start here
        for batch in batches:
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The stream position (identical on every rank; see the module docstring)."""
        return {
            "batches_yielded": self.batches_yielded,
            "samples_yielded": self.batches_yielded * self.cfg.batch_size,
            "base_block": self.base_block,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed,
            "shards_per_block": self.cfg.shards_per_block,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "num_shards": len(self.shards),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off: exactly, or past every block begun (see the module docstring)."""
        mine = self.state_dict()
        layout = ("world_size", "num_workers", "batch_size", "seed", "shards_per_block", "shuffle_buffer")
        if all(int(state.get(k, mine[k])) == mine[k] for k in (*layout, "num_shards")):
            self.batches_yielded = int(state["batches_yielded"])
            self.base_block = int(state.get("base_block", 0))
        elif int(state.get("num_shards", len(self.shards))) == len(self.shards):
            # another topology: start every new stream after the blocks the old ones had begun
            plan = BlockPlan(self.shards, int(state.get("shards_per_block", self.cfg.shards_per_block)),
                             int(state["seed"]))
            self.base_block = next_unstarted_block(state, plan)
            self.batches_yielded = 0
        else:
            # other shards: the old block numbers mean nothing here, start the new data set from its beginning
            print(f"[data] the checkpoint's stream ran over {state['num_shards']} shards, the manifest lists "
                  f"{len(self.shards)}: starting the stream afresh", flush=True)
            self.base_block, self.batches_yielded = 0, 0


def build_latent_loader(
    cfg: LatentDataConfig | Any,
    first_stage_cfg: Any,
    unet_cfg: Any | None = None,
    tokenize_fn: Callable[[list[str]], torch.Tensor] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    labels: LabelSpec | None = None,
    lowres_key: str | None = None,
    extra: Callable[[list[dict[str, Any]], list[bool]], dict[str, torch.Tensor]] | None = None,
) -> LatentLoader:
    """Read and check the manifest of ``cfg.shards`` against the model config, then build the loader.

    ``cfg`` may be a LatentDataConfig or the ``data`` DictConfig node. ``tokenize_fn(captions) -> LongTensor``
    runs in the loader workers: ``ldm_train.data.tokenizer.BatchTokenizer(tokenizer, max_len)`` (fastest), or
    ``functools.partial(tokenize, tokenizer, max_len=77)`` with ``ldm_train.data.tokenizer.tokenize``.
    ``labels`` adds each batch's class labels (``cond.kind=class``); the first shard's first sample is checked
    for one here, so data without labels fails at start-up. ``lowres_key`` adds each batch's low-resolution
    images (``cond.kind=concat``), checked the same way. ``extra(samples, dropped)`` adds what the other kinds read
    (``ldm_train.data.cond_inputs``).
    """
    if not isinstance(cfg, LatentDataConfig):
        from ldm_train.config import to_dataclass

        cfg = to_dataclass(cfg, LatentDataConfig)
    manifest = read_manifest(cfg.manifest or cfg.shards)
    from ldm_train.runtime.distributed import get_rank

    # hashing the first-stage checkpoint once is enough: rank 0 fails the job for everyone
    on_main = (get_rank() if rank is None else rank) == 0
    check_manifest(manifest, first_stage_cfg, unet_cfg, resolution=cfg.resolution, verify_checkpoint=on_main)
    shards = shard_list(manifest, base_url=None if cfg.manifest else cfg.shards)
    if labels is not None:
        check_first_label(shards, labels)
    if lowres_key is not None:
        if not first_lowres(shards, lowres_key, 1)[0]:  # decodes the first one: a missing member fails here
            raise ValueError("no shard holds a sample")
    return LatentLoader(
        cfg, shards, stored=manifest["stored"], tokenize_fn=tokenize_fn, rank=rank, world_size=world_size,
        manifest=manifest, labels=labels, lowres_key=lowres_key, extra=extra,
    )
