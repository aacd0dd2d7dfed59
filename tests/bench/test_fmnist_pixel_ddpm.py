"""bench/fmnist_pixel_ddpm.py (the diffusers pixel baseline): a snapshot records the UNet width it was trained with,
sampling builds that UNet without being told, and a contradicting --width is refused naming the snapshot."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_prep.fashion_mnist import DEFAULT_ROOT, write_fashion_mnist
from tests.bench import load_script

pytestmark = pytest.mark.skipif(not os.path.isfile(f"{DEFAULT_ROOT}/train-images-idx3-ubyte.gz"),
                                reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (.ci/run does)")


@pytest.fixture
def bench():
    import torch

    threads = torch.get_num_threads()  # the bench sets its --threads in this process: given back afterwards
    yield load_script("fmnist_pixel_ddpm")
    torch.set_num_threads(threads)


def test_sampling_takes_the_width_of_the_snapshot(bench, tmp_path: Path) -> None:
    write_fashion_mnist(str(tmp_path / "data"), "train", limit=32, resolution=32, shard_size=32)
    out = tmp_path / "run"
    bench.main(["train", "--data", str(tmp_path / "data"), "--out", str(out), "--budget-s", "1",
                "--snapshot-every-s", "100", "--width", "8", "--batch-size", "8", "--warmup-steps", "1"])
    rows = [json.loads(line) for line in (out / "snapshots.jsonl").read_text().splitlines()]
    assert rows and all(r["width"] == 8 for r in rows)

    images = tmp_path / "images"
    bench.main(["sample", "--out", str(out), "--num-samples", "2", "--steps", "2", "--images", str(images)])
    assert sorted(p.name for p in images.glob("*.png")) == ["000000.png", "000001.png"]

    with pytest.raises(SystemExit, match=rf"--width 32: snapshot '{rows[-1]['name']}' .* --width 8"):
        bench.main(["sample", "--out", str(out), "--width", "32", "--num-samples", "1", "--steps", "2",
                    "--images", str(tmp_path / "other")])
    # rows written before the width was recorded: --width, else the recipe's 32
    assert bench._snapshot_width([{"name": "a"}], "a", None, out) == 32
    assert bench._snapshot_width([{"name": "a"}], "a", 8, out) == 8
    with pytest.raises(SystemExit, match="no snapshot 'b'"):
        bench._snapshot_width([{"name": "a"}], "b", None, out)
