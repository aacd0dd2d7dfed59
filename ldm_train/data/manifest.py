"""The latent-shard manifest (``manifest.json`` beside the shards): read it and check it against the model.

Contract (DESIGN.md "Latent shards"; written by ``data_prep``): ``schema_version``, ``first_stage`` {name, kind,
downsample_factor, z_channels, checkpoint, sha256}, ``resolution``, ``latent_shape``, ``stored``
("moments" for KL: [2*z, h, w] mean then logvar; "prequant" for VQ: [z, h, w]), ``num_samples``,
``num_shards``, ``shards`` [{name, num_samples}], per-channel latent ``mean``/``std``, ``scale_factor``,
``skipped`` {reason: count}.

Dependency-light on purpose (json + fsspec): ``data_prep`` may import it, ``ldm_train`` must not import
``data_prep``.
"""
from __future__ import annotations

import json
from typing import Any

import fsspec

from ldm_train.data import fsspec_io

MANIFEST_NAME = "manifest.json"
SUPPORTED_SCHEMA_VERSIONS = (1,)


class ManifestError(ValueError):
    """The shards do not fit the configured model (or the manifest is missing/invalid)."""


def manifest_url(url: str) -> str:
    """``url`` itself if it names a .json file, else ``<url>/manifest.json``."""
    return url if url.endswith(".json") else url.rstrip("/") + "/" + MANIFEST_NAME


def read_manifest(url: str) -> dict[str, Any]:
    """Load the manifest of a shard directory (local path or fsspec URL; a directory or the json itself)."""
    path = manifest_url(url)
    try:
        with fsspec.open(path, "rt") as f:
            manifest = json.load(f)
    except FileNotFoundError as err:
        raise ManifestError(
            f"no manifest at {path}: encode the images with `python -m data_prep.encode` (and "
            f"`python -m data_prep.finalize` after an array job), or point data.shards at the folder holding "
            f"shard-*.tar and manifest.json"
        ) from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"manifest {path} is not valid JSON ({err}): re-run data_prep.finalize") from err
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ManifestError(
            f"manifest {path} has schema_version={version!r}; this ldm_train reads {SUPPORTED_SCHEMA_VERSIONS}: "
            f"re-encode with a matching data_prep or update ldm_train"
        )
    manifest["_url"] = path
    return manifest


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def check_manifest(
    manifest: dict[str, Any],
    first_stage_cfg: Any,
    unet_cfg: Any | None = None,
    resolution: int | None = None,
    verify_checkpoint: bool = False,
) -> None:
    """Refuse shards that do not fit the model config, naming the value and the fix.

    ``first_stage_cfg`` is a FirstStageConfig (or dict), ``unet_cfg`` a UNetConfig (optional),
    ``resolution`` the configured ``data.resolution`` (optional). ``verify_checkpoint`` hashes the configured
    ``first_stage.checkpoint`` (when both it and the manifest's sha256 are set): latents decoded by another
    autoencoder than the one that encoded them come out as noise.
    """
    url = manifest.get("_url", "manifest")
    fs = manifest.get("first_stage") or {}
    name = _get(first_stage_cfg, "name")
    fix = f"re-encode with `python -m data_prep.encode first_stage={name}` or pick first_stage={fs.get('name')}"
    z = int(_get(first_stage_cfg, "embed_dim"))
    problems = []
    for key, want in (
        ("kind", _get(first_stage_cfg, "kind")),
        ("downsample_factor", int(_get(first_stage_cfg, "downsample_factor"))),
        ("z_channels", z),
    ):
        if fs.get(key) != want:
            problems.append(f"{key}={fs.get(key)} but first_stage {name} has {want}")
    if not problems and fs.get("name") != name:
        # same shape but another autoencoder: its latents would decode to garbage with ours
        problems.append(f"first_stage name={fs.get('name')} but the configured first_stage is {name}")
    want_stored = "moments" if _get(first_stage_cfg, "kind") == "kl" else "prequant"
    if manifest.get("stored") != want_stored:
        problems.append(f"stored={manifest.get('stored')} but a {_get(first_stage_cfg, 'kind')} first stage needs {want_stored}")
    if problems:
        raise ManifestError(f"manifest {url} says " + "; ".join(problems) + f": {fix}")

    shape = list(manifest.get("latent_shape") or [])
    if len(shape) != 3 or shape[0] not in (z, 2 * z):
        raise ManifestError(f"manifest {url} has latent_shape={shape}, expected [{z} or {2 * z}, h, w]: {fix}")
    if resolution is not None and manifest.get("resolution") != int(resolution):
        raise ManifestError(
            f"manifest {url} says resolution={manifest.get('resolution')} but data.resolution={resolution}: "
            f"set data.resolution={manifest.get('resolution')} or re-encode at {resolution} px"
        )
    if unet_cfg is not None:
        size = int(_get(unet_cfg, "image_size"))
        if shape[1:] != [size, size]:
            raise ManifestError(
                f"manifest {url} has latents of {shape[1]}x{shape[2]} but unet.image_size={size}: "
                f"set data.resolution={manifest.get('resolution')} (image_size = resolution / f) or re-encode"
            )
        in_ch = int(_get(unet_cfg, "in_channels")) - int(_get(unet_cfg, "concat_channels", 0) or 0)
        if in_ch != z:
            raise ManifestError(
                f"manifest {url} has z_channels={z} but unet.in_channels={in_ch} (without concat channels): "
                f"the unet preset must take in_channels from first_stage.embed_dim"
            )
    checkpoint = _get(first_stage_cfg, "checkpoint")
    if verify_checkpoint and checkpoint and fs.get("sha256"):
        sha = fsspec_io.sha256(str(checkpoint))
        if sha != fs["sha256"] and _encoder_source(str(checkpoint)) != fs["sha256"]:
            raise ManifestError(
                f"manifest {url} was encoded with first stage {fs.get('checkpoint')} (sha256 {fs['sha256'][:12]}...) "
                f"but first_stage.checkpoint={checkpoint} has sha256 {sha[:12]}...: point first_stage.checkpoint at "
                f"the encoding checkpoint (or a decoder fine-tune of it: train.trainable=decoder) or re-encode with this one"
            )


def _encoder_source(checkpoint: str) -> str | None:
    """The sha256 a decoder fine-tune's export names as its encoder's source (None for any other file): latents
    encoded with that source decode with it."""
    from ldm_train.checkpoints.first_stage import ENCODER_SHA256
    from ldm_train.checkpoints.safe_load import check_safetensors_header

    try:  # the safetensors header only: 8 bytes of length, then JSON with the string metadata
        with fsspec_io.open_url(checkpoint, "rb") as f:
            head = f.read(8)
            size = f.seek(0, 2)
            f.seek(8)
            header = json.loads(f.read(check_safetensors_header(checkpoint, head, size)))
    except (OSError, ValueError):  # not a safetensors file: no such record
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata.get(ENCODER_SHA256) if isinstance(metadata, dict) else None


def shard_list(manifest: dict[str, Any], base_url: str | None = None) -> list[tuple[str, int]]:
    """(url, num_samples) of every shard, in manifest order; names are relative to the manifest's folder."""
    base = (base_url or manifest["_url"].rsplit("/", 1)[0]).rstrip("/")
    out = []
    for shard in manifest.get("shards", []):
        name = shard["name"]
        url = name if "://" in name or name.startswith("/") else f"{base}/{name}"
        out.append((url, int(shard["num_samples"])))
    if not out:
        raise ManifestError(f"manifest {manifest.get('_url')} lists no shards: re-run data_prep.finalize")
    return out
