"""Latent loader throughput: shards -> tokenized batches, in samples/s. Prints one JSON object.

    python bench/loader.py                                 # synthetic kl-f8 256 px shards, 1 in-process stream
    python bench/loader.py --num-workers 2 --samples 20000
    python bench/loader.py --shards data/latents/kl_f8 --tokenizer path/to/bert-vocab-dir

``num_workers=0`` reads, decodes, shuffles, collates and tokenizes in this one process, so samples/s there is
the per-core throughput of one loader worker. Writing the synthetic shards and training the tokenizer are not
timed; the first ``--warmup`` batches (worker start-up, first shard opens) are not either.
"""
from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]


def write_shards(out: Path, num_samples: int, per_shard: int, shape: tuple[int, int, int]) -> None:
    """KL-style moments shards + manifest.json following DESIGN.md "Latent shards"."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    latent = rng.standard_normal(shape).astype(np.float16)
    shards = []
    for s, start in enumerate(range(0, num_samples, per_shard)):
        n = min(per_shard, num_samples - start)
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(start, start + n):
                buf = io.BytesIO()
                np.save(buf, latent)
                caption = (f"a {COLOURS[i % 8]} {SHAPES[i % 5]} above a {COLOURS[(i // 8) % 8]} "
                           f"{SHAPES[(i // 5) % 5]} on a plain background")
                sink.write({"__key__": f"{i:09d}", "latent.npy": buf.getvalue(), "txt": caption,
                            "json": json.dumps({"source_key": str(i), "original_size": [512, 512]})})
        shards.append({"name": name, "num_samples": n})
    z = shape[0] // 2
    manifest = {
        "schema_version": 1,
        "first_stage": {"name": "bench", "kind": "kl", "downsample_factor": 8, "z_channels": z,
                        "checkpoint": None, "sha256": None},
        "resolution": shape[1] * 8, "latent_shape": list(shape), "stored": "moments",
        "num_samples": num_samples, "num_shards": len(shards), "shards": shards,
        "mean": [0.0] * z, "std": [1.0] * z, "scale_factor": 1.0, "skipped": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="existing shard folder (manifest.json inside); default: write synthetic ones")
    p.add_argument("--samples", type=int, default=12000, help="synthetic samples to write")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--latent-shape", type=int, nargs=3, default=[8, 32, 32], help="stored moments [2z, h, w]")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--tokenizer", help="tokenizer dir; default: a WordPiece trained on the captions")
    p.add_argument("--max-len", type=int, default=77)
    p.add_argument("--no-tokenize", action="store_true")
    p.add_argument("--tokenize-with", choices=["batch", "transformers"], default="batch",
                   help="tokenizer.BatchTokenizer (Rust backend) or tokenizer.tokenize (transformers call)")
    p.add_argument("--warmup", type=int, default=5, help="batches not timed")
    p.add_argument("--batches", type=int, default=150, help="batches timed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core per loader stream, as in training
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as in the loader workers: no extra tokenizer threads

    from ldm_train.data.latents import LatentDataConfig, LatentLoader
    from ldm_train.data.manifest import read_manifest, shard_list
    from ldm_train.data.tokenizer import BatchTokenizer, load_tokenizer, tokenize, train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards_dir = Path(args.shards) if args.shards else Path(tmp) / "shards"
        if not args.shards:
            write_shards(shards_dir, args.samples, args.per_shard, tuple(args.latent_shape))
        manifest = read_manifest(str(shards_dir))
        shards = shard_list(manifest)
        tokenize_fn = None
        if not args.no_tokenize:
            if args.tokenizer:
                tok = load_tokenizer(args.tokenizer, args.max_len)
            else:
                corpus = [f"a {c} {s} above a {c2} {s2} on a plain background"
                          for c in COLOURS for s in SHAPES for c2 in COLOURS for s2 in SHAPES]
                tok = train_tokenizer(corpus, 1000, str(Path(tmp) / "tok"), args.max_len)
            if args.tokenize_with == "batch":
                tokenize_fn = BatchTokenizer(tok, args.max_len)
            else:
                tokenize_fn = functools.partial(tokenize, tok, max_len=args.max_len)
        cfg = LatentDataConfig(shards=str(shards_dir), batch_size=args.batch_size, num_workers=args.num_workers,
                               shuffle_buffer=args.shuffle_buffer, caption_dropout=args.caption_dropout,
                               pin_memory=False)
        loader = LatentLoader(cfg, shards, stored=manifest["stored"], tokenize_fn=tokenize_fn, rank=0,
                              world_size=1, manifest=manifest)
        it = iter(loader)
        for _ in itertools.islice(it, args.warmup):
            pass
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for batch in itertools.islice(it, args.batches):
            n += len(batch["key"])
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        del it  # stops the workers
    rate = n / elapsed
    result = {
        "bench": "latent_loader",
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_worker": round(rate / max(args.num_workers, 1), 1),
        # CPU seconds of this process: the per-core rate even on a shared, oversubscribed machine (the loading
        # happens in this process only with num_workers=0)
        "samples_per_cpu_s": round(n / cpu, 1) if args.num_workers == 0 else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "num_workers": args.num_workers,
        "samples_timed": n,
        "seconds": round(elapsed, 3),
        "batch_size": args.batch_size,
        "latent_shape": list(manifest["latent_shape"]),
        "tokenized": None if tokenize_fn is None else args.tokenize_with,
        "max_len": args.max_len,
        "shuffle_buffer": args.shuffle_buffer,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
