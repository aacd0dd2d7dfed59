"""The first-stage trainer's log lines carry throughput and an ETA."""
from __future__ import annotations

import re

from ldm_train.first_stage.trainer import train

from .helpers import ae_cfg


def test_log_lines_show_images_per_second_and_eta(tmp_path, shapes32, capsys) -> None:
    train(ae_cfg(tmp_path, shapes32, "train.max_steps=4", "train.log_every=2"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"\[train_autoencoder\] step \d+/4 ", ln)]
    assert len(lines) == 2
    assert re.search(r"\| [\d.e+]+ img/s, ETA \d+:\d\d:\d\d$", lines[0])
    assert lines[-1].endswith("ETA 0:00:00")  # the last interval: nothing left
