"""FID, Inception Score and precision/recall through torch-fidelity, with local weights only.

torch-fidelity uses ONE ``feature_extractor_weights_path`` per call, so the metrics run in two calls:
InceptionV3 for FID + IS, VGG16 (fc2_relu, k=3 neighbourhood) for precision/recall. input1 is the
GENERATED set and input2 the REFERENCE set (precision = fraction of generated samples inside the real
manifold, recall = fraction of real samples inside the generated one).

``extractor: random-init`` swaps both networks for small fixed-seed conv nets registered with
torch-fidelity: the numbers are plumbing checks only and are flagged so in metrics.json.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ldm_train.metrics.fid import RANDOM_INIT_FLAG, RandomInitFeatures

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# torch-fidelity's names for the pretrained networks, and our registered random-init stand-ins
PRETRAINED = {"fid_isc": "inception-v3-compat", "prc": "vgg16"}
RANDOM_INIT = {"fid_isc": "ldm-random-init-a", "prc": "ldm-random-init-b"}
_RANDOM_SEEDS = {"ldm-random-init-a": 1234, "ldm-random-init-b": 4321}


class RandomInitExtractor(FeatureExtractorBase):
    """torch-fidelity adapter of :class:`RandomInitFeatures` (features "feat" 64-d, "logits" 10-d)."""

    def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
        super().__init__(name, features_list)
        self.net = RandomInitFeatures(seed=_RANDOM_SEEDS.get(name, 0))

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("feat", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats, logits = self.net.features_and_logits(x)
        out = {"feat": feats, "logits": logits}
        return tuple(out[name] for name in self.features_list)


def register_random_init_extractors() -> None:
    """Register the random-init stand-ins with torch-fidelity (idempotent)."""
    for name in RANDOM_INIT.values():
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, RandomInitExtractor)


@dataclass
class FidelityConfig:
    """What ``metrics`` in conf/eval.yaml holds."""

    fid: bool = True
    isc: bool = True
    prc: bool = True
    extractor: str = "pretrained"  # "pretrained" (Inception + VGG16 from local files) or "random-init"
    inception_weights: str | None = None
    vgg16_weights: str | None = None
    prc_neighborhood: int = 3
    isc_splits: int = 10
    batch_size: int = 64
    cache_dir: str | None = None
    save_cpu_ram: bool = False  # True: no DataLoader worker processes (small CPU machines)


def check_weights(cfg: FidelityConfig) -> None:
    """Raise (before any sampling) when a pretrained network's weights file is not configured or missing."""
    if cfg.extractor == "random-init":
        return
    if cfg.extractor != "pretrained":
        raise ValueError(f"metrics.extractor={cfg.extractor!r}: use 'pretrained' or 'random-init'")
    needed = []
    if cfg.fid or cfg.isc:
        needed.append(("metrics.inception_weights", cfg.inception_weights, INCEPTION_URL))
    if cfg.prc:
        needed.append(("metrics.vgg16_weights", cfg.vgg16_weights, VGG16_URL))
    for key, path, url in needed:
        if not path or not os.path.isfile(path):
            where = f"the file {path} does not exist" if path else "it is not set"
            raise FileNotFoundError(
                f"{key}: {where}. Download {url} on a machine with internet, copy it here and pass "
                f"{key}=/path/to/{url.rsplit('/', 1)[1]} (nothing is downloaded at run time; "
                "metrics.extractor=random-init runs the plumbing without pretrained weights)"
            )


def _call(cfg: FidelityConfig, generated: str, reference: str, reference_key: str, which: str,
          **metrics: bool) -> dict[str, float]:
    if cfg.extractor == "random-init":
        register_random_init_extractors()
        extractor, weights = RANDOM_INIT[which], None
    else:
        extractor = PRETRAINED[which]
        weights = cfg.inception_weights if which == "fid_isc" else cfg.vgg16_weights
    use_reference = metrics.get("fid") or metrics.get("prc")
    kwargs: dict[str, Any] = dict(
        input1=generated,
        cuda=torch.cuda.is_available(),
        batch_size=cfg.batch_size,
        feature_extractor=extractor,
        feature_extractor_weights_path=weights,
        prc_neighborhood=cfg.prc_neighborhood,
        save_cpu_ram=cfg.save_cpu_ram,
        samples_find_ext="png,jpg,jpeg",
        verbose=False,
        cache=cfg.cache_dir is not None,
        cache_root=cfg.cache_dir,
        **metrics,
    )
    if metrics.get("isc"):
        n = count_images(generated)
        # fewer images than splits leaves empty splits (NaN); the paper protocol uses 10 splits
        kwargs["isc_splits"] = max(1, min(cfg.isc_splits, n))
    if use_reference:
        # torch-fidelity appends the extractor name and layer to this cache key
        kwargs.update(input2=reference, input2_cache_name=reference_key)
    return torch_fidelity.calculate_metrics(**kwargs)


def count_images(folder: str) -> int:
    exts = (".png", ".jpg", ".jpeg")
    return sum(1 for f in os.listdir(folder) if f.lower().endswith(exts))


def compute_fidelity(cfg: FidelityConfig, generated: str, reference: str | None,
                     reference_key: str | None) -> dict[str, Any]:
    """FID / IS / precision / recall of the image folder ``generated`` against the folder ``reference``.

    Returns flat metrics plus ``feature_extractor`` ("pretrained" or the random-init flag).
    """
    if (cfg.fid or cfg.prc) and reference is None:
        raise ValueError("FID and precision/recall need a reference set: set reference.path=... "
                         "(an image folder or raw shards) or metrics.fid=false metrics.prc=false")
    check_weights(cfg)
    out: dict[str, Any] = {}
    if cfg.fid or cfg.isc:
        raw = _call(cfg, generated, reference or "", reference_key or "", "fid_isc", fid=cfg.fid, isc=cfg.isc)
        if cfg.fid:
            out["fid"] = raw["frechet_inception_distance"]
        if cfg.isc:
            out["is_mean"] = raw["inception_score_mean"]
            out["is_std"] = raw["inception_score_std"]
    if cfg.prc:
        raw = _call(cfg, generated, reference or "", reference_key or "", "prc", prc=True)
        out.update(precision=raw["precision"], recall=raw["recall"], f_score=raw["f_score"])
    out["feature_extractor"] = RANDOM_INIT_FLAG if cfg.extractor == "random-init" else "pretrained"
    out["extractors"] = RANDOM_INIT if cfg.extractor == "random-init" else PRETRAINED
    return out
