"""The reference cache is keyed by content: two folders with the same name but other images never share it."""
from __future__ import annotations

import numpy as np
import pytest

from eval.fidelity import FidelityConfig, compute_fidelity
from eval.reference import materialise_reference


def test_same_basename_other_images_other_cache_entry_and_fid(tmp_path, wide_colours, colour_images,
                                                                write_pngs, capsys) -> None:
    gen = write_pngs(str(tmp_path / "gen"), colour_images(wide_colours, seed=1))
    a = write_pngs(str(tmp_path / "a" / "reference"), colour_images(wide_colours, seed=2))
    b = write_pngs(str(tmp_path / "b" / "reference"), colour_images(np.clip(wide_colours + 80, 0, 255), seed=3))
    cache = str(tmp_path / "cache")
    cfg = FidelityConfig(extractor="random-init", isc=False, prc=False, save_cpu_ram=True, cache_dir=cache)
    fids = {}
    for name, path in (("a", a), ("b", b)):
        folder, key = materialise_reference(path, None, 0, 32, cache)
        assert key.startswith("reference-nall-r32-")
        fids[name] = compute_fidelity(cfg, gen, folder, key)["fid"]
    assert materialise_reference(a, None, 0, 32, cache)[1] != materialise_reference(b, None, 0, 32, cache)[1]
    assert "reusing the reference images" in capsys.readouterr().out
    assert fids["b"] > 2 * fids["a"] + 1.0  # b was not served a's cached statistics
    again = compute_fidelity(cfg, gen, *materialise_reference(a, None, 0, 32, cache))["fid"]
    assert again == pytest.approx(fids["a"], rel=1e-9)
