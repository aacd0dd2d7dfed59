"""Shared fixtures of the autoencoder tests."""
from __future__ import annotations

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
