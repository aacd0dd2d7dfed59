"""The one way every stage is wired to Hydra: ``hydra_app(config_name, schema, run)``.

Every pipeline stage command is such an app: ``ldm_train.train``, ``ldm_train.train_autoencoder``,
``data_prep.encode``, ``data_prep.finalize``, ``data_prep.synthetic``, ``data_prep.fashion_mnist``, ``eval.run``,
``eval.reconstruction`` and ``eval.kinds`` (bench/ and studies/ scripts and the small tools take argparse flags).
Each has a typed root config: a dataclass registered in Hydra's ConfigStore as
``<config_name>_schema``, which ``conf/<config_name>.yaml`` lists first in its defaults, so the YAML holds
presets only and a mistyped key or value fails at composition. The composed config is converted to the
dataclass ONCE, here, and the app's ``run(cfg)`` receives that object. ``run``'s return value is the exit
status (Hydra drops a task's return value, so a non-zero code is raised as ``SystemExit``). A key given twice on
the command line, a key no schema field reads, a key the schema has renamed (its ``renamed_keys`` table: the error
names the new key), a non-finite or out-of-range number and a string setting outside its choices are refused, naming
the key (``ldm_train.config_checks``); so is a required key left unset (``???``), with the app's usage line when it
has one. ``--help`` composes the config and fills the app's help template without Hydra's
listing of every config group; the apps import torch only inside ``run``, so help answers in about a second.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

# the configs ship inside the package (ldm_train/conf; the repo's conf/ is a link to it), so installed commands
# find them from any directory; LDM_TRAIN_CONF points at another tree of the same layout
CONF_DIR = Path(os.environ.get("LDM_TRAIN_CONF", Path(__file__).resolve().parent / "conf"))
HYDRA_VERSION_BASE = "1.3"


def register_schema(config_name: str, schema: type) -> None:
    """Register the group schemas and ``schema`` as ``<config_name>_schema`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from ldm_train.config import register_configs

    register_configs()
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)


def to_config(cfg: DictConfig, schema: type) -> Any:
    """The composed config as an instance of ``schema`` (interpolations resolved, unknown keys, non-finite or
    out-of-range values and values outside a setting's choices refused: ``ldm_train.config_checks``)."""
    from ldm_train.config_checks import check_config

    if isinstance(cfg, schema):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    typed = OmegaConf.to_object(merged)
    check_config(typed, renamed_keys(schema))
    return typed


def renamed_keys(schema: type) -> dict[str, str]:
    """The keys ``schema`` has renamed, old -> new (its ``renamed_keys`` class attribute; none by default)."""
    return getattr(schema, "renamed_keys", {})


def config_yaml(cfg: Any) -> str:
    """A config dataclass (or DictConfig) as resolved YAML, for run dirs and exports."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg, resolve=True)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass (or DictConfig) as plain containers, for W&B and JSON."""
    node = OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _compose(config_name: str, schema: type, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ldm_train.config_checks import renamed_overrides

    if error := renamed_overrides(overrides, renamed_keys(schema)):
        raise ValueError(error)
    register_schema(config_name, schema)  # overrides given twice: the last wins (a caller's defaults, then its own)
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no {config_name}.yaml in {CONF_DIR}: set LDM_TRAIN_CONF to a conf/ directory of this layout or unset it to use the packaged ldm_train/conf")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=HYDRA_VERSION_BASE):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)


def compose(config_name: str, schema: type, overrides: list[str] | None = None) -> Any:
    """The typed root config of an app without running it (Hydra's compose API: no output dir, no logging)."""
    return to_config(_compose(config_name, schema, overrides or []), schema)


def app_help(config_name: str, schema: type, overrides: list[str], resolve: bool = False) -> str | None:
    """What Hydra's ``--help`` prints: the app's ``hydra.help.template`` with ``$CONFIG`` (the composed config, the
    ``hydra`` node removed). Hydra lists every config group first, whether the template shows them or not: ~2 s of
    copies for conf/train.yaml. None when the template asks for more than ``$CONFIG`` (Hydra's own help then)."""
    import string

    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _compose(config_name, schema, overrides, with_hydra=True)
        template = string.Template(cfg.hydra.help.template)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves under --resolve, as in Hydra's help
        with open_dict(cfg):
            del cfg["hydra"]
        return template.substitute(CONFIG=OmegaConf.to_yaml(cfg, resolve=resolve))
    except KeyError:
        return None  # the template shows the config groups or flags: Hydra's help builds them
    except (HydraException, OmegaConfBaseException):
        return None  # Hydra's help reports the error in its own words


def missing_keys_error(config_name: str, cfg: DictConfig, usage: str | None = None) -> str | None:
    """The error for the required keys (``???``) that ``cfg`` leaves unset, with ``usage`` (None: all are set)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if not missing:
        return None
    given = " ".join(f"{key}=..." for key in missing)
    return (f"[{config_name}] required key{'s' if len(missing) > 1 else ''} not set: {', '.join(missing)} "
            f"(give {given} on the command line)" + (f"\nusage: {usage}" if usage else ""))


def hydra_app(config_name: str, schema: type, run: Callable[[Any], Any], usage: str | None = None) -> None:
    """Parse the command line with Hydra (overrides, ``-m`` sweeps, launchers) and call ``run(typed_cfg)``.

    ``usage``: an example command, printed when a required key is not set."""
    import hydra
    from hydra._internal.utils import get_args_parser

    from ldm_train.config_checks import duplicate_overrides, renamed_overrides

    args = get_args_parser().parse_known_args()[0]
    if error := duplicate_overrides(args.overrides) or renamed_overrides(args.overrides, renamed_keys(schema)):
        raise SystemExit(f"[{config_name}] {error}")
    if args.help and not (args.config_path or args.config_name or args.config_dir):
        if (text := app_help(config_name, schema, args.overrides, args.resolve)) is not None:
            print(text)
            return
    register_schema(config_name, schema)

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=HYDRA_VERSION_BASE)
    def _app(cfg: DictConfig) -> None:
        if error := missing_keys_error(config_name, cfg, usage):
            raise SystemExit(error)
        code = run(to_config(cfg, schema))
        if isinstance(code, int) and code:
            raise SystemExit(code)

    _app()
