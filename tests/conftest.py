"""Shared pytest fixtures: the session-wide local SLURM cluster (tests/slurm_cluster.py).

Area-specific fixtures live in tests/<area>/conftest.py. The cluster starts once per session, on first use,
and is torn down at the end; tests that need it take the `slurm_cluster` fixture and carry the `slurm` mark.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

# Under pytest-xdist every worker runs its tests beside the others: one OpenMP thread per worker process (and per
# process it starts, unless a test sets its own), since oversubscribed OpenMP threads spin against each other on
# a small machine. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.slurm_cluster import LocalSlurmCluster, missing_binaries  # noqa: E402


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than CPUs, since tests spend a good share of their time waiting on the
    processes and servers they start (2 CPUs: 3 workers ran the default suite in 487 s; 2 workers took 581 s with
    two tests since moved to the slow suite, about 60 s of it), and at most 4, since many tests start trainings of
    two processes each. The slow suite, whose end-to-end tests learn within a budget of training seconds, runs
    with ``-n <CPUs>`` (.ci/run)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus + 1))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurmCluster]:
    """A running 2-node SLURM cluster (node1, node2: 2 CPUs each, NodeAddr 127.0.0.1); skips if not installed."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): run `bash .ci/install_slurm.sh`")
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2) as cluster:
        yield cluster
