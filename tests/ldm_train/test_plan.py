"""The memory / throughput planner: the live-storage count on the meta device equals the same step
on real tensors and the resident-memory growth of a real CPU step (reduced width); the 1.45B plan tables; a plan that
does not fit is refused before anything runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_train.plan import (
    GPUS,
    Assumptions,
    activation_count,
    best,
    fixed_parts,
    gpu_for,
    main,
    plans,
    profile,
)
from ldm_train.summary import compose_config

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[2]
# the 1.45B layout at reduced width: every block type of the real model, CPU-sized
REDUCED = ["experiment=txt2img_1p45b", "train.precision=fp32", "unet.model_channels=64", "text_encoder.n_embed=256",
           "text_encoder.n_layer=4", "text_encoder.vocab_size=1000"]


@pytest.fixture(scope="module")
def big():
    cfg = compose_config(["experiment=txt2img_1p45b"])
    return cfg, profile(cfg)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "checkpointed"])
def test_meta_count_equals_the_real_tensor_count(checkpointing: bool) -> None:
    cfg = compose_config(REDUCED)
    meta, _ = activation_count(cfg, 4, checkpointing, "meta")
    real, _ = activation_count(cfg, 4, checkpointing, "cpu")
    assert real > 10 * 2**20
    assert abs(meta - real) / real < 0.005, (meta, real)


@pytest.mark.slow  # four fresh processes each running a real step: about a minute per case
@pytest.mark.parametrize("checkpointing", ["0", "1"], ids=["eager", "checkpointed"])
def test_count_matches_the_resident_memory_growth_of_a_real_cpu_step(checkpointing: str) -> None:
    """Independent of the counter: the kernel's peak resident set (VmHWM, reset before the step) of a fresh process
    running one real fp32 step
    (glibc returns large blocks to the system at once, so RSS follows the live tensors) against the count of the
    same step on real tensors, gradients included as the process holds them."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    out = {}
    for count in ("1", "0"):
        proc = subprocess.run([sys.executable, "-m", "tests.ldm_train.plan_rss_step", ",".join(REDUCED), "16",
                               checkpointing, count], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out |= json.loads(proc.stdout.strip().splitlines()[-1])
        if out.get("peak_reset") is False:
            pytest.skip("/proc/self/clear_refs is not writable here: the peak resident set cannot be reset")
    assert out["peak_before_minus_base"] < 16 * 2**20  # the peak was reset to the step's baseline
    print(json.dumps(out))
    assert out["counted_peak"] > 200 * 2**20
    assert abs(out["rss_growth"] - out["counted_peak"]) / out["counted_peak"] < 0.10, out


def test_activations_are_linear_in_the_batch_and_checkpointing_cuts_them(big) -> None:
    cfg, prof = big
    (a0, a1), (_, c1) = prof.act_bytes[False], prof.act_bytes[True]
    assert a1 > 0 and c1 > 0 and c1 < a1 / 3
    eight = activation_count(cfg, 8, False)[0]
    assert abs(eight - (a0 + 8 * a1)) / eight < 0.01  # the b=1, b=2 line predicts b=8


@pytest.mark.parametrize("gpu", ["a100-80g", "h100-80g"])
def test_the_1p45b_table_on_8_gpus(big, gpu: str) -> None:
    cfg, prof = big
    a = Assumptions()
    table = plans(cfg, prof, GPUS[gpu], 1, 8, a)
    # 680 / 8 = 85 samples per GPU: micro-batches 1, 5, 17, 85; checkpointing on/off; ZeRO 1, 2, 3
    assert sorted({p.micro_batch for p in table}) == [1, 5, 17, 85] and len(table) == 24
    chosen = best(table)
    assert chosen is not None and chosen.fits and chosen.total_gib <= a.headroom * GPUS[gpu].memory_gib
    assert all(chosen.step_s <= p.step_s for p in table if p.fits)
    assert 0 < chosen.mfu < 1
    print(json.dumps({"gpu": gpu, "best": chosen.__dict__}))
    # ZeRO stages trade memory for traffic: fixed memory falls with the stage
    z = {p.zero: p.fixed_gib for p in table if p.micro_batch == 5 and p.checkpointing}
    assert z[1] > z[2] > z[3]


def test_fixed_memory_parts_follow_the_zero_stage(big) -> None:
    cfg, prof = big
    one, three = fixed_parts(cfg, prof, 1, 8), fixed_parts(cfg, prof, 3, 8)
    assert one["adam_moments"] == pytest.approx(8 * prof.params / 8)
    assert one["weights"] == pytest.approx(2 * prof.params) and three["weights"] == pytest.approx(2 * prof.params / 8)


def test_a_plan_that_does_not_fit_is_refused_naming_one_that_does(big, capsys, monkeypatch) -> None:
    import ldm_train.plan as plan

    monkeypatch.setattr(plan, "profile", lambda cfg: big[1])  # the same model's count, made once for the module
    rc = main(["experiment=txt2img_1p45b", "gpu=a100-40g", "micro_batch=85", "checkpointing=false", "zero=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not fit" in err and "use train.micro_batch=" in err


def test_the_peak_comes_from_the_named_gpu_or_the_device_present() -> None:
    assert gpu_for("h100-80g").peak_tflops == 989.0 and gpu_for("a100-80g").peak_tflops == 312.0
    with pytest.raises(ValueError, match=r"gpu=v100: use one of .*a100-40g"):
        gpu_for("v100")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="no GPU here: name one with gpu="):
            gpu_for(None)


def test_the_trainer_start_line_on_a_gpu(monkeypatch) -> None:
    import ldm_train.plan as plan

    monkeypatch.setattr(plan, "gpu_for", lambda name: GPUS["h100-80g"])  # no GPU here: the device it would read
    line = plan.startup_line(compose_config(["experiment=tiny"]), 1, 1)
    assert line.startswith("plan (estimate, h100-80g): ") and "MFU" in line
