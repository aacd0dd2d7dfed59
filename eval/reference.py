"""The reference (real) image set FID and precision/recall compare against.

An image folder or raw image shards (anything ``ldm_train.data.readers.image_dataset`` reads: img2dataset
tars, brace patterns, image folders, s3://) is materialised ONCE as ``<cache>/reference/<key>/`` PNGs at
the generated images' resolution, resized and centre-cropped by ``ldm_train.data.transforms`` exactly as the
training images were. ``key = <name>-n<count>-r<resolution>-<fingerprint>``, the fingerprint hashing every input
file's path, size and modification time, so two folders with the same name but other images never share a cache
entry, and an edited folder is read again. ``eval.fidelity`` adds the feature network's weights hash and
torch-fidelity its extractor name when it caches the reference features.
"""
from __future__ import annotations

import json
import os
import shutil

from eval.sampling import sample_path, save_png
from ldm_train.data.input_shards import fingerprint


def reference_key(path: str, name: str | None, num_images: int, resolution: int) -> str:
    base = name or os.path.basename(str(path).rstrip("/")).replace("{", "").replace("}", "").replace("..", "-")
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "reference"
    return f"{base}-n{num_images if num_images > 0 else 'all'}-r{resolution}-{fingerprint(path)}"


def materialise_reference(path: str, name: str | None, num_images: int, resolution: int, cache_dir: str) -> tuple[str, str]:
    """Returns (folder of PNGs, cache key); reuses a complete folder from an earlier eval."""
    from ldm_train.data.readers import image_dataset

    key = reference_key(path, name, num_images, resolution)
    folder = os.path.join(cache_dir, "reference", key)
    done = os.path.join(folder, "done.json")
    if os.path.isfile(done):
        print(f"[eval] reusing the reference images of {path} cached as {folder}", flush=True)
        return folder, key
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    count = 0
    for rec in image_dataset(path, resolution):
        save_png(rec["image"], sample_path(tmp, count))
        count += 1
        if 0 < num_images <= count:
            break
    if count == 0:
        raise ValueError(f"reference.path={path} yielded no images: point it at an image folder or image shards")
    if 0 < num_images and count < num_images:
        print(f"[eval] reference {path} holds only {count} images (< reference.num_images={num_images})", flush=True)
    with open(os.path.join(tmp, "done.json"), "w") as f:
        json.dump({"path": str(path), "count": count, "resolution": resolution}, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    os.replace(tmp, folder)
    return folder, key
