"""Latent-shard loader: WebDataset tars of precomputed first-stage latents -> training batches.

Batches (one per micro-step, per rank) are dicts::

    {"moments": float32 [B, 2z, h, w]}   (KL first stage: mean then logvar)  or  {"latents": [B, z, h, w]} (VQ),
    "tokens": LongTensor [B, L] (when a tokenizer is given), "caption": list[str] (after dropout: "" = uncond),
    "label": LongTensor [B] (with ``LabelSpec``: the json's label, the null class where dropped),
    "lowres": float32 [B, 3, h, w] in [-1, 1] (with ``lowres_key``: each sample's low-resolution image,
    ``cond.kind=concat``),
    "dropped": BoolTensor [B], "key": list[str], "meta": list[dict]

``sample_latents(moments, scale_factor, generator)`` turns moments into the diffusion model's z.
Labels and low-resolution images are read by ``latent_conds.py``; the block order below is ``block_plan.py``'s.

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

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm_train.data.block_plan import BlockPlan, next_unstarted_block, seeded_rng
from ldm_train.data.config import LatentDataConfig
from ldm_train.data.latent_conds import (
    LabelSpec,
    check_first_label,
    decode_lowres,
    first_lowres,
    sample_label,
)
from ldm_train.data.manifest import check_manifest, read_manifest, shard_list
from ldm_train.data.shard_reader import NpyDecoder, damaged_shard_message, iter_samples
from ldm_train.runtime import preemption

LATENT_EXT = "latent.npy"



def sample_latents(
    moments: torch.Tensor, scale_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = (mean + std * noise) * scale_factor from KL moments [B, 2z, h, w] (CompVis DiagonalGaussian)."""
    from ldm_train.models.autoencoder import DiagonalGaussian

    return DiagonalGaussian(moments.float()).sample(generator) * scale_factor


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
        order_rng = seeded_rng(self.seed, BlockPlan.TAG_ORDER, g)
        # a uniformly random interleaving of the shards (which shard the next sample comes from)
        interleave = order_rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
        drop = seeded_rng(self.seed, BlockPlan.TAG_DROP, g).random(len(interleave)) < self.caption_dropout
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
