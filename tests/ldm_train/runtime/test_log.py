"""The rank-0 logger: one line per event from the job, with its prefix."""
from __future__ import annotations

from ldm_train.runtime.log import rank0_logger


def test_rank0_prints_with_the_prefix_and_other_ranks_stay_quiet(monkeypatch, capsys) -> None:
    log = rank0_logger("train")
    monkeypatch.setenv("RANK", "0")
    log("step 1")
    log("checkpoint damaged", err=True)
    monkeypatch.setenv("RANK", "1")
    log("step 1 again")
    out, err = capsys.readouterr()
    assert out == "[train] step 1\n" and err == "[train] checkpoint damaged\n"
