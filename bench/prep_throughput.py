"""Throughput of the encode job (data_prep.encode) end to end; prints one JSON object.

    python bench/prep_throughput.py [--num-samples 512 --resolution 64 --batch-size 32 --num-workers 2
                                     --first-stage tiny_kl_f4 --device auto --shard-size 64 --workdir /tmp/prep_bench]

Writes the synthetic dataset, encodes it with a randomly initialised first stage (throughput does not depend
on the weights) and reports images/s end to end (process start of the job to the last shard, manifest
included), the share of the loop the encoder spent waiting for decoded batches (goal < 10% once the encoder is
the slower part), and the two halves alone: decode+resize images/s of the input pipeline in one process, and
first-stage images/s on random input.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def _cfg(overrides: list[str]):
    from data_prep.config import EncodeConfig
    from ldm_train.app import compose

    return compose("encode", EncodeConfig, overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-samples", type=int, default=512, help="synthetic images written and encoded")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="images per first-stage forward")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding the images")
    p.add_argument("--first-stage", default="tiny_kl_f4", help="first_stage preset (random weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--shard-size", type=int, default=64, help="images per input tar")
    p.add_argument("--workdir", default="/tmp/prep_bench", help="emptied, then holds the raw tars and the latents")
    a = p.parse_args()
    from data_prep.encode_job import run_encode
    from data_prep.encoding import ShardBatches, device_and_autocast, encode_batch, load_encoder
    from data_prep.synthetic import write_synthetic
    from ldm_train.data.input_shards import list_input_shards
    from ldm_train.data.readers import Filters

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    write_synthetic(str(work / "raw"), a.num_samples, a.resolution, a.shard_size)
    cfg = _cfg([f"input={work / 'raw'}", f"output={work / 'latents'}", f"resolution={a.resolution}",
                f"batch_size={a.batch_size}", f"num_workers={a.num_workers}",
                f"first_stage={a.first_stage}", f"device={a.device}", "allow_random_first_stage=true",
                "progress=false"])

    res = run_encode(cfg)

    # the halves alone: input pipeline (decode + resize + batch) in this process, then the first stage
    shards = list_input_shards(str(work / "raw"))
    t = time.perf_counter()
    n = sum(len(b["keys"]) for b in ShardBatches(shards, a.resolution, Filters(), "", a.batch_size)
            if b["kind"] == "batch")
    decode_ips = n / (time.perf_counter() - t)
    fs_cfg = cfg.first_stage
    device, autocast = device_and_autocast(cfg.device, cfg.precision)
    model = load_encoder(fs_cfg, True).to(device)
    x = torch.randn(a.batch_size, 3, a.resolution, a.resolution, device=device)
    g = torch.Generator().manual_seed(0)
    encode_batch(model, x, fs_cfg.kind, autocast, g)  # warm-up
    reps = max(1, 128 // a.batch_size)
    t = time.perf_counter()
    for _ in range(reps):
        encode_batch(model, x, fs_cfg.kind, autocast, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    encoder_ips = reps * x.shape[0] / (time.perf_counter() - t)

    print(json.dumps({
        "device": str(device), "torch_threads": torch.get_num_threads(), **{k: getattr(a, k) for k in
        ("num_samples", "resolution", "batch_size", "num_workers", "first_stage")},
        "images_per_s_end_to_end": round(res.num_samples / res.wall_s, 2),
        "encoder_wait_share": round(res.wait_s / max(res.wait_s + res.encode_s, 1e-9), 4),
        "decode_images_per_s_one_process": round(decode_ips, 1),
        "encoder_images_per_s": round(encoder_ips, 1),
        "wall_s": round(res.wall_s, 2), "samples": res.num_samples, "skipped": res.skipped,
    }))


if __name__ == "__main__":
    main()
