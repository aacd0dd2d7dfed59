"""Parameter counts and FLOPs of a composed model: ``python -m ldm_train.summary experiment=txt2img_1p45b``.

Composes ``conf/train.yaml`` with the given Hydra overrides (any ``first_stage=``, ``unet=``,
``text_encoder=``, ``data.resolution=``...) and prints ONE JSON object. Every model is built on the meta
device, so the 1.45B configuration allocates nothing; FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; a multiply-add counts 2).
``train_flops_per_sample`` is forward + backward of everything trained (UNet + text encoder) for one
sample, without activation-checkpoint recomputation: the model FLOPs to use for MFU.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from ldm_train.config import register_configs
from ldm_train.trainer.config import register_trainer_configs

# the configs ship inside the package (ldm_train/conf; the repo's conf/ is a link to it), so installed commands
# find them from any directory; LDM_TRAIN_CONF points at another tree of the same layout
CONF_DIR = Path(os.environ.get("LDM_TRAIN_CONF", Path(__file__).resolve().parent / "conf"))


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The composed root config (Hydra compose API: no output dir, no logging setup)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    register_trainer_configs()
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no {config_name}.yaml in {CONF_DIR}: set LDM_TRAIN_CONF to a conf/ directory of this layout or unset it to use the packaged ldm_train/conf")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    from ldm_train.flops import summarize  # torch loads here: --help stays fast

    print(json.dumps(summarize(compose_config(args))))


if __name__ == "__main__":
    main()
