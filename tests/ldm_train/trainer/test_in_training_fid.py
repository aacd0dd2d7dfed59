"""The in-training FID (ldm_train/trainer/fid.py) with the real FID Inception: the reference side cached by
content, prompts from the reference captions, and the generated side through the same network.

The sampler is replaced by a fixed image source (the LDM is not what is tested here; the slow sweep test
trains one): it returns reference images by seed, so "generating the reference" must give FID ~ 0.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_train.trainer import fid
from ldm_train.trainer.config import FIDConfig
from ldm_train.trainer.fid import InTrainingFID


def _photos(folder, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = []
    for i in range(n):  # smooth random fields: varied pool3 features, cheap to make
        base = rng.standard_normal((4, 4, 3))
        img = np.asarray(Image.fromarray(((base - base.min()) / np.ptp(base) * 255).astype(np.uint8))
                         .resize((32, 32), Image.BICUBIC))
        Image.fromarray(img).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"caption {i}")
        out.append(img)
    return out


class ImageSource:
    """Stands in for the sample grid: image ``seed`` of a fixed list, with the prompts it was asked for."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = [torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
        self.prompts: list[str] = []

    def load(self, state_dict) -> None:
        pass

    def images_for(self, prompts, seeds, settings) -> torch.Tensor:
        self.prompts += prompts
        return torch.stack([self.images[s % len(self.images)] for s in seeds])


@pytest.fixture(scope="module")
def network():
    from ldm_train.metrics.inception import FIDInception

    return FIDInception()  # loaded once for the module (a TorchScript load takes seconds)


@pytest.fixture()
def reference(tmp_path):
    return tmp_path / "heldout", _photos(tmp_path / "heldout", 8, seed=0)


def _hook(cfg: FIDConfig, source: ImageSource, tmp_path, network=None) -> InTrainingFID:
    grid = type("Grid", (), {"load": source.load, "images": source.images_for})()
    hook = InTrainingFID(cfg, grid, 32, str(tmp_path / "runs"), rank=0, world_size=1, device=torch.device("cpu"))
    hook._net = network
    return hook


def test_generating_the_reference_gives_fid_zero_and_noise_does_not(reference, tmp_path, network) -> None:
    folder, images = reference
    cfg = FIDConfig(every_samples=1, num_samples=8, reference=str(folder), reference_images=0, batch_size=5)
    same = ImageSource(images)
    hook = _hook(cfg, same, tmp_path, network)
    out = hook.measure({})
    assert set(out) == {"fid8", "fid_seconds"}
    assert abs(out["fid8"]) < 1e-3, out
    # the prompts are the reference captions in order, sample i -> caption i
    assert same.prompts == [f"caption {i}" for i in range(8)]

    noise = ImageSource([np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(8)])
    far = _hook(cfg, noise, tmp_path, network).measure({})["fid8"]
    assert far > 100, far


def test_reference_statistics_are_cached_by_content(reference, tmp_path, capsys, network) -> None:
    folder, images = reference
    cfg = FIDConfig(every_samples=1, num_samples=4, reference=str(folder), reference_images=8, batch_size=8)
    first = _hook(cfg, ImageSource(images), tmp_path, network)
    first.prepare()
    assert first.reference.count == 8 and len(first.captions) == 8
    cached = list((tmp_path / "runs" / "_fid_reference").glob("*.npz"))
    assert len(cached) == 1

    again = _hook(cfg, ImageSource(images), tmp_path, network)
    again.prepare()
    assert "reusing reference statistics" in capsys.readouterr().out
    assert torch.equal(again.reference.sum, first.reference.sum)

    # another folder with the same basename and other images: another cache entry, other statistics
    other_folder = tmp_path / "elsewhere" / "heldout"
    other_folder.parent.mkdir()
    _photos(other_folder, 8, seed=1)
    other = _hook(FIDConfig(every_samples=1, num_samples=4, reference=str(other_folder), reference_images=8),
                  ImageSource(images), tmp_path, network)
    other.prepare()
    assert len(list((tmp_path / "runs" / "_fid_reference").glob("*.npz"))) == 2
    assert not torch.equal(other.reference.sum, first.reference.sum)


@pytest.mark.parametrize(("limit", "lines"), [(6, ["3/6 images"]), (0, ["3 images", "6 images"])])
def test_reference_statistics_print_progress_with_the_total(reference, tmp_path, capsys, monkeypatch, limit,
                                                             lines) -> None:
    monkeypatch.setattr(fid, "PROGRESS_EVERY", 3)
    folder, _ = reference  # 8 images
    cfg = FIDConfig(every_samples=1, num_samples=8, reference=str(folder), reference_images=limit, batch_size=5)
    hook = _hook(cfg, ImageSource([]), tmp_path, network=lambda x: torch.zeros(len(x), 2048))
    stats, _, _ = hook._reference_stats()
    assert stats.count == (limit or 8)
    progress = [line.split(": ", 1)[1].split(" (")[0] for line in capsys.readouterr().out.splitlines()
                if line.startswith("[train] in-training FID reference:")]
    assert progress == lines


def test_missing_reference_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="train.fid.reference"):
        _hook(FIDConfig(every_samples=1), ImageSource([]), tmp_path)


def _fmnist_missing() -> bool:
    import os

    from data_prep.fashion_mnist import DEFAULT_ROOT

    return not os.path.isfile(f"{DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz")


@pytest.mark.slow  # two Inception passes: ~80 s on the shared 2-core machine
@pytest.mark.skipif(_fmnist_missing(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_class_fid_samples_take_the_reference_labels_and_recompute_an_unlabelled_cache(tmp_path, network,
                                                                                         capsys) -> None:
    import json

    from data_prep.fashion_mnist import load_split, write_fashion_mnist
    from ldm_train.config import CondConfig

    write_fashion_mnist(str(tmp_path / "t10k"), "t10k", 12, 32, shard_size=12)
    _, labels = load_split("t10k")
    cfg = FIDConfig(every_samples=1, num_samples=6, reference=str(tmp_path / "t10k" / "000000.tar"),
                    reference_images=12, batch_size=6)
    cond = CondConfig(kind="class", num_classes=10)
    noise = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(6)]
    source = ImageSource(noise)
    hook = _hook(cfg, source, tmp_path, network)
    hook.cond = cond
    hook.measure({})
    assert source.prompts == [int(v) for v in labels[:6]]  # sample i: the label of held-out image i

    # a cache written before labels were kept (captions only) is recomputed for a class model, reused for text
    (captions_json,) = (tmp_path / "runs" / "_fid_reference").glob("*.json")
    data = json.loads(captions_json.read_text())
    captions_json.write_text(json.dumps({k: v for k, v in data.items() if k not in ("labels", "label_key")}))
    capsys.readouterr()
    again = _hook(cfg, ImageSource(noise), tmp_path, network)
    again.cond = cond
    again.prepare()
    assert "reusing" not in capsys.readouterr().out and again.labels[:6] == [int(v) for v in labels[:6]]
    text = _hook(cfg, ImageSource(noise), tmp_path, network)
    text.prepare()
    assert "reusing" in capsys.readouterr().out


def test_class_fid_without_reference_labels_cycles_the_classes_and_none_is_plain(tmp_path) -> None:
    from ldm_train.config import CondConfig

    cfg = FIDConfig(every_samples=1, num_samples=8, reference="unused")
    hook = _hook(cfg, ImageSource([]), tmp_path)
    hook.captions, hook.labels = [f"caption {i}" for i in range(4)], [-1] * 4  # a reference without labels
    assert hook.conditions(list(range(6))) == ["caption 0", "caption 1", "caption 2", "caption 3", "caption 0",
                                               "caption 1"]  # text: the captions, cycled
    hook.cond = CondConfig(kind="class", num_classes=3)
    assert hook.conditions(list(range(8))) == [i % 3 for i in range(8)]
    hook.labels = [2, 0, 1, 1]
    assert hook.conditions([0, 1, 2, 3, 4]) == [2, 0, 1, 1, 2]
    hook.labels = [2, 0, 7, 1]  # a label outside the model's classes: not this model's labels, cycle instead
    assert hook.conditions([0, 1, 2]) == [0, 1, 2]
    hook.cond = CondConfig(kind="none")
    assert hook.conditions([0, 1, 2]) == [None, None, None]


def test_bootstrap_logs_the_fids_sampling_noise(reference, tmp_path, network) -> None:
    folder, _ = reference
    noise = ImageSource([np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(8)])
    cfg = FIDConfig(every_samples=1, num_samples=8, reference=str(folder), reference_images=0, batch_size=3,
                    bootstrap=4)
    out = _hook(cfg, noise, tmp_path, network).measure({})
    assert set(out) == {"fid8", "fid8_std", "fid_seconds"}
    assert out["fid8_std"] > 0 and np.isfinite(out["fid8_std"]), out


def test_the_final_measurement_draws_more_and_keeps_the_first_k(reference, tmp_path, network) -> None:
    folder, images = reference
    noise = ImageSource([np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(12)])
    cfg = FIDConfig(every_samples=1, num_samples=6, final_num_samples=12, reference=str(folder),
                    reference_images=0, batch_size=5)
    hook = _hook(cfg, noise, tmp_path, network)
    periodic = hook.measure({})
    final = hook.measure({}, final=True)
    assert set(periodic) == {"fid6", "fid_seconds"} and set(final) == {"fid6", "fid12", "fid_seconds"}
    # the same seeds, the same first six images: equal up to the float32 rounding of the feature pass, whose batches
    # differ when the images are split across threads (3.7e-6 apart at FID ~300 with two threads per process)
    assert final["fid6"] == pytest.approx(periodic["fid6"], rel=1e-7)
    assert final["fid12"] != final["fid6"]
