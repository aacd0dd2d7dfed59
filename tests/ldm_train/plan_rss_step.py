"""One real CPU training step in a fresh process: ``python -m tests.ldm_train.plan_rss_step OVERRIDES BATCH CKPT COUNT``
prints the resident-memory growth of the step (COUNT=0) or its live-storage count (COUNT=1), as JSON."""
from __future__ import annotations

import json
import sys

import torch

# torch modules a checkpointed step would otherwise import on first use, mid-step (78 MB of resident memory that is
# not the step's tensors), loaded before the peak is reset: ldm_train.flops imports them (torch.utils.flop_counter)
import ldm_train.flops  # noqa: F401
from ldm_train.build import build_ldm
from ldm_train.memory import LiveStorage
from ldm_train.plan import _inputs
from ldm_train.summary import compose_config


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Linux: the peak resident set (VmHWM) starts again from the current one (``clear_refs`` 5). getrusage's
    ru_maxrss cannot serve: it keeps the launching process's peak across exec. False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    torch.set_num_threads(1)
    overrides, batch, ckpt, count = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
    cfg = compose_config(overrides)
    torch.manual_seed(0)
    model = build_ldm(cfg, activation_checkpointing=ckpt).train()
    args = _inputs(cfg, batch, torch.float32)()
    if not reset_peak():
        print(json.dumps({"peak_reset": False}))
        return
    base, peak_before = _status_kb("VmRSS"), _status_kb("VmHWM")
    if count:
        with LiveStorage() as t:
            model(*args).float().mean().backward()
        print(json.dumps({"counted_peak": t.peak}))
    else:
        model(*args).float().mean().backward()
        peak = _status_kb("VmHWM")
        print(json.dumps({"rss_growth": peak - base, "peak_before_minus_base": peak_before - base}))


if __name__ == "__main__":
    main()
