"""``python -m eval.fid`` with the real FID network on real images (Fashion-MNIST): the train and test splits are
close, the test split and a noisy copy of it (Gaussian, sigma 0.1 of the [0, 1] range) are far apart; saved
statistics give the same FID; KID agrees in direction. Sample counts are small (this is the test suite): the
closing note and README give the 5,000-image numbers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.fashion_mnist import DEFAULT_ROOT, load_split
from eval.fid import main

pytestmark = pytest.mark.skipif(not os.path.isfile(f"{DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz"),
                                reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (.ci/run does)")

N = 120


def _folder(path: Path, images: np.ndarray) -> str:
    path.mkdir(parents=True)
    for i, grey in enumerate(images):
        Image.fromarray(grey, mode="L").convert("RGB").save(path / f"{i:06d}.png")
    return str(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fmnist")
    train, _ = load_split("train", DEFAULT_ROOT)
    test, _ = load_split("t10k", DEFAULT_ROOT)
    noise = np.random.default_rng(0).normal(0.0, 0.1 * 255, test[:N].shape)
    noisy = np.clip(test[:N].astype(np.float64) + noise, 0, 255).round().astype(np.uint8)
    return {"train": _folder(root / "train", train[:N]), "test": _folder(root / "test", test[:N]),
            "noisy": _folder(root / "noisy", noisy), "stats": str(root / "test.npz")}


@pytest.mark.slow  # ~170 s of Inception passes: in CI's end-to-end suite, not the default one
def test_fid_train_vs_test_small_test_vs_noisy_large(sets, capsys) -> None:
    close = main([sets["test"], sets["train"], "--batch-size", "40", "--save-stats", sets["stats"]])
    far = main([sets["test"], sets["noisy"], "--batch-size", "40"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed[0]["fid"] == close["fid"] and printed[1]["fid"] == far["fid"]
    print(f"FID n={N}: train vs t10k {close['fid']:.2f} (KID {close['kid_mean']:.4f}); "
          f"t10k vs noisy {far['fid']:.2f} (KID {far['kid_mean']:.4f})")
    assert close["count_a"] == close["count_b"] == N
    # measured at n=120: FID 88.9 vs 175.8, KID 0.0010 vs 0.1016. FID of 120 images is biased far upwards (2048-d
    # covariances from 120 samples), so the "same distribution" FID is not near 0; KID is unbiased and is.
    assert close["fid"] < 120 and far["fid"] > close["fid"] + 50
    assert abs(close["kid_mean"]) < 0.02 and far["kid_mean"] > 0.05
    # statistics saved by the first call: the same FID to float64 rounding of a different order of summation (the
    # saved mean and covariance against ones recomputed: 1.1e-9 relative apart with one thread per process), no KID
    from_stats = main([sets["stats"], sets["noisy"]])
    assert from_stats["fid"] == pytest.approx(far["fid"], rel=1e-6) and from_stats["kid_mean"] is None


def test_first_side_of_image_shards_reads_one_image(tmp_path) -> None:
    """Image shards without --resolution: the side comes from the first stored image (it used to recurse forever)."""
    import io
    import tarfile

    from PIL import Image

    from eval.fid import _first_side

    path = tmp_path / "000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (40, 32), (i * 100, 0, 0)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    assert _first_side(str(path)) == 32
