"""train.compile's speed-up on this machine: the tiny LDM's training step (forward + backward + AdamW) eager, then
with the UNet and the text encoder compiled in place as the trainer does (``nn.Module.compile``). Prints one JSON line.

    python bench/compile_speed.py [--threads 1] [--batch 16] [--experiment tiny]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--experiment", default="tiny")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from ldm_train.build import build_ldm
    from ldm_train.diffusion.step import training_loss
    from ldm_train.plan import _inputs
    from ldm_train.summary import compose_config

    cfg = compose_config([f"experiment={a.experiment}"])
    torch.manual_seed(0)
    model = build_ldm(cfg, activation_checkpointing=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    z0, cond, _, noise = _inputs(cfg, a.batch, torch.float32)()
    if cond is not None and cond.dtype == torch.long:
        cond = torch.randint(0, 100, cond.shape)
    t = torch.randint(0, int(cfg.train.diffusion.timesteps), (a.batch,))

    def step() -> None:  # the trainer's micro-step loss (ldm_train/diffusion/step.py), backward, AdamW
        training_loss(model, z0, cond, t, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed() -> float:
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        return (time.perf_counter() - t0) / a.steps

    eager = min(timed() for _ in range(2))
    model.compile_in_place()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    compiled = min(timed() for _ in range(2))
    print(json.dumps({"bench": "compile_speed", "experiment": a.experiment, "threads": a.threads, "batch": a.batch,
                      "eager_step_s": round(eager, 4), "compiled_step_s": round(compiled, 4),
                      "speedup": round(eager / compiled, 3), "first_compiled_step_s": round(first, 1),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
