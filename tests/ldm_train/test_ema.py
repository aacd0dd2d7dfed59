"""EMA math on plain modules (CPU), and under DeepSpeed ZeRO-1/2/3 with 2 gloo ranks against independent references."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm_train.ema import EMA

pytestmark = pytest.mark.integration  # starts processes or servers


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))


def _perturb(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + step + i))


def test_warmup_decay_is_compvis() -> None:
    ema = EMA(_model(), decay=0.9999)
    decays = []
    for _ in range(5000):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays[0] == pytest.approx(2 / 11)  # LitEma counts the update before using it
    assert decays[99] == pytest.approx(101 / 110)
    assert decays[-1] == pytest.approx(5001 / 5010)  # still warming: (1+n)/(10+n) < 0.9999 until n ~ 90k
    assert EMA(_model(), decay=0.5).current_decay() == pytest.approx(2 / 11)
    assert EMA(_model(), decay=0.9, warmup=False).current_decay() == 0.9


def test_update_matches_the_recurrence_in_float64() -> None:
    model = _model()
    ema = EMA(model, decay=0.95)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for step in range(30):
        _perturb(model, step)
        ema.update(model)
        n = step + 1
        d = min(0.95, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            ref[name] = d * ref[name] + (1 - d) * p.detach().double()
    assert ema.num_updates == 30
    for name, shadow in ema.shadow.items():
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow.double(), ref[name], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(shadow, dict(model.named_parameters())[name].float(), atol=1e-3)


def test_shadow_is_fp32_for_a_bf16_model_and_copy_to_casts_back() -> None:
    model = _model().to(torch.bfloat16)
    ema = EMA(model, decay=0.9, warmup=False)
    # steps smaller than bf16's resolution near 1 (2^-7) still move an fp32 EMA
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema.load_state_dict({**ema.state_dict(), "shadow": {k: torch.full_like(v, 1.0) for k, v in ema.shadow.items()}})
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0078125)  # next bf16 value above 1
    ema.update(model)
    first = next(iter(ema.shadow.values()))
    assert first.dtype == torch.float32
    torch.testing.assert_close(first, torch.full_like(first, 1.00078125))
    ema.copy_to(model)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_copy_to_average_parameters_and_frozen_params() -> None:
    model = _model()
    model[2].bias.requires_grad_(False)
    frozen_before = model[2].bias.detach().clone()
    ema = EMA(model, decay=0.5, warmup=False)
    _perturb(model, 0)
    ema.update(model)
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(ema.shadow["2.bias"], frozen_before)  # frozen: never averaged
    with ema.average_parameters(model):
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ema.shadow[name])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), training[name])  # restored exactly
    ema.copy_to(model)
    torch.testing.assert_close(model[0].weight.detach(), ema.shadow["0.weight"])


def test_state_dict_round_trip_and_refusals() -> None:
    model = _model()
    ema = EMA(model, decay=0.99)
    for step in range(3):
        _perturb(model, step)
        ema.update(model)
    state = ema.state_dict()
    assert state["num_updates"] == 3 and not state["partitioned"]
    fresh = EMA(_model(seed=1), decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.num_updates == 3 and fresh.decay == 0.99
    for name in ema.shadow:
        assert torch.equal(fresh.shadow[name], ema.shadow[name])
    assert ema.gathered_state_dict().keys() == ema.shadow.keys()
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({**state, "shadow": {"0.weight": state["shadow"]["0.weight"]}})
    with pytest.raises(ValueError, match="another model"):
        ema.update(nn.Linear(7, 5))


WORKER = Path(__file__).with_name("ema_zero_worker.py")


def _run_worker(tmp_path: Path, stage: int, precision: str) -> dict:
    pytest.importorskip("deepspeed")
    # TMPDIR: torchrun leaves /tmp/torchelastic_* behind; keep them in pytest's tmp_path
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(stage), precision, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # two ZeRO-3 processes (~20 s)
def test_zero3_gathered_ema_equals_plain_ema(tmp_path: Path) -> None:
    """2 gloo ranks, ZeRO-3 fp32 (DeepSpeed on CPU, recipes/cpu-stack.md): each rank averages its own
    partition; the gathered EMA must equal the EMA of an unpartitioned model trained on the same data."""
    result = _run_worker(tmp_path, 3, "fp32")
    assert result["sharded_params"] == 6  # the EMA really saw ZeRO-3 partitions, not full tensors
    # fp32 ZeRO-3 AdamW equals torch AdamW to ~1e-7 (recipes); measured here: 6e-8
    assert result["max_abs_diff_gathered"] < 1e-6, result
    assert result["max_abs_diff_copy_to"] == 0.0, result
    assert result["partition_sizes"]["0.weight"] == [18, 35]  # 35 weights over 2 ranks: padded to 2 x 18
    assert result["max_abs_diff_reload"] == 0.0, result
    assert result["ema_moved"] > 1e-3, result  # and the EMA differs from the initial weights


@pytest.mark.parametrize(("stage", "precision", "optimizer"), [
    (2, "fp32", "DeepSpeedZeroOptimizer"),
    # the other two precisions start their own pair of processes (~18 s each): run with the slow suite
    pytest.param(2, "bf16", "DeepSpeedZeroOptimizer", marks=pytest.mark.slow),
    pytest.param(1, "bf16-accum-fp32", "BF16_Optimizer", marks=pytest.mark.slow),
])
def test_zero12_ema_is_sharded_from_the_fp32_master(tmp_path: Path, stage: int, precision: str, optimizer: str) -> None:
    """ZeRO-1/2: each rank keeps only its fragment of the optimizer's fp32 master partition (no full
    fp32 copy per rank); the gathered EMA equals a plain EMA of the full fp32 master (bf16: gathered each step
    with DeepSpeed's safe_get_full_fp32_param), or of a plain fp32 model trained on the same batches."""
    result = _run_worker(tmp_path, stage, precision)
    assert result["optimizer"] == optimizer  # the DeepSpeed optimizer class the case is meant to cover
    assert result["sharded_params"] == 6
    per_rank, total = result["shadow_numel_per_rank"], result["model_numel"]
    assert sum(per_rank) == total and max(per_rank) <= total // 2 + 1, result  # split, never a full copy
    # the last Linear's weight lies wholly on rank 1; the middle one straddles the ranks (12 of 15 on rank 0)
    assert result["fragments_rank0"]["3.weight"] == [0, 0, 33]
    assert result["fragments_rank0"]["2.weight"] == [0, 12, 15]
    if precision == "fp32":
        assert result["max_abs_diff_gathered"] < 1e-6, result  # measured: 6e-8 (DeepSpeed's AdamW vs torch's)
    else:
        assert result["max_abs_diff_gathered"] == 0.0, result  # the EMA of the master, bit for bit
        assert result["max_abs_diff_weights_ema"] > 1e-5, result  # averaging the bf16 weights is not the same
    assert result["max_abs_diff_copy_to"] == 0.0, result
    assert result["max_abs_diff_reload"] == 0.0, result
    assert result["ema_moved"] > 1e-3, result


def test_chunked_update_of_a_bf16_model_equals_one_fused_update(monkeypatch) -> None:
    """The update works through the parameters in chunks (bounded fp32 temporaries, no second full copy of the
    model); chunk boundaries do not change a single value."""
    import ldm_train.ema as ema_mod

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).to(torch.bfloat16)
    whole, chunked = EMA(model, decay=0.9), EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    whole.update(model)
    monkeypatch.setattr(ema_mod, "UPDATE_CHUNK", 20)  # a lerp per ~20 elements: 4 chunks here
    chunked.update(model)
    assert all(torch.equal(whole.shadow[k], chunked.shadow[k]) for k in whole.shadow)
    assert any(not torch.equal(whole.shadow[k], v.float()) for k, v in model.state_dict().items())
