"""Where the reference Fashion-MNIST command keeps what it scores: per decoder for the LDM's samples and the
reconstructions, shared for the baseline; and a fine-tuned decoder on disk must match ``--decoder-steps``."""
from __future__ import annotations

from pathlib import Path

import pytest

from studies.fmnist_reference import Reference, main, parser
from studies.quickstart import StageError


def _reference(out: Path, *extra: str) -> Reference:
    """The command's own parsing of ``--smoke --out OUT EXTRA``."""
    return Reference(parser().parse_args(["--smoke", "--out", str(out), *extra]))


def test_each_decoder_scores_its_own_samples_and_the_baseline_is_shared(tmp_path: Path) -> None:
    gan, plain = _reference(tmp_path), _reference(tmp_path, "--decoder-steps", "0")
    assert gan.scores == plain.scores == tmp_path / "scores"
    assert gan.score_dir != plain.score_dir and gan.score_dir.parent == plain.score_dir.parent == gan.scores
    assert gan.decoder == gan.dec_export and plain.decoder == plain.ae_export
    point = {"name": "step_0000012"}
    setting = {"steps": 20, "guidance_scale": 2.0}
    seen: list[Path] = []

    def sample(point, n, folder, setting) -> None:
        seen.append(folder)
        folder.mkdir(parents=True)
        (folder / "000000.png").write_bytes(b"")

    for ref in (gan, plain):
        ref._draw("ldm", point, 20, sample, setting)
        ref._draw("baseline", point, 20, sample, setting)
    # two LDM folders (one per decoder), one baseline folder drawn once and reused
    assert len(seen) == 3 and len(set(seen)) == 3
    assert seen[0].is_relative_to(gan.score_dir) and seen[2].is_relative_to(plain.score_dir)
    assert seen[1].is_relative_to(tmp_path / "scores" / "baseline")


def test_a_decoder_fine_tuned_for_other_steps_is_refused_naming_both(tmp_path: Path, capsys) -> None:
    ref = _reference(tmp_path, "--decoder-steps", "8")
    ref.dec_dir.mkdir(parents=True)
    (ref.dec_dir / "config.yaml").write_text("train:\n  max_steps: 4\n")
    with pytest.raises(StageError, match=r"fine-tuned for 4 steps, not --decoder-steps 8: pass --decoder-steps 4"):
        ref._check_decoder_steps()
    _reference(tmp_path, "--decoder-steps", "4")._check_decoder_steps()  # the same steps: kept
    # the command line says so and exits 1 before anything else runs
    (ref.dec_export.parent).mkdir(parents=True)
    ref.dec_export.write_bytes(b"")
    for split, shards in (("train", 2), ("t10k", 1)):  # prep's data step is done
        (tmp_path / "raw" / split).mkdir(parents=True, exist_ok=True)
        (tmp_path / "raw" / split / f"{shards - 1:06d}.tar").write_bytes(b"")
    ref.ae_export.parent.mkdir(parents=True)
    ref.ae_export.write_bytes(b"")
    (tmp_path / "latents" / "fmnist_kl_f4").mkdir(parents=True)
    (tmp_path / "latents" / "fmnist_kl_f4" / "manifest.json").write_text("{}")
    assert main(["--smoke", "--out", str(tmp_path), "--stages", "prep", "--decoder-steps", "8"]) == 1
    assert "fine-tuned for 4 steps" in capsys.readouterr().err
