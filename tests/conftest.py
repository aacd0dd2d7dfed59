"""Shared pytest fixtures: the session-wide local SLURM cluster (tests/slurm_cluster.py).

Area-specific fixtures live in tests/<area>/conftest.py. The cluster starts once per session, on first use,
and is torn down at the end; tests that need it take the `slurm_cluster` fixture and carry the `slurm` mark.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.slurm_cluster import LocalSlurmCluster, missing_binaries


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurmCluster]:
    """A running 2-node SLURM cluster (node1, node2: 2 CPUs each, NodeAddr 127.0.0.1); skips if not installed."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): run `bash .ci/install_slurm.sh`")
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2) as cluster:
        yield cluster
