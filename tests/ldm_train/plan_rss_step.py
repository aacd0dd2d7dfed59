"""One real CPU training step in a fresh process: ``python -m tests.ldm_train.plan_rss_step OVERRIDES BATCH CKPT COUNT``
prints the resident-memory growth of the step (COUNT=0) or its live-storage count (COUNT=1), as JSON."""
from __future__ import annotations

import json
import resource
import sys

import torch

from ldm_train.build import build_ldm
from ldm_train.memory import LiveStorage
from ldm_train.plan import _inputs
from ldm_train.summary import compose_config


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    torch.set_num_threads(1)
    overrides, batch, ckpt, count = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
    cfg = compose_config(overrides)
    torch.manual_seed(0)
    model = build_ldm(cfg, activation_checkpointing=ckpt).train()
    args = _inputs(cfg, batch, torch.float32)()
    base, maxrss_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if count:
        with LiveStorage() as t:
            model(*args).float().mean().backward()
        print(json.dumps({"counted_peak": t.peak}))
    else:
        model(*args).float().mean().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"rss_growth": peak - base, "maxrss_before_minus_base": maxrss_before - base}))


if __name__ == "__main__":
    main()
