"""BERT WordPiece tokenization of captions, fully offline.

Either a directory the user provides (a ``bert-base-uncased`` ``vocab.txt``, or a saved tokenizer with
``tokenizer.json``; local path or fsspec URL), or a WordPiece vocabulary trained with ``tokenizers`` on the
caption corpus and saved beside the run. Both end as the same transformers fast BERT tokenizer (lower-case,
``[CLS] caption [SEP]``, ``[PAD]`` padding), as CompVis ``BERTTokenizer`` uses for the paper's model.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from transformers import BertTokenizer, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local_dir(path: str) -> str:
    """Copy a tokenizer directory from an fsspec URL to a temp dir (tokenizers read local files only)."""
    if not _is_remote(path):
        return path.removeprefix("file://")
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist: set text_encoder.tokenizer to a "
                                "directory with vocab.txt or tokenizer.json, or null to train one on the captions")
    dest = tempfile.mkdtemp(prefix="ldm_tokenizer_")
    for name in _FILES:
        if fs.exists(f"{root}/{name}"):
            fs.get(f"{root}/{name}", os.path.join(dest, name))
    return dest


def load_tokenizer(path: str, max_len: int | None = None) -> PreTrainedTokenizerBase:
    """Load a BERT WordPiece tokenizer from a directory (``tokenizer.json`` or a bare ``vocab.txt``).

    Never touches the network: a missing directory or file is an error naming the path and the fix.
    """
    local = Path(_local_dir(str(path)))
    if not local.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist: set text_encoder.tokenizer to a directory holding a "
            "bert-base-uncased vocab.txt (or a saved tokenizer.json), or to null to train a WordPiece "
            "tokenizer on the caption corpus"
        )
    if (local / "tokenizer.json").is_file():
        tok = BertTokenizer.from_pretrained(str(local), local_files_only=True)
    elif (local / "vocab.txt").is_file():
        # a bare vocab (bert-base-uncased layout): one token per line, the id is the line number
        lines = (local / "vocab.txt").read_text(encoding="utf-8").splitlines()
        tok = BertTokenizer(vocab={t: i for i, t in enumerate(lines)}, do_lower_case=True)
    else:
        raise FileNotFoundError(
            f"tokenizer directory {path} holds neither tokenizer.json nor vocab.txt: copy the bert-base-uncased "
            "vocab.txt there or point text_encoder.tokenizer elsewhere"
        )
    if max_len is not None:
        tok.model_max_length = max_len
    return tok


def _seed_tokens(wp: Any, captions: list[str]) -> list[str]:
    """The special tokens, then every character and every ``##``-continuation character of the corpus, sorted.

    Makes the trained vocabulary the same bytes in every process. The ``tokenizers`` WordPiece (BPE) trainer
    breaks ties between equally frequent merges by token id, and it numbers the ``##c`` continuation pieces in the
    iteration order of a Rust hash map that is seeded afresh in each process: two runs on the same captions got
    different merges, hence different ids for the same words. Passing these pieces up front, in sorted order,
    fixes their ids (the trainer adds tokens it already has only once), so every later merge and id is fixed too.
    The vocabulary holds the same pieces as before: the characters and the continuation characters of the corpus.
    """
    firsts: set[str] = set()
    rest: set[str] = set()
    for start in range(0, len(captions), 1024):  # words never span whitespace: split a joined chunk at once
        text = wp.normalizer.normalize_str("\n".join(captions[start:start + 1024]))
        for word, _ in wp.pre_tokenizer.pre_tokenize_str(text):
            firsts.add(word[0])
            rest.update(word[1:])
    chars = sorted((firsts | rest) - set(SPECIAL_TOKENS))
    return [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in sorted(rest))]


def train_tokenizer(
    captions: Iterable[str], vocab_size: int, out_dir: str, max_len: int = 77
) -> PreTrainedTokenizerBase:
    """Train a lower-case WordPiece vocabulary (at most ``vocab_size`` entries) and save it to ``out_dir``.

    ``out_dir`` may be an fsspec URL (saved locally first, then uploaded). The result loads back with
    ``load_tokenizer(out_dir)``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"tokenizer vocab_size {vocab_size} is too small: need more than {len(SPECIAL_TOKENS)}")
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    captions = list(captions)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=_seed_tokens(wp, captions),
                                        show_progress=False)
    wp.train_from_iterator(captions, trainer=trainer)
    # rebuild as the standard BERT tokenizer from the learnt vocab: one code path for trained and given vocabs
    vocab = wp.get_vocab()
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_len)

    def save(directory: str) -> None:
        tok.save_pretrained(directory)
        # also the plain vocab.txt (id = line number), the format other BERT tooling reads
        with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(sorted(vocab, key=vocab.__getitem__)) + "\n")

    if _is_remote(out_dir):
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            fs, root = fsspec.core.url_to_fs(out_dir)
            fs.makedirs(root, exist_ok=True)
            for name in os.listdir(tmp):
                fs.put(os.path.join(tmp, name), f"{root}/{name}")
    else:
        os.makedirs(out_dir.removeprefix("file://"), exist_ok=True)
        save(out_dir.removeprefix("file://"))
    return tok


def check_vocab_fits(tokenizer: PreTrainedTokenizerBase, vocab_size: int, where: str = "") -> None:
    """Refuse a tokenizer whose ids would index past the text encoder's token embedding."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer {where or ''} has {len(tokenizer)} tokens but text_encoder.vocab_size is {vocab_size}: "
            f"set text_encoder.vocab_size>={len(tokenizer)} or use a smaller vocabulary"
        )


def resolve_tokenizer(
    path: str | None,
    run_dir: str,
    captions: Callable[[], Iterable[str]],
    vocab_size: int,
    max_len: int,
) -> tuple[PreTrainedTokenizerBase, str]:
    """The trainer's rule: the configured directory; else ``<run_dir>/tokenizer`` if a previous attempt of
    this run saved one (requeue); else train one on ``captions()`` and save it there. Returns (tokenizer, dir).
    """
    if path:
        tok, where = load_tokenizer(path, max_len), path
    else:
        where = f"{run_dir.rstrip('/')}/tokenizer"
        fs, root = fsspec.core.url_to_fs(where)
        if fs.exists(f"{root}/vocab.txt") or fs.exists(f"{root}/tokenizer.json"):
            tok = load_tokenizer(where, max_len)
        else:
            tok = train_tokenizer(captions(), vocab_size, where, max_len)
    check_vocab_fits(tok, vocab_size, where)
    return tok, where


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_len: int) -> torch.Tensor:
    """Token ids [B, max_len] (LongTensor): ``[CLS] ... [SEP]`` then ``[PAD]``, truncated to max_len."""
    enc = tokenizer(
        list(captions), truncation=True, max_length=max_len, padding="max_length", return_tensors="pt"
    )
    return enc["input_ids"].long()


class BatchTokenizer:
    """``tokenize(tokenizer, captions, max_len)`` at about half the CPU cost.

    It calls the tokenizer's Rust backend (a private copy with truncation and padding to ``max_len``) directly,
    skipping the Python wrapper's per-call set-up; the ids are the same (tests check it). Tokenizers without a
    backend (slow, pure-Python ones) go through ``tokenize``. Picklable, so it can ride into loader workers.
    """

    def __init__(self, tokenizer: Any, max_len: int) -> None:
        self.max_len = max_len
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.tokenizer = None if backend is not None else tokenizer
        self.backend = None
        if backend is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())  # our own copy: its settings stay ours
            self.backend.enable_truncation(max_len)
            self.backend.enable_padding(length=max_len, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if self.backend is None:
            return tokenize(self.tokenizer, captions, self.max_len)
        ids = np.array([e.ids for e in self.backend.encode_batch(list(captions))], dtype=np.int64)
        return torch.from_numpy(ids.reshape(len(captions), self.max_len))
