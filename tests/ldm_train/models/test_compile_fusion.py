"""train.compile fuses GroupNorm+SiLU and GEGLU: no hand-written kernels are needed for them.

Inductor names each generated kernel after the ops it fused (``cpp_fused_native_group_norm_silu_0``), so the
kernel list of one compiled forward + backward of our own blocks says whether an op got a pass over memory of its
own. Checked with Inductor's C++ backend (CPU tensors; no GPU here): the Triton backend's kernels are not checked.
"""
from __future__ import annotations

import re

import pytest
import torch

from ldm_train.models.attention import FeedForward
from ldm_train.models.unet import ResBlock

pytestmark = pytest.mark.timeout(600)


def _kernels(block: torch.nn.Module, *inputs: torch.Tensor) -> tuple[list[str], list[str]]:
    """Names of the kernels Inductor generates for the forward and the backward of ``block``."""
    from torch._inductor.utils import run_and_get_code

    def step(*args: torch.Tensor) -> torch.Tensor:
        out = block(*args)
        out.square().sum().backward()
        return out

    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(step), *inputs)
    found = [re.findall(r"\b(cpp_fused_\w+)\s*=\s*async_compile", code) for code in codes]
    assert len(found) == 2 and all(found), f"expected a forward and a backward graph, got kernels {found}"
    return found[0], found[1]


def _ops(kernel: str) -> set[str]:
    return set(kernel.split("_"))


@pytest.mark.slow  # torch.compile of a block, forward and backward: 25-55 s on the 2-core machine
def test_groupnorm_and_silu_share_a_kernel_forward_and_backward() -> None:
    torch.manual_seed(0)
    block = ResBlock(64, 128, 0.0, out_channels=64)
    x, emb = torch.randn(2, 64, 8, 8, requires_grad=True), torch.randn(2, 128)
    forward, backward = _kernels(block, x, emb)
    norms = [k for k in forward if "group_norm" in k]
    assert len(norms) == 2, forward  # in_layers' and out_layers' GroupNorm
    assert all("silu" in _ops(k) for k in norms), forward  # each with its SiLU: no pass of its own
    # the only SiLU without a GroupNorm is emb_layers' (on the [B, 128] timestep embedding, not a feature map)
    assert len([k for k in forward if "silu" in _ops(k) and "group_norm" not in k]) == 1, forward
    silu_bwd = [k for k in backward if "silu_backward" in k]
    assert silu_bwd and all("group_norm_backward" in k for k in silu_bwd), backward


def test_geglu_is_one_kernel_forward_and_backward() -> None:
    torch.manual_seed(0)
    block = FeedForward(64)
    x = torch.randn(2, 10, 64, requires_grad=True)
    forward, backward = _kernels(block, x)
    gelu = [k for k in forward if "gelu" in _ops(k)]
    assert len(gelu) == 1 and {"mul", "split"} <= _ops(gelu[0]), forward  # split, GELU of the gate, product
    gelu_bwd = [k for k in backward if "gelu" in _ops(k)]
    assert len(gelu_bwd) == 1 and "mul" in _ops(gelu_bwd[0]), backward
