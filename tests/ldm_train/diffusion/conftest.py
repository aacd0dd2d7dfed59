"""Fixtures of the diffusion tests: the paper's schedule and a Gaussian data model with an exact eps predictor."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from ldm_train.diffusion.schedule import DiffusionSchedule, make_schedule


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: on a shared 2-core machine OpenMP barriers between 2 threads cost more than
    the math (a 1000-step chain went from ~2 s to minutes under load), so run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def schedule() -> DiffusionSchedule:
    return make_schedule("scaled_linear", 1000, 0.00085, 0.012)


class GaussianData:
    """Data ~ N(mu, sigma^2) independently per dimension; q(x_t) is then N(sqrt(a) mu, a sigma^2 + 1 - a)
    and E[eps | x_t] = (x_t - sqrt(a) mu) sqrt(1 - a) / (a sigma^2 + 1 - a): the optimal eps model."""

    def __init__(self, schedule: DiffusionSchedule, mu: list[float], sigma: list[float]) -> None:
        self.a = schedule.alphas_cumprod.double()
        self.mu = torch.tensor(mu, dtype=torch.float64)
        self.sigma = torch.tensor(sigma, dtype=torch.float64)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.a[t].reshape(-1, 1).to(x.dtype)
        mu, s2 = self.mu.to(x.dtype), self.sigma.to(x.dtype) ** 2
        return (x - a.sqrt() * mu) * (1 - a).sqrt() / (a * s2 + 1 - a)

    def marginal(self, t: int, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n draws of x_t ~ q(x_t), shape [n, D]."""
        a = self.a[t]
        z = torch.randn(n, self.mu.numel(), generator=generator, dtype=torch.float64)
        return (a.sqrt() * self.mu + (a * self.sigma**2 + 1 - a).sqrt() * z).to(dtype)


@pytest.fixture
def gaussian_data(schedule: DiffusionSchedule) -> Callable[[list[float], list[float]], GaussianData]:
    return lambda mu, sigma: GaussianData(schedule, mu, sigma)
