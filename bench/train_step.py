"""Benchmark: one UNet training step (forward + backward), ours vs diffusers' UNet2DConditionModel.

Both models have the identical architecture and the SAME weights (ours is exported in the CompVis layout
and converted with diffusers' own ``convert_ldm_unet_checkpoint``), and the outputs are checked to agree
before timing. Prints one JSON object.

- time: median (and min / max) seconds of the trainer's micro-step, ``training_loss(ldm, x, ctx, t, noise)``
  (``ldm_train/diffusion/step.py``: q_sample, the UNet, the eps MSE) and its backward, over --iters steps after
  --warmup, with each UNet inside a ``LatentDiffusion`` whose cond stage is the identity on a precomputed context;
  ours and theirs interleaved step by step so machine load hits both alike.
- memory: peak bytes allocated during one step beyond what existed before it (activations, gradients,
  temporaries; the parameters excluded). On CPU from ``torch.profiler`` memory events (profile_memory=True:
  every c10 CPU-allocator alloc/free, summed in time order); on CUDA ``torch.cuda.max_memory_allocated``.

- variants of ours (``--ours-variants compile,channels_last``): ``compile`` is ``train.compile``
  (``nn.Module.compile`` in place), ``channels_last`` runs ours alone in channels_last; each a copy with the same
  weights, timed in the same interleaving, its loss and parameter gradients compared with eager ours's.
- ``--adamw``: one AdamW step over our parameters (and these gradients) with torch's three CPU/GPU
  implementations (for-loop, foreach, fused), interleaved; the updated parameters compared with the for-loop's.

Usage: ``python bench/train_step.py [--batch 2] [--size 16] [--model-channels 64] [--iters 10]``
       ``[--device cpu|cuda] [--bf16] [--channels-last] [--checkpointing] [--ours-variants compile] [--adamw]``
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ldm_train.checkpoints.compvis import compvis_state_dict
from ldm_train.config import UNetConfig
from ldm_train.diffusion.schedule import make_schedule
from ldm_train.diffusion.step import training_loss
from ldm_train.models.ldm import LatentDiffusion
from ldm_train.models.unet import UNetModel


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DConditionModel called as ours is (``unet(x, t, context=...)``), for ``LatentDiffusion``."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample


def build_pair(cfg: UNetConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    ours = UNetModel(cfg)
    with torch.no_grad():  # non-zero everywhere (fresh UNets have zero output convs)
        for p in ours.parameters():
            p.normal_(0, 0.05)
    levels = len(cfg.channel_mult)
    attn = [2**i in cfg.attention_resolutions for i in range(levels)]
    config = {
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks, "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": cfg.num_heads,  # diffusers' name for the number of heads in LDM/SD 1.x configs
        "transformer_layers_per_block": cfg.transformer_depth,
    }
    ckpt = compvis_state_dict(unet=ours.state_dict())
    theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    if cfg.use_checkpoint:
        theirs.enable_gradient_checkpointing()
    return ours, theirs


def peak_cpu_bytes(step: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def agreement(name: str, models: dict[str, torch.nn.Module], loss: Callable[[str], torch.Tensor],
              step: Callable[[str], None]) -> dict[str, float]:
    """Max abs differences of a variant of ours against eager ours: the loss, and the gradients of one step."""
    with torch.no_grad():
        out = (loss(name) - loss("ours")).abs().item()
    step(name)
    step("ours")
    grads = dict(models["ours"].named_parameters())
    diff = max((p.grad - grads[n].grad).abs().max().item() for n, p in models[name].named_parameters())
    scale = max(p.grad.abs().max().item() for p in grads.values())
    return {"loss_abs_diff": out, "grad_max_abs_diff": diff, "grad_scale": scale}


def adamw_steps(model: torch.nn.Module, iters: int) -> dict[str, dict[str, float]]:
    """Median seconds of one AdamW step over ``model``'s parameters (gradients as they are) per implementation,
    interleaved; each on its own copy of the parameters, compared after ``iters`` steps with the for-loop's."""
    params = [p for p in model.parameters() if p.grad is not None]
    kinds = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    copies, optims = {}, {}
    for kind, flag in kinds.items():
        copies[kind] = [p.detach().clone().requires_grad_(True) for p in params]
        for c, p in zip(copies[kind], params, strict=True):
            c.grad = p.grad.clone()
        optims[kind] = torch.optim.AdamW(copies[kind], lr=1e-4, weight_decay=0.01, **flag)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(iters):
        for kind, opt in optims.items():
            t0 = time.perf_counter()
            opt.step()
            times[kind].append(time.perf_counter() - t0)
    return {kind: {"median_s": statistics.median(times[kind]),
                   "param_max_abs_diff_to_for_loop": max((a - b).abs().max().item() for a, b in
                                                         zip(copies[kind], copies["for_loop"], strict=True))}
            for kind in kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=16, help="latent side")
    ap.add_argument("--model-channels", type=int, default=64)
    ap.add_argument("--channel-mult", type=str, default="1,2,2")
    ap.add_argument("--attention-resolutions", type=str, default="1,2")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--context-dim", type=int, default=256)
    ap.add_argument("--context-len", type=int, default=77)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--ours-variants", default="", help="comma list of compile, channels_last (timed besides ours)")
    ap.add_argument("--adamw", action="store_true", help="also time AdamW for-loop / foreach / fused steps")
    # 1 by default: on a shared CPU machine two OpenMP threads fighting other jobs for the cores turn a
    # 1 s step into 30 s of spinning, and the comparison into noise
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = UNetConfig(
        image_size=args.size, in_channels=4, out_channels=4, model_channels=args.model_channels,
        channel_mult=[int(c) for c in args.channel_mult.split(",")],
        attention_resolutions=[int(a) for a in args.attention_resolutions.split(",")],
        num_res_blocks=2, num_heads=args.heads, context_dim=args.context_dim, use_checkpoint=args.checkpointing,
    )
    device = torch.device(args.device)
    ours, theirs = build_pair(cfg)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    ours, theirs = (m.to(device, memory_format=fmt).train() for m in (ours, theirs))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=gen).to(device, memory_format=fmt)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    ctx = torch.randn(args.batch, args.context_len, args.context_dim, generator=gen).to(device)
    noise = torch.randn(x.shape, generator=gen).to(device, memory_format=fmt)

    with torch.no_grad():
        diff = (ours(x, t, ctx) - theirs(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"outputs differ by {diff}: the two models are not the same function")

    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012).to(device)  # the paper's
    # the cond stage is the identity: both UNets take the same precomputed context
    ldms = {"ours": LatentDiffusion(ours, torch.nn.Identity(), schedule),
            "diffusers": LatentDiffusion(DiffusersUNet(theirs), torch.nn.Identity(), schedule)}
    models = {"ours": ours, "diffusers": theirs}
    inputs = {"ours": (x, noise), "diffusers": (x, noise)}
    for variant in filter(None, args.ours_variants.split(",")):
        name, model, inputs[name] = f"ours_{variant}", copy.deepcopy(ours), (x, noise)
        if variant == "compile":
            model.compile()  # what train.compile does (ldm_train/models/ldm.py compile_in_place)
        elif variant == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            inputs[name] = tuple(v.contiguous(memory_format=torch.channels_last) for v in (x, noise))
        else:
            raise SystemExit(f"--ours-variants: unknown {variant!r}; use compile, channels_last")
        ldms[name], models[name] = LatentDiffusion(model, torch.nn.Identity(), schedule), model

    def loss(name: str) -> torch.Tensor:
        with amp:
            return training_loss(ldms[name], inputs[name][0], ctx, t, inputs[name][1])

    def step(name: str) -> None:
        models[name].zero_grad(set_to_none=True)
        loss(name).backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {n: [] for n in ldms}
    cpu_times: dict[str, list[float]] = {n: [] for n in ldms}
    for i in range(args.warmup + args.iters):
        for name in ldms:  # interleaved
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)

    variant_diffs = {name: agreement(name, models, loss, step) for name in ldms if name.startswith("ours_")}
    peak: dict[str, int] = {}
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(name)
            sync()
            peak[name] = torch.cuda.max_memory_allocated() - base
        else:
            peak[name] = peak_cpu_bytes(lambda n=name: step(n))

    result = {
        "bench": "unet_train_step",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "config": {**{k: getattr(cfg, k) for k in ("model_channels", "channel_mult", "attention_resolutions",
                                                    "num_res_blocks", "num_heads", "context_dim", "use_checkpoint")},
                   "batch": args.batch, "latent": [4, args.size, args.size], "context_len": args.context_len,
                   "bf16_autocast": args.bf16, "channels_last": args.channels_last},
        "params": sum(p.numel() for p in ours.parameters()),
        "output_max_abs_diff": diff,
        "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda"
        else "torch.profiler profile_memory: peak of summed CPU allocator events during one step",
        "iters": args.iters,
    }
    for name in ldms:
        result[name] = {
            "median_s": statistics.median(times[name]), "min_s": min(times[name]), "max_s": max(times[name]),
            # CPU seconds of this process (all intra-op threads): less sensitive than wall time to other
            # processes competing for the cores
            "median_cpu_s": statistics.median(cpu_times[name]),
            "peak_mem_mib": peak[name] / 2**20,
        }
    result["cpu_time_ratio_ours_over_diffusers"] = result["ours"]["median_cpu_s"] / result["diffusers"]["median_cpu_s"]
    result["time_ratio_ours_over_diffusers"] = result["ours"]["median_s"] / result["diffusers"]["median_s"]
    result["mem_ratio_ours_over_diffusers"] = peak["ours"] / max(peak["diffusers"], 1)
    for name, diffs in variant_diffs.items():
        result[name].update(diffs, time_ratio_over_diffusers=result[name]["median_s"] / result["diffusers"]["median_s"],
                            cpu_time_ratio_over_diffusers=result[name]["median_cpu_s"]
                            / result["diffusers"]["median_cpu_s"])
    if args.adamw:
        step("ours")
        result["adamw"] = adamw_steps(ours, args.iters)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
