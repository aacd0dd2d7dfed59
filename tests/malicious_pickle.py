"""Torch files that run code when unpickled without ``weights_only``: they create a marker file, so a test can
assert that loading never ran them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CreatesMarker:
    """Unpickles as ``exec("open(marker, 'w').close()")``: the marker exists iff the pickle's code ran."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def write_malicious(path: str | Path, marker: str | Path, state: dict[str, Any] | None = None) -> Path:
    """``torch.save`` of ``state`` (default: one tensor) plus an entry whose unpickling creates ``marker``."""
    path = Path(path)
    torch.save({**(state if state is not None else {"weight": torch.zeros(2)}), "payload": CreatesMarker(marker)},
               path)
    return path
