"""Settings a resumed run may not change silently: they change what the run means (its data, first stage, model,
objective, batch or length). The run dir's ``config.yaml`` is the previous session's; a resume that differs in any
of these stops with the keys, old and new values, and the override that accepts them (``train.allow_changed``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

PINNED = (
    "data.latents_root", "data.manifest", "data.shards", "data.resolution", "data.scale_factor",
    "first_stage.name", "first_stage.checkpoint", "cond", "unet", "text_encoder",
    "train.global_batch", "train.total_samples", "train.diffusion", "train.caption_dropout",
)


def _fill_absent(prev: Any, cur: Any, default: Any) -> Any:
    """``prev`` with each key that only ``cur`` has set to its schema default: a setting added to the schema after
    the previous session wrote its config.yaml had its default value then."""
    if not (isinstance(prev, dict) and isinstance(cur, dict) and isinstance(default, dict)):
        return prev
    out = dict(prev)
    for k, v in cur.items():
        if k in prev:
            out[k] = _fill_absent(prev[k], v, default.get(k))
        elif k in default:
            out[k] = default[k]
    return out


def changed_settings(previous: Any, current: Any) -> dict[str, tuple[Any, Any]]:
    """{key: (previous, current)} for the pinned keys whose resolved values differ (a key the previous config lacks
    counts as its schema default)."""
    from ldm_train.trainer.config import TrainAppConfig

    prev = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(previous), resolve=True))
    cur = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(current), resolve=True))
    defaults = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(TrainAppConfig)))
    out: dict[str, tuple[Any, Any]] = {}
    for key in PINNED:
        a, b = OmegaConf.select(prev, key, default=None), OmegaConf.select(cur, key, default=None)
        a = OmegaConf.to_container(a) if OmegaConf.is_config(a) else a
        b = OmegaConf.to_container(b) if OmegaConf.is_config(b) else b
        d = OmegaConf.select(defaults, key, default=None)
        a = _fill_absent(a, b, OmegaConf.to_container(d) if OmegaConf.is_config(d) else d)
        if a != b:
            out[key] = (a, b)
    return out


def check_resume_settings(run_dir: Path, current: Any, allowed: list[str]) -> list[str]:
    """Raise ValueError when a pinned setting changed and is not in ``allowed``; returns the allowed changes."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    changed = changed_settings(OmegaConf.load(path), current)
    refused = {k: v for k, v in changed.items() if "*" not in allowed and k not in allowed}
    if refused:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}"[:400] for k, (old, new) in refused.items())
        keys = ",".join(refused)
        raise ValueError(
            f"resuming {run_dir} with settings that change what the run means:\n{lines}\n"
            f"start a new run (run_name=...), or accept the change with train.allow_changed=[{keys}]")
    return sorted(changed)
