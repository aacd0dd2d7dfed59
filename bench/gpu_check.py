"""One-shot throughput check of the LDM training step on the device present; prints and writes one JSON object.

    python bench/gpu_check.py [--experiment txt2img_1p45b] [--micro-batch N] [--steps 20] [--compile] [--out F]
    python bench/gpu_check.py --dry-run            # experiment=tiny on CPU, 3 steps: keeps the script from rotting

It builds the experiment's real model (``ldm_train.build.build_ldm``: UNet + cond stage, the preset's activation
checkpointing), and times full training steps (``ldm_train.diffusion.step.training_loss``, backward, fused AdamW step) on random
latents / tokens at the preset's planned micro-batch (``train.micro_batch``; ``--micro-batch`` to change it), bf16
autocast on CUDA, without DeepSpeed (one device). ``--compile`` also times the step as ``train.compile`` runs it
(``LatentDiffusion.compile_in_place``: the UNet and the text encoder). The JSON is written after each run, so a
timeout or an out-of-memory error (recorded as the run's ``error``) keeps what was measured before it. Reported:
samples/s on this device, model TFLOP/s from ``ldm_train.flops`` (forward + backward of everything trained, no
recomputation), MFU against the device's dense bf16 peak (``ldm_train/runtime/devices.py``), peak memory, and the
same with ``torch.compile`` when ``--compile`` is given, and ``planner``: ``ldm_train.plan``'s estimate of the same run
(memory, samples/s, MFU) to compare with the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _model_and_batch(experiment: str, micro_batch: int, device: torch.device):
    from ldm_train.app import compose
    from ldm_train.build import build_ldm
    from ldm_train.flops import summarize
    from ldm_train.trainer.config import TrainAppConfig

    cfg = compose("train", TrainAppConfig, [f"experiment={experiment}", "data.latents_root=unused"])
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cfg)
    flops = summarize(node)["train_flops_per_sample"]
    torch.manual_seed(0)
    model = build_ldm(node).to(device).train()
    unet = node.unet
    channels = int(unet.in_channels) - int(unet.concat_channels)
    side = int(unet.image_size)
    gen = torch.Generator(device=device).manual_seed(0)
    z0 = torch.randn(micro_batch, channels, side, side, device=device, generator=gen)
    kind = str(OmegaConf.select(node, "cond.kind", default="text"))
    if kind == "text":
        cond = torch.randint(0, int(node.text_encoder.vocab_size), (micro_batch, int(node.text_encoder.max_seq_len)),
                             device=device, generator=gen)
    elif kind == "class":
        cond = torch.randint(0, int(node.cond.num_classes), (micro_batch,), device=device, generator=gen)
    else:
        cond = None
    return model, z0, cond, flops, node


def _time(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def measure(experiment: str, micro_batch: int, steps: int, warmup: int, compiled: bool,
            device: torch.device) -> dict:
    from ldm_train.diffusion.step import draw_t_and_noise, training_loss
    from ldm_train.runtime.devices import device_peak_tflops

    model, z0, cond, flops, node = _model_and_batch(experiment, micro_batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    if compiled:
        model.compile_in_place()  # what train.compile does
    timesteps = int(node.train.diffusion.timesteps)
    gen = torch.Generator(device=device).manual_seed(1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def step() -> None:  # the trainer's micro-step (ldm_train/diffusion/step.py), then a plain AdamW step
        t, noise = draw_t_and_noise(z0, timesteps, 0.0, gen)
        with autocast:
            loss = training_loss(model, z0, cond, t, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"compiled": compiled, "micro_batch": micro_batch}
    try:
        t0 = time.perf_counter()
        step()  # first step: compilation / allocator warm-up, timed apart
        first = time.perf_counter() - t0
        per_step = _time(step, steps, warmup, device)
    except torch.OutOfMemoryError as err:  # a finding (the planner was wrong), not a reason to lose the JSON
        out["error"] = f"out of memory: {str(err).splitlines()[0]}"
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del model, opt
        torch.cuda.empty_cache()
        return out
    sps = micro_batch / per_step
    peak = device_peak_tflops(device)
    out.update({"first_step_s": round(first, 2), "step_s": round(per_step, 4), "samples_per_s": round(sps, 2),
                "model_tflops_per_s": round(flops * sps / 1e12, 3),
                "mfu": None if peak is None else round(flops * sps / (peak * 1e12), 4)})
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _planner(experiment: str, micro_batch: int, device: torch.device) -> dict:
    """ldm_train.plan's estimate for this run (one device, no DeepSpeed) on the device present; on CPU (--dry-run)
    for a named h100-80g, so the code path is exercised."""
    from ldm_train.plan import gpu_for, single_device_estimate
    from ldm_train.summary import compose_config

    gpu = gpu_for(None if device.type == "cuda" else "h100-80g")
    return single_device_estimate(compose_config([f"experiment={experiment}"]), gpu, micro_batch)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="txt2img_1p45b")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the experiment's train.micro_batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile(model)")
    p.add_argument("--dry-run", action="store_true", help="experiment=tiny on CPU, 3 steps")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    if a.dry_run:
        a.experiment, a.micro_batch, a.steps, a.warmup = "tiny", 2, 3, 1
        device = torch.device("cpu")
        torch.set_num_threads(1)  # a shared CI core: OpenMP threads spinning against other jobs cost 50x here
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ldm_train.runtime.devices import device_peak_tflops

    if a.micro_batch is None:  # the planned micro-batch of the preset
        from ldm_train.summary import compose_config

        a.micro_batch = int(compose_config([f"experiment={a.experiment}"]).train.micro_batch)
    result = {
        "bench": "gpu_check", "experiment": a.experiment, "dry_run": a.dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_tflops_bf16": device_peak_tflops(device), "torch": torch.__version__,
        "planner": _planner(a.experiment, a.micro_batch, device), "runs": [],
    }
    for compiled in (False, True) if a.compile else (False,):
        result["runs"].append(measure(a.experiment, a.micro_batch, a.steps, a.warmup, compiled, device))
        if a.out:  # after each run: a timeout during compilation keeps the eager numbers
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                f.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
