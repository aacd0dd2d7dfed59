"""The UNet's attention: the narrow-head CPU path equals SDPA forward and backward, and is taken only where meant."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_train.models.attention import (
    NarrowHeadAttention,
    attention,
    sdpa_only,
    uses_narrow_head_path,
)


def _qkv(b: int, h: int, n: int, m: int, d: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, length, d, generator=gen, dtype=dtype).requires_grad_(True) for length in (n, m, m)]


def test_narrow_head_attention_gradients_are_exact() -> None:
    assert torch.autograd.gradcheck(NarrowHeadAttention.apply, tuple(_qkv(1, 2, 5, 4, 3, torch.float64)))


@pytest.mark.parametrize("shape", [(2, 8, 256, 256, 8), (2, 8, 256, 77, 8), (2, 8, 64, 77, 16), (3, 4, 10, 7, 2)],
                         ids=["self-16px", "cross-16px", "cross-8px-d16", "odd"])
def test_narrow_head_attention_equals_sdpa(shape: tuple[int, ...]) -> None:
    q, k, v = _qkv(*shape)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    ours = NarrowHeadAttention.apply(q, k, v)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_narrow_path_is_taken_only_for_narrow_fp32_heads_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
        return type(attention(q, k, v).grad_fn).__name__

    q, k, v = _qkv(2, 8, 256, 77, 8)
    assert uses_narrow_head_path(q, k) and path(q, k, v) == "NarrowHeadAttentionBackward"
    wide = _qkv(2, 8, 256, 77, 16)
    assert not uses_narrow_head_path(wide[0], wide[1]) and "NarrowHead" not in path(*wide)
    with sdpa_only():  # the planner's count: what a GPU runs
        assert not uses_narrow_head_path(q, k) and "NarrowHead" not in path(q, k, v)
    assert uses_narrow_head_path(q, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_narrow_head_path(q, k)
    half = [t.detach().bfloat16() for t in (q, k)]
    assert not uses_narrow_head_path(*half)
    assert uses_narrow_head_path(torch.empty(2, 8, 256, 8), torch.empty(2, 8, 256, 8))  # a 4 MiB matrix
    assert not uses_narrow_head_path(torch.empty(4, 8, 256, 8), torch.empty(4, 8, 256, 8))  # 8 MiB: the flash kernel
    assert not uses_narrow_head_path(torch.empty(2, 8, 256, 8, device="meta"), torch.empty(2, 8, 77, 8, device="meta"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as while Inductor traces the model
    assert uses_narrow_head_path(wide[0], wide[1])
    assert not uses_narrow_head_path(*_qkv(2, 2, 256, 77, 32)[:2])


def test_the_unet_trains_through_the_narrow_path_as_through_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm_train.config import UNetConfig
    from ldm_train.models import attention as module
    from ldm_train.models.unet import UNetModel

    calls = []

    class Counted(NarrowHeadAttention):
        @staticmethod
        def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
            calls.append(q.shape)
            return NarrowHeadAttention.forward(ctx, q, k, v)

    monkeypatch.setattr(module, "NarrowHeadAttention", Counted)
    cfg = UNetConfig(image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2],
                     attention_resolutions=[1, 2], num_res_blocks=1, num_heads=4, context_dim=32)
    torch.manual_seed(0)
    unet = UNetModel(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(2)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen), torch.tensor([10, 900])
    results = []
    for context in (sdpa_only, torch.enable_grad):
        unet.zero_grad(set_to_none=True)
        with context():
            out = unet(x, t, ctx)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in unet.parameters()], len(calls)))
    assert results[0][2] == 0 and results[1][2] == 6  # the 3 blocks with 8-channel heads (1 down, 2 up) x 2
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
