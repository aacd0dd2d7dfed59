"""Numerical guard: non-finite losses and gradients skip the step, are counted, and K in a row abort.

Who skips the bad step: DeepSpeed. Its ZeRO optimizers check the gradients before the update (fp16: the
loss-scaler overflow check; bf16: ``check_grad_overflow``; fp32: an invalid global grad norm) and then
zero the gradients, leave parameters, optimizer moments and the LR scheduler untouched, and report
``engine.was_step_applied() == False``. That check already syncs the host once per step, so reading
the flag costs nothing extra. The guard adds the accounting, the abort, and a device-side accumulator of
non-finite losses that is read only at the log interval.
"""
from __future__ import annotations

import torch


class NonFiniteAbort(RuntimeError):
    """Too many consecutive non-finite steps: the run stops after checkpointing the last good state."""


class NumericalGuard:
    def __init__(self, max_consecutive: int, device: torch.device) -> None:
        self.max_consecutive = max_consecutive
        self.skipped_total = 0
        self.consecutive = 0
        self._bad_losses = torch.zeros((), dtype=torch.int64, device=device)

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Count a non-finite micro-step loss on the device (no host sync)."""
        self._bad_losses += (~torch.isfinite(loss.detach())).to(torch.int64)

    def after_step(self, step_applied: bool, fp16: bool = False) -> None:
        """Record whether the optimizer applied the step; raise after ``max_consecutive`` skips in a row.

        fp16 overflow skips are the loss scaler searching for its scale: they are counted but do not
        abort unless they too run K in a row.
        """
        if step_applied:
            self.consecutive = 0
            return
        self.skipped_total += 1
        self.consecutive += 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            kind = "fp16 overflow (loss scale hit its minimum?)" if fp16 else "non-finite loss or gradient"
            raise NonFiniteAbort(
                f"{self.consecutive} optimizer steps in a row were skipped ({kind}); the last good state is "
                f"checkpointed. Lower train.optim.base_lr, check the data (latent scale factor), or raise "
                f"train.guard.max_consecutive_skips"
            )

    def bad_losses_since_last_read(self) -> int:
        """Host sync: call at the log interval only."""
        n = int(self._bad_losses.item())
        self._bad_losses.zero_()
        return n

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.consecutive = int(state.get("consecutive", 0))
