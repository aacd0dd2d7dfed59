"""Tokenizer: trained offline, saved, reloaded (local, bare vocab.txt, fsspec URL), clear errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ldm_train.data.tokenizer import (
    check_vocab_fits,
    load_tokenizer,
    resolve_tokenizer,
    tokenize,
    train_tokenizer,
)

pytestmark = pytest.mark.integration  # starts processes or servers

CAPTIONS = [
    "a red circle on a blue background",
    "two green squares next to a yellow triangle",
    "a small purple star above a large orange circle",
] * 20


def test_train_save_reload_and_ids(tmp_path: Path) -> None:
    tok = train_tokenizer(CAPTIONS, 200, str(tmp_path / "tok"), max_len=12)
    assert len(tok) <= 200
    ids = tokenize(tok, ["A Red Circle", "two green squares next to a yellow triangle on a blue background"], 12)
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    cls_id, sep_id, pad_id = tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]"])
    assert pad_id == 0 and ids[0, 0] == cls_id
    assert ids[0].tolist()[4:] == [sep_id] + [pad_id] * 7  # [CLS] a red circle [SEP] [PAD] ...
    assert tok.decode(ids[0], skip_special_tokens=True) == "a red circle"  # lower-cased
    assert ids[1, -1] == sep_id and (ids[1] != pad_id).all()  # truncated, still ends with [SEP]
    # reloaded from the saved dir, and from a bare vocab.txt (the bert-base-uncased layout): same ids
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "tok" / "vocab.txt", bare / "vocab.txt")
    for path in (tmp_path / "tok", bare):
        assert tokenize(load_tokenizer(str(path), 12), ["A Red Circle", CAPTIONS[1]], 12).tolist() == tokenize(
            tok, ["A Red Circle", CAPTIONS[1]], 12
        ).tolist()


def test_fsspec_url_round_trip() -> None:
    url = "memory://ldm-test-run/tokenizer"
    tok = train_tokenizer(CAPTIONS, 100, url, max_len=8)
    again = load_tokenizer(url, 8)
    assert tokenize(again, CAPTIONS[:3], 8).tolist() == tokenize(tok, CAPTIONS[:3], 8).tolist()


def test_missing_dir_and_vocab_too_big(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer(str(tmp_path / "empty"))
    tok = train_tokenizer(CAPTIONS, 100, str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="vocab_size"):
        check_vocab_fits(tok, len(tok) - 1)


def test_resolve_trains_once_then_reuses(tmp_path: Path) -> None:
    calls = []

    def captions() -> list[str]:
        calls.append(1)
        return CAPTIONS

    tok1, where = resolve_tokenizer(None, str(tmp_path / "run"), captions, 150, 16)
    tok2, where2 = resolve_tokenizer(None, str(tmp_path / "run"), captions, 150, 16)
    assert where == where2 == f"{tmp_path}/run/tokenizer" and len(calls) == 1  # a requeued run reuses it
    assert tok1.get_vocab() == tok2.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        resolve_tokenizer(where, str(tmp_path / "run"), captions, 10, 16)


def test_trained_vocabulary_is_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """The WordPiece trainer numbers pieces in a per-process hash order; the saved tokenizer must not depend on it."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from data_prep.synthetic import sample_scene\n"
        "from ldm_train.data.tokenizer import train_tokenizer\n"
        "train_tokenizer([sample_scene(0, 'train', i)[0].caption for i in range(512)], 512, sys.argv[1], max_len=32)\n"
    )
    repo = Path(__file__).resolve().parents[3]
    outs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"tok{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([sys.executable, "-c", script, str(out)], cwd=repo, env=env, check=True, timeout=300)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert sorted(outs[0]) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert outs[0] == outs[1] == outs[2]
