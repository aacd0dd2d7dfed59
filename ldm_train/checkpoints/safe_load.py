"""Loading torch files without running code from them.

A torch file is a pickle: ``torch.load(weights_only=False)`` runs whatever the pickle asks for. Everything this
project loads goes through ``torch.load(weights_only=True)`` (tensors, plain containers and numbers), plus, where a
library's own files need them, a short explicit allow-list of data classes:

- ``load_weights_only(path, what)``: one file a user names; a pickle that needs more is refused with an error naming
  the file (and the setting it came from) and the offending global.
- ``weights_only_loads(allow)``: a context in which every ``torch.load`` call, including those inside DeepSpeed
  and torch-fidelity that pass ``weights_only=False`` themselves, runs with ``weights_only=True`` and ``allow``.
  DeepSpeed's checkpoint loaders and torch-fidelity's weight and statistics loaders run inside it.

``DEEPSPEED_SAFE_GLOBALS`` is what DeepSpeed 0.19's checkpoints hold besides tensors (found by saving ZeRO-1/2/3
checkpoints in fp32 and bf16 and their universal conversions, and listing
``torch.serialization.get_unsafe_globals_in_checkpoint``): the ZeRO stage enum, the loss scaler objects and the
tensor-fragment address dataclass. ``NUMPY_SAFE_GLOBALS`` is what torch-fidelity's cached statistics (numpy arrays)
need.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import IO, Any

import torch


class UnsafePickleError(ValueError):
    """A torch file that needs more than tensors and the allow-listed types to load."""


def _name(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, "name", None) or repr(f))


RESAVE_HINT = ("Re-save its tensors as .safetensors where you trust the file "
               "(safetensors.torch.save_file(state_dict, 'model.safetensors')) and point the config at that")


def refusal(path: str, err: BaseException, what: str | None = None, hint: str = RESAVE_HINT) -> UnsafePickleError:
    """The error for a pickle ``weights_only`` refused: the file, where it came from, the global it asked for."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    # torch names the offending global ("Unsupported global: GLOBAL builtins.exec ..."): show that line
    first = next((ln for ln in lines if "global" in ln.lower()), lines[0])[:300]
    where = f" ({what})" if what else ""
    return UnsafePickleError(
        f"refusing to load {path}{where}: it is a pickle that needs more than tensors and plain containers "
        f"({first}). Loading it would run code from the file. {hint}"
    )


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types in DeepSpeed's model_states / optim_states / universal files (imported lazily)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def numpy_safe_globals() -> list[Any]:
    """numpy arrays of plain dtypes (torch-fidelity caches FID statistics as float64 arrays)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_)]
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


_ORIGINAL_LOAD = torch.load


def _weights_only_load(f: Any, allow: Sequence[Any], hint: str, map_location: Any = None,
                       mmap: bool | None = None, **kwargs: Any) -> Any:
    kwargs.pop("pickle_module", None)  # torch refuses a custom pickle module with weights_only
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return _ORIGINAL_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
    except pickle.UnpicklingError as err:
        raise refusal(_name(f), err, hint=hint) from None
    except Exception as err:  # e.g. "PytorchStreamReader failed reading zip archive": say which file
        if hasattr(err, "add_note"):
            err.add_note(f"while loading {_name(f)}")
        raise


def load_weights_only(path: str | os.PathLike | IO[bytes], what: str | None = None, allow: Sequence[Any] = (),
                      map_location: Any = "cpu", mmap: bool = False, hint: str = RESAVE_HINT) -> Any:
    """``torch.load(path, weights_only=True)`` (plus ``allow``); a pickle that needs more is refused naming
    ``path`` and ``what`` (the setting it came from), with ``hint`` as the fix. ``mmap=True`` maps the tensors
    instead of reading them (zip-format files; others are read), for a check that the file loads. ``path`` may be
    an open binary file (bytes read from a URL): its ``name`` attribute, when set, is the name errors give."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            try:
                return _ORIGINAL_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap or None)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
                return _ORIGINAL_LOAD(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise refusal(_name(path), err, what, hint) from None


@contextlib.contextmanager
def weights_only_loads(allow: Sequence[Any] = (), hint: str = RESAVE_HINT) -> Iterator[None]:
    """Inside: ``torch.load`` always means ``weights_only=True`` with ``allow``, whatever the caller passes.

    For libraries that load their own files with ``weights_only=False`` (DeepSpeed, torch-fidelity); they call
    ``torch.load`` through the module attribute, which this replaces for the duration (single-threaded use).
    """
    allow = list(allow)

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args:  # positional pickle_module (never used by those libraries); weights_only refuses it anyway
            kwargs.setdefault("pickle_module", args[0])
        return _weights_only_load(f, allow, hint, map_location=map_location, **kwargs)

    previous = torch.load
    torch.load = load
    try:
        yield
    finally:
        torch.load = previous


def check_safetensors_header(path: str, head: bytes, size: int) -> int:
    """The header length of a safetensors file from its first bytes ``head`` and its ``size``; a ValueError naming
    the file when the header cannot be there (a truncated file, or not safetensors at all)."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if n < 2 or 8 + n > size:
        raise ValueError(f"{path} is not a readable safetensors file: its {size} bytes cannot hold the "
                         f"{'8-byte length' if n < 0 else f'{n}-byte header'} it starts with (truncated or "
                         "damaged): copy or export it again")
    return n
