"""torchrun worker of test_ema.py: ZeRO-3 (2 gloo ranks) EMA vs the EMA of a plain model on the same data.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 ema_zero3_worker.py RESULT.json
Rank 0 writes the largest differences to RESULT.json.
"""
from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from ldm_train.ema import EMA

STEPS, MICRO, DECAY = 12, 4, 0.9


def build() -> nn.Module:
    torch.manual_seed(0)
    # odd sizes: 7*5 = 35 weights do not split evenly, so partitions carry padding
    return nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3), nn.Linear(3, 11))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO, 7, generator=g), torch.randn(MICRO, 11, generator=g)


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        # threshold 0: even tiny parameters are partitioned (the default keeps small ones whole)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_model_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config
    )
    ema_master = EMA(engine.module, decay=DECAY)  # averages the optimizer's fp32 partitions
    ema_ds = EMA(engine.module, decay=DECAY, fp32_master=False)  # averages param.ds_tensor

    ref_model = build()  # the same run without ZeRO: the global batch is both ranks' micro-batches
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    ref_ema = EMA(ref_model, decay=DECAY)
    for step in range(STEPS):
        x, y = batch(step, rank)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()
        ema_master.update(engine.module)
        ema_ds.update(engine.module)
        xs, ys = zip(*(batch(step, r) for r in range(world)), strict=True)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref_model(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
        ref_ema.update(ref_model)

    ref = ref_ema.gathered_state_dict()
    diffs = []
    for ema in (ema_master, ema_ds):
        full = ema.gathered_state_dict()
        diffs += [(full[n] - ref[n]).abs().max().item() for n in ref]
    # copy_to writes each rank's partition; gathering the model's parameters must give the EMA
    ema_master.copy_to(engine.module)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        copy_diffs = [(p.detach() - ref[n]).abs().max().item() for n, p in engine.module.named_parameters()]
    # a full (gathered) state dict reloads into partitions: the world-size-independent resume path
    fresh = EMA(engine.module, decay=0.5)
    fresh.load_state_dict(ema_master.gathered_state_dict(with_meta=True))
    reload_diffs = [(fresh.shadow[n] - ema_master.shadow[n]).abs().max().item() for n in ref]
    assert fresh.num_updates == STEPS
    if rank == 0:
        with open(out, "w") as f:
            json.dump({
                "partitioned_params": len(ema_master.partitions),
                "max_abs_diff_gathered": max(diffs),
                "max_abs_diff_copy_to": max(copy_diffs),
                "max_abs_diff_reload": max(reload_diffs),
                "ema_moved": max((ref[n] - init[n]).abs().max().item() for n in ref),
                "partition_sizes": {n: [p.size, p.numel] for n, p in ema_master.partitions.items()},
            }, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
