"""``ldm-slurm``: where the sbatch scripts of this package are, or a copy of them to edit.

    ldm-slurm path            # the folder: sbatch "$(ldm-slurm path)/train_txt2img.sh" experiment=...
    ldm-slurm copy DIR        # DIR/train_txt2img.sh, ... and common.sh, which every stage script sources

The scripts ship inside the package (``ldm_train/slurm/``; ``slurm/`` at the top of a checkout links there), so
an installed wheel has them too. Imports only the standard library: no torch start-up for a path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parent / "slurm"


def scripts() -> list[Path]:
    """The shell files of the folder: the stage scripts, pipeline.sh and common.sh."""
    return sorted(SLURM_DIR.glob("*.sh"))


def copy_scripts(dest: Path, force: bool = False) -> list[Path]:
    """Copy every script into `dest` (created if missing), keeping the executable bits; returns the copies.
    Refuses to overwrite an existing file unless `force`, before copying anything."""
    targets = [(src, dest / src.name) for src in scripts()]
    existing = [str(t) for _, t in targets if t.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist: pass --force to overwrite, or copy elsewhere")
    dest.mkdir(parents=True, exist_ok=True)
    for src, target in targets:
        shutil.copy2(src, target)
    return [t for _, t in targets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ldm-slurm", description="The sbatch scripts of ldm-train: their folder, or a copy of them to edit.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help="print the folder holding the sbatch scripts")
    copy = sub.add_parser("copy", help="copy the scripts (with common.sh) into DIR, e.g. to change #SBATCH lines")
    copy.add_argument("dir", type=Path, help="destination folder (created if missing)")
    copy.add_argument("--force", action="store_true", help="overwrite scripts that already exist there")
    args = parser.parse_args(argv)

    if args.command == "path":
        print(SLURM_DIR)
        return 0
    try:
        copied = copy_scripts(args.dir, force=args.force)
    except FileExistsError as err:
        print(f"ldm-slurm copy: {err}", file=sys.stderr)
        return 1
    for path in copied:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
